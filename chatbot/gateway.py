"""`chatbot serve`: a local OpenAI-compatible HTTP gateway that seals every request for the enclave.

Any OpenAI client (the `openai` libraries, curl, editors) speaks plain HTTP to this process on
loopback; it verifies the enclave before it listens, then forwards each request as protocol v2
through SecureChatClient (one conversation, so one data key, per request). It never writes a
question or an answer to disk or to its log: one JSON line per request with ids, codes and timings.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from protocol.errors import ErrorCode, NitroError
from protocol.logs import Timer, event
from protocol.messages import MAX_NEW_TOKENS_CAP, MAX_PROMPT_CHARS
from protocol.prompt import TURN_SEPARATOR, format_prompt
from protocol.transport import parse_host_port

log = logging.getLogger("gateway")

DEFAULT_MAX_CONCURRENCY = 4
# A prompt is at most MAX_PROMPT_CHARS characters; JSON escaping can make each one 6 bytes.
MAX_BODY_BYTES = 6 * MAX_PROMPT_CHARS + 64 * 1024
MAX_MESSAGES = 128
MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_STOP_CHARS = 256
MAX_API_KEY_BYTES = 4096
MIN_API_KEY_CHARS = 16
MAX_MODEL_ID_CHARS = 128
RETRY_AFTER_S = 2
# The request's socket: a client that stops sending or reading is dropped after this long.
SOCKET_TIMEOUT_S = 300
READY_WAIT_S = 60.0
MAX_READY_BYTES = 64 * 1024
# OpenAI's documented defaults, so that tools written for it behave as they expect.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16
SYSTEM_ROLES = ("system", "developer")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
OWNED_BY = "nitro-llm"
SSE_DONE = b"data: [DONE]\n\n"

# Parameters that change nothing here when left at OpenAI's default: refused otherwise.
_NEUTRAL = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
}
# Accepted and ignored: bookkeeping fields that do not change the answer.
_IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream"}
_COMMON |= {"stream_options", "presence_penalty", "frequency_penalty", "logprobs", "logit_bias"}
CHAT_FIELDS = _COMMON | _IGNORED | {"messages", "max_completion_tokens", "top_logprobs"}
CHAT_FIELDS |= {"tools", "functions", "tool_choice", "function_call", "parallel_tool_calls"}
CHAT_FIELDS |= {"response_format", "modalities"}
COMPLETION_FIELDS = _COMMON | _IGNORED | {"prompt", "echo", "suffix", "best_of"}
_MESSAGE_FIELDS = {"role", "content", "name"}
# The enclave's reason for ending -> OpenAI's. "cancelled" (the enclave stopped generating for
# a reason of its own) has no OpenAI name: the answer was cut short, which "length" tells.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "length"}


# ---- errors in OpenAI's format -----------------------------------------------------------------


class GatewayError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`; the text is ours."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None) -> GatewayError:
    """A 400 for a request parameter: OpenAI clients raise BadRequestError."""
    return GatewayError(400, ErrorCode.INVALID_PARAMETERS.code, message, param=param)


def error_type(status: int) -> str:
    """OpenAI's `type` for a status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def from_nitro(error: NitroError) -> GatewayError:
    """Our text for the code (never a server's words); a failed verification names its check."""
    code = error.code
    check = getattr(error, "check", None)
    if check:
        # The verifier's own words ("pcr0: PCR0 is ..."): the document's public values only.
        message = f"enclave verification failed: {error.detail or check}. {code.client_text}"
        return GatewayError(502, code.code, message)
    headers = {}
    if code.http_status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return GatewayError(code.http_status, code.code, code.client_text, headers=headers)


# ---- the chat template -------------------------------------------------------------------------


def chat_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt for OpenAI-style (role, text) messages, in the format the model was trained on.

    System (and developer) messages, in order, form a preamble paragraph. The other messages,
    with consecutive ones of one role joined by a newline, must alternate user, assistant, ...,
    user; each user message is a "Question:", each assistant message the "Answer:" after it, and
    the prompt ends with an open "Answer:" for the model to complete (protocol/prompt.py):

        <system text>

        Question: <user 1>
        Answer: <assistant 1>

        Question: <user 2>
        Answer:

    Raises ValueError, saying what is wrong, for a conversation that does not fit.
    """
    preamble = [text.strip() for role, text in messages if role in SYSTEM_ROLES and text.strip()]
    turns: list[list[str]] = []  # [role, text] with consecutive roles merged
    for role, text in messages:
        if role in SYSTEM_ROLES:
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"unsupported role {role!r}")
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user":
        raise ValueError("the last message (after any system messages) must be the user's")
    if turns[0][0] != "user":
        raise ValueError("an assistant message must follow a user message")
    if any(not text.strip() for role, text in turns if role == "user"):
        raise ValueError("a user message is empty")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    prompt = format_prompt(turns[-1][1], history)
    return TURN_SEPARATOR.join([*preamble, prompt])


# ---- request parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One request, checked: the prompt and how to generate and return its answer."""

    prompt: str = field(repr=False)
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...] = field(repr=False)
    stream: bool
    include_usage: bool

    def params(self) -> dict[str, Any]:
        """Keyword arguments of Conversation.complete."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


def parse_chat(body: Any) -> Generation:
    """A /v1/chat/completions body; GatewayError(400) naming the parameter otherwise."""
    body = _object(body, CHAT_FIELDS)
    messages = _messages(body.get("messages"))
    try:
        prompt = chat_prompt(messages)
    except ValueError as exc:
        raise invalid(str(exc), "messages") from exc
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), DEFAULT_CHAT_MAX_TOKENS)
    return _generation(body, prompt, max_tokens)


def parse_completion(body: Any) -> Generation:
    """A /v1/completions body (prompt: a string, or a list of one string)."""
    body = _object(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string (or a list of one string)", "prompt")
    if not prompt.strip():
        raise invalid("prompt is empty", "prompt")
    max_tokens = _max_tokens(body, ("max_tokens",), DEFAULT_COMPLETION_MAX_TOKENS)
    return _generation(body, prompt, max_tokens)


def _object(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    for name in sorted(body):
        if name not in allowed:
            raise invalid(f"unrecognized request argument: {name[:64]}", name[:64])
        if name in _NEUTRAL and body[name] not in _NEUTRAL[name]:
            raise invalid(f"{name} is not supported by this gateway", name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string", "model")
    if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
        raise invalid("n must be 1: one answer per request", "n")
    return body


def _messages(value: Any) -> list[tuple[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty list", "messages")
    if len(value) > MAX_MESSAGES:
        raise invalid(f"at most {MAX_MESSAGES} messages", "messages")
    out = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        unknown = message.keys() - _MESSAGE_FIELDS
        if unknown:
            name = sorted(unknown)[0][:64]
            raise invalid(f"{where}.{name} is not supported by this gateway", f"{where}.{name}")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise invalid(f"{where}.role must be system, developer, user or assistant", where)
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise invalid(f"{where}.name must be a string", f"{where}.name")
        text = _content(message.get("content"), f"{where}.content")
        out.append((role, text))
    return out


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (joined with newlines)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and value:
        parts = []
        for part in value:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or part.keys() != {"type", "text"}
                or not isinstance(part["text"], str)
            ):
                raise invalid(f"{where}: only text parts are supported", where)
            parts.append(part["text"])
        text = "\n".join(parts)
    else:
        raise invalid(f"{where} must be a string or a list of text parts", where)
    if len(text) > MAX_PROMPT_CHARS:
        raise GatewayError(
            400, ErrorCode.PROMPT_TOO_LONG.code, ErrorCode.PROMPT_TOO_LONG.client_text, param=where
        )
    return text


def _max_tokens(body: dict[str, Any], names: tuple[str, ...], default: int) -> int:
    given = [(name, body[name]) for name in names if body.get(name) is not None]
    if len({json.dumps(value) for _name, value in given}) > 1:
        raise invalid(f"{' and '.join(names)} disagree; give one", names[0])
    if not given:
        return default
    name, value = given[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer", name)
    if not 1 <= value <= MAX_NEW_TOKENS_CAP:
        raise invalid(f"{name} must be 1-{MAX_NEW_TOKENS_CAP}", name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise invalid(f"{name} must be a number from {low:g} to {high:g}", name)
    return float(value)


def _generation(body: dict[str, Any], prompt: str, max_tokens: int) -> Generation:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise GatewayError(
            400, ErrorCode.PROMPT_TOO_LONG.code, ErrorCode.PROMPT_TOO_LONG.client_text
        )
    temperature = _number(body, "temperature", 0.0, 2.0, DEFAULT_TEMPERATURE)
    top_p = _number(body, "top_p", 0.0, 1.0, DEFAULT_TOP_P)
    if top_p == 0.0:
        raise invalid("top_p must be above 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63
    ):
        raise invalid("seed must be a non-negative 63-bit integer", "seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise invalid(
            f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters",
            "stop",
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or options.keys() - {"include_usage"}:
            raise invalid("stream_options takes only include_usage", "stream_options")
        include_usage = options.get("include_usage") is True
    return Generation(
        prompt=prompt,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=tuple(stops),
        stream=bool(stream),
        include_usage=include_usage,
    )


# ---- reading the answer ------------------------------------------------------------------------


class StopScanner:
    """Cuts text at the first stop sequence, holding back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(the text that can be shown now, whether a stop sequence was found)."""
        buffer = self._held + text
        found = [i for i in (buffer.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self._held = ""
            return buffer[: min(found)], True
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:size]):
                    hold = size
                    break
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The held tail, once the answer ended without a stop sequence."""
        held, self._held = self._held, ""
        return held


class AnswerStream:
    """The answer's text as the enclave's verified chunks arrive, cut at the first stop sequence
    (which cancels the rest: the connection to the proxy is dropped and the enclave stops).

    `chunks` yields (text, tokens, Answer or None) as Conversation.complete does. Once iterated
    to the end: `finish_reason` ("stop" or "length") and the usage counts. When a stop sequence
    cancelled the answer, the enclave's final chunk (the only one carrying the prompt's token
    count) never came: `prompt_tokens` is then 0 and `completion_tokens` counts the tokens the
    enclave had sent.
    """

    def __init__(
        self, chunks: Iterator[tuple[str, int, Any]], stop: Sequence[str], lstrip: bool
    ) -> None:
        self._chunks = chunks
        self._scanner = StopScanner(stop)
        self._lstrip = lstrip
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_text_ms: float | None = None
        self._timer = Timer()

    def __iter__(self) -> Iterator[str]:
        try:
            for text, tokens, answer in self._chunks:
                self.completion_tokens += tokens
                if answer is not None:
                    self.prompt_tokens = answer.prompt_tokens
                    self.completion_tokens = answer.completion_tokens
                if self._lstrip:  # a chat answer starts after "Answer: ", not with its space
                    text = text.lstrip()
                    self._lstrip = not text
                piece, stopped = self._scanner.feed(text)
                if not stopped and answer is not None:
                    piece += self._scanner.flush()
                if piece:
                    if self.first_text_ms is None:
                        self.first_text_ms = self._timer.ms()
                    yield piece
                if stopped:
                    self.finish_reason = "stop"
                    return
                if answer is not None:
                    self.finish_reason = FINISH_REASONS.get(answer.finish_reason, "length")
                    return
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()  # before the final chunk: drops the connection, cancelling the answer

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# ---- the application ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayConfig:
    """What the app serves: the verified enclave's identity, the API key, the bounds."""

    model_id: str
    pcrs: Mapping[int, str]  # verified, hex
    key_policy_checked: bool
    api_key: str | None = field(default=None, repr=False)
    # Host header names accepted (None: any); on loopback, the loopback names only.
    allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES
    max_body_bytes: int = MAX_BODY_BYTES
    retry_after_s: int = RETRY_AFTER_S
    created: int = field(default_factory=lambda: int(time.time()))


class ClientPool:
    """At most one request at a time per SecureChatClient (they are not for concurrent threads);
    the number of clients bounds the requests in flight."""

    def __init__(self, clients: Sequence[Any]) -> None:
        if not clients:
            raise ValueError("the pool needs a client")
        self._free = list(clients)
        self._lock = threading.Lock()

    def acquire(self) -> Any | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def release(self, client: Any) -> None:
        with self._lock:
            self._free.append(client)


@dataclass
class RequestRecord:
    """The request's one log line: ids, status, code, sizes and timings, never content."""

    request_id: str
    method: str
    path: str
    timer: Timer = field(default_factory=Timer)
    status: int = 0
    code: str | None = None
    stream: bool | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_text_ms: float | None = None
    logged: bool = False

    def write(self) -> None:
        if self.logged:
            return
        self.logged = True
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "code": self.code,
            "stream": self.stream,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "first_text_ms": self.first_text_ms,
            "ms": self.timer.ms(),
        }
        event(log, "request", **{k: v for k, v in fields.items() if v is not None})


def create_app(config: GatewayConfig, clients: Sequence[Any]) -> Any:
    """The WSGI application. `clients`: SecureChatClient objects (verified, or verifying on
    first use), each serving one request at a time."""
    from flask import Flask, Response, g, request
    from werkzeug.exceptions import HTTPException

    app = Flask("chatbot.gateway", root_path=str(Path(__file__).parent))
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    pool = ClientPool(clients)

    def record() -> RequestRecord:
        if "record" not in g:
            g.record = RequestRecord(_new_id(""), request.method, request.path)
        return g.record

    def error_response(error: GatewayError) -> Response:
        record().code = error.code
        response = Response(json.dumps(error.body()), error.status, mimetype="application/json")
        for name, value in error.headers.items():
            response.headers[name] = value
        return response

    @app.before_request
    def start() -> Response | None:
        g.record = RequestRecord(_new_id(""), request.method, request.path)
        if (
            config.allowed_hosts is not None
            and _host_name(request.host) not in config.allowed_hosts
        ):
            # A DNS-rebinding page reaches 127.0.0.1 under its own name: refuse other names.
            code = ErrorCode.BAD_REQUEST
            return error_response(
                GatewayError(400, code.code, "The Host header must name this machine.")
            )
        if config.api_key is not None and not _authorized(request.headers, config.api_key):
            error = GatewayError(
                401,
                ErrorCode.UNAUTHORIZED.code,
                "The API key is missing or wrong: send `Authorization: Bearer <key>` with the "
                "key in the gateway's --api-key-file.",
                headers={"WWW-Authenticate": 'Bearer realm="chatbot serve"'},
            )
            return error_response(error)
        return None

    @app.after_request
    def finish(response: Response) -> Response:
        entry = record()
        entry.status = response.status_code
        response.headers["X-Request-Id"] = entry.request_id
        # Written when the server closes the response: after the last byte of a stream.
        response.call_on_close(entry.write)
        return response

    @app.errorhandler(GatewayError)
    def on_gateway_error(exc: GatewayError) -> Response:
        return error_response(exc)

    @app.errorhandler(NitroError)
    def on_nitro_error(exc: NitroError) -> Response:
        return error_response(from_nitro(exc))

    @app.errorhandler(HTTPException)
    def on_http_error(exc: HTTPException) -> Response:
        status = exc.code or 400
        code = {
            404: ErrorCode.NOT_FOUND,
            405: ErrorCode.METHOD_NOT_ALLOWED,
            413: ErrorCode.PAYLOAD_TOO_LARGE,
        }.get(status, ErrorCode.BAD_REQUEST)
        text = code.client_text
        if status == 404:
            text = "There is no such endpoint: this gateway serves /v1/chat/completions, "
            text += "/v1/completions and /v1/models."
        if status == 413:
            text = f"The request body is larger than {config.max_body_bytes} bytes."
        return error_response(GatewayError(status, code.code, text))

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        # The type only: a message or a traceback could quote the request.
        entry = record()
        event(
            log,
            "internal_error",
            logging.ERROR,
            request_id=entry.request_id,
            error=type(exc).__name__,
        )
        code = ErrorCode.INTERNAL_ERROR
        return error_response(GatewayError(500, code.code, code.client_text))

    def model_object() -> dict[str, Any]:
        return {
            "id": config.model_id,
            "object": "model",
            "created": config.created,
            "owned_by": OWNED_BY,
            "metadata": {
                "pcr0": config.pcrs.get(0),
                "pcrs": {f"PCR{i}": value for i, value in sorted(config.pcrs.items())},
                "attestation": "verified",
                "key_policy_checked": config.key_policy_checked,
            },
        }

    @app.get("/v1/models")
    def list_models() -> Response:
        return _json_response({"object": "list", "data": [model_object()]})

    @app.get("/v1/models/<path:model>")
    def get_model(model: str) -> Response:
        if model != config.model_id:
            raise GatewayError(
                404, "model_not_found", "There is no such model here.", param="model"
            )
        return _json_response(model_object())

    def body_json() -> Any:
        # JSON only: a web page cannot send it cross-origin without a CORS preflight, which
        # this gateway never grants, so a site the user visits cannot ask in their name.
        if request.mimetype != "application/json":
            code = ErrorCode.UNSUPPORTED_MEDIA_TYPE
            raise GatewayError(415, code.code, code.client_text)
        data = request.get_data(cache=False)  # bounded by MAX_CONTENT_LENGTH (413)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise invalid("the request body is not JSON", None) from exc

    def answer(generation: Generation, kind: str) -> Response:
        entry = record()
        entry.stream = generation.stream
        client = pool.acquire()
        if client is None:
            code = ErrorCode.OVERLOADED
            raise GatewayError(
                503,
                code.code,
                code.client_text,
                headers={"Retry-After": str(config.retry_after_s)},
            )
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                pool.release(client)

        try:
            chunks = client.conversation().complete(
                generation.prompt, stream=True, **generation.params()
            )
            reader = AnswerStream(chunks, generation.stop, lstrip=kind == "chat")
            pieces = iter(reader)
            # Read up to the first text (or the end) here, so that an error before any output
            # is answered with its own HTTP status rather than inside a 200 stream.
            first = next(pieces, None)
        except BaseException:
            release()
            raise
        reply = _Reply(kind, config.model_id, config.pcrs.get(0))

        def done() -> None:
            entry.finish_reason = reader.finish_reason
            entry.prompt_tokens = reader.prompt_tokens
            entry.completion_tokens = reader.completion_tokens
            entry.first_text_ms = reader.first_text_ms

        if not generation.stream:
            try:
                text = (first or "") + "".join(pieces)
            finally:
                pieces.close()
                release()
            done()
            return _json_response(reply.whole(text, reader.finish_reason, reader.usage))

        def events() -> Iterator[bytes]:
            try:
                yield sse(reply.start())
                if first:
                    yield sse(reply.piece(first))
                for piece in pieces:
                    yield sse(reply.piece(piece))
                yield sse(reply.end(reader.finish_reason))
                if generation.include_usage:
                    yield sse(reply.usage(reader.usage))
                yield SSE_DONE
            except NitroError as exc:
                # Headers are sent: the error goes in the stream, as OpenAI does.
                error = from_nitro(exc)
                entry.code = error.code
                yield sse(error.body())
            except Exception as exc:
                # The type only: a message or a traceback could quote the request.
                failure = type(exc).__name__
                event(
                    log, "internal_error", logging.ERROR, request_id=entry.request_id, error=failure
                )
                code = ErrorCode.INTERNAL_ERROR
                entry.code = code.code
                yield sse(GatewayError(500, code.code, code.client_text).body())
            finally:
                pieces.close()
                done()
                release()

        response = Response(events(), 200, mimetype="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        # The generator's `finally` does not run if it never started (the client left first).
        response.call_on_close(pieces.close)
        response.call_on_close(release)
        return response

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return answer(parse_chat(body_json()), "chat")

    @app.post("/v1/completions")
    def completions() -> Response:
        return answer(parse_completion(body_json()), "text")

    return app


class _Reply:
    """OpenAI's response objects for one request: chat.completion(.chunk) or text_completion."""

    def __init__(self, kind: str, model: str, pcr0: str | None) -> None:
        self.kind = kind
        self.id = _new_id("chatcmpl-" if kind == "chat" else "cmpl-")
        self.created = int(time.time())
        self.model = model
        self.fingerprint = f"pcr0-{pcr0[:16]}" if pcr0 else None

    def _base(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def whole(self, text: str, finish: str | None, usage: dict[str, int]) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
            out = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text}
            out = self._base("text_completion")
        choice.update(logprobs=None, finish_reason=finish)
        return {**out, "choices": [choice], "usage": usage}

    def _chunk(self, delta: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta is not None:
                message["content"] = delta
            choice: dict[str, Any] = {"index": 0, "delta": message}
            out = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": delta or ""}
            out = self._base("text_completion")
        choice.update(logprobs=None, finish_reason=finish)
        return {**out, "choices": [choice]}

    def start(self) -> dict[str, Any]:
        return self._chunk(None, None, first=True)

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def end(self, finish: str | None) -> dict[str, Any]:
        return self._chunk(None, finish or "stop")

    def usage(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage}


def _json_response(obj: Mapping[str, Any], status: int = 200) -> Any:
    from flask import Response

    return Response(json.dumps(obj, separators=(",", ":")), status, mimetype="application/json")


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _host_name(host: str) -> str:
    """The name in a Host header, without its port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


def _authorized(headers: Mapping[str, str], api_key: str) -> bool:
    value = headers.get("Authorization") or ""
    scheme, _, token = value.partition(" ")
    # Compared in constant time, as bytes (compare_digest refuses non-ASCII str).
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )


# ---- starting: options, verification, the server -----------------------------------------------


class GatewayConfigError(Exception):
    """`chatbot serve` cannot start as asked (the text says why and what to do)."""


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); port 0 picks a free one."""
    try:
        return parse_host_port(text)
    except ValueError as exc:
        raise GatewayConfigError(f"--listen {exc}") from None


def check_listen(listen: str, api_key: str | None) -> tuple[str, int]:
    """(host, port) of --listen; a host that is not loopback needs an API key."""
    host, port = parse_listen(listen)
    if not is_loopback(host) and api_key is None:
        raise GatewayConfigError(
            f"refusing to listen on {host}, which is not a loopback address, without "
            "--api-key-file: anyone who can reach it could ask in your name"
        )
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | Path) -> str:
    """The key in FILE (surrounding whitespace ignored): printable ASCII, 16 characters or more."""
    try:
        with Path(path).open("rb") as handle:
            raw = handle.read(MAX_API_KEY_BYTES + 1)
    except OSError as exc:
        raise GatewayConfigError(
            f"cannot read the API key file {path}: {exc.strerror or type(exc).__name__}"
        ) from exc
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        key = ""
    if len(raw) > MAX_API_KEY_BYTES or not key.isprintable() or " " in key:
        raise GatewayConfigError(f"{path} must hold one API key: printable ASCII, no spaces")
    if len(key) < MIN_API_KEY_CHARS:
        raise GatewayConfigError(
            f"the API key in {path} is shorter than {MIN_API_KEY_CHARS} characters; "
            "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return key


@dataclass(frozen=True)
class Verified:
    """What `verify_before_serving` established about the enclave behind the proxy."""

    pcrs: dict[int, bytes]
    key_policy_checked: bool
    pinned_on_first_use: bool
    warnings: tuple[str, ...]


def verify_before_serving(
    new_client: Callable[[Mapping[int, bytes]], Any],
    probe: Any,
    *,
    root: bytes,
    expected: Mapping[int, bytes] | None,
    allow_debug: bool,
) -> tuple[Any, Verified]:
    """Verify the enclave (attestation, then the key policy where readable) and return the first
    client, verified, with what was checked. Raises AttestationError or KeyPolicyError (`check`
    names the failed check).

    Without `expected`, the document must still chain to `root`, be fresh, signed, and not in
    debug mode (unless allowed); its PCR0-2 are then pinned for this gateway's life (trust on
    first use) and the key policy is checked against them."""
    from chatbot.verify import EnclaveExpectation, verify_enclave

    pinned = expected is None
    if expected is None:
        first_look = verify_enclave(
            probe._fetch_attestation,
            EnclaveExpectation(root=root, pcrs={}, allow_debug=allow_debug, check_key_policy=False),
        )
        expected = {i: first_look.document.pcrs[i] for i in (0, 1, 2)}
    client = new_client(expected)
    verified = client.verify_enclave()
    warnings = list(verified.warnings)
    if pinned:
        warnings.append(
            "no --expected-pcrs: the enclave's PCR0-2 were pinned as it presented them (trust on "
            "first use); pass --expected-pcrs to check them against a known measurement"
        )
    pcrs = {i: verified.document.pcrs[i] for i in sorted(verified.document.pcrs) if i in expected}
    if 0 not in pcrs:
        pcrs[0] = verified.document.pcrs[0]
    return client, Verified(pcrs, verified.key_policy_checked, pinned, tuple(warnings))


def enclave_model(settings: Any, wait_s: float = READY_WAIT_S) -> str:
    """The model the enclave reports on the proxy's /readyz, waiting while it loads. Not
    attested (the proxy could lie about the name); the model's files are measured in PCR2."""
    import urllib3

    http = urllib3.PoolManager(
        cert_reqs="CERT_REQUIRED", ca_certs=settings.ca_bundle, retries=False
    )
    url = settings.proxy_url.rstrip("/") + "/readyz"
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                response = http.request(
                    "GET",
                    url,
                    timeout=urllib3.Timeout(connect=10, read=30),
                    redirect=False,
                    preload_content=False,
                )
                try:
                    body = response.read(MAX_READY_BYTES, decode_content=False)
                finally:
                    response.release_conn()
                obj = json.loads(body) if response.status == 200 else None
            except (urllib3.exceptions.HTTPError, OSError, ValueError, RecursionError):
                obj = None
            model = obj.get("model") if isinstance(obj, dict) and obj.get("ready") else None
            if isinstance(model, str) and model:
                shown = "".join(ch for ch in model if ch.isprintable() and not ch.isspace())
                return shown[:MAX_MODEL_ID_CHARS] or "unknown"
            if time.monotonic() > deadline:
                raise NitroError(ErrorCode.NOT_READY, "the enclave never reported ready")
            time.sleep(1.0)
    finally:
        http.clear()


def serve(
    new_client: Callable[[Mapping[int, bytes] | None], Any],
    *,
    root: bytes,
    expected: Mapping[int, bytes] | None,
    allow_debug: bool,
    listen: str,
    api_key: str | None,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    out: TextIO,
) -> int:
    """Verify the enclave, then serve until SIGINT or SIGTERM. `new_client(pcrs)`: a
    SecureChatClient expecting those PCRs (None: expecting nothing). Returns the exit code."""
    from protocol.logs import configure

    host, port = check_listen(listen, api_key)
    try:
        import flask  # noqa: F401  (create_app's)
        from werkzeug.serving import WSGIRequestHandler, make_server
    except ImportError as exc:
        raise GatewayConfigError(
            "`chatbot serve` needs Flask: pip install 'flask>=3' (or nitro-llm[parent])"
        ) from exc
    if not 1 <= max_concurrency <= 64:
        raise GatewayConfigError("--max-concurrency must be 1-64")
    configure("gateway")
    probe = new_client(None)
    try:
        first, verified = verify_before_serving(
            new_client, probe, root=root, expected=expected, allow_debug=allow_debug
        )
    finally:
        probe.close()
    for warning in verified.warnings:
        print(f"warning: {warning}", file=out)
    model = enclave_model(first.settings)
    clients = [first] + [new_client(verified.pcrs) for _ in range(max_concurrency - 1)]
    config = GatewayConfig(
        model_id=model,
        pcrs={i: v.hex() for i, v in verified.pcrs.items()},
        key_policy_checked=verified.key_policy_checked,
        api_key=api_key,
        # 127.0.0.2 and the like are loopback too: when listening there, accept its own name.
        allowed_hosts=LOOPBACK_NAMES | {host.lower()} if is_loopback(host) else None,
    )
    app = create_app(config, clients)

    class Handler(WSGIRequestHandler):
        timeout = SOCKET_TIMEOUT_S

        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass  # the app writes its own line per request

        def log(self, kind: str, message: str, *args: Any) -> None:
            # werkzeug's own lines quote the raw request line or a traceback's text, either of
            # which can carry what a tool sent: the level only.
            event(log, "http_server_message", logging.WARNING, level=kind)

    try:
        server = make_server(host, port, app, threaded=True, request_handler=Handler)
    except OSError as exc:  # in use, or not an address of this machine
        reason = exc.strerror or type(exc).__name__
        raise GatewayConfigError(f"cannot listen on {listen}: {reason}") from exc
    shown_host = f"[{host}]" if ":" in host else host
    checked = ", ".join(f"PCR{i}" for i in sorted(verified.pcrs))
    print(
        f"enclave verified: {checked} {'pinned' if verified.pinned_on_first_use else 'as expected'}"
        f", PCR0 {config.pcrs[0][:16]}...; key policy "
        f"{'checked' if verified.key_policy_checked else 'not checked'}",
        file=out,
    )
    if not is_loopback(host):
        print(
            "warning: not loopback: requests and answers cross the network in plain HTTP "
            "between your tools and this gateway; use it only on a network you trust",
            file=out,
        )
    print(
        f"listening on http://{shown_host}:{server.server_port}/v1 (model {model}; "
        f"{'API key required' if api_key else 'no API key'}; Ctrl-C to stop)",
        file=out,
        flush=True,
    )

    def stop(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        for client in clients:
            client.close()
    print("stopped", file=out, flush=True)
    return 0
