"""SecureChatClient and Conversation against a real local HTTPS server playing proxy + enclave.

The server opens each request with the real envelope code (keys derived from the data key) and
seals its answers the same way. KMS is replaced at its boundary only: a stub object answering
GenerateDataKey with a fixed key (and, for boto3, a tiny KMS JSON-protocol server). The real KMS
emulator is exercised by the end-to-end tests.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from chatbot.client import ChatError, SecureChatClient
from chatbot.profile import ClientSettings, ConfigError, load_profile
from protocol import envelope
from protocol.errors import ErrorCode
from protocol.prompt import format_prompt

Q1 = "What is a vesting schedule?"
Q2 = "And what is a cliff?"
Q3 = "Thanks, anything else?"


def test_ask_round_trip(client, chat_server, stub_kms, kit):
    answer = client.ask(Q1, max_new_tokens=32, temperature=0.5, top_p=0.9, seed=7)

    [seen] = chat_server.state.seen
    assert seen.question == {
        "prompt": format_prompt(Q1),
        "max_new_tokens": 32,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
    }
    assert seen.header.stream is False
    assert seen.header.key_id == kit.KEY_ID
    assert abs(seen.header.sent_at - time.time() * 1000) < 10_000
    assert answer.text == kit.answer_text(seen.question)
    assert (answer.finish_reason, answer.prompt_tokens, answer.completion_tokens) == ("stop", 12, 1)
    assert answer.request_id == seen.header.request_id
    envelope.unb64url(answer.request_id, "request_id", envelope.REQUEST_ID_BYTES)

    [call] = stub_kms.calls
    assert call["KeySpec"] == "AES_256" and call["KeyId"] == kit.KEY_ID
    assert call["EncryptionContext"] == {"app": "nitro-llm", "session": seen.header.session}
    envelope.unb64url(seen.header.session, "session", envelope.SESSION_BYTES)
    assert seen.edk == b"edk-1"


def test_each_request_has_a_fresh_request_id(client, chat_server):
    conversation = client.conversation()
    conversation.ask(Q1)
    conversation.ask(Q2)
    ids = [s.header.request_id for s in chat_server.state.seen]
    assert len(set(ids)) == 2


def test_stream_yields_chunks_in_order_and_matches_ask(client, chat_server, kit):
    whole = client.ask(Q1).text
    pieces = list(client.conversation().stream(Q1))

    seen = chat_server.state.seen[-1]
    assert seen.header.stream is True
    assert pieces == kit.answer_chunks(seen.question)
    assert len(pieces) > 3
    assert "".join(pieces) == whole


def test_stream_yields_before_the_answer_is_complete(client, chat_server):
    chat_server.state.script.mode = "gate"
    stream = client.conversation().stream(Q1)
    first = next(stream)  # the server is holding every later chunk until the gate opens
    assert first.strip()
    assert chat_server.state.gate_used and not chat_server.state.gate.is_set()
    chat_server.state.gate.set()
    assert len(list(stream)) > 1


def test_stream_updates_history_and_last_answer_at_the_final_chunk(client, chat_server, kit):
    conversation = client.conversation()
    stream = conversation.stream(Q1)
    next(stream)
    assert conversation.history == [] and conversation.last_answer is None
    rest = list(stream)
    text = kit.answer_text(chat_server.state.seen[-1].question)
    assert conversation.history == [(Q1, text)]
    assert conversation.last_answer is not None and conversation.last_answer.text == text
    assert rest


def test_history_grows_and_is_sent_in_the_next_prompt(client, chat_server, stub_kms):
    conversation = client.conversation()
    a1 = conversation.ask(Q1)
    a2 = conversation.ask(Q2)

    assert conversation.history == [(Q1, a1.text), (Q2, a2.text)]
    second = chat_server.state.seen[1].question["prompt"]
    assert second == format_prompt(Q2, [(Q1, a1.text)])
    assert Q1 in second and a1.text.strip() in second
    # One data key for the whole conversation.
    assert len(stub_kms.calls) == 1
    sessions = {s.header.session for s in chat_server.state.seen}
    assert sessions == {conversation.session}


def test_key_rotates_after_max_turns_and_keeps_history(chat_server, tls_files, kit):
    kms = kit.StubKms()
    settings = kit.make_settings(chat_server, tls_files, max_turns_per_key=2)
    conversation = SecureChatClient(settings, kms_client=kms).conversation()
    a1 = conversation.ask(Q1)
    a2 = conversation.ask(Q2)
    conversation.ask(Q3)

    assert len(kms.calls) == 2
    sessions = [s.header.session for s in chat_server.state.seen]
    assert sessions[0] == sessions[1] != sessions[2]
    assert kms.calls[1]["EncryptionContext"]["session"] == sessions[2]
    assert [s.edk for s in chat_server.state.seen] == [b"edk-1", b"edk-1", b"edk-2"]
    third = chat_server.state.seen[2].question["prompt"]
    assert third == format_prompt(Q3, [(Q1, a1.text), (Q2, a2.text)])


def test_key_rotates_after_max_age(chat_server, tls_files, kit):
    kms = kit.StubKms()
    settings = kit.make_settings(chat_server, tls_files, max_key_age_s=0.001)
    conversation = SecureChatClient(settings, kms_client=kms).conversation()
    conversation.ask(Q1)
    time.sleep(0.01)
    conversation.ask(Q2)
    assert len(kms.calls) == 2
    assert len({s.header.session for s in chat_server.state.seen}) == 2


@pytest.mark.parametrize(
    ("mode", "stream"),
    [
        ("tamper", False),
        ("tamper", True),
        ("wrong_seq", False),
        ("wrong_seq", True),
        ("no_final", False),
        ("no_final", True),
        ("replay", False),
        ("replay", True),
        ("swap_request_id", False),
        ("swap_request_id", True),
        ("after_final", True),
        ("trailing_garbage", False),
        ("bad_shape", False),
        ("wrong_type", True),
    ],
)
def test_invalid_answers_are_refused(client, chat_server, mode, stream):
    conversation = client.conversation()
    if mode == "replay":
        conversation.ask(Q1)  # an earlier, genuine answer to replay
    history = list(conversation.history)
    chat_server.state.script.mode = mode

    with pytest.raises(ChatError) as info:
        if stream:
            list(conversation.stream(Q2))
        else:
            conversation.ask(Q2)
    assert info.value.code is ErrorCode.ANSWER_INVALID
    assert conversation.history == history  # a refused answer never joins the conversation


def test_data_after_final_is_refused_before_the_final_text_is_given(client, chat_server, kit):
    chat_server.state.script.mode = "after_final"
    got: list[str] = []
    with pytest.raises(ChatError) as info:
        for piece in client.conversation().stream(Q1):
            got.append(piece)
    assert info.value.code is ErrorCode.ANSWER_INVALID
    expected = kit.answer_chunks(chat_server.state.seen[-1].question)
    assert got == expected[:-1]


def test_http_error_keeps_the_server_words_aside(client, chat_server, kit):
    script = chat_server.state.script
    script.mode, script.status = "http_error", 503
    script.error_body = b'{"error": {"code": "not_ready", "message": "' + kit.LIE.encode() + b'"}}'
    with pytest.raises(ChatError) as info:
        client.ask(Q1)
    error = info.value
    assert error.code is ErrorCode.NOT_READY
    assert error.server_message == kit.LIE and not error.authenticated
    assert kit.LIE not in str(error) and kit.LIE not in error.diagnostics()
    assert error.diagnostics() == f"error: not_ready: {ErrorCode.NOT_READY.client_text}"


@pytest.mark.parametrize(
    "body",
    [
        b'{"error": {"code": "made_up_code", "message": "x"}}',
        b"<html>bad gateway</html>",
        b"",
        b"[" * 5000,  # nested deeper than json's recursion limit: RecursionError, not JSON's
    ],
)
def test_http_error_without_a_known_code_is_a_protocol_error(client, chat_server, body):
    script = chat_server.state.script
    script.mode, script.status, script.error_body = "http_error", 502, body
    with pytest.raises(ChatError) as info:
        client.ask(Q1)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_sealed_error_gives_its_code(client, chat_server, kit):
    chat_server.state.script.mode = "sealed_error"
    conversation = client.conversation()
    for call in (lambda: conversation.ask(Q1), lambda: list(conversation.stream(Q1))):
        with pytest.raises(ChatError) as info:
            call()
        assert info.value.code is ErrorCode.PROMPT_TOO_LONG
        assert info.value.authenticated and info.value.server_message == kit.LIE
    assert conversation.history == []


def test_tls_is_verified_against_the_ca_bundle(chat_server, tls_files, kit):
    settings = kit.make_settings(chat_server, tls_files, ca_bundle=str(tls_files.other_ca))
    kms = kit.StubKms()
    with pytest.raises(ChatError) as info:
        SecureChatClient(settings, kms_client=kms).ask(Q1)
    assert info.value.code is ErrorCode.ENCLAVE_UNAVAILABLE
    assert "TLS" in (info.value.hint or "")
    assert chat_server.state.seen == []


def test_unreachable_proxy(tls_files, kit, chat_server):
    settings = kit.make_settings(chat_server, tls_files, proxy_url="https://127.0.0.1:9")
    with pytest.raises(ChatError) as info:
        SecureChatClient(settings, kms_client=kit.StubKms()).ask(Q1)
    assert info.value.code is ErrorCode.ENCLAVE_UNAVAILABLE
    assert "127.0.0.1:9" in (info.value.hint or "")


def test_a_stalled_answer_times_out(chat_server, tls_files, kit):
    chat_server.state.script.delay_s = 1.5
    settings = kit.make_settings(chat_server, tls_files, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ChatError) as info:
        SecureChatClient(settings, kms_client=kit.StubKms()).ask(Q1)
    assert info.value.code is ErrorCode.ENCLAVE_TIMEOUT
    assert time.monotonic() - started < 1.4


def test_oversized_answers_are_refused(chat_server, tls_files, kit):
    small = kit.make_settings(chat_server, tls_files, max_line_bytes=100, max_response_bytes=200)
    conversation = SecureChatClient(small, kms_client=kit.StubKms()).conversation()
    with pytest.raises(ChatError) as info:
        list(conversation.stream(Q1))
    assert info.value.code is ErrorCode.ANSWER_INVALID
    with pytest.raises(ChatError) as info:
        conversation.ask(Q1)
    assert info.value.code is ErrorCode.ANSWER_INVALID


def test_closing_a_stream_early_cancels_without_a_turn(client, chat_server):
    chat_server.state.script.mode = "gate"
    conversation = client.conversation()
    stream = conversation.stream(Q1)
    next(stream)
    stream.close()
    chat_server.state.gate.set()
    assert conversation.history == [] and conversation.last_answer is None
    conversation.ask(Q2)  # the conversation still works
    assert len(conversation.history) == 1


@pytest.mark.parametrize(
    "params",
    [{"max_new_tokens": 0}, {"max_new_tokens": 513}, {"temperature": 3.0}, {"top_p": 0.0}],
)
def test_bad_parameters_fail_before_any_call(client, chat_server, stub_kms, params):
    with pytest.raises(ChatError) as info:
        client.ask(Q1, **params)
    assert info.value.code is ErrorCode.INVALID_PARAMETERS
    assert stub_kms.calls == [] and chat_server.state.seen == []


def test_empty_question_is_refused(client, stub_kms):
    with pytest.raises(ChatError) as info:
        client.ask("   ")
    assert info.value.code is ErrorCode.INVALID_PARAMETERS
    assert stub_kms.calls == []


def test_kms_refusal_and_outage_are_the_clients_own(chat_server, tls_files, kit):
    settings = kit.make_settings(chat_server, tls_files)
    denied = ClientError(
        {"Error": {"Code": "AccessDeniedException", "Message": "no"}}, "GenerateDataKey"
    )
    down = EndpointConnectionError(endpoint_url="https://kms.us-east-1.amazonaws.com")
    for error, code in ((denied, ErrorCode.KMS_ERROR), (down, ErrorCode.KMS_UNAVAILABLE)):
        with pytest.raises(ChatError) as info:
            SecureChatClient(settings, kms_client=kit.StubKms(error)).ask(Q1)
        assert info.value.code is code
        assert "client's own KMS call" in (info.value.hint or "")
    assert chat_server.state.seen == []


def test_nothing_secret_in_reprs(client, kit):
    conversation = client.conversation()
    conversation.ask(Q1)
    keys = envelope.derive_keys(kit.DATA_KEY, conversation.session)
    texts = [repr(client), repr(conversation), repr(conversation._key), str(vars(conversation))]
    for text in texts:
        for secret in (kit.DATA_KEY, keys.request, keys.response):
            assert repr(secret) not in text and secret.hex() not in text
    # The question and answer stay out of the conversation's own repr.
    assert Q1 not in repr(conversation)


def test_from_profile_uses_the_profile_user_keys(chat_server, tls_files, kms_http, tmp_path, kit):
    kit.write_profile(tmp_path / "state", chat_server, tls_files, kms_http.url, later_key="x")
    client = SecureChatClient.from_profile(tmp_path / "state")
    answer = client.ask(Q1)

    assert answer.text == kit.answer_text(chat_server.state.seen[-1].question)
    [call] = kms_http.calls
    assert call["target"] == "TrentService.GenerateDataKey"
    assert f"Credential={kit.USER_AKID}/" in call["authorization"]
    assert call["body"]["EncryptionContext"]["app"] == "nitro-llm"
    profile = load_profile(tmp_path / "state" / "profile.json")
    assert kit.USER_SECRET not in repr(profile)


def test_kms_access_denied_through_boto3(chat_server, tls_files, kms_http, tmp_path, kit):
    kms_http.deny = True
    kit.write_profile(tmp_path, chat_server, tls_files, kms_http.url)
    with pytest.raises(ChatError) as info:
        SecureChatClient.from_profile(tmp_path).ask(Q1)
    assert info.value.code is ErrorCode.KMS_ERROR
    assert "AccessDeniedException" in (info.value.hint or "")


def test_missing_profile_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no local stack in .*: run `nitro-local up` first"):
        SecureChatClient.from_profile(tmp_path / "nothing-here")


def test_settings_refuse_plain_http(tls_files):
    with pytest.raises(ConfigError, match="https"):
        ClientSettings(
            proxy_url="http://127.0.0.1:5001",
            key_id="k",
            region="us-east-1",
            ca_bundle=None,
            kms_endpoint=None,
        )


def test_a_conversation_is_independent_of_another(client, chat_server, stub_kms):
    one, two = client.conversation(), client.conversation()
    one.ask(Q1)
    two.ask(Q2)
    assert len(stub_kms.calls) == 2 and one.session != two.session
    assert two.history[0][0] == Q2 and len(two.history) == 1
    assert chat_server.state.seen[1].question["prompt"] == format_prompt(Q2)


def test_concurrent_clients_do_not_interfere(chat_server, tls_files, kit):
    settings = kit.make_settings(chat_server, tls_files)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            SecureChatClient(settings, kms_client=kit.StubKms()).ask(Q1)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert errors == [] and len(chat_server.state.seen) == 4


def test_profile_path_may_be_the_file_or_the_directory(chat_server, tls_files, tmp_path, kit):
    path = kit.write_profile(tmp_path, chat_server, tls_files, "http://127.0.0.1:9")
    assert load_profile(path) == load_profile(Path(tmp_path))


def test_an_overlong_conversation_is_refused_before_any_call(client, chat_server, stub_kms):
    conversation = client.conversation()
    conversation.history.append(("long", "x" * 70_000))
    with pytest.raises(ChatError) as info:
        conversation.ask(Q1)
    assert info.value.code is ErrorCode.PROMPT_TOO_LONG
    assert stub_kms.calls == [] and chat_server.state.seen == []
