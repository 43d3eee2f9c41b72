"""Malformed requests against the real `parent-proxy` (gunicorn, gthread, TLS), table-driven.

Each case gets a 4xx with its exact error code as JSON, never a 500; nothing reaches the enclave;
the proxy stays ready after each one, and at the end its worker has neither crashed nor logged
an internal error. One server for the module, with a short body deadline for the slow cases.
"""

import base64
import json
import select
import socket
import ssl
import time
from typing import Any

import pytest

from protocol.errors import ErrorCode
from protocol.messages import CONTENT_JSON

pytestmark = pytest.mark.integration

READ_TIMEOUT_S = 1.0
MAX_BODY = 262144
JSON = {"Content-Type": "application/json"}
ANSWER = {"v": 2, "request_id": "r", "seq": 0, "final": True, "nonce": "n", "ciphertext": "c"}


# ---- the server --------------------------------------------------------------------------------


def _answer_by_kind(kit):
    """The stand-in enclave: ready, attestation and chat each get their normal answer."""
    answers = {
        "ready": kit.json_answer({"ready": True, "model": "tiny"}),
        "attestation": kit.json_answer({"document": "ZG9j"}),
        "chat": kit.json_answer(ANSWER),
    }

    def handle(conn, frame):
        answers[frame["kind"]](conn, frame)

    return handle


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, tls_files, stand_in, kit):
    stand_in.handler = _answer_by_kind(kit)
    running = kit.start_local_proxy(
        tmp_path_factory.mktemp("proxy-bad-input"),
        tls_files,
        stand_in.address,
        ["--read-timeout", str(READ_TIMEOUT_S),
         "--relay-timeout", "3", "--max-body", str(MAX_BODY),
         "--attestation-burst", "1000"],  # attestation cases must not meet the rate limit
    )  # fmt: skip
    yield running
    running.stop()


@pytest.fixture
def enclave(stand_in):
    stand_in.frames.clear()
    return stand_in


# ---- building bad bodies -----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def mutated(change):
    """A valid sealed body with `change(body)` applied, as JSON bytes."""

    def make(kit) -> bytes:
        body = kit.sealed_body()
        change(body)
        return json.dumps(body).encode()

    return make


def raw(data: bytes):
    return lambda kit: data


def _set(path: str, value: Any):
    """Set a field by dotted path (`key.context.app`)."""

    def change(body: dict) -> None:
        *parents, last = path.split(".")
        for name in parents:
            body = body[name]
        body[last] = value

    return change


def _drop(path: str):
    def change(body: dict) -> None:
        *parents, last = path.split(".")
        for name in parents:
            body = body[name]
        del body[last]

    return change


def _good_json(kit) -> bytes:
    return json.dumps(kit.sealed_body()).encode()


BAD = ErrorCode.BAD_REQUEST.code
VERSION = ErrorCode.UNSUPPORTED_VERSION.code
MEDIA = ErrorCode.UNSUPPORTED_MEDIA_TYPE.code
TOO_LARGE = ErrorCode.PAYLOAD_TOO_LARGE.code
NOT_FOUND = ErrorCode.NOT_FOUND.code
METHOD = ErrorCode.METHOD_NOT_ALLOWED.code


def chat(make_body, status: int, code: str, headers: dict[str, str] = JSON):
    """A case of `POST /v1/chat`."""
    return ("POST", "/v1/chat", headers, make_body, status, code)


# name: (method, path, headers, body maker or None, status, code)
CASES: dict[str, tuple[str, str, dict[str, str], Any, int, str]] = {
    # -- not JSON, or JSON of the wrong kind
    "not-json": chat(raw(b"hello there"), 400, BAD),
    "empty-body": chat(raw(b""), 400, BAD),
    "whitespace-body": chat(raw(b"  \r\n "), 400, BAD),
    "json-array": chat(raw(b"[1, 2]"), 400, BAD),
    "json-string": chat(raw(b'"v2"'), 400, BAD),
    "json-number": chat(raw(b"2"), 400, BAD),
    "json-null": chat(raw(b"null"), 400, BAD),
    "empty-object": chat(raw(b"{}"), 400, BAD),
    "deep-nesting": chat(raw(b"[" * 100_000 + b"]" * 100_000), 400, BAD),
    "invalid-utf8": chat(raw(b'{"v": "\xff\xfe"}'), 400, BAD),
    "truncated-json": chat(lambda kit: _good_json(kit)[:-7], 400, BAD),
    "trailing-garbage": chat(lambda kit: _good_json(kit) + b"}", 400, BAD),
    "nan-literal": chat(mutated(_set("sent_at", float("nan"))), 400, BAD),
    # -- content type
    "text-plain": chat(_good_json, 415, MEDIA, {"Content-Type": "text/plain"}),
    "no-content-type": chat(_good_json, 415, MEDIA, {}),
    "form-encoded": chat(
        _good_json, 415, MEDIA, {"Content-Type": "application/x-www-form-urlencoded"}
    ),
    "multipart": chat(_good_json, 415, MEDIA, {"Content-Type": "multipart/form-data; boundary=x"}),
    "json-lookalike": chat(_good_json, 415, MEDIA, {"Content-Type": "application/jsonx"}),
    "ndjson": chat(_good_json, 415, MEDIA, {"Content-Type": "application/x-ndjson"}),
    # -- wrong types
    "stream-string": chat(mutated(_set("stream", "yes")), 400, BAD),
    "stream-int": chat(mutated(_set("stream", 1)), 400, BAD),
    "sent-at-string": chat(mutated(_set("sent_at", "now")), 400, BAD),
    "sent-at-float": chat(mutated(_set("sent_at", 1.5)), 400, BAD),
    "sent-at-negative": chat(mutated(_set("sent_at", -1)), 400, BAD),
    "sent-at-bool": chat(mutated(_set("sent_at", True)), 400, BAD),
    "sent-at-huge": chat(mutated(_set("sent_at", 2**64)), 400, BAD),
    "key-string": chat(mutated(_set("key", "k")), 400, BAD),
    "key-null": chat(mutated(_set("key", None)), 400, BAD),
    "context-list": chat(mutated(_set("key.context", ["a"])), 400, BAD),
    "context-int-value": chat(mutated(_set("key.context.app", 7)), 400, BAD),
    "key-id-int": chat(mutated(_set("key.key_id", 12)), 400, BAD),
    "key-id-empty": chat(mutated(_set("key.key_id", "")), 400, BAD),
    "request-id-int": chat(mutated(_set("request_id", 5)), 400, BAD),
    "nonce-list": chat(mutated(_set("nonce", [1, 2])), 400, BAD),
    "ciphertext-null": chat(mutated(_set("ciphertext", None)), 400, BAD),
    "edk-object": chat(mutated(_set("key.edk", {})), 400, BAD),
    # -- unknown and missing fields
    "unknown-field": chat(mutated(_set("extra", 1)), 400, BAD),
    "unknown-key-field": chat(mutated(_set("key.region", "x")), 400, BAD),
    "user-credentials": chat(mutated(_set("secret_access_key", "s")), 400, BAD),
    "missing-v": chat(mutated(_drop("v")), 400, BAD),
    "missing-nonce": chat(mutated(_drop("nonce")), 400, BAD),
    "missing-ciphertext": chat(mutated(_drop("ciphertext")), 400, BAD),
    "missing-request-id": chat(mutated(_drop("request_id")), 400, BAD),
    "missing-sent-at": chat(mutated(_drop("sent_at")), 400, BAD),
    "missing-stream": chat(mutated(_drop("stream")), 400, BAD),
    "missing-key": chat(mutated(_drop("key")), 400, BAD),
    "missing-edk": chat(mutated(_drop("key.edk")), 400, BAD),
    "missing-context": chat(mutated(_drop("key.context")), 400, BAD),
    # -- invalid base64 and base64url
    "ciphertext-not-base64": chat(mutated(_set("ciphertext", "not*base64!")), 400, BAD),
    "ciphertext-url-alphabet": chat(mutated(_set("ciphertext", "-_" * 200)), 400, BAD),
    "edk-unpadded": chat(mutated(_set("key.edk", "ZWRrMQ")), 400, BAD),
    "nonce-with-newline": chat(mutated(_set("nonce", "AQIDBAUG\nBwgJCgsM")), 400, BAD),
    "request-id-padded": chat(mutated(_set("request_id", "qqqqqqqqqqqqqqqqqqqqqg==")), 400, BAD),
    "request-id-std-alphabet": chat(mutated(_set("request_id", "+" * 21 + "g")), 400, BAD),
    "request-id-noncanonical": chat(
        mutated(_set("request_id", "qqqqqqqqqqqqqqqqqqqqqh")), 400, BAD
    ),
    # -- wrong sizes
    "nonce-8-bytes": chat(mutated(_set("nonce", _b64(b"8bytes!!"))), 400, BAD),
    "nonce-16-bytes": chat(mutated(_set("nonce", _b64(bytes(16)))), 400, BAD),
    "nonce-empty": chat(mutated(_set("nonce", "")), 400, BAD),
    "request-id-15-bytes": chat(
        mutated(_set("request_id", base64.urlsafe_b64encode(bytes(15)).decode())), 400, BAD
    ),
    "ciphertext-1-byte": chat(mutated(_set("ciphertext", _b64(b"x"))), 400, BAD),
    "ciphertext-below-bucket": chat(mutated(_set("ciphertext", _b64(bytes(256 + 15)))), 400, BAD),
    "ciphertext-above-bucket": chat(
        mutated(_set("ciphertext", _b64(bytes(131072 + 17)))), 400, BAD
    ),
    "edk-empty": chat(mutated(_set("key.edk", "")), 400, BAD),
    "edk-too-large": chat(mutated(_set("key.edk", _b64(bytes(6145)))), 400, BAD),
    "key-id-too-long": chat(mutated(_set("key.key_id", "k" * 2049)), 400, BAD),
    "context-too-many": chat(
        mutated(_set("key.context", {str(i): "x" for i in range(9)})), 400, BAD
    ),
    "context-value-too-long": chat(mutated(_set("key.context.app", "a" * 257)), 400, BAD),
    # -- protocol version
    "version-1": chat(mutated(_set("v", 1)), 400, VERSION),
    "version-3": chat(mutated(_set("v", 3)), 400, VERSION),
    "version-string": chat(mutated(_set("v", "2")), 400, VERSION),
    "version-null": chat(mutated(_set("v", None)), 400, VERSION),
    "version-float": chat(mutated(_set("v", 2.5)), 400, VERSION),
    # -- huge bodies (Content-Length alone, and a body of whitespace padding)
    "huge-body": chat(raw(b"{" + b" " * (MAX_BODY + 10) + b"}"), 413, TOO_LARGE),
    "huge-valid-json": chat(mutated(_set("ciphertext", "A" * (MAX_BODY + 4))), 413, TOO_LARGE),
    # -- paths, methods and the attestation query
    "get-chat": ("GET", "/v1/chat", {}, None, 405, METHOD),
    "put-chat": ("PUT", "/v1/chat", JSON, _good_json, 405, METHOD),
    "delete-chat": ("DELETE", "/v1/chat", {}, None, 405, METHOD),
    "patch-attestation": ("PATCH", "/v1/attestation", {}, None, 405, METHOD),
    "post-attestation": ("POST", "/v1/attestation", JSON, raw(b"{}"), 405, METHOD),
    "post-healthz": ("POST", "/healthz", JSON, raw(b"{}"), 405, METHOD),
    "delete-readyz": ("DELETE", "/readyz", {}, None, 405, METHOD),
    "unknown-path": ("GET", "/nope", {}, None, 404, NOT_FOUND),
    "v2-chat-path": ("POST", "/v2/chat", JSON, _good_json, 404, NOT_FOUND),
    "trailing-slash": ("POST", "/v1/chat/", JSON, _good_json, 404, NOT_FOUND),
    "dot-dot-path": ("GET", "/v1/../etc/passwd", {}, None, 404, NOT_FOUND),
    "nonce-not-hex": ("GET", "/v1/attestation?nonce=xyz", {}, None, 400, BAD),
    "nonce-odd-length": ("GET", "/v1/attestation?nonce=abc", {}, None, 400, BAD),
    "nonce-empty-value": ("GET", "/v1/attestation?nonce=", {}, None, 400, BAD),
    "nonce-65-bytes": ("GET", "/v1/attestation?nonce=" + "00" * 65, {}, None, 400, BAD),
    "nonce-twice": ("GET", "/v1/attestation?nonce=00&nonce=01", {}, None, 400, BAD),
    "unknown-query": ("GET", "/v1/attestation?public_key=00", {}, None, 400, BAD),
}


def _is_json_error(raw_body: bytes, code: str) -> bool:
    obj = json.loads(raw_body)
    return set(obj) == {"error"} and obj["error"]["code"] == code and obj["error"]["message"]


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request_gets_its_4xx_and_code(proxy, enclave, kit, case):
    method, path, headers, make_body, status, code = CASES[case]
    body = make_body(kit) if make_body is not None else None
    got_status, got_headers, raw_body = proxy.request(method, path, body, headers)
    assert got_status == status, raw_body[:200]
    assert 400 <= got_status < 500
    assert got_headers["Content-Type"] == CONTENT_JSON
    assert _is_json_error(raw_body, code)
    assert enclave.frames == []  # refused at the edge: the enclave never saw it
    assert proxy.request("GET", "/readyz")[0] == 200


# ---- bodies that arrive badly ------------------------------------------------------------------


def _tls_socket(proxy) -> ssl.SSLSocket:
    plain = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return proxy.tls.client_context().wrap_socket(plain, server_hostname="127.0.0.1")


def _read_answer(sock: ssl.SSLSocket, timeout: float) -> tuple[int, bytes]:
    sock.settimeout(timeout)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except (OSError, ssl.SSLError):
        pass
    sock.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


def _post_slowly(proxy, body: bytes, interval: float | None) -> tuple[int, bytes, float]:
    """Headers at once, then one byte every `interval` seconds (or, with None, nothing)."""
    sock = _tls_socket(proxy)
    started = time.monotonic()
    sock.sendall(
        b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    for byte in body if interval is not None else b"":
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        if select.select([sock], [], [], interval)[0] or time.monotonic() - started > 10:
            break  # the proxy answered (or gave up)
    status, payload = _read_answer(sock, 10)
    return status, payload, time.monotonic() - started


def test_body_sent_one_byte_a_second_is_408(proxy, enclave, kit):
    status, payload, elapsed = _post_slowly(proxy, _good_json(kit), interval=1.0)
    assert (status, json.loads(payload)["error"]["code"]) == (408, "request_timeout")
    assert READ_TIMEOUT_S <= elapsed < READ_TIMEOUT_S + 4  # the whole body, not each byte
    assert enclave.frames == []
    assert proxy.request("GET", "/readyz")[0] == 200


def test_body_shorter_than_its_content_length_is_408(proxy, enclave, kit):
    status, payload, _elapsed = _post_slowly(proxy, _good_json(kit), interval=None)
    assert (status, json.loads(payload)["error"]["code"]) == (408, "request_timeout")
    assert enclave.frames == []


def test_chunked_body_over_the_limit_is_413(proxy, enclave):
    conn = proxy.connection()
    pieces = (b" " * 65536 for _ in range(MAX_BODY // 65536 + 2))
    conn.request("POST", "/v1/chat", body=pieces, headers=JSON, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413
    assert _is_json_error(response.read(), "payload_too_large")
    conn.close()
    assert enclave.frames == []


def test_malformed_chunked_encoding_is_400(proxy, enclave):
    sock = _tls_socket(proxy)
    sock.sendall(
        b"POST /v1/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    )
    status, payload = _read_answer(sock, 10)
    assert 400 <= status < 500 and status != 408
    assert enclave.frames == []


# ---- afterwards --------------------------------------------------------------------------------


def test_the_proxy_is_ready_and_unharmed_afterwards(proxy, enclave, kit):
    assert proxy.request("GET", "/readyz")[0] == 200
    status, _headers, raw_body = proxy.request("POST", "/v1/chat", _good_json(kit), JSON)
    assert (status, json.loads(raw_body)) == (200, ANSWER)
    assert proxy.process.poll() is None
    log = proxy.log_text()
    assert '"internal_error"' not in log
    assert '"status":500' not in log
    # One worker booted at start; a crash would have made the arbiter boot another.
    assert log.count("Booting worker") == 1


def test_the_table_is_large_enough():
    assert len(CASES) + 4 >= 40
    assert {case[4] for case in CASES.values()} == {400, 404, 405, 413, 415}
