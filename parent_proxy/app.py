"""The parent's HTTPS API (docs/wire.md sections 4-8): check size and shape, relay, stream back.

The proxy cannot read a question or an answer. It adds the parent role's own credentials, logs
ids, codes, sizes and timings (never bodies, headers or credentials) and answers every bad
input with a JSON error of its code.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from parent_proxy.config import ProxyConfig
from parent_proxy.credentials import CredentialSource, credential_source
from parent_proxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from parent_proxy.metrics import ProxyMetrics, caller_allowed
from parent_proxy.pool import EnclavePool
from parent_proxy.relay import EnclaveReply, RelayLimits
from protocol import envelope
from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.logs import Timer, event
from protocol.messages import CONTENT_JSON, CONTENT_NDJSON, Kind, RequestFrame
from protocol.ratelimit import RateLimited, RateLimiter

log = logging.getLogger("parent_proxy")
MAX_NONCE_BYTES = 64
_NONCE_HEX = re.compile(rf"(?:[0-9a-fA-F]{{2}}){{1,{MAX_NONCE_BYTES}}}")
_READ_STEP = 64 * 1024
# Once the body's deadline passed, each further socket read may wait only this long.
_EXPIRED_READ_TIMEOUT_S = 0.001
_HTTP_CODES = {
    400: ErrorCode.BAD_REQUEST,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    408: ErrorCode.REQUEST_TIMEOUT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def new_trace_id() -> str:
    """16 hex characters joining this proxy's log line and the enclave's for one request."""
    return secrets.token_hex(8)


@dataclass
class RequestRecord:
    """What the request's one log line says; filled while the request (and its stream) runs."""

    trace_id: str
    method: str
    path: str
    timer: Timer = field(default_factory=Timer)
    status: int = 0
    code: str | None = None
    detail: str | None = None  # NitroError details are content-free by contract
    request_bytes: int = 0
    response_bytes: int = 0
    logged: bool = False

    def write(self) -> None:
        if self.logged:
            return
        self.logged = True
        fields: dict[str, Any] = {
            "trace_id": self.trace_id,
            "method": self.method,
            "path": self.path,  # never the query string
            "status": self.status,
            "request_bytes": self.request_bytes,
            "response_bytes": self.response_bytes,
            "ms": self.timer.ms(),
        }
        if self.code is not None:
            fields["code"] = self.code
        if self.detail is not None:
            fields["detail"] = self.detail
        event(log, "request", **fields)


def create_app(config: ProxyConfig, credentials: CredentialSource | None = None) -> Flask:
    """The WSGI application; `credentials` defaults to the source the config names."""
    # root_path given: Flask's guess from the import name fails when the package is shadowed
    # by a namespace package (tests/parent_proxy/ on sys.path); the app serves no files anyway.
    app = Flask("parent_proxy", root_path=str(Path(__file__).parent))
    source = credentials or credential_source(config.credentials_file, config.imds_endpoint)
    relay_limits = RelayLimits(config.connect_timeout, config.relay_timeout, config.max_frame)
    ready_limits = RelayLimits(config.ready_timeout, config.ready_timeout, config.max_frame)
    # One pool per worker process; its health thread runs only with several enclaves.
    pool = EnclavePool(config.enclaves, ready_limits, config.health_interval).start()
    app.extensions["enclave_pool"] = pool
    attestation_limiter = RateLimiter(config.attestation_rate, config.attestation_burst)
    metrics = ProxyMetrics(config.enclaves, config.ready_timeout)

    @app.before_request
    def start_record() -> None:
        g.record = RequestRecord(new_trace_id(), request.method, request.path)

    @app.before_request
    def hide_metrics() -> None:
        # Before routing's own errors (405 would say the path exists), for every method.
        # By the TCP peer's address: the proxy is the TLS edge, no forwarded header is trusted.
        if request.path == "/metrics" and not caller_allowed(
            request.remote_addr, config.metrics_allow
        ):
            raise NotFound()

    @app.after_request
    def finish_record(response: Response) -> Response:
        record = _record()
        record.status = response.status_code
        if not response.is_streamed:
            record.response_bytes = response.calculate_content_length() or 0
        response.headers["X-Request-Id"] = record.trace_id
        # Logged when the server closes the response: after the last byte of a stream.
        response.call_on_close(record.write)
        response.call_on_close(lambda: metrics.observe(record))
        return response

    @app.errorhandler(NitroError)
    def on_nitro_error(exc: NitroError) -> Response:
        if isinstance(exc, RateLimited):
            response = error_response(exc)
            response.headers["Retry-After"] = exc.retry_after_header
            return response
        if exc.http_status < 500:
            return error_response(exc)  # which field was wrong helps whoever wrote the client
        # Our own trouble (credentials, the enclave): the detail goes to the log only.
        _record().detail = exc.detail
        return error_response(NitroError(exc.code))

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 400
        code = _HTTP_CODES.get(status, ErrorCode.BAD_REQUEST)
        response = error_response(NitroError(code), status)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        # Only the type: a message or traceback could quote what the request carried.
        event(
            log,
            "internal_error",
            logging.ERROR,
            trace_id=_record().trace_id,
            error=type(exc).__name__,
        )
        return error_response(NitroError(ErrorCode.INTERNAL_ERROR))

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        return Response(metrics.render(_record().trace_id), content_type=METRICS_CONTENT_TYPE)

    @app.get("/healthz")
    def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    def readyz() -> Response:
        # Ready while any enclave is (pool.ready_model asks those in rotation first).
        model, why, reason = pool.ready_model(_record().trace_id, ready_limits)
        if model is not None:
            return json_response({"ready": True, "model": model})
        _record().detail = reason  # the log keeps why (a code); the answer says only `why`
        return error_response(NitroError(why), 503)

    @app.post("/v1/chat")
    def chat() -> Response:
        if request.mimetype != CONTENT_JSON:
            raise NitroError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        body = parse_json_body(read_body(config.max_body, config.read_timeout))
        envelope.parse_request(body)  # shape only: the proxy cannot open it
        frame = RequestFrame(Kind.CHAT, _record().trace_id, credentials=source.get(), body=body)
        return relay_response(pool.relay(frame, relay_limits))

    @app.post("/")
    def legacy_v1() -> Response:
        """Protocol v1: the original sample's body. Its credentials are dropped here, unread."""
        if not config.compat_v1:
            raise NitroError(ErrorCode.LEGACY_DISABLED, "start the proxy with --compat-v1")
        if request.mimetype != CONTENT_JSON:
            raise NitroError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send application/json")
        body = {
            "ciphertext": legacy_ciphertext(
                parse_json_body(read_body(4 * _V1_CIPHERTEXT, config.read_timeout))
            )
        }
        frame = RequestFrame(Kind.LEGACY, _record().trace_id, credentials=source.get(), body=body)
        return relay_response(pool.relay(frame, relay_limits))

    @app.get("/v1/attestation")
    def attestation() -> Response:
        nonce = attestation_nonce()
        # By the peer's address: the proxy is the TLS edge, so no forwarded header is trusted.
        attestation_limiter.check(request.remote_addr or "-", "attestation requests")
        frame = RequestFrame(Kind.ATTESTATION, _record().trace_id, body={"nonce": nonce})
        return relay_response(pool.relay(frame, relay_limits))

    return app


# ---- responses ---------------------------------------------------------------------------------


def _record() -> RequestRecord:
    record = g.get("record")
    if record is None:  # an error raised before `start_record` ran
        record = g.record = RequestRecord(new_trace_id(), request.method, request.path)
    return record


def json_response(obj: dict[str, Any], status: int = 200) -> Response:
    return Response(json.dumps(obj, separators=(",", ":")), status, mimetype=CONTENT_JSON)


def error_response(error: NitroError, status: int | None = None) -> Response:
    _record().code = error.code.code
    return _with_retry_after(
        json_response(error.to_wire(), status or error.http_status), error.code
    )


# An overloaded enclave frees a slot within a few answers' time.
RETRY_AFTER_S = 1


def _with_retry_after(response: Response, code: ErrorCode) -> Response:
    if code in (ErrorCode.OVERLOADED, ErrorCode.RATE_LIMITED):  # the enclave's limit has no
        response.headers["Retry-After"] = str(RETRY_AFTER_S)  # wait in its frame: ask again soon
    return response


def relay_response(reply: EnclaveReply) -> Response:
    """The enclave's answer as an HTTP response: its error, one JSON object, or an NDJSON stream.

    The first body frame is read before the response starts, so that the common failures
    (a hang, garbage) still get their own status; later failures can only end the stream,
    which the client notices (no final chunk).
    """
    try:
        status = reply.status
        if status.error is not None:
            code, message = error_from_wire({"error": status.error})
            _record().code = code.code
            # As the enclave wrote it (sanitised): its own status, code and message.
            body = {"error": {"code": code.code, "message": message or code.client_text}}
            reply.close()
            http_status = 502 if code is ErrorCode.PROTOCOL_ERROR else status.status
            return _with_retry_after(json_response(body, http_status), code)
        frames = reply.frames()
        first_final, first = next(frames)
        if status.content_type == CONTENT_JSON:
            reply.close()
            if not first_final:
                raise NitroError(ErrorCode.PROTOCOL_ERROR, "a JSON answer is one final frame")
            return json_response(first, status.status)
    except BaseException:
        reply.close()
        raise

    record = _record()

    def stream() -> Iterator[bytes]:
        try:
            for data in _stream_data(first, first_final, frames):
                line = json.dumps(data, separators=(",", ":")).encode() + b"\n"
                record.response_bytes += len(line)
                yield line
        except NitroError as exc:
            record.code = exc.code.code
            event(
                log, "stream_broken", logging.WARNING, trace_id=record.trace_id, code=exc.code.code
            )
        finally:
            reply.close()

    response = Response(stream(), status.status, mimetype=CONTENT_NDJSON)
    # A client gone before the first chunk was written: the generator never started, so its
    # `finally` would not run; closing the response still closes the enclave connection.
    response.call_on_close(reply.close)
    return response


def _stream_data(
    first: dict[str, Any], first_final: bool, frames: Iterator[tuple[bool, dict[str, Any]]]
) -> Iterator[dict[str, Any]]:
    yield first
    if not first_final:
        for _final, data in frames:
            yield data


# ---- request checks ----------------------------------------------------------------------------


def attestation_nonce() -> str | None:
    """The `nonce` query parameter: hex of 1-64 bytes, or absent."""
    if set(request.args) - {"nonce"}:
        raise NitroError(ErrorCode.BAD_REQUEST, "the only query parameter is nonce")
    values = request.args.getlist("nonce")
    if not values:
        return None
    if len(values) > 1 or not _NONCE_HEX.fullmatch(values[0]):
        raise NitroError(ErrorCode.BAD_REQUEST, f"nonce must be hex of 1-{MAX_NONCE_BYTES} bytes")
    return values[0].lower()


_V1_FIELDS = frozenset({"access_key_id", "secret_access_key", "token", "region", "ciphertext"})
_V1_CIPHERTEXT = 8192  # base64 characters: a KMS blob of 4096 bytes of plaintext is under 6 KiB


def legacy_ciphertext(body: Any) -> str:
    """The ciphertext of a v1 body, checked for shape; every other field is dropped unread."""
    if not isinstance(body, dict) or set(body) != _V1_FIELDS:
        raise NitroError(ErrorCode.BAD_REQUEST, f"v1 takes exactly {', '.join(sorted(_V1_FIELDS))}")
    if not all(isinstance(value, str) for value in body.values()):
        raise NitroError(ErrorCode.BAD_REQUEST, "every v1 field is a string")
    ciphertext = body["ciphertext"]
    if not ciphertext:
        raise NitroError(ErrorCode.BAD_REQUEST, "ciphertext is empty")
    if len(ciphertext) > _V1_CIPHERTEXT:
        raise NitroError(ErrorCode.LEGACY_TOO_LARGE, "ciphertext over KMS's limit")
    return ciphertext


def parse_json_body(raw: bytes) -> Any:
    if not raw:
        raise NitroError(ErrorCode.BAD_REQUEST, "empty body")
    try:
        return json.loads(raw)
    # RecursionError: deeply nested arrays fit easily in the size limit.
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NitroError(ErrorCode.BAD_REQUEST, "body is not JSON") from exc


def read_body(max_body: int, read_timeout: float) -> bytes:
    """At most `max_body` bytes, all of which must arrive within `read_timeout` seconds.

    Content-Length is checked first; the read itself is bounded too, for a chunked body or a
    client that sends more than it declared.
    """
    record = _record()
    declared = request.content_length
    if declared is not None:
        record.request_bytes = declared
        if declared > max_body:
            raise NitroError(ErrorCode.PAYLOAD_TOO_LARGE, f"body over {max_body} bytes")
    stream = request.stream
    chunks: list[bytes] = []
    total = 0
    with BodyDeadline(request.environ.get("gunicorn.socket"), read_timeout) as deadline:
        try:
            while total <= max_body:
                deadline.check()
                piece = stream.read(min(_READ_STEP, max_body + 1 - total))
                if not piece:
                    break
                chunks.append(piece)
                total += len(piece)
                if declared is not None and total >= declared:
                    break  # complete: asking for more would only wait
        except NitroError:
            raise
        # The server's body readers raise many types for a short, stalled or malformed body
        # (timeouts, TLS and socket errors, chunk parse errors, werkzeug's ClientDisconnected).
        except Exception as exc:
            if deadline.expired or isinstance(exc, TimeoutError):
                raise NitroError(ErrorCode.REQUEST_TIMEOUT, "body not received in time") from exc
            raise NitroError(ErrorCode.BAD_REQUEST, "body could not be read") from exc
    record.request_bytes = total
    if total > max_body:
        raise NitroError(ErrorCode.PAYLOAD_TOO_LARGE, f"body over {max_body} bytes")
    return b"".join(chunks)


class BodyDeadline:
    """Bounds the whole body read, not just each socket read: a body sent one byte a second
    must fail too. Each read may wait at most `timeout`; when the deadline passes, a timer
    shrinks the socket's timeout so that the next read that has to wait fails at once.

    Without a socket (Flask's test client) only the checks between reads apply.
    """

    def __init__(self, sock: socket.socket | None, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._lock = threading.Lock()
        self._done = False
        self.expired = False
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._saved_timeout: float | None = None

    def __enter__(self) -> BodyDeadline:
        if self._sock is not None:
            self._saved_timeout = self._sock.gettimeout()
            self._sock.settimeout(self._timeout)
        self._timer.start()
        return self

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            if self._sock is not None:
                try:
                    self._sock.settimeout(_EXPIRED_READ_TIMEOUT_S)
                except OSError:
                    pass  # closed meanwhile: the read fails on its own

    def check(self) -> None:
        if self.expired:
            raise NitroError(ErrorCode.REQUEST_TIMEOUT, "body not received in time")

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._done = True
            self._timer.cancel()
            if self._sock is not None:
                try:  # the response is written on this socket next: give it back its timeout
                    self._sock.settimeout(self._saved_timeout)
                except OSError:
                    pass
