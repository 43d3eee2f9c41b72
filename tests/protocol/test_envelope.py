"""The v2 envelope: every tampering with a request or an answer is refused with its code."""

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from protocol import envelope
from protocol.errors import ErrorCode, NitroError

KEY_ID = "arn:aws:kms:us-east-1:111122223333:key/test"


def _conversation():
    session = envelope.b64url(os.urandom(16))
    keys = envelope.derive_keys(os.urandom(32), session)
    return session, keys


def _request(keys, session, stream=False, question=None):
    header = envelope.Header(KEY_ID, session, envelope.b64url(os.urandom(16)), 1, stream)
    return envelope.seal_request(keys, header, b"edk", question or {"prompt": "canary"})


def test_request_round_trips_through_json():
    session, keys = _conversation()
    sealed = _request(keys, session)
    parsed = envelope.parse_request(sealed.to_json())
    assert parsed == sealed
    assert envelope.open_request(keys, parsed) == {"prompt": "canary"}


@pytest.mark.parametrize("plaintext", [b"[" * 5000 + b"]" * 5000, b"[1]", b"not json"])
def test_an_authentic_question_that_is_not_a_json_object_is_bad_request(plaintext):
    session, keys = _conversation()
    header = envelope.Header(KEY_ID, session, envelope.b64url(os.urandom(16)), 1, False)
    nonce = os.urandom(envelope.NONCE_SIZE)
    ciphertext = AESGCM(keys.request).encrypt(nonce, envelope.pad(plaintext), header.aad("request"))
    with pytest.raises(NitroError) as refused:
        envelope.open_request(keys, envelope.SealedRequest(header, b"edk", nonce, ciphertext))
    assert refused.value.code is ErrorCode.BAD_REQUEST


def test_directions_use_different_keys():
    _, keys = _conversation()
    assert keys.request != keys.response


@pytest.mark.parametrize(
    "field, change",
    [
        ("request_id", lambda b: envelope.b64url(os.urandom(16))),
        ("sent_at", lambda b: b + 1),
        ("stream", lambda b: not b),
        ("nonce", lambda b: envelope.b64(os.urandom(12))),
    ],
)
def test_changed_header_field_fails_the_tag(field, change):
    session, keys = _conversation()
    body = _request(keys, session).to_json()
    body[field] = change(body[field])
    with pytest.raises(NitroError) as err:
        envelope.open_request(keys, envelope.parse_request(body))
    assert err.value.code is ErrorCode.DECRYPTION_FAILED


def test_flipped_ciphertext_bit_and_other_key_fail():
    session, keys = _conversation()
    sealed = _request(keys, session)
    for index in (0, 100, len(sealed.ciphertext) - 1):
        flipped = bytearray(sealed.ciphertext)
        flipped[index] ^= 1
        tampered = envelope.SealedRequest(sealed.header, sealed.edk, sealed.nonce, bytes(flipped))
        with pytest.raises(NitroError) as err:
            envelope.open_request(keys, tampered)
        assert err.value.code is ErrorCode.DECRYPTION_FAILED
    _, other_keys = _conversation()
    with pytest.raises(NitroError):
        envelope.open_request(other_keys, sealed)


def test_key_id_and_session_are_bound():
    session, keys = _conversation()
    body = _request(keys, session).to_json()
    body["key"]["key_id"] = KEY_ID + "-other"
    with pytest.raises(NitroError) as err:
        envelope.open_request(keys, envelope.parse_request(body))
    assert err.value.code is ErrorCode.DECRYPTION_FAILED


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda b: b.pop("nonce"), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(extra=1), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(v=1), ErrorCode.UNSUPPORTED_VERSION),
        (lambda b: b.update(nonce="AAAA"), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(nonce="not base64!"), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(ciphertext=envelope.b64(b"x" * 10)), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(sent_at="now"), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(sent_at=True), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(stream="yes"), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(request_id="short"), ErrorCode.BAD_REQUEST),
        (lambda b: b["key"].update(key_id=""), ErrorCode.BAD_REQUEST),
        (lambda b: b["key"].update(edk=""), ErrorCode.BAD_REQUEST),
        (lambda b: b["key"].update(context=[]), ErrorCode.BAD_REQUEST),
        (lambda b: b["key"].pop("context"), ErrorCode.BAD_REQUEST),
        (lambda b: b.update(key="k"), ErrorCode.BAD_REQUEST),
    ],
)
def test_malformed_bodies_are_refused_by_shape(mutate, code):
    session, keys = _conversation()
    body = _request(keys, session).to_json()
    mutate(body)
    with pytest.raises(NitroError) as err:
        envelope.parse_request(body)
    assert err.value.code is code


def test_non_object_body_is_refused():
    for body in (None, [], "x", 3):
        with pytest.raises(NitroError) as err:
            envelope.parse_request(body)
        assert err.value.code is ErrorCode.BAD_REQUEST


def _answer_setup(stream=True):
    session, keys = _conversation()
    request = _request(keys, session, stream=stream)
    chunks = [
        envelope.seal_answer(keys, request, i, i == 2, {"text": f"part {i}", "tokens": 8})
        for i in range(3)
    ]
    return keys, request, chunks


def test_stream_opens_in_order():
    keys, request, chunks = _answer_setup()
    opened = [envelope.open_answer(keys, request, c, i) for i, c in enumerate(chunks)]
    assert [final for final, _ in opened] == [False, False, True]
    assert [content["text"] for _, content in opened] == ["part 0", "part 1", "part 2"]


def _expect_invalid(keys, request, answer, seq):
    with pytest.raises(NitroError) as err:
        envelope.open_answer(keys, request, answer, seq)
    assert err.value.code is ErrorCode.ANSWER_INVALID


def test_reordered_replayed_or_refinalised_chunks_fail():
    keys, request, chunks = _answer_setup()
    _expect_invalid(keys, request, chunks[1], 0)  # reordered / dropped
    _expect_invalid(keys, request, chunks[0], 1)  # replayed
    forged = dict(chunks[1], final=True)  # truncation: claim an early end
    _expect_invalid(keys, request, forged, 1)
    renumbered = dict(chunks[1], seq=0)
    _expect_invalid(keys, request, renumbered, 0)


def test_answer_moved_to_another_question_fails():
    keys, request, chunks = _answer_setup()
    session = request.header.session
    other = envelope.seal_request(
        keys,
        envelope.Header(KEY_ID, session, request.header.request_id, 1, True),
        b"edk",
        {"prompt": "another"},
    )
    # Same request id, other ciphertext: the request hash in the AAD differs.
    _expect_invalid(keys, other, chunks[0], 0)


def test_answer_with_flipped_bits_or_fields_fails():
    keys, request, chunks = _answer_setup()
    data = bytearray(envelope.unb64(chunks[0]["ciphertext"], "c"))
    data[5] ^= 0x80
    _expect_invalid(keys, request, dict(chunks[0], ciphertext=envelope.b64(bytes(data))), 0)
    _expect_invalid(keys, request, dict(chunks[0], request_id="x"), 0)
    _expect_invalid(keys, request, dict(chunks[0], extra=1), 0)
    _expect_invalid(keys, request, "not an object", 0)


def test_padding_buckets_hide_lengths():
    assert len(envelope.pad(b"a")) == len(envelope.pad(b"a" * 200)) == 256
    assert len(envelope.pad(b"a" * 300)) == 512
    with pytest.raises(NitroError) as err:
        envelope.pad(b"a" * envelope.MAX_BUCKET)
    assert err.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_bad_padding_is_refused():
    padded = bytearray(envelope.pad(b"abc"))
    padded[-1] = 1
    with pytest.raises(NitroError):
        envelope.unpad(bytes(padded))
    with pytest.raises(NitroError):
        envelope.unpad(b"\xff\xff\xff\xff")


@given(st.binary(max_size=600))
def test_unpad_arbitrary_bytes_gives_only_nitro_errors(data):
    try:
        envelope.unpad(data)
    except NitroError:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=30),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=8)
        ),
        max_leaves=20,
    )
)
def test_parse_request_arbitrary_json_gives_only_nitro_errors(body):
    try:
        envelope.parse_request(body)
    except NitroError:
        pass
