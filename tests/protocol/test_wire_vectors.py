"""docs/wire.md's vectors, read from the document itself so that doc and code cannot drift."""

import base64
import json
import re
from pathlib import Path

import cbor2
import pytest

from protocol import envelope
from protocol.framing import encode_frame

WIRE_MD = Path(__file__).resolve().parents[2] / "docs" / "wire.md"


@pytest.fixture(scope="module")
def v() -> dict:
    match = re.search(r"```json vectors\n(.*?)\n```", WIRE_MD.read_text(), re.S)
    assert match, "docs/wire.md lost its vectors block"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def keys(v):
    return envelope.derive_keys(bytes.fromhex(v["data_key_hex"]), v["session"])


@pytest.fixture(scope="module")
def header(v):
    return envelope.Header(v["key_id"], v["session"], v["request_id"], v["sent_at"], v["stream"])


def test_hkdf_gives_the_documented_keys(v, keys):
    assert keys.request.hex() == v["request_key_hex"]
    assert keys.response.hex() == v["response_key_hex"]


def test_canonical_json_and_aads(v, header):
    assert envelope.canonical_json(v["question"]).decode() == v["question_canonical"]
    assert header.aad("request").decode() == v["request_aad"]
    assert header.aad("response", 0, True, v["request_sha256"]).decode() == v["response_aad"]


def test_request_seals_to_the_documented_bytes(v, keys, header):
    nonce = base64.b64decode(v["request_nonce_b64"])
    sealed = envelope.seal_request(
        keys, header, base64.b64decode(v["edk_b64"]), v["question"], nonce=nonce
    )
    assert envelope.b64(sealed.ciphertext) == v["request_ciphertext_b64"]
    assert sealed.request_sha256 == v["request_sha256"]
    assert envelope.open_request(keys, envelope.parse_request(sealed.to_json())) == v["question"]


def test_answer_seals_and_opens_to_the_documented_bytes(v, keys, header):
    request = envelope.SealedRequest(
        header,
        base64.b64decode(v["edk_b64"]),
        base64.b64decode(v["request_nonce_b64"]),
        base64.b64decode(v["request_ciphertext_b64"]),
    )
    nonce = base64.b64decode(v["answer_nonce_b64"])
    answer = envelope.seal_answer(keys, request, 0, True, v["answer_content"], nonce=nonce)
    assert answer["ciphertext"] == v["answer_ciphertext_b64"]
    assert envelope.open_answer(keys, request, answer, 0) == (True, v["answer_content"])


def test_padding_is_bucketed(v):
    padded = envelope.pad(v["question_canonical"].encode())
    assert len(padded) == 256
    assert padded[:4] == len(v["question_canonical"]).to_bytes(4, "big")
    assert envelope.unpad(padded).decode() == v["question_canonical"]


def test_frame_and_nsm_bytes(v):
    assert encode_frame(b"{}").hex() == v["frame_hex_of_empty_object"]
    assert cbor2.dumps("GetRandom").hex() == v["nsm_get_random_request_hex"]
    from protocol import nsm

    assert nsm.encode_request(nsm.GetRandomRequest()).hex() == v["nsm_get_random_request_hex"]
    request = nsm.AttestationRequest(public_key=b"\x01\x02\x03")
    assert nsm.encode_request(request).hex() == v["nsm_attestation_request_hex"]
