"""Property-based tests for every parser of untrusted input in protocol/ (the gaps left by the
per-module tests): arbitrary bytes and structures give the parser's own error, never another
exception. Structures are built near the valid shape (known field names, a valid message with one
field replaced) so that the checks deep inside are reached, not only the first type test.

Per-module fuzzing already present: raw bytes into framing, NSM, attestation and CMS; arbitrary
JSON into envelope.parse_request; mutations of a real attestation document and of KMS's CMS.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
from datetime import UTC, datetime
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol import attestation, cms, envelope, key_policy, messages
from protocol import nsm as nsm_msg
from protocol.attestation import AttestationError, AttestationPolicy
from protocol.cms import CmsError, EnvelopeFields
from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.framing import FrameError, encode_frame, recv_frame, recv_json
from protocol.nsm import NsmError
from protocol.strict_cbor import StrictCborError, decode_one
from protocol.transport import Address, parse_host_port

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- strategies --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**400, -(10**400)])  # JSON integers have no bound
    | st.floats()
    | st.text(max_size=24)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def near_object(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects whose keys are mostly the expected names, with arbitrary values."""
    return st.dictionaries(st.sampled_from(names) | st.text(max_size=8), json_values, max_size=8)


cbor_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.binary(max_size=80)
    | st.text(max_size=16)
)
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-4, 40) | st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


# ---- framing -----------------------------------------------------------------------------------


def _feed(data: bytes, pieces: list[int]) -> socket.socket:
    """A socket from which `data` can be read, written in pieces of the given sizes then closed."""
    writer, reader = socket.socketpair()

    def write() -> None:
        try:
            offset = 0
            for size in [*pieces, len(data)]:
                if offset >= len(data):
                    break
                writer.sendall(data[offset : offset + max(1, size)])
                offset += max(1, size)
        except OSError:
            pass
        finally:
            writer.close()

    threading.Thread(target=write, daemon=True).start()
    return reader


@FAST
@given(
    declared=st.integers(0, 2**32 - 1) | st.integers(0, 300),
    payload=st.binary(max_size=300),
    pieces=st.lists(st.integers(1, 64), max_size=6),
)
def test_a_frame_that_lies_about_its_length_is_a_frame_error(declared, payload, pieces):
    reader = _feed(struct.pack(">I", declared) + payload, pieces)
    try:
        got = recv_frame(reader, max_size=256, timeout=2)
    except FrameError as exc:
        if declared > 256:
            assert exc.code is ErrorCode.FRAME_TOO_LARGE
        else:
            assert len(payload) < declared and exc.code is ErrorCode.PROTOCOL_ERROR
    else:
        assert declared <= 256 and got == payload[:declared]
    finally:
        reader.close()


@FAST
@given(
    frames=st.lists(st.binary(max_size=200), min_size=1, max_size=4),
    pieces=st.lists(st.integers(1, 50), max_size=10),
)
def test_frames_arrive_whole_however_the_bytes_are_split(frames, pieces):
    reader = _feed(b"".join(encode_frame(frame, 256) for frame in frames), pieces)
    try:
        assert [recv_frame(reader, 256, 2) for _ in frames] == frames
    finally:
        reader.close()


@FAST
@given(st.binary(max_size=120) | json_values.map(lambda v: repr(v).encode()))
def test_any_frame_content_is_a_json_object_or_a_frame_error(content):
    reader = _feed(encode_frame(content), [])
    try:
        assert isinstance(recv_json(reader, timeout=2), dict)
    except FrameError as exc:
        assert exc.code is ErrorCode.PROTOCOL_ERROR
    finally:
        reader.close()


# ---- parent/enclave messages -------------------------------------------------------------------


@FAST
@given(
    st.one_of(
        json_values,
        near_object(["kind", "trace_id", "credentials", "body"]),
        st.fixed_dictionaries(
            {
                "kind": st.sampled_from(["chat", "ready", "attestation", "metrics", "x"]),
                "trace_id": st.text(max_size=70),
                "credentials": st.none()
                | near_object(["access_key_id", "secret_access_key", "session_token"]),
                "body": st.none() | json_values,
            }
        ),
    )
)
def test_request_frames_parse_or_give_protocol_error(obj):
    try:
        frame = messages.RequestFrame.from_json(obj)
    except NitroError as exc:
        assert exc.code is ErrorCode.PROTOCOL_ERROR
        return
    assert messages.RequestFrame.from_json(frame.to_json()) == frame


@FAST
@given(
    json_values
    | near_object(["status", "content_type", "error"])
    | st.fixed_dictionaries(
        {
            "status": st.integers(0, 700) | json_scalars,
            "content_type": st.sampled_from([messages.CONTENT_JSON, messages.CONTENT_NDJSON, ""]),
        },
        optional={"error": json_values},
    )
)
def test_status_frames_parse_or_give_protocol_error(obj):
    try:
        status = messages.Status.from_json(obj)
    except NitroError as exc:
        assert exc.code is ErrorCode.PROTOCOL_ERROR
        return
    assert 200 <= status.status <= 599 and (status.status == 200) == (status.error is None)


@FAST
@given(json_values | near_object(["final", "data"]))
def test_body_frames_parse_or_give_protocol_error(obj):
    try:
        final, data = messages.parse_body_frame(obj)
    except NitroError as exc:
        assert exc.code is ErrorCode.PROTOCOL_ERROR
        return
    assert isinstance(final, bool) and isinstance(data, dict)


_QUESTION = ["prompt", "max_new_tokens", "min_new_tokens", "temperature", "top_p", "seed"]


@FAST
# Found by this test: an integer too large for a float made math.isfinite raise OverflowError.
@example({"prompt": "p", "temperature": 10**400})
@example({"prompt": "p", "top_p": -(10**400)})
@given(json_values | near_object(_QUESTION))
def test_questions_parse_or_give_invalid_parameters(obj):
    try:
        question = messages.Question.from_json(obj)
    except NitroError as exc:
        assert exc.code is ErrorCode.INVALID_PARAMETERS
        return
    assert messages.Question.from_json(question.to_json()) == question


@FAST
@given(json_values | st.fixed_dictionaries({"error": json_values | near_object(["code"])}))
def test_a_peers_error_object_never_raises(obj):
    code, message = error_from_wire(obj)
    assert isinstance(code, ErrorCode) and len(message) <= 300 and message.isprintable()


# ---- the v2 envelope ---------------------------------------------------------------------------

_KEYS = envelope.derive_keys(bytes(range(32)), "EBESExQVFhcYGRobHB0eHw")
_HEADER = envelope.Header("key-1", "EBESExQVFhcYGRobHB0eHw", "qqqqqqqqqqqqqqqqqqqqqg", 1, True)
_REQUEST = envelope.seal_request(_KEYS, _HEADER, b"edk", {"prompt": "hi"}, bytes(12))
_ANSWER = envelope.seal_answer(_KEYS, _REQUEST, 0, False, {"text": "t", "tokens": 1}, bytes(12))
_TOP = ["v", "key", "request_id", "sent_at", "stream", "nonce", "ciphertext"]


@FAST
@given(st.text(max_size=40), st.integers(0, 40))
def test_base64_fields_decode_or_give_bad_request(text, size):
    for decode in (
        lambda: envelope.unb64(text, "f"),
        lambda: envelope.unb64(text, "f", size),
        lambda: envelope.unb64url(text, "f", size),
    ):
        try:
            decode()
        except NitroError as exc:
            assert exc.code is ErrorCode.BAD_REQUEST
    try:
        data = envelope.unb64url(text, "f", size)
    except NitroError:
        return
    assert envelope.b64url(data) == text  # only the one canonical spelling is accepted


@FAST
@given(
    field=st.sampled_from(_TOP + ["key.key_id", "key.edk", "key.context", "key.context.session"]),
    value=json_values,
)
def test_a_request_with_any_one_field_replaced_parses_or_gives_a_shape_error(field, value):
    body = _REQUEST.to_json()
    target = body
    *parents, last = field.split(".")
    for name in parents:
        target = target[name]
    target[last] = value
    try:
        envelope.parse_request(body)
    except NitroError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.UNSUPPORTED_VERSION)


@FAST
@given(
    field=st.sampled_from(["nonce", "ciphertext"]),
    position=st.integers(0, 400),
    mask=st.integers(1, 255),
)
def test_a_flipped_request_bit_gives_decryption_failed(field, position, mask):
    raw = bytearray(getattr(_REQUEST, field))
    raw[position % len(raw)] ^= mask
    changed = envelope.SealedRequest(
        _REQUEST.header,
        _REQUEST.edk,
        **{
            "nonce": _REQUEST.nonce,
            "ciphertext": _REQUEST.ciphertext,
            field: bytes(raw),
        },
    )
    with pytest.raises(NitroError) as err:
        envelope.open_request(_KEYS, changed)
    assert err.value.code is ErrorCode.DECRYPTION_FAILED


@FAST
@given(
    st.one_of(
        json_values,
        near_object(sorted(_ANSWER)),
        st.sampled_from(sorted(_ANSWER)).flatmap(
            lambda name: json_values.map(lambda value: {**_ANSWER, name: value})
        ),
        st.tuples(st.integers(0, 300), st.integers(1, 255)).map(
            lambda flip: {**_ANSWER, "ciphertext": _flip_b64(_ANSWER["ciphertext"], *flip)}
        ),
    )
)
def test_an_answer_from_the_parent_opens_or_gives_answer_invalid(answer):
    try:
        final, content = envelope.open_answer(_KEYS, _REQUEST, answer, 0)
    except NitroError as exc:
        assert exc.code is ErrorCode.ANSWER_INVALID
        return
    assert answer == _ANSWER and (final, content) == (False, {"text": "t", "tokens": 1})


def _flip_b64(text: str, position: int, mask: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[position % len(raw)] ^= mask
    return base64.b64encode(bytes(raw)).decode()


# ---- NSM messages ------------------------------------------------------------------------------

_NSM_FIELDS = {
    "Attestation": ["user_data", "nonce", "public_key", "document"],
    "DescribePCR": ["index", "lock", "data"],
    "ExtendPCR": ["index", "data"],
    "LockPCR": ["index"],
    "LockPCRs": ["range"],
    "GetRandom": ["random"],
    "DescribeNSM": [
        "version_major",
        "version_minor",
        "version_patch",
        "module_id",
        "max_pcrs",
        "locked_pcrs",
        "digest",
    ],
}


@st.composite
def nsm_messages(draw: st.DrawFn) -> Any:
    """`{Variant: {field: value}}` with the variant's own field names and arbitrary values."""
    variant = draw(st.sampled_from(sorted(_NSM_FIELDS)) | st.text(max_size=6))
    names = _NSM_FIELDS.get(variant, ["x"])
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    body = {name: draw(cbor_values) for name in chosen}
    return {variant: body} if draw(st.booleans()) else draw(st.sampled_from([variant, body]))


@FAST
@given(nsm_messages())
def test_nsm_messages_of_every_variant_decode_or_give_nsm_error(value):
    data = cbor2.dumps(value)
    for decode, encode in (
        (nsm_msg.decode_request, nsm_msg.encode_request),
        (nsm_msg.decode_response, nsm_msg.encode_response),
    ):
        try:
            decoded = decode(data)
        except NsmError:
            continue
        assert decode(encode(decoded)) == decoded


# ---- CBOR and COSE attestation documents -------------------------------------------------------


@FAST
@given(st.binary(max_size=200))
def test_strict_cbor_gives_only_its_own_error(data):
    try:
        decode_one(data)
    except StrictCborError:
        pass


@FAST
@given(cbor_values)
def test_strict_cbor_reads_back_what_cbor2_writes(value):
    assert decode_one(cbor2.dumps(value)) == value


_PAYLOAD_NAMES = list(attestation._FIELD_ORDER)  # the payload's fields, in order


@st.composite
def cose_documents(draw: st.DrawFn) -> bytes:
    """COSE_Sign1-shaped CBOR with a payload map of the document's field names, any values."""
    names = draw(st.lists(st.sampled_from(_PAYLOAD_NAMES), unique=True, min_size=5))
    payload = {name: draw(cbor_values) for name in names}
    if "pcrs" in payload and draw(st.booleans()):
        payload["pcrs"] = draw(
            st.dictionaries(st.integers(-1, 40), st.binary(min_size=32, max_size=64), max_size=3)
        )
    protected = draw(st.sampled_from([cbor2.dumps({1: -35}), cbor2.dumps({1: -7})]) | st.binary())
    unprotected = draw(st.sampled_from([{}, {4: b"kid"}]))
    signature = draw(st.binary(min_size=96, max_size=96) | st.binary(max_size=100))
    outer = [protected, unprotected, cbor2.dumps(payload), signature]
    shape = draw(st.integers(0, 2))  # sampled_from would hash the unhashable lists
    return cbor2.dumps([outer, outer[:3], cbor2.CBORTag(18, outer)][shape])


@FAST
@given(cose_documents())
def test_cose_shaped_documents_parse_or_give_attestation_error(data):
    try:
        attestation.parse(data)
    except AttestationError as exc:
        assert exc.check in attestation.CHECKS


_SIGNER = ec.generate_private_key(ec.SECP384R1())
_AT = datetime(2024, 9, 17, tzinfo=UTC)


@SLOW
@given(
    fields=st.fixed_dictionaries(
        {
            "module_id": st.text(min_size=1, max_size=10),
            "digest": st.just("SHA384"),
            "timestamp": st.integers(0, attestation.MAX_TIMESTAMP_MS),
            "pcrs": st.dictionaries(
                st.integers(0, 31), st.binary(min_size=48, max_size=48), min_size=1, max_size=3
            ),
            "certificate": st.binary(min_size=1, max_size=300),
            "cabundle": st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=3),
        },
        optional={"nonce": st.binary(max_size=40), "public_key": st.binary(max_size=40)},
    ),
    root_is_first=st.booleans(),
)
def test_signed_documents_with_any_certificates_verify_or_give_attestation_error(
    fields, root_is_first
):
    # Well-formed and validly signed, so that verification reaches the DER of every certificate.
    policy = AttestationPolicy(root=fields["cabundle"][0] if root_is_first else b"root", at=_AT)
    document = attestation.encode_document(fields, _SIGNER, tagged=True)
    with pytest.raises(AttestationError) as err:
        attestation.verify(document, policy)
    assert err.value.check in ("format", "root", "chain")


# ---- CMS -------------------------------------------------------------------------------------

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_ENVELOPE = cms.build_enveloped_data(bytes(32), _RSA.public_key())


@SLOW
@given(st.lists(st.tuples(st.integers(0, len(_ENVELOPE) - 1), st.integers(1, 255)), max_size=3))
def test_a_mutated_envelope_opens_or_gives_cms_error(mutations):
    data = bytearray(_ENVELOPE)
    for position, mask in mutations:
        data[position] ^= mask
    try:
        plaintext = cms.open_enveloped_data(bytes(data), _RSA)
    except CmsError as exc:
        assert exc.code is ErrorCode.KMS_ERROR
        return
    assert isinstance(plaintext, bytes)


@FAST
@given(
    fields=st.builds(
        EnvelopeFields,
        encrypted_key=st.binary(min_size=1, max_size=300)
        | st.just(bytes(cms.MAX_ENCRYPTED_KEY_SIZE)),
        iv=st.binary(min_size=16, max_size=16),
        encrypted_content=st.integers(1, 70).map(lambda n: os.urandom(16 * n)),
        subject_key_identifier=st.binary(min_size=1, max_size=cms.MAX_KEY_IDENTIFIER_SIZE),
    ),
    indefinite=st.booleans(),
)
def test_every_envelope_in_kms_shape_parses_back_to_its_fields(fields, indefinite):
    data = cms.encode_enveloped_data(fields, indefinite_length=indefinite)
    assert cms.parse_enveloped_data(data) == fields


# ---- key policies ------------------------------------------------------------------------------

_OPERATORS = [
    "StringEquals",
    "StringLike",
    "StringNotEquals",
    "ArnLike",
    "Bool",
    "Null",
    "StringEqualsIgnoreCase",
    "ForAnyValue:StringEquals",
    "ForAllValues:StringLike",
    "StringEqualsIfExists",
    "NullIfExists",
    "NumericEquals",
]
_condition_values = (
    json_scalars | st.lists(json_scalars, max_size=3) | st.sampled_from(["true", "false", "*"])
)
_statements = st.fixed_dictionaries(
    {"Effect": st.sampled_from(["Allow", "Deny", "allow"]) | json_scalars},
    optional={
        "Sid": st.text(max_size=5) | json_scalars,
        "Principal": st.sampled_from(["*", {"AWS": "*"}, {"AWS": ["111122223333"]}])
        | st.dictionaries(st.sampled_from(["AWS", "Service", "X"]), json_values, max_size=2),
        "Action": st.sampled_from(["kms:*", "kms:Decrypt", ["kms:Encrypt"], []]) | json_values,
        "Resource": st.sampled_from(["*", ["*"]]) | json_values,
        "NotAction": st.just("kms:Decrypt"),
        "Condition": st.dictionaries(
            st.sampled_from(_OPERATORS) | st.text(max_size=8),
            st.dictionaries(
                st.sampled_from(["kms:RecipientAttestation:PCR0", "aws:PrincipalArn"])
                | st.text(max_size=6),
                _condition_values,
                max_size=2,
            )
            | json_values,
            max_size=2,
        ),
    },
)
_policies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"Statement": st.lists(_statements, max_size=3) | _statements | json_values},
        optional={"Version": st.sampled_from(["2012-10-17", "2008-10-17", "2020-01-01"])},
    ),
)


@FAST
@given(
    policy=_policies,
    context=st.dictionaries(
        st.sampled_from(["kms:RecipientAttestation:PCR0", "aws:PrincipalArn"])
        | st.text(max_size=6),
        st.text(max_size=10) | st.booleans() | st.lists(st.text(max_size=5), max_size=3),
        max_size=3,
    ),
)
def test_key_policies_evaluate_or_give_policy_error(policy, context):
    try:
        decision = key_policy.evaluate(
            policy,
            principal_arn="arn:aws:sts::111122223333:assumed-role/parent/i-1",
            action="kms:Decrypt",
            context=context,
            resource="arn:aws:kms:us-east-1:111122223333:key/k",
        )
    except key_policy.PolicyError:
        return
    assert isinstance(decision.allowed, bool) and decision.reason


# ---- transport addresses (configuration, flags and environment) -------------------------------


@FAST
# Found by this test: an IPv6 tcp address printed without brackets did not parse back.
@example("tcp://[::1]:5000")
@given(
    st.text(max_size=40)
    | st.tuples(
        st.sampled_from(["unix://", "vsock://", "tcp://", "http://"]), st.text(max_size=30)
    ).map("".join)
)
def test_addresses_parse_or_give_value_error(text):
    try:
        address = Address.parse(text)
    except ValueError:
        pass
    else:
        assert Address.parse(str(address)) == address
    try:
        host, port = parse_host_port(text)
    except ValueError:
        return
    assert 0 <= port <= 65535 and host
