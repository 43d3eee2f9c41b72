"""The enclave's TCP-to-vsock forwarder, on loopback, with a unix socket standing in for vsock.

AF_VSOCK has no loopback transport on this machine; the forwarder's target is an Address, so a
unix socket plays the parent's vsock-proxy (CID 3, port 8000).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emulator.ca import issue_server_tls
from enclave.forwarder import (
    Forwarder,
    ForwarderError,
    kms_host_port,
    loopback_up,
    map_host,
    relay,
)
from protocol.transport import Address

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short paths: a unix socket path must stay under 100 bytes.
    with tempfile.TemporaryDirectory(prefix="fwd-", dir="/tmp") as name:
        yield Path(name)


class UnixServer:
    """The stand-in for the parent's side of vsock port 8000: `serve_one` per connection."""

    def __init__(self, path: Path, serve_one: Callable[[socket.socket], None]) -> None:
        self.path = path
        self.listener = Address("unix", path=str(path)).listen()
        self.listener.settimeout(0.2)
        self.serve_one = serve_one
        self.accepted = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            self.serve_one(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


def echo_until_eof(conn: socket.socket) -> None:
    """Echo everything, then, once the peer half-closed, send a trailer and close."""
    received = 0
    while data := conn.recv(65536):
        received += len(data)
        conn.sendall(data)
    conn.sendall(f"END {received}".encode())


def unix(path: Path) -> Address:
    return Address("unix", path=str(path))


@contextlib.contextmanager
def running(forwarder: Forwarder) -> Iterator[Address]:
    address = forwarder.bind()
    thread = threading.Thread(target=forwarder.serve, daemon=True)
    thread.start()
    try:
        yield address
    finally:
        forwarder.shutdown()
        thread.join(timeout=5)
        assert not thread.is_alive()


def tcp_connect(address: Address) -> socket.socket:
    conn = socket.create_connection((address.host, address.port), timeout=10)
    return conn


def recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while data := conn.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def test_relays_both_ways_and_passes_the_half_close_on(sock_dir: Path) -> None:
    target = UnixServer(sock_dir / "vsock-8000.sock", echo_until_eof)
    forwarder = Forwarder(Address.parse("tcp://127.0.0.1:0"), unix(target.path))
    # Far more than the socket buffers hold, so both directions are full at once: the echo
    # server writes while the client is still writing (a relay that copied one direction at a
    # time would deadlock here), and reads are partial.
    payload = os.urandom(4 * 1024 * 1024 + 123)
    try:
        with running(forwarder) as address, tcp_connect(address) as conn:
            received = bytearray()
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            while len(received) < len(payload):
                received += conn.recv(65536)
            sender.join(timeout=10)
            conn.shutdown(socket.SHUT_WR)  # the target sees EOF only if the forwarder passes it on
            trailer = recv_all(conn)
        assert bytes(received) == payload
        assert trailer == f"END {len(payload)}".encode()
        assert target.accepted == 1
    finally:
        target.close()


def test_tls_runs_end_to_end_and_the_forwarder_sees_only_ciphertext(sock_dir: Path) -> None:
    ca, cert, key = issue_server_tls(sock_dir / "tls", ["kms.us-east-1.amazonaws.com"])
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    secret = b"plaintext that only the two TLS ends may read " * 50
    tapped: list[bytes] = []

    def tls_echo(conn: socket.socket) -> None:
        with server_context.wrap_socket(conn, server_side=True) as tls:
            received = bytearray()
            while len(received) < len(secret):
                received += tls.recv(65536)
            tls.sendall(received)

    def tap(conn: socket.socket) -> None:
        # The parent's side of vsock (vsock-proxy's place): relays, and records what crosses.
        def pump(source: socket.socket, sink: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := source.recv(65536):
                    tapped.append(data)
                    sink.sendall(data)
                sink.shutdown(socket.SHUT_WR)

        with Address("unix", path=str(sock_dir / "tls.sock")).connect(10) as upstream:
            upstream.settimeout(10)
            back = threading.Thread(target=pump, args=(upstream, conn))
            back.start()
            pump(conn, upstream)
            back.join(timeout=10)

    tls_server = UnixServer(sock_dir / "tls.sock", tls_echo)
    parent = UnixServer(sock_dir / "vsock.sock", tap)
    forwarder = Forwarder(Address.parse("tcp://127.0.0.1:0"), unix(parent.path))
    client_context = ssl.create_default_context(cafile=str(ca))
    try:
        with running(forwarder) as address, tcp_connect(address) as raw:
            with client_context.wrap_socket(
                raw, server_hostname="kms.us-east-1.amazonaws.com"
            ) as tls:
                tls.sendall(secret)
                echoed = bytearray()
                while len(echoed) < len(secret):
                    echoed += tls.recv(65536)
        assert bytes(echoed) == secret
        seen = b"".join(tapped)
        assert len(seen) > 2 * len(secret)  # both ways crossed the parent's side ...
        assert b"plaintext that only" not in seen  # ... as ciphertext only
    finally:
        parent.close()
        tls_server.close()


def test_connections_are_bounded_and_the_rest_refused(sock_dir: Path) -> None:
    release = threading.Event()

    def hold(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        release.wait(10)

    target = UnixServer(sock_dir / "v.sock", hold)
    forwarder = Forwarder(Address.parse("tcp://127.0.0.1:0"), unix(target.path), max_connections=2)
    try:
        with running(forwarder) as address:
            held = [tcp_connect(address) for _ in range(2)]
            for conn in held:
                assert conn.recv(5) == b"hello"
            with tcp_connect(address) as third:
                assert third.recv(5) == b""  # closed at once: no slot
            assert forwarder.refused == 1
            assert target.accepted == 2  # the refused one never reached the parent
            release.set()
            for conn in held:
                assert recv_all(conn) == b""
                conn.close()
            deadline = time.monotonic() + 5
            while True:  # slots come back when the relays end
                with tcp_connect(address) as again:
                    if again.recv(5) == b"hello":
                        break
                assert time.monotonic() < deadline, "no slot came back"
                time.sleep(0.1)
    finally:
        release.set()
        target.close()


def test_an_unreachable_target_closes_the_connection_and_keeps_serving(sock_dir: Path) -> None:
    missing = Address("unix", path=str(sock_dir / "nobody.sock"))
    forwarder = Forwarder(Address.parse("tcp://127.0.0.1:0"), missing)
    with running(forwarder) as address:
        with tcp_connect(address) as conn:
            assert recv_all(conn) == b""  # closed, not left hanging
        assert forwarder.failed == 1
        target = UnixServer(sock_dir / "nobody.sock", echo_until_eof)  # the parent comes back
        try:
            with tcp_connect(address) as conn:
                conn.sendall(b"ping")
                conn.shutdown(socket.SHUT_WR)
                assert recv_all(conn) == b"pingEND 4"
        finally:
            target.close()


def test_a_silent_relay_ends_after_the_idle_timeout() -> None:
    left, right = socket.socketpair()
    far_left, far_right = socket.socketpair()
    started = time.monotonic()
    with left, right, far_left, far_right:
        left.sendall(b"x")
        copied = relay(right, far_left, idle_timeout=0.3)
        assert far_right.recv(1) == b"x"
    assert copied == 1
    assert time.monotonic() - started < 3


def test_map_host_adds_the_kms_host_once(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost")  # no final newline
    assert map_host("kms.eu-west-1.amazonaws.com", hosts) is True
    assert map_host("kms.eu-west-1.amazonaws.com", hosts) is False
    assert hosts.read_text() == "127.0.0.1 localhost\n127.0.0.1 kms.eu-west-1.amazonaws.com\n"
    assert map_host("127.0.0.1", hosts) is False  # an address needs no mapping
    assert map_host("kms.us-east-1.amazonaws.com", tmp_path / "new-hosts") is True


def test_kms_host_port_follows_the_measured_endpoint() -> None:
    assert kms_host_port("https://kms.eu-west-1.amazonaws.com") == (
        "kms.eu-west-1.amazonaws.com",
        443,
    )
    assert kms_host_port("http://127.0.0.1:4566") == ("127.0.0.1", 4566)
    for bad in ("ftp://kms.example", "kms.us-east-1.amazonaws.com", "https://h:99999"):
        with pytest.raises(ForwarderError):
            kms_host_port(bad)


def test_loopback_up_reads_the_interface_and_names_a_missing_one() -> None:
    up = {name for _, name in socket.if_nameindex()}
    assert "lo" in up
    assert loopback_up("lo") is False  # already up here: nothing changed, no privilege needed
    with pytest.raises(ForwarderError, match="nosuchif0"):
        loopback_up("nosuchif0")
    assert ipaddress.ip_address("127.0.0.1").is_loopback


def _run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enclave.forwarder", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_cli_setup_maps_the_configured_region_and_serve_refuses_a_bad_target(
    tmp_path: Path,
) -> None:
    config = tmp_path / "enclave.json"
    config.write_text(json.dumps({"region": "eu-west-1", "key_ids": ["k"], "model_dir": "/m"}))
    hosts = tmp_path / "hosts"
    done = _run_cli("setup", "--config", str(config), "--hosts-file", str(hosts))
    assert done.returncode == 0, done.stderr
    assert "127.0.0.1 kms.eu-west-1.amazonaws.com" in hosts.read_text()
    bad = _run_cli("serve", "--config", str(config), "--target", "vsock://parent:8000")
    assert bad.returncode == 2
    assert "vsock CID must be a number" in bad.stderr
    missing = _run_cli("setup", "--config", str(tmp_path / "none.json"))
    assert missing.returncode == 2
    assert "not found" in missing.stderr


def test_cli_serve_forwards_until_terminated(tmp_path: Path, sock_dir: Path) -> None:
    config = tmp_path / "enclave.json"
    config.write_text(json.dumps({"region": "eu-west-1", "key_ids": ["k"], "model_dir": "/m"}))
    target = UnixServer(sock_dir / "p.sock", echo_until_eof)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "enclave.forwarder", "serve", "--config", str(config)]
        + ["--listen", f"tcp://127.0.0.1:{port}", "--target", f"unix://{target.path}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the forwarder never listened"
                time.sleep(0.1)
        with conn:
            conn.sendall(b"abc")
            conn.shutdown(socket.SHUT_WR)
            assert recv_all(conn) == b"abcEND 3"
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        assert [line["event"] for line in lines][:1] == ["forwarding"]
        assert any(line["event"] == "relayed" and line["bytes"] == 3 + 3 + 5 for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        target.close()
