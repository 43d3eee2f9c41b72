"""A malicious parent tampers with answers on their way out: the real client refuses each one
with `answer_invalid` before it shows a byte of it, and keeps nothing of that turn.

Replayed and moved answers, reordered, dropped, repeated and truncated stream chunks, bit flips
in every field of an answer, answers swapped between two users, answers the parent wrote
itself, and HTTP lengths that lie.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from protocol import envelope
from protocol.errors import ErrorCode

from .conftest import (
    ANSWER_TOKENS,
    QUESTION,
    STREAM_TOKENS,
    Stack,
    assert_code,
    both,
    raised,
    short,
)
from .relay import (
    Enclave,
    HttpAnswer,
    Incoming,
    Rendezvous,
    flip_b64,
    flip_b64url,
    on_chat,
    rendered,
)

pytestmark = pytest.mark.integration
# Its answer runs about 30 tokens, never ending before STREAM_TOKENS: that many 1-token chunks.
STREAM_QUESTION = "What is a pension?"
MIN_CHUNKS = 3
STALL_TIMEOUT_S = 2.0


def honest_answer(incoming: Incoming, enclave: Enclave) -> list[dict[str, Any]]:
    """The enclave's authentic answer objects for this request."""
    reply = enclave.chat(incoming.json())
    assert reply.status == 200, reply.error
    return reply.bodies


def streamed(adversary: Stack, conversation: Any, question: str = STREAM_QUESTION) -> list[str]:
    """Stream `question`; the verified pieces the client handed out (or its ChatError)."""
    adversary.plaintexts.append(question)
    pieces = list(conversation.stream(question, max_new_tokens=STREAM_TOKENS))
    adversary.plaintexts.append("".join(pieces).strip())
    return pieces


def refused_turn(conversation: Any, error: Any) -> None:
    """The turn left no trace: nothing in the history, no last answer, answer_invalid."""
    assert_code(error, ErrorCode.ANSWER_INVALID)
    assert conversation.history == [] and conversation.last_answer is None


# ---- replayed and moved answers ----------------------------------------------------------------


def _later_question_gets_the_first_answer(rewrite: bool) -> Callable[..., HttpAnswer]:
    kept: list[list[dict[str, Any]]] = []

    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        bodies = honest_answer(incoming, enclave)  # the enclave answers every question
        if not kept:
            kept.append(bodies)
            return HttpAnswer.of_json(bodies[0])
        old = dict(kept[0][0])
        if rewrite:  # made to look like the answer to this request
            old["request_id"] = incoming.json()["request_id"]
        return HttpAnswer.of_json(old)

    return play


@pytest.mark.parametrize(
    "rewrite", [pytest.param(False, id="as-it-was"), pytest.param(True, id="request-id-rewritten")]
)
def test_an_earlier_answer_given_to_the_same_question_asked_again(
    adversary: Stack, still_serving, rewrite: bool
) -> None:
    """The same words, the same conversation key, so the same answer text: the parent hands the
    first answer to the second asking. Its AAD binds the first request (id and hash): refused."""
    conversation = adversary.user().conversation()
    prompt = f"Question: {QUESTION}\nAnswer:"
    params: dict[str, Any] = {"stream": False, "max_new_tokens": ANSWER_TOKENS}
    adversary.plaintexts.append(QUESTION)
    with adversary.relay.playing(on_chat(_later_question_gets_the_first_answer(rewrite))):
        *_, (_text, _tokens, first) = conversation.complete(prompt, **params)
        assert first is not None
        adversary.plaintexts.append(first.text.strip())
        error = raised(lambda: list(conversation.complete(prompt, **params)))
    assert_code(error, ErrorCode.ANSWER_INVALID)
    assert conversation.last_answer is first
    still_serving()


def test_an_answer_moved_to_the_next_question(adversary: Stack, still_serving) -> None:
    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(_later_question_gets_the_first_answer(True))):
        short(conversation)
        error = raised(lambda: short(conversation, "What is a vesting schedule?"))
    adversary.plaintexts += [QUESTION, "What is a vesting schedule?"]
    adversary.plaintexts += [a.strip() for _, a in conversation.history]
    assert_code(error, ErrorCode.ANSWER_INVALID)
    assert [q for q, _ in conversation.history] == [QUESTION]
    still_serving()


def test_a_stream_chunk_from_an_earlier_answer_spliced_in(adversary: Stack, still_serving) -> None:
    """Chunk 1 of the first answer, renumbered into the second answer of the same conversation."""
    kept: list[list[dict[str, Any]]] = []

    def splice(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        bodies = honest_answer(incoming, enclave)
        assert len(bodies) >= MIN_CHUNKS
        if not kept:
            kept.append(bodies)
            return HttpAnswer.of_lines(bodies)
        foreign = dict(kept[0][1], request_id=bodies[1]["request_id"])
        return HttpAnswer.of_lines([bodies[0], foreign, *bodies[2:]])

    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(splice)):
        streamed(adversary, conversation)
        pieces: list[str] = []

        def second() -> None:
            for piece in conversation.stream("What is an annuity?", max_new_tokens=STREAM_TOKENS):
                pieces.append(piece)

        error = raised(second)
    adversary.plaintexts.append("What is an annuity?")
    assert_code(error, ErrorCode.ANSWER_INVALID)
    assert len(pieces) <= 1  # chunk 0 was authentic; nothing after it was handed out
    assert len(conversation.history) == 1
    still_serving()


# ---- stream chunks reordered, dropped, repeated, truncated -------------------------------------


def _renumbered(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(body, seq=i) for i, body in enumerate(bodies)]


def _swap01(b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b[1], b[0], *b[2:]]


def _mark_last_final(bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [*bodies[:-1], dict(bodies[-1], final=True)]


def _cut_mid_line(bodies: list[dict[str, Any]]) -> HttpAnswer:
    answer = HttpAnswer.of_lines(bodies)
    last_start = answer.body.rstrip(b"\n").rfind(b"\n") + 1
    answer.body = answer.body[: last_start + (len(answer.body) - last_start) // 2]
    return answer


STREAM_MISCHIEF: list[tuple[str, Callable[[list[dict[str, Any]]], Any]]] = [
    ("reordered", _swap01),
    ("reordered-renumbered", lambda b: _renumbered(_swap01(b))),
    ("chunk-dropped", lambda b: [b[0], *b[2:]]),
    ("chunk-dropped-renumbered", lambda b: _renumbered([b[0], *b[2:]])),
    ("chunk-repeated", lambda b: [b[0], b[0], *b[1:]]),
    ("chunk-repeated-renumbered", lambda b: _renumbered([b[0], b[0], *b[1:]])),
    ("final-chunk-dropped", lambda b: b[:-1]),
    ("truncated-and-marked-final", lambda b: _mark_last_final(b[:-1])),
    ("cut-mid-line", _cut_mid_line),
    ("chunk-after-final", lambda b: [*b, dict(b[0], seq=len(b))]),
    ("blank-line-after-final", lambda b: HttpAnswer(body=HttpAnswer.of_lines(b).body + b"\n")),
    ("first-chunk-only", lambda b: b[:1]),
    ("nothing", lambda b: []),
]


@pytest.mark.parametrize("mischief", [pytest.param(fn, id=name) for name, fn in STREAM_MISCHIEF])
def test_a_stream_reordered_dropped_or_truncated_is_refused_by_the_client(
    adversary: Stack, still_serving, mischief: Callable[[list[dict[str, Any]]], Any]
) -> None:
    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        bodies = honest_answer(incoming, enclave)
        assert len(bodies) >= MIN_CHUNKS, "the answer was too short to tamper with its stream"
        altered = mischief(bodies)
        if isinstance(altered, HttpAnswer):
            altered.content_type = "application/x-ndjson"
            return altered
        return HttpAnswer.of_lines(altered)

    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(play)):
        error = raised(lambda: streamed(adversary, conversation))
    adversary.plaintexts.append(STREAM_QUESTION)
    refused_turn(conversation, error)
    still_serving()


# ---- one bit flipped in each field of an answer ------------------------------------------------


def _flip_answer(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def flip(answer: dict[str, Any]) -> dict[str, Any]:
        answer = dict(answer)
        value = answer.get(name)
        if name == "request_id":
            answer[name] = flip_b64url(value, 3)
        elif name == "nonce":
            answer[name] = flip_b64(value, 5)
        elif name == "ciphertext":
            answer[name] = flip_b64(value, 0)
        elif name == "tag":
            size = len(base64.b64decode(answer["ciphertext"]))
            answer["ciphertext"] = flip_b64(answer["ciphertext"], size - 1)
        elif isinstance(value, bool):
            answer[name] = not value
        else:
            answer[name] = value ^ 1
        return answer

    return flip


ANSWER_FIELDS = ["v", "request_id", "seq", "final", "nonce", "ciphertext", "tag"]


@pytest.mark.parametrize("name", ANSWER_FIELDS)
def test_a_bit_flipped_in_an_answer_field_is_refused_by_the_client(
    adversary: Stack, still_serving, name: str
) -> None:
    flip = _flip_answer(name)

    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        [answer] = honest_answer(incoming, enclave)
        return HttpAnswer.of_json(flip(answer))

    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(play)):
        error = raised(lambda: short(conversation))
    adversary.plaintexts.append(QUESTION)
    refused_turn(conversation, error)
    still_serving()


@pytest.mark.parametrize("name", ANSWER_FIELDS)
def test_a_bit_flipped_in_a_stream_chunk_field_is_refused_by_the_client(
    adversary: Stack, still_serving, name: str
) -> None:
    flip = _flip_answer(name)

    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        bodies = honest_answer(incoming, enclave)
        assert len(bodies) >= MIN_CHUNKS
        return HttpAnswer.of_lines([bodies[0], flip(bodies[1]), *bodies[2:]])

    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(play)):
        error = raised(lambda: streamed(adversary, conversation))
    refused_turn(conversation, error)
    still_serving()


@pytest.mark.parametrize(
    ("alter", "code"),
    [
        pytest.param(
            lambda a: setattr(a, "content_type", "application/x-ndjson"),
            ErrorCode.ANSWER_INVALID,
            id="content-type",
        ),
        pytest.param(
            lambda a: a.headers.append(("Content-Encoding", "gzip")),
            ErrorCode.ANSWER_INVALID,
            id="content-encoding",
        ),
        # A failure status over an authentic answer: no error body, so no code to believe.
        pytest.param(lambda a: setattr(a, "status", 502), ErrorCode.PROTOCOL_ERROR, id="status"),
    ],
)
def test_a_changed_http_header_of_an_answer_is_refused_by_the_client(
    adversary: Stack, still_serving, alter: Callable[[HttpAnswer], None], code: ErrorCode
) -> None:
    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        answer = rendered(enclave.chat(incoming.json()))
        alter(answer)
        return answer

    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(play)):
        error = raised(lambda: short(conversation))
    adversary.plaintexts.append(QUESTION)
    assert_code(error, code)
    assert conversation.last_answer is None
    still_serving()


# ---- two users' answers swapped ----------------------------------------------------------------


@pytest.mark.parametrize(
    "rewrite", [pytest.param(False, id="as-they-were"), pytest.param(True, id="ids-rewritten")]
)
def test_two_users_answers_swapped(adversary: Stack, still_serving, rewrite: bool) -> None:
    """Two users ask at once; each is relayed honestly, and each gets the other's answer."""
    meeting = Rendezvous()

    def swap(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        [mine] = honest_answer(incoming, enclave)
        _place, theirs = meeting.meet(mine)
        if rewrite:
            theirs = dict(theirs, request_id=mine["request_id"])
        return HttpAnswer.of_json(theirs)

    conversations = [adversary.user(0).conversation(), adversary.user(1).conversation()]
    questions = [QUESTION, "What is a vesting schedule?"]
    adversary.plaintexts += questions
    with adversary.relay.playing(on_chat(swap)):
        results = both(
            [
                lambda: short(conversations[0], questions[0]),
                lambda: short(conversations[1], questions[1]),
            ]
        )
    for conversation, result in zip(conversations, results, strict=True):
        assert isinstance(result, Exception), "another user's answer was accepted"
        refused_turn(conversation, result)
    still_serving()


# ---- answers the parent wrote itself -----------------------------------------------------------


def _own_keys() -> envelope.SessionKeys:
    """Keys the parent made up: it never holds the conversation's data key."""
    return envelope.derive_keys(os.urandom(32), envelope.b64url(os.urandom(16)))


def _forged_whole(content: dict[str, Any]) -> Callable[[Incoming], HttpAnswer]:
    def forge(incoming: Incoming) -> HttpAnswer:
        request = envelope.parse_request(incoming.json())
        return HttpAnswer.of_json(envelope.seal_answer(_own_keys(), request, 0, True, content))

    return forge


def _random_ciphertext(incoming: Incoming) -> HttpAnswer:
    request = envelope.parse_request(incoming.json())
    return HttpAnswer.of_json(
        {
            "v": 2,
            "request_id": request.header.request_id,
            "seq": 0,
            "final": True,
            "nonce": envelope.b64(os.urandom(12)),
            "ciphertext": envelope.b64(os.urandom(256 + 16)),
        }
    )


def _forged_stream(incoming: Incoming) -> HttpAnswer:
    request = envelope.parse_request(incoming.json())
    keys = _own_keys()
    chunks = [
        envelope.seal_answer(keys, request, 0, False, {"text": " It is", "tokens": 2}),
        envelope.seal_answer(
            keys,
            request,
            1,
            True,
            {
                "text": " a trap.",
                "tokens": 3,
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 9, "completion_tokens": 5},
            },
        ),
    ]
    return HttpAnswer.of_lines(chunks)


FINAL = {
    "text": " Forty days.",
    "tokens": 4,
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 9, "completion_tokens": 4},
}
FORGERIES: list[tuple[str, Callable[[Incoming], HttpAnswer], bool]] = [
    ("random-ciphertext", _random_ciphertext, False),
    ("sealed-under-the-parents-key", _forged_whole(FINAL), False),
    (
        "sealed-error-under-the-parents-key",
        _forged_whole({"error": {"code": "replayed_request", "message": "ask again"}}),
        False,
    ),
    ("plaintext-answer", lambda i: HttpAnswer.of_json(FINAL), False),
    ("sealed-stream-under-the-parents-key", _forged_stream, True),
]


@pytest.mark.parametrize(
    ("forge", "stream"),
    [pytest.param(forge, stream, id=name) for name, forge, stream in FORGERIES],
)
def test_an_answer_the_parent_wrote_itself_is_refused_by_the_client(
    adversary: Stack, still_serving, forge: Callable[[Incoming], HttpAnswer], stream: bool
) -> None:
    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        return forge(incoming)  # the enclave never sees the question

    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(play)):
        if stream:
            error = raised(lambda: streamed(adversary, conversation))
        else:
            error = raised(lambda: short(conversation))
    adversary.plaintexts.append(QUESTION)
    refused_turn(conversation, error)
    assert "Forty days" not in str(error) and "trap" not in str(error)
    still_serving()


# ---- HTTP lengths that lie ---------------------------------------------------------------------


def _declared(delta: int) -> Callable[[HttpAnswer], HttpAnswer]:
    def lie(answer: HttpAnswer) -> HttpAnswer:
        answer.content_length = len(answer.body) + delta
        return answer

    return lie


def _chunked_lie(answer: HttpAnswer) -> HttpAnswer:
    """Chunked transfer whose one chunk claims 4 KiB more than it carries."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: " + str(answer.content_type).encode() + b"\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    size = f"{len(answer.body) + 4096:x}".encode()
    return HttpAnswer(raw=head + size + b"\r\n" + answer.body)


def test_a_stream_stalled_before_its_final_chunk_times_out(adversary: Stack, still_serving) -> None:
    """The parent sends all but the final chunk and then holds the connection, silent: the
    client gives up after its own timeout (every wait is bounded), keeping nothing."""

    def stall(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        answer = HttpAnswer.of_lines(honest_answer(incoming, enclave))
        last = answer.body.rstrip(b"\n").rfind(b"\n") + 1
        answer.content_length = len(answer.body)  # the whole answer declared...
        answer.body = answer.body[:last]  # ...the final chunk withheld
        answer.hold_s = 10 * STALL_TIMEOUT_S
        return answer

    conversation = adversary.client(timeout_s=STALL_TIMEOUT_S).conversation()
    started = time.monotonic()
    with adversary.relay.playing(on_chat(stall)):
        error = raised(lambda: streamed(adversary, conversation))
    assert time.monotonic() - started < 5 * STALL_TIMEOUT_S
    assert_code(error, ErrorCode.ENCLAVE_TIMEOUT)
    assert conversation.history == [] and conversation.last_answer is None
    still_serving()


@pytest.mark.parametrize(
    ("lie", "stream"),
    [
        pytest.param(_declared(+100), False, id="longer-than-sent"),
        pytest.param(_declared(-20), False, id="shorter-than-sent"),
        pytest.param(_declared(+100), True, id="stream-longer-than-sent"),
        pytest.param(_declared(-20), True, id="stream-shorter-than-sent"),
        pytest.param(_chunked_lie, False, id="chunk-size-lies"),
    ],
)
def test_an_http_length_that_lies_is_refused_by_the_client(
    adversary: Stack, still_serving, lie: Callable[[HttpAnswer], HttpAnswer], stream: bool
) -> None:
    def play(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
        return lie(rendered(enclave.chat(incoming.json())))

    conversation = adversary.user().conversation()
    with adversary.relay.playing(on_chat(play)):
        if stream:
            error = raised(lambda: streamed(adversary, conversation))
        else:
            error = raised(lambda: short(conversation))
    adversary.plaintexts.append(QUESTION)
    refused_turn(conversation, error)
    still_serving()
