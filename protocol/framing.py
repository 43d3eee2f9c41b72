"""Length-prefixed frames between the parent and the enclave (and to the NSM emulator).

A frame is a 4-byte big-endian length and that many bytes. Reads loop until the declared length
arrives (vsock, like TCP, returns partial reads), are bounded in size and time out.
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

from protocol.errors import ErrorCode, NitroError

DEFAULT_MAX_FRAME = 1 << 20  # 1 MiB
DEFAULT_TIMEOUT = 30.0
_HEADER = struct.Struct(">I")


class FrameError(NitroError):
    """The peer closed early, lied about a length, sent too much or was too slow."""


class PeerClosed(FrameError):
    """The peer closed the connection cleanly between frames."""

    def __init__(self) -> None:
        super().__init__(ErrorCode.PROTOCOL_ERROR, "connection closed")


def encode_frame(payload: bytes, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    if len(payload) > max_size:
        raise FrameError(ErrorCode.FRAME_TOO_LARGE, f"frame of {len(payload)} bytes > {max_size}")
    return _HEADER.pack(len(payload)) + payload


def send_frame(sock: socket.socket, payload: bytes, max_size: int = DEFAULT_MAX_FRAME) -> None:
    sock.sendall(encode_frame(payload, max_size))


def _read_exact(sock: socket.socket, n: int, deadline: float, at_boundary: bool) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FrameError(ErrorCode.ENCLAVE_TIMEOUT, "frame read timed out")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 16))
        except TimeoutError as exc:
            raise FrameError(ErrorCode.ENCLAVE_TIMEOUT, "frame read timed out") from exc
        except OSError as exc:
            raise FrameError(ErrorCode.PROTOCOL_ERROR, f"read failed: {exc.strerror}") from exc
        if not chunk:
            if at_boundary and not buf:
                raise PeerClosed()
            raise FrameError(ErrorCode.PROTOCOL_ERROR, "truncated frame")
        buf += chunk
    return bytes(buf)


def recv_frame(
    sock: socket.socket,
    max_size: int = DEFAULT_MAX_FRAME,
    timeout: float = DEFAULT_TIMEOUT,
) -> bytes:
    """Read one whole frame, or raise FrameError (PeerClosed if closed before its first byte)."""
    deadline = time.monotonic() + timeout
    (length,) = _HEADER.unpack(_read_exact(sock, _HEADER.size, deadline, at_boundary=True))
    if length > max_size:
        raise FrameError(
            ErrorCode.FRAME_TOO_LARGE, f"declared frame of {length} bytes > {max_size}"
        )
    return _read_exact(sock, length, deadline, at_boundary=False)


def send_json(sock: socket.socket, obj: Any, max_size: int = DEFAULT_MAX_FRAME) -> None:
    send_frame(sock, json.dumps(obj, separators=(",", ":")).encode(), max_size)


def recv_json(
    sock: socket.socket,
    max_size: int = DEFAULT_MAX_FRAME,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Read one frame holding a JSON object; anything else is a PROTOCOL_ERROR."""
    raw = recv_frame(sock, max_size, timeout)
    try:
        obj = json.loads(raw)
    # RecursionError: deeply nested arrays fit easily in a frame from an untrusted peer.
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(ErrorCode.PROTOCOL_ERROR, "frame is not JSON") from exc
    if not isinstance(obj, dict):
        raise FrameError(ErrorCode.PROTOCOL_ERROR, "frame is not a JSON object")
    return obj
