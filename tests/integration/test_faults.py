"""Faults through the whole local stack: each part failing as it would in production.

The enclave server killed mid-answer, the KMS emulator down, an answer slower than the proxy's
relay timeout, and a client that hangs up mid-stream. Real processes throughout (emulator/stack.py);
the requests are sealed here with protocol/ as the chatbot seals them, so that each test controls
its data key (and so whether the enclave must call KMS) and reads the proxy's own answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatbot.client import ChatError
from emulator import stack
from protocol import envelope
from protocol.errors import error_from_wire
from protocol.messages import Kind, Question, RequestFrame
from protocol.transport import Address

pytestmark = pytest.mark.integration
QUESTION = "How do I enroll in the retirement plan?"
LONG = 512  # tokens: the longest answer the wire allows, forced with min_new_tokens
WAIT_S = 120.0  # bound on every wait below (the machine may be shared and slow)


@dataclass
class Local:
    paths: stack.StatePaths
    proxy_url: str
    kms_endpoint: str
    key_arn: str
    user_kms: Any
    # The shared helpers (tests/integration/conftest.py): StackLogs, Sealing, EnclaveSocket.
    logs: Any
    sealing: Any
    enclave_socket: Any

    @property
    def ca(self) -> str:
        return str(self.paths.cert)

    def log_line(self, component: str, event: str, trace_id: str) -> dict[str, Any]:
        """The one line of `event` for `trace_id` (a request's line is written as it closes)."""
        found: list[dict[str, Any]] = []

        def logged() -> bool:
            found[:] = [r for r in self.logs.events(component, event) if r["trace_id"] == trace_id]
            return bool(found)

        wait_for(f"{component}'s {event} line", logged)
        assert len(found) == 1, found
        return found[0]


@dataclass
class Reply:
    status: int
    trace_id: str
    body: Any

    @property
    def code(self) -> str:
        return self.body["error"]["code"]


@pytest.fixture(scope="module")
def local(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    stack_logs: Any,
    sealing: Any,
    enclave_socket: Any,
) -> Iterator[Local]:
    paths = stack.StatePaths(tmp_path_factory.mktemp("faults") / "state")
    try:
        endpoints = stack.bring_up(paths, model_dir=tiny_model_dir)
        principals = stack.ensure_principals(paths)
        yield Local(
            paths,
            endpoints.proxy_url,
            endpoints.kms_endpoint,
            endpoints.key_arn,
            stack.kms_client(endpoints.kms_endpoint, principals.user),
            stack_logs(paths),
            sealing,
            enclave_socket,
        )
    finally:
        stack.stop_all(paths)


def new_data_key(local: Local) -> Any:
    """One conversation's data key, as the client holds it."""
    return local.sealing.data_key(local.user_kms, local.key_arn)


def seal(
    local: Local, key: Any, prompt: str, *, stream: bool = False, tokens: int = 8
) -> envelope.SealedRequest:
    question = Question(prompt, max_new_tokens=tokens, min_new_tokens=tokens)
    return local.sealing.seal(key, local.key_arn, question, stream=stream)


@contextlib.contextmanager
def post(url: str, ca: str, sealed: envelope.SealedRequest) -> Iterator[http.client.HTTPResponse]:
    """POST a sealed request to the proxy at `url`; the response is left for the caller to read."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=WAIT_S)
    try:
        body = json.dumps(sealed.to_json()).encode()
        connection.request("POST", "/v1/chat", body, {"Content-Type": "application/json"})
        yield connection.getresponse()
    finally:
        connection.close()


def ask(url: str, ca: str, sealed: envelope.SealedRequest) -> Reply:
    with post(url, ca, sealed) as response:
        return Reply(response.status, response.headers["X-Request-Id"], json.loads(response.read()))


def opened_text(canary: Any, key: Any, sealed: envelope.SealedRequest, body: Any) -> str:
    final, content = envelope.open_answer(key.keys, sealed, body, 0)
    assert final and "error" not in content, content
    canary.answer(content["text"])
    return content["text"]


def enclave_metric(local: Local, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample of the enclave's own metrics, asked over its socket as the proxy asks."""
    address = Address.parse(f"unix://{local.paths.enclave_socket}")
    frame = RequestFrame(Kind.METRICS, "faults-probe").to_json()
    status, bodies = local.enclave_socket.exchange(address, frame, timeout=30)
    assert status.status == 200
    data = bodies[-1]
    for family in text_string_to_metric_families(data["text"]):
        for sample in family.samples:
            if sample.name == name and (labels or {}).items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"the enclave reports no {name}")


def wait_for(what: str, done: Any, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


# ---- the enclave dies ---------------------------------------------------------------------------


def test_enclave_killed_mid_answer_is_enclave_unavailable_and_recovers(
    local: Local, canary: Any, processes: Any
) -> None:
    key = new_data_key(local)
    warm = seal(local, key, f"{QUESTION} {canary.new()}")
    reply = ask(local.proxy_url, local.ca, warm)
    assert reply.status == 200
    opened_text(canary, key, warm, reply.body)

    long = seal(local, key, f"{QUESTION} {canary.new()}", tokens=LONG)
    replies: list[Reply] = []
    asking = threading.Thread(target=lambda: replies.append(ask(local.proxy_url, local.ca, long)))
    asking.start()
    try:
        active = {"state": "active"}
        wait_for("answer in progress", lambda: enclave_metric(local, "enclave_queue_depth", active))
        processes.kill(stack.component_pid(local.paths, "enclave"))
        asking.join(WAIT_S)
        # While it is down: the same answer, at once.
        down = ask(local.proxy_url, local.ca, seal(local, key, f"{QUESTION} {canary.new()}"))
    finally:
        asking.join(WAIT_S)
        if stack.component_pid(local.paths, "enclave") is None:  # the next tests need it
            stack.restart_enclave(local.paths, timeout=WAIT_S)
    [killed] = replies
    assert (killed.status, killed.code) == (503, "enclave_unavailable")
    logged = local.log_line("proxy", "request", killed.trace_id)
    assert (logged["status"], logged["code"]) == (503, "enclave_unavailable")
    assert (down.status, down.code) == (503, "enclave_unavailable")

    # Back: the proxy relays to the new enclave process as soon as it is ready.
    again = seal(local, key, f"{QUESTION} {canary.new()}")
    recovered = ask(local.proxy_url, local.ca, again)
    assert recovered.status == 200, recovered.body
    assert opened_text(canary, key, again, recovered.body).strip()


# ---- KMS is down --------------------------------------------------------------------------------


def test_kms_down_is_kms_unavailable_naming_the_vsock_proxy_and_recovers(
    local: Local, canary: Any, processes: Any
) -> None:
    key = new_data_key(local)  # made while KMS is up; the enclave has never seen it
    port = int(local.kms_endpoint.rsplit(":", 1)[1])
    processes.kill(stack.component_pid(local.paths, "kms"), signal.SIGTERM)
    try:
        failed = ask(local.proxy_url, local.ca, seal(local, key, f"{QUESTION} {canary.new()}"))
        assert (failed.status, failed.code) == (502, "kms_unavailable")
        assert "vsock-proxy" in failed.body["error"]["message"]
        # What the chatbot prints for it: its own words, which name the vsock-proxy too.
        code, _message = error_from_wire(failed.body)
        assert "vsock-proxy" in ChatError(code).diagnostics()
        # The enclave's log says which endpoint it could not reach (an address, no content).
        unreachable = local.log_line("enclave", "kms_unreachable", failed.trace_id)
        assert unreachable["endpoint"] == local.kms_endpoint
    finally:
        stack.start_kms(local.paths, port=port)

    again = seal(local, key, f"{QUESTION} {canary.new()}")
    recovered = ask(local.proxy_url, local.ca, again)
    assert recovered.status == 200, recovered.body
    assert opened_text(canary, key, again, recovered.body).strip()


# ---- an answer slower than the proxy's timeout --------------------------------------------------


@pytest.fixture
def impatient_proxy(local: Local, cli: Any, processes: Any, canary: Any) -> Iterator[str]:
    """A second proxy on the same enclave whose relay timeout is a quarter of what a long answer
    takes here (timed through the first proxy, so the margin holds on a fast machine and a busy
    one alike): a configuration an operator can set, not a mock."""
    key = new_data_key(local)
    ask(local.proxy_url, local.ca, seal(local, key, f"{QUESTION} {canary.new()}"))  # warm
    started = time.monotonic()
    timed = ask(
        local.proxy_url, local.ca, seal(local, key, f"{QUESTION} {canary.new()}", tokens=LONG)
    )
    assert timed.status == 200
    relay_timeout = max(0.1, (time.monotonic() - started) / 4)
    port = stack.free_port()
    argv = [
        cli.path("parent-proxy"),
        "--bind",
        f"127.0.0.1:{port}",
        "--enclave",
        f"unix://{local.paths.enclave_socket}",
        "--certfile",
        str(local.paths.cert),
        "--keyfile",
        str(local.paths.tls_key),
        "--credentials-file",
        str(local.paths.parent_credentials),
        "--relay-timeout",
        f"{relay_timeout:.2f}",
        "--workers",
        "1",
    ]
    proc = stack.spawn(local.paths, "proxy-impatient", argv)
    url = f"https://127.0.0.1:{port}"
    try:
        stack.wait_ready(local.paths, url, [proc], timeout=WAIT_S)
        yield url
    finally:
        processes.kill(proc.pid, signal.SIGTERM)


def test_an_answer_slower_than_the_relay_timeout_is_enclave_timeout(
    local: Local, impatient_proxy: str, canary: Any
) -> None:
    key = new_data_key(local)
    warm = seal(local, key, f"{QUESTION} {canary.new()}")
    # Through the patient proxy first: the data key is then cached, so the slow part of the next
    # request is the generation alone, not KMS.
    assert ask(local.proxy_url, local.ca, warm).status == 200

    started = time.monotonic()
    slow = ask(
        impatient_proxy, local.ca, seal(local, key, f"{QUESTION} {canary.new()}", tokens=LONG)
    )
    assert (slow.status, slow.code) == (504, "enclave_timeout")
    assert time.monotonic() - started < 30
    # The enclave had started answering (its status went out) and stopped when the proxy left.
    assert local.log_line("enclave", "request", slow.trace_id)["outcome"] == "cancelled"


# ---- the client hangs up mid-stream -------------------------------------------------------------


def test_a_client_gone_mid_stream_stops_the_generation_for_it(local: Local, canary: Any) -> None:
    key = new_data_key(local)
    warm = seal(local, key, f"{QUESTION} {canary.new()}")
    assert ask(local.proxy_url, local.ca, warm).status == 200
    steps_before = enclave_metric(local, "enclave_decode_steps_total")

    sealed = seal(local, key, f"{QUESTION} {canary.new()}", stream=True, tokens=LONG)
    with post(local.proxy_url, local.ca, sealed) as response:
        assert response.status == 200
        trace_id = response.headers["X-Request-Id"]
        first = json.loads(response.readline())
        final, content = envelope.open_answer(key.keys, sealed, first, 0)
        assert not final and content["tokens"] >= 1
    # The connection is closed: the proxy notices at its next write and hangs up on the enclave.

    assert local.log_line("enclave", "request", trace_id)["outcome"] == "cancelled"
    # The enclave's decode steps stop growing (nothing generates for the gone client), well short
    # of the 512 tokens it was asked for. (The batch may take a last step after the cancel.)
    samples = [enclave_metric(local, "enclave_decode_steps_total")]

    def steady() -> bool:
        time.sleep(1.0)
        samples.append(enclave_metric(local, "enclave_decode_steps_total"))
        return samples[-1] == samples[-2]

    wait_for("the enclave's decode steps to stop", steady)
    time.sleep(1.0)
    assert enclave_metric(local, "enclave_decode_steps_total") == samples[-1]
    assert samples[-1] - steps_before < LONG / 2
    gone = local.log_line("enclave", "client_gone", trace_id)
    assert gone["seq"] < LONG // 8 / 2  # chunks of 8 tokens sent before it noticed
    assert local.log_line("proxy", "request", trace_id)["status"] == 200

    # The proxy's metrics page, kept for the canary sweep: it must name no content either.
    context = ssl.create_default_context(cafile=local.ca)
    host, port = local.proxy_url.removeprefix("https://").rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=WAIT_S)
    try:
        connection.request("GET", "/metrics")
        page = connection.getresponse()
        assert page.status == 200
        canary.capture("faults-metrics.txt", page.read())
    finally:
        connection.close()
