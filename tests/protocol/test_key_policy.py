"""Tables of key-policy evaluations (protocol/key_policy.py), each as AWS documents the rule.

Operators against present and absent keys (IAM's absent-key rule), the condition keys a Nitro
key policy uses, principals, action wildcards and how Allow, Deny and default deny combine.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from protocol.key_policy import PolicyError, evaluate, validate_policy

ACCOUNT = "111122223333"
USER = f"arn:aws:iam::{ACCOUNT}:user/alice"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/parent"
SESSION = f"arn:aws:sts::{ACCOUNT}:assumed-role/parent/i-0123456789abcdef0"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
STRANGER = "arn:aws:iam::444455556666:role/parent"
PCR0 = "ab" * 48
PCR1 = "cd" * 48
ABSENT = object()


def allow(condition: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    statement = {"Effect": "Allow", "Principal": {"AWS": USER}, "Action": "kms:Decrypt"}
    statement["Resource"] = "*"
    if condition is not None:
        statement["Condition"] = condition
    statement.update(fields)
    return statement


def deny(condition: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    return allow(condition, Effect="Deny", **fields)


def decide(
    *statements: dict[str, Any],
    who: str = USER,
    action: str = "kms:Decrypt",
    context: dict[str, Any] | None = None,
) -> bool:
    policy = {"Version": "2012-10-17", "Statement": list(statements)}
    return evaluate(policy, principal_arn=who, action=action, context=context or {}).allowed


# (operator, value in the policy, value in the request or ABSENT, whether the condition holds)
OPERATOR_CASES = [
    ("StringEquals", "nitro-llm", "nitro-llm", True),
    ("StringEquals", "nitro-llm", "Nitro-LLM", False),
    ("StringEquals", "nitro-*", "nitro-llm", False),  # no wildcards outside ...Like
    ("StringEquals", "nitro-llm", ABSENT, False),
    ("StringEquals", ["other", "nitro-llm"], "nitro-llm", True),  # values are OR'ed
    ("StringNotEquals", "nitro-llm", "nitro-llm", False),
    ("StringNotEquals", "nitro-llm", "other", True),
    ("StringNotEquals", "nitro-llm", ABSENT, True),
    ("StringNotEquals", ["a", "b"], "b", False),
    ("StringEqualsIgnoreCase", PCR0.upper(), PCR0, True),
    ("StringEqualsIgnoreCase", PCR0, PCR1, False),
    ("StringEqualsIgnoreCase", PCR0, ABSENT, False),
    ("StringNotEqualsIgnoreCase", PCR0.upper(), PCR0, False),
    ("StringNotEqualsIgnoreCase", PCR0, PCR1, True),
    ("StringNotEqualsIgnoreCase", PCR0, ABSENT, True),
    ("StringLike", "nitro-*", "nitro-llm", True),
    ("StringLike", "nitro-?lm", "nitro-llm", True),
    ("StringLike", "nitro-*", "NITRO-llm", False),  # ...Like is case-sensitive
    ("StringLike", "nitro-*", ABSENT, False),
    ("StringNotLike", "nitro-*", "other", True),
    ("StringNotLike", "nitro-*", ABSENT, True),
    ("Bool", "true", True, True),
    ("Bool", "true", False, False),
    ("Bool", True, "true", True),
    ("Bool", "false", ABSENT, False),
    ("Null", "true", ABSENT, True),  # "true": the key must be absent
    ("Null", "true", "x", False),
    ("Null", "false", "x", True),
    ("Null", "false", ABSENT, False),
    ("StringEqualsIfExists", "nitro-llm", ABSENT, True),
    ("StringEqualsIfExists", "nitro-llm", "nitro-llm", True),
    ("StringEqualsIfExists", "nitro-llm", "other", False),
    ("StringNotEqualsIfExists", "nitro-llm", ABSENT, True),
    ("StringNotEqualsIfExists", "nitro-llm", "nitro-llm", False),
    ("StringEqualsIgnoreCaseIfExists", PCR0, ABSENT, True),
    ("StringEqualsIgnoreCaseIfExists", PCR0, PCR1, False),
    ("StringNotEqualsIgnoreCaseIfExists", PCR0, ABSENT, True),
    ("StringNotEqualsIgnoreCaseIfExists", PCR0, PCR0.upper(), False),
    ("StringLikeIfExists", "nitro-*", ABSENT, True),
    ("StringLikeIfExists", "nitro-*", "x", False),
    ("BoolIfExists", "true", ABSENT, True),
    ("BoolIfExists", "true", False, False),
]


@pytest.mark.parametrize(("operator", "wanted", "given", "holds"), OPERATOR_CASES)
def test_operator_against_present_and_absent_keys(
    operator: str, wanted: Any, given: Any, holds: bool
) -> None:
    key = "kms:EncryptionContext:app"
    context = {} if given is ABSENT else {key: given}
    condition = {operator: {key: wanted}}
    # In an Allow the condition decides access; in a Deny (next to an Allow) it decides refusal.
    assert decide(allow(condition), context=context) is holds
    assert decide(allow(), deny(condition), context=context) is not holds


# The condition keys of a Nitro key policy: (key, value in the policy, request context, holds).
KEY_CASES = [
    (
        "kms:RecipientAttestation:ImageSha384",
        PCR0,
        {"kms:RecipientAttestation:ImageSha384": PCR0},
        True,
    ),
    ("kms:RecipientAttestation:ImageSha384", PCR0, {"kms:RecipientAttestation:PCR0": PCR0}, False),
    ("kms:RecipientAttestation:PCR0", PCR0, {"kms:RecipientAttestation:PCR0": PCR0}, True),
    ("kms:RecipientAttestation:PCR1", PCR1, {"kms:RecipientAttestation:PCR0": PCR1}, False),
    ("kms:RecipientAttestation:PCR8", PCR1, {"kms:RecipientAttestation:PCR8": PCR1}, True),
    ("kms:RecipientAttestation:PCR8", PCR1, {}, False),
    ("kms:EncryptionContext:app", "nitro-llm", {"kms:EncryptionContext:app": "nitro-llm"}, True),
    (
        "kms:EncryptionContext:app",
        "nitro-llm",
        {"kms:EncryptionContext:session": "nitro-llm"},
        False,
    ),
    ("kms:CallerAccount", ACCOUNT, {"kms:CallerAccount": ACCOUNT}, True),
    ("kms:CallerAccount", ACCOUNT, {"kms:CallerAccount": "444455556666"}, False),
    ("aws:PrincipalArn", USER, {"aws:PrincipalArn": USER}, True),
    ("aws:PrincipalArn", ROLE, {"aws:PrincipalArn": USER}, False),
    # Condition key names are case-insensitive; values are compared by the operator.
    ("KMS:recipientattestation:pcr0", PCR0, {"kms:RecipientAttestation:PCR0": PCR0}, True),
]


@pytest.mark.parametrize(("key", "wanted", "context", "holds"), KEY_CASES)
def test_condition_keys(key: str, wanted: str, context: dict[str, str], holds: bool) -> None:
    assert decide(allow({"StringEquals": {key: wanted}}), context=context) is holds


def test_an_allow_of_encrypt_conditioned_on_attestation_never_matches() -> None:
    # Encrypt takes no Recipient, so the attestation keys are never in its request context.
    attested = {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": PCR0}}
    policy = allow(attested, Action="kms:Encrypt")
    assert not decide(policy, action="kms:Encrypt", context={"kms:EncryptionContext:app": "x"})
    assert not decide(policy, action="kms:Encrypt")
    # ...whereas a negated Deny on the same absent key always fires.
    negated = {"StringNotEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": PCR0}}
    assert not decide(allow(), deny(negated))
    assert decide(allow(), deny(negated), context={"kms:RecipientAttestation:PCR0": PCR0})


def test_keys_in_one_block_are_anded_so_each_pcr_needs_its_own_deny() -> None:
    # One Deny naming PCR0 and PCR1 fires only when both differ: another PCR1 alone slips past it.
    both = {
        "StringNotEqualsIgnoreCase": {
            "kms:RecipientAttestation:PCR0": PCR0,
            "kms:RecipientAttestation:PCR1": PCR1,
        }
    }
    other_pcr1 = {"kms:RecipientAttestation:PCR0": PCR0, "kms:RecipientAttestation:PCR1": PCR0}
    assert decide(allow(), deny(both), context=other_pcr1)
    per_pcr = [
        deny({"StringNotEqualsIgnoreCase": {f"kms:RecipientAttestation:PCR{n}": v}})
        for n, v in ((0, PCR0), (1, PCR1))
    ]
    assert not decide(allow(), *per_pcr, context=other_pcr1)
    # Several operators are AND'ed too.
    two_operators = {
        "StringEquals": {"kms:EncryptionContext:app": "nitro-llm"},
        "StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": PCR0},
    }
    app = {"kms:EncryptionContext:app": "nitro-llm"}
    assert not decide(allow(two_operators), context=app)
    assert decide(allow(two_operators), context={**app, "kms:RecipientAttestation:PCR0": PCR0})


# (Principal element, caller, matches)
PRINCIPAL_CASES = [
    ("*", STRANGER, True),
    ({"AWS": "*"}, STRANGER, True),
    ({"AWS": USER}, USER, True),
    ({"AWS": USER}, f"arn:aws:iam::{ACCOUNT}:user/bob", False),
    ({"AWS": [ROLE, USER]}, USER, True),
    ({"AWS": ROLE}, SESSION, True),  # a role's sessions are the role
    ({"AWS": ROLE}, STRANGER, False),  # the same role name in another account
    ({"AWS": ROOT}, SESSION, True),  # the account root stands for its account
    ({"AWS": ACCOUNT}, USER, True),
    ({"AWS": ROOT}, STRANGER, False),
    ({"Service": "ec2.amazonaws.com"}, USER, False),
]


@pytest.mark.parametrize(("principal", "caller", "matches"), PRINCIPAL_CASES)
def test_principals(principal: Any, caller: str, matches: bool) -> None:
    assert decide(allow(Principal=principal), who=caller) is matches


# (Action element, requested action, matches)
ACTION_CASES = [
    ("kms:Decrypt", "kms:Decrypt", True),
    ("kms:Decrypt", "KMS:decrypt", True),  # actions are case-insensitive
    ("kms:*", "kms:PutKeyPolicy", True),
    ("*", "kms:CreateGrant", True),
    ("kms:ReEncrypt*", "kms:ReEncryptFrom", True),
    ("kms:ReEncrypt*", "kms:ReEncryptTo", True),
    ("kms:ReEncrypt*", "kms:Decrypt", False),
    ("kms:Generate*", "kms:GenerateDataKey", True),
    ("kms:Generate*", "kms:Decrypt", False),
    ("kms:?ecrypt", "kms:Decrypt", True),
    (["kms:Encrypt", "kms:Decrypt"], "kms:Decrypt", True),
    ("kms:Describe*", "kms:DescribeKey", True),
    ("kms:Create*", "kms:CreateGrant", True),  # why admin templates list CreateAlias alone
]


@pytest.mark.parametrize(("action", "requested", "matches"), ACTION_CASES)
def test_action_wildcards(action: Any, requested: str, matches: bool) -> None:
    assert decide(allow(Action=action), action=requested) is matches


def test_default_deny_and_explicit_deny_wins_in_any_order() -> None:
    assert not decide(allow(Action="kms:Encrypt"))
    everything = allow(Action="kms:*", Principal="*")
    no_decrypt = deny(Principal="*")
    for statements in ((everything, no_decrypt), (no_decrypt, everything)):
        assert not decide(*statements)
        assert decide(*statements, action="kms:Encrypt")
    # A Deny whose condition does not hold denies nothing.
    conditional = deny({"StringEquals": {"kms:CallerAccount": "444455556666"}}, Principal="*")
    assert decide(everything, conditional, context={"kms:CallerAccount": ACCOUNT})
    assert not decide(everything, conditional, context={"kms:CallerAccount": "444455556666"})


@pytest.mark.parametrize(
    "condition",
    [
        {"Null": {"kms:EncryptionContext:app": "maybe"}},
        {"Bool": {"aws:SecureTransport": "yes"}},
        {"NullIfExists": {"kms:EncryptionContext:app": "true"}},
        {"NumericEquals": {"kms:EncryptionContext:app": "1"}},
        {"StringEquals": {}},
        {"StringEquals": {"kms:EncryptionContext:app": []}},
    ],
)
def test_conditions_the_evaluator_cannot_read_fail_closed(condition: dict[str, Any]) -> None:
    policy = {"Version": "2012-10-17", "Statement": [allow(condition)]}
    with pytest.raises(PolicyError):
        validate_policy(policy)
    with pytest.raises(PolicyError):
        evaluate(policy, principal_arn=USER, action="kms:Decrypt", context={})


def test_the_emulator_reexports_the_same_evaluator() -> None:
    from emulator import kms_policy
    from protocol import key_policy

    assert kms_policy.evaluate is key_policy.evaluate
    assert kms_policy.PolicyError is key_policy.PolicyError


def test_the_evaluator_needs_the_standard_library_only() -> None:
    # The chatbot checks key policies with it: importing it must pull in nothing else.
    code = (
        "import sys, protocol.key_policy\n"
        "names = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)\n"
        "print(sorted(n for n in names if not n.startswith('_') and n != 'protocol'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
