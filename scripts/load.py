"""`make load`: N concurrent clients for T seconds through the whole local stack.

Each client is a SecureChatClient with its own conversation (one data key), asking verbatim
prompts in turn streamed and whole. Every answer chunk is opened against the request it answers
(the AAD binds the request id and the SHA-256 of the request's ciphertext), so an answer meant for
another request cannot open: such an answer is counted as cross-talk, as is one whose opened
request id is not the one sent; a connection broken mid-answer is an error, not cross-talk.
Prints requests, errors by code, latency percentiles, tokens/s, and the enclave's and the
proxy's resident memory (VmRSS from /proc) after the warm-up and at the end; writes
load-results.json. Exits 1 when a target is missed: zero cross-talk, no 5xx other
than `overloaded`, memory growth under 10%.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import ssl
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/load.py` from a checkout
    sys.path.insert(0, str(ROOT))

from chatbot.client import ChatError, SecureChatClient  # noqa: E402
from chatbot.profile import load_profile  # noqa: E402
from emulator import stack  # noqa: E402
from protocol.errors import ErrorCode, NitroError  # noqa: E402
from protocol.prompt import format_prompt  # noqa: E402

DEFAULT_CLIENTS = 16
DEFAULT_DURATION_S = 60.0
DEFAULT_NEW_TOKENS = 32
MAX_GROWTH = 0.10
CLIENT_TIMEOUT_S = 300.0  # one answer, queued behind every other client on a slow machine
READY_TIMEOUT_S = 600.0
OVERLOADED_PAUSE_S = 1.0  # the proxy's Retry-After
QUESTIONS = (
    "How do I enroll in the retirement plan?",
    "What is a 401(k) plan?",
    "Can I change my contribution later?",
    "What is a pension?",
    "How many vacation days do I get?",
    "When does health coverage start?",
)


@dataclasses.dataclass
class Tally:
    """What the clients saw, shared under a lock."""

    requests: int = 0
    answers: int = 0
    tokens: int = 0
    cross_talk: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)
    latencies_s: list[float] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


# ---- the clients ---------------------------------------------------------------------------------


def one_turn(conversation: Any, prompt: str, stream: bool, new_tokens: int) -> int:
    """Ask `prompt` verbatim; returns the answer's token count.

    The client library opens every chunk with the AAD of this very request (its id, the SHA-256
    of its ciphertext, the chunk's sequence number): an answer to any other request, or part of
    one, fails there with ANSWER_INVALID and is never returned.
    """
    answer = None
    for _text, _tokens, final in conversation.complete(
        prompt, stream=stream, max_new_tokens=new_tokens
    ):
        if final is not None:
            answer = final
    if answer is None:  # the library ends with the final chunk or raises: defensive only
        raise ChatError(ErrorCode.ANSWER_INVALID, "no final chunk")
    return answer.completion_tokens


def is_cross_talk(exc: ChatError) -> bool:
    """An answer that failed to verify against its own request: the client wraps the envelope's
    refusal (envelope.open_answer: another request's id, a tag that does not open under this
    request's AAD, a chunk out of order) in ANSWER_INVALID with that refusal as its cause. The
    same code for a transport fault (a connection broken mid-answer, a body cut short, too large
    or not JSON) has another cause, or none, and is no cross-talk."""
    cause = exc.__cause__
    return (
        exc.code is ErrorCode.ANSWER_INVALID
        and isinstance(cause, NitroError)
        and not isinstance(cause, ChatError)
    )


def count_failure(tally: Tally, exc: ChatError) -> None:
    """One failed request, by its code; cross-talk only when is_cross_talk says so."""
    with tally.lock:
        tally.requests += 1
        if is_cross_talk(exc):
            tally.cross_talk += 1
        tally.errors[exc.code.code] += 1


def run_client(
    client: SecureChatClient,
    tally: Tally,
    *,
    index: int,
    tag: str,
    new_tokens: int,
    start: threading.Barrier,
    stop_at: list[float],
) -> None:
    """Warm up (one turn: the data key fetched and cached), wait for the start, ask until the
    end. Every outcome is counted; nothing a client meets ends its thread early."""
    conversation = client.conversation()
    turn = 0

    def ask() -> int:
        nonlocal turn
        question = QUESTIONS[(index + turn) % len(QUESTIONS)]
        # A nonce per request (and the caller's tag): no two prompts are alike.
        words = [question, tag, secrets.token_hex(4)]
        prompt = format_prompt(" ".join(word for word in words if word), [])
        stream = turn % 2 == 1  # streamed and whole answers in turn
        turn += 1
        return one_turn(conversation, prompt, stream, new_tokens)

    with contextlib.suppress(Exception):
        ask()  # the warm-up's outcome is not measured; a failure shows in the run
    start.wait()
    while time.monotonic() < stop_at[0]:
        began = time.monotonic()
        try:
            tokens = ask()
        except ChatError as exc:
            count_failure(tally, exc)
            if exc.code is ErrorCode.OVERLOADED:
                time.sleep(OVERLOADED_PAUSE_S)
            continue
        except Exception as exc:  # noqa: BLE001 - counted by type: the run goes on
            with tally.lock:
                tally.requests += 1
                tally.errors[f"client:{type(exc).__name__}"] += 1
            continue
        with tally.lock:
            tally.requests += 1
            tally.answers += 1
            tally.tokens += tokens
            tally.latencies_s.append(time.monotonic() - began)


# ---- memory --------------------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of one process, in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def group_rss_kib(pgid: int) -> int:
    """VmRSS summed over a process group: the proxy is gunicorn's master and its workers."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid:
            total += rss_kib(int(entry.name))
    return total


def memory(pids: dict[str, int]) -> dict[str, float]:
    """MiB now: the enclave server's process, and the proxy's process group."""
    return {
        "enclave": rss_kib(pids["enclave"]) / 1024,
        "proxy": group_rss_kib(pids["proxy"]) / 1024,
    }


# ---- the run -------------------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered))))
    return ordered[rank - 1]


def say(line: str) -> None:
    print(f"load: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def running_stack(args: argparse.Namespace) -> Iterator[stack.StatePaths]:
    """A stack started for this run (as `nitro-local up` starts it), or one already running in
    --state-dir when --reuse is given; a stack started here is stopped at the end."""
    if args.reuse:
        paths = stack.StatePaths(args.state_dir)
        missing = [name for name, pid in stack.status(paths).items() if pid is None]
        if missing:
            raise stack.StackError(f"not running in {paths.root}: {', '.join(missing)}")
        yield paths
        return
    made = args.state_dir is None
    root = Path(tempfile.mkdtemp(prefix="nitro-load-")) if made else args.state_dir
    paths = stack.StatePaths(root)
    try:
        say(f"starting the local stack in {root}")
        stack.bring_up(
            paths,
            model_dir=args.model_dir,
            progress=lambda line: say(f"stack: {line}"),
            ready_timeout=READY_TIMEOUT_S,
        )
        yield paths
    finally:
        stack.stop_all(paths)
        if made:
            shutil.rmtree(root, ignore_errors=True)


def save_metrics_page(paths: stack.StatePaths, proxy_url: str) -> None:
    context = ssl.create_default_context(cafile=str(paths.cert))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(f"{proxy_url}/metrics", timeout=30) as page:
            (paths.logs / "metrics.txt").write_bytes(page.read(8 << 20))
    except OSError as exc:
        say(f"no metrics page: {exc}")


def run(args: argparse.Namespace, paths: stack.StatePaths) -> dict[str, Any]:
    pids = {name: pid for name, pid in stack.status(paths).items() if pid is not None}
    profile = load_profile(paths.root)
    settings = dataclasses.replace(profile.settings, timeout_s=CLIENT_TIMEOUT_S)
    tally = Tally()
    start = threading.Barrier(args.clients + 1, timeout=CLIENT_TIMEOUT_S * 2)
    stop_at = [float("inf")]
    clients = [
        SecureChatClient.from_settings(settings, profile.credentials) for _ in range(args.clients)
    ]
    threads = [
        threading.Thread(
            target=run_client,
            args=(client, tally),
            kwargs={
                "index": i,
                "tag": args.tag,
                "new_tokens": args.new_tokens,
                "start": start,
                "stop_at": stop_at,
            },
            daemon=True,
        )
        for i, client in enumerate(clients)
    ]
    say(f"{args.clients} clients warming up (one answer each)")
    for thread in threads:
        thread.start()
    start.wait()  # every client has its data key, cached in the enclave: the run starts now
    memory_start = memory(pids)
    began = time.monotonic()
    stop_at[0] = began + args.duration
    say(f"running for {args.duration:.0f} s")
    for thread in threads:
        thread.join(args.duration + CLIENT_TIMEOUT_S)
    elapsed = time.monotonic() - began
    memory_end = memory(pids)
    for client in clients:
        client.close()
    if args.state_dir is not None:  # kept: the metrics page beside the logs (content-free)
        save_metrics_page(paths, settings.proxy_url)
    hung = sum(thread.is_alive() for thread in threads)
    return summarize(args, tally, elapsed, memory_start, memory_end, hung)


def summarize(
    args: argparse.Namespace,
    tally: Tally,
    elapsed: float,
    memory_start: dict[str, float],
    memory_end: dict[str, float],
    hung: int,
) -> dict[str, Any]:
    with tally.lock:
        errors = dict(sorted(tally.errors.items()))
        latencies = list(tally.latencies_s)
        requests, answers, tokens, cross_talk = (
            tally.requests,
            tally.answers,
            tally.tokens,
            tally.cross_talk,
        )
    server_5xx = {
        code: count
        for code, count in errors.items()
        if (member := ErrorCode.from_code(code)) is not None
        and member.http_status >= 500
        and member not in (ErrorCode.OVERLOADED, ErrorCode.ANSWER_INVALID)
    }
    growth = {
        name: (memory_end[name] - memory_start[name]) / memory_start[name]
        if memory_start[name]
        else None
        for name in memory_start
    }
    targets = [
        {"target": "cross-talk", "value": cross_talk, "limit": 0, "ok": cross_talk == 0},
        {
            "target": "5xx other than overloaded",
            "value": sum(server_5xx.values()),
            "limit": 0,
            "ok": not server_5xx,
        },
        {"target": "answers", "value": answers, "limit": "> 0", "ok": answers > 0},
        {"target": "clients still running at the end", "value": hung, "limit": 0, "ok": not hung},
    ]
    for name, value in growth.items():
        targets.append(
            {
                "target": f"{name} memory growth",
                "value": None if value is None else round(value, 4),
                "limit": f"< {MAX_GROWTH:.0%}",
                "ok": value is not None and value < MAX_GROWTH,
            }
        )
    return {
        "config": {
            "clients": args.clients,
            "duration_s": args.duration,
            "new_tokens": args.new_tokens,
            "model_dir": str(args.model_dir) if args.model_dir else None,
        },
        "elapsed_s": round(elapsed, 2),
        "requests": requests,
        "answers": answers,
        "errors": errors,
        "server_5xx": server_5xx,
        "cross_talk": cross_talk,
        "latency_ms": {
            name: None if (v := percentile(latencies, q)) is None else round(v * 1000, 1)
            for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
        },
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else None,
        "memory_mib": {
            name: {
                "start": round(memory_start[name], 1),
                "end": round(memory_end[name], 1),
                "growth_pct": None if growth[name] is None else round(growth[name] * 100, 2),
            }
            for name in memory_start
        },
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "targets": targets,
        "passed": all(target["ok"] for target in targets),
    }


def format_report(results: dict[str, Any]) -> str:
    latency = results["latency_ms"]
    lines = [
        f"clients {results['config']['clients']}, {results['elapsed_s']:.1f} s, "
        f"load average {' '.join(str(v) for v in results['load_average'])}",
        f"requests      {results['requests']} ({results['answers']} answered)",
        "errors        "
        + (", ".join(f"{code} {n}" for code, n in results["errors"].items()) or "none"),
        f"cross-talk    {results['cross_talk']}",
        f"latency       p50 {latency['p50']} ms, p95 {latency['p95']} ms, p99 {latency['p99']} ms",
        f"tokens/s      {results['tokens_per_s']} ({results['tokens']} tokens)",
    ]
    for name, mem in results["memory_mib"].items():
        lines.append(
            f"{name + ' RSS':<13} {mem['start']} MiB -> {mem['end']} MiB ({mem['growth_pct']}%)"
        )
    for target in results["targets"]:
        mark = "pass" if target["ok"] else "MISS"
        lines.append(f"  {mark}  {target['target']}: {target['value']} (target {target['limit']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="default 16")
    parser.add_argument(
        "--duration", type=float, default=DEFAULT_DURATION_S, help="seconds (default 60)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, help="per answer (default 32)"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=ROOT / ".cache" / "tiny-model",
        help="the model the stack serves (default: the tiny model `make tiny-model` builds)",
    )
    parser.add_argument(
        "--state-dir", type=Path, help="the stack's state directory (default: a temporary one)"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="use the stack already running in --state-dir"
    )
    parser.add_argument(
        "--tag", default="", help="a word added to every question (the tests' canary)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("load-results.json"), help="the results' JSON file"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256:
        parser.error("--clients must be 1-256")
    if not 0 < args.duration <= 24 * 3600:
        parser.error("--duration must be above 0 and at most a day")
    if not 1 <= args.new_tokens <= 512:
        parser.error("--new-tokens must be 1-512")
    if args.reuse and args.state_dir is None:
        parser.error("--reuse needs --state-dir")
    if not args.reuse and not (args.model_dir / "config.json").is_file():
        parser.error(f"{args.model_dir} holds no model: run `make tiny-model` first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with running_stack(args) as paths:
            results = run(args, paths)
    except stack.StackError as exc:
        where = f" (see the {exc.component} log)" if exc.component else ""
        say(f"the local stack failed: {exc}{where}")
        return 2
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(format_report(results))
    say(f"results written to {args.output}")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
