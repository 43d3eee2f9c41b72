"""The stack a malicious parent sits in: the real KMS and NSM emulators and the real enclave
server (started once for this package), the malicious relay in front of it, and real clients.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from chatbot.client import SecureChatClient
from chatbot.profile import ClientSettings, UserCredentials
from emulator import stack
from protocol.attestation import load_pem_root
from protocol.errors import ErrorCode, NitroError
from protocol.messages import Credentials, Kind
from protocol.transport import Address

from .relay import Enclave, MaliciousRelay

READY_TIMEOUT_S = 120.0
LOG_WAIT_S = 10.0
STREAM_CHUNK_TOKENS = 1
# Tokens per answer: enough to have one (and, streamed, several chunks), few to generate.
ANSWER_TOKENS = 1
STREAM_TOKENS = 3
# Asked through the honest path after every case: the enclave must still answer it.
CLEAN_PROMPT = "Question: What is a pension?\nAnswer:"
QUESTION = "How many days of paid leave do new employees get?"


@dataclass
class Stack:
    """The running stack, the relay in front of it, and what the tests need to drive both."""

    paths: stack.StatePaths
    key_arn: str
    kms_endpoint: str
    pcrs: dict[int, bytes]
    root_der: bytes
    user_keys: UserCredentials
    enclave: Enclave
    relay: MaliciousRelay
    model_dir: Path
    # Every question asked and answer shown in this package: no byte relayed may hold one.
    plaintexts: list[str] = field(default_factory=list)
    _clients: dict[str, SecureChatClient] = field(default_factory=dict)

    def settings(self, **bounds: Any) -> ClientSettings:
        """The client's settings, with the relay as its proxy (as a user would configure it)."""
        return ClientSettings(
            proxy_url=self.relay.url,
            key_id=self.key_arn,
            region=stack.REGION,
            ca_bundle=str(self.paths.cert),
            kms_endpoint=self.kms_endpoint,
            **bounds,
        )

    def client(self, *, verifying: bool = False, **bounds: Any) -> SecureChatClient:
        """A real client through the relay; `verifying`: it checks the enclave's attestation
        (the measured PCRs, the local root) before it sends anything."""
        verification: dict[str, Any] = {}
        if verifying:
            verification = {"expected_pcrs": self.pcrs, "attestation_root": self.root_der}
        return SecureChatClient.from_settings(
            self.settings(**bounds), self.user_keys, **verification
        )

    def user(self, name: str | int = 0) -> SecureChatClient:
        """A client kept for the package (building one costs a boto3 client): users 0, 1...
        Each conversation it starts has its own session and data key."""
        if str(name) not in self._clients:
            self._clients[str(name)] = self.client()
        return self._clients[str(name)]

    def verifier(self) -> SecureChatClient:
        """The package's verifying client, made to verify afresh (a new nonce) when next used."""
        if "verifier" not in self._clients:
            self._clients["verifier"] = self.client(verifying=True)
        client = self._clients["verifier"]
        client.verified = None
        return client

    def close_clients(self) -> None:
        for client in self._clients.values():
            client.close()

    def enclave_outcomes(self, since: int = 0) -> list[dict[str, Any]]:
        """The enclave's `request` log lines (trace id, kind, outcome), from line `since` on."""
        lines = self.paths.log("enclave").read_text().splitlines()[since:]
        events = []
        for line in lines:
            try:
                record = json.loads(line) if line.startswith("{") else None
            except json.JSONDecodeError:  # a line being written as we read
                continue
            if isinstance(record, dict) and record.get("event") == "request":
                events.append(record)
        return events

    def log_mark(self) -> int:
        return len(self.paths.log("enclave").read_text().splitlines())

    def wait_outcome(self, code: str, since: int, trace_id: str | None = None) -> None:
        """Wait (bounded) until the enclave logged a request ending in `code` after `since`.
        The line is written after the answer, so it may trail the client's error a little."""
        deadline = time.monotonic() + LOG_WAIT_S
        while True:
            events = self.enclave_outcomes(since)
            if any(
                e.get("outcome") == code and (trace_id is None or e.get("trace_id") == trace_id)
                for e in events
            ):
                return
            if time.monotonic() > deadline:
                seen = [(e.get("trace_id"), e.get("outcome")) for e in events]
                raise AssertionError(f"the enclave logged no {code} (trace {trace_id}): {seen}")
            time.sleep(0.05)

    def outcomes_of(self, traces: list[str], since: int) -> list[str]:
        """The enclave's outcome for each of `traces` (in order), waiting (bounded) for all."""
        deadline = time.monotonic() + LOG_WAIT_S
        while True:
            found = {e.get("trace_id"): e.get("outcome") for e in self.enclave_outcomes(since)}
            if all(trace in found for trace in traces):
                return [str(found[trace]) for trace in traces]
            if time.monotonic() > deadline:
                raise AssertionError(f"the enclave logged no line for some of {traces}")
            time.sleep(0.05)


def _wait_ready(enclave: Enclave, paths: stack.StatePaths) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            reply = enclave.send(enclave.frame(Kind.READY, None))
            if reply.bodies and reply.bodies[0].get("ready"):
                enclave.wire.clear()
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.3)
    raise AssertionError("enclave not ready:\n" + "\n".join(stack.tail(paths.log("enclave"))))


def _cpu_seconds(paths: stack.StatePaths) -> dict[str, float]:
    """User and system CPU each component used so far (what an idle machine would spend)."""
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    for name, pid in stack.status(paths).items():
        if pid is None:
            continue
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        used[name] = round((int(fields[11]) + int(fields[12])) / ticks, 1)
    return used


@pytest.fixture(scope="package")
def adversary(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, canary: Any
) -> Iterator[Stack]:
    paths = stack.StatePaths(tmp_path_factory.mktemp("adversarial"))
    paths.prepare()
    relay = None
    try:
        root_pem = stack.ensure_ca(paths)
        principals = stack.ensure_principals(paths)
        _proc, endpoint = stack.start_kms(paths)
        admin = stack.kms_client(endpoint, principals.admin)
        key_arn = stack.create_or_load_key(paths, admin)
        config = stack.write_enclave_config(
            paths, key_arn=key_arn, model_dir=tiny_model_dir, kms_endpoint=endpoint
        )
        # Streams of STREAM_CHUNK_TOKENS-token chunks: several chunks to tamper with, for few
        # tokens generated (this is measured configuration, so before the PCRs are).
        measured = json.loads(config.read_text())
        config.write_text(json.dumps({**measured, "stream_chunk_tokens": STREAM_CHUNK_TOKENS}))
        pcrs = stack.measure_pcrs(paths, tiny_model_dir)
        stack.apply_local_policy(admin, key_arn, pcrs)
        stack.start_nsm(paths, tiny_model_dir)
        stack.start_enclave(paths)
        stack.ensure_tls_cert(paths)
        parent = principals.parent
        enclave = Enclave(
            Address.parse(f"unix://{paths.enclave_socket}"),
            Credentials(parent.access_key_id, parent.secret_access_key),
        )
        _wait_ready(enclave, paths)
        relay = MaliciousRelay(enclave, str(paths.cert), str(paths.tls_key))
        user = principals.user
        running = Stack(
            paths=paths,
            key_arn=key_arn,
            kms_endpoint=endpoint,
            pcrs=pcrs,
            root_der=load_pem_root(root_pem.read_bytes()),
            user_keys=UserCredentials(user.access_key_id, user.secret_access_key),
            enclave=enclave,
            relay=relay,
            model_dir=tiny_model_dir,
        )
        yield running
        running.close_clients()
        # For the suite's canary sweep (tests/conftest.py): every byte this parent saw, to be
        # searched for every canary and every answer any test opened.
        canary.capture("adversarial-relay.bin", b"\n".join(relay.wire + enclave.wire))
        print(f"\nadversarial stack CPU seconds: {_cpu_seconds(paths)}")
    finally:
        if relay is not None:
            relay.close()
        stack.stop_all(paths)


@pytest.fixture(scope="package")
def clean_conversation(adversary: Stack) -> Iterator[Any]:
    """The honest path's own conversation: one data key for every check, so the checks are
    cheap (no KMS call after the first)."""
    yield adversary.user("clean").conversation()


@pytest.fixture
def still_serving(adversary: Stack, clean_conversation: Any) -> Callable[[], None]:
    """Call after a case: the relay is honest again and a clean question gets its answer."""

    def check() -> None:
        assert adversary.relay.mischief.__name__ == "honest"
        *_, (_text, _tokens, answer) = clean_conversation.complete(
            CLEAN_PROMPT, stream=False, max_new_tokens=ANSWER_TOKENS
        )
        assert answer is not None and answer.completion_tokens >= 1
        assert answer.finish_reason in ("length", "stop")
        assert not adversary.relay.failures, adversary.relay.failures

    return check


def raised(call: Callable[[], Any]) -> Any:
    """The NitroError (a ChatError, an AttestationError) `call` raises; the test fails if it
    returns or raises anything else."""
    with pytest.raises(NitroError) as caught:
        call()
    return caught.value


def assert_code(error: NitroError, code: ErrorCode) -> None:
    """The exact code, and the client's own text for it (never a server's words)."""
    assert error.code is code, f"expected {code.code}, got {error.code.code} ({error.detail})"
    assert error.diagnostics() == f"error: {code.code}: {code.client_text}"


def ask(adversary: Stack, client: Any = None, question: str = QUESTION, **params: Any) -> Any:
    """One question in a new conversation (a new data key) of `client` (user 0 if None)."""
    adversary.plaintexts.append(question)
    conversation = (client or adversary.user()).conversation()
    params.setdefault("max_new_tokens", ANSWER_TOKENS)
    answer = conversation.ask(question, **params)
    adversary.plaintexts.append(answer.text.strip())
    return answer


def short(conversation: Any, question: str = QUESTION) -> Any:
    """`question` asked in `conversation`, for an answer of ANSWER_TOKENS tokens."""
    return conversation.ask(question, max_new_tokens=ANSWER_TOKENS)


def both(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once, each in its own thread; what each returned or raised."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the caller asserts on it
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return results
