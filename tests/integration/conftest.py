"""What the full-stack tests share, as fixtures (test modules are imported with
--import-mode=importlib, so they cannot import each other or this file by name).

`cli`: the project's console scripts, run in subprocesses as a user runs them.
`local_stack`: a factory, `local_stack(name, *up_args)`, that runs `nitro-local up` on the tiny
model in a fresh state directory and runs `nitro-local down` when the module's tests are done.
`stack_logs`: `stack_logs(paths)` reads the components' JSON logs (`StackLogs`).
`processes`: whether a process lives, which ones name a path, killing a component's group.
`enclave_socket`: frames to and from an enclave server's socket, as the proxy sends them.
`sealing`: a conversation's data key from KMS and a question sealed under it, as the chatbot does.
`start_backend`: `start_backend(paths, model_dir)` starts what an enclave server needs below the
proxy (the KMS emulator with the app's key, the enclave's config, the key policy pinned to its
PCRs, the NSM emulator), for modules that start enclave servers themselves.
`app_snapshot`: `app_snapshot(dst)` copies enclave/ and protocol/ (what the enclave runs and is
measured by) to `dst`, so that edits to the checkout during a run change no PCR.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulator import stack
from protocol import envelope
from protocol.errors import NitroError
from protocol.framing import recv_json, send_json
from protocol.messages import Kind, Question, RequestFrame, Status, parse_body_frame
from protocol.transport import Address

COMMAND_TIMEOUT_S = 240.0
LOCAL = "127.0.0.1,localhost"


class Cli:
    """The console scripts beside this interpreter, with loopback kept off any HTTP proxy."""

    def __init__(self) -> None:
        self.bin = Path(sys.executable).parent
        self.env = dict(os.environ, NO_PROXY=LOCAL, no_proxy=LOCAL)

    def path(self, script: str) -> str:
        return str(self.bin / script)

    def run(
        self, *argv: str, stdin: str | None = None, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess:
        return subprocess.run(  # noqa: S603 - the project's own console scripts
            [self.path(argv[0]), *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )


class StackLogs:
    """The components' logs in a state directory: one JSON object a line (a line still being
    written, and nitro-local's start markers, are not records)."""

    def __init__(self, paths: stack.StatePaths) -> None:
        self.paths = paths

    def lines(self, component: str) -> list[str]:
        text = self.paths.log(component).read_text(errors="replace")
        return [line for line in text.splitlines() if line.startswith("{")]

    def count(self, component: str, needle: str) -> int:
        """Lines of the component's log holding `needle` (a `"field":value` of compact JSON)."""
        return sum(1 for line in self.lines(component) if needle in line)

    def records(self, component: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines(component):
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict):
                    found.append(record)
        return found

    def events(self, component: str, event: str) -> list[dict[str, Any]]:
        return [record for record in self.records(component) if record.get("event") == event]

    def proxy_requests(self, path: str) -> int:
        """Requests the proxy logged for `path` (e.g. /v1/chat: sealed questions relayed)."""
        return self.count("proxy", f'"path":"{path}"')

    def kms_calls(self, operation: str) -> int:
        """Calls the KMS emulator logged for `operation` (Decrypt, GenerateDataKey, ...)."""
        return sum(1 for record in self.records("kms") if record.get("operation") == operation)

    def text(self) -> str:
        """Every log of the state directory, one after the other."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.paths.logs.glob("*.log")))


@dataclass
class LocalStack:
    """A stack `nitro-local up` started, and what its tests read of it."""

    root: Path
    paths: stack.StatePaths
    up: subprocess.CompletedProcess
    up_seconds: float
    pids: dict[str, int]  # each running component's, just after `up`
    logs: StackLogs
    cli: Cli

    @property
    def up_output(self) -> str:
        return self.up.stdout + self.up.stderr

    def profile(self) -> dict[str, Any]:
        return stack.read_profile(self.paths)

    def measure(self) -> dict[str, str]:
        """What `nitro-local measure --json` prints: the user's way to learn the PCRs to expect."""
        done = self.cli.run("nitro-local", "measure", "--state-dir", str(self.root), "--json")
        assert done.returncode == 0, done.stderr[-3000:]
        pcrs = json.loads(done.stdout)
        assert {"PCR0", "PCR1", "PCR2"} <= set(pcrs)
        return pcrs

    def get(self, path: str, timeout: float = 60) -> tuple[int, dict[str, Any]]:
        """GET `path` of the proxy over its TLS (status, JSON body), an error status included."""
        profile = self.profile()
        context = ssl.create_default_context(cafile=profile["ca_bundle"])
        url = profile["proxy_url"] + path
        try:
            with urllib.request.urlopen(url, context=context, timeout=timeout) as r:  # noqa: S310
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def state_files(self) -> dict[str, bytes]:
        """Every regular file of the state directory, by its path in it."""
        files = {}
        for path in self.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    files[str(path.relative_to(self.root))] = path.read_bytes()
        return files


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def stack_logs() -> Callable[[stack.StatePaths], StackLogs]:
    return StackLogs


@pytest.fixture(scope="module")
def local_stack(
    cli: Cli, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LocalStack]]:
    """`local_stack(name, *up_args)`: `nitro-local up --state-dir <fresh>/state --model-dir
    <tiny> *up_args`, asserted to succeed; every stack it started is downed after the module."""
    roots: list[Path] = []

    def up(name: str, *up_args: str) -> LocalStack:
        root = tmp_path_factory.mktemp(name) / "state"
        roots.append(root)  # downed even if `up` fails half way
        argv = ["nitro-local", "up", "--state-dir", str(root), "--model-dir", str(tiny_model_dir)]
        started = time.monotonic()
        done = cli.run(*argv, *up_args)
        seconds = time.monotonic() - started
        assert done.returncode == 0, done.stderr[-3000:]
        paths = stack.StatePaths(root)
        pids = {name: pid for name, pid in stack.status(paths).items() if pid is not None}
        return LocalStack(root, paths, done, seconds, pids, StackLogs(paths), cli)

    try:
        yield up
    finally:
        for root in reversed(roots):
            cli.run("nitro-local", "down", "--state-dir", str(root))


class Processes:
    """Processes of this machine, as /proc shows them."""

    @staticmethod
    def alive(pid: int) -> bool:
        """Running (a zombie is not); a child of this process that ended is reaped."""
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state != "Z"

    @classmethod
    def naming(cls, text: str | Path) -> list[int]:
        """Live processes (this one aside) whose command line holds `text`, e.g. a state dir."""
        needle, found = os.fsencode(text), []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes() and cls.alive(int(entry.name)):
                    found.append(int(entry.name))
        return found

    @classmethod
    def kill(cls, pid: int, sig: signal.Signals = signal.SIGKILL, timeout: float = 30) -> None:
        """Signal a component's process group (started in its own session) and wait until the
        process died."""
        os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while cls.alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"no end of pid {pid} after {timeout:.0f} s")
            time.sleep(0.05)


@pytest.fixture(scope="session")
def processes() -> Processes:
    return Processes()


class EnclaveSocket:
    """Frames to an enclave server's socket and its answer, as the proxy exchanges them."""

    @staticmethod
    def exchange(
        address: Address, frame: dict[str, Any], timeout: float = 60
    ) -> tuple[Status, list[dict[str, Any]]]:
        """Send one frame; (the status frame, every body frame to the final one if it is 200)."""
        with address.connect(timeout=timeout) as sock:
            send_json(sock, frame)
            status = Status.from_json(recv_json(sock, timeout=timeout))
            if status.status != 200:
                return status, []
            bodies = []
            while True:
                final, data = parse_body_frame(recv_json(sock, timeout=timeout))
                bodies.append(data)
                if final:
                    return status, bodies

    @classmethod
    def ready(cls, address: Address, timeout: float = 30) -> dict[str, Any]:
        """The enclave's answer to a readiness probe: {"ready": ..., "model": ...}."""
        frame = RequestFrame(Kind.READY, "ready-probe").to_json()
        status, bodies = cls.exchange(address, frame, timeout)
        assert status.status == 200 and bodies, status.error
        return bodies[0]

    @classmethod
    def wait_ready(cls, address: Address, log: Path, timeout: float = 120) -> None:
        """Until the enclave at `address` says it is ready; its log's tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, NitroError, AssertionError):  # not listening yet
                if cls.ready(address, timeout=5)["ready"]:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{log.stem} not ready:\n" + "\n".join(stack.tail(log)))


@pytest.fixture(scope="session")
def enclave_socket() -> EnclaveSocket:
    return EnclaveSocket()


@dataclass
class DataKey:
    """One conversation's data key, as the client holds it (`plaintext`: in memory only)."""

    session: str
    keys: envelope.SessionKeys
    edk: bytes
    plaintext: bytes


class Sealing:
    """A client's side of docs/wire.md: a data key wrapped by KMS, a question sealed under it."""

    @staticmethod
    def data_key(user_kms: Any, key_arn: str) -> DataKey:
        session = envelope.b64url(os.urandom(envelope.SESSION_BYTES))
        answer = user_kms.generate_data_key(
            KeyId=key_arn,
            KeySpec="AES_256",
            EncryptionContext={"app": envelope.APP, "session": session},
        )
        plaintext = answer["Plaintext"]
        keys = envelope.derive_keys(plaintext, session)
        return DataKey(session, keys, answer["CiphertextBlob"], plaintext)

    @staticmethod
    def seal(
        key: DataKey, key_arn: str, question: Question, *, stream: bool = False
    ) -> envelope.SealedRequest:
        header = envelope.Header(
            key_id=key_arn,
            session=key.session,
            request_id=envelope.b64url(os.urandom(envelope.REQUEST_ID_BYTES)),
            sent_at=int(time.time() * 1000),
            stream=stream,
        )
        return envelope.seal_request(key.keys, header, key.edk, question.to_json())


@pytest.fixture(scope="session")
def sealing() -> Sealing:
    return Sealing()


def _snapshot_app(dst: Path) -> Path:
    """enclave/ and protocol/ of this checkout, without bytecode, copied to `dst`."""
    for package in ("enclave", "protocol"):
        shutil.copytree(
            stack.checkout_root() / package,
            dst / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return dst


@pytest.fixture(scope="session")
def app_snapshot() -> Callable[[Path], Path]:
    return _snapshot_app


@dataclass
class Backend:
    """What `start_backend` started: the principals, KMS and the key pinned to the PCRs."""

    principals: stack.Principals
    kms_endpoint: str
    admin_kms: Any
    key_arn: str
    pcrs: dict[int, bytes]


def _start_backend(paths: stack.StatePaths, model_dir: Path) -> Backend:
    """The CA, the principals, the KMS emulator and the app's key, the enclave's config, the key
    policy pinned to the measured PCRs, and the NSM emulator; stack.stop_all(paths) stops them."""
    stack.ensure_ca(paths)
    principals = stack.ensure_principals(paths)
    _kms, endpoint = stack.start_kms(paths)
    admin = stack.kms_client(endpoint, principals.admin)
    key_arn = stack.create_or_load_key(paths, admin)
    stack.write_enclave_config(paths, key_arn=key_arn, model_dir=model_dir, kms_endpoint=endpoint)
    pcrs = stack.measure_pcrs(paths, model_dir)
    stack.apply_local_policy(admin, key_arn, pcrs)
    stack.start_nsm(paths, model_dir)
    return Backend(principals, endpoint, admin, key_arn, pcrs)


@pytest.fixture(scope="session")
def start_backend() -> Callable[[stack.StatePaths, Path], Backend]:
    return _start_backend
