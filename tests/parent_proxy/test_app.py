"""The Flask app against a stand-in enclave (Flask's test client; gunicorn is test_gunicorn.py):
what reaches the enclave, what the client gets back, and what the log says."""

import io
import json
import logging
import re
import time

import pytest

from parent_proxy.app import create_app
from parent_proxy.config import ProxyConfig
from protocol.errors import ErrorCode
from protocol.framing import send_json
from protocol.logs import JsonFormatter
from protocol.messages import CONTENT_JSON, CONTENT_NDJSON, body_frame, status_frame
from protocol.transport import Address

ANSWER = {"v": 2, "request_id": "r", "seq": 0, "final": True, "nonce": "n", "ciphertext": "c"}


@pytest.fixture
def make_client(enclave, credentials_file):
    def make(**overrides):
        settings = {
            "enclave": enclave.address,
            "credentials_file": credentials_file,
            "relay_timeout": 1.0,
            "ready_timeout": 0.5,
            **overrides,
        }
        return create_app(ProxyConfig(**settings)).test_client()

    return make


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def log_lines():
    """The proxy's log lines, formatted as in production."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("proxy"))
    logger = logging.getLogger("parent_proxy")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logger.removeHandler(handler)


def post_chat(client, body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    kwargs.setdefault("content_type", "application/json")
    return client.post("/v1/chat", data=data, **kwargs)


def error_code(response):
    return response.get_json()["error"]["code"]


# ---- chat --------------------------------------------------------------------------------------


def test_chat_relays_the_body_unchanged_with_the_parent_credentials(client, enclave, kit):
    enclave.handler = kit.json_answer(ANSWER)
    body = kit.sealed_body()
    response = post_chat(client, body)
    assert response.status_code == 200
    assert response.mimetype == CONTENT_JSON
    assert response.get_json() == ANSWER
    [frame] = enclave.frames
    assert frame["kind"] == "chat"
    assert frame["body"] == body
    assert frame["credentials"] == kit.parent_credentials
    assert frame["trace_id"] == response.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{16}", frame["trace_id"])


def test_user_credentials_in_the_body_are_refused_not_relayed(client, enclave, kit):
    body = kit.sealed_body()
    body.update(access_key_id="AKIAUSER", secret_access_key="user-secret", token="t")
    response = post_chat(client, body)
    assert response.status_code == 400
    assert error_code(response) == "bad_request"
    assert enclave.frames == []


def test_streamed_answer_passes_each_frame_as_one_line(client, enclave, kit):
    chunks = [dict(ANSWER, seq=i, final=i == 2) for i in range(3)]
    enclave.handler = kit.stream_answer(chunks)
    response = post_chat(client, kit.sealed_body(stream=True))
    assert response.status_code == 200
    assert response.mimetype == CONTENT_NDJSON
    lines = response.get_data().split(b"\n")
    assert lines[-1] == b""
    assert [json.loads(line) for line in lines[:-1]] == chunks


def test_an_overloaded_enclave_is_503_with_retry_after(client, enclave, kit):
    enclave.handler = kit.error_answer(ErrorCode.OVERLOADED)
    response = post_chat(client, kit.sealed_body())
    assert (response.status_code, error_code(response)) == (503, "overloaded")
    assert int(response.headers["Retry-After"]) >= 1
    enclave.handler = kit.error_answer(ErrorCode.UNKNOWN_KEY)
    assert "Retry-After" not in post_chat(client, kit.sealed_body()).headers


def test_enclave_error_is_answered_with_its_status_and_code(client, enclave, kit):
    enclave.handler = kit.error_answer(ErrorCode.UNKNOWN_KEY, "key not in the configuration")
    response = post_chat(client, kit.sealed_body())
    assert response.status_code == 403
    assert response.get_json() == {
        "error": {"code": "unknown_key", "message": "key not in the configuration"}
    }


def test_enclave_error_with_an_unknown_code_is_a_protocol_error(client, enclave, kit):
    def odd(conn, frame):
        send_json(conn, {"status": 418, "content_type": CONTENT_JSON, "error": {"code": "teapot"}})

    enclave.handler = odd
    response = post_chat(client, kit.sealed_body())
    assert response.status_code == 502
    assert error_code(response) == "protocol_error"


@pytest.mark.parametrize(
    ("scenario", "status", "code"),
    [
        ("garbage", 502, "protocol_error"),
        ("closed", 502, "protocol_error"),
        ("hang", 504, "enclave_timeout"),
        ("json_not_final", 502, "protocol_error"),
    ],
)
def test_enclave_failures_have_their_own_status(client, enclave, kit, scenario, status, code):
    enclave.handler = {
        "garbage": kit.raw_answer(b"\x00\x00\x00\x03abc"),
        "closed": kit.raw_answer(b""),
        "hang": kit.hang(enclave),
        "json_not_final": kit.hang(enclave, [status_frame(200), body_frame({}, final=False)]),
    }[scenario]
    started = time.monotonic()
    response = post_chat(client, kit.sealed_body())
    assert (response.status_code, error_code(response)) == (status, code)
    assert time.monotonic() - started < 3  # relay_timeout is 1 s here


def test_enclave_down_is_503(make_client, kit, short_dir):
    client = make_client(enclave=Address.parse(f"unix://{short_dir}/down.sock"))
    response = post_chat(client, kit.sealed_body())
    assert (response.status_code, error_code(response)) == (503, "enclave_unavailable")


def test_stream_cut_by_the_enclave_ends_without_a_final_line(client, enclave, kit, log_lines):
    def cut(conn, frame):
        send_json(conn, status_frame(200, CONTENT_NDJSON))
        send_json(conn, body_frame(dict(ANSWER, final=False), final=False))

    enclave.handler = cut
    response = post_chat(client, kit.sealed_body(stream=True))
    lines = response.get_data().splitlines()
    response.close()
    assert response.status_code == 200
    assert [json.loads(line)["final"] for line in lines] == [False]
    [line] = [entry for entry in log_lines() if entry["event"] == "request"]
    assert line["code"] == "protocol_error"


def test_missing_parent_credentials_fail_cleanly_and_relay_nothing(make_client, enclave, kit):
    client = make_client(credentials_file=enclave.address.path + ".absent.json")
    response = post_chat(client, kit.sealed_body())
    assert (response.status_code, error_code(response)) == (500, "internal_error")
    # Our own text only: the detail (a path, an errno) is for the log.
    assert response.get_json()["error"]["message"] == ErrorCode.INTERNAL_ERROR.client_text
    assert enclave.frames == []


# ---- bad input (the full table runs against gunicorn in test_gunicorn.py) -----------------------


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "bad_request"),
        (b'{"v": 2, "\xff": 1}', "application/json", 400, "bad_request"),
        (b"x" * 300_000, "application/json", 413, "payload_too_large"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
        (b"{}", None, 415, "unsupported_media_type"),
    ],
    ids=["deep-nesting", "not-utf8", "too-large", "text-plain", "no-content-type"],
)
def test_bad_bodies_get_their_code(client, enclave, body, content_type, status, code):
    response = client.post("/v1/chat", data=body, content_type=content_type)
    assert (response.status_code, error_code(response)) == (status, code)
    assert enclave.frames == []


def test_body_that_trickles_in_is_a_request_timeout(make_client, enclave, kit):
    class Trickle(io.BytesIO):
        """One byte per read, a tenth of a second apart."""

        def read(self, size=-1):
            time.sleep(0.1)
            return super().read(1)

        def readinto(self, buffer):
            data = self.read()
            buffer[: len(data)] = data
            return len(data)

    data = json.dumps(kit.sealed_body()).encode()
    client = make_client(read_timeout=0.5)
    started = time.monotonic()
    response = client.post(
        "/v1/chat",
        input_stream=Trickle(data),
        content_length=len(data),
        content_type="application/json",
    )
    assert (response.status_code, error_code(response)) == (408, "request_timeout")
    assert time.monotonic() - started < 2
    assert enclave.frames == []


def test_wrong_method_lists_the_allowed_ones(client):
    response = client.get("/v1/chat")
    assert (response.status_code, error_code(response)) == (405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


# ---- attestation, health, readiness ------------------------------------------------------------


def test_attestation_relays_the_nonce_without_credentials(client, enclave, kit):
    enclave.handler = kit.json_answer({"document": "ZG9j"})
    response = client.get("/v1/attestation?nonce=" + "AB" * 64)
    assert response.status_code == 200
    assert response.get_json() == {"document": "ZG9j"}
    [frame] = enclave.frames
    assert frame["kind"] == "attestation"
    assert frame["body"] == {"nonce": "ab" * 64}
    assert frame["credentials"] is None


def test_attestation_without_nonce_sends_null(client, enclave, kit):
    enclave.handler = kit.json_answer({"document": "ZG9j"})
    assert client.get("/v1/attestation").status_code == 200
    assert enclave.frames[0]["body"] == {"nonce": None}


@pytest.mark.parametrize(
    "query",
    ["nonce=", "nonce=abc", "nonce=zz", "nonce=" + "ab" * 65, "nonce=ab%0a", "nonce=ab&nonce=cd",
     "nonce=ab&other=1", "nonce=a b"],
)  # fmt: skip
def test_bad_attestation_nonce_is_bad_request(client, enclave, query):
    response = client.get("/v1/attestation?" + query)
    assert (response.status_code, error_code(response)) == (400, "bad_request")
    assert enclave.frames == []


def test_healthz_answers_without_the_enclave(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}
    assert re.fullmatch(r"[0-9a-f]{16}", response.headers["X-Request-Id"])


def test_readyz_reports_the_enclave_model(client, enclave, kit):
    enclave.handler = kit.json_answer({"ready": True, "model": "bloom-560m"})
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {"ready": True, "model": "bloom-560m"}
    assert enclave.frames[0]["kind"] == "ready"


def test_readyz_while_the_model_loads_is_not_ready(client, enclave, kit):
    enclave.handler = kit.json_answer({"ready": False, "model": "loading"})
    response = client.get("/readyz")
    assert (response.status_code, error_code(response)) == (503, "not_ready")


@pytest.mark.parametrize("scenario", ["down", "hang", "garbage"])
def test_readyz_without_a_working_enclave_is_unavailable(make_client, enclave, kit, scenario):
    if scenario == "down":
        client = make_client(enclave=Address.parse(f"unix://{enclave.address.path}.gone"))
    else:
        client = make_client()
        enclave.handler = kit.hang(enclave) if scenario == "hang" else kit.raw_answer(b"\x00")
    started = time.monotonic()
    response = client.get("/readyz")
    assert (response.status_code, error_code(response)) == (503, "enclave_unavailable")
    assert time.monotonic() - started < 2  # ready_timeout is 0.5 s here


def test_unknown_path_is_json_404(client):
    response = client.get("/v1/nothing-here")
    assert (response.status_code, error_code(response)) == (404, "not_found")


# ---- logs --------------------------------------------------------------------------------------


def test_one_log_line_per_request_with_ids_sizes_and_no_content(client, enclave, kit, log_lines):
    enclave.handler = kit.json_answer(ANSWER)
    body = kit.sealed_body()
    raw = json.dumps(body).encode()
    response = post_chat(client, raw, headers={"Authorization": "Bearer user-token-xyz"})
    response.close()
    client.get("/v1/attestation?nonce=abcdef").close()
    lines = [entry for entry in log_lines() if entry["event"] == "request"]
    assert len(lines) == 2
    chat, attest = lines
    assert chat["trace_id"] == response.headers["X-Request-Id"]
    assert (chat["method"], chat["path"], chat["status"]) == ("POST", "/v1/chat", 200)
    assert chat["request_bytes"] == len(raw)
    assert chat["response_bytes"] == len(response.get_data())
    assert chat["ms"] >= 0 and "code" not in chat
    assert (attest["path"], attest["status"]) == ("/v1/attestation", 200)
    text = json.dumps(log_lines())
    for secret in (
        body["ciphertext"][:40],
        body["request_id"],
        kit.parent_credentials["secret_access_key"],
        kit.parent_credentials["access_key_id"],
        "user-token-xyz",
        "abcdef",
    ):
        assert secret not in text


def test_error_log_line_carries_the_code(client, log_lines):
    client.post("/v1/chat", data=b"not json", content_type="application/json").close()
    [line] = [entry for entry in log_lines() if entry["event"] == "request"]
    assert (line["status"], line["code"]) == (400, "bad_request")
