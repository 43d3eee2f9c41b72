"""Fixtures shared by every test package.

`tiny_model_dir`: the trained tiny BLOOM, built once per session (or taken from NITRO_TINY_MODEL).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny model; NITRO_TINY_MODEL names one to reuse (or fill)."""
    from emulator.tiny_model import build_tiny_model

    given = os.environ.get("NITRO_TINY_MODEL")
    if given:
        path = Path(given)
        if not path.exists():
            # Built aside and renamed, so an interrupted run never leaves a half model to reuse.
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
            os.replace(build_tiny_model(staging), path)
        return path
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
