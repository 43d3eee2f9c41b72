"""The real `parent-proxy` (gunicorn, TLS) limits attestation requests per client IP: 429 with
Retry-After and `rate_limited`, the enclave never asked; other clients and chat unaffected."""

import http.client
import json
import time

import pytest

from parent_proxy.config import ProxyConfig
from protocol.errors import ErrorCode

pytestmark = pytest.mark.integration

BURST = 3
RATE = 0.5  # tokens a second: one every 2 s
ANSWER = {"v": 2, "request_id": "r", "seq": 0, "final": True, "nonce": "n", "ciphertext": "c"}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, tls_files, stand_in, kit):
    running = kit.start_local_proxy(
        tmp_path_factory.mktemp("proxy-rl"),
        tls_files,
        stand_in.address,
        ["--attestation-burst", str(BURST), "--attestation-rate", str(RATE)],
    )
    yield running
    running.stop()


@pytest.fixture
def enclave(stand_in, kit):
    stand_in.frames.clear()
    stand_in.handler = kit.json_answer({"document": "ZG9j"})
    return stand_in


def _get(proxy, path, source="127.0.0.1"):
    conn = http.client.HTTPSConnection(
        "127.0.0.1",
        proxy.port,
        context=proxy.tls.client_context(),
        timeout=10,
        source_address=(source, 0),
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# Each test is its own client (a loopback address of its own), so none waits for another's
# bucket to refill.


def test_attestation_beyond_the_burst_is_429_until_a_token_returns(proxy, enclave, kit):
    me = "127.0.0.11"
    for _ in range(BURST):
        assert _get(proxy, "/v1/attestation?nonce=01", me)[0] == 200
    status, headers, raw = _get(proxy, "/v1/attestation?nonce=01", me)
    assert status == 429
    assert json.loads(raw)["error"]["code"] == ErrorCode.RATE_LIMITED.code
    assert 1 <= int(headers["Retry-After"]) <= 1 / RATE  # whole seconds, rounded up
    assert len(enclave.frames) == BURST  # the refused one never reached the enclave
    # Chat is not an attestation: still served for the same client.
    body = json.dumps(kit.sealed_body()).encode()
    enclave.handler = kit.json_answer(ANSWER)
    conn = http.client.HTTPSConnection(
        "127.0.0.1", proxy.port, context=proxy.tls.client_context(), source_address=(me, 0)
    )
    conn.request("POST", "/v1/chat", body, {"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    conn.close()
    enclave.handler = kit.json_answer({"document": "ZG9j"})
    time.sleep(int(headers["Retry-After"]))
    assert _get(proxy, "/v1/attestation", me)[0] == 200  # a token came back
    assert _get(proxy, "/v1/attestation", me)[0] == 429  # and only one


def test_clients_are_limited_separately(proxy, enclave):
    for _ in range(BURST):
        _get(proxy, "/v1/attestation", "127.0.0.12")
    assert _get(proxy, "/v1/attestation", "127.0.0.12")[0] == 429
    # Another address on the loopback network is another client with its own bucket.
    assert _get(proxy, "/v1/attestation", "127.0.0.13")[0] == 200
    assert enclave.frames[-1]["kind"] == "attestation"


def test_a_bad_nonce_is_refused_without_spending_a_token(proxy, enclave):
    for _ in range(BURST + 2):
        assert _get(proxy, "/v1/attestation?nonce=zz", "127.0.0.14")[0] == 400
    for _ in range(BURST):
        assert _get(proxy, "/v1/attestation", "127.0.0.14")[0] == 200


def test_the_enclaves_own_rate_limit_is_relayed_with_retry_after(proxy, enclave, kit):
    enclave.handler = kit.error_answer(ErrorCode.RATE_LIMITED)
    body = json.dumps(kit.sealed_body()).encode()
    status, headers, raw = proxy.request(
        "POST", "/v1/chat", body, {"Content-Type": "application/json"}
    )
    assert (status, json.loads(raw)["error"]["code"]) == (429, "rate_limited")
    assert headers["Retry-After"] == "1"
    assert proxy.request("GET", "/healthz")[0] == 200


def test_settings_come_from_flags_or_their_environment_twins():
    required = ["--certfile", "c.pem", "--keyfile", "k.pem"]
    defaults = ProxyConfig.from_args(required, {})
    assert (defaults.attestation_rate, defaults.attestation_burst) == (1.0, 10)
    env = {"PARENT_PROXY_ATTESTATION_RATE": "0.5", "PARENT_PROXY_ATTESTATION_BURST": "4"}
    config = ProxyConfig.from_args(required, env)
    assert (config.attestation_rate, config.attestation_burst) == (0.5, 4)
    assert (
        ProxyConfig.from_args([*required, "--attestation-burst", "7"], env).attestation_burst == 7
    )
    for bad in (
        ["--attestation-rate", "0"],
        ["--attestation-burst", "0"],
        ["--attestation-rate", "nan"],
    ):
        with pytest.raises(SystemExit):
            ProxyConfig.from_args([*required, *bad], {})
