"""The enclave server in front of a full scheduler: `overloaded` before any KMS call or answer.

A real EnclaveServer on a unix socket, with the fast engine on the tiny model held at a gate so
that its batch and queue stay full; no NSM or KMS is needed, since the refusal comes first.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from enclave.boot import Identity
from enclave.config import EnclaveConfig
from enclave.engine import GenerationParams, ScheduledEngine, load_engine
from enclave.kms import AttestedKms
from enclave.server import EnclaveServer
from protocol import envelope
from protocol.errors import ErrorCode, error_from_wire
from protocol.framing import recv_json, send_json
from protocol.messages import Credentials, Kind, Question, RequestFrame, Status
from protocol.prompt import format_prompt
from protocol.transport import Address

KEY = "arn:aws:kms:us-east-1:111122223333:key/local"


class _Gate:
    def __init__(self, inner: Any) -> None:
        self.inner, self.open = inner, threading.Event()
        self.eos_token_id, self.max_batch = inner.eos_token_id, inner.max_batch

    def new_sequence(self, capacity: int) -> Any:
        return self.inner.new_sequence(capacity)

    def step(self, work: Any) -> list[Any]:
        assert self.open.wait(30)
        return self.inner.step(work)


@pytest.fixture
def gated(tiny_model_dir: Path):
    base = load_engine(tiny_model_dir, "fast", max_batch=1)
    gate = _Gate(base.scheduler.model)
    engine = ScheduledEngine("fast", base.codec, gate, max_batch=1, max_queue=1)
    yield engine, gate
    gate.open.set()
    engine.close()
    base.close()


def _chat_body() -> dict[str, Any]:
    session = envelope.b64url(os.urandom(envelope.SESSION_BYTES))
    keys = envelope.derive_keys(os.urandom(32), session)
    header = envelope.Header(
        key_id=KEY,
        session=session,
        request_id=envelope.b64url(os.urandom(envelope.REQUEST_ID_BYTES)),
        sent_at=int(time.time() * 1000),
        stream=True,
    )
    question = Question(format_prompt("What is a pension?"), max_new_tokens=8).to_json()
    return envelope.seal_request(keys, header, os.urandom(64), question).to_json()


def test_a_full_queue_is_refused_with_503_before_the_answer_starts(gated, tmp_path) -> None:
    engine, gate = gated
    config = EnclaveConfig.from_json(
        {"region": "us-east-1", "key_ids": [KEY], "model_dir": str(tmp_path), "max_batch": 1}
    )
    identity = Identity.generate()
    server = EnclaveServer(
        config, None, identity, AttestedKms(config, None, identity), lambda: engine
    )
    address = Address.parse(f"unix://{tmp_path}/e.sock")
    ready = threading.Event()
    threading.Thread(target=server.serve, args=(address, ready), daemon=True).start()
    assert ready.wait(10)
    try:
        deadline = time.monotonic() + 10
        while server.engine is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        prompt = format_prompt("What is vesting?")
        running = engine.generate(prompt, GenerationParams(max_new_tokens=3))
        while engine.scheduler.queue_depth() != (1, 0):  # admitted, held at the gate
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = engine.generate(prompt, GenerationParams(max_new_tokens=3))
        assert engine.scheduler.full()

        credentials = Credentials("AKIDEXAMPLE", "secret", "token")
        frame = RequestFrame(Kind.CHAT, "t1", credentials, _chat_body()).to_json()
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(f"{tmp_path}/e.sock")
            send_json(conn, frame)
            status = Status.from_json(recv_json(conn, 1 << 20, 10))
        assert status.status == 503
        code, _ = error_from_wire({"error": status.error})
        assert code is ErrorCode.OVERLOADED

        gate.open.set()  # the batch drains and the queue empties: serving goes on
        assert len(list(running)) == 3 and len(list(waiting)) == 3
        assert not engine.scheduler.full()
    finally:
        server.shutdown()
