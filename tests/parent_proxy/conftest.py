"""Stand-ins for the parent proxy's tests: an enclave speaking the frame protocol on a unix
socket, TLS files from a test CA, a valid v2 request body, and a launcher for `parent-proxy`."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from emulator.ca import issue_server_tls
from protocol import envelope
from protocol.errors import ErrorCode, NitroError
from protocol.framing import recv_json as _recv_json
from protocol.framing import send_json
from protocol.messages import CONTENT_JSON, CONTENT_NDJSON, body_frame, status_frame
from protocol.transport import Address

PARENT_CREDENTIALS = {
    "access_key_id": "AKIAPARENTROLE00001",
    "secret_access_key": "parent-secret-do-not-log-0001",
    "session_token": None,
}
KEY_ID = "arn:aws:kms:us-east-1:111122223333:key/11111111-2222-3333-4444-555555555555"

Handler = Callable[[socket.socket, dict[str, Any]], None]


# ---- the stand-in enclave ----------------------------------------------------------------------


class StandInEnclave:
    """Accepts connections on a unix socket, records each request frame and lets `handler`
    answer. Tests swap `handler` to script what the enclave does."""

    def __init__(self, path: str) -> None:
        self.address = Address.parse(f"unix://{path}")
        self.frames: list[dict[str, Any]] = []
        self.handler: Handler = json_answer({"ok": True})
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> StandInEnclave:
        self._listener = self.address.listen()
        self._listener.settimeout(0.05)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def stopping(self) -> threading.Event:
        return self._stop

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
        self._listener.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            frame = _recv_json(conn, timeout=10)
            self.frames.append(frame)
            self.handler(conn, frame)
        except (OSError, NitroError):
            pass  # the proxy went away or sent nothing: some tests do that on purpose
        finally:
            conn.close()


def json_answer(data: dict[str, Any]) -> Handler:
    def handle(conn: socket.socket, frame: dict[str, Any]) -> None:
        send_json(conn, status_frame(200, CONTENT_JSON))
        send_json(conn, body_frame(data, final=True))

    return handle


def stream_answer(
    items: list[dict[str, Any]], gate: threading.Event | None = None, delay: float = 0.0
) -> Handler:
    """NDJSON answer; with `gate`, waits (up to 10 s) for it after the first chunk and records
    in `handle.gate_opened` whether it opened before the rest was sent."""

    def handle(conn: socket.socket, frame: dict[str, Any]) -> None:
        send_json(conn, status_frame(200, CONTENT_NDJSON))
        for index, item in enumerate(items):
            if index > 0:
                time.sleep(delay)
            if index == 1 and gate is not None:
                handle.gate_opened = gate.wait(10)  # type: ignore[attr-defined]
            send_json(conn, body_frame(item, final=index == len(items) - 1))

    handle.gate_opened = None  # type: ignore[attr-defined]
    return handle


def error_answer(code: ErrorCode, message: str | None = None) -> Handler:
    def handle(conn: socket.socket, frame: dict[str, Any]) -> None:
        error = NitroError(code, message)
        send_json(conn, status_frame(code.http_status, error=error))

    return handle


def raw_answer(data: bytes) -> Handler:
    def handle(conn: socket.socket, frame: dict[str, Any]) -> None:
        conn.sendall(data)

    return handle


def hang(enclave: StandInEnclave, after: list[dict[str, Any]] | None = None) -> Handler:
    """Send `after` frames (raw JSON objects), then say nothing until the test ends."""

    def handle(conn: socket.socket, frame: dict[str, Any]) -> None:
        for obj in after or []:
            send_json(conn, obj)
        enclave.stopping.wait(30)

    return handle


class EndlessStream:
    """Streams chunks every `interval` seconds until the proxy closes the connection."""

    def __init__(self, interval: float = 0.05, limit: int = 400) -> None:
        self.interval, self.limit = interval, limit
        self.sent = 0
        self.peer_closed = threading.Event()

    def __call__(self, conn: socket.socket, frame: dict[str, Any]) -> None:
        send_json(conn, status_frame(200, CONTENT_NDJSON))
        try:
            for index in range(self.limit):
                send_json(conn, body_frame({"seq": index}, final=index == self.limit - 1))
                self.sent += 1
                time.sleep(self.interval)
        except OSError:
            self.peer_closed.set()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (paths must stay under 100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def enclave(short_dir: Path) -> Iterator[StandInEnclave]:
    stand_in = StandInEnclave(str(short_dir / "enclave.sock")).start()
    yield stand_in
    stand_in.stop()


# ---- request bodies ----------------------------------------------------------------------------


def sealed_body(stream: bool = False, prompt: str = "Question: hello?\nAnswer:") -> dict[str, Any]:
    """A well-formed v2 request body under a random data key (the proxy cannot open it)."""
    session = envelope.b64url(os.urandom(16))
    keys = envelope.derive_keys(os.urandom(32), session)
    header = envelope.Header(
        KEY_ID, session, envelope.b64url(os.urandom(16)), int(time.time() * 1000), stream
    )
    question = {"prompt": prompt, "max_new_tokens": 8}
    return envelope.seal_request(keys, header, b"encrypted-data-key", question).to_json()


@pytest.fixture
def credentials_file(tmp_path: Path) -> Path:
    path = tmp_path / "parent.json"
    path.write_text(json.dumps({"credentials": PARENT_CREDENTIALS}))
    path.chmod(0o600)
    return path


# ---- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A test CA and a server certificate it signed for 127.0.0.1 and localhost."""
    return TlsFiles(*issue_server_tls(tmp_path_factory.mktemp("tls"), ["127.0.0.1", "localhost"]))


# ---- the real `parent-proxy` process -----------------------------------------------------------


@dataclass
class ProxyProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    tls: TlsFiles

    def connection(self, timeout: float = 10.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.tls.client_context(), timeout=timeout
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(5)
        return self.process.returncode


def start_proxy(
    directory: Path,
    tls: TlsFiles,
    enclave: Address | str,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ProxyProcess:
    """Start `parent-proxy` on a free loopback port and wait for its `listening` line."""
    script = Path(sys.executable).parent / "parent-proxy"
    log_path = directory / f"proxy-{time.monotonic_ns()}.log"
    argv = [
        str(script),
        "--bind", "127.0.0.1:0",
        "--enclave", str(enclave),
        "--certfile", str(tls.cert),
        "--keyfile", str(tls.key),
        "--workers", "1",
        "--threads", "4",
        *(extra or []),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if '"event":"listening"' in line:
                port = int(json.loads(line)["url"].rsplit(":", 1)[1])
                proxy = ProxyProcess(process, port, log_path, tls)
                _wait_until_serving(proxy, deadline)
                return proxy
        if process.poll() is not None:
            raise RuntimeError(f"parent-proxy exited: {log_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("parent-proxy did not start in time")


def start_local_proxy(
    directory: Path, tls: TlsFiles, enclave: Address | str, extra: list[str] | None = None
) -> ProxyProcess:
    """start_proxy in local mode: the parent role's credentials from DIR/parent.json."""
    parent_json = directory / "parent.json"
    parent_json.write_text(json.dumps({"credentials": PARENT_CREDENTIALS}))
    local = ["--credentials-file", str(parent_json), *(extra or [])]
    return start_proxy(directory, tls, enclave, local)


@pytest.fixture(scope="module")
def stand_in() -> Iterator[StandInEnclave]:
    """One stand-in enclave for a module's proxy process, its socket in a short /tmp path."""
    directory = Path(tempfile.mkdtemp(prefix="pp-", dir="/tmp"))
    enclave = StandInEnclave(str(directory / "enclave.sock")).start()
    yield enclave
    enclave.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _wait_until_serving(proxy: ProxyProcess, deadline: float) -> None:
    # The arbiter listens before its worker has booted; /healthz answers once one has.
    while time.monotonic() < deadline:
        try:
            if proxy.request("GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("parent-proxy never answered /healthz")


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (importing a conftest by name is not reliable)."""
    return SimpleNamespace(
        json_answer=json_answer,
        stream_answer=stream_answer,
        error_answer=error_answer,
        raw_answer=raw_answer,
        hang=hang,
        EndlessStream=EndlessStream,
        StandInEnclave=StandInEnclave,
        sealed_body=sealed_body,
        start_proxy=start_proxy,
        start_local_proxy=start_local_proxy,
        parent_credentials=PARENT_CREDENTIALS,
    )
