"""The OpenAI-compatible gateway (chatbot/gateway.py) with Flask's test client.

Requests go through the real SecureChatClient to the stand-in proxy + enclave of conftest.py
(real envelope sealing over real TLS; KMS replaced at its boundary). A fake client object stands
in for SecureChatClient only to raise what the stand-in cannot (a failed verification).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chatbot import cli, gateway
from chatbot.gateway import (
    AnswerStream,
    GatewayConfig,
    GatewayConfigError,
    StopScanner,
    chat_prompt,
    create_app,
    parse_chat,
    parse_completion,
    sse,
)
from chatbot.verify import aws_root
from protocol.attestation import AttestationError
from protocol.errors import ErrorCode, NitroError
from protocol.prompt import format_prompt

PCR0 = "ab" * 48
Q = "What is a vesting schedule?"
# The stand-in's answer to a one-question prompt, as a chat reply (leading space stripped).
ANSWER = "It is the timetable of vesting, turn 1, in plain words."
API_KEY = "k" * 20
JSON = "application/json"


def config(**overrides: Any) -> GatewayConfig:
    values: dict[str, Any] = {
        "model_id": "tiny-bloom",
        "pcrs": {0: PCR0, 1: "cd" * 48, 2: "ef" * 48},
        "key_policy_checked": True,
    }
    values.update(overrides)
    return GatewayConfig(**values)


@pytest.fixture
def app_for(client):
    def make(clients: list[Any] | None = None, **overrides: Any) -> Any:
        app = create_app(config(**overrides), clients or [client])
        return app.test_client()

    return make


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "any", "messages": [{"role": "user", "content": Q}], **extra}


def events(data: bytes) -> list[Any]:
    """The SSE stream's data payloads, [DONE] as the string."""
    assert data.endswith(b"\n\n")
    out = []
    for block in data.decode().split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ---- the chat template --------------------------------------------------------------------------


def test_one_user_message_is_the_trained_prompt_format():
    assert chat_prompt([("user", Q)]) == format_prompt(Q) == f"Question: {Q}\nAnswer:"


def test_a_conversation_with_a_system_message():
    prompt = chat_prompt(
        [
            ("system", "You answer questions about benefits."),
            ("user", "What is a 401(k)?"),
            ("assistant", "A retirement plan."),
            ("developer", "Be brief."),
            ("user", "Who runs it?"),
        ]
    )
    assert prompt == (
        "You answer questions about benefits.\n\nBe brief.\n\n"
        "Question: What is a 401(k)?\nAnswer: A retirement plan.\n\n"
        "Question: Who runs it?\nAnswer:"
    )


def test_user_and_assistant_turns_are_the_clients_history_format():
    history = [("q1", "a1"), ("q2", "a2")]
    messages = [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    assert chat_prompt([*messages, ("user", "q3")]) == format_prompt("q3", history)


def test_consecutive_messages_of_one_role_are_joined():
    prompt = chat_prompt([("user", "first part"), ("user", "second part")])
    assert prompt == "Question: first part\nsecond part\nAnswer:"


@pytest.mark.parametrize(
    ("messages", "why"),
    [
        ([("user", "q"), ("assistant", "a")], "last message"),
        ([("assistant", "a"), ("user", "q")], "must follow a user"),
        ([("system", "s")], "last message"),
        ([("user", "   ")], "empty"),
        ([("tool", "x"), ("user", "q")], "unsupported role"),
    ],
)
def test_conversations_that_do_not_fit_are_refused(messages, why):
    with pytest.raises(ValueError, match=why):
        chat_prompt(messages)


# ---- parameters ---------------------------------------------------------------------------------


def test_parameters_map_to_the_question():
    gen = parse_chat(
        chat_body(max_tokens=40, temperature=0, top_p=0.5, seed=7, stop="\n", stream=True)
    )
    assert gen.prompt == format_prompt(Q)
    assert gen.params() == {"max_new_tokens": 40, "temperature": 0.0, "top_p": 0.5, "seed": 7}
    assert gen.stop == ("\n",) and gen.stream and not gen.include_usage


def test_openai_defaults_and_max_completion_tokens():
    gen = parse_chat(chat_body())
    assert (gen.temperature, gen.top_p, gen.seed, gen.stop, gen.stream) == (
        1.0,
        1.0,
        None,
        (),
        False,
    )
    assert gen.max_new_tokens == gateway.DEFAULT_CHAT_MAX_TOKENS
    assert parse_chat(chat_body(max_completion_tokens=9)).max_new_tokens == 9
    assert parse_chat(chat_body(max_tokens=9, max_completion_tokens=9)).max_new_tokens == 9
    assert parse_completion({"model": "m", "prompt": "x"}).max_new_tokens == 16  # as OpenAI


def test_text_parts_and_a_one_prompt_list_are_accepted():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    gen = parse_chat({"model": "m", "messages": [{"role": "user", "content": parts}]})
    assert gen.prompt == "Question: a\nb\nAnswer:"
    assert parse_completion({"model": "m", "prompt": ["Once upon"]}).prompt == "Once upon"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 513}, "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"best_guess": 1}, "best_guess"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": Q}] * 129}, "messages"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        (
            {"messages": [{"role": "user", "content": Q, "tool_calls": []}]},
            "messages[0].tool_calls",
        ),
    ],
)
def test_invalid_parameters_name_the_parameter(extra, param):
    with pytest.raises(gateway.GatewayError) as caught:
        parse_chat(chat_body(**extra))
    assert caught.value.status == 400 and caught.value.param == param
    assert caught.value.body()["error"]["type"] == "invalid_request_error"


def test_ignored_bookkeeping_and_neutral_parameters_are_accepted():
    gen = parse_chat(chat_body(user="u1", metadata={}, presence_penalty=0, logprobs=False))
    assert gen.prompt == format_prompt(Q)


# ---- stop sequences ------------------------------------------------------------------------------


def test_a_stop_sequence_split_across_chunks_is_found_and_held_back():
    scanner = StopScanner(["END"])
    assert scanner.feed("one two E") == ("one two ", False)  # "E" may begin END: held
    assert scanner.feed("N") == ("", False)
    assert scanner.feed("D and more") == ("", True)


def test_a_held_tail_that_is_not_a_stop_is_released():
    scanner = StopScanner(["END", "\n\n"])
    assert scanner.feed("a\n") == ("a", False)
    assert scanner.feed("b EN") == ("\nb ", False)
    assert scanner.flush() == "EN"


def test_the_earliest_of_several_stops_wins():
    assert StopScanner(["c", "b"]).feed("abcd") == ("a", True)


class Final:
    def __init__(self, finish: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.finish_reason = finish
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


class Chunks:
    """(text, tokens, final) triples as Conversation.complete yields them; records close()."""

    def __init__(self, items: list[tuple[str, int, Any]]) -> None:
        self._items = iter(items)
        self.closed_early = False
        self.done = False

    def __iter__(self) -> Chunks:
        return self

    def __next__(self) -> tuple[str, int, Any]:
        try:
            return next(self._items)
        except StopIteration:
            self.done = True
            raise

    def close(self) -> None:
        self.closed_early = not self.done and next(self._items, None) is not None


def test_a_stop_cancels_the_rest_and_counts_the_tokens_received():
    chunks = Chunks([(" one two", 2, None), (" three", 1, None), (" four", 1, Final("stop", 5, 4))])
    reader = AnswerStream(chunks, ["thr"], lstrip=True)
    assert "".join(reader) == "one two "
    assert chunks.closed_early  # the final chunk was never read: the answer was cancelled
    assert reader.finish_reason == "stop"
    assert reader.usage == {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}


def test_an_answer_read_to_its_end_has_the_enclaves_usage_and_reason():
    chunks = Chunks([(" one", 1, None), (" tw", 1, Final("length", 5, 2))])
    reader = AnswerStream(chunks, ["two"], lstrip=False)
    assert "".join(reader) == " one tw"  # the held "tw" is released at the end
    assert reader.finish_reason == "length" and not chunks.closed_early
    assert reader.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_sse_format():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'


# ---- the app, through the real client to the stand-in enclave ------------------------------------


def test_chat_completion_seals_the_templated_prompt(app_for, chat_server):
    body = chat_body(max_tokens=40, temperature=0, top_p=0.9, seed=3)
    reply = app_for().post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.get_json()
    obj = reply.get_json()
    assert obj["object"] == "chat.completion" and obj["id"].startswith("chatcmpl-")
    assert obj["model"] == "tiny-bloom"
    [choice] = obj["choices"]
    assert choice["message"] == {"role": "assistant", "content": ANSWER}
    assert choice["finish_reason"] == "stop"
    words = len(ANSWER.split(" "))  # the stand-in streams one word (one token) per chunk
    assert obj["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": words,
        "total_tokens": 12 + words,
    }
    [seen] = chat_server.state.seen
    assert seen.question == {
        "prompt": format_prompt(Q),
        "max_new_tokens": 40,
        "temperature": 0.0,
        "top_p": 0.9,
        "seed": 3,
    }


def test_one_data_key_per_request(app_for, chat_server, stub_kms):
    app = app_for()
    for _ in range(2):
        assert app.post("/v1/chat/completions", json=chat_body()).status_code == 200
    sessions = {seen.header.session for seen in chat_server.state.seen}
    assert len(sessions) == 2 and len(stub_kms.calls) == 2


def test_streamed_chat_is_sse_chunks_that_reassemble_to_the_whole_answer(app_for):
    app = app_for()
    whole = app.post("/v1/chat/completions", json=chat_body()).get_json()
    reply = app.post("/v1/chat/completions", json=chat_body(stream=True))
    assert reply.status_code == 200 and reply.mimetype == "text/event-stream"
    parts = events(reply.get_data())
    assert parts[-1] == "[DONE]"
    chunks = parts[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert len([d for d in deltas if d]) > 3  # as the enclave's chunks came, not all at once
    assert "".join(deltas) == whole["choices"][0]["message"]["content"] == ANSWER


def test_include_usage_adds_a_usage_chunk(app_for):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    parts = events(app_for().post("/v1/chat/completions", json=body).get_data())
    usage_chunk = parts[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["prompt_tokens"] == 12


def test_completion_sends_the_prompt_verbatim_and_keeps_the_text(app_for, chat_server):
    prompt = "Question: a\nAnswer: b\n\nQuestion: c\nAnswer:"
    reply = app_for().post("/v1/completions", json={"model": "m", "prompt": prompt})
    obj = reply.get_json()
    assert obj["object"] == "text_completion"
    assert obj["choices"][0]["text"] == " It is the timetable of vesting, turn 2, in plain words."
    [seen] = chat_server.state.seen
    assert seen.question["prompt"] == prompt and seen.question["max_new_tokens"] == 16


def test_streamed_completion(app_for):
    reply = app_for().post("/v1/completions", json={"model": "m", "prompt": "p", "stream": True})
    parts = events(reply.get_data())
    assert parts[-1] == "[DONE]" and all(p["object"] == "text_completion" for p in parts[:-1])
    text = "".join(p["choices"][0]["text"] for p in parts[:-1])
    assert text == " It is the timetable of vesting, turn 0, in plain words."
    assert parts[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_stop_sequence_cuts_the_answer_and_cancels_the_enclave_stream(app_for, chat_server):
    # The stand-in holds its stream after the first chunk ("It") until `gate` is set, which this
    # test never does: the reply can only complete because the gateway cancelled the rest.
    chat_server.state.script.mode = "gate"
    started = time.monotonic()
    reply = app_for().post("/v1/chat/completions", json=chat_body(stop=["t"]))
    assert time.monotonic() - started < 5
    assert chat_server.state.gate_used
    obj = reply.get_json()
    assert obj["choices"][0]["message"]["content"] == "I"
    assert obj["choices"][0]["finish_reason"] == "stop"
    assert obj["usage"]["completion_tokens"] == 1


def test_models_lists_the_enclave_model_with_its_verified_pcr0(app_for):
    obj = app_for().get("/v1/models").get_json()
    [model] = obj["data"]
    assert obj["object"] == "list" and model["id"] == "tiny-bloom" and model["object"] == "model"
    assert model["metadata"]["pcr0"] == PCR0 and model["metadata"]["pcrs"]["PCR0"] == PCR0
    one = app_for().get("/v1/models/tiny-bloom").get_json()
    assert one["id"] == "tiny-bloom"
    assert app_for().get("/v1/models/gpt-4o").status_code == 404


# ---- errors ------------------------------------------------------------------------------------


def openai_error(reply: Any) -> dict[str, Any]:
    obj = reply.get_json()
    assert set(obj) == {"error"} and set(obj["error"]) == {"message", "type", "param", "code"}
    return obj["error"]


def test_an_invalid_parameter_is_400_before_anything_is_sent(app_for, chat_server, stub_kms):
    reply = app_for().post("/v1/chat/completions", json=chat_body(n=3))
    assert reply.status_code == 400
    error = openai_error(reply)
    assert error["param"] == "n" and error["code"] == "invalid_parameters"
    assert chat_server.state.seen == [] and stub_kms.calls == []


@pytest.mark.parametrize(
    ("send", "status", "code"),
    [
        (
            lambda app: app.post("/v1/chat/completions", data=b"{not json", content_type=JSON),
            400,
            "invalid_parameters",
        ),
        (
            lambda app: app.post("/v1/chat/completions", data=b"x" * (1 << 21), content_type=JSON),
            413,
            "payload_too_large",
        ),
        (lambda app: app.get("/v1/nothing"), 404, "not_found"),
        (lambda app: app.get("/v1/chat/completions"), 405, "method_not_allowed"),
    ],
)
def test_http_errors_are_in_openai_format(app_for, send, status, code):
    reply = send(app_for())
    assert reply.status_code == status
    assert openai_error(reply)["code"] == code


def test_a_sealed_enclave_error_maps_to_its_status_with_our_text(app_for, chat_server, kit):
    chat_server.state.script.mode = "sealed_error"  # prompt_too_long, with a lying message
    reply = app_for().post("/v1/chat/completions", json=chat_body(stream=True))
    assert reply.status_code == 400
    error = openai_error(reply)
    assert error["code"] == "prompt_too_long"
    assert error["message"] == ErrorCode.PROMPT_TOO_LONG.client_text
    assert kit.LIE not in reply.get_data(as_text=True)


def test_a_busy_enclave_is_503_with_retry_after(app_for, chat_server):
    script = chat_server.state.script
    script.mode, script.status = "http_error", 503
    script.error_body = json.dumps(NitroError(ErrorCode.OVERLOADED).to_wire()).encode()
    reply = app_for().post("/v1/chat/completions", json=chat_body())
    assert reply.status_code == 503
    assert reply.headers["Retry-After"] == str(gateway.RETRY_AFTER_S)
    error = openai_error(reply)
    assert error["code"] == "overloaded" and error["type"] == "server_error"
    assert error["message"] == ErrorCode.OVERLOADED.client_text


def test_a_tampered_answer_is_502_answer_invalid(app_for, chat_server):
    chat_server.state.script.mode = "tamper"
    reply = app_for().post("/v1/chat/completions", json=chat_body(stream=True))
    assert reply.status_code == 502
    assert openai_error(reply)["code"] == "answer_invalid"


class RefusedClient:
    """At the SecureChatClient boundary: an enclave that fails verification (the stand-in
    proxy cannot present another image's document to a client that already verified)."""

    def conversation(self) -> RefusedClient:
        return self

    def complete(self, prompt: str, **params: Any) -> Iterator[Any]:
        raise AttestationError("pcr0", f"PCR0 is {'11' * 48}, expected {PCR0}")
        yield  # a generator, as Conversation.complete returns


def test_a_failed_verification_is_502_naming_the_check(app_for):
    reply = app_for([RefusedClient()]).post("/v1/chat/completions", json=chat_body())
    assert reply.status_code == 502
    error = openai_error(reply)
    assert error["code"] == "attestation_invalid"
    assert error["message"].startswith("enclave verification failed: pcr0: PCR0 is 1111")


def test_busy_is_503_overloaded_with_retry_after(app_for, chat_server):
    chat_server.state.script.mode = "gate"
    app = app_for()  # one client: one request at a time
    held = app.post("/v1/chat/completions", json=chat_body(stream=True), buffered=False)
    try:
        assert held.status_code == 200
        busy = app.post("/v1/chat/completions", json=chat_body())
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
        assert openai_error(busy)["code"] == "overloaded"
    finally:
        chat_server.state.gate.set()
        held.close()
    assert app.post("/v1/chat/completions", json=chat_body()).status_code == 200  # released


def test_the_api_key_is_required_when_configured(app_for):
    app = app_for(api_key=API_KEY)
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key-0000000000"},
        {"Authorization": API_KEY},
    ):
        reply = app.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert reply.status_code == 401
        assert openai_error(reply)["type"] == "authentication_error"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert app.get("/v1/models").status_code == 401
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert app.post("/v1/chat/completions", json=chat_body(), headers=good).status_code == 200


def test_one_content_free_log_line_per_request(app_for, caplog):
    canary = "canary-5e1f2b9c"
    app = app_for()
    with caplog.at_level(logging.INFO, logger="gateway"):
        body = {"model": canary, "messages": [{"role": "user", "content": f"{Q} {canary}"}]}
        for extra, status in (({}, 200), ({"stream": True}, 200), ({"n": 2}, 400)):
            # The line is written when the server closes the response (after a stream's end).
            with app.post("/v1/chat/completions", json={**body, **extra}) as reply:
                assert reply.status_code == status
                reply.get_data()
    lines = [r for r in caplog.records if r.name == "gateway"]
    assert [r.getMessage() for r in lines] == ["request"] * 3
    fields = [r.fields for r in lines]
    assert [f["status"] for f in fields] == [200, 200, 400]
    assert fields[1]["stream"] is True and fields[1]["completion_tokens"] > 0
    assert fields[2]["code"] == "invalid_parameters"
    assert all(len(f["request_id"]) == 24 and f["ms"] >= 0 for f in fields)
    text = caplog.text + json.dumps(fields)
    assert canary not in text and "timetable" not in text


# ---- starting ------------------------------------------------------------------------------------


def test_listen_addresses():
    assert gateway.check_listen("127.0.0.1:8088", None) == ("127.0.0.1", 8088)
    assert gateway.check_listen("[::1]:0", None) == ("::1", 0)
    assert gateway.check_listen("localhost:1", None) == ("localhost", 1)
    assert gateway.check_listen("0.0.0.0:8088", API_KEY) == ("0.0.0.0", 8088)  # noqa: S104
    with pytest.raises(GatewayConfigError, match="not a loopback address"):
        gateway.check_listen("0.0.0.0:8088", None)  # noqa: S104
    for bad in ("8088", "host:", "host:99999", ":80"):
        with pytest.raises(GatewayConfigError, match="HOST:PORT"):
            gateway.parse_listen(bad)


def test_api_key_file(tmp_path):
    path = tmp_path / "key"
    path.write_text(f"  {API_KEY}\n")
    assert gateway.read_api_key(path) == API_KEY
    path.write_text("short")
    with pytest.raises(GatewayConfigError, match="shorter than 16"):
        gateway.read_api_key(path)
    with pytest.raises(GatewayConfigError, match="cannot read"):
        gateway.read_api_key(tmp_path / "missing")


def test_serve_refuses_a_public_address_without_a_key_before_anything_else(tmp_path, capsys):
    # No local stack in tmp_path: the refusal must come first (exit 2, usage), naming why.
    code = cli.main(["--local", "--state-dir", str(tmp_path), "serve", "--listen", "0.0.0.0:8088"])  # noqa: S104
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0" in err and "--api-key-file" in err


def test_serve_options_before_or_after_the_command(tmp_path, capsys):
    # Either order reaches the profile check (no stack there): the options were understood.
    for argv in (
        ["--local", "--state-dir", str(tmp_path), "serve"],
        ["serve", "--local", "--state-dir", str(tmp_path), "--listen", "127.0.0.1:0"],
    ):
        assert cli.main(argv) == cli.EXIT_ERROR
        assert f"no local stack in {tmp_path}" in capsys.readouterr().err


def test_parallel_requests_up_to_the_pool_size_are_served(chat_server, tls_files, stub_kms, kit):
    from chatbot.client import SecureChatClient
    from chatbot.profile import ClientSettings

    settings = ClientSettings(
        proxy_url=chat_server.url,
        key_id=kit.KEY_ID,
        region="us-east-1",
        ca_bundle=str(tls_files.ca),
    )
    clients = [SecureChatClient(settings, kms_client=stub_kms) for _ in range(3)]
    app = create_app(config(), clients)
    # The stand-in answers none until all three are inside it at once: served one at a time,
    # the barrier would break and each would fail.
    chat_server.state.script.together = threading.Barrier(3)
    results: list[int] = []

    def one() -> None:
        results.append(app.test_client().post("/v1/chat/completions", json=chat_body()).status_code)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [200, 200, 200]


def test_a_stream_that_breaks_after_its_first_text_ends_with_an_error_event(app_for, chat_server):
    chat_server.state.script.mode = "no_final"  # every chunk but no final one: truncated
    reply = app_for().post("/v1/chat/completions", json=chat_body(stream=True))
    assert reply.status_code == 200  # the first text was out before the break was known
    parts = events(reply.get_data())
    assert "[DONE]" not in parts
    assert parts[-1]["error"]["code"] == "answer_invalid"
    assert parts[-1]["error"]["type"] == "server_error"
    assert any(p.get("choices") and p["choices"][0]["delta"].get("content") for p in parts[:-1])


def test_only_json_bodies_are_read(app_for, chat_server):
    # A web page can send text/plain cross-origin without asking; JSON needs a preflight.
    body = json.dumps(chat_body()).encode()
    reply = app_for().post("/v1/chat/completions", data=body, content_type="text/plain")
    assert reply.status_code == 415
    assert openai_error(reply)["code"] == "unsupported_media_type"
    assert chat_server.state.seen == []


def test_a_foreign_host_name_is_refused_on_loopback(app_for, chat_server):
    # DNS rebinding: a page's own name resolving to 127.0.0.1.
    app = app_for()
    reply = app.post("/v1/chat/completions", json=chat_body(), headers={"Host": "evil.example"})
    assert reply.status_code == 400 and chat_server.state.seen == []
    for host in ("127.0.0.1:8088", "localhost", "[::1]:8088"):
        assert app.get("/v1/models", headers={"Host": host}).status_code == 200
    anywhere = app_for(allowed_hosts=None)
    assert anywhere.get("/v1/models", headers={"Host": "gw.internal:8088"}).status_code == 200


# ---- verification before serving (documents from the real NSM emulator) -------------------------


@pytest.fixture
def verifying(chat_server, tls_files, stub_kms, kit, enclave):
    from chatbot.client import SecureChatClient
    from protocol.attestation import load_pem_root

    root = load_pem_root(enclave.root_pem)
    settings = kit.make_settings(chat_server, tls_files)

    def new_client(pcrs: Any) -> SecureChatClient:
        if pcrs is None:
            return SecureChatClient(settings, kms_client=stub_kms)
        return SecureChatClient(
            settings, kms_client=stub_kms, expected_pcrs=pcrs, attestation_root=root
        )

    return new_client, root


def test_expected_pcrs_are_verified_before_serving(verifying, enclave, chat_server, stub_kms):
    new_client, root = verifying
    expected = {i: enclave.pcrs[i] for i in (0, 1, 2)}
    first, verified = gateway.verify_before_serving(
        new_client, new_client(None), root=root, expected=expected, allow_debug=False
    )
    assert verified.pcrs == expected and not verified.pinned_on_first_use
    assert first.verified is not None and len(enclave.nonces) == 1
    # The key policy could not be read (the stub refuses GetKeyPolicy): said, not hidden.
    assert not verified.key_policy_checked
    assert any("key policy could not be checked" in w for w in verified.warnings)
    assert chat_server.state.seen == [] and stub_kms.calls == []  # nothing asked yet


def test_without_expected_pcrs_the_presented_ones_are_pinned(verifying, enclave):
    new_client, root = verifying
    _first, verified = gateway.verify_before_serving(
        new_client, new_client(None), root=root, expected=None, allow_debug=False
    )
    assert verified.pinned_on_first_use
    assert verified.pcrs == {i: enclave.pcrs[i] for i in (0, 1, 2)}
    assert any("trust on first use" in w for w in verified.warnings)
    assert len(enclave.nonces) == 2  # a first look, then the pinned verification


def test_a_wrong_pcr0_stops_the_start_naming_the_check(verifying, enclave, chat_server, stub_kms):
    new_client, root = verifying
    expected = {0: bytes(48), 1: enclave.pcrs[1], 2: enclave.pcrs[2]}
    with pytest.raises(AttestationError) as caught:
        gateway.verify_before_serving(
            new_client, new_client(None), root=root, expected=expected, allow_debug=False
        )
    assert caught.value.check == "pcr0"
    assert chat_server.state.seen == [] and stub_kms.calls == []


def test_a_document_from_another_root_is_refused_even_without_expected_pcrs(verifying, enclave):
    new_client, _root = verifying
    with pytest.raises(AttestationError) as caught:
        # The stand-in's documents chain to the emulator's CA, not to AWS's root.
        gateway.verify_before_serving(
            new_client, new_client(None), root=aws_root(), expected=None, allow_debug=False
        )
    assert caught.value.check == "root"
