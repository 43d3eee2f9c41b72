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


def test_quantize_prepares_a_saved_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    done = _run("--quantize", str(tiny_model_dir), str(tmp_path / "int8"))
    assert done.returncode == 0, done.stderr
    written = {p.name for p in (tmp_path / "int8").iterdir()}
    assert {"model-int8.safetensors", "config.json", "tokenizer.json"} <= written
    assert "model.safetensors" not in written  # the enclave image needs the int8 weights only
    assert all((tmp_path / "int8" / name).stat().st_mode & 0o644 == 0o644 for name in written)


def test_quantize_of_a_directory_without_weights_fails_with_one_line(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    (tmp_path / "empty").mkdir()
    config = (tiny_model_dir / "config.json").read_text()
    (tmp_path / "empty" / "config.json").write_text(config)
    done = _run("--quantize", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no model" in done.stderr and not (tmp_path / "out" / "model-int8.safetensors").exists()
