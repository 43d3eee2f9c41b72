"""The enclave's only way out: TCP on its loopback relayed to the parent's vsock-proxy.

An enclave has no network. boto3 inside it connects to kms.<region>.amazonaws.com:443, which
/etc/hosts maps to 127.0.0.1, where this forwarder relays each connection byte for byte to
vsock CID 3 port 8000 (the parent, where AWS's vsock-proxy reaches KMS). TLS runs end to end
between boto3 and KMS: the forwarder and the parent only ever see ciphertext.

`python -m enclave.forwarder setup` brings up `lo` and maps the configured KMS host;
`python -m enclave.forwarder serve` listens. The entrypoint (enclave/entrypoint.sh) runs both.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from protocol.logs import Timer, configure, event
from protocol.transport import Address, accept_loop

DEFAULT_TARGET = "vsock://3:8000"  # the parent instance (CID 3), where vsock-proxy listens
MAX_CONNECTIONS = 64  # boto3 keeps a pool of 10; more than this is a bug or an attack
CONNECT_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 120.0  # a relayed connection silent in both directions this long is closed
CHUNK = 64 * 1024

log = logging.getLogger("forwarder")


class ForwarderError(Exception):
    """Setting up the enclave's loopback path failed; the message says what."""


# ---- setup: lo up, the KMS host on loopback -----------------------------------------------------

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH14x"  # struct ifreq: name, then the flags member of the union, padded to 32 bytes


def loopback_up(name: str = "lo") -> bool:
    """Bring interface `name` up (an enclave boots with `lo` down). Returns True if it was down.

    The ioctls `ip link set lo up` makes, so that the image needs no iproute2.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, name.encode(), 0)
        try:
            flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        except OSError as exc:
            raise ForwarderError(f"cannot read the flags of {name}: {exc.strerror}") from exc
        if flags & _IFF_UP:
            return False
        try:
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | _IFF_UP))
        except OSError as exc:
            raise ForwarderError(f"cannot bring {name} up: {exc.strerror}") from exc
    return True


def map_host(host: str, hosts_file: Path = Path("/etc/hosts")) -> bool:
    """Make `host` resolve to 127.0.0.1 through `hosts_file`. Returns True if a line was added."""
    if _is_ip(host):
        return False
    try:
        current = hosts_file.read_text() if hosts_file.exists() else ""
    except OSError as exc:
        raise ForwarderError(f"cannot read {hosts_file}: {exc.strerror}") from exc
    for line in current.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0] == "127.0.0.1" and host in fields[1:]:
            return False
    prefix = "" if not current or current.endswith("\n") else "\n"
    try:
        with hosts_file.open("a") as handle:
            handle.write(f"{prefix}127.0.0.1 {host}\n")
    except OSError as exc:
        raise ForwarderError(f"cannot write {hosts_file}: {exc.strerror}") from exc
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def kms_host_port(endpoint_url: str) -> tuple[str, int]:
    """The host and port boto3 connects to for `endpoint_url` (the measured configuration's)."""
    parts = urlsplit(endpoint_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ForwarderError(f"the KMS endpoint must be an http(s) URL, not {endpoint_url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ForwarderError(f"bad port in the KMS endpoint {endpoint_url!r}") from exc
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


# ---- serve: the relay ---------------------------------------------------------------------------


def relay(one: socket.socket, other: socket.socket, idle_timeout: float = IDLE_TIMEOUT_S) -> int:
    """Copy bytes both ways until both sides have finished sending; returns the bytes copied.

    One thread per direction, so that a side writing while its peer writes too never blocks
    the other direction. A side that closes its sending half is passed on as a half-close (TLS
    close_notify and HTTP rely on it). Silence in both directions for `idle_timeout`, or an error
    on either side, ends the relay.
    """
    lock = threading.Lock()
    state = {"last": time.monotonic(), "copied": 0}
    broken = threading.Event()
    for sock in (one, other):
        sock.settimeout(idle_timeout)  # bounds sendall to a peer that stopped reading
    poll = min(1.0, idle_timeout)

    def pump(source: socket.socket, sink: socket.socket) -> None:
        while not broken.is_set():
            try:
                readable, _, _ = select.select([source], [], [], poll)
                if not readable:
                    with lock:
                        idle = time.monotonic() - state["last"] > idle_timeout
                    if idle:
                        broken.set()
                    continue
                data = source.recv(CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
            except (OSError, ValueError):  # a reset, a timeout, or a socket closed under us
                broken.set()
                return
            with lock:
                state["last"] = time.monotonic()
                state["copied"] += len(data)

    back = threading.Thread(target=pump, args=(other, one), daemon=True)
    back.start()
    pump(one, other)
    back.join()
    return state["copied"]


class Forwarder:
    """Accepts on `listen` and relays each connection to a new connection to `target`."""

    def __init__(
        self,
        listen: Address,
        target: Address,
        *,
        max_connections: int = MAX_CONNECTIONS,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        idle_timeout: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.listen_address, self.target = listen, target
        self.connect_timeout, self.idle_timeout = connect_timeout, idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self.refused = 0  # connections closed at once: no slot
        self.failed = 0  # connections whose target could not be reached
        self.relayed = 0  # connections relayed to the end

    def bind(self) -> Address:
        """Start listening; returns the address bound (a tcp port 0 becomes the chosen port)."""
        self._listener = self.listen_address.listen()
        if self.listen_address.scheme == "tcp":
            host, port = self._listener.getsockname()[:2]
            self.listen_address = Address("tcp", host=host, port=port)
        return self.listen_address

    def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Accept until `shutdown()`; binds first if `bind()` was not called."""
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        event(log, "forwarding", listen=str(self.listen_address), target=str(self.target))
        if ready is not None:
            ready()
        try:
            accept_loop(self._listener, self._stop, self._slots, self._handle, self._refuse)
        finally:
            self._listener.close()

    def shutdown(self) -> None:
        self._stop.set()

    def _refuse(self, conn: socket.socket) -> None:
        self.refused += 1
        event(log, "connection_refused", logging.WARNING, reason="too many connections")
        conn.close()

    def _handle(self, conn: socket.socket) -> None:
        timer = Timer()
        with conn:
            try:
                upstream = self.target.connect(self.connect_timeout)
            except OSError as exc:
                self.failed += 1
                event(
                    log,
                    "target_unreachable",
                    logging.WARNING,
                    target=str(self.target),
                    error=type(exc).__name__,
                )
                return
            with upstream:
                copied = relay(conn, upstream, self.idle_timeout)
        self.relayed += 1
        event(log, "relayed", bytes=copied, duration_ms=timer.ms())


# ---- command line -------------------------------------------------------------------------------


def _endpoint(config_path: str) -> str:
    from enclave.config import ConfigError, EnclaveConfig

    try:
        return EnclaveConfig.load(config_path).endpoint_url
    except ConfigError as exc:
        raise ForwarderError(str(exc)) from exc


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m enclave.forwarder", description=__doc__)
    parser.add_argument("command", choices=("setup", "serve"))
    parser.add_argument(
        "--config",
        default=os.environ.get("NITRO_ENCLAVE_CONFIG", "/app/config/enclave.json"),
        help="the measured configuration, whose KMS endpoint is forwarded (env "
        "NITRO_ENCLAVE_CONFIG)",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("NITRO_KMS_FORWARD_TARGET", DEFAULT_TARGET),
        help="where KMS traffic goes: vsock://3:8000 (the parent's vsock-proxy), or "
        "unix:///path for a local stand-in (env NITRO_KMS_FORWARD_TARGET)",
    )
    parser.add_argument(
        "--listen",
        help="tcp://127.0.0.1:PORT to listen on (default: the KMS endpoint's port on 127.0.0.1)",
    )
    parser.add_argument("--hosts-file", type=Path, default=Path("/etc/hosts"))
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    parser.add_argument("--log-level", default=os.environ.get("NITRO_LOG_LEVEL", "INFO"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    configure("forwarder", args.log_level)
    try:
        host, port = kms_host_port(_endpoint(args.config))
        if args.command == "setup":
            raised = loopback_up()
            mapped = map_host(host, args.hosts_file)
            event(log, "setup", loopback_raised=raised, kms_host=host, mapped=mapped)
            return 0
        listen = Address.parse(args.listen or f"tcp://127.0.0.1:{port}")
        target = Address.parse(args.target)
        if not 1 <= args.max_connections <= 1024:
            raise ForwarderError("--max-connections must be from 1 to 1024")
        forwarder = Forwarder(listen, target, max_connections=args.max_connections)
        forwarder.bind()
    except (ForwarderError, ValueError, OSError) as exc:
        print(f"forwarder: {exc}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: forwarder.shutdown())
    started = time.monotonic()
    forwarder.serve()
    event(log, "stopped", uptime_s=round(time.monotonic() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
