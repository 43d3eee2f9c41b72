"""What the chatbot checks before it speaks: the enclave's attestation and the key's policy.

The document is verified by protocol.attestation (the one verifier the KMS emulator uses too)
against a pinned root; the key policy is evaluated by protocol.key_policy (the evaluator the KMS
emulator enforces policies with), probing who could obtain kms:Decrypt. Also the readable report
of `chatbot verify-attestation`. No network here: the client fetches, this module judges.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from chatbot.profile import ConfigError
from protocol import attestation, envelope, key_policy
from protocol.attestation import AttestationDocument, AttestationError, AttestationPolicy
from protocol.errors import ErrorCode, NitroError

AWS_ROOT_RESOURCE = "aws-nitro-enclaves-root-g1.pem"
# SHA-256 of the DER of AWS_NitroEnclaves_Root-G1, as AWS publishes it: the packaged file is
# checked against it, so that a swapped file is noticed.
AWS_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
NONCE_BYTES = 32
MAX_AGE = timedelta(minutes=5)
MAX_PCR_FILE = 64 * 1024
MAX_DOCUMENT_FILE = 64 * 1024
_PCR_KEY = re.compile(r"^PCR([0-9]{1,2})$")
_ZERO_PCR = bytes(48)
_DECRYPT = "kms:Decrypt"
# Without an attestation, none of these may be allowed to anyone: each hands out the data key
# (ReEncryptFrom moves it under a key the caller controls, CreateGrant gives Decrypt away).
_RELEASING_ACTIONS = (_DECRYPT, "kms:ReEncryptFrom", "kms:CreateGrant")
_PROBE_ROLE = "nitro-llm-key-policy-probe"
_OUTSIDE_ACCOUNT = "000000000000"


# The client's own checks, beside the document checks of protocol.attestation.CHECKS.
CLIENT_CHECKS = {
    "response": 'the proxy\'s answer to GET /v1/attestation is not {"document": <base64>}',
    "key_policy": "the KMS key policy would release the data key to something other than an "
    "enclave with the expected PCRs (or to nothing at all)",
}


def describe_check(check: str) -> str:
    """What a failed check means, for a person."""
    return CLIENT_CHECKS.get(check) or attestation.describe_check(check)


class KeyPolicyError(NitroError):
    """The key policy would release the data key to something else than the expected enclave."""

    def __init__(self, detail: str) -> None:
        super().__init__(ErrorCode.KEY_POLICY_UNSAFE, f"key_policy: {detail}")
        self.check = "key_policy"


# ---- inputs ------------------------------------------------------------------------------------


def aws_root() -> bytes:
    """The DER of AWS_NitroEnclaves_Root-G1, shipped with the chatbot and checked by digest."""
    pem = resources.files("chatbot").joinpath(AWS_ROOT_RESOURCE).read_bytes()
    der = attestation.load_pem_root(pem)
    if hashlib.sha256(der).hexdigest() != AWS_ROOT_SHA256:
        raise ConfigError(f"the packaged {AWS_ROOT_RESOURCE} is not AWS's root certificate")
    return der


def load_root(path: str | Path) -> bytes:
    """The DER of a PEM root certificate file; a ConfigError names the file otherwise."""
    try:
        return attestation.load_pem_root(Path(path))
    except AttestationError as exc:
        raise ConfigError(f"{path} is not a readable PEM certificate") from exc


def load_expected_pcrs(path: str | Path) -> dict[int, bytes]:
    """The PCRs in FILE: nitro-cli's `{"Measurements": {"HashAlgorithm": ..., "PCR0": hex, ...}}`
    (from build-enclave or describe-eif) or a plain `{"PCR0": hex, ...}`."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_PCR_FILE + 1)
        if len(raw) > MAX_PCR_FILE:
            raise ConfigError(f"{path} is too large to be a measurements file")
        obj = json.loads(raw)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not JSON") from exc
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    # describe-eif prints more than Measurements beside it; only Measurements is read then.
    measurements = obj["Measurements"] if "Measurements" in obj else obj
    if not isinstance(measurements, dict):
        raise ConfigError(f"{path}: Measurements must be an object")
    pcrs: dict[int, bytes] = {}
    for name, value in measurements.items():
        if name == "HashAlgorithm":
            if not isinstance(value, str) or "384" not in value:
                raise ConfigError(f"{path}: HashAlgorithm must be SHA-384 (nitro-cli's Sha384)")
            continue
        match = _PCR_KEY.match(name)
        # A misspelt key silently ignored would weaken the check: refuse it instead.
        if match is None or int(match.group(1)) >= attestation.MAX_PCRS:
            raise ConfigError(f"{path}: unknown key {name!r} (expected PCR0 ... PCR31)")
        try:
            digest = bytes.fromhex(value) if isinstance(value, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 48:
            raise ConfigError(f"{path}: {name} must be 96 hex digits (SHA-384)")
        pcrs[int(match.group(1))] = digest
    if not pcrs:
        raise ConfigError(f"{path} names no PCR")
    return pcrs


def read_document_file(path: str | Path) -> bytes:
    """A saved document: raw COSE bytes, or the JSON body of /v1/attestation."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_DOCUMENT_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from exc
    if len(raw) > MAX_DOCUMENT_FILE:
        raise ConfigError(f"{path} is too large to be an attestation document")
    # A COSE_Sign1 starts with 0xd2 (tag 18) or 0x84 (an array of 4); JSON with `{`.
    if raw.lstrip()[:1] == b"{":
        try:
            return document_from_json(json.loads(raw))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is neither CBOR nor JSON") from exc
        except AttestationError as exc:
            raise ConfigError(f"{path}: {exc.detail}") from exc
    return raw


def document_from_json(obj: Any) -> bytes:
    """The document in `{"document": "<base64>"}` (the body of GET /v1/attestation)."""
    if (
        not isinstance(obj, dict)
        or set(obj) != {"document"}
        or not isinstance(obj["document"], str)
    ):
        raise AttestationError("response", 'the answer must be {"document": "<base64>"}')
    try:
        data = base64.b64decode(obj["document"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AttestationError("response", "the document is not valid base64") from exc
    if not data:
        raise AttestationError("response", "the document is empty")
    return data


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


# ---- before the first question ---------------------------------------------------------------


@dataclass(frozen=True)
class EnclaveExpectation:
    """What the client demands of the enclave behind the proxy before it sends anything."""

    root: bytes  # DER of the pinned root (AWS's in production)
    pcrs: Mapping[int, bytes]
    allow_debug: bool = False
    max_age: timedelta = MAX_AGE
    check_key_policy: bool = True

    def policy(self, nonce: bytes) -> AttestationPolicy:
        return AttestationPolicy(
            root=self.root,
            pcrs=dict(self.pcrs),
            nonce=nonce,
            max_age=self.max_age,
            allow_debug=self.allow_debug,
        )


@dataclass(frozen=True)
class VerifiedEnclave:
    """A document that passed, and what was (or could not be) said about the key policy."""

    document: AttestationDocument
    pcrs_checked: tuple[int, ...]
    key_policy_checked: bool
    warnings: tuple[str, ...] = field(default=())


def verify_enclave(
    fetch_document: Callable[[bytes], bytes],
    expectation: EnclaveExpectation,
    *,
    kms: Any = None,
    key_id: str | None = None,
) -> VerifiedEnclave:
    """Fetch a fresh document with a new nonce and verify it; then, where the caller may read
    it, check the key policy. Raises AttestationError or KeyPolicyError (each with `check`)."""
    nonce = new_nonce()
    document = attestation.verify(fetch_document(nonce), expectation.policy(nonce))
    checked = tuple(sorted(expectation.pcrs))
    if not expectation.check_key_policy or kms is None or key_id is None:
        return VerifiedEnclave(document, checked, key_policy_checked=False)
    policy_text, why_not = _get_key_policy(kms, key_id)
    if policy_text is None:
        warning = f"the key policy could not be checked: {why_not}"
        return VerifiedEnclave(document, checked, key_policy_checked=False, warnings=(warning,))
    try:
        policy = json.loads(policy_text)
        check_key_policy(policy, key_id, document, expectation.pcrs)
    except (ValueError, key_policy.PolicyError) as exc:
        # Something the evaluator cannot read (an operator it does not know, say): say so.
        warning = f"the key policy could not be checked: {str(exc)[:200]}"
        return VerifiedEnclave(document, checked, key_policy_checked=False, warnings=(warning,))
    return VerifiedEnclave(document, checked, key_policy_checked=True)


def _get_key_policy(kms: Any, key_id: str) -> tuple[str | None, str]:
    """(the policy text, "") or (None, why it could not be read)."""
    from botocore import exceptions as boto_errors

    try:
        reply = kms.get_key_policy(KeyId=key_id, PolicyName="default")
    except boto_errors.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", "unknown"))[:100]
        if code == "AccessDeniedException":
            return None, f"GetKeyPolicy was refused ({code}); the key's owner can grant it"
        # An alias, for one: GetKeyPolicy takes only a key id or key ARN.
        return None, f"GetKeyPolicy failed ({code}); give --key-id as the key's ARN"
    except boto_errors.BotoCoreError as exc:
        return None, f"GetKeyPolicy failed ({type(exc).__name__})"
    text = reply.get("Policy") if isinstance(reply, dict) else None
    if not isinstance(text, str):
        return None, "GetKeyPolicy returned no policy"
    return text, ""


# ---- the key policy --------------------------------------------------------------------------


def check_key_policy(
    policy: Mapping[str, Any],
    key_arn: str,
    document: AttestationDocument,
    expected: Mapping[int, bytes],
) -> None:
    """Probe `policy` as KMS would evaluate it; KeyPolicyError unless it admits kms:Decrypt only
    to an enclave with the expected PCRs.

    With the verified document's attestation, some principal must be able to Decrypt. With
    another image (the application changed: PCR0 and PCR2; the runtime: PCR0 and PCR1; each
    other expected non-zero PCR alone), a debug-mode enclave, or no attestation at all, no
    principal named in the policy nor an arbitrary one may Decrypt; without attestation none
    may ReEncryptFrom or CreateGrant either. PolicyError when the policy cannot be evaluated.
    """
    key_policy.validate_policy(policy)
    resource = key_arn if key_arn.startswith("arn:") else "*"
    principals = _probe_principals(policy, key_policy.account_of(key_arn))
    attested = _attestation_context(document.pcrs)

    def who_may(action: str, attestation_keys: Mapping[str, str]) -> list[str]:
        return [
            arn
            for arn in principals
            if key_policy.evaluate(
                policy,
                principal_arn=arn,
                action=action,
                context={**_caller_context(arn), **attestation_keys},
                resource=resource,
            ).allowed
        ]

    if not who_may(_DECRYPT, attested):
        raise KeyPolicyError(
            "no principal may Decrypt even from the verified enclave: the policy pins other "
            "PCRs than this enclave's, so the key would never be released to it"
        )
    for what, pcrs in _other_enclaves(document.pcrs, expected):
        allowed = who_may(_DECRYPT, _attestation_context(pcrs))
        if allowed:
            raise KeyPolicyError(f"{allowed[0]} may Decrypt from {what}")
    for action in _RELEASING_ACTIONS:
        allowed = who_may(action, {})
        if allowed:
            raise KeyPolicyError(f"{allowed[0]} may {action} without any attestation")


def _other_enclaves(
    pcrs: Mapping[int, bytes], expected: Mapping[int, bytes]
) -> list[tuple[str, dict[int, bytes]]]:
    """(what, PCRs) of the enclaves that must not obtain the key."""

    def altered(indexes: Iterable[int]) -> dict[int, bytes]:
        out = dict(pcrs)
        for index in indexes:
            out[index] = hashlib.sha384(b"another image" + out.get(index, b"")).digest()
        return out

    # An unused (zero) PCR has nothing to pin; the document check already compared it.
    pinned = {index for index, value in expected.items() if value != _ZERO_PCR}
    probes = []
    for what, indexes in (
        ("another application (PCR0 and PCR2 differ)", {0, 2}),
        ("another runtime (PCR0 and PCR1 differ)", {0, 1}),
    ):
        if indexes & pinned:
            probes.append((what, altered(indexes & pinned)))
    for index in sorted(pinned - {0, 1, 2}):
        probes.append((f"an enclave whose PCR{index} differs", altered([index])))
    debug = {**pcrs, 0: _ZERO_PCR, 1: _ZERO_PCR, 2: _ZERO_PCR}
    probes.append(("a debug-mode enclave (PCR0-2 zero, memory readable)", debug))
    return probes


def _attestation_context(pcrs: Mapping[int, bytes]) -> dict[str, str]:
    """The condition keys KMS derives from a Recipient attestation document."""
    keys = {f"kms:RecipientAttestation:PCR{index}": value.hex() for index, value in pcrs.items()}
    if 0 in pcrs:
        keys["kms:RecipientAttestation:ImageSha384"] = pcrs[0].hex()
    return keys


def _caller_context(arn: str) -> dict[str, Any]:
    account = key_policy.account_of(arn) or ""
    # An encryption context as the enclave's Decrypt carries it (the conditions may name it).
    session = envelope.b64url(bytes(envelope.SESSION_BYTES))
    return {
        "aws:PrincipalArn": key_policy.role_arn_of(arn),
        "aws:PrincipalAccount": account,
        "kms:CallerAccount": account,
        "kms:EncryptionContext:app": envelope.APP,
        "kms:EncryptionContext:session": session,
        "kms:EncryptionContextKeys": ["app", "session"],
    }


def _probe_principals(policy: Mapping[str, Any], key_account: str | None) -> list[str]:
    """Every AWS principal the policy names (roles also as their sessions, accounts as their
    root and one of their roles), plus principals it does not name, here and elsewhere."""
    accounts = {_OUTSIDE_ACCOUNT}
    if key_account:
        accounts.add(key_account)
    arns: list[str] = []
    for statement in key_policy.validate_policy(policy):
        for name in ("Principal", "NotPrincipal"):
            principal = statement.get(name)
            if not isinstance(principal, Mapping):
                continue
            entries = principal.get("AWS", [])
            for entry in [entries] if isinstance(entries, str) else entries:
                if re.fullmatch(r"\d{12}", entry):
                    accounts.add(entry)
                elif entry != "*":
                    arns.append(entry)
                    account = key_policy.account_of(entry)
                    if account:
                        accounts.add(account)
    for account in sorted(accounts):
        arns += [f"arn:aws:iam::{account}:root", f"arn:aws:iam::{account}:role/{_PROBE_ROLE}"]
    sessions = []
    for arn in arns:
        role = re.fullmatch(r"arn:(aws[a-z-]*):iam::(\d{12}):role/(?:.*/)?([^/]+)", arn)
        if role:
            partition, account, name = role.groups()
            sessions.append(f"arn:{partition}:sts::{account}:assumed-role/{name}/i-probe")
    return list(dict.fromkeys(arns + sessions))


# ---- the report of `chatbot verify-attestation` ------------------------------------------------


def report(document: AttestationDocument, at: datetime) -> list[str]:
    """A readable description of a parsed (not yet trusted) document, one line per item."""
    lines = [
        "attestation document (trust none of this unless the result below is PASSED)",
        f"module id:   {printable_text(document.module_id)}",
        f"time:        {document.time.isoformat()} ({document.timestamp} ms)",
        f"digest:      {document.digest}",
        "pcrs:"
        + ("        DEBUG MODE (PCR0, PCR1 and PCR2 are zero)" if document.debug_mode else ""),
    ]
    for index in sorted(document.pcrs):
        value = document.pcrs[index]
        note = "  (zero)" if not any(value) else ""
        lines.append(f"  PCR{index:<2} {value.hex()}{note}")
    lines.append("signature:   ES384 (COSE alg -35), 96 bytes")
    count = len(document.cabundle) + 1
    lines.append(f"chain ({count} certificates, root first; validity at {at.isoformat()}):")
    for position, der in enumerate((*document.cabundle, document.certificate)):
        role = "root" if position == 0 else "leaf" if position == len(document.cabundle) else "CA"
        lines.extend(_certificate_lines(position, role, der, at))
    lines.append(f"nonce:       {document.nonce.hex() if document.nonce is not None else '(none)'}")
    lines.append(f"public key:  {_public_key_line(document.public_key)}")
    lines.append(f"user data:   {_bytes_line(document.user_data)}")
    return lines


def _certificate_lines(position: int, role: str, der: bytes, at: datetime) -> list[str]:
    try:
        cert = x509.load_der_x509_certificate(der)
        subject = cert.subject.rfc4514_string()
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    except ValueError:
        return [f"  [{position}] {role}: not a readable certificate ({len(der)} bytes)"]
    state = "valid" if start <= at <= end else "EXPIRED" if at > end else "NOT YET VALID"
    return [
        f"  [{position}] {role}: {printable_text(subject)}",
        f"      valid {start.isoformat()} to {end.isoformat()}: {state} at the check time",
        f"      sha256 {hashlib.sha256(der).hexdigest()}",
    ]


def _public_key_line(data: bytes | None) -> str:
    if data is None:
        return "(none)"
    fingerprint = hashlib.sha256(data).hexdigest()
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnicodeError):
        return f"not a DER public key ({len(data)} bytes, sha256 {fingerprint})"
    if isinstance(key, rsa.RSAPublicKey):
        kind = f"RSA-{key.key_size}"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"EC {key.curve.name}"
    elif isinstance(key, ed25519.Ed25519PublicKey):
        kind = "Ed25519"
    else:
        kind = type(key).__name__
    return f"{kind}, SubjectPublicKeyInfo sha256 {fingerprint}"


def _bytes_line(data: bytes | None) -> str:
    if data is None:
        return "(none)"
    shown = data[:64].hex()
    return f"{len(data)} bytes: {shown}{'...' if len(data) > 64 else ''}"


def printable_text(text: str) -> str:
    """Text from an untrusted document, without characters that could drive the terminal."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def parse_time(value: str, document: AttestationDocument) -> datetime:
    """`document` (its own timestamp), `now`, or an ISO 8601 time (UTC when no zone is given)."""
    if value == "document":
        return document.time
    if value == "now":
        return datetime.now(UTC)
    try:
        at = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ConfigError(f"--at must be document, now or an ISO time, not {value!r}") from exc
    return at if at.utcoffset() is not None else at.replace(tzinfo=UTC)
