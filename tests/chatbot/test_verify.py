"""The client verifies before it speaks: SecureChatClient(expected_pcrs=...) and `chatbot
--expected-pcrs`, against the HTTPS stand-in whose attestation documents come from the real NSM
emulator and CA; key policies judged by protocol.key_policy, rendered by the project's own
renderers (emulator/local_policy.py, scripts/render_key_policy.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chatbot import cli, verify
from chatbot.client import ChatError, SecureChatClient
from chatbot.profile import ConfigError
from emulator.local_policy import render_local_policy
from protocol.attestation import AttestationError, load_pem_root
from protocol.errors import ErrorCode

QUESTION = "What is a vesting schedule?"
ROOT = Path(__file__).resolve().parents[2]
ACCOUNT = "111122223333"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:user/alice"
PARENT_ARN = f"arn:aws:iam::{ACCOUNT}:role/nitro-llm-parent"
ADMIN_ARN = f"arn:aws:iam::{ACCOUNT}:role/key-admin"


def expected(enclave: Any, *indexes: int) -> dict[int, bytes]:
    return {i: enclave.pcrs[i] for i in indexes or (0, 1, 2)}


def make_client(chat_server, tls_files, stub_kms, kit, enclave, **verification: Any):
    verification.setdefault("expected_pcrs", expected(enclave))
    verification.setdefault("attestation_root", load_pem_root(enclave.root_pem))
    settings = kit.make_settings(chat_server, tls_files)
    return SecureChatClient(settings, kms_client=stub_kms, **verification)


def nothing_sent(chat_server, stub_kms) -> bool:
    """No question reached the stand-in and no data key was asked for."""
    return chat_server.state.seen == [] and stub_kms.calls == []


# ---- the library -------------------------------------------------------------------------------


def test_a_verified_enclave_gets_the_question(chat_server, tls_files, stub_kms, kit, enclave):
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    answer = client.ask(QUESTION)
    assert answer.text == kit.answer_text(chat_server.state.seen[0].question)
    [nonce] = enclave.nonces
    assert nonce is not None and len(bytes.fromhex(nonce)) == 32  # a fresh 32-byte nonce
    verified = client.verified
    assert verified is not None and verified.document.nonce == bytes.fromhex(nonce)
    assert verified.document.public_key == enclave.public_key
    assert verified.pcrs_checked == (0, 1, 2)
    # The key policy was asked for, refused (StubKms denies by default): a warning, not a stop.
    assert len(stub_kms.policy_reads) == 1 and not verified.key_policy_checked
    assert "could not be checked" in verified.warnings[0]
    assert "AccessDeniedException" in verified.warnings[0]
    # Once per client: the next question does not fetch another document.
    client.ask(QUESTION)
    assert len(enclave.nonces) == 1 and len(chat_server.state.seen) == 2


def test_each_check_uses_a_new_nonce(chat_server, tls_files, stub_kms, kit, enclave):
    for _ in range(2):
        make_client(chat_server, tls_files, stub_kms, kit, enclave).verify_enclave()
    assert len(set(enclave.nonces)) == 2


def test_without_expected_pcrs_nothing_is_fetched(chat_server, tls_files, stub_kms, kit, enclave):
    client = SecureChatClient(kit.make_settings(chat_server, tls_files), kms_client=stub_kms)
    assert client.verify_enclave() is None
    client.ask(QUESTION)
    assert enclave.nonces == [] and stub_kms.policy_reads == []


@pytest.mark.parametrize(
    ("name", "change", "check"),
    [
        ("PCR0 of another image", lambda e: {"expected_pcrs": {0: b"\x01" * 48}}, "pcr0"),
        ("PCR2 of another app", lambda e: {"expected_pcrs": {**expected(e), 2: bytes(48)}}, "pcr2"),
        ("a signed image expected", lambda e: {"expected_pcrs": {8: b"\x08" * 48}}, "pcr8"),
        ("another root pinned", lambda e: {"attestation_root": verify.aws_root()}, "root"),
    ],
)
def test_a_mismatch_stops_the_client_before_anything_is_sent(
    chat_server, tls_files, stub_kms, kit, enclave, name, change, check
):
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave, **change(enclave))
    with pytest.raises(AttestationError) as info:
        client.ask(QUESTION)
    assert info.value.check == check, name
    assert info.value.code is ErrorCode.ATTESTATION_INVALID
    assert nothing_sent(chat_server, stub_kms)
    assert stub_kms.policy_reads == []  # the document failed first


@pytest.mark.parametrize(
    ("mode", "check"),
    [
        ("replay", "nonce"),  # an old document served again: its nonce is not ours
        ("no_nonce", "nonce"),
        ("truncated", "cbor"),
        ("not_json", "response"),
        ("not_base64", "response"),
    ],
)
def test_a_bad_answer_from_the_proxy_is_refused(
    chat_server, tls_files, stub_kms, kit, enclave, mode, check
):
    make_client(chat_server, tls_files, stub_kms, kit, enclave).verify_enclave()  # first doc
    enclave.mode = mode
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    with pytest.raises(AttestationError) as info:
        client.ask(QUESTION)
    assert info.value.check == check
    assert nothing_sent(chat_server, stub_kms)


def test_an_error_from_the_proxy_is_its_code_and_nothing_is_sent(
    chat_server, tls_files, stub_kms, kit, enclave
):
    enclave.mode = "http_error"
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    with pytest.raises(ChatError) as info:
        client.ask(QUESTION)
    assert info.value.code is ErrorCode.ENCLAVE_UNAVAILABLE
    assert nothing_sent(chat_server, stub_kms)


def test_a_proxy_without_attestation_is_refused(chat_server, tls_files, stub_kms, kit, enclave):
    chat_server.state.enclave = None  # 404
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    with pytest.raises(ChatError) as info:
        client.ask(QUESTION)
    assert info.value.code is ErrorCode.NOT_FOUND
    assert nothing_sent(chat_server, stub_kms)


def test_a_stale_document_is_refused(chat_server, tls_files, stub_kms, kit, enclave, tmp_path):
    import time

    # An NSM whose clock is ten minutes behind: its documents are older than five minutes.
    chat_server.state.enclave = late = kit.StandInEnclave(
        tmp_path / "state" / "nsm-ca", clock=lambda: time.time() - 600
    )
    client = make_client(chat_server, tls_files, stub_kms, kit, late)
    with pytest.raises(AttestationError) as info:
        client.ask(QUESTION)
    assert info.value.check == "stale"
    assert nothing_sent(chat_server, stub_kms)


def test_debug_mode_is_refused_unless_allowed(chat_server, tls_files, stub_kms, kit, tmp_path):
    chat_server.state.enclave = debug = kit.StandInEnclave(
        tmp_path / "state" / "nsm-ca", debug_mode=True
    )
    zeros = {0: bytes(48), 1: bytes(48), 2: bytes(48)}
    client = make_client(chat_server, tls_files, stub_kms, kit, debug, expected_pcrs=zeros)
    with pytest.raises(AttestationError) as info:
        client.ask(QUESTION)
    assert info.value.check == "debug"
    assert nothing_sent(chat_server, stub_kms)
    allowed = make_client(
        chat_server, tls_files, stub_kms, kit, debug, expected_pcrs=zeros, allow_debug=True
    )
    allowed.ask(QUESTION)
    assert allowed.verified is not None and allowed.verified.document.debug_mode


def test_the_packaged_root_is_aws_root():
    testdata = ROOT / "tests" / "testdata" / "aws-nitro-enclaves-root-g1.pem"
    assert verify.aws_root() == load_pem_root(testdata)


def test_production_clients_pin_the_aws_root(chat_server, tls_files, stub_kms, kit, enclave):
    settings = kit.make_settings(chat_server, tls_files)
    client = SecureChatClient(settings, kms_client=stub_kms, expected_pcrs=expected(enclave))
    with pytest.raises(AttestationError) as info:
        client.verify_enclave()  # the emulator's documents do not chain to AWS's root
    assert info.value.check == "root"


# ---- the key policy ----------------------------------------------------------------------------


def local_policy(pcrs: dict[int, bytes]) -> dict[str, Any]:
    return render_local_policy(pcrs, admin_arn=ADMIN_ARN, user_arn=USER_ARN, parent_arn=PARENT_ARN)


def rendered_policy(tmp_path: Path, pcrs: dict[int, bytes], layout: str) -> dict[str, Any]:
    """The production key policy as scripts/render_key_policy.py renders it."""
    measurements = tmp_path / "measurements.json"
    measurements.write_text(
        json.dumps({"Measurements": {f"PCR{i}": pcrs[i].hex() for i in (0, 1, 2)}})
    )
    parent = PARENT_ARN if layout == "strict" else "arn:aws:iam::444455556666:role/parent"
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render_key_policy.py"), str(measurements)]
        + ["--account-id", ACCOUNT, "--user-arn", USER_ARN, "--parent-role-arn", parent]
        + ["--admin-arn", ADMIN_ARN, "--layout", layout],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def test_a_policy_pinned_to_the_enclave_passes(chat_server, tls_files, stub_kms, kit, enclave):
    stub_kms.key_policy = local_policy(enclave.pcrs)
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    client.ask(QUESTION)
    assert client.verified is not None and client.verified.key_policy_checked
    assert client.verified.warnings == ()
    assert stub_kms.policy_reads == [{"KeyId": kit.KEY_ID, "PolicyName": "default"}]


@pytest.mark.parametrize("layout", ["strict", "cross-account"])
def test_the_rendered_production_policies_pass(
    chat_server, tls_files, stub_kms, kit, enclave, tmp_path, layout
):
    stub_kms.key_policy = rendered_policy(tmp_path, enclave.pcrs, layout)
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    assert client.verify_enclave().key_policy_checked


def test_a_policy_pinned_to_another_image_stops_the_client(
    chat_server, tls_files, stub_kms, kit, enclave, tmp_path
):
    stub_kms.key_policy = rendered_policy(tmp_path, kit.measured("another image"), "strict")
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    with pytest.raises(verify.KeyPolicyError) as info:
        client.ask(QUESTION)
    assert info.value.code is ErrorCode.KEY_POLICY_UNSAFE and info.value.check == "key_policy"
    assert "no principal may Decrypt even from the verified enclave" in info.value.detail
    assert nothing_sent(chat_server, stub_kms)


def statement(principal: Any, action: Any, condition: dict[str, Any] | None = None):
    out: dict[str, Any] = {"Effect": "Allow", "Principal": principal, "Action": action}
    out["Resource"] = "*"
    if condition:
        out["Condition"] = condition
    return out


def pinned(pcrs: dict[int, bytes], *indexes: int) -> dict[str, Any]:
    keys = {f"kms:RecipientAttestation:PCR{i}": pcrs[i].hex() for i in indexes}
    return {"StringEqualsIgnoreCase": keys}


UNSAFE = [
    (
        "Decrypt for the parent with no attestation condition",
        lambda p: [statement({"AWS": PARENT_ARN}, "kms:Decrypt")],
        f"{PARENT_ARN} may Decrypt from another application",
    ),
    (
        "only PCR1 pinned: any application on this runtime",
        lambda p: [statement({"AWS": PARENT_ARN}, "kms:Decrypt", pinned(p, 1))],
        "may Decrypt from another application",
    ),
    (
        "only PCR2 pinned: this application on any runtime",
        lambda p: [statement({"AWS": PARENT_ARN}, "kms:Decrypt", pinned(p, 2))],
        "may Decrypt from another runtime",
    ),
    (
        "kms:* for the account root",
        lambda p: [
            statement({"AWS": PARENT_ARN}, "kms:Decrypt", pinned(p, 0, 1, 2)),
            statement({"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "kms:*"),
        ],
        "may Decrypt from another application",  # the root names every role of the account
    ),
    (
        "ReEncrypt for the user",
        lambda p: [
            statement({"AWS": PARENT_ARN}, "kms:Decrypt", pinned(p, 0, 1, 2)),
            statement({"AWS": USER_ARN}, "kms:ReEncrypt*"),
        ],
        f"{USER_ARN} may kms:ReEncryptFrom without any attestation",
    ),
    (
        "CreateGrant for everyone",
        lambda p: [
            statement({"AWS": PARENT_ARN}, "kms:Decrypt", pinned(p, 0, 1, 2)),
            statement("*", "kms:CreateGrant"),
        ],
        "may kms:CreateGrant without any attestation",
    ),
    (
        "an attestation of any value",
        lambda p: [
            statement(
                {"AWS": PARENT_ARN},
                "kms:Decrypt",
                {"Null": {"kms:RecipientAttestation:PCR0": "false"}},
            )
        ],
        "may Decrypt from another application",
    ),
]


@pytest.mark.parametrize(("name", "statements", "reason"), UNSAFE, ids=[case[0] for case in UNSAFE])
def test_an_unsafe_policy_is_refused(enclave, name, statements, reason):
    document = enclave_document(enclave)
    policy = {"Version": "2012-10-17", "Statement": statements(enclave.pcrs)}
    with pytest.raises(verify.KeyPolicyError) as info:
        verify.check_key_policy(
            policy, "arn:aws:kms:us-east-1:111122223333:key/k", document, expected(enclave)
        )
    assert reason in info.value.detail, name


def test_pcr0_alone_identifies_the_image(enclave):
    """AWS's minimal policy pins PCR0 (the whole image): enough for PCR0-2 expected."""
    policy = {
        "Version": "2012-10-17",
        "Statement": [statement({"AWS": PARENT_ARN}, "kms:Decrypt", pinned(enclave.pcrs, 0))],
    }
    verify.check_key_policy(policy, "*", enclave_document(enclave), expected(enclave))


def test_a_debug_mode_enclave_must_not_get_the_key(enclave):
    expected_pcr3 = {3: b"\x03" * 48}
    pcrs = {**enclave.pcrs, 3: expected_pcr3[3]}
    document = dataclasses.replace(enclave_document(enclave), pcrs=pcrs)
    policy = {
        "Version": "2012-10-17",
        "Statement": [statement({"AWS": PARENT_ARN}, "kms:Decrypt", pinned(pcrs, 3))],
    }
    with pytest.raises(verify.KeyPolicyError) as info:
        verify.check_key_policy(policy, "*", document, expected_pcr3)
    assert "a debug-mode enclave" in info.value.detail


def test_an_unreadable_policy_is_a_warning(chat_server, tls_files, stub_kms, kit, enclave):
    stub_kms.key_policy = {
        "Version": "2012-10-17",
        "Statement": [
            statement({"AWS": PARENT_ARN}, "kms:Decrypt", {"NumericLessThan": {"x": "1"}})
        ],
    }
    client = make_client(chat_server, tls_files, stub_kms, kit, enclave)
    client.ask(QUESTION)
    assert client.verified is not None and not client.verified.key_policy_checked
    assert "could not be checked" in client.verified.warnings[0]


def enclave_document(enclave: Any):
    from protocol import attestation

    return attestation.parse(enclave.document(b"n"))


# ---- the measurements file ---------------------------------------------------------------------


def test_expected_pcrs_file_forms(tmp_path):
    pcr = {i: bytes([i + 1]) * 48 for i in (0, 1, 2, 8)}
    cli_form = tmp_path / "nitro-cli.json"
    cli_form.write_text(
        json.dumps(
            {
                "Measurements": {
                    "HashAlgorithm": "Sha384 { ... }",
                    **{f"PCR{i}": v.hex() for i, v in pcr.items()},
                }
            }
        )
    )
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({f"PCR{i}": v.hex().upper() for i, v in pcr.items()}))
    assert verify.load_expected_pcrs(cli_form) == pcr
    assert verify.load_expected_pcrs(plain) == pcr


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("[]", "must hold a JSON object"),
        ("not json", "is not JSON"),
        ("{}", "names no PCR"),
        ('{"PRC0": "00"}', "unknown key 'PRC0'"),
        ('{"PCR32": "' + "00" * 48 + '"}', "unknown key 'PCR32'"),
        ('{"PCR0": "abc"}', "PCR0 must be 96 hex digits"),
        ('{"PCR0": "' + "00" * 32 + '"}', "PCR0 must be 96 hex digits"),
        ('{"PCR0": 5}', "PCR0 must be 96 hex digits"),
        ('{"Measurements": {"HashAlgorithm": "Sha256", "PCR0": "00"}}', "SHA-384"),
        ('{"Measurements": []}', "Measurements must be an object"),
    ],
)
def test_expected_pcrs_file_errors(tmp_path, content, complaint):
    path = tmp_path / "pcrs.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        verify.load_expected_pcrs(path)
    assert complaint in str(info.value)


# ---- the CLI -----------------------------------------------------------------------------------


@pytest.fixture
def state_dir(tmp_path, chat_server, tls_files, kms_http, kit, enclave) -> Path:
    kit.write_profile(tmp_path / "state", chat_server, tls_files, kms_http.url)
    return tmp_path / "state"


def pcr_file(tmp_path: Path, pcrs: dict[int, bytes], name: str = "pcrs.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({f"PCR{i}": v.hex() for i, v in pcrs.items()}))
    return path


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_verifies_then_asks(capsys, state_dir, chat_server, kms_http, enclave, tmp_path, where):
    option = ["--expected-pcrs", str(pcr_file(tmp_path, expected(enclave)))]
    local = ["--local", "--state-dir", str(state_dir)]
    argv = (
        [*local, *option, "ask", QUESTION]
        if where == "before"
        else [*local, "ask", QUESTION, *option]
    )
    code, out, err = run(capsys, argv)
    assert code == 0, err
    assert len(enclave.nonces) == 1 and len(chat_server.state.seen) == 1
    assert out.strip()
    # The local user may not read the key policy: said, not hidden.
    assert "warning: the key policy could not be checked" in err
    assert kms_http.targets() == ["GetKeyPolicy", "GenerateDataKey"]


def test_cli_checks_a_readable_key_policy(
    capsys, state_dir, chat_server, kms_http, enclave, tmp_path
):
    kms_http.key_policy = local_policy(enclave.pcrs)
    pcrs = pcr_file(tmp_path, expected(enclave))
    argv = ["--local", "--state-dir", str(state_dir), "--expected-pcrs", str(pcrs), "--verbose"]
    code, _out, err = run(capsys, [*argv, "ask", QUESTION])
    assert code == 0, err
    assert "warning" not in err
    assert "attestation verified" in err and "key policy checked" in err


def test_cli_refuses_a_changed_pcr_and_sends_nothing(
    capsys, state_dir, chat_server, kms_http, enclave, tmp_path
):
    wrong = {**expected(enclave), 1: b"\x11" * 48}
    argv = [
        "--local",
        "--state-dir",
        str(state_dir),
        "--expected-pcrs",
        str(pcr_file(tmp_path, wrong)),
    ]
    code, out, err = run(capsys, [*argv, "ask", QUESTION])
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("error: attestation_invalid: ")
    assert lines[1].startswith("failed check: pcr1: PCR1 is ")
    assert chat_server.state.seen == [] and kms_http.calls == []


def test_cli_refuses_an_unsafe_key_policy(
    capsys, state_dir, chat_server, kms_http, enclave, tmp_path, kit
):
    kms_http.key_policy = local_policy(kit.measured("another image"))
    argv = ["--local", "--state-dir", str(state_dir)]
    argv += ["--expected-pcrs", str(pcr_file(tmp_path, expected(enclave)))]
    code, _out, err = run(capsys, [*argv, "ask", QUESTION])
    assert code == 1
    assert err.startswith("error: key_policy_unsafe: ")
    assert "failed check: key_policy: no principal may Decrypt" in err
    assert chat_server.state.seen == [] and kms_http.targets() == ["GetKeyPolicy"]


def test_cli_debug_mode(capsys, tmp_path, chat_server, tls_files, kms_http, kit):
    state = tmp_path / "state"
    chat_server.state.enclave = kit.StandInEnclave(state / "nsm-ca", debug_mode=True)
    kit.write_profile(state, chat_server, tls_files, kms_http.url)
    zeros = pcr_file(tmp_path, {0: bytes(48), 1: bytes(48), 2: bytes(48)})
    argv = ["--local", "--state-dir", str(state), "--expected-pcrs", str(zeros), "ask", QUESTION]
    code, _out, err = run(capsys, argv)
    assert code == 1 and "failed check: debug: " in err
    assert chat_server.state.seen == []
    code, _out, err = run(capsys, [*argv, "--allow-debug"])
    assert code == 0, err
    assert len(chat_server.state.seen) == 1


def test_cli_allow_debug_needs_expected_pcrs(capsys, state_dir):
    code, _out, err = run(
        capsys, ["--local", "--state-dir", str(state_dir), "--allow-debug", "ask", "q"]
    )
    assert code == 2 and "--allow-debug goes with --expected-pcrs" in err


def test_cli_bad_measurements_file(capsys, state_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"PCR0": "zz"}')
    argv = ["--local", "--state-dir", str(state_dir), "--expected-pcrs", str(bad), "ask", "q"]
    code, _out, err = run(capsys, argv)
    assert code == 1 and "PCR0 must be 96 hex digits" in err


def test_cli_interactive_verifies_before_the_prompt(
    capsys, monkeypatch, state_dir, chat_server, enclave, tmp_path
):
    wrong = pcr_file(tmp_path, {0: b"\x01" * 48})
    prompted = []
    monkeypatch.setattr("builtins.input", lambda prompt="": prompted.append(prompt) or QUESTION)
    code, _out, err = run(
        capsys, ["--local", "--state-dir", str(state_dir), "--expected-pcrs", str(wrong)]
    )
    assert code == 1 and "failed check: pcr0" in err
    assert prompted == [] and chat_server.state.seen == []


def test_from_profile_pins_the_profiles_root(state_dir, chat_server, kms_http, enclave):
    client = SecureChatClient.from_profile(state_dir, expected_pcrs=expected(enclave))
    with client:
        client.ask(QUESTION)
        assert client.verified is not None
        assert client.verified.document.cabundle[0] == load_pem_root(enclave.root_pem)
    assert kms_http.targets() == ["GetKeyPolicy", "GenerateDataKey"]
