"""Boot time of the enclave, start to ready, with the model baked in and with it sealed.

`python scripts/bench_boot.py [--model DIR] [--runs N] [--engine fast|reference]`

The model is bloom-560m's shape with random weights, prepared for the fast engine, as
scripts/bench.py builds it into .bench-cache/ (reused when present, built with bench.py's own
builders otherwise). Local stand-ins (KMS and NSM emulators, the model feed on a unix socket)
run as for `nitro-local`; each boot is a fresh `enclave-server` process, timed from its start to
the first `ready: true` answer on its socket. The sealed boot includes pulling the sealed files
from the feed, the attested KMS Decrypt, decrypting and loading from memory. Prints JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from emulator import stack  # noqa: E402
from protocol.framing import recv_json, send_json  # noqa: E402
from protocol.messages import Kind, RequestFrame, parse_body_frame  # noqa: E402
from protocol.sealed_model import seal_directory  # noqa: E402
from protocol.transport import Address  # noqa: E402

BOOT_TIMEOUT_S = 900.0


def bench_model(cache: Path) -> Path:
    """The prepared bloom-560m-shaped model: the cached one if present, else bench.py builds it."""
    prepared = cache / "bloom-560m-random-v1-fast"
    if (prepared / "model-int8.safetensors").is_file():
        return prepared
    spec = importlib.util.spec_from_file_location("nitro_bench", _ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    tiny = bench.ensure_tiny_model(cache)
    return bench.ensure_fast_weights(cache, bench.ensure_full_model(cache, tiny))


def _ready(paths: stack.StatePaths) -> bool:
    try:
        with Address.parse(f"unix://{paths.enclave_socket}").connect(timeout=5) as sock:
            send_json(sock, RequestFrame(Kind.READY, "bench-boot").to_json())
            recv_json(sock, timeout=10)
            answer = parse_body_frame(recv_json(sock, timeout=10))[1]
    except (OSError, ValueError):
        return False
    if answer.get("model") not in ("loading", "fast", "reference"):
        raise RuntimeError(f"the enclave could not load its model: {answer.get('model')}")
    return bool(answer.get("ready"))


def _peak_rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return round(int(match.group(1)) / 1024, 1) if match else None


def _events(paths: stack.StatePaths) -> dict[str, float]:
    """The load phases the enclave logged in its last run (ms)."""
    out: dict[str, float] = {}
    for record in stack.log_events(paths.log("enclave"), "model_loaded", "sealed_model_opened"):
        out[record["event"] + "_ms"] = record.get("ms")
    return out


def boot_once(paths: stack.StatePaths) -> dict[str, Any]:
    started = time.monotonic()
    proc = stack.start_enclave(paths)
    peak = None
    try:
        while not _ready(paths):
            if time.monotonic() - started > BOOT_TIMEOUT_S:
                raise RuntimeError("the enclave was not ready in time")
            peak = _peak_rss_mib(proc.pid) or peak
            time.sleep(0.1)
        seconds = time.monotonic() - started
        peak = _peak_rss_mib(proc.pid) or peak
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while stack.component_pid(paths, "enclave") is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    return {"ready_s": round(seconds, 2), "peak_rss_mib": peak, **_events(paths)}


def run(model: Path, runs: int, engine: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="nitro-bench-boot-"))
    paths = stack.StatePaths(work / "state")
    paths.prepare()
    # The enclave runs from a snapshot of enclave/ and protocol/: an edit to the checkout during
    # the run must not change the PCRs the key policies were pinned to.
    app = work / "app"
    for name in ("enclave", "protocol"):
        shutil.copytree(_ROOT / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    stack.record_app_root(paths, app)
    results: dict[str, Any] = {"model": str(model), "engine": engine, "runs": runs}
    results["model_bytes"] = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
    try:
        stack.ensure_ca(paths)
        principals = stack.ensure_principals(paths)
        owner = stack.ensure_model_owner(paths)
        _kms, endpoint = stack.start_kms(paths)
        admin = stack.kms_client(endpoint, principals.admin)
        key_arn = stack.create_or_load_key(paths, admin)
        model_key = admin.create_key(Description="bench model key")["KeyMetadata"]["Arn"]
        owner_kms = stack.kms_client(endpoint, owner)

        def wrap(context: Any) -> tuple[bytes, bytes, str]:
            answer = owner_kms.generate_data_key(
                KeyId=model_key, KeySpec="AES_256", EncryptionContext=dict(context)
            )
            return answer["Plaintext"], answer["CiphertextBlob"], answer["KeyId"]

        timer = time.monotonic()
        manifest = seal_directory(model, work / "sealed", wrap)
        results["seal_s"] = round(time.monotonic() - timer, 2)
        stack.write_parent_credentials(paths, principals.parent)
        sealed = stack.SealedModel(model_key, work / "sealed", manifest.digest.hex())
        for mode in ("baked", "sealed"):
            stack.write_enclave_config(
                paths,
                key_arn=key_arn,
                model_dir=model,
                kms_endpoint=endpoint,
                sealed=sealed if mode == "sealed" else None,
            )
            config = json.loads(paths.enclave_config.read_text())
            config["engine"] = engine
            paths.enclave_config.write_text(json.dumps(config, indent=2) + "\n")
            measured = model if mode == "baked" else None
            pcrs = stack.measure_pcrs(paths, measured)
            stack.apply_local_policy(admin, key_arn, pcrs)
            stack.apply_model_key_policy(admin, model_key, pcrs)
            started = []
            if mode == "sealed":
                started.append(stack.start_feed(paths, sealed.sealed_dir))
            started.append(stack.start_nsm(paths, measured))  # measures (hashes) once, at start
            results[mode] = []
            for _ in range(runs):
                results[mode].append(boot_once(paths))
                print(f"{mode}: {json.dumps(results[mode][-1])}", file=sys.stderr, flush=True)
            for proc in reversed(started):
                os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(1.0)
    finally:
        stack.stop_all(paths)
        shutil.rmtree(work, ignore_errors=True)
    with open("/proc/loadavg") as handle:
        results["loadavg_after"] = handle.read().split()[:3]
    results["cpus"] = os.cpu_count()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_boot.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a prepared model directory")
    parser.add_argument("--cache", type=Path, default=_ROOT / ".bench-cache")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engine", choices=("fast", "reference"), default="fast")
    args = parser.parse_args(argv)
    model = args.model or bench_model(args.cache)
    print(json.dumps(run(model, args.runs, args.engine), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
