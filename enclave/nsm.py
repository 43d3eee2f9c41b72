"""The enclave's client of the Nitro Secure Module: /dev/nsm in an enclave, the emulator locally.

Both speak the same CBOR messages (protocol/nsm.py); the enclave code holds an `Nsm` and cannot
tell which one it is.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from protocol import nsm as msg
from protocol.errors import ErrorCode
from protocol.framing import FrameError, PeerClosed, recv_frame, send_frame
from protocol.nsm import NsmError, NsmErrorCode
from protocol.transport import Address

# _IOWR(0x0A, 0, struct nsm_raw) from the kernel's include/uapi/linux/nsm.h.
NSM_IOCTL_REQUEST = 0xC0200A00
DEFAULT_TIMEOUT = 10.0
# Requests that may be sent again after a lost connection: all but ExtendPCR are idempotent.
_RETRYABLE = (
    msg.AttestationRequest,
    msg.GetRandomRequest,
    msg.DescribeNsmRequest,
    msg.DescribePcrRequest,
    msg.LockPcrRequest,
    msg.LockPcrsRequest,
)
MAX_RANDOM_BYTES = 1 << 20
_T = TypeVar("_T")


class Iovec(ctypes.Structure):
    """struct nsm_iovec { __u64 addr; __u64 len; }"""

    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class NsmRaw(ctypes.Structure):
    """struct nsm_raw { struct nsm_iovec request; struct nsm_iovec response; } (32 bytes)"""

    _fields_ = [("request", Iovec), ("response", Iovec)]


class Nsm(Protocol):
    """Anything that answers NSM requests: the device, the emulator, a test double."""

    def request(self, req: msg.Request) -> msg.Response:
        """Send one request; returns the matching response or raises NsmError."""
        ...


def _checked(req: msg.Request, raw_response: bytes) -> msg.Response:
    """Decode a response and hold it to the request: an NSM error or a mismatch is NsmError."""
    response = msg.decode_response(raw_response)
    if isinstance(response, msg.ErrorResponse):
        raise NsmError(
            f"the NSM answered {response.error.value}",
            response.error,
            ErrorCode.INTERNAL_ERROR,
        )
    if not isinstance(response, msg.RESPONSE_FOR[type(req)]):
        raise NsmError(
            f"the NSM answered {type(response).__name__} to {type(req).__name__}",
            NsmErrorCode.INVALID_RESPONSE,
        )
    return response


class DeviceNsm:
    """/dev/nsm: one ioctl per message, the kernel copying the request and the response."""

    def __init__(
        self,
        path: str = "/dev/nsm",
        ioctl: Callable[[int, int, Any], Any] = fcntl.ioctl,
    ) -> None:
        self.path = path
        self._ioctl = ioctl
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NsmError(
                f"cannot open {path}: {exc.strerror}", code=ErrorCode.INTERNAL_ERROR
            ) from exc

    def request(self, req: msg.Request) -> msg.Response:
        payload = msg.encode_request(req)
        # Fresh buffers per call: concurrent callers share nothing but the fd (the driver
        # serialises requests itself).
        request_buf = ctypes.create_string_buffer(payload, len(payload))
        response_buf = ctypes.create_string_buffer(msg.MAX_RESPONSE)
        raw = NsmRaw(
            Iovec(ctypes.addressof(request_buf), len(payload)),
            Iovec(ctypes.addressof(response_buf), msg.MAX_RESPONSE),
        )
        try:
            self._ioctl(self._fd, NSM_IOCTL_REQUEST, raw)
        except OSError as exc:
            raise NsmError(
                f"the NSM ioctl failed: {exc.strerror}", code=ErrorCode.INTERNAL_ERROR
            ) from exc
        written = raw.response.len
        if not 0 < written <= msg.MAX_RESPONSE:
            raise NsmError(f"the NSM wrote {written} bytes", NsmErrorCode.INVALID_RESPONSE)
        return _checked(req, response_buf.raw[:written])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"DeviceNsm({self.path!r})"


class SocketNsm:
    """The NSM emulator over a unix socket: one CBOR request frame, one CBOR response frame.

    One connection is kept for the life of the process (the emulator re-measures the enclave
    when a connection opens, as a boot would); it is reopened if the emulator closed it.
    """

    def __init__(self, address: Address | str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address if isinstance(address, Address) else Address.parse(address)
        if self.address.scheme != "unix":
            raise ValueError(f"the NSM emulator is reached over a unix socket, not {address}")
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _connection(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = self.address.connect(self.timeout)
            except OSError as exc:
                raise NsmError(
                    f"cannot reach the NSM emulator at {self.address}: {exc.strerror or exc}",
                    code=ErrorCode.INTERNAL_ERROR,
                ) from exc
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _exchange(self, payload: bytes) -> bytes:
        sock = self._connection()
        try:
            send_frame(sock, payload, msg.MAX_REQUEST)
            return recv_frame(sock, msg.MAX_RESPONSE, self.timeout)
        except BaseException:
            # The connection's state is unknown (half a frame may be in flight): never reuse it.
            self._drop()
            raise

    def request(self, req: msg.Request) -> msg.Response:
        payload = msg.encode_request(req)
        with self._lock:
            reused = self._sock is not None
            try:
                raw = self._exchange(payload)
            except (PeerClosed, BrokenPipeError, ConnectionResetError) as exc:
                # A kept connection the emulator closed meanwhile (restart, idle timeout).
                if not (reused and isinstance(req, _RETRYABLE)):
                    raise _lost(exc) from exc
                try:
                    raw = self._exchange(payload)
                except (FrameError, OSError) as retry_exc:
                    raise _lost(retry_exc) from retry_exc
            except (FrameError, OSError) as exc:
                raise _lost(exc) from exc
        return _checked(req, raw)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __repr__(self) -> str:
        return f"SocketNsm({str(self.address)!r})"


def _lost(exc: BaseException) -> NsmError:
    if isinstance(exc, NsmError):
        return exc
    detail = exc.detail if isinstance(exc, FrameError) else type(exc).__name__
    return NsmError(f"the NSM emulator exchange failed: {detail}", code=ErrorCode.INTERNAL_ERROR)


def open_nsm(spec: str) -> Nsm:
    """`unix:///path/nsm.sock` for the emulator, else a device path such as /dev/nsm."""
    if spec.startswith("unix://"):
        return SocketNsm(spec)
    if "://" in spec:
        raise ValueError(f"the NSM is a device path or unix:///path, not {spec!r}")
    return DeviceNsm(spec)


# ---- what the enclave asks of it --------------------------------------------------------------


def _ask(nsm: Nsm, req: msg.Request, expected: type[_T]) -> _T:
    # Implementations check this already; an Nsm written elsewhere (a test double) may not.
    response = nsm.request(req)
    if not isinstance(response, expected):
        raise NsmError(
            f"the NSM answered {type(response).__name__} to {type(req).__name__}",
            NsmErrorCode.INVALID_RESPONSE,
        )
    return response


def get_attestation(
    nsm: Nsm,
    *,
    public_key: bytes,
    nonce: bytes | None = None,
    user_data: bytes | None = None,
) -> bytes:
    """A signed attestation document (COSE_Sign1 bytes) carrying these fields."""
    req = msg.AttestationRequest(user_data=user_data, nonce=nonce, public_key=public_key)
    return _ask(nsm, req, msg.AttestationResponse).document


def get_random(nsm: Nsm, n: int) -> bytes:
    """`n` bytes from the NSM's random number generator (it answers 256 per call)."""
    if not 0 <= n <= MAX_RANDOM_BYTES:
        raise ValueError(f"n must be from 0 to {MAX_RANDOM_BYTES}")
    out = bytearray()
    while len(out) < n:  # each round adds at least one byte, so this ends
        random = _ask(nsm, msg.GetRandomRequest(), msg.GetRandomResponse).random
        if not random:
            raise NsmError("the NSM returned no random bytes", NsmErrorCode.INVALID_RESPONSE)
        out += random
    return bytes(out[:n])


def describe_pcr(nsm: Nsm, index: int) -> bytes:
    """The current value of PCR `index`."""
    return _ask(nsm, msg.DescribePcrRequest(index), msg.DescribePcrResponse).data


def describe_nsm(nsm: Nsm) -> msg.DescribeNsmResponse:
    """The module's version, id, PCR count and locked PCRs."""
    return _ask(nsm, msg.DescribeNsmRequest(), msg.DescribeNsmResponse)
