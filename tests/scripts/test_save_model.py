"""Tests for scripts/save_model.py: a clear one-line failure where no hub is reachable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "save_model.py"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )


def test_unreachable_hub_fails_with_one_line(tmp_path: Path) -> None:
    # Nothing listens on port 1: the connection is refused at once, as offline DNS fails here.
    done = _run(str(tmp_path / "bloom"), HF_ENDPOINT="https://127.0.0.1:1")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "bigscience/bloom-560m" in lines[0] and "--tiny" in lines[0]
    assert not (tmp_path / "bloom").exists()


def test_bad_tiny_arguments_fail_with_one_line(tmp_path: Path) -> None:
    done = _run("--tiny", "--steps", "0", str(tmp_path / "tiny"))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "steps" in done.stderr
