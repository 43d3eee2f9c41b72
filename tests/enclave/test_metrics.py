"""The enclave's registry, served by a real EnclaveServer on a unix socket with the fast engine on
the tiny model: a sealed question moves the counters (requests, tokens, key cache, batch, padded
sizes), the `metrics` frame returns them, bad frames are counted by code, and neither the page
nor the JSON log lines carry the question or the answer.

The data key is put in the server's key cache first, as a previous KMS call would have: this
test needs no NSM and no KMS (tests/integration/test_observability.py has both).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from enclave.boot import Identity
from enclave.config import EnclaveConfig
from enclave.engine import load_engine
from enclave.kms import AttestedKms, KeyCache
from enclave.metrics import KINDS, OUTCOMES, PADDED_BUCKETS
from enclave.server import EnclaveServer
from protocol import envelope
from protocol.errors import ErrorCode, error_from_wire
from protocol.framing import recv_json, send_json
from protocol.logs import JsonFormatter
from protocol.messages import Kind, Question, RequestFrame, Status, parse_body_frame
from protocol.prompt import format_prompt
from protocol.transport import Address

KEY = "arn:aws:kms:us-east-1:111122223333:key/metrics"
QUESTION = "What is a vesting schedule for canary-metrics-91c?"


class Served:
    def __init__(self, server: EnclaveServer, path: str, log: io.StringIO) -> None:
        self.server, self.path, self.log = server, path, log
        self.data_key = os.urandom(32)
        self.session = envelope.b64url(os.urandom(envelope.SESSION_BYTES))
        self.edk = os.urandom(48)
        self.keys = envelope.derive_keys(self.data_key, self.session)

    def exchange(self, frame: dict[str, Any]) -> tuple[Status, list[dict[str, Any]]]:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(self.path)
            send_json(conn, frame)
            status = Status.from_json(recv_json(conn, 1 << 20, 30))
            bodies = []
            while status.error is None:
                final, data = parse_body_frame(recv_json(conn, 1 << 20, 60))
                bodies.append(data)
                if final:
                    break
            return status, bodies

    def page(self) -> str:
        status, [data] = self.exchange(RequestFrame(Kind.METRICS, "scrape-1").to_json())
        assert status.status == 200 and data["format"] == "prometheus-text-0.0.4"
        return data["text"]

    def page_once(self, done: Callable[[str], bool]) -> str:
        """The page once `done(page)`: a connection is counted (and logged) after its last
        frame was sent, so the client may ask before the server has counted it."""
        deadline = time.monotonic() + 10
        while not done(page := self.page()):
            assert time.monotonic() < deadline, page
            time.sleep(0.02)
        return page

    def log_lines(self, trace_id: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 10
        while True:
            lines = [json.loads(line) for line in self.log.getvalue().splitlines()]
            assert all(isinstance(line, dict) for line in lines)
            mine = [line for line in lines if line.get("trace_id") == trace_id]
            if any(line["event"] == "request" for line in mine):
                return mine
            assert time.monotonic() < deadline, lines
            time.sleep(0.02)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path) -> Iterator[Served]:
    config = EnclaveConfig.from_json(
        {"region": "us-east-1", "key_ids": [KEY], "model_dir": str(tiny_model_dir)}
    )
    identity = Identity.generate()
    kms = AttestedKms(config, None, identity)
    engine = load_engine(tiny_model_dir, "fast", max_batch=2)
    server = EnclaveServer(config, None, identity, kms, lambda: engine)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(JsonFormatter("enclave"))
    logger = logging.getLogger("enclave")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    path = f"/tmp/em-{os.getpid()}-{time.monotonic_ns() % 10**6}.sock"
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(Address.parse(f"unix://{path}"), ready))
    thread.start()
    try:
        assert ready.wait(10)
        deadline = time.monotonic() + 60
        while server.engine is None:
            assert time.monotonic() < deadline, "the tiny model did not load"
            time.sleep(0.02)
        running = Served(server, path, log)
        # As if KMS had answered for this data key before.
        context = {"app": envelope.APP, "session": running.session}
        kms.cache.put(KeyCache.key(KEY, running.edk, context), running.data_key)
        yield running
    finally:
        server.shutdown()
        thread.join(10)
        engine.close()
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        if os.path.exists(path):
            os.unlink(path)


def ask(served: Served, trace_id: str, max_new_tokens: int = 12) -> list[dict[str, Any]]:
    header = envelope.Header(
        key_id=KEY,
        session=served.session,
        request_id=envelope.b64url(os.urandom(envelope.REQUEST_ID_BYTES)),
        sent_at=int(time.time() * 1000),
        stream=True,
    )
    question = Question(
        format_prompt(QUESTION), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens
    )
    request = envelope.seal_request(served.keys, header, served.edk, question.to_json())
    frame = RequestFrame(Kind.CHAT, trace_id, None, request.to_json()).to_json()
    status, bodies = served.exchange(frame)
    assert status.status == 200, status.error
    return [
        envelope.open_answer(served.keys, request, body, seq)[1] for seq, body in enumerate(bodies)
    ]


def value(page: str, name: str, **labels: str) -> float:
    found = [
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


def test_a_question_moves_every_counter_and_the_metrics_frame_returns_them(served) -> None:
    before = served.page()
    chunks = ask(served, "trace-metrics-1", max_new_tokens=12)
    answer = "".join(c["text"] for c in chunks)
    chat = {"kind": "chat", "outcome": "ok"}
    page = served.page_once(
        lambda page: (
            value(page, "enclave_requests_total", **chat)
            > value(before, "enclave_requests_total", **chat)
        )
    )

    def delta(name: str, **labels: str) -> float:
        return value(page, name, **labels) - value(before, name, **labels)

    assert delta("enclave_requests_total", kind="chat", outcome="ok") == 1
    assert delta("enclave_request_duration_seconds_count", kind="chat") == 1
    assert delta("enclave_generated_tokens_total") == 12 == sum(c["tokens"] for c in chunks)
    assert delta("enclave_key_cache_hits_total") == 1
    assert value(page, "enclave_kms_calls_total") == 0  # the cached key: KMS never asked
    assert value(page, "enclave_key_cache_entries") == 1
    # Sizes are the padded buckets: a short question and 8-token chunks fit the smallest.
    assert delta("enclave_chat_request_padded_bytes_count") == 1
    assert delta("enclave_chat_request_padded_bytes_sum") == PADDED_BUCKETS[0]
    assert delta("enclave_chat_chunk_padded_bytes_count") == len(chunks) == 2
    assert delta("enclave_chat_chunk_padded_bytes_bucket", le="256.0") == len(chunks)
    # Every decode step is in the batch-size histogram; one question alone is batch 1.
    steps = delta("enclave_decode_steps_total")
    assert steps >= 12
    assert delta("enclave_batch_size_count") == steps
    assert delta("enclave_batch_size_bucket", le="1.0") == steps
    assert value(page, "enclave_queue_depth", state="active") == 0
    assert value(page, "enclave_queue_depth", state="waiting") == 0
    assert value(page, "enclave_model_ready") == 1
    # The metrics frames themselves are counted as requests of their kind.
    assert delta("enclave_requests_total", kind="metrics", outcome="ok") >= 1
    # No content: neither the question nor the answer, and only fixed label values.
    assert QUESTION not in page and "canary-metrics" not in page
    assert answer.strip() and answer.strip() not in page
    for family in text_string_to_metric_families(page):
        assert family.name.startswith("enclave_")
        for sample in family.samples:
            assert sample.labels.get("kind", "chat") in KINDS
            assert sample.labels.get("outcome", "ok") in OUTCOMES
            assert sample.labels.keys() <= {"kind", "outcome", "state", "le"}


def test_bad_frames_are_refused_and_counted_by_their_code(served) -> None:
    before = served.page()
    frame = RequestFrame(Kind.METRICS, "scrape-2", body={"x": 1}).to_json()
    status, _ = served.exchange(frame)
    assert error_from_wire({"error": status.error})[0] is ErrorCode.BAD_REQUEST
    status, _ = served.exchange({"kind": "dump-everything", "trace_id": "t", "credentials": None})
    assert error_from_wire({"error": status.error})[0] is ErrorCode.PROTOCOL_ERROR
    unknown = {"kind": "unknown", "outcome": "protocol_error"}
    page = served.page_once(
        lambda page: (
            value(page, "enclave_requests_total", **unknown)
            > value(before, "enclave_requests_total", **unknown)
        )
    )

    def delta(name: str, **labels: str) -> float:
        return value(page, name, **labels) - value(before, name, **labels)

    assert delta("enclave_requests_total", kind="metrics", outcome="bad_request") == 1
    assert delta("enclave_requests_total", kind="unknown", outcome="protocol_error") == 1
    assert "dump-everything" not in page


def test_log_lines_are_json_objects_carrying_the_proxys_trace_id(served) -> None:
    chunks = ask(served, "trace-join-42", max_new_tokens=8)
    answer = "".join(c["text"] for c in chunks).strip()
    mine = served.log_lines("trace-join-42")
    assert {line["event"] for line in mine} >= {"request", "generated"}
    [request] = [line for line in mine if line["event"] == "request"]
    assert request["kind"] == "chat" and request["outcome"] == "ok"
    text = served.log.getvalue()
    assert "canary-metrics" not in text and answer not in text


def test_a_connection_refused_as_busy_is_counted_as_overloaded(tmp_path: Path) -> None:
    config = EnclaveConfig.from_json(
        {"region": "us-east-1", "key_ids": [KEY], "model_dir": str(tmp_path), "max_connections": 1}
    )
    identity = Identity.generate()

    def no_model() -> Any:
        raise RuntimeError("this test needs no model")

    server = EnclaveServer(config, None, identity, AttestedKms(config, None, identity), no_model)
    path = f"/tmp/eb-{os.getpid()}-{time.monotonic_ns() % 10**6}.sock"
    ready = threading.Event()
    thread = threading.Thread(target=server.serve, args=(Address.parse(f"unix://{path}"), ready))
    thread.start()
    overloaded = {"kind": "unknown", "outcome": "overloaded"}
    try:
        assert ready.wait(10)
        with socket.socket(socket.AF_UNIX) as holder:  # takes the one slot, says nothing
            holder.connect(path)
            with socket.socket(socket.AF_UNIX) as second:  # accepted in order: after the holder
                second.connect(path)
                status = Status.from_json(recv_json(second, 1 << 20, 10))
            assert status.status == 503
            assert error_from_wire({"error": status.error})[0] is ErrorCode.OVERLOADED
            deadline = time.monotonic() + 10  # counted just after the refusal is sent
            while value(server.metrics.render(), "enclave_requests_total", **overloaded) != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        server.shutdown()
        thread.join(15)
        if os.path.exists(path):
            os.unlink(path)
