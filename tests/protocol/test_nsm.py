"""The NSM message codec: serde_cbor's bytes, strict decoding, and only NsmError on bad input."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import nsm
from protocol.errors import NitroError
from protocol.nsm import NsmError, NsmErrorCode

PCR = bytes(range(48))

REQUESTS = [
    nsm.AttestationRequest(),
    nsm.AttestationRequest(user_data=b"u" * 512, nonce=b"n" * 512, public_key=b"k" * 1024),
    nsm.GetRandomRequest(),
    nsm.DescribeNsmRequest(),
    nsm.DescribePcrRequest(index=3),
    nsm.ExtendPcrRequest(index=16, data=b"measure me"),
    nsm.LockPcrRequest(index=65535),
    nsm.LockPcrsRequest(range=16),
]
RESPONSES = [
    nsm.AttestationResponse(document=b"\x84" + b"d" * 100),
    nsm.GetRandomResponse(random=b"r" * 256),
    nsm.DescribeNsmResponse(1, 0, 0, "i-0123-enc0123", 32, (0, 1, 2, 15), "SHA384"),
    nsm.DescribePcrResponse(lock=True, data=PCR),
    nsm.ExtendPcrResponse(data=PCR),
    nsm.LockPcrResponse(),
    nsm.LockPcrsResponse(),
    *(nsm.ErrorResponse(code) for code in NsmErrorCode),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips(request_):
    assert nsm.decode_request(nsm.encode_request(request_)) == request_


@pytest.mark.parametrize("response", RESPONSES, ids=lambda r: type(r).__name__)
def test_every_response_round_trips(response):
    assert nsm.decode_response(nsm.encode_response(response)) == response


def test_unit_variants_are_bare_text_strings():
    assert nsm.encode_request(nsm.GetRandomRequest()) == cbor2.dumps("GetRandom")
    assert nsm.encode_request(nsm.DescribeNsmRequest()) == cbor2.dumps("DescribeNSM")
    assert nsm.encode_response(nsm.LockPcrResponse()) == cbor2.dumps("LockPCR")
    assert nsm.encode_response(nsm.LockPcrsResponse()) == cbor2.dumps("LockPCRs")


def test_map_variants_have_serdes_names_and_field_order():
    attestation = nsm.encode_request(nsm.AttestationRequest(nonce=b"\x01"))
    # serde_cbor writes struct fields in declaration order: user_data, nonce, public_key.
    assert attestation == bytes.fromhex(
        "a16b4174746573746174696f6ea369757365725f64617461f6656e6f6e636541016a7075626c69635f6b6579f6"
    )
    assert nsm.encode_request(nsm.ExtendPcrRequest(17, b"ab")) == cbor2.dumps(
        {"ExtendPCR": {"index": 17, "data": b"ab"}}
    )
    assert nsm.encode_request(nsm.LockPcrsRequest(5)) == cbor2.dumps({"LockPCRs": {"range": 5}})
    assert nsm.encode_response(nsm.ErrorResponse(NsmErrorCode.INVALID_INDEX)) == cbor2.dumps(
        {"Error": "InvalidIndex"}
    )
    describe = nsm.encode_response(RESPONSES[2])
    assert cbor2.loads(describe) == {
        "DescribeNSM": {
            "version_major": 1,
            "version_minor": 0,
            "version_patch": 0,
            "module_id": "i-0123-enc0123",
            "max_pcrs": 32,
            "locked_pcrs": [0, 1, 2, 15],
            "digest": "SHA384",
        }
    }


def test_responses_as_the_real_nsm_sends_them_decode():
    real = cbor2.dumps({"DescribePCR": {"lock": False, "data": PCR}})
    assert nsm.decode_response(real) == nsm.DescribePcrResponse(False, PCR)
    assert nsm.decode_response(cbor2.dumps({"Error": "ReadOnlyIndex"})) == nsm.ErrorResponse(
        NsmErrorCode.READ_ONLY_INDEX
    )


MALFORMED_REQUESTS = {
    "empty": b"",
    "not cbor": b"\xff\xff",
    "truncated": cbor2.dumps("GetRandom")[:-1],
    "trailing bytes": cbor2.dumps("GetRandom") + b"\x00",
    "unknown unit": cbor2.dumps("Reboot"),
    "a response": cbor2.dumps("LockPCR"),
    "integer": cbor2.dumps(7),
    "two variants": cbor2.dumps({"LockPCR": {"index": 1}, "DescribePCR": {"index": 1}}),
    "tagged": cbor2.dumps(cbor2.CBORTag(18, "GetRandom")),
    "bignum index": cbor2.dumps({"LockPCR": {"index": cbor2.CBORTag(2, b"\x01")}}),
    "missing field": cbor2.dumps({"ExtendPCR": {"index": 16}}),
    "extra field": cbor2.dumps({"LockPCR": {"index": 1, "force": True}}),
    "bool index": cbor2.dumps({"LockPCR": {"index": True}}),
    "negative index": cbor2.dumps({"LockPCR": {"index": -1}}),
    "index over u16": cbor2.dumps({"LockPCR": {"index": 65536}}),
    "float index": cbor2.dumps({"DescribePCR": {"index": 1.0}}),
    "text data": cbor2.dumps({"ExtendPCR": {"index": 16, "data": "ab"}}),
    "body not a map": cbor2.dumps({"Attestation": [None, None, None]}),
    "user_data too large": cbor2.dumps(
        {"Attestation": {"user_data": b"u" * 513, "nonce": None, "public_key": None}}
    ),
    "nonce too large": cbor2.dumps(
        {"Attestation": {"user_data": None, "nonce": b"n" * 513, "public_key": None}}
    ),
    "public_key too large": cbor2.dumps(
        {"Attestation": {"user_data": None, "nonce": None, "public_key": b"k" * 1025}}
    ),
    "request too large": cbor2.dumps({"ExtendPCR": {"index": 16, "data": b"x" * 0x1000}}),
    "indefinite length": b"\x7f\x63Get\x66Random\xff",
    "duplicate keys": b"\xa1\x67LockPCR\xa2\x65index\x01\x65index\x02",
    "deep nesting": b"\x81" * 100 + b"\x00",
}


@pytest.mark.parametrize("data", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_malformed_requests_raise_nsm_error(data):
    with pytest.raises(NsmError) as caught:
        nsm.decode_request(data)
    assert isinstance(caught.value, NitroError)
    assert caught.value.nsm_code in (
        NsmErrorCode.INVALID_ARGUMENT,
        NsmErrorCode.INPUT_TOO_LARGE,
    )


def test_oversized_input_is_named_input_too_large():
    with pytest.raises(NsmError) as caught:
        nsm.decode_request(MALFORMED_REQUESTS["nonce too large"])
    assert caught.value.nsm_code is NsmErrorCode.INPUT_TOO_LARGE
    with pytest.raises(NsmError) as caught:
        nsm.decode_request(MALFORMED_REQUESTS["truncated"])
    assert caught.value.nsm_code is NsmErrorCode.INVALID_ARGUMENT


MALFORMED_RESPONSES = {
    "unknown error code": cbor2.dumps({"Error": "Exploded"}),
    "error not text": cbor2.dumps({"Error": 3}),
    "a request": cbor2.dumps("GetRandom"),
    "short pcr": cbor2.dumps({"DescribePCR": {"lock": False, "data": b"\x00" * 47}}),
    "lock not bool": cbor2.dumps({"DescribePCR": {"lock": 1, "data": PCR}}),
    "locked_pcrs not array": cbor2.dumps(
        {
            "DescribeNSM": {
                "version_major": 1,
                "version_minor": 0,
                "version_patch": 0,
                "module_id": "m",
                "max_pcrs": 32,
                "locked_pcrs": {0: 1},
                "digest": "SHA384",
            }
        }
    ),
    "unknown digest": cbor2.dumps(
        {
            "DescribeNSM": {
                "version_major": 1,
                "version_minor": 0,
                "version_patch": 0,
                "module_id": "m",
                "max_pcrs": 32,
                "locked_pcrs": [],
                "digest": "MD5",
            }
        }
    ),
    "document not bytes": cbor2.dumps({"Attestation": {"document": "doc"}}),
    "response too large": cbor2.dumps({"GetRandom": {"random": b"r" * 0x3000}}),
}


@pytest.mark.parametrize("data", MALFORMED_RESPONSES.values(), ids=MALFORMED_RESPONSES.keys())
def test_malformed_responses_raise_nsm_error(data):
    with pytest.raises(NsmError):
        nsm.decode_response(data)


def test_messages_are_checked_when_built_and_encoded():
    with pytest.raises(NsmError):
        nsm.AttestationRequest(nonce=b"n" * 513)
    with pytest.raises(NsmError):
        nsm.AttestationRequest(public_key="not bytes")  # type: ignore[arg-type]
    with pytest.raises(NsmError):
        nsm.DescribePcrRequest(index=-1)
    with pytest.raises(NsmError):
        nsm.encode_request(nsm.GetRandomResponse(b"r"))  # a response is not a request
    with pytest.raises(NsmError) as caught:
        nsm.encode_request(nsm.ExtendPcrRequest(16, b"x" * 0x1000))
    assert caught.value.nsm_code is NsmErrorCode.INPUT_TOO_LARGE


def test_every_request_has_its_response_type():
    assert set(nsm.RESPONSE_FOR) == {type(r) for r in REQUESTS}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_nsm_error(data):
    for decode in (nsm.decode_request, nsm.decode_response):
        try:
            decode(data)
        except NsmError:
            pass


_cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.binary(max_size=64)
    | st.text(max_size=12)
    | st.sampled_from(["GetRandom", "DescribeNSM", "LockPCR", "Attestation", "index", "data"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["Attestation", "DescribePCR", "ExtendPCR", "LockPCRs", "Error", "index", "data"]
            )
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_cbor_values)
def test_arbitrary_cbor_values_raise_only_nsm_error(value):
    data = cbor2.dumps(value)
    for decode in (nsm.decode_request, nsm.decode_response):
        try:
            decoded = decode(data)
        except NsmError:
            continue
        # Whatever decodes must encode back to a message that decodes the same.
        encode = nsm.encode_request if decode is nsm.decode_request else nsm.encode_response
        assert decode(encode(decoded)) == decoded
