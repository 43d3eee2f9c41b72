"""A malicious parent tampers with requests on their way in: the enclave refuses each one with
its own code, and the real client reports that code with its own words.

Replayed requests, bit flips in every field of the body (and of the frame the parent writes),
key blocks grafted between two users' sessions, whole requests swapped between two users, and
frames whose length prefix lies.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from protocol.errors import ErrorCode, NitroError
from protocol.messages import Kind

from .conftest import QUESTION, Stack, ask, assert_code, both, raised, short
from .relay import (
    Enclave,
    HttpAnswer,
    Incoming,
    Rendezvous,
    flip_b64,
    flip_b64url,
    flip_text,
    lying_frame,
    on_chat,
    rendered,
)

pytestmark = pytest.mark.integration


def test_the_honest_relay_delivers_an_answer(adversary: Stack, still_serving) -> None:
    """The baseline every case departs from: nothing altered, the question is answered."""
    answer = ask(adversary)
    assert answer.completion_tokens >= 1 and answer.finish_reason in ("length", "stop")
    assert len(adversary.relay.chats()) >= 1
    still_serving()


# ---- replays -----------------------------------------------------------------------------------


def test_a_request_sent_twice_is_refused_the_second_time(adversary: Stack, still_serving) -> None:
    """The parent forwards the request twice and hands the client the second answer: the
    enclave's sealed refusal, which the client opens and reports."""
    second_trace: list[str] = []

    def replay(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        first = enclave.chat(incoming.json())
        assert first.status == 200
        again = enclave.chat(incoming.json())
        second_trace.append(again.trace_id)
        return rendered(again)

    mark = adversary.log_mark()
    with adversary.relay.playing(on_chat(replay)):
        error = raised(lambda: ask(adversary))
    assert_code(error, ErrorCode.REPLAYED_REQUEST)
    assert error.authenticated  # sealed by the enclave: the parent could not have written it
    adversary.wait_outcome("replayed_request", mark, second_trace[0])
    still_serving()


def test_a_request_sent_twice_at_once_is_answered_once(adversary: Stack, still_serving) -> None:
    """Both copies race into the enclave together: exactly one is answered, the other refused
    (the parent cannot tell which from the sealed bytes; the enclave's log can)."""
    traces: list[str] = []

    def race(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        body = incoming.json()
        replies = both([lambda: enclave.chat(body), lambda: enclave.chat(body)])
        assert all(r.status == 200 for r in replies)
        traces.extend(r.trace_id for r in replies)
        return rendered(replies[0])

    mark = adversary.log_mark()
    with adversary.relay.playing(on_chat(race)):
        try:
            ask(adversary)
        except NitroError as exc:  # the copy handed back may be the refused one
            assert_code(exc, ErrorCode.REPLAYED_REQUEST)
    assert sorted(adversary.outcomes_of(traces, mark)) == ["ok", "replayed_request"]
    still_serving()


def test_an_earlier_request_replayed_for_a_later_question(adversary: Stack, still_serving) -> None:
    """The parent keeps the conversation's first request and sends it again in place of the
    second: the enclave refuses the replay, and the client sees an answer to another request."""
    kept: list[Any] = []
    traces: list[str] = []

    def replay_first(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        if not kept:
            kept.append(incoming.json())
            return rendered(enclave.chat(incoming.json()))
        reply = enclave.chat(kept[0])
        traces.append(reply.trace_id)
        return rendered(reply)

    mark = adversary.log_mark()
    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(replay_first)):
        first = short(conversation)
        error = raised(lambda: short(conversation, "And after five years?"))
    adversary.plaintexts += [QUESTION, "And after five years?", first.text.strip()]
    assert_code(error, ErrorCode.ANSWER_INVALID)
    adversary.wait_outcome("replayed_request", mark, traces[0])
    assert [q for q, _ in conversation.history] == [QUESTION]  # the second turn was not kept
    still_serving()


# ---- one bit flipped in each field the parent relays -------------------------------------------


def _flip_body(path: str) -> Callable[[dict[str, Any]], None]:
    """Flip one bit of the body field at `path` (dotted), keeping its type and encoding."""

    def flip(body: dict[str, Any]) -> None:
        *parents, name = path.split(".")
        holder = body
        for parent in parents:
            holder = holder[parent]
        value = holder[name]
        if name in ("request_id", "session"):
            holder[name] = flip_b64url(value, 3)
        elif name in ("edk", "nonce"):
            holder[name] = flip_b64(value, len(base64.b64decode(value)) // 2)
        elif isinstance(value, bool):
            holder[name] = not value
        elif isinstance(value, int):
            holder[name] = value ^ 1
        else:
            holder[name] = flip_text(value, len(value) - 1)

    return flip


def _flip_ciphertext(where: str) -> Callable[[dict[str, Any]], None]:
    def flip(body: dict[str, Any]) -> None:
        size = len(base64.b64decode(body["ciphertext"]))
        # The first byte of the sealed question, or the last byte of its GCM tag.
        body["ciphertext"] = flip_b64(body["ciphertext"], 0 if where == "body" else size - 1)

    return flip


REQUEST_FIELDS = [
    ("v", _flip_body("v"), ErrorCode.UNSUPPORTED_VERSION),
    ("key.key_id", _flip_body("key.key_id"), ErrorCode.UNKNOWN_KEY),
    ("key.edk", _flip_body("key.edk"), ErrorCode.DECRYPTION_FAILED),
    ("key.context.app", _flip_body("key.context.app"), ErrorCode.INVALID_CONTEXT),
    ("key.context.session", _flip_body("key.context.session"), ErrorCode.DECRYPTION_FAILED),
    ("request_id", _flip_body("request_id"), ErrorCode.DECRYPTION_FAILED),
    ("sent_at", _flip_body("sent_at"), ErrorCode.DECRYPTION_FAILED),
    ("stream", _flip_body("stream"), ErrorCode.DECRYPTION_FAILED),
    ("nonce", _flip_body("nonce"), ErrorCode.DECRYPTION_FAILED),
    ("ciphertext", _flip_ciphertext("body"), ErrorCode.DECRYPTION_FAILED),
    ("ciphertext-tag", _flip_ciphertext("tag"), ErrorCode.DECRYPTION_FAILED),
]


@pytest.mark.parametrize(
    ("flip", "code"),
    [pytest.param(flip, code, id=name) for name, flip, code in REQUEST_FIELDS],
)
def test_a_bit_flipped_in_a_request_field_is_refused_by_the_enclave(
    adversary: Stack, still_serving, flip: Callable[[dict[str, Any]], None], code: ErrorCode
) -> None:
    traces: list[str] = []

    def tamper(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        body = incoming.json()
        flip(body)
        assert body != incoming.json()
        reply = enclave.chat(body)
        traces.append(reply.trace_id)
        return rendered(reply)

    mark = adversary.log_mark()
    with adversary.relay.playing(on_chat(tamper)):
        error = raised(lambda: ask(adversary))
    assert_code(error, code)
    assert not error.authenticated
    adversary.wait_outcome(code.code, mark, traces[0])
    still_serving()


def _frame_kind(frame: dict[str, Any]) -> None:
    frame["kind"] = flip_text(frame["kind"], 0)  # "chat" -> "bhat"


def _frame_secret(frame: dict[str, Any]) -> None:
    secret = frame["credentials"]["secret_access_key"]
    frame["credentials"]["secret_access_key"] = flip_text(secret, 0)


@pytest.mark.parametrize(
    ("flip", "code"),
    [
        pytest.param(_frame_kind, ErrorCode.PROTOCOL_ERROR, id="frame.kind"),
        # The parent's own credentials: KMS refuses the enclave's call signed with them.
        pytest.param(_frame_secret, ErrorCode.KMS_ERROR, id="frame.credentials"),
    ],
)
def test_a_bit_flipped_in_the_parents_own_frame_is_refused(
    adversary: Stack, still_serving, flip: Callable[[dict[str, Any]], None], code: ErrorCode
) -> None:
    def tamper(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        frame = enclave.frame(Kind.CHAT, incoming.json())
        flip(frame)
        return rendered(enclave.send(frame))

    mark = adversary.log_mark()
    with adversary.relay.playing(on_chat(tamper)):
        error = raised(lambda: ask(adversary))
    assert_code(error, code)
    adversary.wait_outcome(code.code, mark)
    still_serving()


# ---- two users' sessions -----------------------------------------------------------------------


def test_one_users_key_grafted_onto_anothers_question(adversary: Stack, still_serving) -> None:
    """The parent keeps user A's key block (EDK and session) and sends user B's sealed question
    under it: the enclave obtains A's data key, and B's question does not open with it."""
    kept: list[dict[str, Any]] = []
    traces: list[str] = []

    def graft(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        body = incoming.json()
        if not kept:
            kept.append(copy.deepcopy(body["key"]))
            return rendered(enclave.chat(body))
        body["key"] = kept[0]
        reply = enclave.chat(body)
        traces.append(reply.trace_id)
        return rendered(reply)

    mark = adversary.log_mark()
    with adversary.relay.playing(on_chat(graft)):
        ask(adversary)  # user A, answered
        error = raised(lambda: ask(adversary, question="What is a vesting schedule?"))  # user B
    assert_code(error, ErrorCode.DECRYPTION_FAILED)
    adversary.wait_outcome("decryption_failed", mark, traces[0])
    still_serving()


def test_one_users_wrapped_key_under_anothers_session(adversary: Stack, still_serving) -> None:
    """Only the EDK moves (B's session kept): KMS refuses to unwrap A's key for B's context."""
    kept: list[str] = []

    def graft_edk(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        body = incoming.json()
        if not kept:
            kept.append(body["key"]["edk"])
            return rendered(enclave.chat(body))
        body["key"]["edk"] = kept[0]
        return rendered(enclave.chat(body))

    mark = adversary.log_mark()
    with adversary.relay.playing(on_chat(graft_edk)):
        ask(adversary)
        error = raised(lambda: ask(adversary, question="What is a vesting schedule?"))
    assert_code(error, ErrorCode.DECRYPTION_FAILED)
    adversary.wait_outcome("decryption_failed", mark)
    still_serving()


def test_two_users_requests_swapped(adversary: Stack, still_serving) -> None:
    """Two users ask at once; the parent sends each one's request in the other's place. The
    enclave answers both (they are authentic), but each answer is for the other user's
    request: each client refuses what it receives."""
    meeting = Rendezvous()

    def swap(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        _place, other = meeting.meet(incoming.json())
        return rendered(enclave.chat(other))

    user_a, user_b = adversary.user(0), adversary.user(1)
    with adversary.relay.playing(on_chat(swap)):
        results = both(
            [
                lambda: ask(adversary, user_a),
                lambda: ask(adversary, user_b, question="What is a vesting schedule?"),
            ]
        )
    for result in results:
        assert isinstance(result, Exception), "a swapped request was accepted"
        assert_code(result, ErrorCode.ANSWER_INVALID)
    still_serving()


# ---- frames whose length lies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lie", "code"),
    [
        pytest.param(lambda n: n // 2, ErrorCode.PROTOCOL_ERROR, id="shorter-than-sent"),
        pytest.param(lambda n: 0, ErrorCode.PROTOCOL_ERROR, id="zero"),
        pytest.param(lambda n: n + 100, ErrorCode.PROTOCOL_ERROR, id="longer-then-closed"),
        pytest.param(lambda n: (1 << 20) + 1, ErrorCode.FRAME_TOO_LARGE, id="over-the-limit"),
        pytest.param(lambda n: 0xFFFFFFFF, ErrorCode.FRAME_TOO_LARGE, id="four-gigabytes"),
    ],
)
def test_a_frame_whose_length_lies_is_refused_by_the_enclave(
    adversary: Stack, still_serving, lie: Callable[[int], int], code: ErrorCode
) -> None:
    def lying(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        payload = json.dumps(enclave.frame(Kind.CHAT, incoming.json())).encode()
        return rendered(enclave.send_raw(lying_frame(payload, lie(len(payload))), half_close=True))

    mark = adversary.log_mark()
    with adversary.relay.playing(on_chat(lying)):
        error = raised(lambda: ask(adversary))
    assert_code(error, code)
    adversary.wait_outcome(code.code, mark)
    still_serving()
