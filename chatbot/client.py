"""The chatbot library: SecureChatClient seals questions for the enclave and opens its answers.

One KMS data key per conversation (rotated after a bounded number of turns or seconds); every
answer chunk is checked against its request before a byte of it is returned. Nothing here logs.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3

from chatbot.profile import (
    ClientSettings,
    ConfigError,
    UserCredentials,
    build_kms_client,
    load_profile,
)
from chatbot.verify import (
    EnclaveExpectation,
    VerifiedEnclave,
    aws_root,
    document_from_json,
    load_root,
    verify_enclave,
)
from protocol import envelope
from protocol.attestation import AttestationError
from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.messages import CONTENT_JSON, CONTENT_NDJSON, MAX_PROMPT_CHARS, Question
from protocol.prompt import format_prompt

__all__ = [
    "Answer",
    "ChatError",
    "ClientSettings",
    "Conversation",
    "SecureChatClient",
    "VerifiedEnclave",
]

USER_AGENT = "nitro-llm-chatbot/0.1"
MAX_ERROR_BODY = 64 * 1024
MAX_ATTESTATION_BODY = 64 * 1024  # a document is about 4.5 KiB, 6 in base64
_READ_STEP = 64 * 1024
_FINISH_REASONS = {"stop", "length", "cancelled"}
_CHUNK_FIELDS = {"text", "tokens"}
_FINAL_FIELDS = _CHUNK_FIELDS | {"finish_reason", "usage"}
_KMS_HINT = "This was the client's own KMS call (GenerateDataKey), made with your credentials"


class ChatError(NitroError):
    """A failed question. The code's client_text is ours; `server_message` is the server's
    words (untrusted unless `authenticated`, i.e. sealed by the enclave), for --verbose only.
    `hint` is an extra line written by this client (never server text)."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str | None = None,
        *,
        server_message: str | None = None,
        authenticated: bool = False,
        hint: str | None = None,
    ) -> None:
        super().__init__(code, detail)
        self.server_message = server_message or None
        self.authenticated = authenticated
        self.hint = hint


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    request_id: str


@dataclass
class _DataKey:
    """One conversation key: the session it is bound to and the keys derived from it.

    The plaintext data key itself is not kept: only the two derived keys are needed.
    """

    session: str
    edk: bytes = field(repr=False)
    keys: envelope.SessionKeys = field(repr=False)
    created: float = field(default_factory=time.monotonic)
    turns: int = 0


@dataclass(frozen=True)
class _Chunk:
    text: str
    final: bool
    tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class SecureChatClient:
    """Talks to one parent proxy with one KMS key. Cheap to keep; not for concurrent threads."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        kms_client: Any = None,
        session: urllib3.PoolManager | None = None,
        expected_pcrs: Mapping[int, bytes] | None = None,
        attestation_root: bytes | None = None,
        allow_debug: bool = False,
    ) -> None:
        """`kms_client`: a boto3 KMS client (the standard credential chain when None).
        `session`: the HTTP connection pool (built to verify `settings.ca_bundle` when None).
        `expected_pcrs`: when given, nothing is sent (not even the KMS call) before the enclave
        behind the proxy proved, by a fresh attestation document chaining to
        `attestation_root` (DER; AWS's root when None), that it runs with these PCRs, not in
        debug mode unless `allow_debug`; and, where the key policy is readable, that the
        policy admits kms:Decrypt only to such an enclave. See `verify_enclave`."""
        self.settings = settings
        self._kms = kms_client if kms_client is not None else build_kms_client(settings)
        self._http = session if session is not None else _connection_pool(settings)
        self._expectation: EnclaveExpectation | None = None
        if expected_pcrs is not None:
            if not expected_pcrs:
                raise ConfigError("expected_pcrs names no PCR")
            self._expectation = EnclaveExpectation(
                root=attestation_root if attestation_root is not None else aws_root(),
                pcrs=dict(expected_pcrs),
                allow_debug=allow_debug,
            )
        self.verified: VerifiedEnclave | None = None

    @classmethod
    def from_profile(cls, path: Path, **verification: Any) -> SecureChatClient:
        """A client for the local stack: `path` is its state directory or its profile.json.
        With `expected_pcrs=`, the profile's `attestation_root` is the pinned root."""
        profile = load_profile(path)
        if verification.get("expected_pcrs") is not None and "attestation_root" not in verification:
            if profile.attestation_root is None:
                raise ConfigError("the profile names no attestation_root; run `nitro-local up`")
            verification["attestation_root"] = load_root(profile.attestation_root)
        return cls.from_settings(profile.settings, profile.credentials, **verification)

    @classmethod
    def from_settings(
        cls,
        settings: ClientSettings,
        credentials: UserCredentials | None = None,
        **verification: Any,
    ) -> SecureChatClient:
        """A client whose KMS client uses `credentials`, or the standard chain when None;
        `verification`: expected_pcrs, attestation_root, allow_debug (see __init__)."""
        return cls(settings, kms_client=build_kms_client(settings, credentials), **verification)

    def verify_enclave(self) -> VerifiedEnclave | None:
        """Check the enclave (and the key policy) now, once per client; None when this client
        was built without `expected_pcrs`. Raises AttestationError or KeyPolicyError, whose
        `check` names the failed check. Conversations call this before their first request."""
        if self._expectation is None:
            return None
        if self.verified is None:
            self.verified = verify_enclave(
                self._fetch_attestation,
                self._expectation,
                kms=self._kms,
                key_id=self.settings.key_id,
            )
        return self.verified

    def __repr__(self) -> str:
        return f"SecureChatClient(proxy_url={self.settings.proxy_url!r})"

    def conversation(self) -> Conversation:
        return Conversation(self)

    def ask(self, question: str, **params: Any) -> Answer:
        """A one-off question: a fresh conversation (and data key) for it alone."""
        return self.conversation().ask(question, **params)

    def close(self) -> None:
        self._http.clear()

    def __enter__(self) -> SecureChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing for Conversation ---------------------------------------------------------

    def _fetch_attestation(self, nonce: bytes) -> bytes:
        """GET /v1/attestation?nonce=<hex>: the enclave's document, unverified."""
        settings = self.settings
        url = f"{settings.proxy_url.rstrip('/')}/v1/attestation?nonce={nonce.hex()}"
        headers = {"Accept": CONTENT_JSON, "Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        response = self._request("GET", url, None, headers, settings.connect_timeout_s)
        try:
            deadline = time.monotonic() + settings.timeout_s
            if response.status != 200:
                raise _http_error(response, settings, deadline)
            body = b"".join(_raw_pieces(response, MAX_ATTESTATION_BODY, deadline))
        except ChatError as exc:
            if exc.code is ErrorCode.ANSWER_INVALID:  # too large, or the connection broke
                raise AttestationError("response", exc.detail or "unreadable answer") from exc
            raise
        finally:
            response.close()
            response.release_conn()
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise AttestationError("response", "the proxy's answer is not JSON") from exc
        return document_from_json(obj)

    def _new_data_key(self) -> _DataKey:
        session = envelope.b64url(os.urandom(envelope.SESSION_BYTES))
        context = {"app": envelope.APP, "session": session}
        plaintext, edk = _generate_data_key(self._kms, self.settings.key_id, context)
        return _DataKey(session, edk, envelope.derive_keys(plaintext, session))

    def _post(self, body: bytes, stream: bool) -> Any:
        """POST the sealed request; the response body is left unread (and must be closed)."""
        settings = self.settings
        headers = {
            "Content-Type": CONTENT_JSON,
            "Accept": CONTENT_NDJSON if stream else CONTENT_JSON,
            # Compressed answers would need a decoder: sizes are bounded on the raw bytes.
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        return self._request("POST", settings.chat_url, body, headers, settings.timeout_s)

    def _request(
        self, method: str, url: str, body: bytes | None, headers: dict[str, str], read_s: float
    ) -> Any:
        settings = self.settings
        try:
            return self._http.request(
                method,
                url,
                body=body,
                headers=headers,
                preload_content=False,
                redirect=False,
                retries=False,
                timeout=urllib3.Timeout(connect=settings.connect_timeout_s, read=read_s),
            )
        except urllib3.exceptions.SSLError as exc:
            raise ChatError(
                ErrorCode.ENCLAVE_UNAVAILABLE,
                "TLS to the proxy failed",
                hint=f"The proxy at {settings.proxy_url} could not be verified over TLS "
                f"({_reason(exc)}). Check --ca-bundle and the URL's host name.",
            ) from exc
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise ChatError(ErrorCode.ENCLAVE_TIMEOUT, "no response from the proxy") from exc
        except urllib3.exceptions.ProtocolError as exc:
            if not _not_http(exc):
                raise _unreachable(settings, exc) from exc
            # It answered, but not in HTTP: a status line of the parent's own words, say.
            raise ChatError(
                ErrorCode.PROTOCOL_ERROR,
                "the proxy's answer is not HTTP",
                hint=f"The server at {settings.proxy_url} did not answer in HTTP "
                f"({_reason(exc)}): is it a nitro-llm proxy?",
            ) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unreachable(settings, exc) from exc


class Conversation:
    """A conversation: the history (kept in memory only) and its current data key."""

    def __init__(self, client: SecureChatClient) -> None:
        self._client = client
        self._key: _DataKey | None = None
        self.history: list[tuple[str, str]] = []
        self.last_answer: Answer | None = None

    def __repr__(self) -> str:
        return f"Conversation(turns={len(self.history)}, session={self.session!r})"

    @property
    def session(self) -> str | None:
        """The current key's session id (sent in clear on the wire), None before the first turn."""
        return self._key.session if self._key else None

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
    ) -> Answer:
        """Ask, wait for the whole answer, add the turn to the history.

        `min_new_tokens` keeps the model from ending before that many tokens (benchmarks)."""
        params = _params(max_new_tokens, temperature, top_p, seed, min_new_tokens)
        *_, (_text, _tokens, answer) = self._exchange(question, params, stream=False)
        assert answer is not None  # _exchange ends with the final chunk or raises
        return answer

    def stream(
        self,
        question: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as each verified chunk arrives.

        The request is sent on the first `next()`. The history (and `last_answer`) is updated
        when the final chunk has verified; closing the iterator early cancels the answer.
        """
        params = _params(max_new_tokens, temperature, top_p, seed)
        for text, _tokens, _answer in self._exchange(question, params, stream=True):
            if text:
                yield text

    def complete(
        self,
        prompt: str,
        *,
        stream: bool = True,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> Iterator[tuple[str, int, Answer | None]]:
        """Send `prompt` verbatim (no template; the history is neither used nor updated) and
        yield (text, tokens, None) per verified chunk, then (text, tokens, Answer) for the final
        one. The request is sent on the first `next()`; closing early cancels the answer."""
        params = _params(max_new_tokens, temperature, top_p, seed)
        return self._exchange(prompt, params, stream=stream, verbatim=True)

    # ---- one turn --------------------------------------------------------------------------

    def _exchange(
        self, question: str, params: dict[str, Any], stream: bool, verbatim: bool = False
    ) -> Iterator[tuple[str, int, Answer | None]]:
        """Send one turn; yield (text, tokens, None) per chunk, (text, tokens, Answer) last."""
        if not question.strip():
            raise ChatError(ErrorCode.INVALID_PARAMETERS, "empty question", hint="Ask something.")
        prompt = question if verbatim else format_prompt(question, self.history)
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ChatError(ErrorCode.PROMPT_TOO_LONG, "prompt over the character cap")
        try:
            # The server checks these too; checking first saves a KMS call and a round trip.
            checked = Question.from_json({**params, "prompt": prompt})
        except NitroError as exc:
            raise ChatError(exc.code, exc.detail) from exc

        settings = self._client.settings
        # Before anything leaves this machine (the KMS call included): the enclave and the key.
        self._client.verify_enclave()
        key = self._current_key()
        header = envelope.Header(
            key_id=settings.key_id,
            session=key.session,
            request_id=envelope.b64url(os.urandom(envelope.REQUEST_ID_BYTES)),
            sent_at=int(time.time() * 1000),
            stream=stream,
        )
        try:
            sealed = envelope.seal_request(key.keys, header, key.edk, checked.to_json())
        except NitroError as exc:
            raise ChatError(exc.code, exc.detail) from exc
        key.turns += 1
        body = json.dumps(sealed.to_json(), separators=(",", ":")).encode()

        deadline = time.monotonic() + settings.timeout_s
        response = self._client._post(body, stream)
        try:
            texts: list[str] = []
            for chunk in _read_answer(response, sealed, key.keys, settings, deadline):
                texts.append(chunk.text)
                if not chunk.final:
                    yield chunk.text, chunk.tokens, None
                    continue
                answer = Answer(
                    text="".join(texts),
                    finish_reason=chunk.finish_reason or "",
                    prompt_tokens=chunk.prompt_tokens,
                    completion_tokens=chunk.completion_tokens,
                    request_id=header.request_id,
                )
                if not verbatim:
                    self.history.append((question, answer.text))
                self.last_answer = answer
                yield chunk.text, chunk.tokens, answer
        finally:
            # Dropping the connection (not returning it to the pool) is how a cancelled
            # stream tells the proxy, and through it the enclave, to stop generating.
            response.close()
            response.release_conn()

    def _current_key(self) -> _DataKey:
        settings = self._client.settings
        key = self._key
        if (
            key is None
            or key.turns >= settings.max_turns_per_key
            or time.monotonic() - key.created >= settings.max_key_age_s
        ):
            # A new session and key; the history stays (it is re-sent in each prompt anyway).
            key = self._key = self._client._new_data_key()
        return key


# ---- reading and verifying the answer ------------------------------------------------------------


def _params(
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    min_new_tokens: int = 0,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
    }
    if min_new_tokens:  # on the wire only when set (docs/wire.md)
        params["min_new_tokens"] = min_new_tokens
    return params


def _read_answer(
    response: Any,
    sealed: envelope.SealedRequest,
    keys: envelope.SessionKeys,
    settings: ClientSettings,
    deadline: float,
) -> Iterator[_Chunk]:
    """The verified chunks of one answer, in order, the last one final; or a ChatError."""
    stream = sealed.header.stream
    if response.status != 200:
        raise _http_error(response, settings, deadline)
    if (response.headers.get("Content-Encoding") or "identity").lower() != "identity":
        raise ChatError(ErrorCode.ANSWER_INVALID, "answer arrived compressed")
    ctype = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype != (CONTENT_NDJSON if stream else CONTENT_JSON):
        raise ChatError(ErrorCode.ANSWER_INVALID, "answer has the wrong content type")

    if not stream:
        body = b"".join(_raw_pieces(response, settings.max_response_bytes, deadline))
        final, content = _open(keys, sealed, _json(body), 0)
        if not final:
            raise ChatError(ErrorCode.ANSWER_INVALID, "a whole answer must be one final chunk")
        yield _chunk(content, final=True)
        return

    lines = _lines(response, settings, deadline)
    seq = 0
    for line in lines:
        final, content = _open(keys, sealed, _json(line), seq)
        seq += 1
        if final:
            chunk = _chunk(content, final=True)
            # Nothing may follow the final chunk; checked before its text is handed out.
            if next(lines, None) is not None:
                raise ChatError(ErrorCode.ANSWER_INVALID, "data after the final chunk")
            yield chunk
            return
        yield _chunk(content, final=False)
    raise ChatError(ErrorCode.ANSWER_INVALID, "stream ended without a final chunk")


def _open(
    keys: envelope.SessionKeys, sealed: envelope.SealedRequest, obj: Any, seq: int
) -> tuple[bool, dict[str, Any]]:
    try:
        return envelope.open_answer(keys, sealed, obj, seq)
    except NitroError as exc:
        raise ChatError(ErrorCode.ANSWER_INVALID, exc.detail) from exc


def _chunk(content: dict[str, Any], final: bool) -> _Chunk:
    """Check an opened chunk's shape; a sealed error becomes its (authentic) ChatError."""
    if "error" in content:
        if not final or content.keys() != {"error"}:
            raise ChatError(ErrorCode.ANSWER_INVALID, "a sealed error must be the final chunk")
        code, message = error_from_wire(content)
        raise ChatError(code, "sealed error", server_message=message, authenticated=True)
    bad = ChatError(ErrorCode.ANSWER_INVALID, "answer chunk has the wrong shape")
    if content.keys() != (_FINAL_FIELDS if final else _CHUNK_FIELDS):
        raise bad
    text, tokens = content["text"], content["tokens"]
    if not isinstance(text, str) or not _count(tokens):
        raise bad
    if not final:
        return _Chunk(text, final=False, tokens=tokens)
    usage = content["usage"]
    if content["finish_reason"] not in _FINISH_REASONS or not isinstance(usage, dict):
        raise bad
    if usage.keys() != {"prompt_tokens", "completion_tokens"} or not all(
        _count(v) for v in usage.values()
    ):
        raise bad
    return _Chunk(
        text,
        final=True,
        tokens=tokens,
        finish_reason=content["finish_reason"],
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
    )


def _http_error(response: Any, settings: ClientSettings, deadline: float) -> ChatError:
    """A non-200 answer: its code from the untrusted body; its words kept aside for --verbose."""
    status = response.status
    try:
        body = b"".join(_raw_pieces(response, MAX_ERROR_BODY, deadline))
        obj = json.loads(body)
    # RecursionError: deeply nested arrays, which a hostile parent's body can hold.
    except (ChatError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        obj = None
    code, message = error_from_wire(obj)
    if obj is None or (code is ErrorCode.PROTOCOL_ERROR and not message):
        return ChatError(
            code,
            f"HTTP {status}",
            hint=f"The server answered HTTP {status} without a valid error body: is "
            f"{settings.proxy_url} a nitro-llm proxy?",
        )
    return ChatError(code, f"HTTP {status}", server_message=message)


def _raw_pieces(response: Any, limit: int, deadline: float) -> Iterator[bytes]:
    """The body's bytes as they arrive, at most `limit` in all, before `deadline`."""
    total = 0
    while True:
        try:
            piece = response.read1(_READ_STEP, decode_content=False)
        except urllib3.exceptions.ReadTimeoutError as exc:
            raise ChatError(ErrorCode.ENCLAVE_TIMEOUT, "answer stalled") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ChatError(ErrorCode.ANSWER_INVALID, "connection broke mid-answer") from exc
        if not piece:
            return
        total += len(piece)
        if total > limit:
            raise ChatError(ErrorCode.ANSWER_INVALID, "answer larger than the client accepts")
        if time.monotonic() > deadline:
            raise ChatError(ErrorCode.ENCLAVE_TIMEOUT, "answer took longer than the timeout")
        yield piece


def _lines(response: Any, settings: ClientSettings, deadline: float) -> Iterator[bytes]:
    """NDJSON lines as they arrive, each at most `max_line_bytes`."""
    buffer = bytearray()
    limit = settings.max_line_bytes
    for piece in _raw_pieces(response, settings.max_response_bytes, deadline):
        buffer += piece
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if len(line) > limit:
                raise ChatError(ErrorCode.ANSWER_INVALID, "answer line too long")
            yield line
        if len(buffer) > limit:
            raise ChatError(ErrorCode.ANSWER_INVALID, "answer line too long")
    if buffer:
        yield bytes(buffer)  # a last line without its newline; verification decides


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ChatError(ErrorCode.ANSWER_INVALID, "answer is not JSON") from exc


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- the client's own KMS call -------------------------------------------------------------------


def _generate_data_key(kms: Any, key_id: str, context: dict[str, str]) -> tuple[bytes, bytes]:
    """(plaintext, CiphertextBlob) of a fresh AES-256 data key bound to `context`."""
    from botocore import exceptions as boto_errors  # botocore comes with boto3

    try:
        reply = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)
    except boto_errors.ClientError as exc:
        aws_code = str(exc.response.get("Error", {}).get("Code", "unknown"))[:100]
        message = str(exc.response.get("Error", {}).get("Message", ""))
        raise ChatError(
            ErrorCode.KMS_ERROR,
            f"GenerateDataKey refused: {aws_code}",
            server_message=message,
            hint=f"{_KMS_HINT}: KMS answered {aws_code}. Check your credentials' permissions "
            "on the key, --key-id and --region.",
        ) from exc
    except (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError) as exc:
        raise ChatError(
            ErrorCode.KMS_ERROR,
            "no AWS credentials",
            hint=f"{_KMS_HINT}, but no AWS credentials were found. Configure them (environment, "
            "~/.aws/credentials or an instance role), or use --local.",
        ) from exc
    except (boto_errors.HTTPClientError, boto_errors.ConnectionError) as exc:
        raise ChatError(
            ErrorCode.KMS_UNAVAILABLE,
            "KMS unreachable from the client",
            hint=f"{_KMS_HINT}: KMS could not be reached ({type(exc).__name__}). Check the "
            "network, --region and the KMS endpoint.",
        ) from exc
    except boto_errors.BotoCoreError as exc:
        raise ChatError(
            ErrorCode.KMS_ERROR,
            f"GenerateDataKey failed: {type(exc).__name__}",
            hint=f"{_KMS_HINT}; it failed ({type(exc).__name__}).",
        ) from exc
    plaintext, edk = reply.get("Plaintext"), reply.get("CiphertextBlob")
    if not (isinstance(plaintext, bytes) and len(plaintext) == 32):
        raise ChatError(ErrorCode.KMS_ERROR, "GenerateDataKey returned no 32-byte key")
    if not (isinstance(edk, bytes) and 0 < len(edk) <= envelope.MAX_EDK):
        raise ChatError(ErrorCode.KMS_ERROR, "GenerateDataKey returned an unusable blob")
    return plaintext, edk


# ---- HTTP ----------------------------------------------------------------------------------------


def _connection_pool(settings: ClientSettings) -> urllib3.PoolManager:
    """Verified TLS only: the proxy's certificate must chain to `ca_bundle` (or the system's)."""
    return urllib3.PoolManager(
        num_pools=2,
        maxsize=2,
        cert_reqs="CERT_REQUIRED",
        ca_certs=settings.ca_bundle,
        retries=False,
    )


def _unreachable(settings: ClientSettings, exc: BaseException) -> ChatError:
    return ChatError(
        ErrorCode.ENCLAVE_UNAVAILABLE,
        "proxy unreachable",
        hint=f"Could not reach the proxy at {settings.proxy_url} ({_reason(exc)}). "
        "Is it running, and is the URL right?",
    )


def _not_http(exc: urllib3.exceptions.ProtocolError) -> bool:
    """The peer sent bytes that are not an HTTP response (not merely closed or reset)."""
    return any(
        isinstance(cause, http.client.HTTPException) and not isinstance(cause, OSError)
        for cause in exc.args
    )


def _reason(exc: BaseException) -> str:
    """A short description of a network failure for the hint line (no request data in it).

    Only type names for a ProtocolError: its text quotes what the server sent (a bad status
    line), and the parent must not put its words in a line the client prints as its own."""
    reason = getattr(exc, "reason", None)
    inner = reason if isinstance(reason, BaseException) else exc
    if isinstance(inner, urllib3.exceptions.ProtocolError):
        causes = [type(a).__name__ for a in inner.args if isinstance(a, BaseException)]
        return ", ".join([type(inner).__name__, *causes])
    return f"{type(inner).__name__}: {str(inner)[:200]}"
