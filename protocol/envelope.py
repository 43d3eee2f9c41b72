"""The v2 envelope: per-direction keys, padding, the AAD, and sealing of questions and answers.

docs/wire.md is the contract for every byte here; tests/protocol/test_envelope.py checks its
vectors. Nothing in this module logs.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import ErrorCode, NitroError
from protocol.messages import exact_fields

VERSION = 2
APP = "nitro-llm"
NONCE_SIZE = 12
TAG_SIZE = 16
SESSION_BYTES = 16
REQUEST_ID_BYTES = 16
MIN_BUCKET = 256
MAX_BUCKET = 128 * 1024
_LENGTH = struct.Struct(">I")
_INFO = {"request": b"nitro-llm/v2/request", "response": b"nitro-llm/v2/response"}


# ---- encodings -------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, field: str, size: int | None = None) -> bytes:
    """Standard base64 (padded) from an untrusted JSON field, or BAD_REQUEST naming the field."""
    if not isinstance(text, str):
        raise NitroError(ErrorCode.BAD_REQUEST, f"{field} must be a base64 string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NitroError(ErrorCode.BAD_REQUEST, f"{field} is not valid base64") from exc
    if size is not None and len(data) != size:
        raise NitroError(ErrorCode.BAD_REQUEST, f"{field} must be {size} bytes")
    return data


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: Any, field: str, size: int) -> bytes:
    """Unpadded base64url of exactly `size` bytes, in its one canonical spelling."""
    if not isinstance(text, str) or len(text) > 4 * size:
        raise NitroError(ErrorCode.BAD_REQUEST, f"{field} must be a base64url string")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise NitroError(ErrorCode.BAD_REQUEST, f"{field} is not valid base64url") from exc
    if len(data) != size or b64url(data) != text:
        raise NitroError(ErrorCode.BAD_REQUEST, f"{field} must be {size} bytes in base64url")
    return data


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the one encoding both sides compute the AAD with."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ---- keys, padding, AAD ----------------------------------------------------------------------


@dataclass(frozen=True)
class SessionKeys:
    # repr=False: a key must never reach a log line or a traceback through repr().
    request: bytes = field(repr=False)
    response: bytes = field(repr=False)


def derive_keys(data_key: bytes, session: str) -> SessionKeys:
    """HKDF-SHA256 over the KMS data key, salted with the session's 16 raw bytes."""
    if len(data_key) != 32:
        raise NitroError(ErrorCode.KMS_ERROR, "data key must be 32 bytes")
    salt = unb64url(session, "key.context.session", SESSION_BYTES)

    def one(direction: str) -> bytes:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO[direction])
        return hkdf.derive(data_key)

    return SessionKeys(request=one("request"), response=one("response"))


def bucket_size(content_length: int) -> int:
    """The smallest power-of-two bucket (256 B .. 128 KiB) holding 4 + content_length bytes."""
    needed = _LENGTH.size + content_length
    size = MIN_BUCKET
    while size < needed:
        size *= 2
    if size > MAX_BUCKET:
        raise NitroError(ErrorCode.PAYLOAD_TOO_LARGE, "plaintext larger than the largest bucket")
    return size


def pad(content: bytes) -> bytes:
    size = bucket_size(len(content))
    return _LENGTH.pack(len(content)) + content + bytes(size - _LENGTH.size - len(content))


def unpad(padded: bytes) -> bytes:
    if len(padded) < _LENGTH.size:
        raise NitroError(ErrorCode.BAD_REQUEST, "padded plaintext too short")
    (length,) = _LENGTH.unpack_from(padded)
    end = _LENGTH.size + length
    if end > len(padded) or any(padded[end:]):
        raise NitroError(ErrorCode.BAD_REQUEST, "bad padding")
    return padded[_LENGTH.size : end]


@dataclass(frozen=True)
class Header:
    """What the AAD binds: who, which conversation, which request, which chunk."""

    key_id: str
    session: str
    request_id: str
    sent_at: int
    stream: bool

    def aad(
        self, direction: str, seq: int = 0, final: bool = True, request_sha256: str = ""
    ) -> bytes:
        fields: dict[str, Any] = {
            "v": VERSION,
            "dir": direction,
            "key_id": self.key_id,
            "session": self.session,
            "request_id": self.request_id,
            "sent_at": self.sent_at,
            "stream": self.stream,
            "seq": seq,
            "final": final,
        }
        if direction == "response":
            fields["request_sha256"] = request_sha256
        return canonical_json(fields)


# ---- requests ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedRequest:
    """A v2 request body as it travels: the header, the wrapped key and the sealed question."""

    header: Header
    edk: bytes
    nonce: bytes
    ciphertext: bytes

    @functools.cached_property
    def request_sha256(self) -> str:  # bound into every answer chunk's AAD: hashed once
        return hashlib.sha256(self.ciphertext).hexdigest()

    @property
    def context(self) -> dict[str, str]:
        return {"app": APP, "session": self.header.session}

    def to_json(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "key": {"key_id": self.header.key_id, "edk": b64(self.edk), "context": self.context},
            "request_id": self.header.request_id,
            "sent_at": self.header.sent_at,
            "stream": self.header.stream,
            "nonce": b64(self.nonce),
            "ciphertext": b64(self.ciphertext),
        }


_REQUEST_FIELDS = {"v", "key", "request_id", "sent_at", "stream", "nonce", "ciphertext"}
_KEY_FIELDS = {"key_id", "edk", "context"}
MAX_EDK = 6144
MAX_KEY_ID = 2048


def parse_request(body: Any) -> SealedRequest:
    """Check a v2 request body's shape (what the proxy and the enclave both do before opening).

    The context is not checked against this application here: the enclave refuses a foreign
    `app` or session with INVALID_CONTEXT, as DESIGN.md orders its checks.
    """
    if isinstance(body, dict) and body.get("v") != VERSION and "v" in body:
        raise NitroError(ErrorCode.UNSUPPORTED_VERSION, "only protocol v2 is served here")
    body = exact_fields(body, _REQUEST_FIELDS, "request", ErrorCode.BAD_REQUEST)
    key = exact_fields(body["key"], _KEY_FIELDS, "key", ErrorCode.BAD_REQUEST)
    context = key["context"]
    if not isinstance(context, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and len(v) <= 256 for k, v in context.items()
    ):
        raise NitroError(ErrorCode.BAD_REQUEST, "key.context must map strings to strings")
    if len(context) > 8:
        raise NitroError(ErrorCode.BAD_REQUEST, "key.context has too many entries")
    key_id = key["key_id"]
    if not isinstance(key_id, str) or not 0 < len(key_id) <= MAX_KEY_ID:
        raise NitroError(ErrorCode.BAD_REQUEST, "key.key_id must be a non-empty string")
    edk = unb64(key["edk"], "key.edk")
    if not 0 < len(edk) <= MAX_EDK:
        raise NitroError(ErrorCode.BAD_REQUEST, "key.edk has an impossible size")
    unb64url(body["request_id"], "request_id", REQUEST_ID_BYTES)
    sent_at = body["sent_at"]
    if isinstance(sent_at, bool) or not isinstance(sent_at, int) or not 0 <= sent_at < 2**53:
        raise NitroError(ErrorCode.BAD_REQUEST, "sent_at must be unix milliseconds")
    if not isinstance(body["stream"], bool):
        raise NitroError(ErrorCode.BAD_REQUEST, "stream must be true or false")
    nonce = unb64(body["nonce"], "nonce", NONCE_SIZE)
    ciphertext = unb64(body["ciphertext"], "ciphertext")
    if len(ciphertext) < MIN_BUCKET + TAG_SIZE or len(ciphertext) > MAX_BUCKET + TAG_SIZE:
        raise NitroError(ErrorCode.BAD_REQUEST, "ciphertext has an impossible size")
    session = context.get("session", "")
    header = Header(key_id, session, body["request_id"], sent_at, body["stream"])
    return SealedRequest(header, edk, nonce, ciphertext)


def seal_request(
    keys: SessionKeys,
    header: Header,
    edk: bytes,
    question: dict[str, Any],
    nonce: bytes | None = None,
) -> SealedRequest:
    """Seal a question (a JSON object) under the request key; `nonce` only for test vectors."""
    nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(keys.request).encrypt(
        nonce, pad(canonical_json(question)), header.aad("request")
    )
    return SealedRequest(header, edk, nonce, ciphertext)


def open_request(keys: SessionKeys, request: SealedRequest) -> dict[str, Any]:
    """Verify the tag first; only then parse. Raises DECRYPTION_FAILED on any tampering."""
    try:
        padded = AESGCM(keys.request).decrypt(
            request.nonce, request.ciphertext, request.header.aad("request")
        )
    except InvalidTag as exc:
        raise NitroError(ErrorCode.DECRYPTION_FAILED, "request tag did not verify") from exc
    try:
        question = json.loads(unpad(padded))
    # RecursionError: deeply nested arrays fit easily in a padded bucket.
    except (NitroError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise NitroError(ErrorCode.BAD_REQUEST, "sealed question is not a JSON object") from exc
    if not isinstance(question, dict):
        raise NitroError(ErrorCode.BAD_REQUEST, "sealed question is not a JSON object")
    return question


# ---- answers -----------------------------------------------------------------------------------


def seal_answer(
    keys: SessionKeys,
    request: SealedRequest,
    seq: int,
    final: bool,
    content: dict[str, Any],
    nonce: bytes | None = None,
) -> dict[str, Any]:
    """One answer object (a whole answer, or one chunk of a stream), sealed for the client."""
    nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
    aad = request.header.aad("response", seq, final, request.request_sha256)
    ciphertext = AESGCM(keys.response).encrypt(nonce, pad(canonical_json(content)), aad)
    return {
        "v": VERSION,
        "request_id": request.header.request_id,
        "seq": seq,
        "final": final,
        "nonce": b64(nonce),
        "ciphertext": b64(ciphertext),
    }


_ANSWER_FIELDS = {"v", "request_id", "seq", "final", "nonce", "ciphertext"}


def open_answer(
    keys: SessionKeys, request: SealedRequest, answer: Any, expected_seq: int
) -> tuple[bool, dict[str, Any]]:
    """Open one answer object for `request`, expecting chunk `expected_seq`.

    Returns (final, content). Anything moved, reordered, replayed, truncated or altered fails
    with ANSWER_INVALID: the AAD binds the request's hash, the sequence number and the final flag.
    """
    try:
        answer = exact_fields(answer, _ANSWER_FIELDS, "answer", ErrorCode.ANSWER_INVALID)
        seq, final = answer["seq"], answer["final"]
        if answer["v"] != VERSION or answer["request_id"] != request.header.request_id:
            raise NitroError(ErrorCode.ANSWER_INVALID, "answer is for another request")
        if seq != expected_seq or isinstance(seq, bool) or not isinstance(final, bool):
            raise NitroError(ErrorCode.ANSWER_INVALID, "answer chunk out of order")
        nonce = unb64(answer["nonce"], "nonce", NONCE_SIZE)
        ciphertext = unb64(answer["ciphertext"], "ciphertext")
    except NitroError as exc:
        raise NitroError(ErrorCode.ANSWER_INVALID, exc.detail) from exc
    aad = request.header.aad("response", seq, final, request.request_sha256)
    try:
        padded = AESGCM(keys.response).decrypt(nonce, ciphertext, aad)
        content = json.loads(unpad(padded))
    except (InvalidTag, NitroError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NitroError(ErrorCode.ANSWER_INVALID, "answer did not verify") from exc
    if not isinstance(content, dict):
        raise NitroError(ErrorCode.ANSWER_INVALID, "answer content is not an object")
    return final, content
