"""`make image-test`, second half: build, run and ask (scripts/image_test.sh prepares docker).

Builds the enclave image twice from the same inputs (content digests compared), runs it with
--network none so that it leaves only as a real enclave does (unix sockets in a shared directory
stand in for vsock), and asks it one question through the parent proxy with `chatbot`.

    inside the container                         on this machine (the "parent")
    enclave-server  unix:/run/nitro/enclave.sock <- parent-proxy (gunicorn, TLS) <- chatbot
    NSM client      unix:/run/nitro/nsm.sock     -> NSM emulator (measures the staged image files)
    boto3 -> https://kms.us-east-1.amazonaws.com (/etc/hosts: 127.0.0.1)
          -> forwarder 127.0.0.1:443 -> unix:/run/nitro/kms.sock (vsock port 8000's stand-in)
                                     -> vsock-proxy stand-in -> TLS front -> KMS emulator

It prints progress, image sizes, build times and the enclave memory the 4x rule asks for, and
writes .cache/enclave-image/image-test.json. It never prints the question's answer.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emulator import stack  # noqa: E402
from emulator.ca import issue_server_tls  # noqa: E402
from enclave.forwarder import Forwarder  # noqa: E402
from protocol.transport import Address  # noqa: E402

STATE = Path("/tmp/nitro-image-test")  # short: unix socket paths must stay under 100 bytes
CACHE = ROOT / ".cache" / "enclave-image"
STAGED = ROOT / "build" / "enclave-image" / "app" / "app"  # build_enclave.sh's staged files
CONTAINER = "nitro-image-test"
IMAGES = {
    "first": ("nitro-llm-enclave-base:image-test", "nitro-llm:image-test"),
    "second": ("nitro-llm-enclave-base:image-test-rebuild", "nitro-llm:image-test-rebuild"),
}
KMS_HOST = f"kms.{stack.REGION}.amazonaws.com"
QUESTION = "How do I enroll in the retirement plan?"  # from emulator/data/benefits_faq.txt
BUILD_TIMEOUT_S = 2400
ASK_TIMEOUT_S = 300
EIF_OVERHEAD_MIB = 16  # what nitro-cli adds to the root file system: kernel, init, NSM driver
_STARTED = time.monotonic()


def say(line: str) -> None:
    print(f"image-test [{time.monotonic() - _STARTED + _OFFSET:.0f} s] {line}", flush=True)


_OFFSET = 0.0


def docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise SystemExit(f"image-test: docker {args[0]} failed: {done.stderr.strip()[-800:]}")
    return done.stdout.strip()


# ---- the KMS side: TLS as KMS speaks it, reached through the stand-in for vsock-proxy ----------


class TlsFront:
    """TLS for the KMS emulator (plain HTTP): what the real KMS endpoint's TLS is to boto3.

    One thread per connection; the TLS socket is only ever used from that thread.
    """

    def __init__(self, cert: Path, key: Path, kms_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.kms_port = kms_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with (
                self.context.wrap_socket(conn, server_side=True) as tls,
                socket.create_connection(("127.0.0.1", self.kms_port), timeout=30) as plain,
            ):
                self.handshakes += 1
                self._pump(tls, plain)
        except (OSError, ssl.SSLError):
            return

    @staticmethod
    def _pump(tls: ssl.SSLSocket, plain: socket.socket) -> None:
        while True:
            ready = [tls] if tls.pending() else select.select([tls, plain], [], [], 60)[0]
            if not ready:
                return
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (plain if sock is tls else tls).sendall(data)

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@contextlib.contextmanager
def background(forwarder: Forwarder) -> Iterator[Forwarder]:
    forwarder.bind()
    thread = threading.Thread(target=forwarder.serve, daemon=True)
    thread.start()
    try:
        yield forwarder
    finally:
        forwarder.shutdown()
        thread.join(timeout=5)


# ---- building, and what an image holds -------------------------------------------------------


def snapshot_app(dest: Path) -> Path:
    """A copy of the checkout's enclave/ and protocol/, so that both builds (and the NSM
    emulator's measurement) take the same files even if the checkout changes meanwhile."""
    for name in ("enclave", "protocol"):
        shutil.copytree(
            ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return dest


def build(which: str, config: Path, model_dir: Path, os_image: str, no_cache: bool) -> float:
    base_tag, tag = IMAGES[which]
    argv = [
        str(ROOT / "scripts" / "build_enclave.sh"),
        "--no-eif",
        "--app-root",
        str(STATE / "app"),
        "--model-dir",
        str(model_dir),
        "--config",
        str(config),
        "--base-image",
        os_image,
        "--base-tag",
        base_tag,
        "--tag",
        tag,
    ] + (["--no-cache"] if no_cache else [])
    say(f"building {base_tag} and {tag}{' with --no-cache' if no_cache else ''}")
    started = time.monotonic()
    done = subprocess.run(argv, timeout=BUILD_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"image-test: building {tag} failed (exit {done.returncode})")
    return time.monotonic() - started


def _entry(member: tarfile.TarInfo, content: IO[bytes] | None) -> tuple[str, ...]:
    kind = {tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l", tarfile.LNKTYPE: "h"}.get(
        member.type, "f" if member.isreg() else f"t{member.type!r}"
    )
    digest = ""
    if content is not None:
        sha = hashlib.sha256()
        while chunk := content.read(1 << 20):
            sha.update(chunk)
        digest = sha.hexdigest()
    return (
        kind,
        f"{member.mode:o}",
        f"{member.uid}:{member.gid}",
        str(int(member.mtime)),
        str(member.size if member.isreg() else 0),
        digest or member.linkname,
    )


def image_content(tag: str) -> dict[str, Any]:
    """The image's file system as its layers stack up (`docker save`, whiteouts applied), with
    per-layer digests: what nitro-cli turns into the EIF's ramdisk, without docker's run-time
    files. Returns the digests with and without file times, the layers' and the image id."""
    image_id = docker("image", "inspect", "--format", "{{.Id}}", tag)
    proc = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    layers: dict[str, dict[str, tuple[str, ...]]] = {}
    manifest: list[dict[str, Any]] = []
    with tarfile.open(fileobj=proc.stdout, mode="r|") as outer:
        for member in outer:
            if member.name.endswith("layer.tar") or member.name.startswith("blobs/sha256/"):
                handle = outer.extractfile(member)
                if handle is None:
                    continue
                files: dict[str, tuple[str, ...]] = {}
                try:
                    with tarfile.open(fileobj=handle, mode="r|") as layer:
                        for item in layer:
                            body = layer.extractfile(item) if item.isreg() else None
                            files[item.name.rstrip("/").removeprefix("./")] = _entry(item, body)
                except tarfile.ReadError:
                    continue  # a config blob, not a layer
                layers[member.name] = files
            elif member.name == "manifest.json":
                handle = outer.extractfile(member)
                manifest = json.loads(handle.read()) if handle else []
    if proc.wait(timeout=600) != 0:
        raise SystemExit(f"image-test: docker save {tag} failed")
    merged: dict[str, tuple[str, ...]] = {}
    layer_digests = []
    layer_entries = []
    for name in manifest[0]["Layers"]:
        files = layers[name]
        layer_digests.append(_digest(files, with_times=True))
        layer_entries.append(files)
        for path, entry in sorted(files.items()):
            base = os.path.basename(path)
            parent = os.path.dirname(path)
            if base == ".wh..wh..opq":
                for old in [p for p in merged if p.startswith(parent + "/")]:
                    del merged[old]
            elif base.startswith(".wh."):
                gone = os.path.join(parent, base[len(".wh.") :])
                for old in [p for p in merged if p == gone or p.startswith(gone + "/")]:
                    del merged[old]
            else:
                merged[path] = entry
    return {
        "image_id": image_id,
        "diff_ids": json.loads(
            docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", tag)
        ),
        "layer_content": layer_digests,
        "content": _digest(merged, with_times=True),
        "content_without_times": _digest(merged, with_times=False),
        "files": len(merged),
        "_entries": merged,
        "_layers": layer_entries,
    }


def _digest(files: dict[str, tuple[str, ...]], *, with_times: bool) -> str:
    sha = hashlib.sha256()
    for path in sorted(files):
        entry = files[path] if with_times else files[path][:3] + files[path][4:]
        sha.update((path + "\0" + "\0".join(entry) + "\n").encode())
    return "sha256:" + sha.hexdigest()


_FIELDS = ("kind", "mode", "owner", "mtime", "size", "content")


def _differences(
    a: dict[str, tuple[str, ...]], b: dict[str, tuple[str, ...]]
) -> tuple[list[str], dict[str, int]]:
    """The paths whose entries differ, and how many differ in each field."""
    differing = sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))
    why: dict[str, int] = {}
    for path in differing:
        ea, eb = a.get(path), b.get(path)
        if ea is None or eb is None:
            why["only in one"] = why.get("only in one", 0) + 1
            continue
        for name, x, y in zip(_FIELDS, ea, eb, strict=True):
            if x != y:
                why[name] = why.get(name, 0) + 1
    return differing, why


def compare(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    differing, why = _differences(first["_entries"], second["_entries"])
    layers = []
    for index, (la, lb) in enumerate(zip(first["_layers"], second["_layers"], strict=False)):
        paths, fields = _differences(la, lb)
        if paths:
            layers.append({"layer": index + 1, "paths": paths[:8], "fields": fields})
    return {
        "image_id_equal": first["image_id"] == second["image_id"],
        "diff_ids_equal": [
            x == y for x, y in zip(first["diff_ids"], second["diff_ids"], strict=False)
        ],
        "layer_content_equal": [
            x == y for x, y in zip(first["layer_content"], second["layer_content"], strict=False)
        ],
        "content_equal": first["content"] == second["content"],
        "content_without_times_equal": first["content_without_times"]
        == second["content_without_times"],
        "differing_files": len(differing),
        "differing_examples": differing[:15],
        "differences_by_field": why,
        "differing_layers": layers,
    }


def remove_dangling_since(since: datetime.datetime) -> None:
    """Remove the untagged images the --no-cache rebuild left (its install stage), keeping the
    first build's, which the next run's first build reuses from docker's cache."""
    for image_id in docker("images", "--quiet", "--filter", "dangling=true").split():
        created = docker("image", "inspect", "--format", "{{.Created}}", image_id, check=False)
        with contextlib.suppress(ValueError):
            # Docker prints RFC 3339 with nanoseconds; seconds are enough here.
            when = datetime.datetime.fromisoformat(created[:19]).replace(tzinfo=datetime.UTC)
            if when >= since.replace(microsecond=0):
                docker("rmi", image_id, check=False)


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", tag))


def mib(n: float) -> float:
    return n / (1 << 20)


def memory_by_4x_rule(image_bytes: int) -> int:
    """MiB nitro-cli asks of an enclave from this image: 4x its EIF, rounded up to 256 MiB."""
    eif_mib = mib(image_bytes) + EIF_OVERHEAD_MIB
    return int(math.ceil(4 * eif_mib / 256) * 256)


# The int8 bloom-560m's model-int8.safetensors (as `make bench` prepares it) and, about, its
# tokenizer.json: what replaces the tiny model in a production image.
BLOOM_560M_INT8_BYTES = 562_112_424 + 14_500_000


def allocator_memory() -> int | None:
    for line in (ROOT / "allocator.yaml").read_text().splitlines():
        if line.startswith("memory_mib:"):
            return int(line.split(":", 1)[1].strip())
    return None


# ---- running it ------------------------------------------------------------------------------


def cgroup_peak(container_id: str) -> int | None:
    for path in (
        f"/sys/fs/cgroup/memory/docker/{container_id}/memory.max_usage_in_bytes",
        f"/sys/fs/cgroup/system.slice/docker-{container_id}.scope/memory.peak",
        f"/sys/fs/cgroup/docker/{container_id}/memory.peak",
    ):
        with contextlib.suppress(OSError, ValueError):
            return int(Path(path).read_text().strip())
    return None


def run_and_ask(
    paths: stack.StatePaths, tag: str, memory_mib: int, procs: list[stack.Proc]
) -> dict[str, Any]:
    run_dir = paths.run  # shared with the container as /run/nitro
    docker("rm", "-f", CONTAINER, check=False)
    container_id = docker(
        "run",
        "--detach",
        "--name",
        CONTAINER,
        "--network",
        "none",
        "--memory",
        f"{memory_mib}m",
        "--volume",
        f"{run_dir}:/run/nitro",
        "--env",
        "NITRO_ENCLAVE_LISTEN=unix:///run/nitro/enclave.sock",
        "--env",
        "NITRO_NSM=unix:///run/nitro/nsm.sock",
        "--env",
        "NITRO_KMS_FORWARD_TARGET=unix:///run/nitro/kms.sock",
        tag,
    )
    say(f"enclave container {container_id[:12]} started (--network none, --memory {memory_mib}m)")
    # Its output (JSON lines, never content) goes where nitro-local keeps the enclave's log.
    log = open(paths.log("enclave"), "ab")  # closed in finally
    follower = subprocess.Popen(["docker", "logs", "--follow", CONTAINER], stdout=log, stderr=log)
    try:
        stack.write_parent_credentials(paths, stack.ensure_principals(paths).parent)
        port = stack.free_port()
        proxy_url = f"https://127.0.0.1:{port}"
        procs.append(stack.start_proxy(paths, port))
        say("waiting for the enclave to load its model and the proxy to be ready")
        stack.wait_ready(paths, proxy_url, procs, timeout=300)
        key_arn = json.loads(paths.key_file.read_text())["key_arn"]
        stack.write_profile(
            paths,
            proxy_url=proxy_url,
            kms_endpoint=f"http://127.0.0.1:{stack._read_port(paths.kms_port_file)}",
            key_arn=key_arn,
            user=stack.ensure_principals(paths).user,
            attestation_root=paths.ca_dir / "root.pem",
        )
        say("asking a question with chatbot through the proxy (answer not shown)")
        started = time.monotonic()
        chatbot = Path(sys.executable).parent / "chatbot"
        done = subprocess.run(
            [str(chatbot), "--local", "--state-dir", str(paths.root), "ask", QUESTION],
            capture_output=True,
            text=True,
            timeout=ASK_TIMEOUT_S,
            env={**os.environ, "NO_PROXY": "127.0.0.1,localhost"},
            check=False,
        )
        seconds = time.monotonic() - started
        if done.returncode != 0:
            # The chatbot's stderr holds a code and the client's own text, never content.
            raise SystemExit(f"image-test: chatbot failed: {done.stderr.strip()[-600:]}")
        if not done.stdout.strip():
            raise SystemExit("image-test: chatbot answered nothing")
        loaded = stack.log_events(paths.log("enclave"), "model_loaded")
        kernel = loaded[-1].get("int8_kernel") if loaded else None
        if kernel != "avx2" and shutil.which("gcc") and "avx2" in Path("/proc/cpuinfo").read_text():
            # build_enclave.sh compiles it into the image; fbgemm here means that step broke.
            raise SystemExit(f"image-test: the enclave ran the int8 kernel {kernel}, not avx2")
        state = json.loads(docker("inspect", "--format", "{{json .State}}", CONTAINER))
        return {
            "int8_kernel": kernel,
            "answer_chars": len(done.stdout.strip()),
            "ask_s": round(seconds, 1),
            "container_running": state.get("Running"),
            "container_peak_bytes": cgroup_peak(container_id),
        }
    finally:
        docker("rm", "-f", CONTAINER, check=False)
        follower.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            follower.wait(timeout=10)
        log.close()


def kms_operations(paths: stack.StatePaths) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in paths.log("kms").read_text().splitlines():
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        operation = record.get("operation")
        if operation:
            counts[operation] = counts.get(operation, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    global _OFFSET
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--os-image", default="nitro-llm-os:bookworm")
    parser.add_argument("--started", type=float, help="when image_test.sh started (epoch s)")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=Path(os.environ.get("NITRO_TINY_MODEL") or ROOT / ".cache" / "tiny-model"),
    )
    args = parser.parse_args(argv)
    if args.started:
        _OFFSET = time.time() - args.started
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"image-test: no model in {args.model_dir} (make tiny-model builds it)")

    docker("rm", "-f", CONTAINER, check=False)
    paths = stack.StatePaths(STATE)
    if STATE.exists():
        stack.stop_all(paths)
        shutil.rmtree(STATE)
    paths.prepare()
    stack.ensure_ca(paths)
    principals = stack.ensure_principals(paths)
    stack.ensure_tls_cert(paths)
    procs: list[stack.Proc] = []
    results: dict[str, Any] = {}
    front: TlsFront | None = None
    second_started: datetime.datetime | None = None
    try:
        say("starting the KMS emulator and creating the key")
        kms, endpoint = stack.start_kms(paths)
        procs.append(kms)
        admin = stack.kms_client(endpoint, principals.admin)
        key_arn = stack.create_or_load_key(paths, admin)
        ca, cert, key = issue_server_tls(STATE / "kms-tls", [KMS_HOST])
        front = TlsFront(cert, key, int(endpoint.rpartition(":")[2]))

        # The measured configuration: KMS at its real name, its TLS checked against our CA.
        config_dir = STATE / "config"
        config_dir.mkdir()
        shutil.copyfile(ca, config_dir / "kms-ca.pem")
        config = {
            "region": stack.REGION,
            "key_ids": [key_arn],
            "model_dir": "/app/model",
            "ca_bundle": "/app/config/kms-ca.pem",
        }
        (config_dir / "enclave.json").write_text(json.dumps(config, indent=2) + "\n")
        snapshot_app(STATE / "app")

        times = {
            "first_build_s": build(
                "first", config_dir / "enclave.json", args.model_dir, args.os_image, no_cache=False
            ),
        }
        say(f"first build took {times['first_build_s']:.0f} s; reading its content (docker save)")
        first = image_content(IMAGES["first"][1])
        second_started = datetime.datetime.now(datetime.UTC)
        times["second_build_no_cache_s"] = build(
            "second", config_dir / "enclave.json", args.model_dir, args.os_image, no_cache=True
        )
        say(f"second build took {times['second_build_no_cache_s']:.0f} s; reading its content")
        second = image_content(IMAGES["second"][1])
        repro = compare(first, second)
        results.update(times)
        results["reproducibility"] = repro
        results["first"] = {k: v for k, v in first.items() if not k.startswith("_")}
        results["second"] = {k: v for k, v in second.items() if not k.startswith("_")}

        sizes = {
            "os_image_bytes": image_size(args.os_image),
            "base_image_bytes": image_size(IMAGES["first"][0]),
            "enclave_image_bytes": image_size(IMAGES["first"][1]),
        }
        results["sizes"] = sizes
        memory = memory_by_4x_rule(sizes["enclave_image_bytes"])
        results["memory_mib_4x_rule"] = memory
        tiny = sum(f.stat().st_size for f in (STAGED / "model").iterdir() if f.is_file())
        results["memory_mib_4x_rule_bloom_560m"] = memory_by_4x_rule(
            sizes["enclave_image_bytes"] - tiny + BLOOM_560M_INT8_BYTES
        )

        # The NSM emulator measures exactly the staged files the image was built from.
        say("measuring the staged image files and pinning the key policy to their PCRs")
        from emulator.measure import measure

        pcrs = measure(STAGED, STAGED / "config" / "enclave.json", STAGED / "model")
        stack.apply_local_policy(admin, key_arn, pcrs)
        nsm = stack.spawn(
            paths,
            "nsm",
            stack._command("nitro-nsm-emulator", "emulator.nsm_server")
            + ["--socket", str(paths.nsm_socket), "--state-dir", str(paths.root)]
            + ["--app-root", str(STAGED), "--enclave-config", str(STAGED / "config/enclave.json")]
            + ["--model-dir", str(STAGED / "model")],
        )
        procs.append(nsm)
        stack._wait_for("socket", paths.nsm_socket.exists, nsm, paths, 30)

        vsock_proxy = Forwarder(
            Address("unix", path=str(paths.run / "kms.sock")),
            Address("tcp", host="127.0.0.1", port=front.port),
        )
        with background(vsock_proxy):
            results["run"] = run_and_ask(paths, IMAGES["first"][1], memory, procs)
        results["run"]["kms_connections_via_vsock_stand_in"] = vsock_proxy.relayed
        results["run"]["kms_tls_handshakes"] = front.handshakes
        results["run"]["kms_operations"] = kms_operations(paths)
        if vsock_proxy.relayed < 1 or front.handshakes < 1:
            raise SystemExit("image-test: the enclave's KMS traffic did not cross the forwarder")
        if results["run"]["kms_operations"].get("Decrypt", 0) < 1:
            raise SystemExit("image-test: the enclave made no attested Decrypt")
    finally:
        if front is not None:
            front.close()
        stack.stop_all(paths)
        for tag in IMAGES["second"]:
            docker("rmi", tag, check=False)
        if second_started is not None:
            remove_dangling_since(second_started)

    report(results)
    (CACHE / "image-test.json").write_text(json.dumps(results, indent=2) + "\n")
    # The plain closing line CI reads: the image was built, run and answered.
    print("image-test: 1 passed, 0 failed")
    return 0


def report(results: dict[str, Any]) -> None:
    sizes, repro, run = results["sizes"], results["reproducibility"], results["run"]
    allocator = allocator_memory()
    print()
    print("image sizes (docker's uncompressed size):")
    print(f"  base OS (debootstrap minbase + python3)  {mib(sizes['os_image_bytes']):8.0f} MiB")
    print(f"  enclave base (+ venv, CPU torch)          {mib(sizes['base_image_bytes']):8.0f} MiB")
    print(
        f"  enclave image (+ app, tiny model)         {mib(sizes['enclave_image_bytes']):8.0f} MiB"
    )
    print(
        f"build times: first {results['first_build_s']:.0f} s, "
        f"again with --no-cache {results['second_build_no_cache_s']:.0f} s"
    )
    print(
        f"enclave memory by the 4x rule (EIF ~ image + {EIF_OVERHEAD_MIB} MiB): "
        f"{results['memory_mib_4x_rule']} MiB for this image, "
        f"{results['memory_mib_4x_rule_bloom_560m']} MiB with the int8 bloom-560m in place of the "
        f"tiny model; allocator.yaml has {allocator}"
    )
    peak = run.get("container_peak_bytes")
    print(
        f"the enclave answered ({run['answer_chars']} characters, {run['ask_s']} s, "
        f"int8 kernel {run['int8_kernel']}); "
        f"container peak memory {mib(peak):.0f} MiB"
        if peak
        else ""
    )
    print(
        f"KMS: {run['kms_connections_via_vsock_stand_in']} connection(s) through the forwarder "
        f"and the vsock-proxy stand-in, {run['kms_tls_handshakes']} TLS handshake(s), "
        f"operations {run['kms_operations']}"
    )
    print("reproducibility (first build vs. a --no-cache rebuild):")
    print(
        f"  file system content, times included   {'SAME' if repro['content_equal'] else 'DIFFERS'}"
    )
    print(
        f"  file system content, times ignored    "
        f"{'SAME' if repro['content_without_times_equal'] else 'DIFFERS'}"
    )
    print(f"  layers (diff ids) equal               {repro['diff_ids_equal']}")
    print(f"  image id equal                        {repro['image_id_equal']}")
    for layer in repro["differing_layers"]:
        print(f"  layer {layer['layer']} differs in {layer['fields']}: {layer['paths'][:4]}")
    if repro["differing_files"]:
        print(
            f"  {repro['differing_files']} differing paths, by field "
            f"{repro['differences_by_field']}; e.g. {repro['differing_examples'][:5]}"
        )


if __name__ == "__main__":
    sys.exit(main())
