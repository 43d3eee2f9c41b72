"""A malicious parent: an HTTPS server where the proxy sits, in front of the real enclave.

The real chatbot client talks HTTPS to it; it talks the real frames (protocol/framing.py) to the
real enclave server, and between the two it plays one named mischief. It never logs a byte.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from protocol.framing import encode_frame, recv_json
from protocol.messages import (
    CONTENT_JSON,
    CONTENT_NDJSON,
    Credentials,
    Kind,
    RequestFrame,
    Status,
    parse_body_frame,
)
from protocol.transport import Address

MAX_BODY = 1 << 20
ENCLAVE_TIMEOUT_S = 60.0
MAX_HOLD_S = 30.0


# ---- the enclave side: real frames over the real socket ----------------------------------------


@dataclass
class Reply:
    """What the enclave answered on one connection: its status frame and its body frames' data."""

    trace_id: str
    status: int
    content_type: str
    error: dict[str, Any] | None
    bodies: list[dict[str, Any]]


class Enclave:
    """The real enclave server, reached as the proxy reaches it, with the parent's credentials."""

    def __init__(self, address: Address, credentials: Credentials) -> None:
        self.address = address
        self.credentials = credentials
        self.wire: list[bytes] = []  # every byte sent to and received from the enclave
        self._lock = threading.Lock()

    def frame(self, kind: Kind, body: dict[str, Any] | None) -> dict[str, Any]:
        """A request frame as the honest proxy writes it, with a fresh trace id."""
        credentials = self.credentials if kind is Kind.CHAT else None
        return RequestFrame(kind, new_trace_id(), credentials, body).to_json()

    def chat(self, body: Any) -> Reply:
        return self.send(self.frame(Kind.CHAT, body))

    def attest(self, body: dict[str, Any] | None) -> Reply:
        return self.send(self.frame(Kind.ATTESTATION, body))

    def send(self, frame: dict[str, Any]) -> Reply:
        payload = json.dumps(frame, separators=(",", ":")).encode()
        return self.send_raw(encode_frame(payload), str(frame.get("trace_id", "-")))

    def send_raw(self, data: bytes, trace_id: str = "-", *, half_close: bool = False) -> Reply:
        """Write `data` as it is (lying lengths included) and read the whole answer.

        `half_close` ends the sending side after `data`: an honest relay never does (the
        enclave takes a closed connection for a client gone, and stops generating)."""
        with self.address.connect(timeout=ENCLAVE_TIMEOUT_S) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            self._capture(data)
            raw = recv_json(sock, timeout=ENCLAVE_TIMEOUT_S)
            self._capture(json.dumps(raw).encode())
            status = Status.from_json(raw)
            bodies: list[dict[str, Any]] = []
            while status.status == 200:
                raw = recv_json(sock, timeout=ENCLAVE_TIMEOUT_S)
                self._capture(json.dumps(raw).encode())
                final, data_obj = parse_body_frame(raw)
                bodies.append(data_obj)
                if final:
                    break
        return Reply(trace_id, status.status, status.content_type, status.error, bodies)

    def _capture(self, data: bytes) -> None:
        # The parent's own secret key is no secret from the parent, but needs no copy on disk.
        secret = self.credentials.secret_access_key.encode()
        with self._lock:
            self.wire.append(bytes(data).replace(secret, b"<parent-secret>"))


def new_trace_id() -> str:
    return "adv-" + os.urandom(6).hex()


def lying_frame(payload: bytes, declared: int) -> bytes:
    """A frame whose 4-byte length says `declared`, followed by `payload` as it is."""
    return struct.pack(">I", declared) + payload


# ---- the client side: HTTP as the proxy would speak it, or not ---------------------------------


@dataclass(frozen=True)
class Incoming:
    """One request from the client, as the relay received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def nonce(self) -> str | None:
        values = self.query.get("nonce")
        return values[0] if values else None


@dataclass
class HttpAnswer:
    """What the relay writes back. `content_length`: the length it declares (None: the truth).
    `raw`: the whole response, status line and all, written as it is instead.
    `hold_s`: how long to keep the connection open, silent, after the last byte written (the
    end of the mischief's block cuts it short)."""

    status: int = 200
    content_type: str | None = CONTENT_JSON
    body: bytes = b""
    content_length: int | None = None
    reason: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes | None = None
    hold_s: float = 0.0

    @classmethod
    def of_json(cls, obj: Any, status: int = 200) -> HttpAnswer:
        return cls(status, CONTENT_JSON, json.dumps(obj, separators=(",", ":")).encode())

    @classmethod
    def of_lines(cls, objects: list[Any]) -> HttpAnswer:
        lines = b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objects)
        return cls(200, CONTENT_NDJSON, lines)

    @classmethod
    def error(cls, status: int, code: str, message: str) -> HttpAnswer:
        return cls.of_json({"error": {"code": code, "message": message}}, status)


def rendered(reply: Reply) -> HttpAnswer:
    """The enclave's answer as the honest proxy would write it."""
    if reply.error is not None:
        return HttpAnswer.of_json({"error": reply.error}, reply.status)
    if reply.content_type == CONTENT_JSON:
        return HttpAnswer.of_json(reply.bodies[0], reply.status)
    return HttpAnswer.of_lines(reply.bodies)


def attestation_body(incoming: Incoming) -> dict[str, Any]:
    return {"nonce": incoming.nonce}


def honest(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    """What the real proxy does: relay, unchanged."""
    if incoming.path == "/v1/chat":
        return rendered(enclave.chat(incoming.json()))
    if incoming.path == "/v1/attestation":
        return rendered(enclave.attest(attestation_body(incoming)))
    return HttpAnswer.error(404, "not_found", "no such endpoint")


Mischief = Callable[[Incoming, Enclave], HttpAnswer]


def on_chat(mischief: Mischief) -> Mischief:
    """`mischief` for chat requests; attestation requests relayed honestly."""

    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        if incoming.path != "/v1/chat":
            return honest(incoming, enclave)
        return mischief(incoming, enclave)

    return play


class MaliciousRelay:
    """An HTTPS server (TLS with the certificate the parent holds) playing `mischief`."""

    def __init__(self, enclave: Enclave, certfile: str, keyfile: str) -> None:
        self.enclave = enclave
        self.mischief: Mischief = honest
        self.requests: list[Incoming] = []
        self.failures: list[str] = []  # exceptions raised by a mischief: a broken test, not a pass
        self.wire: list[bytes] = []  # every byte the client sent and the relay answered
        self._lock = threading.Lock()
        self._release = threading.Event()  # ends every hold
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.relay = self
        # The handshake happens in each request's thread, not in the accept loop.
        self._server.socket = context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @contextlib.contextmanager
    def playing(self, mischief: Mischief) -> Iterator[MaliciousRelay]:
        """Play `mischief` inside the block; honest again after it (whatever happened)."""
        with self._lock:
            self.requests.clear()
            self.failures.clear()
        self._release.clear()
        self.mischief = mischief
        try:
            yield self
        finally:
            self.mischief = honest
            self._release.set()

    def chats(self) -> list[Incoming]:
        return [r for r in self.requests if r.path == "/v1/chat"]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _received(self, incoming: Incoming) -> None:
        with self._lock:
            self.requests.append(incoming)
            self.wire.append(incoming.body)

    def _sent(self, data: bytes) -> None:
        with self._lock:
            self.wire.append(data)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.failures.append(f"{type(exc).__name__}: {exc}")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    relay: MaliciousRelay


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self._relay()

    def do_POST(self) -> None:  # noqa: N802
        self._relay()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass  # never log: a path carries a nonce, and nothing here needs a record

    def _relay(self) -> None:
        relay = self.server.relay
        length = min(int(self.headers.get("Content-Length") or 0), MAX_BODY)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        incoming = Incoming(self.command, split.path, parse_qs(split.query), body)
        relay._received(incoming)
        try:
            answer = relay.mischief(incoming, relay.enclave)
        except Exception as exc:
            relay._failed(exc)
            answer = HttpAnswer.error(500, "internal_error", "the relay's mischief failed")
        self.close_connection = True
        try:
            self._write(answer)
        except OSError:
            return  # the client gave up first (a timeout case): nothing left to tell it
        if answer.hold_s:
            relay._release.wait(min(answer.hold_s, MAX_HOLD_S))

    def _write(self, answer: HttpAnswer) -> None:
        relay = self.server.relay
        if answer.raw is not None:
            relay._sent(answer.raw)
            self.wfile.write(answer.raw)
            self.wfile.flush()
            return
        self.send_response(answer.status, answer.reason)
        if answer.content_type is not None:
            self.send_header("Content-Type", answer.content_type)
        declared = len(answer.body) if answer.content_length is None else answer.content_length
        self.send_header("Content-Length", str(declared))
        for name, value in answer.headers:
            self.send_header(name, value)
        self.send_header("Connection", "close")
        self.end_headers()
        relay._sent(answer.body)
        self.wfile.write(answer.body)
        self.wfile.flush()


# ---- small tools for mischief ------------------------------------------------------------------


def flip_b64(text: str, index: int = 0) -> str:
    """Standard base64 of the same bytes with one bit of byte `index` flipped."""
    raw = bytearray(base64.b64decode(text))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def flip_b64url(text: str, index: int = 0) -> str:
    """Canonical unpadded base64url of the same bytes with one bit of byte `index` flipped."""
    raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    raw[index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def flip_text(text: str, index: int = 0) -> str:
    """The same text with one bit of character `index` flipped (ASCII stays ASCII)."""
    return text[:index] + chr(ord(text[index]) ^ 0x01) + text[index + 1 :]


class Rendezvous:
    """Holds two concurrent requests until both arrived (bounded), then lets each go on."""

    def __init__(self) -> None:
        self._barrier = threading.Barrier(2, timeout=60)
        self._lock = threading.Lock()
        self._items: dict[int, Any] = {}

    def meet(self, item: Any) -> tuple[int, Any]:
        """This request's place (0 or 1) and what the other one brought."""
        with self._lock:
            place = len(self._items)
            self._items[place] = item
        self._barrier.wait()
        return place, self._items[1 - place]
