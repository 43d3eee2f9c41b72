"""parent_proxy/model_feed.py: bad requests from the enclave side get a clear error frame, and
the feed keeps serving the sealed model afterwards."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from parent_proxy.credentials import FileCredentials
from parent_proxy.model_feed import ModelFeed, SealedDirectory
from protocol import sealed_model as sm
from protocol.envelope import unb64
from protocol.errors import ErrorCode, error_from_wire
from protocol.framing import recv_frame, recv_json, send_frame, send_json
from protocol.transport import Address


@pytest.fixture
def feed(tmp_path: Path, short_dir: Path) -> Iterator[tuple[Address, Path]]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes(os.urandom(5000))

    def wrap(context):
        return os.urandom(32), b"wrapped", "arn:aws:kms:us-east-1:111122223333:key/model"

    sealed = tmp_path / "sealed"
    sm.seal_directory(model, sealed, wrap, sm.MIN_CHUNK_SIZE)
    creds = tmp_path / "parent.json"
    creds.write_text(
        json.dumps(
            {
                "credentials": {
                    "access_key_id": "AKIAFEED",
                    "secret_access_key": "s",
                    "session_token": None,
                }
            }
        )
    )
    server = ModelFeed(SealedDirectory.open(sealed), FileCredentials(creds))
    address = Address.parse(f"unix://{short_dir}/feed.sock")
    listening = threading.Event()
    thread = threading.Thread(target=server.serve, args=(address, listening), daemon=True)
    thread.start()
    assert listening.wait(10)
    try:
        yield address, sealed
    finally:
        server.shutdown()
        thread.join(5)


def _refusal(address: Address, raw: bytes) -> tuple[int, ErrorCode]:
    with address.connect(5) as sock:
        send_frame(sock, raw)
        answer = recv_json(sock, 4096, 10)
    return answer["status"], error_from_wire(answer)[0]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"[" * 5000, ErrorCode.PROTOCOL_ERROR),  # nested past json's recursion limit
        (b"not json", ErrorCode.PROTOCOL_ERROR),
        (b'{"kind": "chat", "trace_id": "t"}', ErrorCode.PROTOCOL_ERROR),
        (b'{"kind": "model_file", "trace_id": "t", "index": 5}', ErrorCode.BAD_REQUEST),
    ],
)
def test_a_bad_request_gets_its_code_and_the_feed_keeps_serving(feed, raw, code) -> None:
    address, sealed = feed
    status, got = _refusal(address, raw)
    assert got is code and status >= 400
    # Still serving: the manifest as written, then file 0's bytes whole.
    with address.connect(5) as sock:
        send_json(sock, {"kind": sm.FEED_MANIFEST, "trace_id": "after"})
        assert recv_json(sock, 4096, 10) == {"status": 200}
        offer = recv_json(sock, 1 << 20, 10)
    assert unb64(offer["manifest"], "manifest") == (sealed / sm.MANIFEST_FILE).read_bytes()
    with address.connect(5) as sock:
        send_json(sock, {"kind": sm.FEED_FILE, "trace_id": "after", "index": 0})
        assert recv_json(sock, 4096, 10) == {"status": 200}
        served = recv_frame(sock, sm.FEED_PIECE, 10)
    assert served == (sealed / sm.sealed_file_name(0)).read_bytes()
