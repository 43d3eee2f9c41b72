"""Messages between the parent and the enclave, and the plaintext shapes inside sealed envelopes.

Frames (docs/wire.md): a request frame, then the enclave's status frame and body frames, the last
marked final. Every parser here is strict: unknown fields and wrong types are refused.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any

from protocol.errors import ErrorCode, NitroError

MAX_PROMPT_CHARS = 64 * 1024
MAX_NEW_TOKENS_CAP = 512
DEFAULT_MAX_NEW_TOKENS = 64
CONTENT_JSON = "application/json"
CONTENT_NDJSON = "application/x-ndjson"
_TRACE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Kind(enum.Enum):
    CHAT = "chat"
    ATTESTATION = "attestation"
    READY = "ready"
    METRICS = "metrics"
    LEGACY = "legacy"


@dataclass(frozen=True)
class Credentials:
    """The parent role's temporary credentials, for the enclave's own KMS calls."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # never let a log line or traceback carry the secret
        return f"Credentials(access_key_id={self.access_key_id[:4]}...)"

    def to_json(self) -> dict[str, Any]:
        return {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": self.session_token,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Credentials:
        obj = exact_fields(obj, {"access_key_id", "secret_access_key", "session_token"}, "creds")
        akid, secret, token = obj["access_key_id"], obj["secret_access_key"], obj["session_token"]
        if not (_short_str(akid, 128) and _short_str(secret, 256)):
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "credentials must be strings")
        if token is not None and not _short_str(token, 4096):
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "session_token must be a string or null")
        return cls(akid, secret, token)


@dataclass(frozen=True)
class RequestFrame:
    """The first frame on a connection from the parent: what to do, and with what."""

    kind: Kind
    trace_id: str
    credentials: Credentials | None = None
    body: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "trace_id": self.trace_id,
            "credentials": self.credentials.to_json() if self.credentials else None,
            "body": self.body,
        }

    @classmethod
    def from_json(cls, obj: Any) -> RequestFrame:
        obj = exact_fields(obj, {"kind", "trace_id", "credentials", "body"}, "request frame")
        try:
            kind = Kind(obj["kind"])
        except (ValueError, TypeError) as exc:
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "unknown request kind") from exc
        trace_id = obj["trace_id"]
        if not isinstance(trace_id, str) or not _TRACE_ID.match(trace_id):
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "trace_id must be 1-64 url-safe chars")
        creds = obj["credentials"]
        credentials = Credentials.from_json(creds) if creds is not None else None
        body = obj["body"]
        if body is not None and not isinstance(body, dict):
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "body must be an object or null")
        return cls(kind, trace_id, credentials, body)


def status_frame(
    status: int, content_type: str = CONTENT_JSON, error: NitroError | None = None
) -> dict[str, Any]:
    frame: dict[str, Any] = {"status": status, "content_type": content_type}
    if error is not None:
        frame["error"] = error.to_wire()["error"]
    return frame


def body_frame(data: dict[str, Any], final: bool) -> dict[str, Any]:
    return {"final": final, "data": data}


@dataclass(frozen=True)
class Status:
    status: int
    content_type: str
    error: dict[str, Any] | None

    @classmethod
    def from_json(cls, obj: Any) -> Status:
        if not isinstance(obj, dict) or not {"status", "content_type"} <= obj.keys():
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "bad status frame")
        if obj.keys() - {"status", "content_type", "error"}:
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "status frame has unknown fields")
        status, ctype, error = obj["status"], obj["content_type"], obj.get("error")
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "bad status code")
        if ctype not in (CONTENT_JSON, CONTENT_NDJSON):
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "bad content type")
        if (status == 200) != (error is None) or (
            error is not None and not isinstance(error, dict)
        ):
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "status and error disagree")
        return cls(status, ctype, error)


def parse_body_frame(obj: Any) -> tuple[bool, dict[str, Any]]:
    obj = exact_fields(obj, {"final", "data"}, "body frame", ErrorCode.PROTOCOL_ERROR)
    if not isinstance(obj["final"], bool) or not isinstance(obj["data"], dict):
        raise NitroError(ErrorCode.PROTOCOL_ERROR, "bad body frame")
    return obj["final"], obj["data"]


# ---- the plaintext question inside a v2 envelope -----------------------------------------------


@dataclass(frozen=True)
class Question:
    prompt: str
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0  # on the wire only when not 0 (docs/wire.md)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }
        if self.min_new_tokens:
            obj["min_new_tokens"] = self.min_new_tokens
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> Question:
        """Read an opened question; every problem is INVALID_PARAMETERS (sealed back)."""
        bad = ErrorCode.INVALID_PARAMETERS
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise NitroError(bad, "question needs a prompt")
        if obj.keys() - {
            "prompt",
            "max_new_tokens",
            "min_new_tokens",
            "temperature",
            "top_p",
            "seed",
        }:
            raise NitroError(bad, "question has unknown field(s)")
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_PROMPT_CHARS:
            raise NitroError(bad, "prompt must be a non-empty string")
        max_new = obj.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new, bool) or not isinstance(max_new, int):
            raise NitroError(bad, "max_new_tokens must be an integer")
        if not 1 <= max_new <= MAX_NEW_TOKENS_CAP:
            raise NitroError(bad, f"max_new_tokens must be 1-{MAX_NEW_TOKENS_CAP}")
        min_new = obj.get("min_new_tokens", 0)
        if isinstance(min_new, bool) or not isinstance(min_new, int):
            raise NitroError(bad, "min_new_tokens must be an integer")
        if not 0 <= min_new <= max_new:
            raise NitroError(bad, "min_new_tokens must be 0-max_new_tokens")
        temperature = _number(obj.get("temperature", 0.0), "temperature", 0.0, 2.0)
        top_p = _number(obj.get("top_p", 1.0), "top_p", 0.0, 1.0)
        if top_p == 0.0:
            raise NitroError(bad, "top_p must be above 0")
        seed = obj.get("seed")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
        ):
            raise NitroError(bad, "seed must be a non-negative integer or null")
        return cls(prompt, max_new, temperature, top_p, seed, min_new)


# ---- helpers -----------------------------------------------------------------------------------


def exact_fields(
    obj: Any, expected: set[str], where: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR
) -> dict[str, Any]:
    """`obj` as a dict with exactly the `expected` keys, or `code` naming what is missing."""
    if not isinstance(obj, dict):
        raise NitroError(code, f"{where} must be a JSON object")
    missing, unknown = expected - obj.keys(), obj.keys() - expected
    if missing:
        raise NitroError(code, f"{where} lacks {', '.join(sorted(missing))}")
    if unknown:  # unknown names are not echoed: they come from an untrusted peer
        raise NitroError(code, f"{where} has unknown field(s)")
    return obj


def _short_str(value: Any, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NitroError(ErrorCode.INVALID_PARAMETERS, f"{name} must be a number")
    # Only floats: math.isfinite(10**400) raises OverflowError, and JSON integers are unbounded.
    if isinstance(value, float) and not math.isfinite(value):
        raise NitroError(ErrorCode.INVALID_PARAMETERS, f"{name} must be a number")
    if not low <= value <= high:
        raise NitroError(ErrorCode.INVALID_PARAMETERS, f"{name} must be {low}-{high}")
    return float(value)
