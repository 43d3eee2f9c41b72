"""Integration tests of the KMS emulator: the real server process, driven by unmodified boto3.

One server per module (restarted once to prove persistence); raw HTTP requests, signed with
botocore's SigV4 signer, cover malformed input the SDK would never send.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulator.ca import LocalCA
from protocol.attestation import encode_document
from protocol.cms import open_enveloped_data

pytestmark = pytest.mark.integration

ACCOUNT = "111122223333"
REGION = "us-east-1"
ADMIN_ARN = f"arn:aws:iam::{ACCOUNT}:root"
USER_ARN = f"arn:aws:iam::{ACCOUNT}:user/alice"
PARENT_ARN = f"arn:aws:sts::{ACCOUNT}:assumed-role/parent/i-0123456789"
PARENT_ROLE = f"arn:aws:iam::{ACCOUNT}:role/parent"
PRINCIPALS = {
    "AKIAADMIN0000000001": {"secret_access_key": "admin-secret-0001", "arn": ADMIN_ARN},
    "AKIAUSER00000000001": {"secret_access_key": "user-secret-0001", "arn": USER_ARN},
    "ASIAPARENT000000001": {
        "secret_access_key": "parent-secret-0001",
        "arn": PARENT_ARN,
        "session_token": "parent-session-token",
    },
}
PCRS = {n: bytes([n + 1]) * 48 for n in range(16)}
CONTEXT = {"app": "nitro-llm", "session": "c2Vzc2lvbi0x"}


@dataclass
class Server:
    """One emulator process and how to reach it."""

    state_dir: Path
    root_pem: Path
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    clients: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        port_file = self.state_dir / "kms.port"
        port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.kms_server", "--state-dir", str(self.state_dir)]
            + ["--port", "0", "--port-file", str(port_file)]
            + ["--attestation-root", str(self.root_pem), "--region", REGION]
            + ["--account-id", ACCOUNT],
            stdout=log,
            stderr=log,
        )
        log.close()
        deadline = time.monotonic() + 15
        while not port_file.exists():
            assert self.proc.poll() is None, self.log_path.read_text()
            assert time.monotonic() < deadline, "the emulator did not write its port file"
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.clients.clear()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=10)

    def client(self, who: str) -> Any:
        if who not in self.clients:
            access_key = {"admin": "AKIAADMIN0000000001", "user": "AKIAUSER00000000001"}.get(
                who, "ASIAPARENT000000001"
            )
            entry = PRINCIPALS[access_key]
            self.clients[who] = boto3.client(
                "kms",
                endpoint_url=self.endpoint,
                region_name=REGION,
                aws_access_key_id=access_key,
                aws_secret_access_key=entry["secret_access_key"],
                aws_session_token=entry.get("session_token"),
                config=Config(retries={"max_attempts": 1}),
            )
        return self.clients[who]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    return LocalCA.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ca: LocalCA) -> Iterator[Server]:
    state = tmp_path_factory.mktemp("state")
    (state / "principals.json").write_text(json.dumps(PRINCIPALS))
    srv = Server(state, Path(ca.root_pem_path), state / "kms.log")
    srv.start()
    yield srv
    if srv.proc is not None and srv.proc.poll() is None:
        srv.stop()


@pytest.fixture(scope="module")
def enclave_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def spki(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def document(ca: LocalCA, public_key_der: bytes, pcrs: dict[int, bytes] = PCRS) -> bytes:
    fields = {
        "module_id": "i-0123456789abcdef0-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": int(time.time() * 1000),
        "pcrs": pcrs,
        "certificate": ca.leaf_cert_der,
        "cabundle": ca.cabundle(),
        "public_key": public_key_der,
        "user_data": None,
        "nonce": None,
    }
    return encode_document(fields, ca.leaf_key, tagged=False)


def pinned_policy(pcrs: dict[int, str]) -> str:
    """Admin manages, the user wraps, the parent unwraps only with matching attestation."""
    pinned = {f"kms:RecipientAttestation:PCR{n}": value for n, value in pcrs.items()}
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "Admin",
                    "Effect": "Allow",
                    "Principal": {"AWS": ADMIN_ARN},
                    "Action": ["kms:Describe*", "kms:Get*", "kms:Put*", "kms:CreateAlias"],
                    "Resource": "*",
                    "Condition": {"StringEquals": {"aws:PrincipalArn": ADMIN_ARN}},
                },
                {
                    "Sid": "UserWraps",
                    "Effect": "Allow",
                    "Principal": {"AWS": USER_ARN},
                    "Action": ["kms:GenerateDataKey", "kms:DescribeKey"],
                    "Resource": "*",
                },
                {
                    "Sid": "EnclaveUnwraps",
                    "Effect": "Allow",
                    "Principal": {"AWS": PARENT_ROLE},
                    "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
                    "Resource": "*",
                    "Condition": {"StringEqualsIgnoreCase": pinned},
                },
            ],
        },
        indent=2,
    )


def code_of(info: pytest.ExceptionInfo[ClientError]) -> str:
    return info.value.response["Error"]["Code"]


@pytest.fixture(scope="module")
def open_key(server: Server) -> dict[str, Any]:
    """A key with AWS's default policy (every principal of the account may use it)."""
    meta = server.client("admin").create_key(Description="open test key")["KeyMetadata"]
    server.client("admin").create_alias(AliasName="alias/open", TargetKeyId=meta["KeyId"])
    return meta


@pytest.fixture(scope="module")
def pinned_key(server: Server) -> dict[str, Any]:
    policy = pinned_policy({0: PCRS[0].hex(), 1: PCRS[1].hex().upper(), 2: PCRS[2].hex()})
    meta = server.client("admin").create_key(Policy=policy, Description="pinned")["KeyMetadata"]
    server.client("admin").create_alias(AliasName="alias/pinned", TargetKeyId=meta["KeyId"])
    return meta


# --- keys, aliases, the round trip ---------------------------------------------------------


def test_create_key_and_describe_by_every_name(server: Server, open_key: dict[str, Any]) -> None:
    key_id = open_key["KeyId"]
    arn = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"
    assert open_key["Arn"] == arn
    assert open_key["KeyUsage"] == "ENCRYPT_DECRYPT"
    assert open_key["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert open_key["Enabled"] is True
    kms = server.client("user")
    for name in (key_id, arn, "alias/open", f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/open"):
        meta = kms.describe_key(KeyId=name)["KeyMetadata"]
        assert meta["KeyId"] == key_id
        assert meta["Arn"] == arn
        assert meta["Description"] == "open test key"
    aliases = server.client("admin").list_aliases(KeyId=key_id)["Aliases"]
    assert [a["AliasName"] for a in aliases] == ["alias/open"]


def test_unknown_keys_and_duplicate_alias(server: Server, open_key: dict[str, Any]) -> None:
    kms = server.client("admin")
    with pytest.raises(kms.exceptions.NotFoundException):
        kms.describe_key(KeyId="00000000-0000-4000-8000-000000000000")
    with pytest.raises(kms.exceptions.NotFoundException):
        kms.describe_key(KeyId="alias/missing")
    with pytest.raises(kms.exceptions.AlreadyExistsException):
        kms.create_alias(AliasName="alias/open", TargetKeyId=open_key["KeyId"])
    with pytest.raises(ClientError) as info:
        kms.create_alias(AliasName="alias/other", TargetKeyId="alias/open")
    assert code_of(info) == "ValidationException"


def test_encrypt_decrypt_round_trip(server: Server, open_key: dict[str, Any]) -> None:
    kms = server.client("user")
    sent = kms.encrypt(KeyId="alias/open", Plaintext=b"attack at dawn", EncryptionContext=CONTEXT)
    assert sent["KeyId"] == open_key["Arn"]
    got = kms.decrypt(CiphertextBlob=sent["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert got["Plaintext"] == b"attack at dawn"
    assert got["KeyId"] == open_key["Arn"]
    # The same, naming the key explicitly.
    got = kms.decrypt(
        CiphertextBlob=sent["CiphertextBlob"], EncryptionContext=CONTEXT, KeyId=open_key["Arn"]
    )
    assert got["Plaintext"] == b"attack at dawn"


def test_encryption_context_is_bound(server: Server, open_key: dict[str, Any]) -> None:
    kms = server.client("user")
    blob = kms.encrypt(KeyId="alias/open", Plaintext=b"x", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    for context in ({}, {**CONTEXT, "session": "other"}, {**CONTEXT, "extra": "1"}):
        with pytest.raises(kms.exceptions.InvalidCiphertextException):
            kms.decrypt(CiphertextBlob=blob, EncryptionContext=context)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=tampered, EncryptionContext=CONTEXT)


def test_decrypt_with_another_key_id_is_refused(
    server: Server, open_key: dict[str, Any], pinned_key: dict[str, Any]
) -> None:
    kms = server.client("user")
    blob = kms.encrypt(KeyId="alias/open", Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(kms.exceptions.IncorrectKeyException):
        kms.decrypt(CiphertextBlob=blob, KeyId=pinned_key["KeyId"])


def test_plaintext_limit(server: Server, open_key: dict[str, Any]) -> None:
    kms = server.client("user")
    assert kms.encrypt(KeyId="alias/open", Plaintext=b"a" * 4096)["CiphertextBlob"]
    with pytest.raises(ClientError) as info:
        kms.encrypt(KeyId="alias/open", Plaintext=b"a" * 4097)
    assert code_of(info) == "ValidationException"


def test_generate_data_key(server: Server, open_key: dict[str, Any]) -> None:
    kms = server.client("user")
    made = kms.generate_data_key(KeyId="alias/open", KeySpec="AES_256", EncryptionContext=CONTEXT)
    assert len(made["Plaintext"]) == 32
    assert made["KeyId"] == open_key["Arn"]
    opened = kms.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert opened["Plaintext"] == made["Plaintext"]
    assert len(kms.generate_data_key(KeyId="alias/open", KeySpec="AES_128")["Plaintext"]) == 16
    assert len(kms.generate_data_key(KeyId="alias/open", NumberOfBytes=7)["Plaintext"]) == 7
    with pytest.raises(kms.exceptions.DryRunOperationException):
        kms.generate_data_key(KeyId="alias/open", KeySpec="AES_256", DryRun=True)
    for bad in ({}, {"KeySpec": "AES_256", "NumberOfBytes": 32}):
        with pytest.raises(ClientError) as info:
            kms.generate_data_key(KeyId="alias/open", **bad)
        assert code_of(info) == "ValidationException"


# --- key policies and Recipient --------------------------------------------------------------


def test_recipient_decrypt_releases_the_key_only_to_the_enclave(
    server: Server, ca: LocalCA, enclave_key: rsa.RSAPrivateKey, pinned_key: dict[str, Any]
) -> None:
    user, parent = server.client("user"), server.client("parent")
    made = user.generate_data_key(
        KeyId="alias/pinned", KeySpec="AES_256", EncryptionContext=CONTEXT
    )
    recipient = {
        "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "AttestationDocument": document(ca, spki(enclave_key)),
    }
    got = parent.decrypt(
        KeyId=pinned_key["KeyId"],
        CiphertextBlob=made["CiphertextBlob"],
        EncryptionContext=CONTEXT,
        Recipient=recipient,
    )
    assert "Plaintext" not in got
    assert got["KeyId"] == pinned_key["Arn"]
    assert open_enveloped_data(got["CiphertextForRecipient"], enclave_key) == made["Plaintext"]
    # Without attestation, the parent and the user get nothing.
    for kms in (parent, user):
        with pytest.raises(ClientError) as info:
            kms.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT)
        assert code_of(info) == "AccessDeniedException"


def test_recipient_generate_data_key(
    server: Server, ca: LocalCA, enclave_key: rsa.RSAPrivateKey, pinned_key: dict[str, Any]
) -> None:
    parent = server.client("parent")
    recipient = {"AttestationDocument": document(ca, spki(enclave_key))}
    made = parent.generate_data_key(
        KeyId="alias/pinned", NumberOfBytes=32, EncryptionContext=CONTEXT, Recipient=recipient
    )
    assert "Plaintext" not in made
    data_key = open_enveloped_data(made["CiphertextForRecipient"], enclave_key)
    assert len(data_key) == 32
    again = parent.decrypt(
        CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT, Recipient=recipient
    )
    assert open_enveloped_data(again["CiphertextForRecipient"], enclave_key) == data_key


def test_recipient_with_other_pcrs_is_denied(
    server: Server, ca: LocalCA, enclave_key: rsa.RSAPrivateKey, pinned_key: dict[str, Any]
) -> None:
    user, parent = server.client("user"), server.client("parent")
    made = user.generate_data_key(
        KeyId="alias/pinned", KeySpec="AES_256", EncryptionContext=CONTEXT
    )
    for changed in (0, 2):
        pcrs = dict(PCRS)
        pcrs[changed] = b"\xee" * 48
        recipient = {"AttestationDocument": document(ca, spki(enclave_key), pcrs)}
        with pytest.raises(ClientError) as info:
            parent.decrypt(
                CiphertextBlob=made["CiphertextBlob"],
                EncryptionContext=CONTEXT,
                Recipient=recipient,
            )
        assert code_of(info) == "AccessDeniedException"


def test_bad_attestation_documents_are_validation_errors(
    server: Server, ca: LocalCA, enclave_key: rsa.RSAPrivateKey, pinned_key: dict[str, Any]
) -> None:
    user, parent = server.client("user"), server.client("parent")
    made = user.generate_data_key(
        KeyId="alias/pinned", KeySpec="AES_256", EncryptionContext=CONTEXT
    )
    good = document(ca, spki(enclave_key))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    candidates = {
        "flipped signature byte": good[:-1] + bytes([good[-1] ^ 1]),
        "garbage": b"\x00" * 64,
        "weak key": document(ca, spki(weak)),
    }
    secret = base64.b64encode(made["Plaintext"]).decode()
    for name, doc in candidates.items():
        try:
            parent.decrypt(
                CiphertextBlob=made["CiphertextBlob"],
                EncryptionContext=CONTEXT,
                Recipient={"AttestationDocument": doc},
            )
        except ClientError as exc:
            error = exc.response["Error"]
        else:
            pytest.fail(f"a document with a {name} was accepted")
        assert error["Code"] == "ValidationException", name
        message = error["Message"]
        assert "attestation document" in message, name
        assert secret not in message and made["Plaintext"].hex() not in message
    # A Recipient that is not an object at all (boto3 would refuse to send it).
    body = {
        "CiphertextBlob": base64.b64encode(made["CiphertextBlob"]).decode(),
        "EncryptionContext": CONTEXT,
        "Recipient": "not an object",
    }
    status, answer = raw_call(server, "Decrypt", json.dumps(body).encode())
    assert (status, answer["__type"]) == (400, "ValidationException")


def test_key_policy_get_put_and_lockout(server: Server, pinned_key: dict[str, Any]) -> None:
    admin, user = server.client("admin"), server.client("user")
    key_id = pinned_key["KeyId"]
    policy = admin.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
    assert json.loads(policy)["Statement"][2]["Sid"] == "EnclaveUnwraps"
    with pytest.raises(ClientError) as info:
        user.get_key_policy(KeyId=key_id)
    assert code_of(info) == "AccessDeniedException"
    with pytest.raises(ClientError) as info:
        admin.get_key_policy(KeyId="alias/pinned")
    assert code_of(info) == "ValidationException"
    with pytest.raises(admin.exceptions.MalformedPolicyDocumentException):
        admin.put_key_policy(KeyId=key_id, Policy="{not json")
    lockout = json.loads(policy)
    lockout["Statement"] = lockout["Statement"][1:]
    with pytest.raises(admin.exceptions.MalformedPolicyDocumentException):
        admin.put_key_policy(KeyId=key_id, Policy=json.dumps(lockout))
    # A real change is stored as written, whitespace included.
    changed = policy.replace('"Sid": "UserWraps"', '"Sid":  "UserWrapsData"')
    admin.put_key_policy(KeyId=key_id, Policy=changed)
    assert admin.get_key_policy(KeyId=key_id)["Policy"] == changed
    # The default policy gives every principal of the account everything.
    open_policy = admin.create_key()["KeyMetadata"]
    default = json.loads(admin.get_key_policy(KeyId=open_policy["KeyId"])["Policy"])
    assert default["Statement"][0]["Principal"] == {"AWS": ADMIN_ARN}
    assert default["Statement"][0]["Action"] == "kms:*"


# --- authentication ----------------------------------------------------------------------


def test_unknown_access_key_is_unrecognized(server: Server) -> None:
    kms = boto3.client(
        "kms",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id="AKIANOBODY000000000",
        aws_secret_access_key="whatever",
        config=Config(retries={"max_attempts": 1}),
    )
    with pytest.raises(ClientError) as info:
        kms.list_keys()
    assert code_of(info) == "UnrecognizedClientException"


def test_wrong_secret_and_wrong_token(server: Server) -> None:
    for secret, token, expected in (
        ("not-the-secret", None, "InvalidSignatureException"),
        ("parent-secret-0001", "another-token", "UnrecognizedClientException"),
    ):
        access_key = "AKIAUSER00000000001" if token is None else "ASIAPARENT000000001"
        kms = boto3.client(
            "kms",
            endpoint_url=server.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret,
            aws_session_token=token,
            config=Config(retries={"max_attempts": 1}),
        )
        with pytest.raises(ClientError) as info:
            kms.list_keys()
        assert code_of(info) == expected


def test_a_signed_request_cannot_be_turned_into_another_operation(
    server: Server, pinned_key: dict[str, Any]
) -> None:
    # The user may DescribeKey, not GetKeyPolicy: the target is signed, so swapping it breaks
    # the signature instead of reaching the policy check.
    body = json.dumps({"KeyId": pinned_key["KeyId"]}).encode()
    headers = signed_headers(server, "DescribeKey", body)
    assert raw_call(server, "", body, headers=headers)[0] == 200
    headers = signed_headers(server, "DescribeKey", body)
    headers["X-Amz-Target"] = "TrentService.GetKeyPolicy"
    status, answer = raw_call(server, "", body, headers=headers)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")


def test_principals_file_is_reloaded(server: Server) -> None:
    path = server.state_dir / "principals.json"
    extra = {"AKIALATE00000000001": {"secret_access_key": "late-secret", "arn": USER_ARN}}
    path.write_text(json.dumps(PRINCIPALS | extra))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    try:
        status, answer = raw_call(
            server, "ListKeys", b"{}", access_key="AKIALATE00000000001", secret="late-secret"
        )
        assert status == 200, answer
        assert "Keys" in answer
    finally:
        path.write_text(json.dumps(PRINCIPALS))


def test_a_damaged_principals_file_keeps_the_last_good_one(server: Server) -> None:
    path = server.state_dir / "principals.json"
    for damaged in ('{"AKIABROKEN": "not an object"}', "[1, 2]", '{"AKIA": {"arn": 5}}', "{"):
        path.write_text(damaged)
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
        try:
            status, answer = raw_call(server, "ListKeys", b"{}")
            assert status == 200, (damaged, answer)
        finally:
            path.write_text(json.dumps(PRINCIPALS))


# --- raw HTTP: what the SDK would never send ---------------------------------------------------


def signed_headers(
    server: Server,
    target: str,
    body: bytes,
    *,
    access_key: str = "AKIAUSER00000000001",
    secret: str = "user-secret-0001",  # noqa: S107 - a test principal
    at: datetime | None = None,
) -> dict[str, str]:
    request = AWSRequest(
        method="POST",
        url=server.endpoint + "/",
        data=body,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{target}",
        },
    )
    signer = SigV4Auth(Credentials(access_key, secret), "kms", REGION)
    if at is None:
        signer.add_auth(request)
    else:
        # Sign at a chosen time: the steps of add_auth with our own timestamp.
        stamp = at.strftime("%Y%m%dT%H%M%SZ")
        request.context["timestamp"] = stamp
        request.headers["X-Amz-Date"] = stamp
        canonical = signer.canonical_request(request)
        signature = signer.signature(signer.string_to_sign(request, canonical), request)
        signer._inject_signature_to_request(request, signature)
    return dict(request.headers.items())


def raw_call(
    server: Server,
    target: str,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/",
    **sign: Any,
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        if headers is None:
            headers = signed_headers(server, target, body, **sign)
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        assert response.getheader("Content-Type") == "application/x-amz-json-1.1"
        return response.status, json.loads(data)
    finally:
        conn.close()


def assert_still_serving(server: Server, open_key: dict[str, Any]) -> None:
    body = json.dumps({"KeyId": open_key["KeyId"]}).encode()
    status, answer = raw_call(server, "DescribeKey", body)
    assert status == 200, answer
    assert answer["KeyMetadata"]["KeyId"] == open_key["KeyId"]


@pytest.mark.parametrize(
    ("target", "body", "status", "error"),
    [
        ("DescribeKey", b"{not json", 400, "SerializationException"),
        ("DescribeKey", b"[1, 2]", 400, "SerializationException"),
        ("DescribeKey", b'{"KeyId": "a", "KeyId": "b"}', 400, "SerializationException"),
        ("DescribeKey", b"[" * 50000, 400, "SerializationException"),
        ("DescribeKey", b"\xff\xfe", 400, "SerializationException"),
        ("FlyToTheMoon", b"{}", 400, "UnknownOperationException"),
        ("DescribeKey", b'{"KeyId": 5}', 400, "ValidationException"),
        ("DescribeKey", b"{}", 400, "ValidationException"),
        ("DescribeKey", b'{"KeyId": "x", "Bogus": 1}', 400, "ValidationException"),
        ("Encrypt", b'{"KeyId": "alias/open", "Plaintext": 5}', 400, "ValidationException"),
        ("Encrypt", b'{"KeyId": "alias/open", "Plaintext": "!!"}', 400, "SerializationException"),
        (
            "Encrypt",
            b'{"KeyId": "alias/open", "Plaintext": "eA==", "EncryptionContext": {"a": 1}}',
            400,
            "ValidationException",
        ),
        (
            "Encrypt",
            b'{"KeyId": "alias/open", "Plaintext": "eA==", "EncryptionContext": {"a": "\\ud800"}}',
            400,
            "ValidationException",
        ),
        ("GenerateDataKey", b'{"KeyId": "alias/open", "NumberOfBytes": 0}', 400, "Validation"),
        ("GenerateDataKey", b'{"KeyId": "alias/open", "NumberOfBytes": true}', 400, "Validation"),
        ("Decrypt", b'{"CiphertextBlob": "AAAAAAAAAAAAAAAA"}', 400, "InvalidCiphertextException"),
        (
            "Decrypt",
            json.dumps({"CiphertextBlob": base64.b64encode(os.urandom(200)).decode()}).encode(),
            400,
            "InvalidCiphertextException",
        ),
        ("DescribeKey", b"x" * (300 * 1024), 413, "ValidationException"),
    ],
)
def test_bad_input_gets_a_clean_error(
    server: Server,
    open_key: dict[str, Any],
    target: str,
    body: bytes,
    status: int,
    error: str,
) -> None:
    got_status, answer = raw_call(server, target, body)
    assert got_status == status
    assert answer["__type"].startswith(error)
    assert answer["message"]
    assert_still_serving(server, open_key)


def test_protocol_level_refusals(server: Server, open_key: dict[str, Any]) -> None:
    body = b'{"KeyId": "alias/open"}'
    cases = [
        ({"X-Amz-Target": "TrentService.DescribeKey"}, "POST", "/", "MissingAuthentication"),
        (signed_headers(server, "DescribeKey", body), "GET", "/", "UnknownOperationException"),
        (signed_headers(server, "DescribeKey", body), "POST", "/x", "UnknownOperationException"),
    ]
    for headers, method, path, error in cases:
        status, answer = raw_call(
            server, "DescribeKey", body, headers=headers, method=method, path=path
        )
        assert 400 <= status < 500
        assert answer["__type"].startswith(error)
    # Signed for one body, sent with another.
    headers = signed_headers(server, "DescribeKey", body)
    status, answer = raw_call(server, "", b'{"KeyId": "alias/pinned"}', headers=headers)
    assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    # Signed too long ago, or in the future.
    for skew in (-400, 400):
        at = datetime.now(UTC) + timedelta(seconds=skew)
        status, answer = raw_call(server, "DescribeKey", body, at=at)
        assert (status, answer["__type"]) == (400, "InvalidSignatureException")
    status, answer = raw_call(server, "DescribeKey", body, at=datetime.now(UTC))
    assert status == 200
    # A method http.server itself refuses still answers JSON, and the server keeps serving.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):  # the server closes after a refusal
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 501")
    assert b'"__type":"SerializationException"' in reply
    assert_still_serving(server, open_key)


def test_logs_are_json_lines_without_content(server: Server, open_key: dict[str, Any]) -> None:
    kms = server.client("user")
    secret = b"log-canary-" + os.urandom(8).hex().encode()
    blob = kms.encrypt(KeyId="alias/open", Plaintext=secret)["CiphertextBlob"]
    made = kms.generate_data_key(KeyId="alias/open", KeySpec="AES_256")
    kms.decrypt(CiphertextBlob=blob)
    time.sleep(0.2)
    text = server.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    decrypts = [line for line in lines if line.get("operation") == "Decrypt"]
    assert decrypts and decrypts[-1]["outcome"] == "ok"
    assert decrypts[-1]["caller"] == USER_ARN
    assert decrypts[-1]["key_id"] == open_key["KeyId"]
    assert "duration_ms" in decrypts[-1]
    for needle in (
        secret.decode(),
        base64.b64encode(secret).decode(),
        base64.b64encode(made["Plaintext"]).decode(),
        base64.b64encode(blob).decode()[:40],
        "user-secret-0001",
    ):
        assert needle not in text


# --- ReEncrypt and grants --------------------------------------------------------------------


def admin_only_policy(*extra: dict[str, Any]) -> str:
    """The admin (the account root itself, not every principal of the account) does anything."""
    admin = {
        "Sid": "Admin",
        "Effect": "Allow",
        "Principal": {"AWS": ADMIN_ARN},
        "Action": "kms:*",
        "Resource": "*",
        "Condition": {"StringEquals": {"aws:PrincipalArn": ADMIN_ARN}},
    }
    return json.dumps({"Version": "2012-10-17", "Statement": [admin, *extra]})


def user_may(*actions: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Principal": {"AWS": USER_ARN}, "Action": list(actions)}


def new_key(server: Server, policy: str) -> dict[str, Any]:
    return server.client("admin").create_key(Policy=policy)["KeyMetadata"]


def test_re_encrypt_moves_a_ciphertext_between_keys(
    server: Server, open_key: dict[str, Any]
) -> None:
    kms = server.client("user")
    other = server.client("admin").create_key(Description="second open key")["KeyMetadata"]
    blob = kms.encrypt(KeyId="alias/open", Plaintext=b"moved", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    moved = kms.re_encrypt(
        CiphertextBlob=blob,
        SourceEncryptionContext=CONTEXT,
        DestinationKeyId=other["KeyId"],
        DestinationEncryptionContext={"app": "elsewhere"},
    )
    assert moved["SourceKeyId"] == open_key["Arn"]
    assert moved["KeyId"] == other["Arn"]
    assert moved["DestinationEncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    got = kms.decrypt(
        CiphertextBlob=moved["CiphertextBlob"], EncryptionContext={"app": "elsewhere"}
    )
    assert (got["Plaintext"], got["KeyId"]) == (b"moved", other["Arn"])
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.decrypt(CiphertextBlob=moved["CiphertextBlob"], EncryptionContext=CONTEXT)
    # The source context must be the one bound into the ciphertext; SourceKeyId must name its key.
    with pytest.raises(kms.exceptions.InvalidCiphertextException):
        kms.re_encrypt(CiphertextBlob=blob, DestinationKeyId=other["KeyId"])
    with pytest.raises(kms.exceptions.IncorrectKeyException):
        kms.re_encrypt(
            CiphertextBlob=blob,
            SourceEncryptionContext=CONTEXT,
            SourceKeyId=other["KeyId"],
            DestinationKeyId=other["KeyId"],
        )
    with pytest.raises(kms.exceptions.DryRunOperationException):
        kms.re_encrypt(
            CiphertextBlob=blob,
            SourceEncryptionContext=CONTEXT,
            DestinationKeyId=other["KeyId"],
            DryRun=True,
        )
    with pytest.raises(kms.exceptions.NotFoundException):
        kms.re_encrypt(CiphertextBlob=blob, DestinationKeyId="alias/missing")


def test_re_encrypt_needs_from_on_the_source_and_to_on_the_destination(server: Server) -> None:
    wrap = user_may("kms:Encrypt") | {"Resource": "*"}
    source = new_key(
        server, admin_only_policy(wrap, user_may("kms:ReEncryptFrom") | {"Resource": "*"})
    )
    target = new_key(server, admin_only_policy(user_may("kms:ReEncryptTo") | {"Resource": "*"}))
    kms = server.client("user")
    blob = kms.encrypt(KeyId=source["KeyId"], Plaintext=b"x", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    moved = kms.re_encrypt(
        CiphertextBlob=blob, SourceEncryptionContext=CONTEXT, DestinationKeyId=target["KeyId"]
    )
    assert moved["KeyId"] == target["Arn"]
    # Back again needs ReEncryptFrom on the target and ReEncryptTo on the source: neither held.
    with pytest.raises(ClientError) as info:
        kms.re_encrypt(CiphertextBlob=moved["CiphertextBlob"], DestinationKeyId=source["KeyId"])
    assert code_of(info) == "AccessDeniedException"
    assert (
        f"kms:ReEncryptFrom on resource: {target['Arn']}" in info.value.response["Error"]["Message"]
    )
    with pytest.raises(ClientError) as info:
        kms.re_encrypt(
            CiphertextBlob=blob, SourceEncryptionContext=CONTEXT, DestinationKeyId=source["KeyId"]
        )
    assert (
        f"kms:ReEncryptTo on resource: {source['Arn']}" in info.value.response["Error"]["Message"]
    )
    # Decrypt is not implied by ReEncryptFrom.
    with pytest.raises(ClientError) as info:
        kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert code_of(info) == "AccessDeniedException"


def test_grants_allow_their_operations_to_the_grantee_only(server: Server) -> None:
    admin, user, parent = server.client("admin"), server.client("user"), server.client("parent")
    key = new_key(server, admin_only_policy())
    with pytest.raises(ClientError) as info:
        user.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext=CONTEXT)
    assert code_of(info) == "AccessDeniedException"
    wrap = admin.create_grant(
        KeyId=key["KeyId"],
        GranteePrincipal=USER_ARN,
        Operations=["GenerateDataKey"],
        Constraints={"EncryptionContextSubset": {"app": "nitro-llm"}},
        Name="user-wraps",
    )
    assert len(wrap["GrantId"]) == 64 and wrap["GrantToken"]
    made = user.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext=CONTEXT)
    with pytest.raises(ClientError) as info:  # outside the grant's context constraint
        user.generate_data_key(
            KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext={"app": "x"}
        )
    assert code_of(info) == "AccessDeniedException"
    with pytest.raises(ClientError) as info:  # an operation the grant does not name
        user.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert code_of(info) == "AccessDeniedException"
    # A grant to the role covers its sessions (the parent calls as an assumed-role session).
    unwrap = admin.create_grant(
        KeyId=key["Arn"],
        GranteePrincipal=PARENT_ROLE,
        Operations=["Decrypt"],
        Constraints={"EncryptionContextEquals": CONTEXT},
    )
    got = parent.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert got["Plaintext"] == made["Plaintext"]
    other = user.generate_data_key(
        KeyId=key["KeyId"], KeySpec="AES_256", EncryptionContext={**CONTEXT, "extra": "1"}
    )
    with pytest.raises(ClientError) as info:  # EncryptionContextEquals: exactly, not a superset
        parent.decrypt(
            CiphertextBlob=other["CiphertextBlob"], EncryptionContext={**CONTEXT, "extra": "1"}
        )
    assert code_of(info) == "AccessDeniedException"
    # The same named grant again is the same grant, as on AWS.
    again = admin.create_grant(
        KeyId=key["KeyId"],
        GranteePrincipal=USER_ARN,
        Operations=["GenerateDataKey"],
        Constraints={"EncryptionContextSubset": {"app": "nitro-llm"}},
        Name="user-wraps",
    )
    assert again["GrantId"] == wrap["GrantId"]
    listed = admin.list_grants(KeyId=key["KeyId"])["Grants"]
    assert [g["GrantId"] for g in listed] == [wrap["GrantId"], unwrap["GrantId"]]
    first = listed[0]
    assert first["KeyId"] == key["Arn"]
    assert first["GranteePrincipal"] == USER_ARN
    assert first["Operations"] == ["GenerateDataKey"]
    assert first["Constraints"] == {"EncryptionContextSubset": {"app": "nitro-llm"}}
    assert first["IssuingAccount"] == f"arn:aws:iam::{ACCOUNT}:root"
    assert first["Name"] == "user-wraps"
    only = admin.list_grants(KeyId=key["KeyId"], GranteePrincipal=PARENT_ROLE)["Grants"]
    assert [g["GrantId"] for g in only] == [unwrap["GrantId"]]
    page = admin.list_grants(KeyId=key["KeyId"], Limit=1)
    assert page["Truncated"] and len(page["Grants"]) == 1
    # Grants add permissions, never past an explicit deny in the key policy.
    deny = {
        "Sid": "NoDecrypt",
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:Decrypt",
        "Resource": "*",
    }
    admin.put_key_policy(KeyId=key["KeyId"], Policy=admin_only_policy(deny))
    with pytest.raises(ClientError) as info:
        parent.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert "explicit deny" in info.value.response["Error"]["Message"]
    admin.put_key_policy(KeyId=key["KeyId"], Policy=admin_only_policy())
    parent.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT)
    # Revoked, the grant allows nothing; revoking twice is NotFound.
    admin.revoke_grant(KeyId=key["KeyId"], GrantId=unwrap["GrantId"])
    with pytest.raises(ClientError) as info:
        parent.decrypt(CiphertextBlob=made["CiphertextBlob"], EncryptionContext=CONTEXT)
    assert code_of(info) == "AccessDeniedException"
    with pytest.raises(admin.exceptions.NotFoundException):
        admin.revoke_grant(KeyId=key["KeyId"], GrantId=unwrap["GrantId"])
    # Neither the user nor the parent may list, create or revoke grants under this policy.
    for kms in (user, parent):
        for call in (
            lambda k: k.list_grants(KeyId=key["KeyId"]),
            lambda k: k.create_grant(
                KeyId=key["KeyId"], GranteePrincipal=USER_ARN, Operations=["Decrypt"]
            ),
            lambda k: k.revoke_grant(KeyId=key["KeyId"], GrantId=wrap["GrantId"]),
        ):
            with pytest.raises(ClientError) as info:
                call(kms)
            assert code_of(info) == "AccessDeniedException"


def test_create_grant_condition_keys_and_passing_a_grant_on(server: Server) -> None:
    admin, user = server.client("admin"), server.client("user")
    # The user may create grants only for the parent role, and only of Decrypt/DescribeKey.
    limited = user_may("kms:CreateGrant") | {
        "Resource": "*",
        "Condition": {
            "ForAllValues:StringEquals": {"kms:GrantOperations": ["Decrypt", "DescribeKey"]},
            "StringEquals": {"kms:GranteePrincipal": PARENT_ROLE},
        },
    }
    key = new_key(server, admin_only_policy(limited))
    user.create_grant(KeyId=key["KeyId"], GranteePrincipal=PARENT_ROLE, Operations=["Decrypt"])
    for grantee, operations in ((PARENT_ROLE, ["Decrypt", "Encrypt"]), (USER_ARN, ["Decrypt"])):
        with pytest.raises(ClientError) as info:
            user.create_grant(KeyId=key["KeyId"], GranteePrincipal=grantee, Operations=operations)
        assert code_of(info) == "AccessDeniedException", (grantee, operations)
    # A grant that includes CreateGrant passes on only a subset of its own operations.
    other = new_key(server, admin_only_policy())
    admin.create_grant(
        KeyId=other["KeyId"], GranteePrincipal=USER_ARN, Operations=["Decrypt", "CreateGrant"]
    )
    user.create_grant(KeyId=other["KeyId"], GranteePrincipal=PARENT_ROLE, Operations=["Decrypt"])
    with pytest.raises(ClientError) as info:
        user.create_grant(
            KeyId=other["KeyId"], GranteePrincipal=PARENT_ROLE, Operations=["Encrypt"]
        )
    assert code_of(info) == "AccessDeniedException"


def test_grant_constraints_match_keys_without_case_and_values_exactly() -> None:
    from emulator.kms_store import Grant

    def grant(**constraints: dict[str, str]) -> Grant:
        return Grant("g", "t", "k", USER_ARN, ("Decrypt",), "a", 0.0, constraints=constraints)

    subset = grant(EncryptionContextSubset={"App": "nitro-llm"})
    assert subset.admits("Decrypt", {"app": "nitro-llm", "session": "s"})
    assert not subset.admits("Decrypt", {"app": "Nitro-LLM"})
    assert not subset.admits("Decrypt", {})
    assert not subset.admits("Encrypt", {"app": "nitro-llm"})
    # Keys differing only by case make the context ambiguous: no constraint admits it.
    assert not subset.admits("Decrypt", {"app": "nitro-llm", "APP": "other"})
    equals = grant(EncryptionContextEquals={"app": "nitro-llm"})
    assert equals.admits("Decrypt", {"APP": "nitro-llm"})
    assert not equals.admits("Decrypt", {"app": "nitro-llm", "session": "s"})
    assert grant().admits("Decrypt", {})
    # Constraints do not apply to operations without a context (DescribeKey), as on AWS.
    describe = Grant(
        "g",
        "t",
        "k",
        USER_ARN,
        ("DescribeKey",),
        "a",
        0.0,
        constraints={"EncryptionContextEquals": {"app": "nitro-llm"}},
    )
    assert describe.admits("DescribeKey", None)
    assert not describe.admits("Decrypt", None)


def test_create_grant_refuses_bad_input(server: Server) -> None:
    admin = server.client("admin")
    key = new_key(server, admin_only_policy())
    bad_requests = [
        {"GranteePrincipal": "bob", "Operations": ["Decrypt"]},
        {"GranteePrincipal": USER_ARN, "Operations": ["Sign"]},
        {
            "GranteePrincipal": USER_ARN,
            "Operations": ["Decrypt"],
            "Constraints": {
                "EncryptionContextSubset": {"a": "1"},
                "EncryptionContextEquals": {"a": "1"},
            },
        },
        {"GranteePrincipal": USER_ARN, "Operations": ["Decrypt"], "Name": "no spaces allowed"},
    ]
    for request in bad_requests:
        with pytest.raises(ClientError) as info:
            admin.create_grant(KeyId=key["KeyId"], **request)
        assert code_of(info) == "ValidationException", request
    # What boto3 refuses to send: an empty operation list, a constraint that is not a map.
    for body in (
        {"KeyId": key["KeyId"], "GranteePrincipal": USER_ARN, "Operations": []},
        {
            "KeyId": key["KeyId"],
            "GranteePrincipal": USER_ARN,
            "Operations": ["Decrypt"],
            "Constraints": {"EncryptionContextEquals": ["a"]},
        },
    ):
        status, answer = raw_call(server, "CreateGrant", json.dumps(body).encode())
        assert (status, answer["__type"]) == (400, "ValidationException")
    assert admin.list_grants(KeyId=key["KeyId"])["Grants"] == []


# --- persistence (restarts the module's server: keep last) ------------------------------------


def test_state_survives_a_restart(server: Server, open_key: dict[str, Any]) -> None:
    kms = server.client("user")
    blob = kms.encrypt(KeyId="alias/open", Plaintext=b"kept", EncryptionContext=CONTEXT)[
        "CiphertextBlob"
    ]
    assert server.stop() == 0  # SIGTERM is a clean exit
    key_dir = server.state_dir / "kms" / "keys"
    material = key_dir / f"{open_key['KeyId']}.key"
    assert material.stat().st_mode & 0o777 == 0o600
    server.start()
    kms = server.client("user")
    assert kms.describe_key(KeyId="alias/open")["KeyMetadata"]["KeyId"] == open_key["KeyId"]
    got = kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)
    assert got["Plaintext"] == b"kept"


# --- slow and idle clients (in-process server with short limits) -----------------------------


def test_slow_clients_are_cut_off_and_handlers_are_bounded(tmp_path: Path, ca: LocalCA) -> None:
    from emulator.kms_server import KmsConfig, KmsEmulator

    (tmp_path / "principals.json").write_text(json.dumps(PRINCIPALS))
    config = KmsConfig(
        state_dir=tmp_path, attestation_root=ca.root_der, read_timeout=1.0, max_handlers=2
    )
    emulator = KmsEmulator(config)
    emulator.httpd.slot_wait = 0.2
    emulator.serve_in_thread()
    try:
        local = Server(tmp_path, Path(ca.root_pem_path), tmp_path / "unused.log", emulator.port)
        # A body that never arrives: the connection is closed after the read timeout.
        with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as slow:
            slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            started = time.monotonic()
            reply = b""
            while chunk := slow.recv(65536):
                reply += chunk
            assert time.monotonic() - started < 5
        assert reply.startswith(b"HTTP/1.1 408")
        # Two idle connections hold both handlers: a third is dropped, not queued forever.
        idle = [socket.create_connection(("127.0.0.1", emulator.port)) for _ in range(2)]
        try:
            time.sleep(0.1)
            with pytest.raises((ConnectionError, TimeoutError, http.client.HTTPException)):
                raw_call(local, "ListKeys", b"{}")
        finally:
            for sock in idle:
                sock.close()
        time.sleep(1.2)  # the idle handlers time out and free their slots
        status, answer = raw_call(local, "ListKeys", b"{}")
        assert status == 200, answer
    finally:
        emulator.shutdown()


def test_grants_survive_a_restart(server: Server) -> None:
    admin = server.client("admin")
    key = new_key(server, admin_only_policy())
    grant = admin.create_grant(
        KeyId=key["KeyId"], GranteePrincipal=PARENT_ROLE, Operations=["Encrypt"]
    )
    assert server.stop() == 0
    assert (server.state_dir / "kms" / "grants.json").stat().st_mode & 0o777 == 0o600
    server.start()
    listed = server.client("admin").list_grants(KeyId=key["KeyId"])["Grants"]
    assert [g["GrantId"] for g in listed] == [grant["GrantId"]]
    parent = server.client("parent")
    assert parent.encrypt(KeyId=key["KeyId"], Plaintext=b"granted")["KeyId"] == key["Arn"]
