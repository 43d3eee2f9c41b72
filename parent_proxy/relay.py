"""One request to the enclave: connect, send the request frame, then read its answer frames.

The proxy cannot read what it relays; it only checks the frames' shape and maps transport
failures to wire codes: unreachable 503, too slow 504, malformed 502 (docs/wire.md section 8).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from protocol.errors import ErrorCode, NitroError
from protocol.framing import DEFAULT_MAX_FRAME, FrameError, PeerClosed, recv_json, send_json
from protocol.messages import RequestFrame, Status, parse_body_frame
from protocol.transport import Address

# After a failed send, how long to look for the status frame the enclave may have sent first
# (a busy enclave answers `overloaded` and closes without reading the request).
_LATE_STATUS_TIMEOUT_S = 0.5
# After the enclave closed a connection early, how long a probe connection must stay open for
# the enclave to count as alive (and so as having broken the protocol, not died).
_PROBE_S = 0.5


class EnclaveUnreachable(NitroError):
    """ENCLAVE_UNAVAILABLE before anything was sent: another enclave may take the request."""


@dataclass(frozen=True)
class RelayLimits:
    connect_timeout: float = 2.0
    relay_timeout: float = 120.0  # for the first frame, and between frames
    max_frame: int = DEFAULT_MAX_FRAME


class EnclaveReply:
    """An answer being received: the enclave's status, then its body frames as they come.

    Close it (or use it as a context manager) as soon as the client is gone: the enclave notices
    the closed connection and stops generating.
    """

    def __init__(
        self,
        sock: socket.socket,
        status: Status,
        limits: RelayLimits,
        address: Address | None = None,
    ) -> None:
        self._sock = sock
        self._address = address  # to tell an enclave that died from one that misbehaved
        self.status = status
        self._limits = limits
        self._finished = status.error is not None
        self._closed = False
        self._on_close: list[Callable[[], None]] = []

    def call_on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` once, when the reply is closed (the pool's in-flight count)."""
        self._on_close.append(callback)

    def frames(self) -> Iterator[tuple[bool, dict[str, Any]]]:
        """Yield (final, data) per body frame, ending after the final one; NitroError if the
        enclave goes quiet (ENCLAVE_TIMEOUT), dies (ENCLAVE_UNAVAILABLE) or sends anything
        malformed (PROTOCOL_ERROR)."""
        while not self._finished:
            final, data = parse_body_frame(self._receive())
            self._finished = final
            yield final, data

    def _receive(self) -> dict[str, Any]:
        if self._closed:
            raise NitroError(ErrorCode.PROTOCOL_ERROR, "relay already closed")
        try:
            return recv_json(self._sock, self._limits.max_frame, self._limits.relay_timeout)
        except PeerClosed as exc:
            raise _closed_early(self._address, self._limits, "enclave closed before the end") from (
                exc
            )
        except FrameError as exc:
            raise _as_relay_error(exc) from exc

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
            for callback in self._on_close:
                callback()

    def __enter__(self) -> EnclaveReply:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def relay_to_enclave(
    address: Address, frame: RequestFrame, limits: RelayLimits | None = None
) -> EnclaveReply:
    """Open a connection, send `frame`, read the status frame; the caller reads the body frames.

    Raises NitroError: ENCLAVE_UNAVAILABLE when nothing accepts the connection (or the
    enclave closed it and accepts no more: it died),
    ENCLAVE_TIMEOUT when the status frame is late, PROTOCOL_ERROR when it is malformed,
    PAYLOAD_TOO_LARGE when the request frame would exceed the frame limit.
    """
    limits = limits or RelayLimits()
    try:
        sock = address.connect(limits.connect_timeout)
    except OSError as exc:  # refused, no such socket file, no route, timed out
        raise EnclaveUnreachable(
            ErrorCode.ENCLAVE_UNAVAILABLE, "cannot connect to the enclave"
        ) from exc
    try:
        return _exchange(sock, frame, limits, address)
    except BaseException:
        sock.close()
        raise


def _exchange(
    sock: socket.socket, frame: RequestFrame, limits: RelayLimits, address: Address | None = None
) -> EnclaveReply:
    sock.settimeout(limits.relay_timeout)
    status_timeout = limits.relay_timeout
    try:
        send_json(sock, frame.to_json(), limits.max_frame)
    except FrameError as exc:
        raise NitroError(ErrorCode.PAYLOAD_TOO_LARGE, "request frame over the limit") from exc
    except OSError as exc:
        # The enclave may have answered before reading (busy) and closed: that answer is better
        # than a bare "unavailable". Otherwise it went away under us.
        status_timeout = _LATE_STATUS_TIMEOUT_S
        late_failure = exc
    else:
        late_failure = None
    try:
        raw = recv_json(sock, limits.max_frame, status_timeout)
    except FrameError as exc:
        if late_failure is not None:
            raise NitroError(ErrorCode.ENCLAVE_UNAVAILABLE, "enclave closed the connection") from (
                late_failure
            )
        if isinstance(exc, PeerClosed):
            raise _closed_early(address, limits, "enclave closed without answering") from exc
        raise _as_relay_error(exc) from exc
    return EnclaveReply(sock, Status.from_json(raw), limits, address)


def _closed_early(address: Address | None, limits: RelayLimits, detail: str) -> NitroError:
    """The enclave closed the connection before its answer ended. If it no longer accepts
    connections it died (killed, crashed, restarting): ENCLAVE_UNAVAILABLE, as for one that was
    never there. If it still accepts them, it broke the protocol: PROTOCOL_ERROR.
    Not EnclaveUnreachable: the request was sent, so it must not be tried elsewhere."""
    if address is not None and not _still_serving(address, limits):
        return NitroError(ErrorCode.ENCLAVE_UNAVAILABLE, f"{detail}; it is gone")
    return NitroError(ErrorCode.PROTOCOL_ERROR, detail)


def _still_serving(address: Address, limits: RelayLimits) -> bool:
    """Whether the enclave accepts a connection and keeps it open a moment. A dying process may
    close our connection before its listener: a connect then still succeeds, and the kernel
    closes it as the listener goes, which the short read below sees. A live enclave waits for
    a request frame (it sends nothing), or refuses a busy one with a status (data): alive."""
    try:
        probe = address.connect(limits.connect_timeout)
    except OSError:
        return False
    with probe:
        probe.settimeout(_PROBE_S)
        try:
            return probe.recv(1) != b""
        except TimeoutError:
            return True
        except OSError:
            return False


def _as_relay_error(exc: FrameError) -> NitroError:
    if exc.code is ErrorCode.ENCLAVE_TIMEOUT:
        return NitroError(ErrorCode.ENCLAVE_TIMEOUT, "the enclave did not answer in time")
    # An oversized frame from the enclave is the enclave's fault, not the client's request's.
    return NitroError(ErrorCode.PROTOCOL_ERROR, exc.detail or "malformed frame from the enclave")
