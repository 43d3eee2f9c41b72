"""Frames between parent and enclave and the question's plaintext shape: strict parsing."""

import pytest

from protocol.errors import ErrorCode, NitroError, error_from_wire
from protocol.messages import (
    Credentials,
    Kind,
    Question,
    RequestFrame,
    Status,
    body_frame,
    parse_body_frame,
    status_frame,
)

CREDS = Credentials("AKIDEXAMPLE", "secret-value", None)


def test_request_frame_round_trip_and_credentials_hidden_in_repr():
    frame = RequestFrame(Kind.CHAT, "abc123", CREDS, {"v": 2})
    assert RequestFrame.from_json(frame.to_json()) == frame
    assert "secret-value" not in repr(frame)


@pytest.mark.parametrize(
    "obj",
    [
        {"kind": "shell", "trace_id": "a", "credentials": None, "body": None},
        {"kind": "chat", "trace_id": "a b", "credentials": None, "body": None},
        {"kind": "chat", "trace_id": "a", "credentials": None, "body": []},
        {"kind": "chat", "trace_id": "a", "credentials": None},
        {"kind": "chat", "trace_id": "a", "credentials": None, "body": None, "x": 1},
        {"kind": "chat", "trace_id": "a", "credentials": {"access_key_id": 1}, "body": None},
        "chat",
    ],
)
def test_bad_request_frames_are_protocol_errors(obj):
    with pytest.raises(NitroError) as err:
        RequestFrame.from_json(obj)
    assert err.value.code is ErrorCode.PROTOCOL_ERROR


def test_status_and_body_frames():
    assert Status.from_json(status_frame(200)).error is None
    failed = Status.from_json(status_frame(403, error=NitroError(ErrorCode.UNKNOWN_KEY)))
    assert failed.status == 403 and failed.error["code"] == "unknown_key"
    assert parse_body_frame(body_frame({"a": 1}, True)) == (True, {"a": 1})
    for bad in (
        {"status": 200},
        {"status": 99, "content_type": "application/json"},
        {"status": 500, "content_type": "application/json"},
        {"status": 200, "content_type": "text/html"},
    ):
        with pytest.raises(NitroError):
            Status.from_json(bad)
    with pytest.raises(NitroError):
        parse_body_frame({"final": "yes", "data": {}})


def test_question_defaults_and_limits():
    q = Question.from_json({"prompt": "hi"})
    assert (q.max_new_tokens, q.temperature, q.top_p, q.seed) == (64, 0.0, 1.0, None)
    assert Question.from_json(q.to_json()) == q
    for bad in (
        {"prompt": ""},
        {"prompt": "x", "max_new_tokens": 0},
        {"prompt": "x", "max_new_tokens": 513},
        {"prompt": "x", "max_new_tokens": True},
        {"prompt": "x", "temperature": 3},
        {"prompt": "x", "temperature": float("nan")},
        {"prompt": "x", "top_p": 0},
        {"prompt": "x", "seed": -1},
        {"prompt": "x", "other": 1},
        {"max_new_tokens": 5},
        {"prompt": "x", "max_new_tokens": 8, "min_new_tokens": 9},
        {"prompt": "x", "min_new_tokens": -1},
        {"prompt": "x", "min_new_tokens": 1.5},
    ):
        with pytest.raises(NitroError) as err:
            Question.from_json(bad)
        assert err.value.code is ErrorCode.INVALID_PARAMETERS


def test_min_new_tokens_is_sent_only_when_set():
    assert "min_new_tokens" not in Question("hi").to_json()
    fixed = Question("hi", max_new_tokens=64, min_new_tokens=64)
    assert fixed.to_json()["min_new_tokens"] == 64
    assert Question.from_json(fixed.to_json()) == fixed


def test_error_codes_are_unique_and_from_wire_is_untrusting():
    codes = [member.code for member in ErrorCode]
    assert len(codes) == len(set(codes))
    assert ErrorCode.from_code("overloaded") is ErrorCode.OVERLOADED
    code, message = error_from_wire({"error": {"code": "made_up", "message": "trust me\x1b[2J"}})
    assert code is ErrorCode.PROTOCOL_ERROR and "\x1b" not in message
    assert error_from_wire("garbage") == (ErrorCode.PROTOCOL_ERROR, "")
    assert NitroError(ErrorCode.OVERLOADED).to_wire()["error"]["code"] == "overloaded"
