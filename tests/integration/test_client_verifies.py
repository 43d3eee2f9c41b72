"""The client verifies before it speaks, on the real local stack: `nitro-local up`, then
`chatbot --local --expected-pcrs FILE ask ...` with the measured PCRs (answered) and with one PCR
changed (refused with attestation_invalid, and no question or data-key request leaves).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulator import stack
from protocol import attestation
from protocol.framing import recv_json, send_json
from protocol.messages import Kind, RequestFrame, Status
from protocol.transport import Address

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
QUESTION = "How do I enroll in the retirement plan?"


def run(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout, env=env
    )


@dataclass
class Local:
    root: Path
    paths: stack.StatePaths
    profile: dict

    def count(self, log: str, needle: str) -> int:
        lines = self.paths.log(log).read_text().splitlines()
        return sum(1 for line in lines if line.startswith("{") and needle in line)

    def chats(self) -> int:
        return self.count("proxy", '"path":"/v1/chat"')

    def data_keys(self) -> int:
        return self.count("kms", '"operation":"GenerateDataKey"')

    def get(self, path: str) -> tuple[int, dict]:
        context = ssl.create_default_context(cafile=self.profile["ca_bundle"])
        try:
            with urllib.request.urlopen(self.profile["proxy_url"] + path, context=context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Local]:
    root = tmp_path_factory.mktemp("verify") / "state"
    try:
        up = run("nitro-local", "up", "--state-dir", str(root), "--model-dir", str(tiny_model_dir))
        assert up.returncode == 0, up.stderr[-3000:]
        paths = stack.StatePaths(root)
        yield Local(root, paths, json.loads(paths.profile.read_text()))
    finally:
        run("nitro-local", "down", "--state-dir", str(root))


@pytest.fixture(scope="module")
def measured(local: Local) -> dict[str, str]:
    """What `nitro-local measure --json` prints: the user's way to learn the PCRs to expect."""
    out = run("nitro-local", "measure", "--state-dir", str(local.root), "--json")
    assert out.returncode == 0, out.stderr
    pcrs = json.loads(out.stdout)
    assert {"PCR0", "PCR1", "PCR2"} <= set(pcrs)
    return pcrs


def ask(local: Local, pcr_file: Path, *extra: str) -> subprocess.CompletedProcess:
    return run(
        "chatbot",
        "--local",
        "--state-dir",
        str(local.root),
        "--expected-pcrs",
        str(pcr_file),
        "ask",
        QUESTION,
        *extra,
    )


def test_the_measured_pcrs_pass_and_the_question_is_answered(local, measured, tmp_path):
    pcr_file = tmp_path / "pcrs.json"
    pcr_file.write_text(json.dumps(measured))
    chats, keys = local.chats(), local.data_keys()
    done = ask(local, pcr_file, "--verbose")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    # The local stack's enclave is not in debug mode: its PCRs are real measurements.
    assert "attestation verified" in done.stderr and "PCR0, PCR1, PCR2 as expected" in done.stderr
    assert measured["PCR0"][:16] in done.stderr
    # The local user may not read the key policy (the policy grants it only what it needs).
    assert (
        "warning: the key policy could not be checked" in done.stderr
        or "key policy checked" in done.stderr
    )
    assert local.chats() == chats + 1 and local.data_keys() == keys + 1


@pytest.mark.parametrize("index", [0, 2])
def test_one_changed_pcr_is_refused_and_nothing_is_sent(local, measured, tmp_path, index):
    changed = dict(measured)
    name = f"PCR{index}"
    changed[name] = ("0" if changed[name][0] != "0" else "1") + changed[name][1:]
    pcr_file = tmp_path / "pcrs.json"
    pcr_file.write_text(json.dumps(changed))
    chats, keys = local.chats(), local.data_keys()
    refused = ask(local, pcr_file)
    assert refused.returncode == 1
    assert refused.stdout == ""
    lines = refused.stderr.splitlines()
    assert lines[0].startswith("error: attestation_invalid: ")
    assert lines[1].startswith(f"failed check: pcr{index}: {name} is {measured[name]}")
    assert local.chats() == chats and local.data_keys() == keys


def test_the_debug_flag_does_not_excuse_a_wrong_pcr(local, measured, tmp_path):
    pcr_file = tmp_path / "pcrs.json"
    pcr_file.write_text(json.dumps({**measured, "PCR1": "00" * 48}))
    refused = ask(local, pcr_file, "--allow-debug")
    assert refused.returncode == 1 and "failed check: pcr1: " in refused.stderr


def test_no_caller_gets_a_document_with_another_public_key(local):
    """The enclave's documents always carry its own key: the proxy takes only a nonce, and the
    enclave refuses an attestation frame naming a key."""
    status, body = local.get("/v1/attestation?nonce=00&public_key=3082")
    assert status == 400 and body["error"]["code"] == "bad_request"
    address = Address.parse(f"unix://{local.paths.enclave_socket}")
    frame = RequestFrame(Kind.ATTESTATION, "verify-test", None, {"nonce": "ab", "public_key": "ff"})
    with address.connect(timeout=30) as sock:
        send_json(sock, frame.to_json())
        answer = Status.from_json(recv_json(sock, timeout=30))
    assert answer.status == 400 and answer.error["code"] == "bad_request"

    root = attestation.load_pem_root(Path(local.profile["attestation_root"]))
    keys = set()
    for nonce in ("01" * 32, "02" * 32):
        status, body = local.get(f"/v1/attestation?nonce={nonce}")
        assert status == 200
        document = attestation.verify(
            attestation.parse(base64.b64decode(body["document"])),
            attestation.AttestationPolicy(root=root, nonce=bytes.fromhex(nonce)),
        )
        key = serialization.load_der_public_key(document.public_key)
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 2048
        keys.add(document.public_key)
    assert len(keys) == 1  # one per-boot key, whoever asks


def test_a_saved_document_verifies_offline(local, measured, tmp_path):
    status, body = local.get("/v1/attestation?nonce=" + "cd" * 32)
    assert status == 200
    saved = tmp_path / "attestation.json"
    saved.write_text(json.dumps(body))
    pcr_file = tmp_path / "pcrs.json"
    pcr_file.write_text(json.dumps(measured))
    argv = ["chatbot", "--local", "--state-dir", str(local.root), "verify-attestation"]
    done = run(*argv, str(saved), "--expected-pcrs", str(pcr_file), "--nonce", "cd" * 32)
    assert done.returncode == 0, done.stderr
    assert "result: PASSED" in done.stdout and "public key:  RSA-2048" in done.stdout
    assert "DEBUG MODE" not in done.stdout
