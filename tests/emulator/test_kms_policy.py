"""Unit tests of the KMS emulator's key-policy evaluator (emulator/kms_policy.py)."""

from __future__ import annotations

from typing import Any

import pytest

from emulator.kms_policy import PolicyError, account_of, evaluate, role_arn_of, validate_policy

ACCOUNT = "111122223333"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
USER = f"arn:aws:iam::{ACCOUNT}:user/alice"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/parent"
SESSION = f"arn:aws:sts::{ACCOUNT}:assumed-role/parent/i-0123"
STRANGER = "arn:aws:iam::444455556666:user/mallory"
KEY_ARN = f"arn:aws:kms:us-east-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
PCR0 = "ab" * 48


def statement(effect: str = "Allow", **fields: Any) -> dict[str, Any]:
    base = {"Effect": effect, "Principal": {"AWS": USER}, "Action": "kms:Decrypt", "Resource": "*"}
    base.update(fields)
    return base


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allowed(doc: dict[str, Any], *, who: str = USER, action: str = "kms:Decrypt", **ctx: Any):
    context = {key.replace("__", ":"): value for key, value in ctx.items()}
    return evaluate(doc, principal_arn=who, action=action, context=context).allowed


def test_default_deny_when_nothing_matches() -> None:
    decision = evaluate(
        policy(statement(Action="kms:Encrypt")),
        principal_arn=USER,
        action="kms:Decrypt",
        context={},
    )
    assert decision.allowed is False
    assert decision.reason == "implicit deny"


def test_allow_reason_names_the_sid() -> None:
    decision = evaluate(
        policy(statement(Sid="AllowUser")), principal_arn=USER, action="kms:Decrypt", context={}
    )
    assert decision.allowed
    assert "AllowUser" in decision.reason


def test_explicit_deny_wins_over_allow_in_any_order() -> None:
    allow = statement(Sid="Allow", Action="kms:*")
    deny = statement("Deny", Sid="NoDecrypt")
    for doc in (policy(allow, deny), policy(deny, allow)):
        decision = evaluate(doc, principal_arn=USER, action="kms:Decrypt", context={})
        assert not decision.allowed
        assert "NoDecrypt" in decision.reason
    assert allowed(policy(allow, deny), action="kms:Encrypt")


def test_wildcard_actions_and_case_insensitivity() -> None:
    doc = policy(statement(Action=["kms:Generate*", "kms:Re?ncrypt*"]))
    assert allowed(doc, action="kms:GenerateDataKey")
    assert allowed(doc, action="KMS:generatedatakey")
    assert allowed(doc, action="kms:ReEncryptFrom")
    assert not allowed(doc, action="kms:Decrypt")
    assert allowed(policy(statement(Action="kms:*")), action="kms:PutKeyPolicy")
    assert allowed(policy(statement(Action="*")), action="kms:PutKeyPolicy")


def test_not_action() -> None:
    stmt = statement()
    stmt["NotAction"] = stmt.pop("Action")
    doc = policy(stmt)
    assert allowed(doc, action="kms:Encrypt")
    assert not allowed(doc, action="kms:Decrypt")


def test_account_root_and_bare_account_match_every_principal_of_the_account() -> None:
    for principal in (ROOT, ACCOUNT, [ROOT]):
        doc = policy(statement(Principal={"AWS": principal}))
        assert allowed(doc, who=USER)
        assert allowed(doc, who=SESSION)
        assert not allowed(doc, who=STRANGER)


def test_principal_forms() -> None:
    assert allowed(policy(statement(Principal="*")), who=STRANGER)
    assert allowed(policy(statement(Principal={"AWS": "*"})), who=STRANGER)
    listed = policy(statement(Principal={"AWS": [ROLE, USER]}))
    assert allowed(listed, who=USER)
    assert not allowed(listed, who=f"arn:aws:iam::{ACCOUNT}:user/bob")
    # An assumed-role session is its role.
    assert allowed(policy(statement(Principal={"AWS": ROLE})), who=SESSION)
    assert not allowed(policy(statement(Principal={"Service": "ec2.amazonaws.com"})), who=USER)


def test_not_principal() -> None:
    stmt = statement("Deny", Action="kms:*")
    stmt.pop("Principal")
    stmt["NotPrincipal"] = {"AWS": USER}
    doc = policy(statement(Principal="*", Action="kms:*"), stmt)
    assert allowed(doc, who=USER)
    assert not allowed(doc, who=ROLE)


def test_resource_must_match_the_key() -> None:
    doc = policy(statement(Resource=KEY_ARN))
    ctx: dict[str, str] = {}
    d = evaluate(doc, principal_arn=USER, action="kms:Decrypt", context=ctx, resource=KEY_ARN)
    assert d.allowed
    other = KEY_ARN[:-1] + "c"
    d = evaluate(doc, principal_arn=USER, action="kms:Decrypt", context=ctx, resource=other)
    assert not d.allowed
    doc = policy(statement(Resource=f"arn:aws:kms:*:{ACCOUNT}:key/*"))
    d = evaluate(doc, principal_arn=USER, action="kms:Decrypt", context=ctx, resource=other)
    assert d.allowed


def cond(operator: str, key: str, value: Any) -> dict[str, Any]:
    return policy(statement(Condition={operator: {key: value}}))


IMAGE = "kms:RecipientAttestation:ImageSha384"


def test_string_equals_and_absent_key() -> None:
    doc = cond("StringEquals", IMAGE, PCR0)
    assert allowed(doc, **{IMAGE.replace(":", "__"): PCR0})
    assert not allowed(doc, **{IMAGE.replace(":", "__"): "cd" * 48})
    assert not allowed(doc)  # absent key: a positive operator is false
    # Condition key names are case-insensitive; values are not for StringEquals.
    assert allowed(doc, **{"KMS__recipientattestation__IMAGESHA384": PCR0})
    assert not allowed(doc, **{IMAGE.replace(":", "__"): PCR0.upper()})


def test_multiple_values_are_ored_and_keys_anded() -> None:
    doc = policy(
        statement(
            Condition={
                "StringEquals": {
                    "kms:EncryptionContext:app": ["nitro-llm", "other"],
                    "kms:RecipientAttestation:PCR1": "01" * 48,
                }
            }
        )
    )
    both = {"kms__EncryptionContext__app": "other", "kms__RecipientAttestation__PCR1": "01" * 48}
    assert allowed(doc, **both)
    assert not allowed(doc, **(both | {"kms__RecipientAttestation__PCR1": "02" * 48}))
    assert not allowed(doc, kms__EncryptionContext__app="nitro-llm")


def test_operators_are_anded() -> None:
    doc = policy(
        statement(
            Condition={
                "StringEquals": {"kms:EncryptionContext:app": "nitro-llm"},
                "StringLike": {"kms:EncryptionContext:session": "s-*"},
            }
        )
    )
    assert allowed(
        doc, kms__EncryptionContext__app="nitro-llm", kms__EncryptionContext__session="s-1"
    )
    assert not allowed(
        doc, kms__EncryptionContext__app="nitro-llm", kms__EncryptionContext__session="x"
    )


def test_string_not_equals_and_absent_key() -> None:
    doc = cond("StringNotEquals", "kms:EncryptionContext:app", ["a", "b"])
    assert allowed(doc, kms__EncryptionContext__app="c")
    assert not allowed(doc, kms__EncryptionContext__app="b")
    assert allowed(doc)  # absent key: a negated operator is true


def test_ignore_case_operators() -> None:
    doc = cond("StringEqualsIgnoreCase", "kms:EncryptionContext:app", "Nitro-LLM")
    assert allowed(doc, kms__EncryptionContext__app="nitro-llm")
    assert not allowed(doc, kms__EncryptionContext__app="nitro")
    doc = cond("StringNotEqualsIgnoreCase", "kms:EncryptionContext:app", "Nitro-LLM")
    assert not allowed(doc, kms__EncryptionContext__app="NITRO-llm")
    assert allowed(doc, kms__EncryptionContext__app="other")


def test_string_like_and_not_like() -> None:
    doc = cond("StringLike", "aws:PrincipalArn", f"arn:aws:iam::{ACCOUNT}:role/par?nt*")
    assert allowed(doc, aws__PrincipalArn=ROLE)
    assert not allowed(doc, aws__PrincipalArn=USER)
    assert not allowed(doc, aws__PrincipalArn=ROLE.upper())  # StringLike is case-sensitive
    doc = cond("StringNotLike", "aws:PrincipalArn", "*:user/*")
    assert allowed(doc, aws__PrincipalArn=ROLE)
    assert not allowed(doc, aws__PrincipalArn=USER)


def test_if_exists_forms() -> None:
    doc = cond("StringEqualsIfExists", IMAGE, PCR0)
    assert allowed(doc)  # absent: true
    assert allowed(doc, **{IMAGE.replace(":", "__"): PCR0})
    assert not allowed(doc, **{IMAGE.replace(":", "__"): "00" * 48})
    doc = cond("StringNotEqualsIfExists", IMAGE, PCR0)
    assert allowed(doc)
    assert not allowed(doc, **{IMAGE.replace(":", "__"): PCR0})


def test_null_checks_presence() -> None:
    must_be_present = cond("Null", IMAGE, "false")
    assert allowed(must_be_present, **{IMAGE.replace(":", "__"): PCR0})
    assert not allowed(must_be_present)
    must_be_absent = cond("Null", IMAGE, "true")
    assert allowed(must_be_absent)
    assert not allowed(must_be_absent, **{IMAGE.replace(":", "__"): PCR0})


def test_bool() -> None:
    doc = cond("Bool", "aws:SecureTransport", "true")
    assert allowed(doc, aws__SecureTransport=True)
    assert allowed(doc, aws__SecureTransport="TRUE")
    assert not allowed(doc, aws__SecureTransport=False)
    assert not allowed(doc)
    assert allowed(cond("Bool", "aws:SecureTransport", False), aws__SecureTransport=False)
    assert allowed(cond("BoolIfExists", "aws:SecureTransport", "true"))


def test_for_any_and_for_all_values() -> None:
    keys = "kms:EncryptionContextKeys"
    any_doc = cond("ForAnyValue:StringEquals", keys, "session")
    assert allowed(any_doc, kms__EncryptionContextKeys=["app", "session"])
    assert not allowed(any_doc, kms__EncryptionContextKeys=["app"])
    assert not allowed(any_doc)  # ForAnyValue with an absent key is false
    all_doc = cond("ForAllValues:StringEquals", keys, ["app", "session"])
    assert allowed(all_doc, kms__EncryptionContextKeys=["app", "session"])
    assert not allowed(all_doc, kms__EncryptionContextKeys=["app", "extra"])
    assert allowed(all_doc)  # ForAllValues with an absent key is true


def test_deny_with_condition_only_when_condition_holds() -> None:
    doc = policy(
        statement(Sid="Allow", Action="kms:*"),
        statement(
            "Deny",
            Sid="OnlyAttested",
            Action="kms:Decrypt",
            Condition={"StringNotEquals": {IMAGE: PCR0}},
        ),
    )
    assert allowed(doc, **{IMAGE.replace(":", "__"): PCR0})
    assert not allowed(doc, **{IMAGE.replace(":", "__"): "00" * 48})
    assert not allowed(doc)  # no attestation at all: StringNotEquals on an absent key holds


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"Statement": []},
        {"Version": "2020-01-01", "Statement": [statement()]},
        {"Statement": [statement(Effect="Maybe")]},
        {"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]},
        {"Statement": [statement(Condition={"NumericLessThan": {"k": "1"}})]},
        {"Statement": [statement(Condition={"NullIfExists": {"k": "true"}})]},
        {"Statement": [statement(Extra=1)]},
        {"Statement": [statement(Principal={"Robot": "x"})]},
        {"Statement": [statement(Action=[])]},
        {"Statement": [statement(Condition={"StringEquals": {"k": {"nested": 1}}})]},
    ],
)
def test_malformed_policies_are_refused(bad: Any) -> None:
    with pytest.raises(PolicyError):
        validate_policy(bad)
    with pytest.raises(PolicyError):
        evaluate(bad, principal_arn=USER, action="kms:Decrypt", context={})


def test_arn_helpers() -> None:
    assert account_of(SESSION) == ACCOUNT
    assert account_of("not an arn") is None
    assert role_arn_of(SESSION) == ROLE
    assert role_arn_of(USER) == USER
