"""enclave/model_loader.py against real feed sockets: it waits for a feed that is not up yet,
and no feed, honest or hostile, can hold a boot for longer than the load's deadline.

The honest feed is parent_proxy/model_feed.py; the hostile ones are small servers below that
speak the feed's framing and then misbehave. Every wait is injected short (FeedLimits).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave import model_loader as ml
from parent_proxy.credentials import FileCredentials
from parent_proxy.model_feed import ModelFeed, SealedDirectory
from protocol import sealed_model as sm
from protocol.errors import ErrorCode
from protocol.framing import recv_json, send_frame, send_json
from protocol.transport import Address

CHUNK = sm.MIN_CHUNK_SIZE
FAST = ml.FeedLimits(connect_wait_s=5.0, frame_timeout_s=5.0, min_load_s=10.0, end_wait_s=5.0)


@dataclass
class Model:
    root: Path  # the sealed directory
    aead: AESGCM
    manifest: sm.Manifest
    plain: bytes  # file 0's plaintext
    sealed: bytes  # file 0's sealed bytes, as the feed serves them


@pytest.fixture
def model(tmp_path: Path) -> Model:
    source = tmp_path / "model"
    source.mkdir()
    plain = os.urandom(5 * CHUNK + 77)
    (source / "weights.bin").write_bytes(plain)
    key = os.urandom(32)
    manifest = sm.seal_directory(
        source, tmp_path / "sealed", lambda _ctx: (key, b"wrapped", "arn:k"), CHUNK
    )
    root = tmp_path / "sealed"
    sealed = (root / sm.sealed_file_name(0)).read_bytes()
    return Model(root, AESGCM(key), manifest, plain, sealed)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ml-", dir="/tmp"))  # unix paths stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _credentials(directory: Path) -> FileCredentials:
    path = directory / "parent.json"
    keys = {"access_key_id": "AKIAFEED", "secret_access_key": "s", "session_token": None}
    path.write_text(json.dumps({"credentials": keys}))
    return FileCredentials(path)


def _fetch(model: Model, address: Address, limits: ml.FeedLimits) -> bytearray:
    unsealer = sm.FileUnsealer(model.aead, model.manifest, 0)
    return ml.fetch_file(address, unsealer, 0, "test", limits, ml.Deadline(limits.min_load_s))


def _refused(code: ErrorCode, action: Callable[[], object]) -> tuple[ml.SealedModelError, float]:
    began = time.monotonic()
    with pytest.raises(ml.SealedModelError) as caught:
        action()
    assert caught.value.code is code, caught.value
    return caught.value, time.monotonic() - began


# ---- a feed that comes up late -----------------------------------------------------------------


def test_an_enclave_that_boots_before_its_feed_waits_for_it(
    model: Model, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = Address.parse(f"unix://{sock_dir}/feed.sock")
    feed = ModelFeed(SealedDirectory.open(model.root), _credentials(sock_dir))
    thread = threading.Thread(target=feed.serve, args=(address,), daemon=True)
    starter = threading.Timer(1.0, thread.start)  # the feed starts a second after the enclave
    starter.start()
    caplog.set_level(logging.WARNING, logger="enclave.model_loader")
    try:
        raw, key, _credentials_ = ml.fetch_offer(address, "late", FAST)
        assert raw == (model.root / sm.MANIFEST_FILE).read_bytes()
        assert key == json.loads((model.root / sm.KEY_FILE).read_text())
        assert bytes(_fetch(model, address, FAST)) == model.plain
    finally:
        starter.cancel()
        feed.shutdown()
        if thread.is_alive():
            thread.join(5)
    retries = [r for r in caplog.records if r.getMessage() == "model_feed_retry"]
    assert len(retries) >= 2  # 0.25 s, then 0.5 s, ... until the feed listens
    assert [r.fields["attempt"] for r in retries] == list(range(1, len(retries) + 1))
    for record in retries:  # attempts and the OS's reason: nothing else
        assert set(record.fields) == {"attempt", "reason", "retry_in_ms"}


def test_a_feed_that_never_comes_up_is_given_up_on_in_time(
    model: Model, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = Address.parse(f"unix://{sock_dir}/nobody.sock")
    limits = ml.FeedLimits(connect_wait_s=1.5)
    caplog.set_level(logging.WARNING, logger="enclave.model_loader")
    error, took = _refused(
        ErrorCode.MODEL_FEED_UNAVAILABLE, lambda: ml.fetch_offer(address, "t", limits)
    )
    assert 1.4 <= took < 4.0 and "attempts in 2 s" in str(error.detail)
    assert sum(r.getMessage() == "model_feed_retry" for r in caplog.records) >= 3


def test_the_deadline_scales_with_the_sealed_size(model: Model) -> None:
    limits = ml.FeedLimits()
    assert limits.load_budget_s(model.manifest) == ml.MIN_LOAD_S == 120.0
    big = sm.Manifest(
        model.manifest.seal_id, sm.DEFAULT_CHUNK_SIZE, (sm.FileEntry("w", 2 << 30, "0" * 64),)
    )
    sealed = big.files[0].sealed_size(sm.DEFAULT_CHUNK_SIZE)
    assert limits.load_budget_s(big) == sealed / 5_000_000 > 429  # 2 GiB at 5 MB/s


# ---- hostile feeds -----------------------------------------------------------------------------


class HostileFeed:
    """Answers each request with status 200, then runs `behave(conn, stop)`; closes when it
    returns or after 10 s at most, whichever is first (a test never hangs on it)."""

    def __init__(self, path: Path, behave: Callable[[socket.socket, threading.Event], None]):
        self.address = Address.parse(f"unix://{path}")
        self._behave, self._stop = behave, threading.Event()
        self._listener = self.address.listen()
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    recv_json(conn, 4096, 5)
                    send_json(conn, {"status": 200})
                    self._behave(conn, self._stop)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self._listener.close()


@pytest.fixture
def hostile(sock_dir: Path) -> Iterator[Callable[..., HostileFeed]]:
    feeds: list[HostileFeed] = []

    def start(behave: Callable[[socket.socket, threading.Event], None]) -> HostileFeed:
        feeds.append(HostileFeed(sock_dir / f"h{len(feeds)}.sock", behave))
        return feeds[-1]

    yield start
    for feed in feeds:
        feed.close()


def _for_a_while(stop: threading.Event, step: Callable[[], None], seconds: float = 10.0) -> None:
    until = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < until:
        step()


def test_empty_frames_are_refused_at_once(model: Model, hostile) -> None:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        def empty() -> None:
            send_frame(conn, b"")
            time.sleep(0.05)

        _for_a_while(stop, empty)

    feed = hostile(behave)
    error, took = _refused(ErrorCode.MODEL_CHUNK_CORRUPT, lambda: _fetch(model, feed.address, FAST))
    assert took < 3.0 and "empty frame" in str(error.detail)


def test_a_trickling_feed_is_refused_at_the_loads_deadline(model: Model, hostile) -> None:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        pieces = iter(model.sealed)

        def one_byte() -> None:  # every frame well within the frame timeout
            send_frame(conn, bytes([next(pieces)]))
            time.sleep(0.05)

        _for_a_while(stop, one_byte)

    feed = hostile(behave)
    limits = ml.FeedLimits(frame_timeout_s=5.0, min_load_s=1.5, end_wait_s=5.0)
    error, took = _refused(
        ErrorCode.MODEL_FEED_UNAVAILABLE, lambda: _fetch(model, feed.address, limits)
    )
    assert 1.4 <= took < 4.0 and "did not arrive within 2 s" in str(error.detail)


def test_a_silent_feed_is_refused_after_the_frame_timeout(model: Model, hostile) -> None:
    feed = hostile(lambda _conn, stop: stop.wait(10))
    limits = ml.FeedLimits(frame_timeout_s=1.0, min_load_s=30.0)
    error, took = _refused(
        ErrorCode.MODEL_FEED_UNAVAILABLE, lambda: _fetch(model, feed.address, limits)
    )
    assert 0.9 <= took < 3.0 and "sent nothing for 1 s" in str(error.detail)


def test_a_feed_left_open_after_the_final_chunk_is_not_waited_for(
    model: Model, hostile, caplog: pytest.LogCaptureFixture
) -> None:
    def behave(conn: socket.socket, stop: threading.Event) -> None:
        send_frame(conn, model.sealed, sm.FEED_PIECE)
        stop.wait(10)  # and never closes

    feed = hostile(behave)
    caplog.set_level(logging.WARNING, logger="enclave.model_loader")
    began = time.monotonic()
    opened = _fetch(model, feed.address, ml.FeedLimits(end_wait_s=0.5))
    assert time.monotonic() - began < 3.0
    assert bytes(opened) == model.plain  # every chunk was authenticated
    assert [r.fields for r in caplog.records if r.getMessage() == "model_feed_left_open"] == [
        {"file": 0}
    ]


@pytest.mark.parametrize(
    ("after", "code"),
    [
        ("record", ErrorCode.MODEL_CHUNK_REORDERED),  # a whole chunk again
        ("a few bytes", ErrorCode.MODEL_CHUNK_REORDERED),  # less than a chunk's header
        ("torn frame", ErrorCode.MODEL_CHUNK_REORDERED),  # a frame cut short, then closed
    ],
)
def test_data_after_the_final_chunk_is_refused_with_its_code(
    model: Model, hostile, after: str, code: ErrorCode
) -> None:
    first = model.sealed[: sm.HEADER.size + CHUNK + sm.TAG_SIZE]

    def behave(conn: socket.socket, _stop: threading.Event) -> None:
        send_frame(conn, model.sealed, sm.FEED_PIECE)
        if after == "record":
            send_frame(conn, first, sm.FEED_PIECE)
        elif after == "a few bytes":
            send_frame(conn, first[:10], sm.FEED_PIECE)
        else:
            conn.sendall(struct.pack(">I", 1000) + b"x" * 10)

    feed = hostile(behave)
    _refused(code, lambda: _fetch(model, feed.address, FAST))


@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("oversized frame", ErrorCode.MODEL_CHUNK_CORRUPT),
        ("closed mid-frame", ErrorCode.MODEL_TRUNCATED),
        ("closed between chunks", ErrorCode.MODEL_TRUNCATED),
    ],
)
def test_broken_framing_mid_file_is_refused_with_its_code(
    model: Model, hostile, fault: str, code: ErrorCode
) -> None:
    half = len(model.sealed) // 2
    record = sm.HEADER.size + CHUNK + sm.TAG_SIZE

    def behave(conn: socket.socket, _stop: threading.Event) -> None:
        if fault == "oversized frame":
            conn.sendall(struct.pack(">I", sm.FEED_PIECE + 1))
        elif fault == "closed mid-frame":
            conn.sendall(struct.pack(">I", half) + model.sealed[:100])
        else:
            send_frame(conn, model.sealed[: 2 * record], sm.FEED_PIECE)

    feed = hostile(behave)
    _, took = _refused(code, lambda: _fetch(model, feed.address, FAST))
    assert took < 3.0


def test_the_files_a_sealed_fast_engine_keeps_are_enough_for_it(tiny_model_dir: Path) -> None:
    from enclave.engine import GenerationParams

    names = ml.engine_files("fast")
    assert "model.safetensors" not in names  # the largest file is verified, then dropped
    files = {name: bytearray((tiny_model_dir / name).read_bytes()) for name in names}
    engine = ml.engine_from_memory(files, "fast", max_batch=1)
    steps = list(engine.generate("Question: What is a pension?", GenerationParams(4)))
    assert len(steps) == 4 and not files  # every buffer was consumed
