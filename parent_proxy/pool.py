"""Several enclaves behind one proxy: each request goes to the least-loaded ready enclave.

A background thread asks every enclave `ready` (the frame /readyz uses, docs/wire.md section 8)
every `interval` seconds; an enclave that cannot be reached or is not ready leaves the rotation
until a probe finds it ready again. A connection refused on a real request takes the enclave out
at once and the request goes to the next one: nothing was sent, so nothing can run twice.

Accounting is per process: each gunicorn worker holds its own pool, its own in-flight counts and
its own health thread (workers share no memory, and a shared counter would leak whatever a
crashed worker held). The kernel spreads connections over the workers, each worker spreads its
share over the enclaves, so the enclaves' loads differ by at most about one request per worker;
an enclave that is actually full answers `overloaded` before reading the request, and the pool
then tries the next one, which corrects what per-process counts cannot see.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from parent_proxy.relay import EnclaveReply, EnclaveUnreachable, RelayLimits, relay_to_enclave
from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.logs import event
from protocol.messages import Kind, RequestFrame
from protocol.transport import Address

log = logging.getLogger("parent_proxy")
DEFAULT_HEALTH_INTERVAL_S = 2.0
MAX_ENCLAVES = 64
# Answers after which the same request may go to another enclave without running twice: with
# `overloaded` (every connection slot busy) and `not_ready` (model not loaded) the enclave has
# read the request but made no KMS call, no replay check and no generation for it
# (enclave/server.py), so nothing of it happened there.
_TRY_ELSEWHERE = (ErrorCode.OVERLOADED, ErrorCode.NOT_READY)
# What a `ready: false` answer's `model` field may say in a log: "loading", an error code or an
# exception's type name (enclave/server.py); anything else is logged as "not_ready".
_REASON = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_STOP_JOIN_S = 5.0


@dataclass
class EnclaveState:
    """What one worker knows of one enclave. Guarded by the pool's lock."""

    address: Address
    ready: bool = True  # until the first probe says otherwise: a fresh proxy serves at once
    in_flight: int = 0
    sent: int = 0  # requests relayed to it (probes not counted)
    # Why it is out of rotation: an error code, "loading", or why the model failed to load.
    reason: str | None = None


class EnclavePool:
    """Chooses an enclave for each request and keeps track of which are ready.

    With one enclave there is no choice to make: no health thread runs, and every request goes
    to it as before (its own errors reach the client unchanged).
    """

    def __init__(
        self,
        addresses: Sequence[Address],
        probe_limits: RelayLimits,
        interval: float = DEFAULT_HEALTH_INTERVAL_S,
    ) -> None:
        if not 1 <= len(addresses) <= MAX_ENCLAVES:
            raise ValueError(f"the pool takes 1-{MAX_ENCLAVES} enclave addresses")
        if len(set(addresses)) != len(addresses):
            raise ValueError("an enclave address is listed twice")
        if not 0 < interval <= 3600:
            raise ValueError("the health interval must be above 0 and at most 3600 seconds")
        self._states = [EnclaveState(address) for address in addresses]
        self._probe_limits = probe_limits
        self._interval = interval
        self._lock = threading.Lock()
        self._turn = 0  # breaks ties in turn, so that an idle pool still spreads requests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> EnclavePool:
        """Start the health thread (when there is more than one enclave); returns the pool."""
        if len(self._states) > 1 and self._thread is None:
            self._thread = threading.Thread(
                target=self._health_loop, name="enclave-health", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_STOP_JOIN_S)

    # ---- relaying ------------------------------------------------------------------------------

    def relay(self, frame: RequestFrame, limits: RelayLimits) -> EnclaveReply:
        """relay_to_enclave() on the least-loaded ready enclave; on to the next when one cannot
        be reached or answers overloaded/not ready. The reply counts as in flight until closed.

        When no enclave is known ready, the others are tried all the same (a probe may be
        stale), so the client gets the last enclave's own answer or error.
        """
        tried: set[Address] = set()
        while True:
            state = self._acquire(tried)
            tried.add(state.address)
            try:
                reply = relay_to_enclave(state.address, frame, limits)
            except EnclaveUnreachable as exc:
                self._release(state)
                self._set_ready(state, False, exc.code.code)
                if len(tried) < len(self._states):
                    continue
                raise
            except BaseException:
                self._release(state)
                raise
            code = _status_code(reply)
            if code in _TRY_ELSEWHERE and len(tried) < len(self._states):
                reply.close()
                self._release(state)
                if code is ErrorCode.NOT_READY:
                    self._set_ready(state, False, code.code)
                continue
            reply.call_on_close(lambda state=state: self._release(state))
            return reply

    def _acquire(self, tried: set[Address]) -> EnclaveState:
        with self._lock:
            untried = [s for s in self._states if s.address not in tried]
            candidates = [s for s in untried if s.ready] or untried
            n = len(self._states)
            turn = self._turn
            chosen = min(
                candidates,
                key=lambda s: (s.in_flight, (self._states.index(s) - turn) % n),
            )
            self._turn = (self._states.index(chosen) + 1) % n
            chosen.in_flight += 1
            chosen.sent += 1
            return chosen

    def _release(self, state: EnclaveState) -> None:
        with self._lock:
            state.in_flight -= 1

    # ---- health --------------------------------------------------------------------------------

    def probe_all(self) -> None:
        """Ask every enclave `ready` once, one after the other; each probe is bounded by the
        probe limits (connect, then the answer)."""
        for state in self._states:
            if self._stop.is_set():
                return
            answer = self._probe(state.address, "health-" + secrets.token_hex(8))
            if answer.ready is not None:
                self._set_ready(state, answer.ready, answer.reason)

    def ready_model(
        self, trace_id: str, limits: RelayLimits
    ) -> tuple[str | None, ErrorCode, str | None]:
        """For /readyz: (model, _, _) from the first enclave that answers ready, asking those in
        rotation first, or (None, code, last reason): ENCLAVE_UNAVAILABLE when none could be
        reached or gave a well-formed answer, NOT_READY when one did but none is ready. Each answer
        updates the rotation as a probe's would. All the asking takes at most twice the limits."""
        with self._lock:
            order = sorted(self._states, key=lambda s: not s.ready)  # stable: ready ones first
        deadline = time.monotonic() + 2 * (limits.connect_timeout + limits.relay_timeout)
        why, reason = ErrorCode.ENCLAVE_UNAVAILABLE, None
        for state in order:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            bounded = RelayLimits(
                min(limits.connect_timeout, remaining),
                min(limits.relay_timeout, remaining),
                limits.max_frame,
            )
            answer = self._probe(state.address, trace_id, bounded)
            if answer.ready is not None and len(self._states) > 1:
                self._set_ready(state, answer.ready, answer.reason)
            if answer.ready:
                return answer.model, why, None
            reason = answer.reason or ErrorCode.OVERLOADED.code
            if answer.reached:
                why = ErrorCode.NOT_READY
        return None, why, reason

    def _probe(
        self, address: Address, trace_id: str, limits: RelayLimits | None = None
    ) -> _ReadyAnswer:
        """Ask one enclave `ready`; never raises NitroError."""
        frame = RequestFrame(Kind.READY, trace_id)
        try:
            with relay_to_enclave(address, frame, limits or self._probe_limits) as reply:
                code = _status_code(reply)
                if code is ErrorCode.OVERLOADED:  # every connection slot busy: it is serving
                    return _ReadyAnswer(None, None, None, reached=True)
                if code is not None:
                    return _ReadyAnswer(False, code.code, None, reached=True)
                _final, data = next(reply.frames())
        except NitroError as exc:
            return _ReadyAnswer(False, exc.code.code, None, reached=False)
        model = data.get("model")
        if data.get("ready") is True and isinstance(model, str):
            return _ReadyAnswer(True, None, model, reached=True)
        # Not ready: `model` says why ("loading", or the code of a failed load).
        reason = model if isinstance(model, str) and _REASON.fullmatch(model) else "not_ready"
        return _ReadyAnswer(False, reason, None, reached=True)

    def _health_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_all()
            except Exception as exc:  # the thread must outlive any one bad answer
                event(log, "health_check_failed", logging.ERROR, error=type(exc).__name__)
            self._stop.wait(self._interval)

    def _set_ready(self, state: EnclaveState, ready: bool, reason: str | None) -> None:
        with self._lock:
            if state.ready == ready:
                return
            state.ready = ready
            state.reason = None if ready else reason
            in_rotation = sum(s.ready for s in self._states)
        event(
            log,
            "enclave_ready" if ready else "enclave_out_of_rotation",
            logging.INFO if ready else logging.WARNING,
            enclave=str(state.address),
            reason=reason,
            in_rotation=in_rotation,
            enclaves=len(self._states),
        )

    # ---- what it knows -------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Each enclave's address, readiness, in-flight and sent counts (for logs and metrics)."""
        with self._lock:
            return [
                {
                    "enclave": str(s.address),
                    "ready": s.ready,
                    "in_flight": s.in_flight,
                    "sent": s.sent,
                    "reason": s.reason,
                }
                for s in self._states
            ]


@dataclass(frozen=True)
class _ReadyAnswer:
    """One enclave's answer to `ready`: ready None when alive but too busy to say; `reached`
    False when it could not be reached or answered garbage."""

    ready: bool | None
    reason: str | None
    model: str | None
    reached: bool


def _status_code(reply: EnclaveReply) -> ErrorCode | None:
    if reply.status.error is None:
        return None
    code, _message = error_from_wire({"error": reply.status.error})
    return code
