"""The PCRs the NSM emulator reports: the enclave measured as its image would be (DESIGN.md).

PCR1 (runtime), PCR2 (application) and PCR0 (both) are each SHA384(0^48 || SHA384(listing)).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import stat
import sys
import threading
import time
from pathlib import Path

PCR_COUNT = 16
PCR_SIZE = 48
ZERO_PCR = bytes(PCR_SIZE)
APP_DIRS = ("enclave", "protocol")
_CHUNK = 1 << 20

# File digests by (path, size, mtime_ns): re-measuring at every enclave boot must not re-read a
# gigabyte of model weights that did not change.
_digest_cache: dict[tuple[str, int, int], str] = {}
_cache_lock = threading.Lock()
# A file modified this recently is never cached: the kernel stamps mtimes from a coarse clock, so a
# same-size edit made soon after a measurement could keep (size, mtime) and pass unnoticed (git's
# "racy clean" problem). Files of enclave/ and protocol/ are small; re-reading them costs nothing.
RACY_WINDOW_NS = 3_000_000_000


class MeasureError(Exception):
    """Something to be measured is missing or unreadable; the message names it."""


def extend(listing: bytes) -> bytes:
    """A PCR extended once from zero by the digest of `listing`: SHA384(0^48 || SHA384(listing))."""
    return hashlib.sha384(ZERO_PCR + hashlib.sha384(listing).digest()).digest()


def _file_sha256(path: Path) -> str:
    try:
        info = path.stat()
        key = (str(path), info.st_size, info.st_mtime_ns)
        with _cache_lock:
            cached = _digest_cache.get(key)
        if cached is not None:
            return cached
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise MeasureError(f"cannot read {path}: {exc.strerror}") from exc
    hexdigest = digest.hexdigest()
    if time.time_ns() - info.st_mtime_ns > RACY_WINDOW_NS:
        with _cache_lock:
            _digest_cache[key] = hexdigest
    return hexdigest


def _files_under(directory: Path) -> list[Path]:
    """Regular files below `directory` (symlinks followed), without __pycache__ and *.pyc."""
    if not directory.is_dir():
        raise MeasureError(f"{directory} is not a directory")
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        # Symlinked directories are followed (a model directory may be made of links), once
        # each, so that a link cycle cannot make the walk endless.
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = [name for name in dirnames if name != "__pycache__"]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".pyc"):
                continue
            try:
                if not stat.S_ISREG(path.stat().st_mode):
                    continue  # sockets, fifos: nothing an image would hold
            except OSError as exc:
                raise MeasureError(f"cannot read {path}: {exc.strerror}") from exc
            found.append(path)
    return found


def _rel(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def runtime_listing() -> bytes:
    """The Python version and every installed distribution, one sorted line each."""
    dists: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue  # a broken dist-info without a name
        # PEP 503 normalisation, so that "Flask" and "flask" are one distribution.
        dists.add(f"dist {re.sub(r'[-_.]+', '-', name).lower()}=={dist.version}\n")
    return (f"python {sys.version}\n" + "".join(sorted(dists))).encode()


def application_listing(
    app_root: Path, enclave_config: Path | None, model_dir: Path | None
) -> bytes:
    """`<path> <sha256 hex>` for every measured file of the application, sorted."""
    app_root = Path(app_root)
    lines = []
    for name in APP_DIRS:
        for path in _files_under(app_root / name):
            lines.append(f"{_rel(path, app_root)} {_file_sha256(path)}\n")
    if enclave_config is not None:
        lines.append(f"config/enclave.json {_file_sha256(Path(enclave_config))}\n")
    if model_dir is not None:
        model_dir = Path(model_dir)
        for path in _files_under(model_dir):
            lines.append(f"model/{_rel(path, model_dir)} {_file_sha256(path)}\n")
    return "".join(sorted(lines)).encode()


def measure(
    app_root: Path, enclave_config: Path | None, model_dir: Path | None
) -> dict[int, bytes]:
    """PCR0 to PCR15 (48 bytes each) of an enclave built from this checkout, config and model.

    PCR3 (the parent's IAM role), PCR4 (its instance) and PCR8 (the image's signer) have no
    local meaning and stay zero, like every PCR the image does not use.
    """
    pcr1 = extend(runtime_listing())
    pcr2 = extend(application_listing(app_root, enclave_config, model_dir))
    pcr0 = extend(f"pcr1 {pcr1.hex()}\npcr2 {pcr2.hex()}\n".encode())
    pcrs = dict.fromkeys(range(PCR_COUNT), ZERO_PCR)
    pcrs.update({0: pcr0, 1: pcr1, 2: pcr2})
    return pcrs


def format_measurements(pcrs: dict[int, bytes]) -> dict[str, dict[str, str]]:
    """The measurements as `nitro-cli build-enclave` prints them."""
    return {
        "Measurements": {
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": pcrs[0].hex(),
            "PCR1": pcrs[1].hex(),
            "PCR2": pcrs[2].hex(),
        }
    }
