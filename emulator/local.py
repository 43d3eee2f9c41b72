"""`nitro-local up|down|status`: the whole stack on one machine, with no AWS account and no Nitro.

A thin layer over emulator/stack.py: it parses arguments, prints progress on stderr and endpoints
on stdout. It never prints a secret: access keys stay in DIR's 0600 files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from emulator import stack

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nitro-local", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("NITRO_LOCAL_STATE_DIR") or ".nitro-local"),
        help="where keys, config, logs and pids live (env NITRO_LOCAL_STATE_DIR; "
        "default ./.nitro-local)",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ["NITRO_MODEL_DIR"]) if os.environ.get("NITRO_MODEL_DIR") else None,
        help="a saved model to serve instead of building the tiny one (env NITRO_MODEL_DIR)",
    )
    return parser.parse_args(argv)


def _say(line: str) -> None:
    print(f"nitro-local: {line}", file=sys.stderr, flush=True)


def up(paths: stack.StatePaths, model_dir: Path | None) -> int:
    running = {name: pid for name, pid in stack.status(paths).items() if pid is not None}
    if len(running) == len(stack.COMPONENTS):
        _say(f"already running in {paths.root}; nothing changed (`nitro-local down` stops it)")
        _print_endpoints(paths)
        return EXIT_OK
    if running:
        _say(f"part of a stack is running ({', '.join(running)}); stopping it first")
        stack.stop_all(paths)
    _say(f"starting the local stack in {paths.root}")

    def dot() -> None:
        print(".", end="", file=sys.stderr, flush=True)

    try:
        endpoints = stack.bring_up(
            paths, model_dir=model_dir, progress=lambda line: _say(line), tick=dot
        )
    except stack.StackError as exc:
        print(file=sys.stderr)
        _say(f"error: {exc}")
        if exc.component:
            log = paths.log(exc.component)
            _say(f"last lines of {log}:")
            for line in stack.tail(log):
                print(f"    {line}", file=sys.stderr)
        _say("stopped what was started")
        return EXIT_FAILED
    print(file=sys.stderr)
    _print_endpoints(paths, endpoints)
    return EXIT_OK


def _print_endpoints(paths: stack.StatePaths, endpoints: stack.Endpoints | None = None) -> None:
    if endpoints is not None:
        proxy_url, kms_endpoint = endpoints.proxy_url, endpoints.kms_endpoint
    else:
        try:
            profile = stack.read_profile(paths)
        except stack.StackError:
            return
        proxy_url, kms_endpoint = profile.get("proxy_url"), profile.get("kms_endpoint")
    print(f"proxy     {proxy_url}")
    print(f"kms       {kms_endpoint}")
    print(f"profile   {paths.profile}")
    print(f"logs      {paths.logs}")
    print(stack.NO_ISOLATION)


def down(paths: stack.StatePaths) -> int:
    stopped = stack.stop_all(paths)
    if not stopped:
        _say(f"nothing running in {paths.root}")
        return EXIT_OK
    names = ", ".join(f"{proc.name} (pid {proc.pid})" for proc in stopped)
    _say(f"stopped {names}")
    return EXIT_OK


def status(paths: stack.StatePaths) -> int:
    pids = stack.status(paths)
    for name, pid in pids.items():
        state = f"running (pid {pid})" if pid is not None else "stopped"
        print(f"{name:<8}  {state}")
    return EXIT_OK if all(pid is not None for pid in pids.values()) else EXIT_NOT_RUNNING


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    paths = stack.StatePaths(args.state_dir)
    if args.command == "status":
        # Read-only, and works on a directory that does not exist yet.
        return status(paths)
    if args.command == "down" and not paths.root.exists():
        _say(f"nothing running in {paths.root}")
        return EXIT_OK
    try:
        with stack.stack_lock(paths):
            if args.command == "up":
                return up(paths, args.model_dir)
            return down(paths)
    except (stack.StackError, OSError) as exc:
        _say(f"error: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # a bug or an unforeseen failure: a clear line, not a traceback
        _say(f"error: unexpected {type(exc).__name__}: {exc} (see the logs in {paths.logs})")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
