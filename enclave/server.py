"""The enclave's server: one connection per request from the parent, frames as docs/wire.md says.

It refuses what the parent cannot be trusted with (key ids, contexts, tags, replays), obtains
the data key by attestation, runs the model and seals every answer for the client alone.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from enclave import legacy
from enclave.boot import Identity
from enclave.config import EnclaveConfig
from enclave.engine import Engine, GenerationParams
from enclave.kms import AttestedKms
from enclave.metrics import EnclaveMetrics
from enclave.nsm import Nsm, get_attestation
from protocol import envelope
from protocol.errors import ErrorCode, NitroError
from protocol.framing import PeerClosed, recv_json, send_json
from protocol.logs import Timer, event
from protocol.messages import (
    CONTENT_JSON,
    CONTENT_NDJSON,
    Kind,
    Question,
    RequestFrame,
    body_frame,
    status_frame,
)
from protocol.transport import Address, accept_loop

log = logging.getLogger("enclave.server")
FIRST_FRAME_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0
MAX_ATTESTATION_NONCE = 64
MAX_REPLAY_ENTRIES = 100_000


class ReplayGuard:
    """Request ids seen within the window (best effort: a restarted enclave forgets them)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.time) -> None:
        self._window, self._clock = window_s, clock
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, request_id: str, sent_at_ms: int) -> None:
        now = self._clock()
        if abs(now - sent_at_ms / 1000) > self._window:
            raise NitroError(ErrorCode.STALE_REQUEST, "sent_at outside the replay window")
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now:
                self._seen.popitem(last=False)
            if request_id in self._seen:
                raise NitroError(ErrorCode.REPLAYED_REQUEST, "request id seen before")
            # Remembered until its sent_at leaves the window on either side.
            self._seen[request_id] = max(now, sent_at_ms / 1000) + self._window
            while len(self._seen) > MAX_REPLAY_ENTRIES:
                self._seen.popitem(last=False)


@dataclass
class Stats:
    requests: int = 0
    errors: int = 0
    tokens: int = 0


class EnclaveServer:
    def __init__(
        self,
        config: EnclaveConfig,
        nsm: Nsm,
        identity: Identity,
        kms: AttestedKms,
        engine_loader: Callable[[], Engine],
        plaintext_log: bool = False,
        metrics: EnclaveMetrics | None = None,
    ) -> None:
        self.config, self.nsm, self.identity, self.kms = config, nsm, identity, kms
        self._engine_loader = engine_loader
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.replays = ReplayGuard(config.replay_window_s)
        self.stats = Stats()
        self.metrics = metrics or EnclaveMetrics()
        self.metrics.watch(kms, lambda: self.engine)
        self._plaintext_log = plaintext_log
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def load_model(self) -> None:
        timer = Timer()
        try:
            self.engine = self._engine_loader()
        except Exception as exc:  # a broken model must show as not ready, not kill the server
            # A refused sealed model names its check (model_chunk_corrupt...), never content.
            self.load_error = exc.code.code if isinstance(exc, NitroError) else type(exc).__name__
            event(log, "model_load_failed", logging.ERROR, error=self.load_error)
            return
        kernel = {}
        if self.engine.name == "fast":  # which int8 kernel runs it: ours (avx2) or fbgemm
            from enclave.fast_engine import INT8_KERNEL

            kernel["int8_kernel"] = INT8_KERNEL
        event(log, "model_loaded", model=self.engine.name, ms=timer.ms(), **kernel)

    def serve(self, address: Address, ready: threading.Event | None = None) -> None:
        """Accept connections until `shutdown()`; the model loads in the background."""
        threading.Thread(target=self.load_model, name="model-loader", daemon=True).start()
        self._listener = address.listen()
        event(log, "listening", address=str(address))
        if ready is not None:
            ready.set()
        accept_loop(
            self._listener, self._stop, self._slots, self._serve_connection, self._refuse_busy
        )
        self._listener.close()

    def shutdown(self) -> None:
        self._stop.set()

    def _refuse_busy(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(1.0)
            send_json(conn, status_frame(503, error=NitroError(ErrorCode.OVERLOADED)))
        except OSError:
            pass
        finally:
            conn.close()
            self.metrics.observe_request("unknown", ErrorCode.OVERLOADED.code, 0.0)  # unread

    # ---- one connection ----------------------------------------------------------------------

    def _serve_connection(self, conn: socket.socket) -> None:
        timer = Timer()
        trace_id, kind, outcome = "-", "-", "ok"
        try:
            frame = RequestFrame.from_json(
                recv_json(conn, self.config.max_frame_bytes, FIRST_FRAME_TIMEOUT_S)
            )
            trace_id, kind = frame.trace_id, frame.kind.value
            conn.settimeout(SEND_TIMEOUT_S)
            outcome = self._dispatch(conn, frame)
        except PeerClosed:
            outcome = "closed"
        except NitroError as exc:
            outcome = exc.code.code
            self._send_error(conn, exc)
        except Exception as exc:  # keep serving whatever one request did
            outcome = ErrorCode.INTERNAL_ERROR.code
            event(log, "internal_error", logging.ERROR, trace_id=trace_id, error=type(exc).__name__)
            self._send_error(conn, NitroError(ErrorCode.INTERNAL_ERROR))
        finally:
            conn.close()
            self.stats.requests += 1
            if outcome not in ("ok", "closed"):
                self.stats.errors += 1
            event(log, "request", trace_id=trace_id, kind=kind, outcome=outcome, ms=timer.ms())
            self.metrics.observe_request(kind, outcome, timer.ms() / 1000)

    def _send_error(self, conn: socket.socket, error: NitroError) -> None:
        try:
            conn.settimeout(1.0)
            # Never `detail` (it may name internals the parent need not see): the code's own
            # text, or a message the error built from public data (NitroError.public_message).
            reply = NitroError(error.code, error.public_message)
            send_json(conn, status_frame(error.http_status, error=reply))
        except OSError:
            pass

    def _dispatch(self, conn: socket.socket, frame: RequestFrame) -> str:
        if frame.kind is Kind.METRICS:
            data = self.metrics.answer(frame)
            send_json(conn, status_frame(200))
            send_json(conn, body_frame(data, final=True))
            return "ok"
        if frame.kind is Kind.READY:
            ready = self.engine is not None
            send_json(conn, status_frame(200))
            model = self.engine.name if self.engine else (self.load_error or "loading")
            send_json(conn, body_frame({"ready": ready, "model": model}, final=True))
            return "ok"
        if frame.kind is Kind.ATTESTATION:
            return self._attest(conn, frame)
        if frame.kind is Kind.CHAT:
            return self._chat(conn, frame)
        if frame.kind is Kind.LEGACY:
            return self._legacy(conn, frame)
        raise NitroError(ErrorCode.BAD_REQUEST, f"kind {frame.kind.value} is not served yet")

    def _attest(self, conn: socket.socket, frame: RequestFrame) -> str:
        body = frame.body or {}
        if body.keys() - {"nonce"}:
            raise NitroError(ErrorCode.BAD_REQUEST, "attestation takes only a nonce")
        nonce_hex = body.get("nonce")
        nonce = None
        if nonce_hex is not None:
            try:
                nonce = bytes.fromhex(nonce_hex) if isinstance(nonce_hex, str) else None
            except ValueError:
                nonce = None
            if not nonce or len(nonce) > MAX_ATTESTATION_NONCE:
                raise NitroError(ErrorCode.BAD_REQUEST, "nonce must be 1-64 bytes of hex")
        # The public key is always this boot's own: a caller cannot choose it.
        document = get_attestation(self.nsm, public_key=self.identity.public_der, nonce=nonce)
        send_json(conn, status_frame(200))
        send_json(conn, body_frame({"document": envelope.b64(document)}, final=True))
        return "ok"

    def _legacy(self, conn: socket.socket, frame: RequestFrame) -> str:
        """Protocol v1 (enclave/legacy.py), only when the measured config names a compat key."""
        if self.config.compat_key_id is None:
            raise NitroError(ErrorCode.LEGACY_DISABLED, "no compat key in the measured config")
        blob = legacy.parse_body(frame.body)
        if self.engine is None:
            raise NitroError(ErrorCode.NOT_READY, "model still loading")
        reply = legacy.answer(
            engine=self.engine,
            kms=self.kms,
            compat_key_id=self.config.compat_key_id,
            blob=blob,
            credentials=frame.credentials,
            trace_id=frame.trace_id,
        )
        send_json(conn, status_frame(200))
        send_json(conn, body_frame(reply, final=True))
        return "ok"

    # ---- chat --------------------------------------------------------------------------------

    def _chat(self, conn: socket.socket, frame: RequestFrame) -> str:
        request = envelope.parse_request(frame.body)
        header = request.header
        self.metrics.observe_chat_request(request)
        if header.key_id not in self.config.key_ids:
            raise NitroError(ErrorCode.UNKNOWN_KEY, "key id not in the measured configuration")
        context = request.context
        sent_context = (frame.body or {})["key"]["context"]
        if sent_context != context:
            raise NitroError(ErrorCode.INVALID_CONTEXT, "context is not this app's")
        try:
            envelope.unb64url(header.session, "session", envelope.SESSION_BYTES)
        except NitroError as exc:
            raise NitroError(ErrorCode.INVALID_CONTEXT, "session is malformed") from exc
        if self.engine is None:
            raise NitroError(ErrorCode.NOT_READY, "model still loading")
        scheduler = getattr(self.engine, "scheduler", None)
        if scheduler is not None and scheduler.full():
            # Refused before any KMS call and before the 200: the proxy answers 503.
            raise NitroError(ErrorCode.OVERLOADED, "the request queue is full")
        data_key = self.kms.data_key(
            header.key_id, request.edk, context, frame.credentials, frame.trace_id
        )
        keys = envelope.derive_keys(data_key, header.session)
        question_json = envelope.open_request(keys, request)  # tag first, before anything else

        # From here on the request is authentic: errors are sealed for the client.
        content_type = CONTENT_NDJSON if header.stream else CONTENT_JSON
        send_json(conn, status_frame(200, content_type))
        try:
            self.replays.check(header.request_id, header.sent_at)
            question = Question.from_json(question_json)
            return self._answer(conn, keys, request, question, frame.trace_id)
        except NitroError as exc:
            sealed = envelope.seal_answer(keys, request, 0, True, NitroError(exc.code).to_wire())
            send_json(conn, body_frame(sealed, final=True))
            return exc.code.code

    def _answer(
        self,
        conn: socket.socket,
        keys: envelope.SessionKeys,
        request: envelope.SealedRequest,
        question: Question,
        trace_id: str,
    ) -> str:
        engine = self.engine
        assert engine is not None
        prompt_tokens = engine.count_tokens(question.prompt)
        if prompt_tokens > min(engine.max_prompt_tokens, self.config.max_prompt_tokens):
            raise NitroError(ErrorCode.PROMPT_TOO_LONG, "prompt over the token cap")
        if self._plaintext_log:
            event(log, "debug_plaintext_question", trace_id=trace_id, prompt=question.prompt)
        params = GenerationParams(
            max_new_tokens=question.max_new_tokens,
            min_new_tokens=question.min_new_tokens,
            temperature=question.temperature,
            top_p=question.top_p,
            seed=question.seed,
        )
        peer_gone = _peer_gone_probe(conn)
        timer = Timer()
        chunk_tokens = self.config.stream_chunk_tokens if request.header.stream else 1 << 30
        seq, completion = 0, 0
        for text, tokens, finish in _chunks(
            engine.generate(question.prompt, params, peer_gone), chunk_tokens
        ):
            completion += tokens
            content: dict[str, Any] = {"text": text, "tokens": tokens}
            if finish is not None:
                content["finish_reason"] = finish
                content["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion}
            sealed = envelope.seal_answer(keys, request, seq, finish is not None, content)
            try:
                send_json(conn, body_frame(sealed, final=finish is not None))
            except OSError:
                event(log, "client_gone", trace_id=trace_id, seq=seq)
                return "cancelled"
            self.metrics.observe_chunk(sealed, tokens)
            seq += 1
        self.stats.tokens += completion
        event(
            log,
            "generated",
            trace_id=trace_id,
            prompt_tokens=prompt_tokens,
            tokens=completion,
            chunks=seq,
            ms=timer.ms(),
        )
        return "ok"


def _chunks(steps: Iterator[Any], size: int) -> Iterator[tuple[str, int, str | None]]:
    """Group engine steps into (text, token count, finish reason or None) of `size` tokens."""
    text: list[str] = []
    count = 0
    for step in steps:
        text.append(step.text)
        count += 1
        if step.finish_reason is not None:
            yield "".join(text), count, step.finish_reason
            return
        if count == size:
            yield "".join(text), count, None
            text, count = [], 0
    # An engine that ends without a finish reason was stopped from outside.
    yield "".join(text), count, "cancelled"


def _peer_gone_probe(conn: socket.socket) -> Callable[[], bool]:
    """True once the parent closed its end: the client went away, so stop generating for it."""

    def gone() -> bool:
        try:
            # Called once a token: nothing readable (the usual case) costs one select, not four
            # socket mode changes.
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                return False
            conn.setblocking(False)
            try:
                data = conn.recv(1, socket.MSG_PEEK)
            finally:
                conn.setblocking(True)
                conn.settimeout(SEND_TIMEOUT_S)
            return data == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone
