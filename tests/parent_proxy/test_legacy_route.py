"""`POST /`, protocol v1: off unless configured; when on, the sample's credentials stop here."""

import io
import json
import logging

import pytest

from parent_proxy.app import create_app
from parent_proxy.config import ProxyConfig
from protocol.logs import JsonFormatter

SAMPLE_BODY = {
    "access_key_id": "ASIAV1SAMPLEKEY00001",
    "secret_access_key": "v1-sample-secret-never-forwarded",
    "token": "v1-sample-token-never-forwarded",
    "region": "us-east-1",
    "ciphertext": "AQIDBAUGBwg=",
}


@pytest.fixture
def make_client(enclave, credentials_file):
    def make(**overrides):
        settings = {"enclave": enclave.address, "credentials_file": credentials_file, **overrides}
        return create_app(ProxyConfig(**settings)).test_client()

    return make


def post(client, body):
    return client.post("/", data=json.dumps(body), content_type="application/json")


def test_v1_is_refused_unless_enabled(make_client, enclave):
    response = post(make_client(), SAMPLE_BODY)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "legacy_disabled"
    assert enclave.frames == []


def test_v1_relays_only_the_ciphertext_with_the_parent_credentials(make_client, enclave, kit):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("proxy"))
    logger = logging.getLogger("parent_proxy")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        enclave.handler = kit.json_answer({"EncryptedData": "ZW5jcnlwdGVk"})
        response = post(make_client(compat_v1=True), SAMPLE_BODY)
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 200
    assert response.get_json() == {"EncryptedData": "ZW5jcnlwdGVk"}
    [frame] = enclave.frames
    assert frame["kind"] == "legacy"
    assert frame["body"] == {"ciphertext": SAMPLE_BODY["ciphertext"]}
    assert frame["credentials"] == kit.parent_credentials
    seen = json.dumps(frame) + stream.getvalue()
    for name in ("access_key_id", "secret_access_key", "token"):
        assert SAMPLE_BODY[name] not in seen


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"token": None}, 400, "bad_request"),
        ({"extra": "x"}, 400, "bad_request"),
        ({"ciphertext": ""}, 400, "bad_request"),
        ({"ciphertext": "A" * 8200}, 413, "legacy_too_large"),
    ],
)
def test_v1_bodies_of_the_wrong_shape_never_reach_the_enclave(
    make_client, enclave, change, status, code
):
    body = {**SAMPLE_BODY, **change}
    body = {k: v for k, v in body.items() if not (k == "token" and v is None)}
    response = post(make_client(compat_v1=True), body)
    assert (response.status_code, response.get_json()["error"]["code"]) == (status, code)
    assert enclave.frames == []
