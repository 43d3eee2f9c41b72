"""The `chatbot` command, run in-process through `chatbot.cli.main([...])`.

Against the local HTTPS stand-in for proxy + enclave and a tiny KMS JSON-protocol server (the
profile's kms_endpoint), as in test_client.py; the real stack is the end-to-end tests' job.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from chatbot import cli
from chatbot.client import Conversation
from protocol.errors import ErrorCode
from protocol.prompt import format_prompt

QUESTION = "What is a vesting schedule?"


@pytest.fixture
def state_dir(tmp_path, chat_server, tls_files, kms_http, kit) -> Path:
    kit.write_profile(tmp_path / "state", chat_server, tls_files, kms_http.url)
    return tmp_path / "state"


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.mark.parametrize(
    "order",
    [
        ["--local", "--state-dir", "{dir}", "ask", QUESTION],
        ["ask", QUESTION, "--local", "--state-dir", "{dir}"],
        ["--local", "ask", "--state-dir", "{dir}", QUESTION],
        ["--state-dir", "{dir}", "ask", "--local", QUESTION, "--max-new-tokens", "9"],
    ],
)
def test_ask_prints_the_answer_with_options_before_or_after(
    capsys, state_dir, chat_server, kit, order
):
    argv = [str(state_dir) if a == "{dir}" else a for a in order]
    code, out, err = run(capsys, argv)

    assert code == 0, err
    [seen] = chat_server.state.seen
    assert seen.question["prompt"] == format_prompt(QUESTION)
    assert seen.question["max_new_tokens"] == (9 if "9" in argv else 64)
    assert seen.header.stream is False
    assert out == kit.answer_text(seen.question).lstrip() + "\n"
    assert err == ""  # stderr is not a terminal here: no spinner, nothing else


def test_options_after_the_subcommand_override_those_before(
    capsys, state_dir, chat_server, tmp_path
):
    argv = ["--local", "--state-dir", str(tmp_path / "nowhere"), "ask", "--state-dir"]
    code, _, err = run(capsys, [*argv, str(state_dir), QUESTION])
    assert code == 0, err
    assert len(chat_server.state.seen) == 1


def test_ask_stream_prints_the_same_text(capsys, state_dir, chat_server, kit):
    code, out, err = run(
        capsys, ["--local", "--state-dir", str(state_dir), "ask", "--stream", QUESTION]
    )
    assert code == 0, err
    seen = chat_server.state.seen[-1]
    assert seen.header.stream is True
    assert out == kit.answer_text(seen.question).lstrip() + "\n"


def test_missing_profile_is_a_clear_error(capsys, tmp_path):
    code, out, err = run(capsys, ["--local", "--state-dir", str(tmp_path / "none"), "ask", "hi"])
    assert code == 1
    assert out == ""
    assert (
        err.strip() == f"error: no local stack in {tmp_path / 'none'}: run `nitro-local up` first"
    )


def test_real_aws_mode_names_the_missing_options(capsys, monkeypatch):
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    code, _, err = run(capsys, ["ask", "hi", "--endpoint", "https://proxy.example:5001"])
    assert code == 2
    assert "--key-id" in err and "--region" in err and "--endpoint" not in err


def test_http_error_prints_our_text_not_the_servers(capsys, state_dir, chat_server, kit):
    script = chat_server.state.script
    script.mode, script.status = "http_error", 503
    script.error_body = b'{"error": {"code": "not_ready", "message": "' + kit.LIE.encode() + b'"}}'
    argv = ["--local", "--state-dir", str(state_dir), "ask", QUESTION]

    code, out, err = run(capsys, argv)
    assert code == 1 and out == ""
    assert err.splitlines()[0] == f"error: not_ready: {ErrorCode.NOT_READY.client_text}"
    assert kit.LIE not in err

    code, out, err = run(capsys, [*argv, "--verbose"])
    assert code == 1
    assert f"server said (untrusted): {kit.LIE}" in err.splitlines()
    assert err.splitlines()[0] == f"error: not_ready: {ErrorCode.NOT_READY.client_text}"


def test_sealed_error_prints_its_code(capsys, state_dir, chat_server):
    chat_server.state.script.mode = "sealed_error"
    code, out, err = run(capsys, ["--local", "--state-dir", str(state_dir), "ask", QUESTION])
    assert code == 1 and out == ""
    assert err.splitlines()[0] == (
        f"error: prompt_too_long: {ErrorCode.PROMPT_TOO_LONG.client_text}"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_tampered_answer_is_refused(capsys, state_dir, chat_server, stream):
    chat_server.state.script.mode = "tamper"
    argv = ["--local", "--state-dir", str(state_dir), "ask", QUESTION]
    code, out, err = run(capsys, argv + (["--stream"] if stream else []))
    assert code == 1
    assert out.strip() == ""
    assert err.startswith("error: answer_invalid: ")


def test_kms_refusal_says_it_was_the_clients_own_call(capsys, state_dir, kms_http):
    kms_http.deny = True
    code, _, err = run(capsys, ["--local", "--state-dir", str(state_dir), "ask", QUESTION])
    assert code == 1
    lines = err.splitlines()
    assert lines[0] == f"error: kms_error: {ErrorCode.KMS_ERROR.client_text}"
    assert lines[1].startswith("note: This was the client's own KMS call")
    assert "AccessDeniedException" in lines[1]


def test_unexpected_failure_is_an_internal_error_without_details(capsys, state_dir, monkeypatch):
    def explode(self, question, **params):
        raise RuntimeError(f"something quoting {question}")

    monkeypatch.setattr(Conversation, "ask", explode)
    code, out, err = run(capsys, ["--local", "--state-dir", str(state_dir), "ask", QUESTION])
    assert code == 1 and out == ""
    assert err.startswith("error: internal_error: ")
    assert "RuntimeError" in err and QUESTION not in err


def test_interactive_conversation_keeps_history(capsys, state_dir, chat_server, monkeypatch, kit):
    monkeypatch.setattr("sys.stdin", io.StringIO("first question\n\nsecond question\n/quit\n"))
    code, out, err = run(capsys, ["--local", "--state-dir", str(state_dir)])

    assert code == 0, err
    first, second = chat_server.state.seen
    assert first.header.stream and second.header.stream
    a1 = kit.answer_text(first.question)
    assert second.question["prompt"] == format_prompt("second question", [("first question", a1)])
    assert first.header.session == second.header.session
    assert out.count(cli.PROMPT) == 4  # two questions, one empty line, /quit
    assert a1.lstrip() + "\n" in out and kit.answer_text(second.question).lstrip() in out


def test_interactive_ends_on_eof_and_reports_errors_without_leaving(
    capsys, state_dir, chat_server, monkeypatch
):
    chat_server.state.script.mode = "tamper"
    monkeypatch.setattr("sys.stdin", io.StringIO("one\ntwo\n"))
    code, _, err = run(capsys, ["--local", "--state-dir", str(state_dir)])
    assert code == 0
    assert err.count("error: answer_invalid: ") == 2
    assert len(chat_server.state.seen) == 2


def test_ctrl_c_cancels_an_answer_then_at_the_prompt_exits(capsys, state_dir, monkeypatch):
    def interrupted(self, question, **params):
        raise KeyboardInterrupt
        yield  # a generator, like the real one

    answers = iter(["a question", KeyboardInterrupt])

    def fake_input(prompt: str) -> str:
        item = next(answers)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    monkeypatch.setattr(Conversation, "stream", interrupted)
    monkeypatch.setattr("builtins.input", fake_input)
    code, _, err = run(capsys, ["--local", "--state-dir", str(state_dir)])
    assert code == cli.EXIT_INTERRUPTED
    assert "(cancelled)" in err


def test_bad_max_new_tokens_is_a_usage_error(capsys, state_dir, chat_server):
    argv = ["--local", "--state-dir", str(state_dir), "ask", QUESTION, "--max-new-tokens", "0"]
    code, _, err = run(capsys, argv)
    assert code == 2 and "--max-new-tokens" in err
    assert chat_server.state.seen == []


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, ["ask", "--help"])
    assert code == 0 and "--stream" in out and "--local" in out


def test_control_characters_in_an_answer_do_not_reach_the_terminal():
    assert cli.printable("fine\x1b]0;title\x07 \x1b[2Jtext\n\tend") == "fine]0;title [2Jtext\n\tend"
