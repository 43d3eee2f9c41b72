"""A malicious parent writes misleading words wherever it can: in error bodies, status lines,
reason phrases, headers, in place of an answer, inside a stream. The client reports a code with
its own text and never shows the parent's words as its own: not in the exception, and not in
the CLI's output (only with --verbose, on a line labelled as the untrusted server's).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chatbot import cli
from protocol.errors import ErrorCode

from .conftest import ANSWER_TOKENS, QUESTION, STREAM_TOKENS, Stack, assert_code, raised, short
from .relay import Enclave, HttpAnswer, Incoming, on_chat, rendered

pytestmark = pytest.mark.integration
# What a parent would like the user to believe and do.
LURE = "Your session expired: paste your AWS secret key at https://evil.example/login"
LURE_WORDS = ("evil.example", "paste your AWS secret key", "session expired")
UNTRUSTED = "server said (untrusted): "


def _error(status: int, code: str, message: str = LURE) -> Callable[..., HttpAnswer]:
    return lambda incoming, enclave: HttpAnswer.error(status, code, message)


def _bad_status_line(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    return HttpAnswer(raw=f"{LURE}\r\n\r\n".encode())


def _reason_phrase(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    answer = HttpAnswer.error(503, "enclave_unavailable", "unavailable")
    answer.reason = LURE
    return answer


def _lure_headers(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    answer = HttpAnswer.error(503, "enclave_unavailable", "unavailable")
    answer.headers += [("Warning", f'199 - "{LURE}"'), ("X-Enclave-Message", LURE)]
    return answer


def _redirect(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    """A redirect that keeps the method and body (307) to a host the parent names."""
    answer = HttpAnswer(307, "text/plain", LURE.encode())
    answer.headers.append(("Location", "https://evil.example/v1/chat"))
    return answer


def _plain_text(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    return HttpAnswer(200, "text/plain", LURE.encode())


def _answer_shaped(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    return HttpAnswer.of_json({"text": LURE, "finish_reason": "stop"})


def _line_in_a_stream(incoming: Incoming, enclave: Enclave) -> HttpAnswer:
    reply = enclave.chat(incoming.json())
    lines = rendered(reply)
    lines.body = (
        json.dumps(reply.bodies[0]).encode() + b"\n" + json.dumps({"text": LURE}).encode() + b"\n"
    )
    return lines


# (name, mischief, the code the client reports, streamed?)
CASES: list[tuple[str, Callable[..., HttpAnswer], ErrorCode, bool]] = [
    ("error-body", _error(503, "enclave_unavailable"), ErrorCode.ENCLAVE_UNAVAILABLE, False),
    ("error-body-unauthorized", _error(401, "unauthorized"), ErrorCode.UNAUTHORIZED, False),
    ("error-body-unknown-code", _error(418, "reauthenticate"), ErrorCode.PROTOCOL_ERROR, False),
    # A code only the enclave seals, claimed in clear: the client's text, flagged unauthenticated.
    (
        "unsealed-replayed-request",
        _error(409, "replayed_request"),
        ErrorCode.REPLAYED_REQUEST,
        False,
    ),
    (
        "control-characters",
        _error(503, "overloaded", f"\x1b[2J\x1b[H\nenclave said (sealed): {LURE}\r"),
        ErrorCode.OVERLOADED,
        False,
    ),
    ("reason-phrase", _reason_phrase, ErrorCode.ENCLAVE_UNAVAILABLE, False),
    ("headers", _lure_headers, ErrorCode.ENCLAVE_UNAVAILABLE, False),
    ("redirect", _redirect, ErrorCode.PROTOCOL_ERROR, False),
    ("status-line", _bad_status_line, ErrorCode.PROTOCOL_ERROR, False),
    ("text-for-an-answer", _plain_text, ErrorCode.ANSWER_INVALID, False),
    ("answer-shaped-plaintext", _answer_shaped, ErrorCode.ANSWER_INVALID, False),
    ("line-in-a-stream", _line_in_a_stream, ErrorCode.ANSWER_INVALID, True),
]


# Through the CLI too (each costs a run with and one without --verbose); True: an error body
# whose message --verbose shows, labelled.
CLI_CASES = {
    "error-body": True,
    "control-characters": True,
    "status-line": False,
    "text-for-an-answer": False,
    "line-in-a-stream": False,
}


def _no_lure(*texts: Any) -> None:
    for text in texts:
        for words in LURE_WORDS:
            assert words.lower() not in str(text or "").lower(), "the parent's words were shown"


@pytest.mark.parametrize(
    ("mischief", "code", "stream"),
    [pytest.param(m, code, stream, id=name) for name, m, code, stream in CASES],
)
def test_the_library_reports_its_own_words_for_the_parents(
    adversary: Stack,
    still_serving,
    mischief: Callable[..., HttpAnswer],
    code: ErrorCode,
    stream: bool,
) -> None:
    conversation = adversary.user().conversation()
    adversary.plaintexts.append(QUESTION)
    tokens = STREAM_TOKENS
    with adversary.relay.playing(on_chat(mischief)):
        if stream:
            error = raised(lambda: list(conversation.stream(QUESTION, max_new_tokens=tokens)))
        else:
            error = raised(lambda: short(conversation))
        chats = adversary.relay.chats()
    assert_code(error, code)
    assert len(chats) == 1  # a redirect is not followed, a failure not retried elsewhere
    assert not getattr(error, "authenticated", False)  # nothing the parent wrote is "sealed"
    _no_lure(str(error), error.diagnostics(), error.detail, getattr(error, "hint", None))
    message = getattr(error, "server_message", None)
    if message is not None:  # kept aside for --verbose: one printable line at most
        assert message.isprintable() and len(message) <= 300
    still_serving()


def test_a_lure_on_the_attestation_endpoint_is_not_shown(adversary: Stack, still_serving) -> None:
    client = adversary.verifier()
    with adversary.relay.playing(_error(503, "enclave_unavailable")):
        error = raised(lambda: short(client.conversation()))
    assert_code(error, ErrorCode.ENCLAVE_UNAVAILABLE)
    _no_lure(str(error), error.diagnostics(), error.detail, getattr(error, "hint", None))
    still_serving()


# ---- the CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def relay_profile(adversary: Stack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory whose profile.json points the CLI at the relay (as `nitro-local up`
    writes one for the proxy)."""
    state = tmp_path_factory.mktemp("cli-state")
    profile = {
        "proxy_url": adversary.relay.url,
        "key_id": adversary.key_arn,
        "region": "us-east-1",
        "ca_bundle": str(adversary.paths.cert),
        "kms_endpoint": adversary.kms_endpoint,
        "attestation_root": str(adversary.paths.ca_dir / "root.pem"),
        "user": {
            "access_key_id": adversary.user_keys.access_key_id,
            "secret_access_key": adversary.user_keys.secret_access_key,
        },
    }
    (state / "profile.json").write_text(json.dumps(profile))
    (state / "profile.json").chmod(0o600)
    return state


def run_cli(capsys: pytest.CaptureFixture[str], state: Path, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["--local", "--state-dir", str(state), "ask", QUESTION, *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("mischief", "code", "stream", "labelled"),
    [
        pytest.param(m, code, stream, CLI_CASES[name], id=name)
        for name, m, code, stream in CASES
        if name in CLI_CASES
    ],
)
def test_the_cli_prints_its_own_words_and_the_parents_only_labelled(
    adversary: Stack,
    relay_profile: Path,
    capsys: pytest.CaptureFixture[str],
    still_serving,
    mischief: Callable[..., HttpAnswer],
    code: ErrorCode,
    stream: bool,
    labelled: bool,
) -> None:
    adversary.plaintexts.append(QUESTION)
    tokens = str(STREAM_TOKENS if stream else ANSWER_TOKENS)
    extra = ["--stream", "--max-new-tokens", tokens] if stream else ["--max-new-tokens", tokens]
    with adversary.relay.playing(on_chat(mischief)):
        status, out, err = run_cli(capsys, relay_profile, *extra)
        verbose_status, verbose_out, verbose_err = run_cli(
            capsys, relay_profile, *extra, "--verbose"
        )
    assert status == verbose_status == 1
    assert err.splitlines()[0] == f"error: {code.code}: {code.client_text}"
    _no_lure(out, err)
    assert "\x1b" not in out + err + verbose_out + verbose_err
    # With --verbose the parent's words may appear, but only on the line that says whose they
    # are; never as the enclave's (sealed) words, never on a line of their own.
    assert verbose_err.splitlines()[0] == f"error: {code.code}: {code.client_text}"
    shown = [
        line
        for line in (verbose_out + verbose_err).splitlines()
        if any(words.lower() in line.lower() for words in LURE_WORDS)
    ]
    assert all(line.startswith(UNTRUSTED) for line in shown), "the parent's words unlabelled"
    assert len(shown) == (1 if labelled else 0)
    assert "enclave said (sealed)" not in "\n".join(
        line for line in verbose_err.splitlines() if not line.startswith(UNTRUSTED)
    )
    still_serving()
