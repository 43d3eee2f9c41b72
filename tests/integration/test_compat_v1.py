"""Protocol v1: the original sample's clients, served by `nitro-local up --compat`.

`sample_client_ask` is written to the sample's own format (aws-samples/aws-nitro-enclaves-llm,
src/chat.py): KMS `Encrypt` of the question under a key, a JSON body holding credentials, region
and the base64 ciphertext posted to `/`, and `Decrypt` of `EncryptedData` into
`{"Results": answer}`. Only the transport differs: HTTPS to the proxy, as every client here.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from emulator import stack

pytestmark = pytest.mark.integration


@dataclass
class Compat:
    paths: stack.StatePaths
    profile: dict[str, Any]
    logs: Any  # StackLogs (tests/integration/conftest.py)

    def kms(self) -> Any:
        user = self.profile["user"]
        return boto3.client(
            "kms",
            region_name=self.profile["region"],
            endpoint_url=self.profile["kms_endpoint"],
            aws_access_key_id=user["access_key_id"],
            aws_secret_access_key=user["secret_access_key"],
            config=Config(retries={"max_attempts": 1}),
        )

    def post(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        context = ssl.create_default_context(cafile=self.profile["ca_bundle"])
        request = urllib.request.Request(
            self.profile["proxy_url"] + "/",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, context=context, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


# The sample sends the instance role's keys in the body; these stand in for them, and must never
# reach a log (the proxy drops them unread).
SAMPLE_CREDENTIALS = {
    "access_key_id": "ASIA" + secrets.token_hex(8).upper(),
    "secret_access_key": "v1-secret-" + secrets.token_hex(16),
    "token": "v1-token-" + secrets.token_hex(16),
}


def sample_body(ciphertext: bytes, region: str) -> dict[str, str]:
    return {
        **SAMPLE_CREDENTIALS,
        "region": region,
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }


def sample_client_ask(compat: Compat, question: str) -> str:
    kms = compat.kms()
    blob = kms.encrypt(KeyId=compat.profile["compat_key_id"], Plaintext=question)["CiphertextBlob"]
    status, body = compat.post(sample_body(blob, compat.profile["region"]))
    assert status == 200, body
    assert set(body) == {"EncryptedData"}
    plaintext = kms.decrypt(CiphertextBlob=base64.b64decode(body["EncryptedData"]))["Plaintext"]
    return json.loads(plaintext.decode())["Results"]


@pytest.fixture(scope="module")
def compat(local_stack: Any) -> Compat:
    started = local_stack("compat", "--compat")
    return Compat(started.paths, started.profile(), started.logs)


def test_the_samples_client_gets_an_answer_it_opens_itself(compat: Compat) -> None:
    question = "How do I enroll in the retirement plan?"
    decrypts = compat.logs.kms_calls("Decrypt")
    answer = sample_client_ask(compat, question)
    assert isinstance(answer, str) and answer.strip()
    # The enclave's Decrypt carried its attestation; the client's own Decrypt did not.
    assert compat.logs.kms_calls("Decrypt") == decrypts + 2
    attested = [
        record
        for record in compat.logs.records("kms")
        if record.get("operation") == "Decrypt" and record.get("attested") is True
    ]
    assert attested and attested[-1]["key_id"] in compat.profile["compat_key_id"]
    logs = compat.logs.text()
    for secret in (*SAMPLE_CREDENTIALS.values(), question):
        assert secret not in logs
    if len(answer.strip()) >= 12:  # a short answer ("Yes.") could occur in a log by chance
        assert answer.strip() not in logs


def test_the_compat_key_is_its_own_and_the_v2_key_never_takes_v1(compat: Compat) -> None:
    assert compat.profile["compat_key_id"] != compat.profile["key_id"]
    kms = compat.kms()
    # The v2 key's policy gives users no Encrypt: they cannot even make a v1 question under it.
    with pytest.raises(ClientError) as refused:
        kms.encrypt(KeyId=compat.profile["key_id"], Plaintext=b"a question")
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    # A blob of the v2 key (a wrapped data key) sent as v1: KMS refuses it for the compat key id.
    edk = kms.generate_data_key(
        KeyId=compat.profile["key_id"],
        KeySpec="AES_256",
        EncryptionContext={"app": "nitro-llm", "session": "AAAAAAAAAAAAAAAAAAAAAA"},
    )["CiphertextBlob"]
    status, body = compat.post(sample_body(edk, compat.profile["region"]))
    assert (status, body["error"]["code"]) == (400, "decryption_failed")


def test_bad_v1_bodies_get_their_codes_and_the_proxy_keeps_serving(compat: Compat) -> None:
    region = compat.profile["region"]
    good = sample_body(b"x" * 200, region)
    not_kms = base64.b64encode(b"not a KMS blob").decode()
    cases = [
        ({k: v for k, v in good.items() if k != "token"}, 400, "bad_request"),
        ({**good, "extra": "field"}, 400, "bad_request"),
        ({**good, "ciphertext": "not base64!"}, 400, "bad_request"),
        ({**good, "ciphertext": 12}, 400, "bad_request"),
        ({**good, "ciphertext": "A" * 9000}, 413, "legacy_too_large"),
        ({**good, "ciphertext": not_kms}, 400, "decryption_failed"),
    ]
    for body, want_status, want_code in cases:
        status, answer = compat.post(body)
        assert status == want_status, (body.keys(), answer)
        if want_code is not None:
            assert answer["error"]["code"] == want_code
    assert sample_client_ask(compat, "What is the dental plan?")


def test_kms_refuses_a_question_over_its_limit(compat: Compat) -> None:
    # The sample's client cannot even encrypt a question KMS cannot carry: the error is KMS's.
    with pytest.raises(ClientError) as refused:
        compat.kms().encrypt(KeyId=compat.profile["compat_key_id"], Plaintext=b"q" * 4097)
    assert refused.value.response["Error"]["Code"] == "ValidationException"
