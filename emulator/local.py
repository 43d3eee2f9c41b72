"""`nitro-local up|down|status|measure|restart enclave`: the whole stack on one machine, no AWS.

A thin layer over emulator/stack.py: it parses arguments, prints progress on stderr and endpoints
on stdout. It never prints a secret: access keys stay in DIR's 0600 files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from emulator import stack

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nitro-local", description=__doc__.split("\n")[0])
    parser.add_argument(
        "command",
        choices=("up", "down", "status", "measure", "restart"),
        help="up, down, status; measure (the PCRs of the enclave as its files stand now); "
        "restart enclave (the enclave server alone, measured again)",
    )
    parser.add_argument("component", nargs="?", help="what `restart` restarts: enclave")
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
        help="a saved model to serve instead of building the tiny one (env NITRO_MODEL_DIR); "
        "for measure, the model to measure instead of the one the enclave's config names",
    )
    parser.add_argument(
        "--app-root",
        type=Path,
        default=Path(os.environ["NITRO_APP_ROOT"]) if os.environ.get("NITRO_APP_ROOT") else None,
        help="up: run the enclave from this copy of the checkout's enclave/ and protocol/ "
        "(measured by the NSM emulator; recorded for measure and restart); measure: measure it "
        "(env NITRO_APP_ROOT; default: this checkout)",
    )
    parser.add_argument(
        "--compat",
        action="store_true",
        help="up: also serve protocol v1, the original sample's clients (POST /), under a "
        "separate compat key whose id profile.json names as compat_key_id; off by default",
    )
    parser.add_argument(
        "--sealed-model",
        action="store_true",
        help="up: play a model owner who seals the model under a model key of its own "
        "(profile.json: model_key_id); the parent side gets only the sealed copy, served to the "
        "enclave by the model feed",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help='measure: print only {"PCR0": hex, "PCR1": hex, "PCR2": hex}',
    )
    args = parser.parse_args(argv)
    if args.command == "restart" and args.component != "enclave":
        parser.error("restart takes one component: `nitro-local restart enclave`")
    if args.command != "restart" and args.component is not None:
        parser.error(f"{args.command} takes no component")
    if args.compat and args.command != "up":
        parser.error("--compat goes with up")
    if args.sealed_model and args.command != "up":
        parser.error("--sealed-model goes with up")
    if args.json and args.command != "measure":
        parser.error("--json goes with measure")
    return args


def _say(line: str) -> None:
    print(f"nitro-local: {line}", file=sys.stderr, flush=True)


def up(
    paths: stack.StatePaths,
    model_dir: Path | None,
    app: Path | None = None,
    compat: bool = False,
    sealed_model: bool = False,
) -> int:
    running = {name: pid for name, pid in stack.status(paths).items() if pid is not None}
    if len(running) == len(stack.COMPONENTS):
        _say(f"already running in {paths.root}; nothing changed (`nitro-local down` stops it)")
        current = stack.app_root(paths)
        if app is not None and stack.check_app_root(app) != current:
            _say(f"the enclave runs from {current}; --app-root applies to the next `up`")
        _print_endpoints(paths)
        return EXIT_OK
    if running:
        _say(f"part of a stack is running ({', '.join(running)}); stopping it first")
        stack.stop_all(paths)
    _say(f"starting the local stack in {paths.root}")

    try:
        endpoints = stack.bring_up(
            paths,
            model_dir=model_dir,
            app=app,
            progress=lambda line: _say(line),
            tick=_dot,
            compat=compat,
            sealed_model=sealed_model,
        )
    except stack.StackError as exc:
        print(file=sys.stderr)
        _report_failure(paths, exc)
        _say("stopped what was started")
        return EXIT_FAILED
    print(file=sys.stderr)
    _print_endpoints(paths, endpoints)
    return EXIT_OK


def _dot() -> None:
    print(".", end="", file=sys.stderr, flush=True)


def _report_failure(paths: stack.StatePaths, exc: stack.StackError) -> None:
    _say(f"error: {exc}")
    if exc.component:
        log = paths.log(exc.component)
        _say(f"last lines of {log}:")
        for line in stack.tail(log):
            print(f"    {line}", file=sys.stderr)


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


def restart_enclave(paths: stack.StatePaths) -> int:
    old = stack.component_pid(paths, "enclave")
    _say(f"restarting the enclave server{f' (pid {old})' if old else ''}; it is measured again")
    try:
        proc = stack.restart_enclave(paths, tick=_dot)
    except stack.StackError as exc:
        print(file=sys.stderr)
        _report_failure(paths, exc)
        return EXIT_FAILED
    print(file=sys.stderr)
    _say(f"enclave ready (pid {proc.pid}); `nitro-local measure` compares its PCRs with the policy")
    return EXIT_OK


def measure(
    paths: stack.StatePaths, model_dir: Path | None, app: Path | None, as_json: bool
) -> int:
    """Print the PCRs of the enclave as its files stand, and whether the key policy admits them."""
    measured = stack.measure_enclave(paths, model_dir=model_dir, app=app)
    # PCR0-2 always; any other the emulator sets (none today: PCR3, 4 and 8 mean nothing locally).
    shown = [n for n, value in sorted(measured.pcrs.items()) if n <= 2 or any(value)]
    if as_json:
        # The shape scripts/render_key_policy.py reads (as well as nitro-cli's).
        print(json.dumps({f"PCR{n}": measured.pcrs[n].hex() for n in shown}, indent=2))
        return EXIT_OK
    print("PCRs of the enclave as its files stand now (what the NSM emulator reports at its next")
    print("boot; `nitro-local restart enclave` boots it):")
    for n in shown:
        print(f"  PCR{n:<2} {measured.pcrs[n].hex()}")
    print(f"app root  {measured.app_root} (enclave/, protocol/)")
    print(f"config    {measured.enclave_config}")
    print(f"model     {measured.model_dir or 'sealed (pinned by its manifest digest)'}")
    print()
    found = stack.read_key_policy(paths)
    if found is None:
        print("key policy not checked: this stack's KMS is not running (`nitro-local up`).")
        return EXIT_OK
    key_arn, policy = found
    pins = stack.policy_pins(policy)
    if not pins:
        print(f"the key policy of {key_arn} pins no PCR.")
        return EXIT_OK
    print(f"the key policy of {key_arn} pins {', '.join(f'PCR{n}' for n in pins)}:")
    differs = []
    for n, admitted in pins.items():
        value = measured.pcrs.get(n, bytes(48)).hex()
        if value in admitted:
            print(f"  PCR{n:<2} matches")
            continue
        differs.append(n)
        print(f"  PCR{n:<2} DIFFERS: the policy admits {', '.join(sorted(admitted)) or 'nothing'}")
    if differs:
        print(
            "KMS will refuse the key to an enclave started from these files\n"
            "(error attestation_rejected). If the change is intended, pin the policy to these\n"
            "PCRs: locally, `nitro-local down` then `nitro-local up` re-measures and re-pins it;\n"
            "elsewhere, render the policy from `nitro-local measure --json`."
        )
    else:
        print("the key policy admits these PCRs: KMS releases the key to this enclave.")
    return EXIT_OK


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
        if args.command == "measure":
            # Read-only: no lock, so that it also works while another command runs.
            return measure(paths, args.model_dir, args.app_root, args.json)
        with stack.stack_lock(paths):
            if args.command == "up":
                return up(
                    paths,
                    args.model_dir,
                    args.app_root,
                    compat=args.compat,
                    sealed_model=args.sealed_model,
                )
            if args.command == "restart":
                return restart_enclave(paths)
            return down(paths)
    except (stack.StackError, OSError) as exc:
        _say(f"error: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # a bug or an unforeseen failure: a clear line, not a traceback
        _say(f"error: unexpected {type(exc).__name__}: {exc} (see the logs in {paths.logs})")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
