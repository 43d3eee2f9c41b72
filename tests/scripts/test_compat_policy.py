"""The compat (protocol v1) key policy: rendered from key_policy_compat.json and held to its own
promises, so an edit that lets the parent decrypt unattested, or takes Decrypt from users, fails."""

from __future__ import annotations

import copy
import json

import pytest

from emulator.local_policy import renderer
from protocol.key_policy import evaluate

ACCOUNT = "111122223333"
USER = f"arn:aws:iam::{ACCOUNT}:role/v1-user"
PARENT = f"arn:aws:iam::{ACCOUNT}:role/parent"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/admin"
PCRS = {0: "a" * 96, 1: "b" * 96, 2: "c" * 96}


def render(template=None):
    module = renderer()
    principals = module.Principals(ACCOUNT, (USER,), PARENT, (ADMIN,))
    return module.render(PCRS, principals, layout="compat", template=template)


def allowed(policy, who, action, **context):
    ctx = {"aws:PrincipalArn": who, "aws:PrincipalAccount": ACCOUNT, **context}
    return evaluate(policy, principal_arn=who, action=action, context=ctx).allowed


def test_only_the_attested_enclave_decrypts_besides_users():
    policy = render()
    attested = {f"kms:RecipientAttestation:PCR{n}": v for n, v in PCRS.items()}
    assert allowed(policy, PARENT, "kms:Decrypt", **attested)
    assert not allowed(policy, PARENT, "kms:Decrypt")
    assert not allowed(
        policy, PARENT, "kms:Decrypt", **{**attested, "kms:RecipientAttestation:PCR1": "f" * 96}
    )
    assert allowed(policy, PARENT, "kms:Encrypt")
    assert allowed(policy, USER, "kms:Encrypt") and allowed(policy, USER, "kms:Decrypt")
    assert not allowed(policy, ADMIN, "kms:Decrypt", **attested)
    assert not allowed(policy, USER, "kms:CreateGrant", **attested)


def _template():
    return json.loads(renderer().LAYOUTS["compat"].read_text())


def test_a_template_letting_the_parent_decrypt_unattested_is_refused():
    template = _template()
    for statement in template["Statement"]:
        if statement["Sid"] == "V1ParentRoleEncryptsAnswers":
            statement["Action"] = ["kms:Encrypt", "kms:Decrypt"]
        if statement["Sid"].startswith("DenyDecryptToAllButUsers"):
            statement["Condition"]["ArnNotEquals"]["aws:PrincipalArn"].append("${PARENT_ROLE_ARN}")
    with pytest.raises(renderer().RenderError, match="unattested Decrypt"):
        render(template)


def test_a_template_denying_users_their_answers_is_refused():
    template = copy.deepcopy(_template())
    for statement in template["Statement"]:
        statement.get("Condition", {}).pop("ArnNotEquals", None)
    with pytest.raises(renderer().RenderError, match="v1 user's kms:Decrypt"):
        render(template)
