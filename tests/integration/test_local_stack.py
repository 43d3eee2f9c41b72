"""The whole flow from a terminal: `nitro-local up`, the chatbot CLI and library, `down`.

Everything runs as the user runs it: console scripts in subprocesses, the proxy under gunicorn
with TLS, the enclave server on a unix socket, KMS and the NSM emulated on loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from chatbot.client import SecureChatClient
from chatbot.profile import ClientSettings, load_profile
from emulator import stack
from protocol.errors import ErrorCode

pytestmark = pytest.mark.integration
QUESTION = "How do I enroll in the retirement plan?"


@pytest.fixture(scope="module")
def local(local_stack: Any) -> Any:
    """The stack every test here shares (the last one downs it)."""
    started = local_stack("stack")
    print(f"nitro-local up: {started.up_seconds:.1f} s")
    assert set(started.pids) == set(stack.COMPONENTS)
    return started


# ---- up ----------------------------------------------------------------------------------------


def test_up_prints_endpoints_and_the_local_mode_caveat(local: Any) -> None:
    assert "https://127.0.0.1:" in local.up_output
    assert "no isolation" in local.up_output
    profile = local.profile()
    assert profile["proxy_url"].startswith("https://127.0.0.1:")
    assert profile["kms_endpoint"].startswith("http://127.0.0.1:")
    for pem in ("ca_bundle", "attestation_root"):
        assert Path(profile[pem]).is_absolute() and Path(profile[pem]).is_file()
    assert {"access_key_id", "secret_access_key"} <= profile["user"].keys()
    assert profile["key_id"].startswith("arn:aws:kms:us-east-1:111122223333:key/")
    # The parent's keys are elsewhere, and only its owner may read them.
    parent = json.loads(local.paths.parent_credentials.read_text())["credentials"]
    assert parent["access_key_id"] != profile["user"]["access_key_id"]
    assert local.paths.parent_credentials.stat().st_mode & 0o077 == 0


def test_status_says_what_runs_and_up_again_changes_nothing(local: Any) -> None:
    status = local.cli.run("nitro-local", "status", "--state-dir", str(local.root))
    assert status.returncode == 0
    assert all(f"running (pid {pid})" in status.stdout for pid in local.pids.values())
    again = local.cli.run("nitro-local", "up", "--state-dir", str(local.root))
    assert again.returncode == 0
    assert "already running" in again.stderr
    assert stack.status(local.paths) == local.pids


# ---- asking ------------------------------------------------------------------------------------


def test_cli_ask_prints_the_answer_with_options_before_or_after(local: Any) -> None:
    started = time.monotonic()
    before = local.cli.run("chatbot", "--local", "--state-dir", str(local.root), "ask", QUESTION)
    print(f"one question through the CLI: {time.monotonic() - started:.2f} s")
    assert before.returncode == 0, before.stderr
    assert len(before.stdout.strip()) > 10
    after = local.cli.run("chatbot", "ask", QUESTION, "--local", "--state-dir", str(local.root))
    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout  # greedy decoding: the same question, the same answer
    assert "Traceback" not in before.stderr + after.stderr


def test_library_question_and_a_two_turn_conversation_on_one_data_key(local: Any) -> None:
    with SecureChatClient.from_profile(local.root) as client:
        answer = client.ask(QUESTION)
        assert answer.text.strip() and answer.completion_tokens >= 1
        forced = client.ask(QUESTION, max_new_tokens=60, min_new_tokens=60)
        assert forced.completion_tokens == 60 > answer.completion_tokens
        assert forced.text.startswith(answer.text)  # greedy: the same answer, then more

        wraps, unwraps = local.logs.kms_calls("GenerateDataKey"), local.logs.kms_calls("Decrypt")
        conversation = client.conversation()
        first = conversation.ask("What is a 401(k) plan?")
        session = conversation.session
        second = conversation.ask("Can I change my contribution later?")
        assert first.text.strip() and second.text.strip()
        assert [q for q, _ in conversation.history] == [
            "What is a 401(k) plan?",
            "Can I change my contribution later?",
        ]
        assert conversation.session == session
        # One data key for the conversation: one wrap by the client, one unwrap by the enclave.
        assert local.logs.kms_calls("GenerateDataKey") == wraps + 1
        assert local.logs.kms_calls("Decrypt") == unwraps + 1


def test_interactive_cli_keeps_a_conversation(local: Any) -> None:
    wraps, unwraps = local.logs.kms_calls("GenerateDataKey"), local.logs.kms_calls("Decrypt")
    chat = local.cli.run(
        "chatbot",
        "--local",
        "--state-dir",
        str(local.root),
        stdin="What is a 401(k) plan?\nCan I change my contribution later?\n/quit\n",
    )
    assert chat.returncode == 0, chat.stderr
    assert "kept in memory only" in chat.stderr
    assert "error:" not in chat.stderr
    # Three prompts (two questions, /quit), an answer after each question.
    turns = chat.stdout.split("you> ")
    assert len(turns) == 4
    assert all(turn.strip() for turn in turns[1:3]), chat.stdout
    # One conversation: one data key wrapped and unwrapped for both questions.
    assert local.logs.kms_calls("GenerateDataKey") == wraps + 1
    assert local.logs.kms_calls("Decrypt") == unwraps + 1


def test_a_failure_is_one_error_line_not_a_traceback(local: Any, tmp_path: Path) -> None:
    profile = local.profile()
    profile["key_id"] = profile["key_id"][:-4] + "0000"  # a key KMS does not have
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    failed = local.cli.run("chatbot", "--local", "--state-dir", str(tmp_path), "ask", QUESTION)
    assert failed.returncode != 0
    lines = failed.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == [
        "error: kms_error: " + ErrorCode.KMS_ERROR.client_text
    ]
    assert "Traceback" not in failed.stderr


# ---- bad input at the proxy --------------------------------------------------------------------


def _post(url: str, ca: str, body: bytes, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca)),
    )
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(local: Any) -> None:
    # Only the headers go out: the proxy must answer from Content-Length alone. (Sending the
    # 300 KiB too races the proxy's early answer against the client's writes.)
    profile = local.profile()
    url = urllib.parse.urlsplit(profile["proxy_url"])
    context = ssl.create_default_context(cafile=profile["ca_bundle"])
    connection = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=30)
    try:
        connection.putrequest("POST", "/v1/chat")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(300 * 1024))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["code"] == "payload_too_large"
    finally:
        connection.close()
    with SecureChatClient.from_profile(local.root) as client:
        assert client.ask("What is a pension?", max_new_tokens=8).text.strip()


@pytest.mark.parametrize(
    ("body", "method", "status", "code"),
    [
        (b"not json", "POST", 400, "bad_request"),
        (b'{"v": 2, "key": 5}', "POST", 400, "bad_request"),
        (b'{"v": 2, "surprise": true}', "POST", 400, "bad_request"),
        (b'{"v": 1}', "POST", 400, "unsupported_version"),
        (b"", "GET", 405, "method_not_allowed"),
    ],
)
def test_bad_input_at_the_proxy_is_a_4xx_and_the_next_question_is_answered(
    local: Any, body: bytes, method: str, status: int, code: str
) -> None:
    profile = local.profile()
    got, answer = _post(profile["proxy_url"] + "/v1/chat", profile["ca_bundle"], body, method)
    assert (got, answer["error"]["code"]) == (status, code)
    with SecureChatClient.from_profile(local.root) as client:
        assert client.ask("What is a pension?", max_new_tokens=8).text.strip()


# ---- the leak test -----------------------------------------------------------------------------


class Tap:
    """A unix-socket relay between a proxy and the enclave that records every byte it passes."""

    def __init__(self, listen: Path, upstream: Path) -> None:
        self.listen, self.upstream = listen, upstream
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen))
        self._server.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self._server.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(str(self.upstream))
            for src, dst in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self._lock:
                    self.seen += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._server.close()


def test_no_canary_in_the_state_dir_the_relayed_bytes_or_the_proxys_output(
    local: Any, tmp_path: Path, canary: Any
) -> None:
    paths = local.paths
    tap = Tap(paths.socket_dir / "tap.sock", paths.enclave_socket)
    port = stack.free_port()
    output = tmp_path / "proxy-output.txt"
    with open(output, "wb") as out:
        proxy = subprocess.Popen(
            [
                local.cli.path("parent-proxy"),
                "--bind",
                f"127.0.0.1:{port}",
                "--enclave",
                f"unix://{tap.listen}",
                "--certfile",
                str(paths.cert),
                "--keyfile",
                str(paths.tls_key),
                "--credentials-file",
                str(paths.parent_credentials),
            ],
            stdout=out,
            stderr=out,
        )
    try:
        profile = load_profile(local.root)
        url = f"https://127.0.0.1:{port}"
        settings = ClientSettings(
            proxy_url=url,
            key_id=profile.settings.key_id,
            region=profile.settings.region,
            ca_bundle=profile.settings.ca_bundle,
            kms_endpoint=profile.settings.kms_endpoint,
        )
        _wait_healthy(url, profile.settings.ca_bundle)
        word = canary.new()  # the end-of-run canary sweep looks for it too (tests/conftest.py)
        question = f"How do I enroll in the retirement plan? {word}"
        with SecureChatClient.from_settings(settings, profile.credentials) as client:
            answer = client.ask(question).text.strip()
            streamed = "".join(client.conversation().stream(question)).strip()
        assert len(answer) >= 12 and streamed == answer
        relayed = bytes(tap.seen)
        canary.capture("local-stack-relayed.bin", relayed)
        assert len(relayed) > 1000, "the tap saw no traffic: the test would prove nothing"
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
        tap.close()

    secrets_ = [word.encode(), question.encode(), answer.encode()]
    places = {"relayed bytes": relayed, "proxy output": output.read_bytes()}
    places.update(local.state_files())
    assert "logs/proxy.log" in places and "logs/enclave.log" in places
    # Only where and which: a failure message must not print the secret or the file holding it
    # (the state directory also holds access keys).
    leaks = [
        (where, i) for where, data in places.items() for i, s in enumerate(secrets_) if s in data
    ]
    assert not leaks, "(place, secret index) pairs holding the canary question or its answer"


def _wait_healthy(url: str, ca: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _post(url + "/healthz", ca, b"", "GET")[0] == 200:
                return
        time.sleep(0.2)
    raise AssertionError("the tapped proxy never answered /healthz")


# ---- down (last) -------------------------------------------------------------------------------


def test_zz_down_leaves_no_process_of_the_stack(local: Any, processes: Any) -> None:
    down = local.cli.run("nitro-local", "down", "--state-dir", str(local.root))
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(processes.alive(pid) for pid in local.pids.values()):
        time.sleep(0.1)
    assert not [name for name, pid in local.pids.items() if processes.alive(pid)]
    # Nor any other process started from this state directory (gunicorn's workers too).
    assert not processes.naming(local.root)
    status = local.cli.run("nitro-local", "status", "--state-dir", str(local.root))
    assert status.returncode == 3
