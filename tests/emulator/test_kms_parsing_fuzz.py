"""Property-based tests of the KMS emulator's request parsing: whatever a caller sends (a body,
headers, a signed request of any operation with any parameters, a ciphertext blob), the answer is
a result or a KmsError that becomes a KMS error document, never another exception (a 500).

The service is driven in-process (KmsService.handle is what the HTTP handler calls), with real
SigV4 signatures from botocore so that parsing past authentication is reached.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from emulator.kms_server import (
    JSON_CONTENT_TYPE,
    KmsConfig,
    KmsEmulator,
    KmsService,
    _CallLog,
    parse_json_body,
)
from emulator.kms_store import KmsError, ciphertext_key_id
from protocol.attestation import load_pem_root

ACCOUNT = "111122223333"
REGION = "us-east-1"
HOST = "127.0.0.1:4566"
ADMIN = ("AKIAADMIN0000000001", "admin-secret-0001")
TESTDATA = Path(__file__).resolve().parent.parent / "testdata"
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**400, -(10**400)])  # JSON integers have no bound
    | st.floats()
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    state = tmp_path_factory.mktemp("kms-fuzz")
    (state / "principals.json").write_text(
        json.dumps(
            {ADMIN[0]: {"secret_access_key": ADMIN[1], "arn": f"arn:aws:iam::{ACCOUNT}:root"}}
        )
    )
    root = load_pem_root((TESTDATA / "aws-nitro-enclaves-root-g1.pem").read_bytes())
    service = KmsService(KmsConfig(state_dir=state, attestation_root=root, region=REGION))
    key = service.handle(**_request("CreateKey", {}))["KeyMetadata"]
    blob = service.handle(
        **_request("Encrypt", {"KeyId": key["KeyId"], "Plaintext": base64.b64encode(b"k").decode()})
    )["CiphertextBlob"]
    yield SimpleNamespace(service=service, key=key, blob=base64.b64decode(blob))
    service.close()


def _request(operation: str, params: Any, raw: bytes | None = None) -> dict[str, Any]:
    """Keyword arguments of KmsService.handle for a request signed as the admin principal."""
    body = raw if raw is not None else json.dumps(params).encode()
    request = AWSRequest(
        method="POST",
        url=f"http://{HOST}/",
        data=body,
        headers={"Content-Type": JSON_CONTENT_TYPE, "X-Amz-Target": f"TrentService.{operation}"},
    )
    SigV4Auth(Credentials(*ADMIN), "kms", REGION).add_auth(request)
    headers = {name.lower(): value for name, value in request.headers.items()}
    headers["host"] = HOST
    return {"method": "POST", "path": "/", "headers": headers, "body": body, "call": _CallLog()}


def _handled(service: KmsService, request: dict[str, Any]) -> None:
    try:
        answer = service.handle(**request)
    except KmsError as exc:
        assert exc.type_name.endswith("Exception") and 400 <= exc.status < 500
        return
    assert isinstance(answer, dict)
    json.dumps(answer)  # what the HTTP handler writes must be JSON


# ---- the body ----------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_a_json_object_or_a_serialization_exception(body):
    try:
        assert isinstance(parse_json_body(body), dict)
    except KmsError as exc:
        assert exc.type_name == "SerializationException"


# ---- signed requests of every operation --------------------------------------------------------

_OPERATIONS = [
    "CreateKey",
    "CreateAlias",
    "DescribeKey",
    "Encrypt",
    "Decrypt",
    "GenerateDataKey",
    "GetKeyPolicy",
    "PutKeyPolicy",
    "ListAliases",
    "ListKeys",
    "ReEncrypt",
    "CreateGrant",
    "ListGrants",
    "RevokeGrant",
]
_PARAMETERS = [
    "KeyId",
    "CiphertextBlob",
    "Plaintext",
    "EncryptionContext",
    "GrantTokens",
    "EncryptionAlgorithm",
    "Recipient",
    "DryRun",
    "NumberOfBytes",
    "KeySpec",
    "Policy",
    "PolicyName",
    "AliasName",
    "TargetKeyId",
    "Limit",
    "Marker",
    "DestinationKeyId",
    "SourceEncryptionContext",
    "DestinationEncryptionContext",
    "GranteePrincipal",
    "Operations",
    "Constraints",
    "GrantId",
    "Name",
    "Description",
    "KeyUsage",
    "DryRunModifiers",
    "BypassPolicyLockoutSafetyCheck",
]


@st.composite
def parameter_values(draw: st.DrawFn, kms: SimpleNamespace) -> Any:
    """Arbitrary JSON, or a value of the right kind: the real key, a real or random blob..."""
    b64 = base64.b64encode
    return draw(
        st.one_of(
            json_values,
            st.sampled_from(
                [
                    kms.key["KeyId"],
                    kms.key["Arn"],
                    "alias/fuzz",
                    b64(kms.blob).decode(),
                    b64(kms.blob[:-1] + bytes([kms.blob[-1] ^ 1])).decode(),
                    {"app": "nitro-llm"},
                    {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "AAAA"},
                    ["Decrypt"],
                    {"EncryptionContextSubset": {"a": "b"}},
                    "AES_256",
                    "SYMMETRIC_DEFAULT",
                    json.dumps({"Statement": [{"Effect": "Allow"}]}),
                ]
            ),
            st.binary(min_size=1, max_size=64).map(lambda raw: b64(raw).decode()),
        )
    )


@settings(FUZZ, max_examples=25)  # each example is a signed call that may write the state
@given(data=st.data())
def test_signed_requests_of_any_operation_and_parameters_answer_or_give_kms_errors(kms, data):
    operation = data.draw(st.sampled_from(_OPERATIONS) | st.text(max_size=10))
    names = data.draw(
        st.lists(st.sampled_from(_PARAMETERS) | st.text(max_size=6), unique=True, max_size=5)
    )
    params = {name: data.draw(parameter_values(kms)) for name in names}
    _handled(kms.service, _request(operation, params))


@FUZZ
@given(operation=st.sampled_from(_OPERATIONS), body=st.binary(max_size=80))
def test_signed_requests_with_any_body_bytes_give_kms_errors(kms, operation, body):
    _handled(kms.service, _request(operation, None, raw=body))


# ---- authentication ----------------------------------------------------------------------------

_AUTHORIZATION = (
    "AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed}, Signature={signature}"
)


@FUZZ
@given(
    credential=st.sampled_from(
        [f"{ADMIN[0]}/20240101/{REGION}/kms/aws4_request", f"{ADMIN[0]}/x/y", ""]
    )
    | st.text(max_size=40),
    signed=st.sampled_from(["host;x-amz-date", "host", "x-amz-date;host;nope"])
    | st.text(max_size=20),
    signature=st.text(alphabet="0123456789abcdef", max_size=64) | st.text(max_size=10),
    extra=st.dictionaries(
        st.sampled_from(["x-amz-date", "x-amz-security-token", "x-amz-content-sha256", "host"])
        | st.text(max_size=8),
        st.text(max_size=30),
        max_size=4,
    ),
    authorization=st.none() | st.text(max_size=60),
)
def test_any_authorization_headers_give_kms_errors(
    kms, credential, signed, signature, extra, authorization
):
    headers = {
        "authorization": authorization
        if authorization is not None
        else _AUTHORIZATION.format(credential=credential, signed=signed, signature=signature),
        "content-type": JSON_CONTENT_TYPE,
        "x-amz-target": "TrentService.ListKeys",
        **{name.lower(): value for name, value in extra.items()},
    }
    with pytest.raises(KmsError):
        kms.service.handle(method="POST", path="/", headers=headers, body=b"{}", call=_CallLog())


# ---- ciphertext blobs --------------------------------------------------------------------------


@FUZZ
@given(
    st.binary(max_size=120)
    | st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), min_size=1, max_size=3)
)
def test_any_ciphertext_blob_names_a_key_or_is_invalid(kms, blob_or_flips):
    if isinstance(blob_or_flips, bytes):
        blob = blob_or_flips
    else:
        changed = bytearray(kms.blob)
        for position, mask in blob_or_flips:
            changed[position % len(changed)] ^= mask
        blob = bytes(changed)
    try:
        key_id = ciphertext_key_id(blob)
    except KmsError as exc:
        assert exc.type_name == "InvalidCiphertextException"
        return
    assert isinstance(key_id, str)
    params = {"CiphertextBlob": base64.b64encode(blob).decode()}
    _handled(kms.service, _request("Decrypt", params))


def test_the_fixture_key_decrypts(kms):
    # The generators above lean on a real key and blob: prove they are real.
    params = {"CiphertextBlob": base64.b64encode(kms.blob).decode()}
    answer = kms.service.handle(**_request("Decrypt", params))
    assert base64.b64decode(answer["Plaintext"]) == b"k"
    assert os.path.isdir(kms.service.config.state_dir)


# ---- the HTTP layer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kms_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KmsEmulator]:
    state = tmp_path_factory.mktemp("kms-http-fuzz")
    (state / "principals.json").write_text("{}")
    root = load_pem_root((TESTDATA / "aws-nitro-enclaves-root-g1.pem").read_bytes())
    emulator = KmsEmulator(KmsConfig(state_dir=state, attestation_root=root, read_timeout=2.0))
    emulator.serve_in_thread()
    yield emulator
    emulator.shutdown()


_latin1_text = st.text(st.characters(max_codepoint=255, exclude_characters="\r\n"), max_size=8)


@FUZZ
# Found by this test: "²" passed str.isdigit() and then int() raised, answering 500.
@example(method="POST", path="/", length="\xb2", headers={}, body=b"{}")
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "HEAD"]),
    path=st.sampled_from(["/", "//", "/?x=1", "*", "/../"]),
    length=st.none() | st.integers(0, 40).map(str) | _latin1_text,
    headers=st.dictionaries(
        st.sampled_from(["Transfer-Encoding", "X-Amz-Target", "Content-Type", "Authorization"])
        | st.text("abcXYZ-", min_size=1, max_size=8),
        _latin1_text,
        max_size=3,
    ),
    body=st.binary(max_size=40),
)
def test_any_http_request_gets_a_json_answer_and_never_a_500(
    kms_http, method, path, length, headers, body
):
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", kms_http.port), timeout=5) as sock:
        sock.sendall(head.encode("latin-1") + body)
        sock.shutdown(socket.SHUT_WR)  # a body shorter than declared ends here
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split()[1])
    assert status != 500 and 400 <= status < 600
    if method != "HEAD":
        payload = rest.partition(b"\r\n\r\n")[2]
        first = json.JSONDecoder().raw_decode(payload.decode())[0]
        assert first["__type"].endswith("Exception")
