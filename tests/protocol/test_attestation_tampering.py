"""Tampering, case by case: each altered document is refused, and by its own named check.

Documents are real ES384 COSE_Sign1 signed by the NSM emulator's CA (emulator/ca.py LocalCA);
the real AWS document is one of the fixtures. Each case starts from a document and a policy that
verify (checked by `test_the_untampered_document_verifies`) and changes one thing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from emulator.ca import LocalCA
from protocol import attestation
from protocol.attestation import AttestationError, AttestationPolicy
from protocol.errors import ErrorCode

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
REAL_DOC = (TESTDATA / "nitro-attestation-debug-2024-09.cbor").read_bytes()
AWS_ROOT = attestation.load_pem_root(TESTDATA / "aws-nitro-enclaves-root-g1.pem")
REAL_TIME = datetime(2024, 9, 17, 0, 47, 59, 695000, tzinfo=UTC)

# The verification time: reset when the CAs are made (the `pki` fixture), because their
# certificates are backdated by minutes only and collection may run long before this module.
NOW = datetime.now(UTC)
NOW_MS = int(NOW.timestamp() * 1000)
NONCE = bytes(range(32))
MAX_AGE = timedelta(minutes=5)
PCRS = {i: hashlib.sha384(f"measured PCR{i}".encode()).digest() for i in (0, 1, 2, 3, 4)}
PCRS |= {i: bytes(48) for i in range(5, 16)}  # unused PCRs are zero, PCR8 too (unsigned image)
EXPECTED = {i: PCRS[i] for i in (0, 1, 2)}


@dataclass(frozen=True)
class Pki:
    ca: LocalCA
    other: LocalCA  # another emulator's CA: same names, other keys
    enclave_key: bytes  # DER SubjectPublicKeyInfo, as the enclave puts it in documents


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("ca")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    spki = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    made = Pki(LocalCA.load_or_create(base / "ca"), LocalCA.load_or_create(base / "other"), spki)
    made.ca.leaf(), made.other.leaf()  # issued now, before the clock below
    global NOW, NOW_MS
    NOW = datetime.now(UTC)
    NOW_MS = int(NOW.timestamp() * 1000)
    return made


def fields(pki: Pki, **overrides: Any) -> dict[str, Any]:
    certificate, _key, cabundle = pki.ca.leaf()
    base = {
        "module_id": "i-00000000000000000-enc0123456789abcdef",
        "digest": "SHA384",
        "timestamp": NOW_MS,
        "pcrs": dict(PCRS),
        "certificate": certificate,
        "cabundle": cabundle,
        "public_key": pki.enclave_key,
        "user_data": None,
        "nonce": NONCE,
    }
    return {**base, **overrides}


def document(pki: Pki, *, key: ec.EllipticCurvePrivateKey | None = None, **overrides: Any) -> bytes:
    return attestation.encode_document(fields(pki, **overrides), key or pki.ca.leaf()[1])


def policy(pki: Pki, **overrides: Any) -> AttestationPolicy:
    base = AttestationPolicy(
        root=pki.ca.root_der,
        at=NOW,
        pcrs=EXPECTED,
        nonce=NONCE,
        max_age=MAX_AGE,
        public_key=pki.enclave_key,
    )
    return replace(base, **overrides)


def cose_sign1(protected: bytes, payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A COSE_Sign1 with any protected header, validly signed (so only the header is wrong)."""
    der = key.sign(attestation.sig_structure(protected, payload), ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return cbor2.dumps([protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")])


def with_part(data: bytes, index: int, value: Any) -> bytes:
    parts = cbor2.loads(data)
    parts[index] = value
    return cbor2.dumps(parts)


def flip_last_signature_byte(data: bytes) -> bytes:
    parts = cbor2.loads(data)
    parts[3] = parts[3][:-1] + bytes([parts[3][-1] ^ 0x01])
    return cbor2.dumps(parts)


def other_alg(pki: Pki, alg: Any) -> bytes:
    _protected, _unprotected, payload, _sig = cbor2.loads(document(pki))
    return cose_sign1(cbor2.dumps({1: alg}), payload, pki.ca.leaf()[1])


def chain_with_foreign_intermediate(pki: Pki) -> bytes:
    root, _foreign_intermediate = pki.ca.cabundle()[0], pki.other.cabundle()[1]
    return document(pki, cabundle=[root, _foreign_intermediate])


def foreign_leaf(pki: Pki) -> bytes:
    certificate, key, _bundle = pki.other.leaf()
    return document(pki, certificate=certificate, key=key)


def debug_document(pki: Pki) -> bytes:
    return document(pki, pcrs={**PCRS, 0: bytes(48), 1: bytes(48), 2: bytes(48)})


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Pki], tuple[bytes, AttestationPolicy]]
    check: str


def doc_case(name: str, check: str, build_doc: Callable[[Pki], bytes], **policy_changes: Any):
    return Case(name, lambda pki: (build_doc(pki), policy(pki, **policy_changes)), check)


def policy_case(name: str, check: str, change: Callable[[Pki], dict[str, Any]]) -> Case:
    return Case(name, lambda pki: (document(pki), policy(pki, **change(pki))), check)


CASES = [
    # Signature and chain.
    doc_case(
        "flipped signature byte", "signature", lambda p: flip_last_signature_byte(document(p))
    ),
    doc_case(
        "signed by a key other than the leaf's",
        "signature",
        lambda p: document(p, key=p.other.leaf()[1]),
    ),
    doc_case(
        "payload altered after signing",
        "signature",
        lambda p: with_part(document(p), 2, cbor2.dumps(fields(p, nonce=b"x" * 32))),
    ),
    policy_case("another pinned root", "root", lambda p: {"root": p.other.root_der}),
    policy_case("the real AWS root pinned", "root", lambda p: {"root": AWS_ROOT}),
    doc_case(
        "whole chain from another CA", "root", lambda p: document(p, cabundle=p.other.cabundle())
    ),
    doc_case("intermediate from another CA", "chain", chain_with_foreign_intermediate),
    doc_case("leaf from another CA", "chain", foreign_leaf),
    doc_case("intermediate missing", "chain", lambda p: document(p, cabundle=p.ca.cabundle()[:1])),
    # Validity in time (the emulator's leaf lives three hours, like AWS's).
    policy_case(
        "verified after the leaf expired", "expired", lambda p: {"at": NOW + timedelta(hours=4)}
    ),
    policy_case(
        "verified before the leaf's validity",
        "not_yet_valid",
        lambda p: {"at": NOW - timedelta(hours=1)},
    ),
    # The policy.
    policy_case("another nonce expected", "nonce", lambda p: {"nonce": bytes(32)}),
    doc_case("no nonce in the document", "nonce", lambda p: document(p, nonce=None)),
    doc_case(
        "older than the maximum age", "stale", lambda p: document(p, timestamp=NOW_MS - 600_000)
    ),
    doc_case("dated in the future", "stale", lambda p: document(p, timestamp=NOW_MS + 600_000)),
    *[
        doc_case(
            f"PCR{n} altered", f"pcr{n}", lambda p, n=n: document(p, pcrs={**PCRS, n: bytes(48)})
        )
        for n in (0, 1, 2)
    ],
    policy_case(
        "PCR8 expected (a signed image), absent from an unsigned one",
        "pcr8",
        lambda p: {"pcrs": {**EXPECTED, 8: b"\x08" * 48}},
    ),
    policy_case(
        "PCR3 (the parent's role) expected otherwise", "pcr3", lambda p: {"pcrs": {3: bytes(48)}}
    ),
    doc_case("debug mode refused", "debug", debug_document, pcrs={}),
    doc_case("another public key", "public_key", lambda p: document(p, public_key=b"\x30" * 294)),
    doc_case("no public key", "public_key", lambda p: document(p, public_key=None)),
    # Bytes and shape.
    doc_case("truncated CBOR", "cbor", lambda p: document(p)[:-7]),
    doc_case("truncated to its first byte", "cbor", lambda p: document(p)[:1]),
    doc_case("trailing bytes", "cbor", lambda p: document(p) + b"\x00"),
    doc_case("ES256 in the protected header", "algorithm", lambda p: other_alg(p, -7)),
    doc_case("ES512 in the protected header", "algorithm", lambda p: other_alg(p, -36)),
    doc_case(
        "unprotected header added", "format", lambda p: with_part(document(p), 1, {4: b"kid"})
    ),
    doc_case("oversized user_data", "size", lambda p: document(p, user_data=b"u" * 513)),
    doc_case("oversized nonce", "size", lambda p: document(p, nonce=b"n" * 513)),
    doc_case("oversized public_key", "size", lambda p: document(p, public_key=b"k" * 1025)),
    doc_case("oversized certificate", "size", lambda p: document(p, certificate=b"\x30" * 1025)),
    doc_case("oversized document", "size", lambda p: document(p) + b"\x00" * (16 * 1024)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_tampering_is_refused_by_its_own_check(pki: Pki, case: Case) -> None:
    data, tampered_policy = case.build(pki)
    with pytest.raises(AttestationError) as info:
        attestation.verify(data, tampered_policy)
    assert info.value.code is ErrorCode.ATTESTATION_INVALID
    assert info.value.check == case.check, str(info.value)
    assert attestation.describe_check(case.check) != "unknown check"


def test_the_table_is_large_and_names_every_check() -> None:
    assert len(CASES) >= 15
    named = {"pcr<n>" if c.check.startswith("pcr") else c.check for c in CASES}
    assert named == set(attestation.CHECKS)


def test_the_untampered_document_verifies(pki: Pki) -> None:
    verified = attestation.verify(document(pki), policy(pki))
    assert verified.pcrs == PCRS and verified.nonce == NONCE
    assert verified.public_key == pki.enclave_key and not verified.debug_mode
    # The debug document is refused only for being debug: allowed, it verifies.
    assert attestation.verify(debug_document(pki), policy(pki, pcrs={}, allow_debug=True))


@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "tag 18"])
def test_tagged_and_untagged_forms_are_both_accepted(pki: Pki, tagged: bool) -> None:
    data = attestation.encode_document(fields(pki), pki.ca.leaf()[1], tagged=tagged)
    assert (data[:1] == b"\xd2") is tagged
    assert attestation.verify(data, policy(pki)).nonce == NONCE


def test_another_tag_than_18_is_refused(pki: Pki) -> None:
    data = cbor2.dumps(cbor2.CBORTag(98, cbor2.loads(document(pki))))  # COSE_Sign, not Sign1
    with pytest.raises(AttestationError) as info:
        attestation.verify(data, policy(pki))
    assert info.value.check == "cbor"


# ---- the real AWS document ---------------------------------------------------------------------


@pytest.mark.parametrize("tagged", [False, True], ids=["untagged", "tag 18"])
def test_real_aws_document_verifies_at_its_own_time(tagged: bool) -> None:
    data = b"\xd2" + REAL_DOC if tagged else REAL_DOC
    real = attestation.parse(REAL_DOC)
    at = AttestationPolicy(
        root=AWS_ROOT, at=REAL_TIME, allow_debug=True, nonce=real.nonce, max_age=MAX_AGE
    )
    assert attestation.verify(data, at).module_id == "i-0bbf1bfe232b8c2ce-enc0191fc27458c1d41"


@pytest.mark.parametrize(
    ("name", "changes", "check"),
    [
        ("now: its leaf expired in 2024", {"at": None}, "expired"),
        ("debug mode, not allowed", {"allow_debug": False}, "debug"),
        (
            "its own time, but five minutes is long gone",
            {"at": REAL_TIME + timedelta(hours=1)},
            "stale",
        ),
        ("a root that is not AWS's", {"root": b"not the AWS root"}, "root"),
        ("another nonce", {"nonce": b"another nonce"}, "nonce"),
        ("PCR0 of a production image", {"pcrs": {0: b"\x01" * 48}}, "pcr0"),
    ],
)
def test_real_aws_document_fails_each_way(name: str, changes: dict[str, Any], check: str) -> None:
    real = attestation.parse(REAL_DOC)
    base = AttestationPolicy(
        root=AWS_ROOT, at=REAL_TIME, allow_debug=True, nonce=real.nonce, max_age=MAX_AGE
    )
    with pytest.raises(AttestationError) as info:
        attestation.verify(REAL_DOC, replace(base, **changes))
    assert info.value.check == check, name
