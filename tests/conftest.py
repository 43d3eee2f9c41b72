"""Fixtures shared by every test package.

`tiny_model_dir`: the trained tiny BLOOM with the fast engine's prepared int8 weights beside its
fp32 ones, built once per session (or taken from NITRO_TINY_MODEL).
`canary`: the session's registry of secret questions and opened answers, which the canary sweep
(tests/test_canary_sweep.py, always run last) looks for in everything the run wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


# ---- the canary sweep ------------------------------------------------------------------------
#
# Tests make their secret questions with the `canary` fixture and record the answers they open;
# every server log, state directory and capture a test writes lives under the session's base
# temporary directory (tmp_path_factory). tests/test_canary_sweep.py, run last whatever was
# selected, scans all of it for every canary: none may appear.

SWEEP_FILE = Path(__file__).parent / "test_canary_sweep.py"
SWEEP_TEST = "test_no_canary_in_anything_the_run_wrote"
MIN_ANSWER_CHARS = 12  # shorter text can occur in any file by chance
_SCAN_STEP = 1 << 20


class CanaryRegistry:
    """The session's secrets: canary questions, and the answers tests opened.

    `new()` makes a canary to put in a question; `answer(text)` records an opened answer;
    `capture(name, data)` keeps bytes a test saw in memory (a metrics page, relayed bytes) where
    the sweep will scan them. `leaks()` is the sweep itself.
    """

    def __init__(self, base: Path) -> None:
        self.base = base  # the session's base temporary directory: everything tests wrote
        self.secrets: set[str] = set()
        self._lock = threading.Lock()

    def new(self, label: str = "canary") -> str:
        made = f"{label}-{secrets.token_hex(8)}"
        with self._lock:
            self.secrets.add(made)
        return made

    def answer(self, text: str) -> None:
        text = text.strip()
        if len(text) >= MIN_ANSWER_CHARS:
            with self._lock:
                self.secrets.add(text)

    def capture(self, name: str, data: bytes) -> Path:
        directory = self.base / "sweep-captures"
        directory.mkdir(exist_ok=True)
        path = directory / f"{secrets.token_hex(4)}-{name}"
        path.write_bytes(data)
        return path

    def leaks(self) -> tuple[int, list[tuple[str, int]]]:
        """(files scanned, leaks) over the base directory and everything the session knows."""
        with self._lock:
            known = sorted(self.secrets)
        return find_leaks([self.base], known)


def _forms(secret: str) -> list[bytes]:
    """A secret as it would appear in a file: raw UTF-8, and inside a JSON string."""
    raw = secret.encode()
    escaped = json.dumps(secret)[1:-1].encode()
    escaped_utf8 = json.dumps(secret, ensure_ascii=False)[1:-1].encode()
    return sorted({raw, escaped, escaped_utf8})


def find_leaks(roots: list[Path], secrets_: list[str]) -> tuple[int, list[tuple[str, int]]]:
    """Scan every regular file under `roots` for every secret (raw or JSON-escaped).

    Returns (files scanned, [(file, index of the secret in `secrets_`)]): a report names where
    and which, never the secret itself. Files are read in bounded steps, overlapping by the
    longest form, so a secret across a step boundary is still found.
    """
    forms = [(i, form) for i, secret in enumerate(secrets_) for form in _forms(secret)]
    overlap = max((len(form) for _i, form in forms), default=0)
    scanned, found = 0, set()
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else []:
            if path.is_symlink() or not path.is_file():
                continue  # sockets, fifos and links: nothing written there to read back
            scanned += 1
            tail = b""
            try:
                with open(path, "rb") as handle:
                    while piece := handle.read(_SCAN_STEP):
                        window = tail + piece
                        for i, form in forms:
                            if form in window:
                                found.add((str(path), i))
                        tail = window[-overlap:] if overlap else b""
            except OSError:
                continue
    return scanned, sorted(found)


@pytest.fixture(scope="session")
def canary(tmp_path_factory: pytest.TempPathFactory) -> CanaryRegistry:
    """The session's canary registry (see CanaryRegistry)."""
    return CanaryRegistry(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session", autouse=True)
def _opened_answers_are_canaries(canary: CanaryRegistry) -> Iterator[None]:
    """Every answer a test opens through SecureChatClient is recorded as a canary.

    A spy on the real client (it changes nothing it returns): the answers tests received must
    not be in any log, metrics page or relayed byte either.
    """
    try:
        from chatbot import client as chat
    except ImportError:  # the client's extras are not installed: nothing to record
        yield
        return
    original = chat.Conversation._exchange

    def recording(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        with contextlib.closing(original(self, *args, **kwargs)) as inner:
            for item in inner:
                if item[2] is not None:
                    canary.answer(item[2].text)
                yield item

    patch = pytest.MonkeyPatch()
    patch.setattr(chat.Conversation, "_exchange", recording)
    yield
    patch.undo()


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect have chosen
def pytest_collection_modifyitems(session: pytest.Session, items: list[pytest.Item]) -> None:
    """The sweep runs last, and runs even when only part of the suite was selected."""
    if not items:
        return
    sweeps = [item for item in items if _is_sweep(item)]
    if not sweeps and SWEEP_FILE.is_file():
        # Under the tests/ directory's node, so that this conftest's fixtures apply to it.
        chains = (node for item in items for node in item.listchain())
        parent = next((node for node in chains if node.path == SWEEP_FILE.parent), session)
        module = pytest.Module.from_parent(parent, path=SWEEP_FILE)
        sweeps = [item for item in module.collect() if _is_sweep(item)]
    for item in sweeps:
        if item in items:
            items.remove(item)
    items.extend(sweeps)


def _is_sweep(item: pytest.Item) -> bool:
    return item.name == SWEEP_TEST and Path(item.path) == SWEEP_FILE
