"""Transport addresses (`vsock://CID:PORT`, `unix:///path`, `tcp://host:port`) for both ends.

The same framing runs over all three; local mode uses unix sockets because this machine's kernel
has AF_VSOCK but no loopback transport.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_UNIX_PATH = 100  # sun_path is 108 bytes; keep a margin


@dataclass(frozen=True)
class Address:
    scheme: str  # "vsock" | "unix" | "tcp"
    host: str = ""  # tcp host, or the vsock CID as text
    port: int = 0
    path: str = ""  # unix socket path

    @classmethod
    def parse(cls, text: str) -> Address:
        parts = urlsplit(text)
        if parts.scheme == "unix":
            path = (parts.netloc + parts.path) if parts.netloc else parts.path
            if not path:
                raise ValueError(f"unix address needs a path: {text!r}")
            if len(os.fsencode(path)) >= MAX_UNIX_PATH:
                raise ValueError(f"unix socket path longer than {MAX_UNIX_PATH} bytes: {path!r}")
            return cls("unix", path=path)
        if parts.scheme in ("vsock", "tcp"):
            try:
                host, port = parts.hostname, parts.port
            except ValueError as exc:
                raise ValueError(f"bad port in {text!r}") from exc
            if not host or port is None:
                raise ValueError(f"{parts.scheme} address needs host and port: {text!r}")
            if parts.scheme == "vsock" and not host.isdigit():
                raise ValueError(f"vsock CID must be a number: {text!r}")
            return cls(parts.scheme, host=host, port=port)
        raise ValueError(f"unknown transport {parts.scheme!r} in {text!r} (vsock, unix, tcp)")

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6, as parse reads it
        return f"{self.scheme}://{host}:{self.port}"

    def _family_and_target(self) -> tuple[int, object]:
        if self.scheme == "unix":
            return socket.AF_UNIX, self.path
        if self.scheme == "vsock":
            return socket.AF_VSOCK, (int(self.host), self.port)
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET, (self.host, self.port)

    def connect(self, timeout: float) -> socket.socket:
        family, target = self._family_and_target()
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        return sock

    def listen(self, backlog: int = 128) -> socket.socket:
        family, target = self._family_and_target()
        if self.scheme == "unix" and os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket left by a killed server
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family != socket.AF_UNIX and family != socket.AF_VSOCK:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(target)
            if self.scheme == "unix":
                os.chmod(self.path, 0o600)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock


def parse_host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def accept_loop(
    listener: socket.socket,
    stop: threading.Event,
    slots: threading.BoundedSemaphore,
    handle: Callable[[socket.socket], None],
    refuse: Callable[[socket.socket], None],
) -> None:
    """Accept until `stop` is set: a thread per connection running `handle`, at most as many
    as `slots` holds (the slot is released when `handle` returns); `refuse` gets the rest."""
    listener.settimeout(0.5)  # wake up to notice `stop`

    def run(conn: socket.socket) -> None:
        try:
            handle(conn)
        finally:
            slots.release()

    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            if stop.is_set():
                break
            raise
        if not slots.acquire(blocking=False):
            refuse(conn)
            continue
        threading.Thread(target=run, args=(conn,), daemon=True).start()
