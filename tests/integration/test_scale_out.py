"""Scale-out on one parent: the real proxy (gunicorn, two workers, TLS) in front of two real
enclave servers sharing one NSM emulator and one KMS emulator; one enclave is killed mid-run and
restarted, while the chatbot library keeps asking.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatbot.client import SecureChatClient
from emulator import stack
from protocol.errors import ErrorCode, NitroError
from protocol.transport import Address

pytestmark = pytest.mark.integration
READY_TIMEOUT_S = 120.0
HEALTH_INTERVAL_S = 0.3
QUESTION = "What is a 401(k) plan?"
# What a request in flight to the enclave that died may get: nothing accepts the connection
# (503), or the enclave vanished before or during its answer (the proxy's 502).
DYING_CODES = {ErrorCode.ENCLAVE_UNAVAILABLE, ErrorCode.PROTOCOL_ERROR}


@dataclass
class Farm:
    paths: stack.StatePaths
    sockets: dict[str, Path]
    logs: Any  # StackLogs (tests/integration/conftest.py)
    enclave_socket: Any  # EnclaveSocket (tests/integration/conftest.py)
    pids: dict[str, int] = field(default_factory=dict)

    def chats(self, name: str) -> int:
        """Chat requests the enclave `name` answered (its log's request lines)."""
        return sum(1 for line in self.logs.events(name, "request") if line.get("kind") == "chat")

    def proxy_events(self, event: str, enclave: str) -> int:
        address = f"unix://{self.sockets[enclave]}"
        return sum(1 for line in self.logs.events("proxy", event) if line.get("enclave") == address)

    def kms_decrypts(self) -> int:
        return self.logs.kms_calls("Decrypt")

    def client(self) -> SecureChatClient:
        return SecureChatClient.from_profile(self.paths.root)


def start_enclave(farm: Farm, name: str) -> None:
    """One more enclave server from the farm's app root, on its own socket, with the shared NSM."""
    root = stack.app_root(farm.paths)
    argv = [sys.executable, "-m", "enclave.main"] + [
        "--config", str(farm.paths.enclave_config),
        "--listen", f"unix://{farm.sockets[name]}",
        "--nsm", f"unix://{farm.paths.nsm_socket}",
    ]  # fmt: skip
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    )
    farm.pids[name] = stack.spawn(farm.paths, name, argv, cwd=root, env=env).pid


def kill(farm: Farm, name: str) -> None:
    os.killpg(farm.pids.pop(name), signal.SIGKILL)  # its own session: pid is the group id


def wait_enclave_ready(farm: Farm, name: str) -> None:
    address = Address.parse(f"unix://{farm.sockets[name]}")
    farm.enclave_socket.wait_ready(address, farm.paths.log(name), timeout=READY_TIMEOUT_S)


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def farm(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    cli: Any,
    stack_logs: Any,
    enclave_socket: Any,
    app_snapshot: Any,
    start_backend: Any,
) -> Iterator[Farm]:
    paths = stack.StatePaths(tmp_path_factory.mktemp("scale") / "s")
    paths.prepare()
    sockets = {"enclave": paths.enclave_socket, "enclave-b": paths.socket_dir / "enclave-b.sock"}
    running = Farm(paths, sockets, stack_logs(paths), enclave_socket)
    # A copy of the app: the PCRs must not change while the test runs, even if the checkout does.
    stack.record_app_root(paths, app_snapshot(paths.root / "app"))
    try:
        # Both enclaves run the same measured app, config and model: one policy admits both.
        backend = start_backend(paths, tiny_model_dir)
        principals, endpoint = backend.principals, backend.kms_endpoint
        for name in sockets:
            start_enclave(running, name)
        stack.ensure_tls_cert(paths)
        stack.write_parent_credentials(paths, principals.parent)
        port = stack.free_port()
        argv = [
            cli.path("parent-proxy"),
            "--bind", f"127.0.0.1:{port}",
            "--enclave", ",".join(f"unix://{path}" for path in sockets.values()),
            "--health-interval", str(HEALTH_INTERVAL_S),
            "--certfile", str(paths.cert),
            "--keyfile", str(paths.tls_key),
            "--credentials-file", str(paths.parent_credentials),
            "--workers", "2",
            "--threads", "4",
            "--graceful-timeout", "1",
        ]  # fmt: skip
        proxy = stack.spawn(paths, "proxy", argv)
        proxy_url = f"https://127.0.0.1:{port}"
        for name in sockets:
            wait_enclave_ready(running, name)
        stack.wait_ready(paths, proxy_url, [proxy], timeout=60)
        stack.write_profile(
            paths,
            proxy_url=proxy_url,
            kms_endpoint=endpoint,
            key_arn=backend.key_arn,
            user=principals.user,
            attestation_root=paths.ca_dir / "root.pem",
        )
        yield running
    finally:
        for name in list(running.pids):
            if name != "enclave" and stack.component_pid(paths, name) is not None:
                kill(running, name)
        stack.stop_all(paths)


def test_requests_spread_over_both_and_a_session_pays_one_decrypt_per_enclave(farm: Farm) -> None:
    before = {name: farm.chats(name) for name in farm.sockets}
    decrypts = farm.kms_decrypts()
    with farm.client() as client:
        conversation = client.conversation()
        for _ in range(6):
            assert conversation.ask(QUESTION, max_new_tokens=4).text
    wait_until(
        "request lines",
        lambda: sum(farm.chats(n) for n in farm.sockets) >= sum(before.values()) + 6,
    )
    served = {name: farm.chats(name) - before[name] for name in farm.sockets}
    assert sum(served.values()) == 6
    assert min(served.values()) >= 1, served
    # State is each enclave's key cache only: the session's key is unwrapped once per enclave.
    assert farm.kms_decrypts() == decrypts + 2


def test_a_killed_enclave_leaves_rotation_and_returns_after_restart(farm: Farm) -> None:
    outcomes: list[tuple[float, float, ErrorCode | None]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def keep_asking() -> None:
        with farm.client() as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    client.ask(QUESTION, max_new_tokens=4)
                    code = None
                except NitroError as exc:
                    code = exc.code
                with lock:
                    outcomes.append((started, time.monotonic(), code))

    askers = [threading.Thread(target=keep_asking) for _ in range(2)]
    for asker in askers:
        asker.start()
    try:
        wait_until("answers before the kill", lambda: len(outcomes) >= 2, timeout=60)
        killed_at = time.monotonic()
        kill(farm, "enclave-b")
        chats_b = farm.chats("enclave-b")
        wait_until(
            "answers after the kill",
            lambda: sum(o[0] > killed_at for o in outcomes) >= 4,
            timeout=60,
        )
    finally:
        stop.set()
        for asker in askers:
            asker.join(60)

    after = [o for o in outcomes if o[0] > killed_at]
    assert after and all(code is None for _s, _e, code in after), after
    # Only a request already in flight to the dying enclave may fail, and only as unavailable.
    failed = [o for o in outcomes if o[2] is not None]
    assert all(start <= killed_at and code in DYING_CODES for start, _e, code in failed), failed
    assert len(failed) <= len(askers)
    assert farm.chats("enclave-b") == chats_b  # dead: everything after went to the other one
    wait_until(
        "the kill in the proxy's log",
        lambda: farm.proxy_events("enclave_out_of_rotation", "enclave-b") >= 1,
    )

    ready_lines = farm.proxy_events("enclave_ready", "enclave-b")
    start_enclave(farm, "enclave-b")
    wait_enclave_ready(farm, "enclave-b")
    # Every worker's health thread finds it again (two workers: two lines).
    wait_until(
        "the restart in the proxy's log",
        lambda: farm.proxy_events("enclave_ready", "enclave-b") >= ready_lines + 2,
    )
    before = farm.chats("enclave-b")
    with farm.client() as client:
        for _ in range(4):
            client.ask(QUESTION, max_new_tokens=4)
    wait_until(
        "the restarted enclave's answers", lambda: farm.chats("enclave-b") > before, timeout=10
    )
