"""The CMS EnvelopedData that KMS returns as `CiphertextForRecipient`: parse, open and build it.

KMS's shape only (RFC 5652): one KeyTransRecipientInfo with RSAES-OAEP-SHA256 key transport and
AES-256-CBC content, in BER with indefinite lengths. Anything else is refused with CmsError.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import NoReturn

from asn1crypto import algos, cms, core
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.errors import ErrorCode, NitroError

MAX_ENVELOPE_SIZE = 64 * 1024
MAX_PLAINTEXT_SIZE = 32 * 1024
MAX_ENCRYPTED_KEY_SIZE = 1024  # an RSA-8192 block; KMS uses the enclave's RSA-2048 key
MAX_KEY_IDENTIFIER_SIZE = 64
CONTENT_KEY_SIZE = 32
IV_SIZE = 16
# CER's chunk size for constructed strings; KMS sends short contents as a single chunk.
_CHUNK = 1000
_EOC = b"\x00\x00"
_OAEP = asym_padding.OAEP(
    mgf=asym_padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
)


class CmsError(NitroError):
    """An envelope that is malformed, not in KMS's shape, or cannot be opened with our key."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.KMS_ERROR, detail)


@dataclass(frozen=True)
class EnvelopeFields:
    """What a KMS envelope carries: the wrapped content key, the IV and the encrypted content."""

    encrypted_key: bytes
    iv: bytes
    encrypted_content: bytes
    subject_key_identifier: bytes | None  # set in every envelope that parses (KMS's rid)


def _fail(detail: str) -> NoReturn:
    raise CmsError(detail)


def _is_absent(value: object) -> bool:
    return isinstance(value, core.Void)


def _oaep_params_ok(params: object) -> bool:
    """RSAES-OAEP with SHA-256, MGF1-SHA-256 and the empty label, as KMS sends it."""
    if not isinstance(params, algos.RSAESOAEPParams):
        return False
    native = params.native
    hash_alg = native["hash_algorithm"]
    mgf = native["mask_gen_algorithm"]
    return (
        hash_alg["algorithm"] == "sha256"
        and hash_alg["parameters"] is None  # absent or NULL
        and mgf["algorithm"] == "mgf1"
        and mgf["parameters"]["algorithm"] == "sha256"
        and mgf["parameters"]["parameters"] is None
        and native["p_source_algorithm"]["algorithm"] == "p_specified"
        and native["p_source_algorithm"]["parameters"] == b""
    )


def _parse(data: bytes) -> EnvelopeFields:
    info = cms.ContentInfo.load(data, strict=True)
    if info["content_type"].native != "enveloped_data":
        _fail("not a CMS EnvelopedData")
    enveloped = info["content"]
    if not isinstance(enveloped, cms.EnvelopedData) or enveloped["version"].native != "v2":
        _fail("EnvelopedData must be version 2")
    if not _is_absent(enveloped["originator_info"]) or not _is_absent(
        enveloped["unprotected_attrs"]
    ):
        _fail("EnvelopedData carries fields KMS never sends")

    recipients = enveloped["recipient_infos"]
    if len(recipients) != 1 or recipients[0].name != "ktri":
        _fail("the envelope must have exactly one key-transport recipient")
    ktri = recipients[0].chosen
    if ktri["version"].native != "v2" or ktri["rid"].name != "subject_key_identifier":
        _fail("the recipient must be version 2, named by subject key identifier")
    key_identifier = ktri["rid"].chosen.native
    if not 0 < len(key_identifier) <= MAX_KEY_IDENTIFIER_SIZE:
        _fail("the subject key identifier has a bad size")
    key_algorithm = ktri["key_encryption_algorithm"]
    if key_algorithm["algorithm"].dotted != "1.2.840.113549.1.1.7" or not _oaep_params_ok(
        key_algorithm["parameters"]
    ):
        _fail("key transport must be RSAES-OAEP with SHA-256")
    encrypted_key = ktri["encrypted_key"].native
    if not 0 < len(encrypted_key) <= MAX_ENCRYPTED_KEY_SIZE:
        _fail("the encrypted key has a bad size")

    content_info = enveloped["encrypted_content_info"]
    if content_info["content_type"].native != "data":
        _fail("the encrypted content must be of type data")
    content_algorithm = content_info["content_encryption_algorithm"]
    if content_algorithm["algorithm"].dotted != "2.16.840.1.101.3.4.1.42":
        _fail("content encryption must be AES-256-CBC")
    iv = content_algorithm["parameters"]
    if not isinstance(iv, core.OctetString) or len(iv.native) != IV_SIZE:
        _fail("the AES-256-CBC IV must be 16 bytes")
    encrypted = content_info["encrypted_content"]
    if _is_absent(encrypted):
        _fail("the envelope has no encrypted content")
    # .native joins the chunks of a constructed (BER) string; KMS sends either form.
    content = encrypted.native
    if not content or len(content) % 16:
        _fail("the encrypted content must be whole AES blocks")
    return EnvelopeFields(encrypted_key, iv.native, content, key_identifier)


def parse_enveloped_data(data: bytes) -> EnvelopeFields:
    """The fields of a KMS envelope (BER or DER), or CmsError if it is not exactly KMS's shape."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CmsError("the envelope must be bytes")
    data = bytes(data)
    if not 0 < len(data) <= MAX_ENVELOPE_SIZE:
        raise CmsError(f"the envelope must be 1 to {MAX_ENVELOPE_SIZE} bytes")
    try:
        return _parse(data)
    except CmsError:
        raise
    # asn1crypto parses lazily and reports malformed input as ValueError, TypeError, KeyError,
    # IndexError, OverflowError or RecursionError, depending on where it trips: all malformed.
    except Exception as exc:
        raise CmsError("the envelope is not valid CMS") from exc


def open_enveloped_data(data: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext of a KMS envelope addressed to `private_key`, or CmsError."""
    fields = parse_enveloped_data(data)
    try:
        content_key = private_key.decrypt(fields.encrypted_key, _OAEP)
        if len(content_key) != CONTENT_KEY_SIZE:
            raise ValueError("content key size")
        decryptor = Cipher(algorithms.AES(content_key), modes.CBC(fields.iv)).decryptor()
        padded = decryptor.update(fields.encrypted_content) + decryptor.finalize()
        unpadder = padding.PKCS7(128).unpadder()
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except (ValueError, TypeError):
        # One message and no chained cause for every failure: which step failed is an oracle.
        raise CmsError("the envelope could not be opened with this enclave's key") from None
    return plaintext


# ---- building (the KMS emulator and tests) ---------------------------------------------------


def subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo (RFC 7093 method 4): 32 bytes, as KMS's are."""
    spki = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def _recipient_infos(fields: EnvelopeFields) -> cms.RecipientInfos:
    sha256 = {"algorithm": "sha256", "parameters": core.Null()}
    oaep = algos.RSAESOAEPParams(
        {
            "hash_algorithm": algos.DigestAlgorithm(sha256),
            "mask_gen_algorithm": algos.MaskGenAlgorithm(
                {"algorithm": "mgf1", "parameters": algos.DigestAlgorithm(sha256)}
            ),
        }
    )
    ktri = cms.KeyTransRecipientInfo(
        {
            "version": "v2",
            "rid": cms.RecipientIdentifier(
                {"subject_key_identifier": fields.subject_key_identifier}
            ),
            "key_encryption_algorithm": cms.KeyEncryptionAlgorithm(
                {"algorithm": "rsaes_oaep", "parameters": oaep}
            ),
            "encrypted_key": fields.encrypted_key,
        }
    )
    return cms.RecipientInfos([cms.RecipientInfo({"ktri": ktri})])


def _indefinite(identifier: int, *parts: bytes) -> bytes:
    """A constructed BER value with indefinite length: identifier, 0x80, contents, 00 00."""
    return bytes([identifier, 0x80]) + b"".join(parts) + _EOC


def encode_enveloped_data(fields: EnvelopeFields, *, indefinite_length: bool = True) -> bytes:
    """Encode `fields` in KMS's shape: BER with indefinite lengths (as KMS does) or DER."""
    if fields.subject_key_identifier is None:
        raise ValueError("KMS's shape names the recipient by subject key identifier")
    recipients = _recipient_infos(fields)
    content_algorithm = cms.EncryptionAlgorithm(
        {"algorithm": "aes256_cbc", "parameters": fields.iv}
    )
    if not indefinite_length:
        content_info = cms.EncryptedContentInfo(
            {
                "content_type": "data",
                "content_encryption_algorithm": content_algorithm,
                "encrypted_content": fields.encrypted_content,
            }
        )
        enveloped = cms.EnvelopedData(
            {"version": "v2", "recipient_infos": recipients, "encrypted_content_info": content_info}
        )
        return cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump()

    content = fields.encrypted_content
    chunks = [
        core.OctetString(content[i : i + _CHUNK]).dump() for i in range(0, len(content), _CHUNK)
    ]
    encrypted_content_info = _indefinite(
        0x30,
        cms.ContentType("data").dump(),
        content_algorithm.dump(),
        _indefinite(0xA0, *chunks),  # [0] IMPLICIT OCTET STRING, constructed
    )
    enveloped = _indefinite(
        0x30, cms.CMSVersion("v2").dump(), recipients.dump(), encrypted_content_info
    )
    return _indefinite(0x30, cms.ContentType("enveloped_data").dump(), _indefinite(0xA0, enveloped))


def build_enveloped_data(
    plaintext: bytes, recipient_public_key: rsa.RSAPublicKey, *, indefinite_length: bool = True
) -> bytes:
    """Seal `plaintext` for `recipient_public_key` as KMS does: fresh AES-256 key and IV."""
    if len(plaintext) > MAX_PLAINTEXT_SIZE:
        raise ValueError(f"plaintext larger than {MAX_PLAINTEXT_SIZE} bytes")
    content_key = os.urandom(CONTENT_KEY_SIZE)
    iv = os.urandom(IV_SIZE)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    fields = EnvelopeFields(
        encrypted_key=recipient_public_key.encrypt(content_key, _OAEP),
        iv=iv,
        encrypted_content=encryptor.update(padded) + encryptor.finalize(),
        subject_key_identifier=subject_key_identifier(recipient_public_key),
    )
    return encode_enveloped_data(fields, indefinite_length=indefinite_length)
