"""The client verifies before it speaks, on the real local stack: `nitro-local up`, then
`chatbot --local --expected-pcrs FILE ask ...` with the measured PCRs (answered) and with one PCR
changed (refused with attestation_invalid, and no question or data-key request leaves).
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from protocol import attestation
from protocol.messages import Kind, RequestFrame
from protocol.transport import Address

pytestmark = pytest.mark.integration
QUESTION = "How do I enroll in the retirement plan?"


@pytest.fixture(scope="module")
def local(local_stack: Any) -> Any:
    return local_stack("verify")


@pytest.fixture(scope="module")
def measured(local: Any) -> dict[str, str]:
    """What `nitro-local measure --json` prints: the user's way to learn the PCRs to expect."""
    return local.measure()  # PCR0, PCR1 and PCR2 at least


def chats(local: Any) -> int:
    return local.logs.proxy_requests("/v1/chat")


def ask(local: Any, pcr_file: Path, *extra: str) -> subprocess.CompletedProcess:
    return local.cli.run(
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
    chats_before, keys = chats(local), local.logs.kms_calls("GenerateDataKey")
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
    assert chats(local) == chats_before + 1
    assert local.logs.kms_calls("GenerateDataKey") == keys + 1


@pytest.mark.parametrize("index", [0, 2])
def test_one_changed_pcr_is_refused_and_nothing_is_sent(local, measured, tmp_path, index):
    changed = dict(measured)
    name = f"PCR{index}"
    changed[name] = ("0" if changed[name][0] != "0" else "1") + changed[name][1:]
    pcr_file = tmp_path / "pcrs.json"
    pcr_file.write_text(json.dumps(changed))
    chats_before, keys = chats(local), local.logs.kms_calls("GenerateDataKey")
    refused = ask(local, pcr_file)
    assert refused.returncode == 1
    assert refused.stdout == ""
    lines = refused.stderr.splitlines()
    assert lines[0].startswith("error: attestation_invalid: ")
    assert lines[1].startswith(f"failed check: pcr{index}: {name} is {measured[name]}")
    assert chats(local) == chats_before
    assert local.logs.kms_calls("GenerateDataKey") == keys


def test_the_debug_flag_does_not_excuse_a_wrong_pcr(local, measured, tmp_path):
    pcr_file = tmp_path / "pcrs.json"
    pcr_file.write_text(json.dumps({**measured, "PCR1": "00" * 48}))
    refused = ask(local, pcr_file, "--allow-debug")
    assert refused.returncode == 1 and "failed check: pcr1: " in refused.stderr


def test_no_caller_gets_a_document_with_another_public_key(local, enclave_socket):
    """The enclave's documents always carry its own key: the proxy takes only a nonce, and the
    enclave refuses an attestation frame naming a key."""
    status, body = local.get("/v1/attestation?nonce=00&public_key=3082")
    assert status == 400 and body["error"]["code"] == "bad_request"
    address = Address.parse(f"unix://{local.paths.enclave_socket}")
    frame = RequestFrame(Kind.ATTESTATION, "verify-test", None, {"nonce": "ab", "public_key": "ff"})
    answer, _bodies = enclave_socket.exchange(address, frame.to_json(), timeout=30)
    assert answer.status == 400 and answer.error["code"] == "bad_request"

    root = attestation.load_pem_root(Path(local.profile()["attestation_root"]))
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
    done = local.cli.run(*argv, str(saved), "--expected-pcrs", str(pcr_file), "--nonce", "cd" * 32)
    assert done.returncode == 0, done.stderr
    assert "result: PASSED" in done.stdout and "public key:  RSA-2048" in done.stdout
    assert "DEBUG MODE" not in done.stdout
