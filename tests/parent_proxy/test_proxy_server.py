"""The real `parent-proxy` process (gunicorn, gthread, TLS from a test CA) with a stand-in enclave:
bad input never breaks it, answers stream through, slow bodies time out, SIGTERM is graceful."""

import base64
import json
import select
import signal
import socket
import ssl
import threading
import time

import pytest

from protocol.messages import CONTENT_NDJSON

pytestmark = pytest.mark.integration

ANSWER = {"v": 2, "request_id": "r", "seq": 0, "final": True, "nonce": "n", "ciphertext": "c"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("proxy")


@pytest.fixture(scope="module")
def parent_json(module_dir, kit):
    path = module_dir / "parent.json"
    path.write_text(json.dumps({"credentials": kit.parent_credentials}))
    return path


@pytest.fixture(scope="module")
def proxy(module_dir, tls_files, stand_in, parent_json, kit):
    running = kit.start_proxy(
        module_dir,
        tls_files,
        stand_in.address,
        ["--credentials-file", str(parent_json), "--read-timeout", "1.5",
         "--relay-timeout", "3", "--max-body", "262144"],
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture
def enclave(stand_in, kit):
    """The module's stand-in enclave, reset for this test."""
    stand_in.frames.clear()
    stand_in.handler = kit.json_answer(ANSWER)
    return stand_in


def post(proxy, body, headers=JSON):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return proxy.request("POST", "/v1/chat", data, headers)


def code_of(raw):
    return json.loads(raw)["error"]["code"]


# ---- TLS and the good path ---------------------------------------------------------------------


def test_tls_is_verified_against_the_test_ca(proxy):
    status, headers, body = proxy.request("GET", "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    untrusting = ssl.create_default_context()  # system roots only: must refuse our test cert
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusting.wrap_socket(raw, server_hostname="127.0.0.1")


def test_chat_reaches_the_enclave_unchanged_with_parent_credentials(proxy, enclave, kit):
    body = kit.sealed_body()
    status, headers, raw = post(proxy, body)
    assert (status, json.loads(raw)) == (200, ANSWER)
    [frame] = enclave.frames
    assert frame["body"] == body
    assert frame["credentials"] == kit.parent_credentials
    assert frame["trace_id"] == headers["X-Request-Id"]


# ---- bad input ---------------------------------------------------------------------------------


def _mutated(kit, change):
    body = kit.sealed_body()
    change(body)
    return json.dumps(body).encode()


def _deep(kit):
    return b"[" * 50_000 + b"]" * 50_000


BAD_INPUTS = {
    "not-json": (lambda kit: b"hello there", JSON, 400, "bad_request"),
    "empty-body": (lambda kit: b"", JSON, 400, "bad_request"),
    "json-array": (lambda kit: b"[1, 2]", JSON, 400, "bad_request"),
    "deep-nesting": (_deep, JSON, 400, "bad_request"),
    "wrong-content-type": (
        lambda kit: json.dumps(kit.sealed_body()).encode(),
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    "wrong-type": (
        lambda kit: _mutated(kit, lambda b: b.update(stream="yes")),
        JSON,
        400,
        "bad_request",
    ),
    "wrong-type-sent-at": (
        lambda kit: _mutated(kit, lambda b: b.update(sent_at="now")),
        JSON,
        400,
        "bad_request",
    ),
    "unknown-field": (
        lambda kit: _mutated(kit, lambda b: b.update(extra=1)),
        JSON,
        400,
        "bad_request",
    ),
    "user-credentials": (
        lambda kit: _mutated(kit, lambda b: b.update(access_key_id="AKIAUSER")),
        JSON,
        400,
        "bad_request",
    ),
    "missing-field": (
        lambda kit: _mutated(kit, lambda b: b.pop("nonce")),
        JSON,
        400,
        "bad_request",
    ),
    "missing-key-field": (
        lambda kit: _mutated(kit, lambda b: b["key"].pop("edk")),
        JSON,
        400,
        "bad_request",
    ),
    "invalid-base64": (
        lambda kit: _mutated(kit, lambda b: b.update(ciphertext="not*base64!")),
        JSON,
        400,
        "bad_request",
    ),
    "wrong-nonce-size": (
        lambda kit: _mutated(kit, lambda b: b.update(nonce=base64.b64encode(b"8bytes!!").decode())),
        JSON,
        400,
        "bad_request",
    ),
    "short-ciphertext": (
        lambda kit: _mutated(kit, lambda b: b.update(ciphertext=base64.b64encode(b"x").decode())),
        JSON,
        400,
        "bad_request",
    ),
    "wrong-version": (
        lambda kit: _mutated(kit, lambda b: b.update(v=1)),
        JSON,
        400,
        "unsupported_version",
    ),
    "huge-body": (lambda kit: b"{" + b" " * 300_000 + b"}", JSON, 413, "payload_too_large"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_chat_input_gets_its_code_and_the_proxy_keeps_serving(proxy, enclave, kit, case):
    make_body, headers, status, code = BAD_INPUTS[case]
    got_status, _headers, raw = post(proxy, make_body(kit), headers)
    assert (got_status, code_of(raw)) == (status, code)
    assert enclave.frames == []
    good_status, _headers, _raw = post(proxy, kit.sealed_body())
    assert good_status == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/chat", 405, "method_not_allowed"),
        ("PUT", "/v1/chat", 405, "method_not_allowed"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
        ("POST", "/v1/attestation", 405, "method_not_allowed"),
        ("GET", "/", 405, "method_not_allowed"),  # POST / is protocol v1
        ("GET", "/v1/metrics", 404, "not_found"),  # /metrics exists (parent_proxy/metrics.py)
        ("GET", "/v1/attestation?nonce=xyz", 400, "bad_request"),
        ("GET", "/v1/attestation?nonce=" + "00" * 65, 400, "bad_request"),
        ("GET", "/v1/attestation?nonce=abc", 400, "bad_request"),
    ],
)
def test_bad_method_path_or_nonce(proxy, enclave, kit, method, path, status, code):
    got_status, _headers, raw = proxy.request(method, path)
    assert (got_status, code_of(raw)) == (status, code)
    assert enclave.frames == []
    assert post(proxy, kit.sealed_body())[0] == 200


def test_chunked_body_over_the_limit_is_refused_while_reading(proxy, enclave):
    conn = proxy.connection()
    pieces = (b" " * 65536 for _ in range(6))  # no Content-Length to check up front
    conn.request("POST", "/v1/chat", body=pieces, headers=JSON, encode_chunked=True)
    response = conn.getresponse()
    assert (response.status, code_of(response.read())) == (413, "payload_too_large")
    conn.close()
    assert enclave.frames == []


def test_attestation_through_gunicorn(proxy, enclave, kit):
    enclave.handler = kit.json_answer({"document": "ZG9j"})
    status, _headers, raw = proxy.request("GET", "/v1/attestation?nonce=00ff")
    assert (status, json.loads(raw)) == (200, {"document": "ZG9j"})
    assert enclave.frames[0]["body"] == {"nonce": "00ff"}


# ---- streaming ---------------------------------------------------------------------------------


def test_stream_passes_through_before_the_enclave_finishes(proxy, enclave, kit):
    chunks = [dict(ANSWER, seq=i, final=i == 2) for i in range(3)]
    gate = threading.Event()
    handler = kit.stream_answer(chunks, gate=gate)
    enclave.handler = handler
    conn = proxy.connection()
    conn.request("POST", "/v1/chat", body=json.dumps(kit.sealed_body(stream=True)), headers=JSON)
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == CONTENT_NDJSON
    # The enclave holds the rest back until this first line has reached the client.
    assert json.loads(response.readline()) == chunks[0]
    gate.set()
    rest = [json.loads(line) for line in response.read().splitlines()]
    conn.close()
    assert rest == chunks[1:]
    assert handler.gate_opened is True


def test_client_gone_mid_stream_closes_the_enclave_connection(proxy, enclave, kit):
    endless = kit.EndlessStream(interval=0.05)
    enclave.handler = endless
    conn = proxy.connection()
    conn.request("POST", "/v1/chat", body=json.dumps(kit.sealed_body(stream=True)), headers=JSON)
    response = conn.getresponse()
    assert json.loads(response.readline()) == {"seq": 0}
    conn.sock.close()  # the client goes away without reading the rest
    response.close()
    assert endless.peer_closed.wait(10), "the proxy kept the enclave generating"
    assert endless.sent < endless.limit


# ---- slow clients ------------------------------------------------------------------------------


def _slow_post(proxy, body, interval, max_seconds=10.0):
    """POST over raw TLS sending the body a byte every `interval` seconds; returns the status
    line and body of the proxy's answer and how long it took."""
    context = proxy.tls.client_context()
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    head = (
        "POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    started = time.monotonic()
    sock.sendall(head.encode())
    answer = b""
    for byte in body:
        if interval is None:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        if select.select([sock], [], [], interval)[0]:
            break
        if time.monotonic() - started > max_seconds:
            break
    sock.settimeout(max_seconds)
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (OSError, ssl.SSLError):
        pass
    sock.close()
    elapsed = time.monotonic() - started
    head_text, _, payload = answer.partition(b"\r\n\r\n")
    return head_text.split(b"\r\n")[0], payload, elapsed


def test_body_sent_one_byte_a_second_is_a_request_timeout(proxy, enclave, kit):
    body = json.dumps(kit.sealed_body()).encode()
    status_line, payload, elapsed = _slow_post(proxy, body, interval=1.0)
    assert status_line.startswith(b"HTTP/1.1 408")
    assert code_of(payload) == "request_timeout"
    assert elapsed < 5  # --read-timeout 1.5: the whole body, not each byte
    assert enclave.frames == []
    assert post(proxy, kit.sealed_body())[0] == 200


def test_body_that_stops_arriving_is_a_request_timeout(proxy, enclave, kit):
    body = json.dumps(kit.sealed_body()).encode()
    status_line, payload, elapsed = _slow_post(proxy, body, interval=None)
    assert status_line.startswith(b"HTTP/1.1 408")
    assert code_of(payload) == "request_timeout"
    assert elapsed < 5


def test_client_stalled_mid_headers_is_disconnected(proxy, kit):
    context = proxy.tls.client_context()
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
    sock.sendall(b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
    started = time.monotonic()
    sock.settimeout(10)
    try:
        closed = sock.recv(1024) == b""
    except (ConnectionError, ssl.SSLError):
        closed = True
    sock.close()
    assert closed
    assert time.monotonic() - started < 5  # --read-timeout 1.5 per read, not for ever
    assert post(proxy, kit.sealed_body())[0] == 200


# ---- logs --------------------------------------------------------------------------------------


def test_process_log_has_one_line_per_request_and_no_secrets(proxy, enclave, kit):
    body = kit.sealed_body()
    _status, headers, _raw = post(proxy, body, {**JSON, "Authorization": "Bearer user-secret-1"})
    trace_id = headers["X-Request-Id"]
    deadline = time.monotonic() + 5
    while trace_id not in proxy.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(line) for line in proxy.log_text().splitlines() if line.startswith("{")]
    [line] = [entry for entry in lines if entry.get("trace_id") == trace_id]
    assert line["event"] == "request" and line["status"] == 200 and line["path"] == "/v1/chat"
    text = proxy.log_text()
    for secret in (
        body["ciphertext"][:40],
        body["request_id"],
        kit.parent_credentials["secret_access_key"],
        "user-secret-1",
        "00ff",  # the attestation nonce of an earlier test: no query strings
    ):
        assert secret not in text


# ---- enclave down, shutdown --------------------------------------------------------------------


def test_enclave_down(module_dir, tls_files, parent_json, kit, short_dir):
    down = kit.start_proxy(
        module_dir,
        tls_files,
        f"unix://{short_dir}/nothing-here.sock",
        ["--credentials-file", str(parent_json)],
    )
    try:
        assert down.request("GET", "/healthz")[0] == 200
        status, _headers, raw = down.request("GET", "/readyz")
        assert (status, code_of(raw)) == (503, "enclave_unavailable")
        status, _headers, raw = post(down, kit.sealed_body())
        assert (status, code_of(raw)) == (503, "enclave_unavailable")
    finally:
        assert down.stop() == 0


def test_sigterm_lets_a_stream_in_flight_finish(module_dir, tls_files, parent_json, kit, enclave):
    chunks = [dict(ANSWER, seq=i, final=i == 4) for i in range(5)]
    enclave.handler = kit.stream_answer(chunks, delay=0.3)
    running = kit.start_proxy(
        module_dir, tls_files, enclave.address, ["--credentials-file", str(parent_json)]
    )
    try:
        conn = running.connection()
        conn.request("POST", "/v1/chat", body=json.dumps(kit.sealed_body(True)), headers=JSON)
        response = conn.getresponse()
        assert json.loads(response.readline()) == chunks[0]
        running.process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in response.read().splitlines()]
        conn.close()
        assert rest == chunks[1:]
        assert running.process.wait(15) == 0
    finally:
        running.stop()
    # No new connections once stopped.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=2).close()
