"""Each rendered key policy, loaded into the running KMS emulator, allows and refuses what it says.

The policies come from scripts/render_key_policy.py run as a command on a measurements file;
requests are unmodified boto3 calls; attestation documents are real COSE documents signed by the
emulator's CA (the one the KMS emulator pins), for the measured image, another image and a
debug-mode enclave.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulator import stack
from emulator.ca import LocalCA
from protocol.attestation import encode_document
from protocol.cms import open_enveloped_data

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "render_key_policy.py"
OWNER = stack.ACCOUNT_ID
OTHER = "444455556666"
KEY_ADMIN = f"arn:aws:iam::{OWNER}:role/nitro-llm-key-admin"
CROSS_PARENT = f"arn:aws:iam::{OTHER}:role/nitro-llm-parent"
CROSS_PARENT_SESSION = f"arn:aws:sts::{OTHER}:assumed-role/nitro-llm-parent/i-0123456789abcdef0"
OTHER_ROOT = f"arn:aws:iam::{OTHER}:root"
CONTEXT = {"app": "nitro-llm", "session": "c2Vzc2lvbi0x"}
MEASURED = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 8: b"\x18" * 48}


@dataclass
class Emulator:
    paths: stack.StatePaths
    endpoint: str
    ca: LocalCA
    enclave_key: rsa.RSAPrivateKey
    clients: dict[str, Any]

    def document(self, pcrs: dict[int, bytes]) -> bytes:
        """A fresh attestation document for the enclave's own key, signed by the pinned CA."""
        spki = self.enclave_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        all_pcrs = {n: pcrs.get(n, bytes(48)) for n in range(16)}
        fields = {
            "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
            "digest": "SHA384",
            "timestamp": int(time.time() * 1000),
            "pcrs": all_pcrs,
            "certificate": self.ca.leaf_cert_der,
            "cabundle": self.ca.cabundle(),
            "public_key": spki,
            "user_data": None,
            "nonce": None,
        }
        return encode_document(fields, self.ca.leaf_key, tagged=False)

    def recipient(self, pcrs: dict[int, bytes]) -> dict[str, Any]:
        return {
            "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
            "AttestationDocument": self.document(pcrs),
        }


def _client(endpoint: str, akid: str, secret: str, token: str | None = None) -> Any:
    return boto3.client(
        "kms",
        region_name=stack.REGION,
        endpoint_url=endpoint,
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 1}),
    )


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    paths = stack.StatePaths(tmp_path_factory.mktemp("kp"))
    paths.prepare()
    stack.ensure_ca(paths)
    principals = stack.ensure_principals(paths)
    # Principals nitro-local does not create: the key's administrator role, and in another
    # account the parent role (as an assumed-role session, as instances call) and its root.
    table = json.loads(paths.principals.read_text())
    extra = {
        "AKIAKEYADMIN00000001": ("key-admin-secret", KEY_ADMIN, None),
        "ASIAXPARENT000000001": ("x-parent-secret", CROSS_PARENT_SESSION, "x-parent-token"),
        "AKIAOTHERROOT0000001": ("other-root-secret", OTHER_ROOT, None),
    }
    for akid, (secret, arn, token) in extra.items():
        table[akid] = {"secret_access_key": secret, "arn": arn}
        if token:
            table[akid]["session_token"] = token
    paths.principals.write_text(json.dumps(table))
    os.chmod(paths.principals, 0o600)
    _proc, endpoint = stack.start_kms(paths)
    try:
        clients = {
            "root": stack.kms_client(endpoint, principals.admin),
            "user": stack.kms_client(endpoint, principals.user),
            "parent": stack.kms_client(endpoint, principals.parent),
        }
        for name, akid in (
            ("admin", "AKIAKEYADMIN00000001"),
            ("other-root", "AKIAOTHERROOT0000001"),
        ):
            secret, _arn, _ = extra[akid]
            clients[name] = _client(endpoint, akid, secret)
        secret, _arn, token = extra["ASIAXPARENT000000001"]
        clients["cross-parent"] = _client(endpoint, "ASIAXPARENT000000001", secret, token)
        yield Emulator(
            paths=paths,
            endpoint=endpoint,
            ca=LocalCA.load_or_create(paths.ca_dir),
            enclave_key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            clients=clients,
        )
    finally:
        stack.stop_all(paths)


def render(tmp_path: Path, layout: str, parent_role: str, pcrs: dict[int, bytes]) -> str:
    """The policy text scripts/render_key_policy.py writes for nitro-cli's measurements."""
    measurements = {"HashAlgorithm": "Sha384 { ... }"}
    measurements.update({f"PCR{n}": value.hex() for n, value in pcrs.items()})
    source = tmp_path / "measurements.json"
    source.write_text(json.dumps({"Measurements": measurements}))
    out = tmp_path / f"{layout}.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(source), "--layout", layout]
        + ["--account-id", OWNER, "--user-arn", stack.USER_ARN]
        + ["--parent-role-arn", parent_role, "--admin-arn", KEY_ADMIN, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return out.read_text()


def refused(call: Callable[[], Any], *, explicit: bool | None = None) -> str:
    """Run `call`, which KMS must refuse with AccessDeniedException; returns the message."""
    with pytest.raises(ClientError) as info:
        call()
    error = info.value.response["Error"]
    assert error["Code"] == "AccessDeniedException", error
    if explicit is not None:
        assert ("explicit deny" in error["Message"]) is explicit, error["Message"]
    return error["Message"]


def other_image(n: int) -> dict[int, bytes]:
    return {**MEASURED, n: b"\xee" * 48}


DEBUG_MODE = {**MEASURED, 0: bytes(48), 1: bytes(48), 2: bytes(48)}


@dataclass
class Key:
    arn: str
    wrapped: dict[str, Any]  # the user's GenerateDataKey answer


def make_key(emulator: Emulator, policy: str) -> Key:
    admin, user = emulator.clients["admin"], emulator.clients["user"]
    arn = admin.create_key(Policy=policy, Description="rendered policy")["KeyMetadata"]["Arn"]
    wrapped = user.generate_data_key(KeyId=arn, KeySpec="AES_256", EncryptionContext=CONTEXT)
    return Key(arn, wrapped)


def assert_release_rules(emulator: Emulator, key: Key, parent: Any) -> None:
    """What both layouts promise about releasing the data key."""
    blob = key.wrapped["CiphertextBlob"]
    admin, user = emulator.clients["admin"], emulator.clients["user"]

    def decrypt(kms: Any, pcrs: dict[int, bytes] | None = None) -> Callable[[], Any]:
        extra = {} if pcrs is None else {"Recipient": emulator.recipient(pcrs)}
        return lambda: kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT, **extra)

    # The attested enclave decrypts, and only its own key can open what KMS sends back.
    got = decrypt(parent, MEASURED)()
    assert "Plaintext" not in got and got["KeyId"] == key.arn
    assert (
        open_enveloped_data(got["CiphertextForRecipient"], emulator.enclave_key)
        == (key.wrapped["Plaintext"])
    )
    # The parent without attestation, another image (each pinned PCR) and a debug-mode enclave.
    refused(decrypt(parent), explicit=True)
    for n in MEASURED:
        refused(decrypt(parent, other_image(n)), explicit=True)
    refused(decrypt(parent, DEBUG_MODE), explicit=True)
    # The user and the administrator, even holding a genuine document of the measured image.
    for kms in (user, admin, emulator.clients["root"]):
        refused(decrypt(kms))
        refused(decrypt(kms, MEASURED), explicit=False)
    # ReEncrypt (never attested: no Recipient) and CreateGrant are denied to everyone.
    scratch = admin.create_key(Description="scratch")["KeyMetadata"]["Arn"]
    for kms in (parent, user, admin):
        refused(
            lambda kms=kms: kms.re_encrypt(
                CiphertextBlob=blob, SourceEncryptionContext=CONTEXT, DestinationKeyId=scratch
            )
        )
        refused(
            lambda kms=kms: kms.create_grant(
                KeyId=key.arn, GranteePrincipal=stack.USER_ARN, Operations=["Decrypt"]
            ),
            explicit=True,
        )
    assert admin.list_grants(KeyId=key.arn)["Grants"] == []
    # Users wrap data keys for this app only; nobody else wraps.
    refused(
        lambda: user.generate_data_key(
            KeyId=key.arn, KeySpec="AES_256", EncryptionContext={"app": "other"}
        )
    )
    for kms in (parent, admin):
        refused(
            lambda kms=kms: kms.generate_data_key(
                KeyId=key.arn, KeySpec="AES_256", EncryptionContext=CONTEXT
            )
        )


def test_strict_policy(emulator: Emulator, tmp_path: Path) -> None:
    policy = render(tmp_path, "strict", stack.PARENT_ARN, MEASURED)
    key = make_key(emulator, policy)
    parent = emulator.clients["parent"]
    assert_release_rules(emulator, key, parent)
    admin, root = emulator.clients["admin"], emulator.clients["root"]
    # The account root holds nothing: no kms:* statement delegates the key to IAM.
    refused(lambda: root.put_key_policy(KeyId=key.arn, PolicyName="default", Policy=policy))
    refused(lambda: root.describe_key(KeyId=key.arn))
    # The user may read the policy (so the chatbot can check it), not change it.
    assert emulator.clients["user"].get_key_policy(KeyId=key.arn)["Policy"] == policy
    refused(
        lambda: emulator.clients["user"].put_key_policy(
            KeyId=key.arn, PolicyName="default", Policy=policy
        )
    )
    # What this layout cannot stop: an administrator of the key's account rewrites the policy.
    admin.put_key_policy(KeyId=key.arn, PolicyName="default", Policy=policy)
    assert admin.get_key_policy(KeyId=key.arn)["Policy"] == policy


def test_strict_policy_without_pcr8_pins_pcr0_to_2(emulator: Emulator, tmp_path: Path) -> None:
    unsigned = {n: MEASURED[n] for n in (0, 1, 2)}
    key = make_key(emulator, render(tmp_path, "strict", stack.PARENT_ARN, unsigned))
    parent = emulator.clients["parent"]
    blob = key.wrapped["CiphertextBlob"]
    for pcrs in (unsigned, MEASURED):  # PCR8 unpinned: any signer, or none
        got = parent.decrypt(
            CiphertextBlob=blob, EncryptionContext=CONTEXT, Recipient=emulator.recipient(pcrs)
        )
        assert (
            open_enveloped_data(got["CiphertextForRecipient"], emulator.enclave_key)
            == (key.wrapped["Plaintext"])
        )
    refused(
        lambda: parent.decrypt(
            CiphertextBlob=blob, EncryptionContext=CONTEXT, Recipient=emulator.recipient(DEBUG_MODE)
        ),
        explicit=True,
    )


def test_cross_account_policy(emulator: Emulator, tmp_path: Path) -> None:
    policy = render(tmp_path, "cross-account", CROSS_PARENT, MEASURED)
    key = make_key(emulator, policy)
    parent = emulator.clients["cross-parent"]
    assert_release_rules(emulator, key, parent)
    # The parent's own account cannot read, change or share the key: only the owner's admins can.
    for kms in (parent, emulator.clients["other-root"]):
        refused(lambda kms=kms: kms.get_key_policy(KeyId=key.arn, PolicyName="default"))
        refused(
            lambda kms=kms: kms.put_key_policy(KeyId=key.arn, PolicyName="default", Policy=policy)
        )
        refused(lambda kms=kms: kms.describe_key(KeyId=key.arn))
        refused(
            lambda kms=kms: kms.create_grant(
                KeyId=key.arn, GranteePrincipal=CROSS_PARENT, Operations=["Decrypt"]
            )
        )
    # The parent role of the key's own account is not the one the policy names.
    refused(
        lambda: emulator.clients["parent"].decrypt(
            CiphertextBlob=key.wrapped["CiphertextBlob"],
            EncryptionContext=CONTEXT,
            Recipient=emulator.recipient(MEASURED),
        ),
        explicit=False,
    )
