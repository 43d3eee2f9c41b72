"""A local stand-in for the Nitro Secure Module, answering its CBOR messages over a unix socket.

Documents are real COSE_Sign1 signed by a local CA; the PCRs are this checkout measured as the
enclave image would be, re-measured whenever an enclave connects (boots).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emulator.ca import CAError, LocalCA
from emulator.measure import PCR_COUNT, MeasureError, measure
from protocol import attestation
from protocol import nsm as msg
from protocol.framing import FrameError, PeerClosed, recv_frame, send_frame
from protocol.logs import Timer, configure, event
from protocol.nsm import NsmError, NsmErrorCode
from protocol.transport import Address, accept_loop

MAX_PCRS = 32  # like the real NSM: 0-15 measured and read-only, 16-31 free for the enclave
RANDOM_BYTES = 256  # what the real NSM answers to one GetRandom
VERSION = (1, 0, 0)
MAX_CONNECTIONS = 16
FRAME_TIMEOUT = 10.0  # once a frame starts, all of it must arrive within this
IDLE_TIMEOUT = 3600.0  # an enclave keeps its connection; one silent for an hour is let go
PCR_SIZE = 48

log = logging.getLogger("nsm-emulator")

Measure = Callable[[], dict[int, bytes]]


class NsmEmulator:
    """The NSM's state and its answer to each message; `handle` maps request to response bytes.

    Thread-safe: connection threads share one emulator.
    """

    def __init__(
        self,
        ca: LocalCA,
        measure_pcrs: Measure,
        *,
        module_id: str | None = None,
        debug_mode: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = ca
        self.module_id = module_id or f"i-00000000000000000-enc{secrets.token_hex(8)}"
        self.debug_mode = debug_mode
        self._measure = measure_pcrs
        self._clock = clock
        self._lock = threading.Lock()
        self._pcrs: dict[int, bytes] = dict.fromkeys(range(MAX_PCRS), bytes(PCR_SIZE))
        self._locked: set[int] = set(range(PCR_COUNT))
        self.remeasure()

    # ---- state ---------------------------------------------------------------------------------

    def remeasure(self) -> dict[int, bytes]:
        """Measure PCR0-15 again (an enclave boot); returns them as documents will carry them."""
        measured = self._measure()
        if self.debug_mode:
            # A debug-mode enclave's memory is readable, so the NSM reports PCR0-2 as zeros.
            measured = {**measured, 0: bytes(PCR_SIZE), 1: bytes(PCR_SIZE), 2: bytes(PCR_SIZE)}
        with self._lock:
            for index in range(PCR_COUNT):
                self._pcrs[index] = measured.get(index, bytes(PCR_SIZE))
            return {index: self._pcrs[index] for index in range(PCR_COUNT)}

    def pcrs(self) -> dict[int, bytes]:
        with self._lock:
            return dict(self._pcrs)

    # ---- messages ------------------------------------------------------------------------------

    def handle(self, request_bytes: bytes) -> bytes:
        """One response for one request; a malformed request gets an Error response, not raise."""
        return self.handle_described(request_bytes)[0]

    def handle_described(self, request_bytes: bytes) -> tuple[bytes, str, str | None]:
        """(response bytes, request kind, NSM error code or None): what a log line may say."""
        try:
            request = msg.decode_request(request_bytes)
        except NsmError as exc:
            code = exc.nsm_code or NsmErrorCode.INVALID_ARGUMENT
            return msg.encode_response(msg.ErrorResponse(code)), "malformed", code.value
        kind = _KIND.get(type(request), "unknown")
        try:
            response = self.answer(request)
            encoded = msg.encode_response(response)
        except Exception as exc:  # a bug here must cost one answer, not the connection
            event(log, "internal_error", logging.ERROR, kind=kind, error=type(exc).__name__)
            response = msg.ErrorResponse(NsmErrorCode.INTERNAL_ERROR)
            encoded = msg.encode_response(response)
        error = response.error.value if isinstance(response, msg.ErrorResponse) else None
        return encoded, kind, error

    def answer(self, request: msg.Request) -> msg.Response:
        try:
            return self._answer(request)
        except NsmError as exc:
            return msg.ErrorResponse(exc.nsm_code or NsmErrorCode.INVALID_ARGUMENT)

    def _answer(self, request: msg.Request) -> msg.Response:
        match request:
            case msg.AttestationRequest():
                return msg.AttestationResponse(self._document(request))
            case msg.GetRandomRequest():
                return msg.GetRandomResponse(os.urandom(RANDOM_BYTES))
            case msg.DescribeNsmRequest():
                with self._lock:
                    locked = tuple(sorted(self._locked))
                return msg.DescribeNsmResponse(
                    *VERSION,
                    module_id=self.module_id,
                    max_pcrs=MAX_PCRS,
                    locked_pcrs=locked,
                    digest="SHA384",
                )
            case msg.DescribePcrRequest(index=index):
                self._check_index(index)
                with self._lock:
                    return msg.DescribePcrResponse(index in self._locked, self._pcrs[index])
            case msg.ExtendPcrRequest(index=index, data=data):
                self._check_index(index)
                with self._lock:
                    if index in self._locked:
                        return msg.ErrorResponse(NsmErrorCode.READ_ONLY_INDEX)
                    self._pcrs[index] = hashlib.sha384(self._pcrs[index] + data).digest()
                    return msg.ExtendPcrResponse(self._pcrs[index])
            case msg.LockPcrRequest(index=index):
                self._check_index(index)
                with self._lock:
                    self._locked.add(index)
                return msg.LockPcrResponse()
            case msg.LockPcrsRequest(range=count):
                if count > MAX_PCRS:
                    return msg.ErrorResponse(NsmErrorCode.INVALID_INDEX)
                with self._lock:
                    self._locked.update(range(count))
                return msg.LockPcrsResponse()
        return msg.ErrorResponse(NsmErrorCode.INVALID_OPERATION)

    @staticmethod
    def _check_index(index: int) -> None:
        if index >= MAX_PCRS:
            raise NsmError(f"PCR{index} does not exist", NsmErrorCode.INVALID_INDEX)

    def _document(self, request: msg.AttestationRequest) -> bytes:
        certificate, key, cabundle = self.ca.leaf()
        with self._lock:
            pcrs = {index: self._pcrs[index] for index in range(PCR_COUNT)}
        fields = {
            "module_id": self.module_id,
            "digest": "SHA384",
            "timestamp": int(self._clock() * 1000),
            "pcrs": pcrs,
            "certificate": certificate,
            "cabundle": cabundle,
            "public_key": request.public_key,
            "user_data": request.user_data,
            "nonce": request.nonce,
        }
        return attestation.encode_document(fields, key)


def make_handler(emulator: NsmEmulator) -> Callable[[bytes], bytes]:
    """The emulator as a function from request bytes to response bytes (a fake device's core)."""
    return emulator.handle


_KIND = {
    msg.AttestationRequest: "attestation",
    msg.GetRandomRequest: "get_random",
    msg.DescribeNsmRequest: "describe_nsm",
    msg.DescribePcrRequest: "describe_pcr",
    msg.ExtendPcrRequest: "extend_pcr",
    msg.LockPcrRequest: "lock_pcr",
    msg.LockPcrsRequest: "lock_pcrs",
}


# ---- the socket server ---------------------------------------------------------------------------


class NsmServer:
    """Serves an NsmEmulator on a unix socket, a thread per connection (at most max_connections)."""

    def __init__(
        self,
        emulator: NsmEmulator,
        socket_path: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        frame_timeout: float = FRAME_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.emulator = emulator
        self.address = Address.parse(f"unix://{socket_path}")
        self.frame_timeout = frame_timeout
        self.idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._connections = 0
        self._count_lock = threading.Lock()

    def serve(self, ready: threading.Event | None = None) -> None:
        """Accept connections until `shutdown`; sets `ready` once listening."""
        self._listener = self.address.listen()
        event(log, "listening", socket=self.address.path)
        if ready is not None:
            ready.set()
        try:
            accept_loop(
                self._listener, self._stop, self._slots, self._serve_connection, self._refuse
            )
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.path)

    def shutdown(self) -> None:
        self._stop.set()

    def _refuse(self, conn: socket.socket) -> None:
        event(log, "connection_refused", logging.WARNING, reason="too many connections")
        conn.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        with self._count_lock:
            self._connections += 1
            number = self._connections
        requests, reason = 0, "closed"
        try:
            timer = Timer()
            pcrs = self.emulator.remeasure()
            event(
                log,
                "connection_opened",
                connection=number,
                measure_ms=timer.ms(),
                pcr0=pcrs[0].hex(),
                pcr2=pcrs[2].hex(),
            )
            while not self._stop.is_set():
                # Idle connections are normal (an enclave keeps one); partial frames are not.
                conn.settimeout(self.idle_timeout)
                try:
                    if not conn.recv(1, socket.MSG_PEEK):
                        break  # closed between frames
                except TimeoutError:
                    reason = "idle"
                    break
                request = recv_frame(conn, msg.MAX_REQUEST, self.frame_timeout)
                timer = Timer()
                response, kind, error = self.emulator.handle_described(request)
                send_frame(conn, response, msg.MAX_RESPONSE)
                requests += 1
                # Only the kind and sizes: nonces, user data and keys are the enclave's business.
                event(
                    log,
                    "request",
                    connection=number,
                    kind=kind,
                    request_bytes=len(request),
                    response_bytes=len(response),
                    error=error,
                    ms=timer.ms(),
                )
        except PeerClosed:
            reason = "closed"
        except FrameError as exc:
            reason = "bad_frame"
            event(log, "frame_error", logging.WARNING, connection=number, error=exc.code.code)
        except OSError as exc:
            reason = f"socket_error:{type(exc).__name__}"
        except Exception as exc:  # the emulator keeps serving whatever one connection does
            reason = "internal_error"
            event(log, "internal_error", logging.ERROR, connection=number, error=type(exc).__name__)
        finally:
            conn.close()
            event(log, "connection_closed", connection=number, requests=requests, reason=reason)


# ---- command line --------------------------------------------------------------------------------


def default_app_root() -> Path:
    """The checkout this package lives in (whose enclave/ and protocol/ are measured)."""
    return Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class NsmConfig:
    socket_path: str
    state_dir: Path
    app_root: Path
    enclave_config: Path | None
    model_dir: Path | None
    debug_mode: bool
    module_id: str | None
    log_level: str = "INFO"


def _parse_args(argv: list[str] | None) -> NsmConfig:
    parser = argparse.ArgumentParser(
        prog="nitro-nsm-emulator",
        description="Answer Nitro Secure Module requests over a unix socket (local mode only).",
    )
    parser.add_argument("--socket", required=True, help="the unix socket path (under 100 bytes)")
    parser.add_argument(
        "--state-dir", default=".nitro-local", help="state directory; the CA is in DIR/nsm-ca/"
    )
    parser.add_argument(
        "--app-root", default=str(default_app_root()), help="the checkout to measure"
    )
    parser.add_argument("--enclave-config", help="the enclave's measured configuration file")
    parser.add_argument("--model-dir", help="the model directory, measured into PCR2")
    parser.add_argument(
        "--debug-mode", action="store_true", help="report PCR0-2 as zero, like a debug enclave"
    )
    parser.add_argument("--module-id", help="the module id documents carry (default: made up)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    return NsmConfig(
        socket_path=args.socket,
        state_dir=Path(args.state_dir),
        app_root=Path(args.app_root),
        enclave_config=Path(args.enclave_config) if args.enclave_config else None,
        model_dir=Path(args.model_dir) if args.model_dir else None,
        debug_mode=args.debug_mode,
        module_id=args.module_id,
        log_level=args.log_level,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nitro-nsm-emulator`; serves until SIGTERM or SIGINT."""
    config = _parse_args(argv)
    configure("nsm-emulator", config.log_level)
    try:
        ca = LocalCA.load_or_create(config.state_dir / "nsm-ca")
        emulator = NsmEmulator(
            ca,
            lambda: measure(config.app_root, config.enclave_config, config.model_dir),
            module_id=config.module_id,
            debug_mode=config.debug_mode,
        )
        server = NsmServer(emulator, config.socket_path)
    except (CAError, MeasureError, OSError, ValueError) as exc:
        event(log, "start_failed", logging.ERROR, error=type(exc).__name__, detail=str(exc))
        return 2
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: server.shutdown())
    event(
        log,
        "starting",
        module_id=emulator.module_id,
        debug_mode=config.debug_mode,
        root=str(ca.root_pem_path),
    )
    try:
        server.serve()
    except OSError as exc:
        event(log, "serve_failed", logging.ERROR, error=type(exc).__name__, detail=str(exc))
        return 2
    event(log, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
