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

from chatbot import verify
from chatbot.client import ChatError, Conversation, SecureChatClient
from chatbot.profile import ConfigError, MissingOptionError, load_profile, settings_from_options
from chatbot.progress import Spinner
from protocol import attestation
from protocol.attestation import AttestationError, AttestationPolicy
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
    check = commands.add_parser(
        "verify-attestation",
        help="verify a saved attestation document and print what it says",
        description="Verify a saved attestation document (raw CBOR, or the JSON body of "
        "/v1/attestation) and print a report. Exit 0 when every check passes.",
    )
    _add_common(check, suppress=True)
    check.add_argument("file", metavar="FILE", help="the document: CBOR bytes or JSON")
    check.add_argument(
        "--root",
        metavar="PEM",
        help="the root certificate to pin (default: the packaged AWS_NitroEnclaves_Root-G1; "
        "with --local, the profile's attestation_root)",
    )
    check.add_argument(
        "--at",
        default="now",
        metavar="WHEN",
        help="when to check the certificates' validity: document (its own timestamp), now "
        "(the default) or an ISO 8601 time (UTC if no zone is given)",
    )
    check.add_argument("--nonce", metavar="HEX", help="the nonce the document must carry")
    check.add_argument(
        "--refuse-debug",
        action="store_true",
        help="fail on a debug-mode document (by default it is flagged, not refused)",
    )
    serve = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible API on loopback, sealing every request for the enclave",
        description="Verify the enclave, then serve /v1/chat/completions, /v1/completions and "
        "/v1/models for any OpenAI client; each request is sealed for the enclave (protocol v2).",
    )
    _add_common(serve, suppress=True)
    serve.add_argument(
        "--listen",
        default="127.0.0.1:8088",
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:8088; a non-loopback address needs "
        "--api-key-file)",
    )
    serve.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require `Authorization: Bearer <key>` with the key in FILE",
    )
    serve.add_argument(
        "--max-concurrency",
        type=int,
        default=4,
        metavar="N",
        help="requests answered at once; more get 503 with Retry-After (default 4)",
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
    group.add_argument(
        "--expected-pcrs",
        metavar="FILE",
        default=default(None),
        help="before the first question, verify the enclave's attestation (and, where readable, "
        "the key policy) against these PCRs; FILE is nitro-cli's measurements JSON or "
        '{"PCR0": "<hex>", ...}',
    )
    group.add_argument(
        "--allow-debug",
        action="store_true",
        default=default(False),
        help="with --expected-pcrs, accept a debug-mode enclave (PCR0-2 zero; its memory is "
        "readable by the parent: never for real data)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or argparse's own usage error (already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    verbose = bool(args.verbose)
    try:
        if args.command == "verify-attestation":
            return _verify_attestation(args)
        if args.command == "serve":
            return _serve(args)
        client = _client(args)
        with contextlib.closing(client):
            _verify_enclave(client, verbose)
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
    verification: dict[str, Any] = {}
    if args.allow_debug and not args.expected_pcrs:
        raise UsageError("--allow-debug goes with --expected-pcrs")
    if args.expected_pcrs:
        verification = {
            "expected_pcrs": verify.load_expected_pcrs(args.expected_pcrs),
            "allow_debug": args.allow_debug,
        }
    if args.local:
        profile = load_profile(Path(args.state_dir))
        if verification:
            verification["attestation_root"] = _profile_root(profile.attestation_root)
        return SecureChatClient.from_settings(profile.settings, profile.credentials, **verification)
    settings = settings_from_options(
        args.endpoint, args.key_id, args.region, args.ca_bundle, args.kms_endpoint
    )
    return SecureChatClient.from_settings(settings, **verification)


def _serve(args: argparse.Namespace) -> int:
    """`chatbot serve`: verify the enclave, then the OpenAI-compatible gateway until stopped."""
    from chatbot import gateway  # Flask and werkzeug, for this command only

    try:
        api_key = gateway.read_api_key(args.api_key_file) if args.api_key_file else None
        gateway.check_listen(args.listen, api_key)  # before anything is read or contacted
        expected = verify.load_expected_pcrs(args.expected_pcrs) if args.expected_pcrs else None
        if args.local:
            profile = load_profile(Path(args.state_dir))
            settings, credentials = profile.settings, profile.credentials
            root = _profile_root(profile.attestation_root)
        else:
            settings = settings_from_options(
                args.endpoint, args.key_id, args.region, args.ca_bundle, args.kms_endpoint
            )
            credentials, root = None, verify.aws_root()

        def new_client(pcrs: Any) -> SecureChatClient:
            if pcrs is None:
                return SecureChatClient.from_settings(settings, credentials)
            return SecureChatClient.from_settings(
                settings,
                credentials,
                expected_pcrs=pcrs,
                attestation_root=root,
                allow_debug=args.allow_debug,
            )

        return gateway.serve(
            new_client,
            root=root,
            expected=expected,
            allow_debug=args.allow_debug,
            listen=args.listen,
            api_key=api_key,
            max_concurrency=args.max_concurrency,
            out=sys.stderr,
        )
    except gateway.GatewayConfigError as exc:
        raise UsageError(str(exc)) from exc


def _profile_root(path: str | None) -> bytes:
    if path is None:
        raise ConfigError("the profile names no attestation_root; run `nitro-local up` again")
    return verify.load_root(path)


def _verify_enclave(client: SecureChatClient, verbose: bool) -> None:
    """With --expected-pcrs: the enclave and the key policy, before anything is sent."""
    verified = client.verify_enclave()
    if verified is None:
        return
    for warning in verified.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if verbose:
        document = verified.document
        pcrs = ", ".join(f"PCR{i}" for i in verified.pcrs_checked)
        print(
            f"attestation verified: module {verify.printable_text(document.module_id)}, "
            f"{pcrs} as expected, PCR0 {document.pcrs[0].hex()[:16]}...; key policy "
            f"{'checked' if verified.key_policy_checked else 'not checked'}",
            file=sys.stderr,
        )


def _verify_attestation(args: argparse.Namespace) -> int:
    """`chatbot verify-attestation FILE`: a report on stdout; failures as errors on stderr."""
    data = verify.read_document_file(args.file)
    if args.root:
        root, root_name = verify.load_root(args.root), args.root
    elif args.local:
        profile = load_profile(Path(args.state_dir))
        root, root_name = _profile_root(profile.attestation_root), "the profile's attestation_root"
    else:
        root, root_name = verify.aws_root(), "AWS_NitroEnclaves_Root-G1 (packaged)"
    expected = verify.load_expected_pcrs(args.expected_pcrs) if args.expected_pcrs else {}
    nonce = None
    if args.nonce is not None:
        try:
            nonce = bytes.fromhex(args.nonce)
        except ValueError:
            nonce = b""
        if not nonce:
            raise UsageError("--nonce must be hex")
    allow_debug = not args.refuse_debug and (not expected or args.allow_debug)
    try:
        document = attestation.parse(data)
    except AttestationError as exc:
        print(f"{args.file}: not a readable attestation document")
        _print_document_error(exc)
        return EXIT_ERROR
    at = verify.parse_time(args.at, document)
    for line in verify.report(document, at):
        print(line)
    print(f"pinned root: {root_name}")
    policy = AttestationPolicy(
        root=root, at=at, pcrs=expected, nonce=nonce, allow_debug=allow_debug
    )
    try:
        attestation.verify(data, policy)
    except AttestationError as exc:
        print(f"result: FAILED ({exc.check})", flush=True)
        _print_document_error(exc)
        return EXIT_ERROR
    checked = ["root", "chain", f"validity at {at.isoformat()}", "signature"]
    if expected:
        checked.append(", ".join(f"PCR{i}" for i in sorted(expected)))
    if nonce is not None:
        checked.append("nonce")
    print(f"result: PASSED ({'; '.join(checked)})")
    if document.debug_mode:
        print(
            "note: DEBUG MODE: the enclave's memory was readable by its parent; this document "
            "proves nothing about the code it ran (use --refuse-debug to fail on it)"
        )
    return EXIT_OK


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


def _print_document_error(exc: AttestationError) -> None:
    print(f"error: {exc.code.code}: the document failed verification", file=sys.stderr)
    _print_check(exc.check, exc.detail)


def _print_check(check: str, detail: str | None) -> None:
    # The verifier's own words (the document's values, never a secret): always shown.
    print(f"failed check: {detail or check}", file=sys.stderr)
    print(f"  ({check}: {verify.describe_check(check)})", file=sys.stderr)


def _print_error(exc: NitroError, verbose: bool) -> None:
    print(exc.diagnostics(), file=sys.stderr)
    check = getattr(exc, "check", None)
    if check:
        _print_check(check, exc.detail)
        return
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
