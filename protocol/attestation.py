"""Nitro attestation documents: strict parsing, verification against a pinned root, and encoding.

A document is a COSE_Sign1 (RFC 9052) signed with ES384 by the NSM; docs/wire.md section 11 and
DESIGN.md "Attestation" are the contract. One `verify` serves the chatbot and the KMS emulator.

Every failure is an AttestationError whose `check` is one of the stable names in `CHECKS`
(`pcr<n>` stands for pcr0 ... pcr31): callers, tests and people can tell the failures apart.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

from protocol.errors import ErrorCode, NitroError
from protocol.strict_cbor import StrictCborError, decode_one

# Bounds. A real document is about 4.5 KiB; the per-field limits are the NSM's own (its API
# refuses larger public_key/user_data/nonce, and its CDDL caps certificates at 1024 bytes).
MAX_DOCUMENT_SIZE = 16 * 1024
MAX_PUBLIC_KEY_SIZE = 1024
MAX_USER_DATA_SIZE = 512
MAX_NONCE_SIZE = 512
MAX_CERT_SIZE = 1024
MAX_CABUNDLE = 8
MAX_PCRS = 32
MAX_MODULE_ID_CHARS = 256
PCR_SIZES = frozenset({32, 48, 64})
# Beyond year 9999 a timestamp cannot become a datetime; nothing real is dated there.
MAX_TIMESTAMP_MS = 253402300799999
# A document dated further ahead of the verifier's clock than this is refused as stale.
FUTURE_SKEW = timedelta(minutes=5)

COSE_TAG = 18
ES384 = -35
_SIGNATURE_SIZE = 96  # raw r || s, 48 bytes each
_FIELD_ORDER = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)
_REQUIRED = frozenset(_FIELD_ORDER[:6])
_OPTIONAL_SIZES = {
    "public_key": MAX_PUBLIC_KEY_SIZE,
    "user_data": MAX_USER_DATA_SIZE,
    "nonce": MAX_NONCE_SIZE,
}
_DEBUG_PCR = bytes(48)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Extensions this verifier understands; any other critical extension makes a certificate unusable
# (RFC 5280 4.2), since we would be ignoring a constraint its issuer meant to impose.
_KNOWN_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})

# The stable names of the checks, in the order `verify` makes them, and what each failure means.
# They are part of the interface (the CLI prints them, scripts may match on them): add, never
# rename.
CHECKS: dict[str, str] = {
    "size": "the document, or one of its fields, is larger than the NSM ever produces",
    "cbor": "the bytes are not one well-formed CBOR item (truncated, trailing bytes, "
    "indefinite lengths, duplicate keys, or a CBOR tag other than the outer COSE tag 18)",
    "format": "well-formed CBOR of the wrong shape (not a COSE_Sign1 array, a missing, unknown "
    "or mistyped field, an unprotected header, a certificate that is not DER)",
    "algorithm": "the COSE protected header does not name ES384 (alg -35)",
    "root": "the CA bundle does not start with the pinned root certificate",
    "chain": "the certificates do not chain from the root to the leaf (signature, CA "
    "constraints, key usage, path length, unknown critical extension)",
    "not_yet_valid": "a certificate is not yet valid at the verification time",
    "expired": "a certificate has expired at the verification time",
    "signature": "the COSE signature does not verify with the leaf certificate's key",
    "pcr<n>": "PCR n differs from the expected value (or is absent)",
    "debug": "the enclave runs in debug mode (PCR0, PCR1 and PCR2 all zero) and the policy "
    "does not allow it",
    "nonce": "the document does not carry the expected nonce",
    "stale": "the document is older than the maximum age, or dated in the future",
    "public_key": "the document does not carry the expected public key",
}


def describe_check(check: str) -> str:
    """What a failed check means, for a person (`pcr3` is described by the `pcr<n>` entry)."""
    if check.startswith("pcr") and check[3:].isdigit():
        return CHECKS["pcr<n>"].replace("PCR n", f"PCR{check[3:]}")
    return CHECKS.get(check, "unknown check")


class AttestationError(NitroError):
    """A document that failed a check; `check` is its name in CHECKS ("root", "pcr3"...)."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(ErrorCode.ATTESTATION_INVALID, f"{check}: {detail}")
        self.check = check


def _fail(check: str, detail: str) -> NoReturn:
    raise AttestationError(check, detail)


@dataclass(frozen=True)
class AttestationDocument:
    """A parsed document; `protected`, `payload` and `signature` are the signed COSE parts."""

    module_id: str
    digest: str
    timestamp: int  # ms since the epoch
    pcrs: dict[int, bytes]
    certificate: bytes  # DER of the leaf that signed the document
    cabundle: tuple[bytes, ...]  # DER, root first
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    protected: bytes
    payload: bytes
    signature: bytes

    @property
    def debug_mode(self) -> bool:
        """A debug-mode enclave reports PCR0, PCR1 and PCR2 as zeros (its memory is readable)."""
        return all(self.pcrs.get(index) == _DEBUG_PCR for index in (0, 1, 2))

    @property
    def time(self) -> datetime:
        return _EPOCH + timedelta(milliseconds=self.timestamp)


@dataclass(frozen=True)
class AttestationPolicy:
    """What a verifier demands of a document beyond a valid signature and chain."""

    root: bytes  # DER of the pinned root certificate
    at: datetime | None = None  # verification time (timezone-aware); None means now
    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    nonce: bytes | None = None
    max_age: timedelta | None = None
    allow_debug: bool = False
    public_key: bytes | None = None

    def __post_init__(self) -> None:
        # A policy is configuration: mistakes here are programming errors, not bad input.
        if not isinstance(self.root, bytes) or not self.root:
            raise ValueError("root must be the DER bytes of a certificate")
        if self.at is not None and self.at.utcoffset() is None:
            raise ValueError("at must be a timezone-aware datetime")
        for index, value in self.pcrs.items():
            if not isinstance(index, int) or not isinstance(value, bytes):
                raise ValueError("pcrs must map int indexes to bytes")
        if self.max_age is not None and self.max_age < timedelta(0):
            raise ValueError("max_age must not be negative")


# ---- parsing ---------------------------------------------------------------------------------


def _cbor_loads(data: bytes, what: str) -> Any:
    """Decode exactly one definite-length, tag-free CBOR item filling `data`."""
    try:
        return decode_one(data)
    except StrictCborError as exc:
        raise AttestationError("cbor", f"{what} is not strict CBOR ({exc})") from exc


def _bstr(value: Any, name: str, max_size: int, min_size: int = 0) -> bytes:
    if type(value) is not bytes:
        _fail("format", f"{name} must be a byte string")
    if len(value) > max_size:
        _fail("size", f"{name} is {len(value)} bytes, more than {max_size}")
    if len(value) < min_size:
        _fail("format", f"{name} must be at least {min_size} byte(s)")
    return value


def _optional_bstr(payload: dict, name: str) -> bytes | None:
    value = payload.get(name)
    return None if value is None else _bstr(value, name, _OPTIONAL_SIZES[name])


def _parse_pcrs(value: Any) -> dict[int, bytes]:
    if type(value) is not dict or not value:
        _fail("format", "pcrs must be a non-empty map")
    if len(value) > MAX_PCRS:
        _fail("size", f"pcrs has {len(value)} entries, more than {MAX_PCRS}")
    pcrs: dict[int, bytes] = {}
    for index, digest in value.items():
        if type(index) is not int or not 0 <= index < MAX_PCRS:
            _fail("format", "a PCR index must be an integer from 0 to 31")
        if type(digest) is not bytes or len(digest) not in PCR_SIZES:
            _fail("format", f"PCR{index} must be 32, 48 or 64 bytes")
        pcrs[index] = digest
    return pcrs


def _from_parts(
    protected: Any, unprotected: Any, payload: Any, signature: Any
) -> AttestationDocument:
    protected = _bstr(protected, "protected header", 64, 1)
    header = _cbor_loads(protected, "protected header")
    if type(header) is not dict or any(type(label) is not int for label in header):
        _fail("format", "the protected header must be a map with integer labels")
    if type(header.get(1)) is not int or header[1] != ES384:
        _fail("algorithm", "the protected header must name ES384 (alg -35)")
    if len(header) != 1:
        _fail("format", "the protected header has fields other than alg")
    # Unprotected headers are not signed; the NSM sends none, and none would be trusted.
    if type(unprotected) is not dict or unprotected:
        _fail("format", "the unprotected header must be an empty map")
    signature = _bstr(signature, "signature", _SIGNATURE_SIZE, _SIGNATURE_SIZE)
    payload = _bstr(payload, "payload", MAX_DOCUMENT_SIZE, 1)

    fields = _cbor_loads(payload, "payload")
    if type(fields) is not dict:
        _fail("format", "the payload must be a map")
    unknown = set(fields) - set(_FIELD_ORDER)
    if unknown:
        _fail("format", f"the payload has {len(unknown)} unknown field(s)")
    missing = _REQUIRED - set(fields)
    if missing:
        _fail("format", f"the payload lacks {', '.join(sorted(missing))}")

    module_id = fields["module_id"]
    if type(module_id) is not str or not module_id:
        _fail("format", "module_id must be a non-empty text string")
    if len(module_id) > MAX_MODULE_ID_CHARS:
        _fail("size", f"module_id is longer than {MAX_MODULE_ID_CHARS} characters")
    if fields["digest"] != "SHA384" or type(fields["digest"]) is not str:
        _fail("format", 'digest must be "SHA384"')
    timestamp = fields["timestamp"]
    if type(timestamp) is not int or not 0 <= timestamp <= MAX_TIMESTAMP_MS:
        _fail("format", "timestamp must be an unsigned integer of milliseconds")
    cabundle = fields["cabundle"]
    if type(cabundle) is not list or not cabundle:
        _fail("format", "cabundle must be a non-empty array of certificates")
    if len(cabundle) > MAX_CABUNDLE:
        _fail("size", f"cabundle has {len(cabundle)} certificates, more than {MAX_CABUNDLE}")

    return AttestationDocument(
        module_id=module_id,
        digest="SHA384",
        timestamp=timestamp,
        pcrs=_parse_pcrs(fields["pcrs"]),
        certificate=_bstr(fields["certificate"], "certificate", MAX_CERT_SIZE, 1),
        cabundle=tuple(_bstr(c, "cabundle entry", MAX_CERT_SIZE, 1) for c in cabundle),
        # The NSM always sends these three (null when unset); its CDDL also allows omitting them.
        public_key=_optional_bstr(fields, "public_key"),
        user_data=_optional_bstr(fields, "user_data"),
        nonce=_optional_bstr(fields, "nonce"),
        protected=protected,
        payload=payload,
        signature=signature,
    )


def parse(data: bytes) -> AttestationDocument:
    """Parse a COSE_Sign1 document, tagged (18) or not; anything malformed is AttestationError.

    Parsing checks shape only: nothing in the result is trustworthy until `verify` passes.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        _fail("format", "the document must be bytes")
    data = bytes(data)
    if len(data) > MAX_DOCUMENT_SIZE:
        _fail("size", f"the document is {len(data)} bytes, more than {MAX_DOCUMENT_SIZE}")
    if not data:
        _fail("cbor", "the document is empty")
    # Tag 18 (one byte, 0xd2) is the only tag accepted anywhere; strip it by hand so that the
    # decoder can refuse every tag.
    if data[0] == 0xD2:
        data = data[1:]
    outer = _cbor_loads(data, "the document")
    if type(outer) is not list or len(outer) != 4:
        _fail("format", "the document must be a COSE_Sign1 array of 4 items")
    return _from_parts(*outer)


# ---- verification ----------------------------------------------------------------------------


def _load_certificates(document: AttestationDocument) -> list[x509.Certificate]:
    chain = [*document.cabundle, document.certificate]
    try:
        return [x509.load_der_x509_certificate(der) for der in chain]
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise AttestationError("format", "a certificate is not valid DER") from exc


def _extension(cert: x509.Certificate, kind: type) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_chain(certs: list[x509.Certificate]) -> None:
    """Walk root -> intermediates -> leaf: signatures, CA constraints, key usage, path length."""
    try:
        for position, cert in enumerate(certs):
            for ext in cert.extensions:
                if ext.critical and ext.oid not in _KNOWN_CRITICAL:
                    _fail("chain", f"certificate {position} has an unknown critical extension")
        for position, (issuer, subject) in enumerate(zip(certs, certs[1:], strict=False)):
            constraints = _extension(issuer, x509.BasicConstraints)
            usage = _extension(issuer, x509.KeyUsage)
            if constraints is None or not constraints.ca:
                _fail("chain", f"certificate {position} is not a CA")
            if usage is None or not usage.key_cert_sign:
                _fail("chain", f"certificate {position} may not sign certificates")
            # CA certificates that follow this issuer, not counting the leaf (RFC 5280 4.2.1.9).
            below = len(certs) - position - 2
            if constraints.path_length is not None and below > constraints.path_length:
                _fail("chain", f"certificate {position} allows a path of {constraints.path_length}")
            try:
                subject.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
                raise AttestationError(
                    "chain", f"certificate {position + 1} is not issued by certificate {position}"
                ) from exc
        usage = _extension(certs[-1], x509.KeyUsage)
        if usage is None or not usage.digital_signature:
            _fail("chain", "the leaf certificate may not sign")
    # cryptography parses extensions lazily: a malformed or repeated one raises here.
    except (ValueError, x509.DuplicateExtension) as exc:
        raise AttestationError("chain", "a certificate has a malformed extension") from exc


def _check_validity(certs: list[x509.Certificate], at: datetime) -> None:
    for position, cert in enumerate(certs):
        if at < cert.not_valid_before_utc:
            _fail(
                "not_yet_valid", f"certificate {position} is valid from {cert.not_valid_before_utc}"
            )
        if at > cert.not_valid_after_utc:
            _fail("expired", f"certificate {position} expired at {cert.not_valid_after_utc}")


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The bytes an ES384 COSE_Sign1 signature covers (RFC 9052 4.4), no external AAD."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def _check_signature(document: AttestationDocument, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        _fail("signature", "the leaf key is not a P-384 key")
    half = _SIGNATURE_SIZE // 2
    r = int.from_bytes(document.signature[:half], "big")
    s = int.from_bytes(document.signature[half:], "big")
    try:
        key.verify(
            encode_dss_signature(r, s),
            sig_structure(document.protected, document.payload),
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature as exc:
        raise AttestationError("signature", "the document's signature does not verify") from exc


def _check_policy(document: AttestationDocument, policy: AttestationPolicy, at: datetime) -> None:
    for index in sorted(policy.pcrs):
        expected = policy.pcrs[index]
        got = document.pcrs.get(index)
        if got is None or not hmac.compare_digest(got, expected):
            shown = got.hex() if got is not None else "absent"
            _fail(f"pcr{index}", f"PCR{index} is {shown}, the policy expects {expected.hex()}")
    if document.debug_mode and not policy.allow_debug:
        _fail("debug", "the enclave runs in debug mode (PCR0-2 are zero), which is not allowed")
    if policy.nonce is not None and (
        document.nonce is None or not hmac.compare_digest(document.nonce, policy.nonce)
    ):
        _fail("nonce", "the document does not carry the expected nonce")
    if policy.max_age is not None:
        if document.time < at - policy.max_age:
            _fail("stale", f"the document is from {document.time}, older than {policy.max_age}")
        if document.time > at + FUTURE_SKEW:
            _fail("stale", f"the document is dated in the future ({document.time})")
    if policy.public_key is not None and (
        document.public_key is None
        or not hmac.compare_digest(document.public_key, policy.public_key)
    ):
        _fail("public_key", "the document does not carry the expected public key")


def verify(document: bytes | AttestationDocument, policy: AttestationPolicy) -> AttestationDocument:
    """Verify a document against a pinned root and a policy; returns it or raises AttestationError.

    Checks, in order: size/cbor/format/algorithm (parsing), root, chain, not_yet_valid/expired,
    signature, then the policy (pcr<n>, debug, nonce, stale, public_key). The first failure
    raises; `AttestationError.check` names it (see CHECKS).
    """
    if isinstance(document, AttestationDocument):
        # Re-derive every field from the signed bytes: the object's fields could disagree.
        parsed = _from_parts(document.protected, {}, document.payload, document.signature)
    else:
        parsed = parse(document)
    at = policy.at if policy.at is not None else datetime.now(UTC)
    certs = _load_certificates(parsed)
    if parsed.cabundle[0] != policy.root:
        _fail("root", "the document's CA bundle does not start with the pinned root")
    _check_chain(certs)
    _check_validity(certs, at)
    _check_signature(parsed, certs[-1])
    _check_policy(parsed, policy, at)
    return parsed


def load_pem_root(path_or_pem: str | Path | bytes) -> bytes:
    """The DER of a PEM root certificate, given as PEM bytes/text or as a file path."""
    try:
        if isinstance(path_or_pem, bytes):
            pem = path_or_pem
        elif isinstance(path_or_pem, str) and path_or_pem.lstrip().startswith("-----BEGIN"):
            pem = path_or_pem.encode("ascii")
        else:
            pem = Path(path_or_pem).read_bytes()
        return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    except (OSError, ValueError, UnicodeError) as exc:
        raise AttestationError("root", "the root certificate could not be read as PEM") from exc


# ---- encoding (the NSM emulator and tests) ---------------------------------------------------


def encode_document(
    fields: Mapping[str, Any],
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    tagged: bool = False,
) -> bytes:
    """Sign `fields` as the NSM does: ES384 COSE_Sign1, protected {1: -35}, unprotected {}.

    Fields go in the NSM's order; public_key, user_data and nonce default to null. Nothing is
    validated here (tests use this to build bad documents): `parse` and `verify` are the judges.
    """
    if not isinstance(signing_key.curve, ec.SECP384R1):
        raise ValueError("the signing key must be a P-384 key")
    payload_map: dict[Any, Any] = {}
    for name in _FIELD_ORDER:
        if name in fields:
            payload_map[name] = fields[name]
        elif name in _OPTIONAL_SIZES:
            payload_map[name] = None
    for name, value in fields.items():  # unknown fields (tests) go after the known ones
        payload_map.setdefault(name, value)
    protected = cbor2.dumps({1: ES384})
    payload = cbor2.dumps(payload_map)
    der = signing_key.sign(sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    half = _SIGNATURE_SIZE // 2
    signature = r.to_bytes(half, "big") + s.to_bytes(half, "big")
    cose = [protected, {}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(COSE_TAG, cose) if tagged else cose)
