"""The local key policy: the admin manages, the user wraps, only an attested enclave unwraps.

`nitro-local` pins it to the PCRs the NSM emulator measures; a later issue replaces this module with
the template renderer under scripts/ that also renders the production key_policy.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# What the key's administrator may do: everything that manages the key, nothing that uses it.
# kms:Decrypt, kms:ReEncrypt*, kms:GenerateDataKey* and kms:CreateGrant (which could hand
# Decrypt to anyone) are deliberately absent.
ADMIN_ACTIONS = (
    "kms:CreateKey",
    "kms:CreateAlias",
    "kms:Describe*",
    "kms:Enable*",
    "kms:List*",
    "kms:Put*",
    "kms:Update*",
    "kms:Revoke*",
    "kms:Disable*",
    "kms:Get*",
    "kms:Delete*",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
)
PINNED_PCRS = (0, 1, 2)
APP = "nitro-llm"


def render_local_policy(
    pcrs: Mapping[int, bytes], *, admin_arn: str, user_arn: str, parent_arn: str
) -> dict[str, Any]:
    """The policy document (a JSON object) for the local key, pinned to PCR0-2 of `pcrs`."""
    missing = [n for n in PINNED_PCRS if n not in pcrs]
    if missing:
        raise ValueError(f"PCR{missing[0]} is needed to pin the policy")
    for n in PINNED_PCRS:
        if len(pcrs[n]) != 48:
            raise ValueError(f"PCR{n} must be 48 bytes (SHA-384)")
    pinned = {f"kms:RecipientAttestation:PCR{n}": pcrs[n].hex() for n in PINNED_PCRS}
    return {
        "Version": "2012-10-17",
        "Id": "nitro-llm-local",
        "Statement": [
            {
                "Sid": "AdminManagesTheKeyButCannotUseIt",
                "Effect": "Allow",
                "Principal": {"AWS": admin_arn},
                "Action": list(ADMIN_ACTIONS),
                "Resource": "*",
                # A root principal names the whole account (every user and role in it, through
                # their IAM policies). The emulator has no IAM, so the condition keeps the user
                # and the parent role from rewriting this policy.
                "Condition": {"StringEquals": {"aws:PrincipalArn": admin_arn}},
            },
            {
                "Sid": "UserDescribesTheKey",
                "Effect": "Allow",
                "Principal": {"AWS": user_arn},
                "Action": "kms:DescribeKey",
                "Resource": "*",
            },
            {
                "Sid": "UserWrapsDataKeysForThisApp",
                "Effect": "Allow",
                "Principal": {"AWS": user_arn},
                "Action": "kms:GenerateDataKey",
                "Resource": "*",
                "Condition": {"StringEquals": {"kms:EncryptionContext:app": APP}},
            },
            {
                "Sid": "ParentUnwrapsOnlyInsideTheMeasuredEnclave",
                "Effect": "Allow",
                "Principal": {"AWS": parent_arn},
                "Action": "kms:Decrypt",
                "Resource": "*",
                # KMS compares these to the attestation document in Recipient; without one the
                # keys are absent and the condition fails, so the parent alone gets nothing.
                "Condition": {"StringEqualsIgnoreCase": pinned},
            },
        ],
    }
