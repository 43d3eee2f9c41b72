"""A local stand-in for AWS KMS: a real HTTP server speaking the KMS JSON 1.1 protocol.

Unmodified boto3 reaches it through `endpoint_url`; requests are SigV4-verified against
`<state-dir>/principals.json`, key policies are enforced, and `Recipient` is attested.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from emulator import kms_policy
from emulator.files import atomic_write
from emulator.kms_store import (
    Grant,
    KeyRecord,
    KmsError,
    KmsStore,
    Principal,
    PrincipalRegistry,
    canonical_context,
    ciphertext_key_id,
)
from protocol import attestation, cms
from protocol.logs import Timer, configure, event

JSON_CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "TrentService."
MAX_PLAINTEXT = 4096
MAX_CIPHERTEXT = 6144
MAX_ATTESTATION_DOCUMENT = 262144
MIN_RSA_BITS = 2048
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
_ACCOUNT_ID = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d$")
_GRANTEE = re.compile(r"^(\d{12}|arn:aws[a-z-]*:(iam|sts)::\d{12}:[\w+=,.@/:-]+)$")
_GRANT_NAME = re.compile(r"^[a-zA-Z0-9:/_-]+$")
# What a grant on a symmetric encryption key may allow (AWS's list, less asymmetric-only ones).
GRANT_OPERATIONS = frozenset(
    {"Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext"}
    | {"ReEncryptFrom", "ReEncryptTo", "CreateGrant", "RetireGrant", "DescribeKey"}
)

log = logging.getLogger("kms-emulator")


@dataclass(frozen=True)
class KmsConfig:
    """Everything the emulator needs; the CLI fills it from flags."""

    state_dir: Path
    attestation_root: bytes  # DER of the pinned root (the NSM emulator's, in local mode)
    host: str = "127.0.0.1"
    port: int = 0
    port_file: Path | None = None
    region: str = "us-east-1"
    account_id: str = "111122223333"
    max_body: int = 256 * 1024
    read_timeout: float = 10.0  # per socket read, and for idle keep-alive connections
    body_deadline: float = 30.0  # for the whole body of one request
    max_handlers: int = 64
    max_clock_skew: float = 300.0


@dataclass(frozen=True)
class _Recipient:
    """A verified Recipient: the enclave's public key and the condition keys it yields."""

    public_key: rsa.RSAPublicKey
    condition_keys: dict[str, str]


@dataclass
class _CallLog:
    """What one request's log line says (ids and outcomes only, never content)."""

    operation: str = "-"
    caller: str | None = None
    key_id: str | None = None
    decision: str | None = None
    attested: bool = False


def _error(type_name: str, message: str, status: int = 400) -> KmsError:
    return KmsError(type_name, message, status)


class _Params:
    """Typed access to a request's JSON members, refusing unknown or mistyped ones."""

    def __init__(self, body: Mapping[str, Any], allowed: frozenset[str]) -> None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise _error("ValidationException", f"Unknown parameter(s): {', '.join(unknown)}")
        self.body = body

    def string(
        self, name: str, *, required: bool = False, min_len: int = 1, max_len: int = 2048
    ) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise _error("ValidationException", f"{name} is required")
            return None
        if not isinstance(value, str):
            raise _error("ValidationException", f"{name} must be a string")
        if not min_len <= len(value) <= max_len:
            raise _error(
                "ValidationException", f"{name} must be {min_len} to {max_len} characters long"
            )
        return value

    def blob(self, name: str, *, required: bool = False, max_len: int) -> bytes | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise _error("ValidationException", f"{name} is required")
            return None
        return _decode_blob(name, value, max_len)

    def boolean(self, name: str) -> bool:
        value = self.body.get(name, False)
        if not isinstance(value, bool):
            raise _error("ValidationException", f"{name} must be a boolean")
        return value

    def integer(self, name: str, low: int, high: int) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _error("ValidationException", f"{name} must be an integer from {low} to {high}")
        return value

    def context(self, name: str = "EncryptionContext") -> dict[str, str]:
        value = self.body.get(name, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()
        ):
            raise _error("ValidationException", f"{name} must map non-empty strings to strings")
        try:
            size = len(canonical_context(value))
        except UnicodeEncodeError:  # lone surrogates ("\ud800") are valid JSON, not UTF-8
            raise _error("ValidationException", f"{name} must be valid Unicode") from None
        if size > 8192:
            raise _error("ValidationException", f"{name} is too large")
        return value

    def grant_tokens(self) -> None:
        value = self.body.get("GrantTokens", [])
        if not isinstance(value, list) or len(value) > 10:
            raise _error("ValidationException", "GrantTokens must be a list of at most 10")
        if not all(isinstance(item, str) and 0 < len(item) <= 8192 for item in value):
            raise _error("ValidationException", "GrantTokens must be non-empty strings")

    def symmetric_algorithm(self, name: str = "EncryptionAlgorithm") -> None:
        algorithm = self.string(name, max_len=64)
        if algorithm not in (None, "SYMMETRIC_DEFAULT"):
            raise _error("ValidationException", f"{name} must be SYMMETRIC_DEFAULT")


def _decode_blob(name: str, value: Any, max_len: int) -> bytes:
    if not isinstance(value, str):
        raise _error("ValidationException", f"{name} must be base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise _error("SerializationException", f"{name} is not valid base64") from None
    if not 1 <= len(raw) <= max_len:
        raise _error("ValidationException", f"{name} must be 1 to {max_len} bytes long")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate member")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; SerializationException for anything else."""
    if not body.strip():
        return {}
    try:
        obj = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError):
        raise _error("SerializationException", "The request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise _error("SerializationException", "The request body must be a JSON object")
    return obj


class KmsService:
    """The KMS operations, authentication and authorization, independent of HTTP."""

    def __init__(self, config: KmsConfig) -> None:
        self.config = config
        self.store = KmsStore(config.state_dir, region=config.region, account_id=config.account_id)
        self.principals = PrincipalRegistry(Path(config.state_dir) / "principals.json")
        self.principals.lookup("")  # read it now, so that a broken file shows at start
        self._operations: dict[str, Callable[[_Params, Principal, _CallLog], dict[str, Any]]]
        self._operations = {
            "CreateKey": self.create_key,
            "CreateAlias": self.create_alias,
            "DescribeKey": self.describe_key,
            "Encrypt": self.encrypt,
            "Decrypt": self.decrypt,
            "GenerateDataKey": self.generate_data_key,
            "GetKeyPolicy": self.get_key_policy,
            "PutKeyPolicy": self.put_key_policy,
            "ListAliases": self.list_aliases,
            "ListKeys": self.list_keys,
            "ReEncrypt": self.re_encrypt,
            "CreateGrant": self.create_grant,
            "ListGrants": self.list_grants,
            "RevokeGrant": self.revoke_grant,
        }
        self._allowed = {
            "CreateKey": frozenset(
                {"Policy", "Description", "KeyUsage", "CustomerMasterKeySpec", "KeySpec"}
                | {"Origin", "CustomKeyStoreId", "BypassPolicyLockoutSafetyCheck", "Tags"}
                | {"MultiRegion", "XksKeyId"}
            ),
            "CreateAlias": frozenset({"AliasName", "TargetKeyId"}),
            "DescribeKey": frozenset({"KeyId", "GrantTokens"}),
            "Encrypt": frozenset(
                {"KeyId", "Plaintext", "EncryptionContext", "GrantTokens"}
                | {"EncryptionAlgorithm", "DryRun"}
            ),
            "Decrypt": frozenset(
                {"CiphertextBlob", "EncryptionContext", "GrantTokens", "KeyId"}
                | {"EncryptionAlgorithm", "Recipient", "DryRun", "DryRunModifiers"}
            ),
            "GenerateDataKey": frozenset(
                {"KeyId", "EncryptionContext", "NumberOfBytes", "KeySpec", "GrantTokens"}
                | {"Recipient", "DryRun"}
            ),
            "GetKeyPolicy": frozenset({"KeyId", "PolicyName"}),
            "PutKeyPolicy": frozenset(
                {"KeyId", "PolicyName", "Policy", "BypassPolicyLockoutSafetyCheck"}
            ),
            "ListAliases": frozenset({"KeyId", "Limit", "Marker"}),
            "ListKeys": frozenset({"Limit", "Marker"}),
            "ReEncrypt": frozenset(
                {"CiphertextBlob", "SourceEncryptionContext", "SourceKeyId", "DestinationKeyId"}
                | {"DestinationEncryptionContext", "SourceEncryptionAlgorithm"}
                | {"DestinationEncryptionAlgorithm", "GrantTokens", "DryRun"}
            ),
            "CreateGrant": frozenset(
                {"KeyId", "GranteePrincipal", "RetiringPrincipal", "Operations", "Constraints"}
                | {"GrantTokens", "Name", "DryRun"}
            ),
            "ListGrants": frozenset({"KeyId", "Limit", "Marker", "GrantId", "GranteePrincipal"}),
            "RevokeGrant": frozenset({"KeyId", "GrantId", "DryRun"}),
        }

    def close(self) -> None:
        self.store.close()

    # --- the request pipeline ---------------------------------------------------------------

    def handle(
        self,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        call: _CallLog,
    ) -> dict[str, Any]:
        """Authenticate, dispatch and answer one request; raises KmsError for KMS errors."""
        caller = self.authenticate(method=method, path=path, headers=headers, body=body)
        call.caller = caller.arn
        target = headers.get("x-amz-target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
        if operation not in self._operations:
            raise _error("UnknownOperationException", "The requested operation is not supported")
        call.operation = operation
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (JSON_CONTENT_TYPE, "application/x-amz-json-1.0"):
            raise _error("SerializationException", f"Content-Type must be {JSON_CONTENT_TYPE}")
        params = _Params(parse_json_body(body), self._allowed[operation])
        return self._operations[operation](params, caller, call)

    def authenticate(
        self, *, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Principal:
        """The caller, after checking the request's SigV4 signature with botocore's signer."""
        authorization = headers.get("authorization")
        if not authorization:
            raise _error(
                "MissingAuthenticationTokenException", "Request is missing Authentication Token"
            )
        scheme, _, rest = authorization.partition(" ")
        fields = {}
        for part in rest.split(","):
            name, _, value = part.strip().partition("=")
            fields[name] = value
        if scheme != "AWS4-HMAC-SHA256" or not all(
            fields.get(name) for name in ("Credential", "SignedHeaders", "Signature")
        ):
            raise _error(
                "IncompleteSignatureException",
                "Authorization header requires AWS4-HMAC-SHA256 with Credential, SignedHeaders "
                "and Signature",
            )
        scope = fields["Credential"].split("/")
        if len(scope) != 5 or scope[4] != "aws4_request":
            raise _error("IncompleteSignatureException", "Malformed Credential in Authorization")
        access_key_id, scope_date, scope_region, scope_service, _ = scope
        principal = self.principals.lookup(access_key_id)
        token = headers.get("x-amz-security-token")
        if principal is None or token != principal.session_token:
            raise _error(
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        amz_date = headers.get("x-amz-date", "")
        try:
            signed_at = datetime.strptime(amz_date, _AMZ_DATE).replace(tzinfo=UTC)
        except ValueError:
            raise _error("IncompleteSignatureException", "X-Amz-Date is missing or bad") from None
        if abs(time.time() - signed_at.timestamp()) > self.config.max_clock_skew:
            raise _error(
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is outside the allowed clock skew of "
                f"{int(self.config.max_clock_skew)} seconds from now",
            )
        if scope_date != amz_date[:8] or scope_service != "kms":
            raise _error("InvalidSignatureException", "Credential scope does not match the request")
        if scope_region != self.config.region:
            raise _error(
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region ({self.config.region})",
            )
        signed = fields["SignedHeaders"].lower().split(";")
        missing = [name for name in signed if name not in headers]
        if missing or "host" not in signed or "x-amz-date" not in signed:
            raise _error(
                "InvalidSignatureException",
                "SignedHeaders must list host and x-amz-date and "
                "only headers present in the request",
            )
        if token is not None and "x-amz-security-token" not in signed:
            raise _error("InvalidSignatureException", "X-Amz-Security-Token must be signed")
        # botocore signs a claimed payload hash as is, so the claim must be the body's hash.
        claimed = headers.get("x-amz-content-sha256")
        if claimed is not None and claimed != hashlib.sha256(body).hexdigest():
            raise _error("InvalidSignatureException", "X-Amz-Content-SHA256 does not match")
        request = AWSRequest(
            method=method,
            url=f"http://{headers['host']}{path}",
            headers={name: headers[name] for name in signed},
            data=body,
        )
        # SigV4Auth.add_auth signs "now"; the same steps with the request's own timestamp
        # recompute the signature the client made.
        request.context["timestamp"] = amz_date
        signer = SigV4Auth(
            Credentials(access_key_id, principal.secret_access_key), "kms", self.config.region
        )
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if not hmac.compare_digest(expected.encode(), fields["Signature"].encode()):
            raise _error(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.",
            )
        return principal

    # --- authorization ---------------------------------------------------------------------

    def _base_context(self, caller: Principal) -> dict[str, kms_policy.ContextValue]:
        account = kms_policy.account_of(caller.arn) or ""
        return {
            "aws:PrincipalArn": kms_policy.role_arn_of(caller.arn),
            "aws:PrincipalAccount": account,
            "kms:CallerAccount": account,
        }

    def _authorize(
        self,
        caller: Principal,
        action: str,
        record: KeyRecord,
        call: _CallLog,
        *,
        context: Mapping[str, str] | None = None,
        recipient: _Recipient | None = None,
        policy: str | None = None,
        extra: Mapping[str, kms_policy.ContextValue] | None = None,
    ) -> Grant | None:
        """Refuse the call unless the key policy or, failing it, a grant allows it.

        As on AWS, a grant adds permissions but never overrides an explicit deny. Returns the
        grant that allowed the call, if one did.
        """
        request_context = self._base_context(caller)
        request_context.update(extra or {})
        if context is not None:
            for key, value in context.items():
                request_context[f"kms:EncryptionContext:{key}"] = value
            if context:
                request_context["kms:EncryptionContextKeys"] = sorted(context)
        if recipient is not None:
            call.attested = True
            request_context.update(recipient.condition_keys)
        try:
            decision = kms_policy.evaluate(
                json.loads(policy if policy is not None else record.policy),
                principal_arn=caller.arn,
                action=action,
                context=request_context,
                resource=record.arn,
            )
        except (ValueError, kms_policy.PolicyError):
            # Stored policies were validated on entry; a broken one fails closed.
            decision = kms_policy.Decision(False, "unreadable key policy")
        grant = None
        if not decision.allowed and decision.reason == "implicit deny":
            grant = self._granted(caller, action, record, context)
            if grant is not None:
                decision = kms_policy.Decision(True, f"allowed by grant {grant.grant_id[:12]}")
        call.decision = decision.reason
        if not decision.allowed:
            why = (
                "with an explicit deny in a resource-based policy"
                if decision.reason.startswith("explicit deny")
                else f"because no resource-based policy allows the {action} action"
            )
            raise _error(
                "AccessDeniedException",
                f"User: {caller.arn} is not authorized to perform: {action} on resource: "
                f"{record.arn} {why}",
            )
        return grant

    def _granted(
        self, caller: Principal, action: str, record: KeyRecord, context: Mapping[str, str] | None
    ) -> Grant | None:
        operation = action.split(":", 1)[1]
        for grant in self.store.grants(record.key_id):
            if not grant.admits(operation, context):
                continue
            # The grantee matches as a key policy's principal would (a role's sessions too).
            statement = {"Effect": "Allow", "Principal": {"AWS": grant.grantee}}
            statement.update({"Action": action, "Resource": "*"})
            verdict = kms_policy.evaluate(
                {"Version": "2012-10-17", "Statement": [statement]},
                principal_arn=caller.arn,
                action=action,
                context={},
            )
            if verdict.allowed:
                return grant
        return None

    def _require_account(self, caller: Principal, action: str) -> None:
        # Stands in for IAM: principals of the emulated account hold account-level permissions.
        if kms_policy.account_of(caller.arn) != self.config.account_id:
            raise _error(
                "AccessDeniedException",
                f"User: {caller.arn} is not authorized to perform: {action}",
            )

    def _checked_policy(
        self, text: str, caller: Principal, arn: str, bypass_lockout_check: bool
    ) -> str:
        if len(text) > 32768:
            raise _error("LimitExceededException", "The key policy exceeds 32768 characters")
        try:
            policy = json.loads(text)
            kms_policy.validate_policy(policy)
        except (ValueError, RecursionError) as exc:
            detail = str(exc) if isinstance(exc, kms_policy.PolicyError) else "not valid JSON"
            raise _error("MalformedPolicyDocumentException", f"Policy: {detail}") from None
        if not bypass_lockout_check:
            decision = kms_policy.evaluate(
                policy,
                principal_arn=caller.arn,
                action="kms:PutKeyPolicy",
                context=self._base_context(caller),
                resource=arn,
            )
            if not decision.allowed:
                raise _error(
                    "MalformedPolicyDocumentException",
                    "The new key policy will not allow you to update the key policy in the future.",
                )
        return text

    # --- Recipient ------------------------------------------------------------------------

    def _recipient(self, params: _Params) -> _Recipient | None:
        value = params.body.get("Recipient")
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - {
            "KeyEncryptionAlgorithm",
            "AttestationDocument",
        }:
            raise _error(
                "ValidationException",
                "Recipient must hold KeyEncryptionAlgorithm and AttestationDocument",
            )
        if value.get("KeyEncryptionAlgorithm", "RSAES_OAEP_SHA_256") != "RSAES_OAEP_SHA_256":
            raise _error("ValidationException", "KeyEncryptionAlgorithm must be RSAES_OAEP_SHA_256")
        if value.get("AttestationDocument") is None:
            raise _error("ValidationException", "Recipient.AttestationDocument is required")
        raw = _decode_blob(
            "Recipient.AttestationDocument", value["AttestationDocument"], MAX_ATTESTATION_DOCUMENT
        )
        policy = attestation.AttestationPolicy(root=self.config.attestation_root, allow_debug=True)
        try:
            document = attestation.verify(raw, policy)
        except attestation.AttestationError as exc:
            raise _error(
                "ValidationException", f"attestation document invalid: {exc.check} check failed"
            ) from None
        except Exception as exc:  # the document is untrusted: fail closed
            event(log, "attestation_error", logging.WARNING, exception=type(exc).__name__)
            raise _error("ValidationException", "attestation document invalid") from None
        if not document.public_key:
            raise _error("ValidationException", "attestation document invalid: no public key")
        try:
            public_key = serialization.load_der_public_key(document.public_key)
        except (ValueError, TypeError):
            raise _error(
                "ValidationException", "attestation document invalid: unreadable public key"
            ) from None
        if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size < MIN_RSA_BITS:
            raise _error(
                "ValidationException",
                f"attestation document's public key must be RSA of {MIN_RSA_BITS} bits or more",
            )
        keys = {f"kms:RecipientAttestation:PCR{n}": v.hex() for n, v in document.pcrs.items()}
        if 0 in document.pcrs:
            keys["kms:RecipientAttestation:ImageSha384"] = document.pcrs[0].hex()
        return _Recipient(public_key, keys)

    @staticmethod
    def _dry_run(params: _Params) -> None:
        if params.boolean("DryRun"):
            raise _error(
                "DryRunOperationException",
                "The request would have succeeded, but the DryRun option is set.",
                status=412,
            )

    # --- operations -----------------------------------------------------------------------

    def create_key(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        self._require_account(caller, "kms:CreateKey")
        description = params.string("Description", min_len=0, max_len=8192) or ""
        for name, supported in (
            ("KeyUsage", "ENCRYPT_DECRYPT"),
            ("KeySpec", "SYMMETRIC_DEFAULT"),
            ("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT"),
            ("Origin", "AWS_KMS"),
        ):
            if params.string(name, max_len=64) not in (None, supported):
                raise _error(
                    "UnsupportedOperationException",
                    f"The emulator supports only {name} {supported}",
                )
        if params.body.get("CustomKeyStoreId") or params.body.get("XksKeyId"):
            raise _error("UnsupportedOperationException", "Custom key stores are not emulated")
        if params.boolean("MultiRegion"):
            raise _error("UnsupportedOperationException", "Multi-Region keys are not emulated")
        if params.body.get("Tags"):
            raise _error("UnsupportedOperationException", "Tags are not emulated")
        policy = params.string("Policy", max_len=131072)
        bypass = params.boolean("BypassPolicyLockoutSafetyCheck")
        if policy is not None:
            # The check runs against the key's future ARN; Resource is "*" in key policies.
            self._checked_policy(policy, caller, self.store.key_arn("*"), bypass)
        record = self.store.create_key(description=description, policy=policy)
        call.key_id = record.key_id
        return {"KeyMetadata": record.metadata()}

    def create_alias(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        alias_name = params.string("AliasName", required=True, max_len=256)
        target = params.string("TargetKeyId", required=True)
        assert alias_name is not None and target is not None
        record = self.store.resolve(target, allow_alias=False)
        call.key_id = record.key_id
        self._authorize(caller, "kms:CreateAlias", record, call)
        self.store.create_alias(alias_name, record.key_id)
        return {}

    def describe_key(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        params.grant_tokens()
        record = self.store.resolve(params.string("KeyId", required=True) or "")
        call.key_id = record.key_id
        self._authorize(caller, "kms:DescribeKey", record, call)
        return {"KeyMetadata": record.metadata()}

    def encrypt(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        params.grant_tokens()
        params.symmetric_algorithm()
        plaintext = params.blob("Plaintext", required=True, max_len=MAX_PLAINTEXT)
        context = params.context()
        record = self.store.resolve(params.string("KeyId", required=True) or "")
        call.key_id = record.key_id
        self._authorize(caller, "kms:Encrypt", record, call, context=context)
        self._dry_run(params)
        assert plaintext is not None
        return {
            "CiphertextBlob": _b64(self.store.encrypt(record, plaintext, context)),
            "KeyId": record.arn,
            "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def _ciphertext_key(self, blob: bytes, key_ref: str | None, call: _CallLog) -> KeyRecord:
        """The key a ciphertext names, which `key_ref` (KeyId / SourceKeyId) must match if given."""
        record = self.store.resolve(ciphertext_key_id(blob))
        call.key_id = record.key_id
        if key_ref is not None and self.store.resolve(key_ref).key_id != record.key_id:
            raise _error(
                "IncorrectKeyException",
                "The key ID in the request does not identify the KMS key used to encrypt the "
                "ciphertext.",
            )
        return record

    def decrypt(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        params.grant_tokens()
        params.symmetric_algorithm()
        modifiers = params.body.get("DryRunModifiers", [])
        if not isinstance(modifiers, list) or not all(isinstance(m, str) for m in modifiers):
            raise _error("ValidationException", "DryRunModifiers must be a list of strings")
        blob = params.blob("CiphertextBlob", required=True, max_len=MAX_CIPHERTEXT)
        context = params.context()
        key_ref = params.string("KeyId")
        assert blob is not None
        record = self._ciphertext_key(blob, key_ref, call)
        recipient = self._recipient(params)
        self._authorize(caller, "kms:Decrypt", record, call, context=context, recipient=recipient)
        self._dry_run(params)
        plaintext = self.store.decrypt(record, blob, context)
        answer: dict[str, Any] = {"KeyId": record.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}
        if recipient is not None:
            envelope = cms.build_enveloped_data(plaintext, recipient.public_key)
            answer["CiphertextForRecipient"] = _b64(envelope)
        else:
            answer["Plaintext"] = _b64(plaintext)
        return answer

    def generate_data_key(
        self, params: _Params, caller: Principal, call: _CallLog
    ) -> dict[str, Any]:
        params.grant_tokens()
        context = params.context()
        size = params.integer("NumberOfBytes", 1, 1024)
        spec = params.string("KeySpec", max_len=64)
        if (size is None) == (spec is None):
            raise _error("ValidationException", "Please specify either number of bytes or key spec")
        if spec is not None:
            if spec not in ("AES_256", "AES_128"):
                raise _error("ValidationException", "KeySpec must be AES_256 or AES_128")
            size = 32 if spec == "AES_256" else 16
        record = self.store.resolve(params.string("KeyId", required=True) or "")
        call.key_id = record.key_id
        recipient = self._recipient(params)
        self._authorize(
            caller, "kms:GenerateDataKey", record, call, context=context, recipient=recipient
        )
        self._dry_run(params)
        assert size is not None
        data_key = secrets.token_bytes(size)
        answer = {
            "CiphertextBlob": _b64(self.store.encrypt(record, data_key, context)),
            "KeyId": record.arn,
        }
        if recipient is not None:
            envelope = cms.build_enveloped_data(data_key, recipient.public_key)
            answer["CiphertextForRecipient"] = _b64(envelope)
        else:
            answer["Plaintext"] = _b64(data_key)
        return answer

    def _policy_name(self, params: _Params) -> None:
        name = params.string("PolicyName", max_len=128)
        if name not in (None, "default"):
            raise _error("NotFoundException", "No such policy exists")

    def get_key_policy(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        self._policy_name(params)
        record = self.store.resolve(params.string("KeyId", required=True) or "", allow_alias=False)
        call.key_id = record.key_id
        self._authorize(caller, "kms:GetKeyPolicy", record, call)
        return {"Policy": record.policy, "PolicyName": "default"}

    def put_key_policy(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        self._policy_name(params)
        record = self.store.resolve(params.string("KeyId", required=True) or "", allow_alias=False)
        call.key_id = record.key_id
        policy = params.string("Policy", required=True, max_len=131072) or ""
        bypass = params.boolean("BypassPolicyLockoutSafetyCheck")
        self._authorize(caller, "kms:PutKeyPolicy", record, call)
        self.store.put_policy(
            record.key_id, self._checked_policy(policy, caller, record.arn, bypass)
        )
        return {}

    @staticmethod
    def _page(params: _Params, items: list[dict[str, Any]], name: str) -> dict[str, Any]:
        limit = params.integer("Limit", 1, 1000) or 100
        marker = params.string("Marker", max_len=1024)
        start = int(marker) if marker is not None and marker.isdigit() else 0
        if marker is not None and not marker.isdigit():
            raise _error("InvalidMarkerException", "The marker is not valid")
        page = items[start : start + limit]
        answer: dict[str, Any] = {name: page, "Truncated": start + limit < len(items)}
        if answer["Truncated"]:
            answer["NextMarker"] = str(start + limit)
        return answer

    def list_aliases(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        self._require_account(caller, "kms:ListAliases")
        only = params.string("KeyId")
        only_id = self.store.resolve(only, allow_alias=False).key_id if only else None
        aliases = [
            {"AliasName": name, "AliasArn": self.store.alias_arn(name), "TargetKeyId": key_id}
            for name, key_id in self.store.list_aliases()
            if only_id in (None, key_id)
        ]
        return self._page(params, aliases, "Aliases")

    def list_keys(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        self._require_account(caller, "kms:ListKeys")
        keys = [{"KeyId": r.key_id, "KeyArn": r.arn} for r in self.store.list_keys()]
        return self._page(params, keys, "Keys")

    # --- ReEncrypt and grants -------------------------------------------------------------

    def re_encrypt(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        """Decrypt under the source key and encrypt under the destination, inside KMS.

        Authorized as AWS does: kms:ReEncryptFrom on the source key (with the source context),
        kms:ReEncryptTo on the destination key (with the destination context).
        """
        params.grant_tokens()
        params.symmetric_algorithm("SourceEncryptionAlgorithm")
        params.symmetric_algorithm("DestinationEncryptionAlgorithm")
        blob = params.blob("CiphertextBlob", required=True, max_len=MAX_CIPHERTEXT)
        source_context = params.context("SourceEncryptionContext")
        destination_context = params.context("DestinationEncryptionContext")
        source_ref = params.string("SourceKeyId")
        destination_ref = params.string("DestinationKeyId", required=True) or ""
        assert blob is not None
        source = self._ciphertext_key(blob, source_ref, call)
        destination = self.store.resolve(destination_ref)
        same = {"kms:ReEncryptOnSameKey": source.key_id == destination.key_id}
        self._authorize(
            caller, "kms:ReEncryptFrom", source, call, context=source_context, extra=same
        )
        self._authorize(
            caller, "kms:ReEncryptTo", destination, call, context=destination_context, extra=same
        )
        self._dry_run(params)
        plaintext = self.store.decrypt(source, blob, source_context)
        return {
            "CiphertextBlob": _b64(self.store.encrypt(destination, plaintext, destination_context)),
            "SourceKeyId": source.arn,
            "KeyId": destination.arn,
            "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        }

    def _grantee(self, params: _Params, name: str, *, required: bool) -> str | None:
        value = params.string(name, required=required, max_len=256)
        if value is not None and not _GRANTEE.match(value):
            raise _error("ValidationException", f"{name} must be an IAM principal or account")
        return value

    def create_grant(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        params.grant_tokens()
        record = self.store.resolve(params.string("KeyId", required=True) or "", allow_alias=False)
        call.key_id = record.key_id
        grantee = self._grantee(params, "GranteePrincipal", required=True)
        retiring = self._grantee(params, "RetiringPrincipal", required=False)
        name = params.string("Name", max_len=256) or ""
        if name and not _GRANT_NAME.match(name):
            raise _error("ValidationException", "Name may hold only letters, digits, :/_-")
        operations = params.body.get("Operations")
        if (
            not isinstance(operations, list)
            or not operations
            or not all(isinstance(op, str) for op in operations)
        ):
            raise _error("ValidationException", "Operations must be a non-empty list of strings")
        unknown = sorted(set(operations) - GRANT_OPERATIONS)
        if unknown:
            raise _error(
                "ValidationException",
                f"Operations {', '.join(unknown)} cannot be granted on a symmetric encryption key",
            )
        constraints = self._grant_constraints(params)
        extra: dict[str, kms_policy.ContextValue] = {
            "kms:GranteePrincipal": grantee or "",
            "kms:GrantOperations": sorted(set(operations)),
            "kms:GrantIsForAWSResource": False,
        }
        if retiring is not None:
            extra["kms:RetiringPrincipal"] = retiring
        if constraints:
            extra["kms:GrantConstraintType"] = next(iter(constraints))
        via = self._authorize(caller, "kms:CreateGrant", record, call, extra=extra)
        if via is not None and (
            not set(operations) <= set(via.operations) or dict(constraints) != dict(via.constraints)
        ):
            # A grant that allows CreateGrant passes on its own operations and constraints only.
            raise _error(
                "AccessDeniedException",
                f"User: {caller.arn} is not authorized to perform: kms:CreateGrant on resource: "
                f"{record.arn}: a grant may be passed on only with a subset of its operations "
                "and the same constraints",
            )
        self._dry_run(params)
        grant = self.store.add_grant(
            Grant(
                grant_id=secrets.token_hex(32),
                grant_token=base64.urlsafe_b64encode(secrets.token_bytes(48)).decode("ascii"),
                key_id=record.key_id,
                grantee=grantee or "",
                operations=tuple(dict.fromkeys(operations)),
                issuing_account=f"arn:aws:iam::{record.account_id}:root",
                creation_date=round(time.time(), 3),
                name=name,
                retiring=retiring,
                constraints=constraints,
            )
        )
        return {"GrantToken": grant.grant_token, "GrantId": grant.grant_id}

    @staticmethod
    def _grant_constraints(params: _Params) -> dict[str, dict[str, str]]:
        value = params.body.get("Constraints")
        if value is None:
            return {}
        kinds = ("EncryptionContextSubset", "EncryptionContextEquals")
        if not isinstance(value, dict) or set(value) - set(kinds) or len(value) != 1:
            raise _error(
                "ValidationException",
                "Constraints must hold one of EncryptionContextSubset or EncryptionContextEquals",
            )
        kind = next(iter(value))
        return {kind: _Params(value, frozenset(kinds)).context(kind)}

    def list_grants(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        record = self.store.resolve(params.string("KeyId", required=True) or "")
        call.key_id = record.key_id
        only_id = params.string("GrantId", max_len=128)
        only_grantee = self._grantee(params, "GranteePrincipal", required=False)
        self._authorize(caller, "kms:ListGrants", record, call)
        grants = []
        for grant in self.store.grants(record.key_id):
            if only_id not in (None, grant.grant_id) or only_grantee not in (None, grant.grantee):
                continue
            entry: dict[str, Any] = {
                "KeyId": record.arn,
                "GrantId": grant.grant_id,
                "Name": grant.name,
                "CreationDate": grant.creation_date,
                "GranteePrincipal": grant.grantee,
                "IssuingAccount": grant.issuing_account,
                "Operations": list(grant.operations),
            }
            if grant.retiring is not None:
                entry["RetiringPrincipal"] = grant.retiring
            if grant.constraints:
                entry["Constraints"] = {k: dict(v) for k, v in grant.constraints.items()}
            grants.append(entry)
        return self._page(params, grants, "Grants")

    def revoke_grant(self, params: _Params, caller: Principal, call: _CallLog) -> dict[str, Any]:
        record = self.store.resolve(params.string("KeyId", required=True) or "", allow_alias=False)
        call.key_id = record.key_id
        grant_id = params.string("GrantId", required=True, max_len=128) or ""
        self._authorize(caller, "kms:RevokeGrant", record, call)
        self._dry_run(params)
        self.store.revoke_grant(record.key_id, grant_id)
        return {}


class _KmsRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every answer is JSON with a Content-Length."""

    protocol_version = "HTTP/1.1"
    server: _KmsHttpServer

    def setup(self) -> None:
        self.timeout = self.server.service.config.read_timeout
        super().setup()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The stdlib's own refusals (bad request line, oversized headers) answer HTML; keep JSON.
        self.close_connection = True
        answer = {"__type": "SerializationException", "message": f"HTTP error {int(code)}"}
        self._send_json(int(code), answer, str(uuid.uuid4()))

    def version_string(self) -> str:
        return "nitro-kms-emulator"

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib's access log is plain text; our own JSON line is written per request.
        return

    def do_POST(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        service = self.server.service
        timer = Timer()
        request_id = str(uuid.uuid4())
        call = _CallLog()
        status, answer = 200, {}
        try:
            headers = {name.lower(): value for name, value in self.headers.items()}
            if self.command != "POST" or self.path != "/":
                raise _error("UnknownOperationException", "Only POST / is served", status=404)
            body = self._read_body(service.config)
            answer = service.handle(
                method=self.command, path=self.path, headers=headers, body=body, call=call
            )
        except KmsError as exc:
            status, answer = exc.status, {"__type": exc.type_name, "message": exc.message}
        except TimeoutError:
            self.close_connection = True
            status = 408
            answer = {"__type": "RequestTimeoutException", "message": "Body read timed out"}
        except Exception as exc:  # a bug must not take the server down
            event(log, "internal_error", logging.ERROR, exception=type(exc).__name__)
            status = 500
            answer = {"__type": "KMSInternalException", "message": "Internal error"}
        outcome = answer.get("__type", "ok") if status != 200 else "ok"
        event(
            log,
            "request",
            request_id=request_id,
            operation=call.operation,
            caller=call.caller,
            key_id=call.key_id,
            outcome=outcome,
            decision=call.decision,
            attested=call.attested,
            status=status,
            duration_ms=timer.ms(),
        )
        self._send_json(status, answer, request_id)

    def _read_body(self, config: KmsConfig) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _error("ValidationException", "Chunked bodies are not accepted", status=411)
        length_text = self.headers.get("Content-Length")
        # ASCII digits only: str.isdigit() also takes "²", which int() then refuses (a 500).
        if length_text is None or not re.fullmatch(r"[0-9]+", length_text.strip()):
            self.close_connection = True
            raise _error("ValidationException", "Content-Length is required", status=411)
        length = int(length_text)
        if length > config.max_body:
            # The body stays unread, so this connection cannot carry another request.
            self.close_connection = True
            raise _error(
                "ValidationException",
                f"The request body exceeds {config.max_body} bytes",
                status=413,
            )
        deadline = time.monotonic() + config.body_deadline
        chunks: list[bytes] = []
        remaining = length
        while remaining > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("body deadline")
            chunk = self.rfile.read1(min(remaining, 65536))
            if not chunk:
                self.close_connection = True
                raise _error("SerializationException", "The request body was cut short")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _send_json(self, status: int, answer: Mapping[str, Any], request_id: str) -> None:
        payload = json.dumps(answer, separators=(",", ":")).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", JSON_CONTENT_TYPE)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("x-amzn-RequestId", request_id)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)
        except OSError:
            self.close_connection = True


class _KmsHttpServer(ThreadingHTTPServer):
    """A threaded HTTP server with a bounded number of concurrent connection handlers."""

    daemon_threads = True
    request_queue_size = 64
    # A full house waits this long for a free handler, then the connection is dropped.
    slot_wait = 2.0

    def __init__(self, service: KmsService) -> None:
        self.service = service
        self._slots = threading.BoundedSemaphore(service.config.max_handlers)
        super().__init__((service.config.host, service.config.port), _KmsRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(timeout=self.slot_wait):
            event(log, "overloaded", logging.WARNING)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stdlib prints a traceback to stderr; log the type only (it may quote data).
        event(log, "connection_error", logging.WARNING, exception=sys.exc_info()[0].__name__)


class KmsEmulator:
    """The service behind a listening HTTP server; `port` is known once constructed."""

    def __init__(self, config: KmsConfig) -> None:
        self.service = KmsService(config)
        try:
            self.httpd = _KmsHttpServer(self.service)
        except BaseException:
            self.service.close()
            raise
        self.port: int = self.httpd.server_address[1]
        self.endpoint_url = f"http://{config.host}:{self.port}"
        self._thread: threading.Thread | None = None
        if config.port_file is not None:
            atomic_write(Path(config.port_file), f"{self.port}\n".encode())

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def serve_in_thread(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.serve_forever, name="kms-http", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self) -> None:
        """Stop accepting, wait for the serve loop, close the socket and release the state."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.service.close()


def load_root(path: Path) -> bytes:
    """The DER of the pinned attestation root from a PEM file."""
    return attestation.load_pem_root(Path(path).read_bytes())


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nitro-kms-emulator", description="Local stand-in for AWS KMS (JSON 1.1 over HTTP)."
    )
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="where to write the chosen port")
    parser.add_argument("--attestation-root", type=Path, required=True, help="PEM root to pin")
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--account-id", default="111122223333")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not _REGION.match(args.region):
        parser.error(f"--region {args.region!r} is not a region name")
    if not _ACCOUNT_ID.match(args.account_id):
        parser.error("--account-id must be 12 digits")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0-65535")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of `nitro-kms-emulator`; serves until SIGTERM or SIGINT."""
    args = _parse_args(argv)
    configure("kms-emulator", args.log_level)
    try:
        root = load_root(args.attestation_root)
    except (OSError, ValueError, attestation.AttestationError) as exc:
        print(f"error: cannot load --attestation-root: {type(exc).__name__}", file=sys.stderr)
        return 2
    config = KmsConfig(
        state_dir=args.state_dir,
        attestation_root=root,
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        region=args.region,
        account_id=args.account_id,
    )
    try:
        emulator = KmsEmulator(config)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        print(f"error: cannot start the KMS emulator: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    emulator.serve_in_thread()
    event(log, "listening", host=args.host, port=emulator.port, region=args.region)
    while not stop.wait(0.5):
        pass
    emulator.shutdown()
    event(log, "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
