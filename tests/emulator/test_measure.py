"""PCRs as DESIGN.md defines them, over a temporary checkout: exact listings, what changes them,
what does not."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

from emulator import measure as m

ZERO = bytes(48)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def extend(listing: str) -> bytes:
    return hashlib.sha384(ZERO + hashlib.sha384(listing.encode()).digest()).digest()


@pytest.fixture
def checkout(tmp_path: Path) -> tuple[Path, Path, Path]:
    app = tmp_path / "app"
    (app / "enclave" / "sub").mkdir(parents=True)
    (app / "protocol").mkdir()
    (app / "enclave" / "server.py").write_bytes(b"print('serve')\n")
    (app / "enclave" / "sub" / "data.txt").write_bytes(b"data")
    (app / "protocol" / "wire.py").write_bytes(b"WIRE = 1\n")
    (app / "enclave" / "__pycache__").mkdir()
    (app / "enclave" / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"bytecode")
    (app / "chatbot").mkdir()  # not part of the enclave image
    (app / "chatbot" / "cli.py").write_bytes(b"cli")
    config = tmp_path / "enclave.json"
    config.write_bytes(b'{"region": "us-east-1"}\n')
    model = tmp_path / "model"
    (model / "tok").mkdir(parents=True)
    (model / "config.json").write_bytes(b"{}")
    (model / "tok" / "vocab.json").write_bytes(b"[]")
    return app, config, model


def test_pcr2_is_the_documented_listing(checkout):
    app, config, model = checkout
    digests = {
        "enclave/server.py": sha256(b"print('serve')\n"),
        "enclave/sub/data.txt": sha256(b"data"),
        "protocol/wire.py": sha256(b"WIRE = 1\n"),
        "config/enclave.json": sha256(b'{"region": "us-east-1"}\n'),
        "model/config.json": sha256(b"{}"),
        "model/tok/vocab.json": sha256(b"[]"),
    }
    listing = "".join(sorted(f"{path} {digest}\n" for path, digest in digests.items()))
    assert m.application_listing(app, config, model).decode() == listing
    pcrs = m.measure(app, config, model)
    assert pcrs[2] == extend(listing)


def test_pcr1_is_the_runtime_listing():
    listing = m.runtime_listing().decode()
    lines = listing.splitlines(keepends=True)
    assert lines[0] == f"python {sys.version}\n"
    assert lines[1:] == sorted(lines[1:])
    assert f"dist cbor2=={importlib.metadata.version('cbor2')}\n" in lines
    assert all(line == line.lower() for line in lines[1:])  # "Flask" is measured as "flask"
    assert m.measure(Path(__file__).parents[2], None, None)[1] == extend(listing)


def test_measure_gives_sixteen_pcrs_and_pcr0_covers_pcr1_and_pcr2(checkout):
    pcrs = m.measure(*checkout)
    assert sorted(pcrs) == list(range(16))
    assert all(len(value) == 48 for value in pcrs.values())
    assert all(pcrs[i] == ZERO for i in range(3, 16))  # PCR3, 4, 8 have no local meaning
    assert pcrs[0] == extend(f"pcr1 {pcrs[1].hex()}\npcr2 {pcrs[2].hex()}\n")
    assert m.measure(*checkout) == pcrs  # deterministic


def test_changing_a_measured_file_changes_pcr2_and_pcr0(checkout):
    app, config, model = checkout
    before = m.measure(app, config, model)
    (app / "enclave" / "server.py").write_bytes(b"print('tampered')\n")
    after = m.measure(app, config, model)
    assert after[2] != before[2] and after[0] != before[0]
    assert after[1] == before[1]


@pytest.mark.parametrize(
    "change",
    [
        lambda app, config, model: (app / "protocol" / "new.py").write_bytes(b""),
        lambda app, config, model: config.write_bytes(b'{"region": "eu-west-1"}\n'),
        lambda app, config, model: (model / "tok" / "vocab.json").write_bytes(b'["x"]'),
        lambda app, config, model: (app / "enclave" / "sub" / "data.txt").rename(
            app / "enclave" / "sub" / "moved.txt"
        ),
    ],
    ids=["new protocol file", "config", "model file", "renamed file"],
)
def test_each_measured_input_changes_pcr2(checkout, change):
    before = m.measure(*checkout)
    change(*checkout)
    assert m.measure(*checkout)[2] != before[2]


def test_bytecode_and_files_outside_the_image_are_not_measured(checkout):
    app, config, model = checkout
    before = m.measure(app, config, model)
    (app / "enclave" / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"other")
    (app / "enclave" / "__pycache__" / "extra.txt").write_bytes(b"ignored too")
    (app / "protocol" / "stray.pyc").write_bytes(b"stale")
    (app / "chatbot" / "cli.py").write_bytes(b"changed")
    assert m.measure(app, config, model) == before


def _age(path: Path, seconds: int = 60) -> None:
    """Date the file's mtime `seconds` back: out of the racy window, so its digest is cached."""
    mtime = path.stat().st_mtime_ns - seconds * 1_000_000_000
    os.utime(path, ns=(mtime, mtime))


def test_digests_are_cached_by_path_size_and_mtime(checkout):
    app, config, model = checkout
    target = app / "enclave" / "server.py"
    _age(target)
    before = m.measure(app, config, model)
    info = target.stat()
    target.write_bytes(b"print('SERVE')\n")  # same size
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    # Same (path, size, mtime): the cached digest is used, the file is not read again.
    assert m.measure(app, config, model) == before
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    assert m.measure(app, config, model)[2] != before[2]


def test_a_recently_modified_file_is_read_again_even_with_the_same_size_and_mtime(checkout):
    # Coarse kernel timestamps: an edit right after a measurement can keep (size, mtime).
    # Files modified within the racy window are never taken from the cache.
    app, config, model = checkout
    target = app / "enclave" / "server.py"
    before = m.measure(app, config, model)
    info = target.stat()
    assert m.time.time_ns() - info.st_mtime_ns < m.RACY_WINDOW_NS
    target.write_bytes(b"print('SERVE')\n")  # same size
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    after = m.measure(app, config, model)
    assert after[2] != before[2] and after[0] != before[0]


def test_a_missing_part_of_the_image_is_a_measure_error(tmp_path, checkout):
    app, config, model = checkout
    with pytest.raises(m.MeasureError):
        m.measure(tmp_path / "nowhere", config, model)
    with pytest.raises(m.MeasureError):
        m.measure(app, tmp_path / "no-config.json", model)
    with pytest.raises(m.MeasureError):
        m.measure(app, config, tmp_path / "no-model")


def test_a_symlink_cycle_in_the_model_ends(checkout):
    app, config, model = checkout
    (model / "tok" / "loop").symlink_to(model, target_is_directory=True)
    assert len(m.measure(app, config, model)) == 16


def test_format_measurements_looks_like_nitro_cli(checkout):
    pcrs = m.measure(*checkout)
    assert m.format_measurements(pcrs) == {
        "Measurements": {
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": pcrs[0].hex(),
            "PCR1": pcrs[1].hex(),
            "PCR2": pcrs[2].hex(),
        }
    }
