"""A malicious parent lies about the enclave: a client that verifies before it speaks refuses
every substituted or altered attestation document (`attestation_invalid`, naming the failed
check) and sends nothing; the enclave refuses to attest a key the parent chose.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from emulator.ca import LocalCA
from emulator.measure import measure
from emulator.nsm_server import NsmEmulator
from protocol import attestation
from protocol import nsm as nsm_messages
from protocol.errors import ErrorCode
from protocol.messages import Kind

from .conftest import QUESTION, Stack, assert_code, raised, short
from .relay import Enclave, HttpAnswer, Incoming, rendered

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Forgers:
    """What a parent can get signed besides the real enclave's documents."""

    old_document: bytes  # the real enclave's, from an earlier request with another nonce
    other_image: NsmEmulator  # the same (trusted) root, another enclave image
    debug_mode: NsmEmulator  # the same root and image, run in debug mode
    other_root: NsmEmulator  # the very PCRs expected, signed under a root of the parent's own
    parent_key: bytes  # a public key the parent holds the private half of


@pytest.fixture(scope="module")
def forgers(adversary: Stack, tmp_path_factory: pytest.TempPathFactory) -> Forgers:
    paths = adversary.paths
    reply = adversary.enclave.attest({"nonce": "ee" * 32})
    old = base64.b64decode(reply.bodies[0]["document"])
    # Another image: the same code and model with another measured configuration (PCR2).
    config = json.loads(paths.enclave_config.read_text())
    config["key_ids"].append(config["key_ids"][0].rsplit("/", 1)[0] + "/parents-own-key")
    other_config = tmp_path_factory.mktemp("other-image") / "enclave.json"
    other_config.write_text(json.dumps(config))
    app = Path(__file__).resolve().parents[2]
    other_pcrs = measure(app, other_config, adversary.model_dir)
    assert other_pcrs[2] != adversary.pcrs[2]
    trusted_ca = LocalCA.load_or_create(paths.ca_dir)
    parents_ca = LocalCA.load_or_create(tmp_path_factory.mktemp("parents-ca"))
    expected = dict(adversary.pcrs)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return Forgers(
        old_document=old,
        other_image=NsmEmulator(trusted_ca, lambda: other_pcrs),
        debug_mode=NsmEmulator(trusted_ca, lambda: expected, debug_mode=True),
        other_root=NsmEmulator(parents_ca, lambda: expected),
        parent_key=key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )


def signed_by(nsm: NsmEmulator, nonce: str | None, public_key: bytes) -> bytes:
    """A document from `nsm` (a COSE_Sign1 it really signs) with the client's nonce."""
    request = nsm_messages.AttestationRequest(
        nonce=bytes.fromhex(nonce) if nonce else None, public_key=public_key
    )
    response = nsm.answer(request)
    assert isinstance(response, nsm_messages.AttestationResponse)
    return response.document


def _document(reply_body: dict[str, str]) -> bytes:
    return base64.b64decode(reply_body["document"])


def _answer(document: bytes) -> HttpAnswer:
    return HttpAnswer.of_json({"document": base64.b64encode(document).decode()})


def _real(incoming: Incoming, enclave: Enclave) -> bytes:
    """The real enclave's fresh document for the client's nonce."""
    reply = enclave.attest({"nonce": incoming.nonce})
    assert reply.status == 200
    return _document(reply.bodies[0])


def _flip_in_signature(document: bytes) -> bytes:
    return document[:-1] + bytes([document[-1] ^ 0x01])


def _flip_in_payload_nonce(document: bytes, nonce: str) -> bytes:
    """One bit of the nonce inside the signed payload (the structure stays well-formed)."""
    at = document.index(bytes.fromhex(nonce))
    return document[:at] + bytes([document[at] ^ 0x01]) + document[at + 1 :]


def _flip_alg(document: bytes) -> bytes:
    """ES384 (-35) in the protected header becomes -36; the signature no longer matters."""
    cose = cbor2.loads(document)
    sign1 = cose.value if isinstance(cose, cbor2.CBORTag) else cose
    protected = bytearray(sign1[0])
    protected[-1] ^= 0x01
    return cbor2.dumps(cbor2.CBORTag(18, [bytes(protected), *sign1[1:]]))


Substitute = Callable[[Incoming, Enclave, Forgers], HttpAnswer]
SUBSTITUTIONS: list[tuple[str, Substitute, str]] = [
    ("an-old-document", lambda i, e, f: _answer(f.old_document), "nonce"),
    (
        "a-document-without-nonce",
        lambda i, e, f: rendered(e.attest({"nonce": None})),
        "nonce",
    ),
    (
        "another-enclave-image",
        lambda i, e, f: _answer(signed_by(f.other_image, i.nonce, f.parent_key)),
        "pcr0",
    ),
    (
        "a-debug-mode-enclave",
        lambda i, e, f: _answer(signed_by(f.debug_mode, i.nonce, f.parent_key)),
        "pcr0",
    ),
    (
        "the-expected-pcrs-under-another-root",
        lambda i, e, f: _answer(signed_by(f.other_root, i.nonce, f.parent_key)),
        "root",
    ),
    (
        "a-bit-flipped-in-the-signature",
        lambda i, e, f: _answer(_flip_in_signature(_real(i, e))),
        "signature",
    ),
    (
        "a-bit-flipped-in-the-signed-nonce",
        lambda i, e, f: _answer(_flip_in_payload_nonce(_real(i, e), i.nonce or "")),
        "signature",
    ),
    (
        "a-bit-flipped-in-the-algorithm",
        lambda i, e, f: _answer(_flip_alg(_real(i, e))),
        "algorithm",
    ),
    ("not-a-document", lambda i, e, f: HttpAnswer.of_json({"document": "not base64!"}), "response"),
]


@pytest.mark.parametrize(
    ("substitute", "check"),
    [pytest.param(sub, check, id=name) for name, sub, check in SUBSTITUTIONS],
)
def test_a_substituted_attestation_document_is_refused_and_nothing_is_sent(
    adversary: Stack, forgers: Forgers, still_serving, substitute: Substitute, check: str
) -> None:
    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        assert incoming.path == "/v1/attestation", "the client spoke before it verified"
        return substitute(incoming, enclave, forgers)

    client = adversary.verifier()
    with adversary.relay.playing(play):
        error = raised(lambda: short(client.conversation()))
        asked = list(adversary.relay.requests)
    assert_code(error, ErrorCode.ATTESTATION_INVALID)
    assert error.check == check, error.detail
    assert [r.path for r in asked] == ["/v1/attestation"]  # no question, no second try
    still_serving()


def test_the_real_document_through_the_relay_passes(adversary: Stack, still_serving) -> None:
    """The baseline: the same client, an honest relay, the question answered."""
    adversary.plaintexts.append(QUESTION)
    client = adversary.verifier()
    answer = short(client.conversation())
    assert client.verified is not None
    assert client.verified.pcrs_checked == tuple(sorted(adversary.pcrs))
    adversary.plaintexts.append(answer.text.strip())
    assert answer.completion_tokens >= 1 and answer.finish_reason in ("length", "stop")
    still_serving()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"public_key": None}, id="public_key"),
        pytest.param({"user_data": "00"}, id="user_data"),
    ],
)
def test_the_enclave_refuses_to_attest_a_key_the_parent_chose(
    adversary: Stack, forgers: Forgers, still_serving, extra: dict[str, str | None]
) -> None:
    """The parent asks the enclave, with the client's nonce, for a document carrying its own
    public key (which KMS would then wrap the data key for): refused as bad_request."""
    traces: list[str] = []
    if "public_key" in extra:
        extra = {"public_key": base64.b64encode(forgers.parent_key).decode()}

    def own_key(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        frame = enclave.frame(Kind.ATTESTATION, {"nonce": incoming.nonce, **extra})
        traces.append(frame["trace_id"])
        return rendered(enclave.send(frame))

    mark = adversary.log_mark()
    client = adversary.verifier()
    with adversary.relay.playing(own_key):
        error = raised(lambda: short(client.conversation()))
    assert_code(error, ErrorCode.BAD_REQUEST)
    adversary.wait_outcome("bad_request", mark, traces[0])
    # Whoever asks, every document carries the enclave's one per-boot key, never the parent's.
    documents = [forgers.old_document, _document(adversary.enclave.attest(None).bodies[0])]
    keys = {attestation.parse(doc).public_key for doc in documents}
    assert len(keys) == 1 and forgers.parent_key not in keys
    still_serving()
