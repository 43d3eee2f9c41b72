"""Fixtures shared by every test package.

`tiny_model_dir`: the trained tiny BLOOM with the fast engine's prepared int8 weights beside its
fp32 ones, built once per session (or taken from NITRO_TINY_MODEL).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest


def _build_prepared(path: Path) -> Path:
    from emulator.tiny_model import build_tiny_model
    from enclave.fast_engine import prepare_model

    build_tiny_model(path)
    prepare_model(path, path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the tiny model; NITRO_TINY_MODEL names one to reuse (or fill).

    A given directory built before the fast engine existed (no prepared weights) is never
    changed: the session works on a prepared copy of it instead.
    """
    from enclave.fast_engine import PREPARED_FILE, prepare_model

    given = os.environ.get("NITRO_TINY_MODEL")
    if given:
        path = Path(given)
        if not path.exists():
            # Built aside and renamed, so an interrupted run never leaves a half model to reuse.
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
            os.replace(_build_prepared(staging), path)
        if (path / PREPARED_FILE).is_file():
            return path
        copy = tmp_path_factory.mktemp("tiny-model-prepared")
        for item in path.iterdir():
            if item.is_file():
                shutil.copyfile(item, copy / item.name)
        prepare_model(copy, copy)
        return copy
    return _build_prepared(tmp_path_factory.mktemp("tiny-model"))
