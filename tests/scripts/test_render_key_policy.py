"""Tests of scripts/render_key_policy.py: inputs it accepts and refuses, and what it renders.

The command runs as a user runs it (a subprocess); the library functions are loaded from the
script file, as emulator/local_policy.py loads them.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from protocol.key_policy import evaluate

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "render_key_policy.py"
ACCOUNT = "111122223333"
OTHER = "444455556666"
USER = f"arn:aws:iam::{ACCOUNT}:user/alice"
USER2 = f"arn:aws:iam::{ACCOUNT}:role/analysts"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/key-admin"
PARENT = f"arn:aws:iam::{ACCOUNT}:role/nitro-llm-parent"
CROSS_PARENT = f"arn:aws:iam::{OTHER}:role/nitro-llm-parent"
PCRS = {"PCR0": "a0" * 48, "PCR1": "B1" * 48, "PCR2": "c2" * 48}
PCR8 = "d8" * 48


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_key_policy_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rkp = _load()


def nitro_cli(pcrs: dict[str, str]) -> dict[str, Any]:
    return {"Measurements": {"HashAlgorithm": "Sha384 { ... }", **pcrs}}


def run(
    tmp_path: Path, measurements: Any, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "measurements.json"
    source.write_text(measurements if isinstance(measurements, str) else json.dumps(measurements))
    argv = [sys.executable, str(SCRIPT), "-" if stdin is not None else str(source), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin)


def standard(*, parent: str = PARENT, layout: str = "strict") -> list[str]:
    return [
        *("--account-id", ACCOUNT, "--user-arn", USER, "--user-arn", USER2),
        *("--parent-role-arn", parent, "--admin-arn", ADMIN, "--layout", layout),
    ]


def principals(parent: str = PARENT) -> Any:
    return rkp.Principals(ACCOUNT, (USER, USER2), parent, (ADMIN,))


def statements(policy: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in policy["Statement"]}


def allowed(policy: dict[str, Any], who: str, action: str, **context: str) -> bool:
    ctx = {"aws:PrincipalArn": who, "kms:CallerAccount": who.split(":")[4], **context}
    return evaluate(policy, principal_arn=who, action=action, context=ctx).allowed


# ---- the command ------------------------------------------------------------------------------


def test_renders_nitro_cli_measurements_to_stdout(tmp_path: Path) -> None:
    done = run(tmp_path, nitro_cli(PCRS), *standard())
    assert done.returncode == 0, done.stderr
    policy = json.loads(done.stdout)
    by_sid = statements(policy)
    parent = by_sid["ParentRoleDecryptsOnlyInsideTheMeasuredEnclave"]
    assert parent["Principal"] == {"AWS": PARENT} and parent["Action"] == "kms:Decrypt"
    # Lowercase hex, PCR0-2 only: no PCR8 without a signed image.
    assert parent["Condition"] == {
        "StringEqualsIgnoreCase": {
            f"kms:RecipientAttestation:{name}": value.lower() for name, value in PCRS.items()
        }
    }
    denies = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert [s["Sid"] for s in denies] == [f"DenyKeyReleaseUnlessPCR{n}Matches" for n in (0, 1, 2)]
    for deny in denies:
        assert deny["Principal"] == "*"
        assert deny["Action"] == ["kms:Decrypt", "kms:ReEncrypt*", "kms:CreateGrant"]
        assert list(deny["Condition"]) == ["StringNotEqualsIgnoreCase"]
    users = by_sid["UsersWrapDataKeysForThisAppOnly"]
    assert users["Principal"] == {"AWS": [USER, USER2]}
    assert users["Action"] == "kms:GenerateDataKey"
    assert users["Condition"] == {"StringEquals": {"kms:EncryptionContext:app": "nitro-llm"}}
    admin = by_sid["AdministratorsManageTheKeyButCannotUseIt"]
    assert admin["Principal"] == {"AWS": [ADMIN]}
    flat = [
        a
        for s in policy["Statement"]
        for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
    ]
    assert not {"*", "kms:*"} & set(flat)
    assert "root" not in done.stdout


def test_plain_measurements_from_stdin_and_out_file(tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    plain = {**PCRS, "PCR8": PCR8, "PCR3": "0" * 96, "PCR4": "0" * 96}
    done = run(tmp_path, {}, *standard(), "--out", str(out), stdin=json.dumps(plain))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "PCR8" in done.stderr and str(out) in done.stderr
    policy = json.loads(out.read_text())
    condition = statements(policy)["ParentRoleDecryptsOnlyInsideTheMeasuredEnclave"]["Condition"]
    pinned = condition["StringEqualsIgnoreCase"]
    assert pinned["kms:RecipientAttestation:PCR8"] == PCR8
    # All-zero PCR3/PCR4 are unused registers: not pinned.
    assert "kms:RecipientAttestation:PCR3" not in pinned
    assert "DenyKeyReleaseUnlessPCR8Matches" in statements(policy)
    assert "DenyKeyReleaseUnlessPCR4Matches" not in statements(policy)


BAD_MEASUREMENTS = [
    ({**PCRS, "PCR1": "b1" * 47 + "b"}, "PCR1 must be 96 hex characters (SHA-384), got 95"),
    ({**PCRS, "PCR2": "zz" * 48}, "PCR2 must be a hex string"),
    ({**PCRS, "PCR0": 7}, "PCR0 must be a hex string"),
    ({"PCR0": PCRS["PCR0"], "PCR1": PCRS["PCR1"]}, "PCR2 is missing"),
    ({n: "0" * 96 for n in PCRS}, "debug-mode"),
    ({**PCRS, "Foo": "x"}, "unknown field 'Foo'"),
    ({**PCRS, "HashAlgorithm": "Sha256 { ... }"}, "is not Sha384"),
    ([PCRS["PCR0"]], "must be a JSON object"),
    ("{not json", "is not JSON"),
]


@pytest.mark.parametrize(("measurements", "message"), BAD_MEASUREMENTS)
def test_bad_measurements_exit_2_with_one_clear_line(
    tmp_path: Path, measurements: Any, message: str
) -> None:
    done = run(tmp_path, measurements, *standard())
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert message in lines[0]


def _replace(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


BAD_ARGUMENTS = [
    (_replace(standard(), "--account-id", "1234"), "must be 12 digits"),
    (_replace(standard(), "--user-arn", "alice"), "is not an IAM ARN"),
    (_replace(standard(), "--user-arn", f"arn:aws:iam::{OTHER}:user/alice"), "not in account"),
    (_replace(standard(), "--user-arn", f"arn:aws:iam::{ACCOUNT}:root"), "IAM user or role"),
    (_replace(standard(), "--admin-arn", "arn:aws:iam::1:role/x"), "is not an IAM ARN"),
    (_replace(standard(), "--parent-role-arn", f"arn:aws:iam::{ACCOUNT}:user/p"), "role ARN"),
    (
        _replace(standard(), "--parent-role-arn", f"arn:aws:sts::{ACCOUNT}:assumed-role/p/i-1"),
        "is not an IAM ARN",
    ),
    (standard(parent=CROSS_PARENT), "use --layout cross-account"),
    (standard(layout="cross-account"), "must be in another account"),
    (_replace(standard(), "--admin-arn", USER), "is both --user-arn and --admin-arn"),
    (_replace(standard(), "--user-arn", PARENT), "is both --user-arn and --parent-role-arn"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS)
def test_bad_arns_and_layouts_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    done = run(tmp_path, nitro_cli(PCRS), *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr
    assert done.stdout == ""


def test_usage_errors_and_unreadable_files_exit_2(tmp_path: Path) -> None:
    missing = run(tmp_path, nitro_cli(PCRS), "--account-id", ACCOUNT)
    assert missing.returncode == 2 and "required" in missing.stderr
    layout = run(tmp_path, nitro_cli(PCRS), *standard(layout="open"))
    assert layout.returncode == 2 and "invalid choice" in layout.stderr
    argv = [sys.executable, str(SCRIPT), str(tmp_path / "nope.json"), *standard()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot read" in done.stderr


# ---- what the layouts promise ------------------------------------------------------------------


def _attested(pcrs: dict[str, str]) -> dict[str, str]:
    return {f"kms:RecipientAttestation:{name}": value for name, value in pcrs.items()}


def test_strict_policy_allows_and_refuses_as_documented() -> None:
    pcrs = {0: PCRS["PCR0"], 1: PCRS["PCR1"], 2: PCRS["PCR2"], 8: PCR8}
    policy = rkp.render(pcrs, principals())
    measured = _attested({**PCRS, "PCR8": PCR8})
    app = {"kms:EncryptionContext:app": "nitro-llm"}
    assert allowed(policy, PARENT, "kms:Decrypt", **measured)
    assert not allowed(policy, PARENT, "kms:Decrypt")
    assert not allowed(
        policy, PARENT, "kms:Decrypt", **{**measured, "kms:RecipientAttestation:PCR8": "0" * 96}
    )
    for user in (USER, USER2):
        assert allowed(policy, user, "kms:GenerateDataKey", **app)
        assert not allowed(
            policy, user, "kms:GenerateDataKey", **{"kms:EncryptionContext:app": "x"}
        )
        assert allowed(policy, user, "kms:GetKeyPolicy")
        for action in ("kms:Decrypt", "kms:Encrypt", "kms:PutKeyPolicy", "kms:ReEncryptTo"):
            assert not allowed(policy, user, action, **app, **measured), action
    assert allowed(policy, ADMIN, "kms:PutKeyPolicy")
    assert allowed(policy, ADMIN, "kms:ScheduleKeyDeletion")
    for action in ("kms:Decrypt", "kms:GenerateDataKey", "kms:CreateGrant", "kms:Encrypt"):
        assert not allowed(policy, ADMIN, action, **app, **measured), action
    root = f"arn:aws:iam::{ACCOUNT}:root"
    for action in ("kms:PutKeyPolicy", "kms:Decrypt", "kms:DescribeKey"):
        assert not allowed(policy, root, action, **measured), action


def test_cross_account_policy_admits_the_other_accounts_parent_only_for_attested_decrypt() -> None:
    pcrs = {0: PCRS["PCR0"], 1: PCRS["PCR1"], 2: PCRS["PCR2"]}
    policy = rkp.render(pcrs, principals(CROSS_PARENT), layout="cross-account")
    session = f"arn:aws:sts::{OTHER}:assumed-role/nitro-llm-parent/i-0123456789abcdef0"
    measured = _attested(PCRS)
    assert allowed(policy, session, "kms:Decrypt", **measured)
    assert not allowed(policy, session, "kms:Decrypt")
    # The parent's account (its root, any role) gets nothing else, attested or not.
    for who in (session, f"arn:aws:iam::{OTHER}:root", f"arn:aws:iam::{OTHER}:role/admin"):
        for action in ("kms:PutKeyPolicy", "kms:DescribeKey", "kms:CreateGrant", "kms:ListGrants"):
            assert not allowed(policy, who, action, **measured), (who, action)
    assert not allowed(policy, PARENT, "kms:Decrypt", **measured)  # same role name, other account
    assert allowed(policy, ADMIN, "kms:PutKeyPolicy")


def test_tampered_templates_are_refused() -> None:
    pcrs = {0: PCRS["PCR0"], 1: PCRS["PCR1"], 2: PCRS["PCR2"]}
    template = rkp.load_template("strict")
    root_everything = copy.deepcopy(template)
    root_everything["Statement"].append(
        {
            "Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::${ACCOUNT_ID}:root"},
            "Action": "kms:*",
            "Resource": "*",
        }
    )
    no_denies = copy.deepcopy(template)
    no_denies["Statement"] = [s for s in template["Statement"] if s["Effect"] == "Allow"]
    unconditional = copy.deepcopy(template)
    for statement in unconditional["Statement"]:
        if statement["Sid"].startswith("ParentRole"):
            statement["Condition"] = {"StringEquals": {"kms:EncryptionContext:app": "nitro-llm"}}
    unknown = copy.deepcopy(template)
    unknown["Statement"][0]["Principal"] = {"AWS": "${SOMEONE}"}
    embedded = copy.deepcopy(template)
    embedded["Statement"][0]["Principal"] = {"AWS": "x${USER_ARNS}"}
    cases = [
        (root_everything, "breaks its promises"),
        (no_denies, "breaks its promises"),
        (unconditional, "breaks its promises"),
        (unknown, "unknown placeholder ${SOMEONE}"),
        (embedded, "cannot be part of a string"),
    ]
    for tampered, message in cases:
        with pytest.raises(rkp.RenderError, match=message.replace("$", r"\$")):
            rkp.render(pcrs, principals(), template=tampered)


def test_an_optional_pcr_drops_its_deny_statement_never_its_condition_only() -> None:
    template = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Keep",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringNotEquals": {"kms:RecipientAttestation:PCR8": "${PCR8}"}},
            }
        ],
    }
    values = {"PCR8": rkp._DROP}
    assert rkp.render_template(template, values)["Statement"] == []
    values = {"PCR8": PCR8}
    rendered = rkp.render_template(template, values)["Statement"][0]["Condition"]
    assert rendered == {"StringNotEquals": {"kms:RecipientAttestation:PCR8": PCR8}}


def test_nitro_local_renders_the_strict_template() -> None:
    from emulator import stack
    from emulator.local_policy import render_local_policy

    pcrs = {n: bytes([0x40 + n]) * 48 for n in range(16)}
    policy = render_local_policy(
        pcrs, admin_arn=stack.ADMIN_ARN, user_arn=stack.USER_ARN, parent_arn=stack.PARENT_ARN
    )
    assert policy["Id"] == "nitro-llm-strict"
    pinned = statements(policy)["ParentRoleDecryptsOnlyInsideTheMeasuredEnclave"]["Condition"]
    assert set(pinned["StringEqualsIgnoreCase"]) == {
        f"kms:RecipientAttestation:PCR{n}" for n in (0, 1, 2)
    }
    # The admin is the account root there: the condition keeps the rest of the account out.
    root = stack.ADMIN_ARN
    assert allowed(policy, root, "kms:PutKeyPolicy")
    assert not allowed(policy, stack.USER_ARN, "kms:PutKeyPolicy")
    assert not allowed(policy, stack.PARENT_ARN, "kms:PutKeyPolicy")
