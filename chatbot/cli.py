"""The `chatbot` command: parse options, build a SecureChatClient, print answers and errors.

A thin layer over chatbot.client. A failure prints the client's own text for its error code on
stderr and exits 1 (2 for usage errors); a server's words appear only with --verbose, labelled.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from chatbot.client import ChatError, Conversation, SecureChatClient
from chatbot.profile import ConfigError, MissingOptionError, load_profile, settings_from_options
from chatbot.progress import Spinner
from protocol.errors import NitroError
from protocol.messages import DEFAULT_MAX_NEW_TOKENS

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_STATE_DIR = ".nitro-local"
PROMPT = "you> "
WAITING = "waiting for the enclave"
QUIT_COMMANDS = {"/quit", "/exit"}


class UsageError(Exception):
    """The command line cannot work as given (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatbot",
        description="Ask a model running in a Nitro Enclave; only you and the enclave can read "
        "the question and the answer. With no command, start an interactive conversation.",
    )
    _add_common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    ask = commands.add_parser("ask", help="ask one question and print the answer")
    # The same options after the subcommand; SUPPRESS keeps those given before it.
    _add_common(ask, suppress=True)
    ask.add_argument("question", metavar="QUESTION")
    ask.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="print the answer's words as they arrive (default: print it when complete)",
    )
    return parser


def _add_common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("common options (before or after the command)")
    group.add_argument(
        "--local",
        action="store_true",
        default=default(False),
        help="use the local stack started by `nitro-local up` (settings from DIR/profile.json)",
    )
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        default=default(DEFAULT_STATE_DIR),
        help=f"the local stack's state directory (default {DEFAULT_STATE_DIR})",
    )
    group.add_argument("--endpoint", metavar="URL", default=default(None), help="the proxy URL")
    group.add_argument("--key-id", metavar="ARN", default=default(None), help="the KMS key")
    group.add_argument(
        "--region",
        default=default(os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")),
        help="the KMS key's region (default $AWS_REGION or $AWS_DEFAULT_REGION)",
    )
    group.add_argument(
        "--ca-bundle",
        metavar="PEM",
        default=default(None),
        help="CA certificates to verify the proxy's TLS with (default: the system's)",
    )
    group.add_argument(
        "--kms-endpoint",
        metavar="URL",
        default=default(None),
        help="a KMS endpoint other than the region's default (e.g. a VPC endpoint)",
    )
    group.add_argument(
        "--max-new-tokens",
        metavar="N",
        type=int,
        default=default(DEFAULT_MAX_NEW_TOKENS),
        help=f"the longest answer, in tokens (1-512, default {DEFAULT_MAX_NEW_TOKENS})",
    )
    group.add_argument(
        "--verbose",
        action="store_true",
        default=default(False),
        help="also show error details and the server's own (untrusted) messages",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    verbose = bool(args.verbose)
    try:
        client = _client(args)
        with contextlib.closing(client):
            if args.command == "ask":
                return _ask(client, args)
            return _interactive(client, args)
    except (UsageError, MissingOptionError) as exc:
        print(f"chatbot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except NitroError as exc:
        _print_error(exc, verbose)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        # The type only: an unexpected exception's message could quote a question or a key.
        print(
            f"error: internal_error: the client hit an unexpected error ({type(exc).__name__}). "
            "Report this as a bug.",
            file=sys.stderr,
        )
        return EXIT_ERROR


def _client(args: argparse.Namespace) -> SecureChatClient:
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= 512:
        raise UsageError("--max-new-tokens must be 1-512")
    if args.local:
        profile = load_profile(Path(args.state_dir))
        return SecureChatClient.from_settings(profile.settings, profile.credentials)
    settings = settings_from_options(
        args.endpoint, args.key_id, args.region, args.ca_bundle, args.kms_endpoint
    )
    return SecureChatClient.from_settings(settings)


def _ask(client: SecureChatClient, args: argparse.Namespace) -> int:
    question = args.question.strip()
    if not question:
        raise UsageError("the question is empty")
    conversation = client.conversation()
    if args.stream:
        _stream_answer(conversation, question, args.max_new_tokens, sys.stdout)
    else:
        with Spinner(WAITING):
            answer = conversation.ask(question, max_new_tokens=args.max_new_tokens)
        print(printable(answer.text.lstrip()), flush=True)
    return EXIT_OK


def _interactive(client: SecureChatClient, args: argparse.Namespace) -> int:
    print(
        "nitro-llm chatbot: ask a question; /quit or Ctrl-D to leave. "
        "The conversation is kept in memory only.",
        file=sys.stderr,
    )
    conversation = client.conversation()
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return EXIT_OK
        except KeyboardInterrupt:
            print()
            return EXIT_INTERRUPTED
        question = line.strip()
        if not question:
            continue
        if question in QUIT_COMMANDS:
            return EXIT_OK
        try:
            _stream_answer(conversation, question, args.max_new_tokens, sys.stdout)
        except KeyboardInterrupt:
            # Ctrl-C during an answer cancels that answer (the connection is dropped, so the
            # enclave stops generating); the conversation goes on without that turn.
            print("(cancelled)", file=sys.stderr)
        except NitroError as exc:
            _print_error(exc, args.verbose)


def _stream_answer(
    conversation: Conversation, question: str, max_new_tokens: int, out: TextIO
) -> None:
    """Print the answer's text as verified chunks arrive, with a spinner until the first."""
    started = False  # True once text is on the screen: the line then needs its end
    spinner = Spinner(WAITING).start()
    try:
        with contextlib.closing(conversation.stream(question, max_new_tokens=max_new_tokens)) as it:
            for piece in it:
                spinner.stop()
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                out.write(printable(piece))
                out.flush()
    finally:
        spinner.stop()
        if started:
            out.write("\n")
            out.flush()
    if not started:
        out.write("\n")
        out.flush()


def printable(text: str) -> str:
    """The text without control characters (but newlines and tabs): an answer cannot drive the
    terminal (move the cursor, rewrite earlier lines, set the title)."""
    return "".join(ch for ch in text if ch.isprintable() or ch in "\n\t")


def _print_error(exc: NitroError, verbose: bool) -> None:
    print(exc.diagnostics(), file=sys.stderr)
    if isinstance(exc, ChatError) and exc.hint:
        print(f"note: {exc.hint}", file=sys.stderr)
    if not verbose:
        return
    if exc.detail:
        print(f"detail: {exc.detail}", file=sys.stderr)
    message = exc.server_message if isinstance(exc, ChatError) else None
    if message:
        assert isinstance(exc, ChatError)
        label = "enclave said (sealed)" if exc.authenticated else "server said (untrusted)"
        print(f"{label}: {message}", file=sys.stderr)
