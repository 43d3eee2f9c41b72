"""The one list of error codes that every part of nitro-llm speaks.

Each code has an HTTP status and a sentence, written by us for a person, that the client shows;
a server's own message is never trusted by the client (the parent may have written it).
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.Enum):
    """Error codes on the wire: value is (snake_case code, HTTP status, client's text)."""

    # Shape and size, found by the proxy or by the enclave before the request is opened.
    BAD_REQUEST = (
        "bad_request",
        400,
        "The request was malformed. Update the client, or report this as a bug.",
    )
    UNSUPPORTED_VERSION = (
        "unsupported_version",
        400,
        "The client and the server speak different protocol versions. Update the client.",
    )
    PAYLOAD_TOO_LARGE = (
        "payload_too_large",
        413,
        "The request is larger than the server accepts. Shorten the question.",
    )
    UNSUPPORTED_MEDIA_TYPE = (
        "unsupported_media_type",
        415,
        "The request must be sent as JSON (Content-Type: application/json).",
    )
    NOT_FOUND = ("not_found", 404, "There is no such endpoint. Check the proxy URL.")
    METHOD_NOT_ALLOWED = (
        "method_not_allowed",
        405,
        "That HTTP method is not allowed on this endpoint.",
    )
    REQUEST_TIMEOUT = (
        "request_timeout",
        408,
        "The request body did not arrive in time. Check the network and try again.",
    )
    UNAUTHORIZED = ("unauthorized", 401, "The API key is missing or wrong.")
    RATE_LIMITED = (
        "rate_limited",
        429,
        "Too many requests from this client. Wait a moment and try again.",
    )
    LEGACY_DISABLED = (
        "legacy_disabled",
        404,
        "Protocol v1 (the original sample's format) is not enabled on this server.",
    )
    LEGACY_TOO_LARGE = (
        "legacy_too_large",
        413,
        "Protocol v1 carries at most 4096 bytes each way (KMS's limit for Encrypt). Ask a "
        "shorter question, or move to protocol v2 (the chatbot), which has no such limit.",
    )

    # Checks the enclave makes on the key and the sealed request.
    UNKNOWN_KEY = (
        "unknown_key",
        403,
        "The enclave does not accept this KMS key. Check --key-id against the enclave's "
        "configuration.",
    )
    INVALID_CONTEXT = (
        "invalid_context",
        400,
        "The encryption context does not belong to this application or this conversation.",
    )
    DECRYPTION_FAILED = (
        "decryption_failed",
        400,
        "The request could not be authenticated: it was modified in transit or sealed with "
        "another key. Nothing was answered.",
    )
    REPLAYED_REQUEST = (
        "replayed_request",
        409,
        "This request was already received once; a replay was refused. Ask again.",
    )
    STALE_REQUEST = (
        "stale_request",
        400,
        "The request is too old or dated in the future. Check this machine's clock.",
    )
    PROMPT_TOO_LONG = (
        "prompt_too_long",
        400,
        "The question (with the conversation so far) is longer than the model accepts. "
        "Shorten it or start a new conversation.",
    )
    INVALID_PARAMETERS = (
        "invalid_parameters",
        400,
        "A generation parameter is out of range (max_new_tokens 1-512, temperature 0-2, "
        "top_p 0-1).",
    )
    ATTESTATION_REJECTED = (
        "attestation_rejected",
        403,
        "KMS refused to release the key to this enclave image: its measurements (PCRs) do not "
        "match the key policy. Compare `nitro-local measure` (or the release's measurements) "
        "with the key policy and re-render it if the change is intended.",
    )
    KMS_UNAVAILABLE = (
        "kms_unavailable",
        502,
        "The enclave could not reach KMS. Check the parent's vsock-proxy to the KMS endpoint.",
    )
    KMS_ERROR = (
        "kms_error",
        502,
        "KMS refused the request. Check the key id, the key's state and the parent role's "
        "credentials.",
    )

    # Availability.
    ENCLAVE_UNAVAILABLE = (
        "enclave_unavailable",
        503,
        "The enclave is not reachable. The operator should check that it is running.",
    )
    ENCLAVE_TIMEOUT = (
        "enclave_timeout",
        504,
        "The enclave did not answer in time. Try again, perhaps with a shorter answer.",
    )
    NOT_READY = (
        "not_ready",
        503,
        "The enclave is starting (loading its model). Try again in a moment.",
    )
    OVERLOADED = (
        "overloaded",
        503,
        "The server is busy. Try again in a few seconds.",
    )
    FRAME_TOO_LARGE = (
        "frame_too_large",
        413,
        "A message between the parent and the enclave was larger than allowed.",
    )
    PROTOCOL_ERROR = (
        "protocol_error",
        502,
        "The parent and the enclave could not understand each other. Report this as a bug.",
    )
    INTERNAL_ERROR = (
        "internal_error",
        500,
        "The server hit an unexpected error. Try again; report it if it persists.",
    )

    # A sealed model refused by the enclave at boot (protocol/sealed_model.py, docs/wire.md
    # section 14); the enclave then stays unready. For the operator: the parent served it.
    MODEL_FEED_UNAVAILABLE = (
        "model_feed_unavailable",
        503,
        "The enclave could not fetch its sealed model from the parent. Check that the model "
        "feed runs and serves the sealed directory.",
    )
    MODEL_MANIFEST_INVALID = (
        "model_manifest_invalid",
        503,
        "The sealed model's manifest or key file is malformed. Seal the model again.",
    )
    MODEL_MANIFEST_MISMATCH = (
        "model_manifest_mismatch",
        503,
        "The parent served a sealed model other than the one the enclave's measured "
        "configuration pins (another manifest). Serve the sealed directory the image was built "
        "for.",
    )
    MODEL_WRONG_KEY = (
        "model_wrong_key",
        503,
        "The sealed model's data key is not one the pinned model key and manifest open: it was "
        "sealed under another key, or its key file belongs to another sealing.",
    )
    MODEL_CHUNK_CORRUPT = (
        "model_chunk_corrupt",
        503,
        "A chunk of the sealed model failed authentication: its bytes were modified.",
    )
    MODEL_CHUNK_MISSING = (
        "model_chunk_missing",
        503,
        "A chunk of the sealed model was skipped: the parent dropped one.",
    )
    MODEL_CHUNK_REORDERED = (
        "model_chunk_reordered",
        503,
        "A chunk of the sealed model came out of order or twice.",
    )
    MODEL_CHUNK_MISPLACED = (
        "model_chunk_misplaced",
        503,
        "A chunk of another file of the sealed model was served in place of this file's.",
    )
    MODEL_CHUNK_FOREIGN = (
        "model_chunk_foreign",
        503,
        "A chunk of another sealed model (another sealing) was served in place of this one's.",
    )
    MODEL_TRUNCATED = (
        "model_truncated",
        503,
        "The sealed model ended early: a file's last chunks are missing.",
    )
    MODEL_FILE_MISMATCH = (
        "model_file_mismatch",
        503,
        "A decrypted file of the sealed model differs from its manifest (size or SHA-256). "
        "Seal the model again.",
    )

    # Found by the client while checking what came back.
    ANSWER_INVALID = (
        "answer_invalid",
        502,
        "The answer failed verification: it was modified, reordered, truncated, replayed or "
        "belongs to another question. It was discarded; do not trust the parent.",
    )
    ATTESTATION_INVALID = (
        "attestation_invalid",
        502,
        "The enclave's attestation document failed verification. Nothing was sent.",
    )
    KEY_POLICY_UNSAFE = (
        "key_policy_unsafe",
        502,
        "The KMS key's policy would release your data key to something other than the expected "
        "enclave image (or to nothing at all). Nothing was sent. Ask the key's owner to pin "
        "kms:Decrypt to the enclave's PCRs.",
    )

    def __init__(self, code: str, http_status: int, client_text: str) -> None:
        self.code = code
        self.http_status = http_status
        self.client_text = client_text

    @classmethod
    def from_code(cls, code: str) -> ErrorCode | None:
        """The member for a wire code, or None for a code this version does not know."""
        return _BY_CODE.get(code)


_BY_CODE = {member.code: member for member in ErrorCode}


class NitroError(Exception):
    """An error that carries a wire code; `detail` is for logs and never holds content."""

    # A message for the peer, built by us from public data only (e.g. a refused enclave's PCR0).
    # None: the peer gets the code's own text, since `detail` may name internals.
    public_message: str | None = None

    def __init__(self, code: ErrorCode, detail: str | None = None) -> None:
        super().__init__(f"{code.code}: {detail or code.client_text}")
        self.code = code
        self.detail = detail

    @property
    def http_status(self) -> int:
        return self.code.http_status

    def to_wire(self) -> dict[str, Any]:
        """The JSON error object: `{"error": {"code", "message"}}`."""
        message = self.code.client_text if not self.detail else f"{self.detail}"
        return {"error": {"code": self.code.code, "message": message}}

    def diagnostics(self) -> str:
        """What the CLI prints: our own text for the code, never a server's words."""
        return f"error: {self.code.code}: {self.code.client_text}"


def error_from_wire(obj: Any) -> tuple[ErrorCode, str]:
    """Read `{"error": {"code", "message"}}` sent by an untrusted peer.

    Returns the code (PROTOCOL_ERROR when it is unknown or malformed) and the peer's message,
    truncated and stripped of control characters, to be shown only when asked for and labelled.
    """
    try:
        err = obj["error"]
        code = ErrorCode.from_code(err["code"]) if isinstance(err["code"], str) else None
        message = err.get("message", "")
        if not isinstance(message, str):
            message = ""
    except (KeyError, TypeError, AttributeError):
        return ErrorCode.PROTOCOL_ERROR, ""
    printable = "".join(ch for ch in message[:300] if ch.isprintable())
    return code or ErrorCode.PROTOCOL_ERROR, printable
