"""protocol/cms.py: real KMS CiphertextForRecipient vectors, and envelopes built in KMS's shape."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from asn1crypto import algos
from asn1crypto import cms as asn1_cms
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import cms
from protocol.cms import CmsError, EnvelopeFields
from protocol.errors import ErrorCode

VECTORS = json.loads(
    (
        Path(__file__).resolve().parents[1] / "testdata" / "kms-ciphertext-for-recipient.json"
    ).read_text()
)["vectors"]
KMS_BER = [bytes.fromhex(vector["cms_ber_hex"]) for vector in VECTORS]
PLAINTEXT = bytes(range(32))  # stands in for a data key; not a secret


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def refused(data: bytes) -> CmsError:
    with pytest.raises(CmsError) as info:
        cms.parse_enveloped_data(data)
    assert info.value.code is ErrorCode.KMS_ERROR
    return info.value


@pytest.mark.parametrize("vector", VECTORS, ids=[vector["name"] for vector in VECTORS])
def test_kms_vectors_parse_to_the_published_fields(vector):
    fields = cms.parse_enveloped_data(bytes.fromhex(vector["cms_ber_hex"]))
    assert fields.encrypted_key.hex() == vector["encrypted_key_hex"]
    assert fields.iv.hex() == vector["iv_hex"]
    assert fields.encrypted_content.hex() == vector["encrypted_content_hex"]
    assert len(fields.subject_key_identifier) == 32


def test_first_vector_has_chunked_content_and_the_second_a_primitive_one():
    # The two shapes the parser must join: [0] constructed (a080 04..) and [0] primitive (80..).
    assert KMS_BER[0][431:435].hex() == "a0800430"
    assert KMS_BER[1][431:433].hex() == "8010"


def test_our_ber_encoding_reproduces_kms_bytes():
    fields = cms.parse_enveloped_data(KMS_BER[0])
    assert cms.encode_enveloped_data(fields, indefinite_length=True) == KMS_BER[0]


def test_der_encoding_is_der_and_parses_to_the_same_fields():
    fields = cms.parse_enveloped_data(KMS_BER[1])
    der = cms.encode_enveloped_data(fields, indefinite_length=False)
    assert der[:2] == b"\x30\x82" and b"\x80\x00\x00" not in der
    assert asn1_cms.ContentInfo.load(der).dump(force=True) == der
    assert cms.parse_enveloped_data(der) == fields


@pytest.mark.parametrize("indefinite_length", [True, False], ids=["ber", "der"])
@pytest.mark.parametrize("size", [0, 15, 16, 32, 2500])
def test_build_open_round_trip(key, indefinite_length, size):
    plaintext = bytes(i % 251 for i in range(size))
    envelope = cms.build_enveloped_data(
        plaintext, key.public_key(), indefinite_length=indefinite_length
    )
    assert (envelope[:2] == b"\x30\x80") is indefinite_length
    fields = cms.parse_enveloped_data(envelope)
    assert len(fields.iv) == 16 and len(fields.encrypted_key) == 256
    assert fields.subject_key_identifier == cms.subject_key_identifier(key.public_key())
    assert cms.open_enveloped_data(envelope, key) == plaintext


def test_each_envelope_has_a_fresh_key_and_iv(key):
    first = cms.parse_enveloped_data(cms.build_enveloped_data(PLAINTEXT, key.public_key()))
    second = cms.parse_enveloped_data(cms.build_enveloped_data(PLAINTEXT, key.public_key()))
    assert first.iv != second.iv and first.encrypted_content != second.encrypted_content


def test_wrong_private_key_fails(key, other_key):
    envelope = cms.build_enveloped_data(PLAINTEXT, key.public_key())
    with pytest.raises(CmsError) as info:
        cms.open_enveloped_data(envelope, other_key)
    assert info.value.__cause__ is None  # nothing chained that could tell which step failed


def test_kms_vector_does_not_open_with_our_key(key):
    with pytest.raises(CmsError):
        cms.open_enveloped_data(KMS_BER[0], key)


def reencoded(envelope: bytes, change: Callable[[EnvelopeFields], EnvelopeFields]) -> bytes:
    fields = cms.parse_enveloped_data(envelope)
    return cms.encode_enveloped_data(change(fields))


def flip(data: bytes, index: int, mask: int = 1) -> bytes:
    changed = bytearray(data)
    changed[index] ^= mask
    return bytes(changed)


def test_tampered_content_fails(key):
    envelope = cms.build_enveloped_data(PLAINTEXT, key.public_key())  # 3 blocks: 2 + padding
    # In CBC, flipping a bit of block 2 flips the same bit of plaintext block 3: the last
    # padding byte 0x10 becomes 0x00, which PKCS#7 refuses, every time.
    bad_padding = reencoded(
        envelope,
        lambda f: EnvelopeFields(
            f.encrypted_key, f.iv, flip(f.encrypted_content, 31, 0x10), f.subject_key_identifier
        ),
    )
    bad_key = reencoded(
        envelope,
        lambda f: EnvelopeFields(
            flip(f.encrypted_key, 100), f.iv, f.encrypted_content, f.subject_key_identifier
        ),
    )
    truncated_content = reencoded(
        envelope,
        lambda f: EnvelopeFields(
            f.encrypted_key, f.iv, f.encrypted_content[:-1], f.subject_key_identifier
        ),
    )
    for tampered in (bad_padding, bad_key, truncated_content):
        with pytest.raises(CmsError):
            cms.open_enveloped_data(tampered, key)


def mutated(envelope: bytes, change: Callable[[asn1_cms.ContentInfo], None]) -> bytes:
    info = asn1_cms.ContentInfo.load(envelope)
    change(info)
    return info.dump(force=True)


def _set_version(info):
    info["content"]["version"] = "v3"


def _set_content_algorithm(info):
    info["content"]["encrypted_content_info"]["content_encryption_algorithm"] = {
        "algorithm": "aes128_cbc",
        "parameters": b"\x01" * 16,
    }


def _set_key_algorithm(info):
    info["content"]["recipient_infos"][0].chosen["key_encryption_algorithm"] = {
        "algorithm": "rsaes_pkcs1v15"
    }


def _set_oaep_mgf1_sha1(info):
    info["content"]["recipient_infos"][0].chosen["key_encryption_algorithm"] = {
        "algorithm": "rsaes_oaep",
        "parameters": algos.RSAESOAEPParams(
            {
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}},
            }
        ),
    }


def _two_recipients(info):
    recipients = info["content"]["recipient_infos"]
    info["content"]["recipient_infos"] = asn1_cms.RecipientInfos([recipients[0], recipients[0]])


def _recipient_version(info):
    info["content"]["recipient_infos"][0].chosen["version"] = "v0"


def _no_content(info):
    info["content"]["encrypted_content_info"]["encrypted_content"] = None


def _content_type(info):
    info["content"]["encrypted_content_info"]["content_type"] = "signed_data"


def _short_iv(info):
    info["content"]["encrypted_content_info"]["content_encryption_algorithm"] = {
        "algorithm": "aes256_cbc",
        "parameters": b"\x01" * 8,
    }


@pytest.mark.parametrize(
    "change",
    [
        _set_version,
        _set_content_algorithm,
        _set_key_algorithm,
        _set_oaep_mgf1_sha1,
        _two_recipients,
        _recipient_version,
        _no_content,
        _content_type,
        _short_iv,
    ],
)
def test_other_shapes_are_refused(key, change):
    envelope = cms.build_enveloped_data(PLAINTEXT, key.public_key(), indefinite_length=False)
    assert cms.parse_enveloped_data(mutated(envelope, lambda info: None)) is not None
    refused(mutated(envelope, change))


def test_other_content_types_are_refused():
    data = asn1_cms.ContentInfo({"content_type": "data", "content": b"hello"}).dump()
    refused(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        b'{"CiphertextForRecipient": "..."}',
        b"\x30\x80",
        b"\x30\x03\x02\x01\x02",
        KMS_BER[0][:-1],
        KMS_BER[0][:200],
        KMS_BER[0] + b"\x00",
        b"\x30" + b"\x80" * 64,
        b"\x30\x84\xff\xff\xff\xff",
        bytes(64 * 1024 + 1),
    ],
    ids=lambda data: f"{len(data)}B",
)
def test_non_cms_input_fails_cleanly(data):
    refused(data)


def test_non_bytes_input_fails_cleanly():
    with pytest.raises(CmsError):
        cms.parse_enveloped_data("not bytes")  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_cms_error(data):
    with pytest.raises(CmsError):
        cms.parse_enveloped_data(data)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(KMS_BER),
    st.lists(st.tuples(st.integers(0, 455), st.integers(1, 255)), min_size=1, max_size=3),
)
def test_mutated_kms_vectors_raise_only_cms_error(vector, mutations):
    data = bytearray(vector)
    for position, mask in mutations:
        data[position] ^= mask
    try:
        fields = cms.parse_enveloped_data(bytes(data))
    except CmsError:
        return  # refusal is fine; any other exception fails the test
    # A mutation the parser accepts (in a key or the content) still yields KMS's shape.
    assert len(fields.iv) == 16 and len(fields.encrypted_content) % 16 == 0
