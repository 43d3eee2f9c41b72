"""Building blocks of the local stack: state paths, access keys, the key, config, policy, processes.

`nitro-local` (emulator/local.py) and the integration tests compose these. Each component runs as
its own process in its own session, its output in DIR/logs/<name>.log and its pid in DIR/run.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import secrets
import signal
import socket
import ssl
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emulator.files import atomic_write
from emulator.local_policy import render_local_policy

ACCOUNT_ID = "111122223333"
REGION = "us-east-1"
ADMIN_ARN = f"arn:aws:iam::{ACCOUNT_ID}:root"
USER_ARN = f"arn:aws:iam::{ACCOUNT_ID}:user/nitro-llm-user"
PARENT_ARN = f"arn:aws:iam::{ACCOUNT_ID}:role/nitro-llm-parent"
KEY_ALIAS = "alias/nitro-llm"
COMPAT_KEY_ALIAS = "alias/nitro-llm-compat"  # protocol v1's own key (`up --compat`)
COMPONENTS = ("kms", "nsm", "enclave", "proxy")  # start order; stopped in reverse
ALL_COMPONENTS = ("kms", "feed", "nsm", "enclave", "proxy")  # the model feed: `up --sealed-model`
NO_ISOLATION = (
    "Local mode gives no isolation: the 'enclave' is an ordinary process on this machine; "
    "it shows the protocol, not the protection."
)
MAX_SOCKET_PATH = 100  # bytes; sun_path holds 108 on Linux, 104 on macOS
READY_TIMEOUT_S = 180.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOCK_TIMEOUT_S = 10.0
_POLL_S = 0.2
_START_MARK = "--- nitro-local: starting"
_MAX_SMALL_FILE = 1 << 16

Progress = Callable[[str], None]


class StackError(Exception):
    """A step of the local stack failed; `component` names the one whose log explains it."""

    def __init__(self, message: str, component: str | None = None) -> None:
        super().__init__(message)
        self.component = component


# ---- where things live -------------------------------------------------------------------------


@dataclass(frozen=True)
class StatePaths:
    """Every path under the state directory DIR (made absolute), and the unix sockets' paths."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(os.fspath(self.root))))

    @property
    def ca_dir(self) -> Path:
        return self.root / "nsm-ca"

    @property
    def principals(self) -> Path:
        return self.root / "principals.json"

    @property
    def key_file(self) -> Path:
        return self.root / "key.json"

    @property
    def enclave_config(self) -> Path:
        return self.root / "enclave.json"

    @property
    def app_file(self) -> Path:
        """Records the app root the enclave runs from (`up --app-root`), for measure and restart."""
        return self.root / "app.json"

    @property
    def parent_credentials(self) -> Path:
        return self.root / "parent.json"

    @property
    def profile(self) -> Path:
        return self.root / "profile.json"

    @property
    def default_model_dir(self) -> Path:
        return self.root / "model"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def cert(self) -> Path:
        return self.root / "tls" / "cert.pem"

    @property
    def tls_key(self) -> Path:
        return self.root / "tls" / "key.pem"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def sockets_file(self) -> Path:
        return self.root / "run" / "sockets.json"

    @property
    def kms_port_file(self) -> Path:
        return self.root / "run" / "kms.port"

    @property
    def lock_file(self) -> Path:
        return self.root / "run" / "lock"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    @property
    def socket_dir(self) -> Path:
        """DIR/run, or /tmp/nitro-<8 hex of sha256(DIR)> when paths under DIR/run are too long."""
        longest = self.run / "enclave.sock"
        if len(os.fsencode(longest)) < MAX_SOCKET_PATH:
            return self.run
        digest = hashlib.sha256(os.fsencode(self.root)).hexdigest()[:8]
        return Path("/tmp") / f"nitro-{digest}"

    @property
    def nsm_socket(self) -> Path:
        return self.socket_dir / "nsm.sock"

    @property
    def enclave_socket(self) -> Path:
        return self.socket_dir / "enclave.sock"

    def prepare(self) -> None:
        """Create DIR (0700) and its subdirectories, the socket directory, and sockets.json."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for sub in (self.logs, self.run, self.tls_dir):
            sub.mkdir(mode=0o700, exist_ok=True)
        if self.socket_dir != self.run:
            _private_dir(self.socket_dir)
        sockets = {"nsm": str(self.nsm_socket), "enclave": str(self.enclave_socket)}
        _write_file(self.sockets_file, json.dumps(sockets, indent=2) + "\n", mode=0o600)


def _private_dir(path: Path) -> None:
    """A directory only we can use: /tmp is shared, so refuse one someone else made."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
        raise StackError(f"{path} exists and is not a directory of ours; remove it")
    if info.st_mode & 0o077:
        raise StackError(f"{path} is accessible to other users; remove it")


def _write_file(path: Path, text: str, *, mode: int) -> None:
    atomic_write(path, text.encode("utf-8"), mode)


def _read_json(path: Path) -> Any:
    with open(path, "rb") as handle:
        raw = handle.read(_MAX_SMALL_FILE + 1)
    if len(raw) > _MAX_SMALL_FILE:
        raise StackError(f"{path} is too large")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StackError(f"{path} is not valid JSON; remove it to start afresh") from exc


@contextlib.contextmanager
def stack_lock(paths: StatePaths, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold DIR/run/lock so that two `nitro-local` commands never work on one DIR at once."""
    paths.run.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(f"another nitro-local is working on {paths.root}") from None
                time.sleep(_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- access keys, CA, model, TLS certificate ---------------------------------------------------


@dataclass(frozen=True)
class AccessKey:
    access_key_id: str
    secret_access_key: str
    arn: str

    def __repr__(self) -> str:  # never let a log line or traceback carry the secret
        return f"AccessKey({self.arn}, {self.access_key_id[:8]}...)"


@dataclass(frozen=True)
class Principals:
    """The KMS emulator's three principals: the key's admin, the user and the parent role."""

    admin: AccessKey
    user: AccessKey
    parent: AccessKey


_KEY_ID_CHARS = string.ascii_uppercase + "234567"  # the alphabet of real access key ids
_SECRET_CHARS = string.ascii_letters + string.digits + "+/"


def _new_access_key(arn: str) -> AccessKey:
    akid = "AKIA" + "".join(secrets.choice(_KEY_ID_CHARS) for _ in range(16))
    secret = "".join(secrets.choice(_SECRET_CHARS) for _ in range(40))
    return AccessKey(akid, secret, arn)


def ensure_principals(paths: StatePaths) -> Principals:
    """Load DIR/principals.json, creating the keys it lacks (kept across restarts; mode 0600)."""
    by_arn: dict[str, AccessKey] = {}
    if paths.principals.exists():
        raw = _read_json(paths.principals)
        if not isinstance(raw, dict):
            raise StackError(f"{paths.principals} must hold an object; remove it to start afresh")
        for akid, entry in raw.items():
            if isinstance(entry, dict) and isinstance(entry.get("arn"), str):
                by_arn[entry["arn"]] = AccessKey(
                    akid, str(entry["secret_access_key"]), entry["arn"]
                )
    wanted = (ADMIN_ARN, USER_ARN, PARENT_ARN)
    if any(arn not in by_arn for arn in wanted):
        for arn in wanted:
            by_arn.setdefault(arn, _new_access_key(arn))
        table = {
            key.access_key_id: {"secret_access_key": key.secret_access_key, "arn": key.arn}
            for key in by_arn.values()
        }
        _write_file(paths.principals, json.dumps(table, indent=2) + "\n", mode=0o600)
    return Principals(by_arn[ADMIN_ARN], by_arn[USER_ARN], by_arn[PARENT_ARN])


def ensure_ca(paths: StatePaths) -> Path:
    """Create (once) the NSM emulator's CA under DIR/nsm-ca; returns the root PEM's path."""
    from emulator.ca import LocalCA

    return Path(LocalCA.load_or_create(paths.ca_dir).root_pem_path)


# The fast engine's prepared weights (enclave/fast_engine.py PREPARED_FILE), written ahead by
# scripts/save_model.py --quantize as an image build would: the enclave converts nothing at boot.
PREPARED_WEIGHTS = "model-int8.safetensors"
PREPARE_TIMEOUT_S = 600


def prepare_weights(model_dir: Path) -> None:
    """Add the int8 weights to `model_dir`, running the image build's own step."""
    script = app_root() / "scripts" / "save_model.py"
    done = subprocess.run(  # noqa: S603 - our own script, fixed arguments
        [sys.executable, str(script), "--quantize", str(model_dir), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=PREPARE_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise StackError(f"preparing the int8 weights failed: {done.stderr.strip()[-300:]}")


def ensure_model(
    paths: StatePaths, model_dir: Path | None = None, progress: Progress | None = None
) -> Path:
    """The model directory: `model_dir` when given, else DIR/model, built once."""
    if model_dir is not None:
        model_dir = Path(os.path.abspath(model_dir))
        if not (model_dir / "config.json").is_file():
            raise StackError(f"{model_dir} holds no model (no config.json)")
        if not (model_dir / PREPARED_WEIGHTS).is_file():
            raise StackError(
                f"{model_dir} has no int8 weights for the fast engine; prepare them with "
                f"python scripts/save_model.py --quantize {model_dir} {model_dir}"
            )
        return model_dir
    target = paths.default_model_dir
    if (target / "config.json").is_file():
        if not (target / PREPARED_WEIGHTS).is_file():  # built before the fast engine existed
            prepare_weights(target)
        return target
    if target.exists():  # left by an older, interrupted build
        _remove_tree(target)
    from emulator.tiny_model import build_tiny_model

    report = progress or (lambda _line: None)
    report("building the tiny model once (a few minutes on a small machine)")
    # Built aside and renamed, so an interrupted build never passes for a model.
    staging = Path(tempfile.mkdtemp(dir=paths.root, prefix=".model-"))
    try:
        build_tiny_model(staging, progress=report)
        prepare_weights(staging)
        os.replace(staging, target)
    finally:
        if staging.exists():
            _remove_tree(staging)
    return target


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def ensure_tls_cert(paths: StatePaths) -> Path:
    """The proxy's self-signed certificate (SAN 127.0.0.1 and localhost), made once, key 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    if paths.cert.exists() and paths.tls_key.exists():
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        if cert.not_valid_after_utc > now + datetime.timedelta(days=1):
            return paths.cert
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nitro-llm local proxy")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(paths.tls_key, key_pem.decode("ascii"), mode=0o600)
    _write_file(paths.cert, cert.public_bytes(serialization.Encoding.PEM).decode(), mode=0o644)
    return paths.cert


# ---- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """A component started in its own session (its process group id is its pid)."""

    name: str
    pid: int
    log: Path


def _command(script: str, module: str) -> list[str]:
    # The console script beside this interpreter (an installed venv), else the module itself.
    candidate = Path(sys.executable).parent / script
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return [str(candidate)]
    return [sys.executable, "-m", module]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they happen
    # Everything local is on loopback; a configured HTTP proxy must not capture it.
    for var in ("NO_PROXY", "no_proxy"):
        env[var] = ",".join(filter(None, [env.get(var, ""), "127.0.0.1", "localhost"]))
    return env


def spawn(
    paths: StatePaths,
    name: str,
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start `argv` as component `name`: new session, output to its log, pid to its pid file.

    It runs in DIR unless `cwd` says otherwise, with `_child_env()` unless `env` is given.
    """
    log = paths.log(name)
    with open(log, "ab") as out:
        os.fchmod(out.fileno(), 0o600)
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        out.write(f"{_START_MARK} {name} at {stamp}\n".encode())
        out.flush()
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            env=env if env is not None else _child_env(),
            cwd=cwd if cwd is not None else paths.root,
        )
    _write_file(paths.pid_file(name), f"{child.pid}\n", mode=0o600)
    return Proc(name, child.pid, log)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read(_MAX_SMALL_FILE)
        return [os.fsdecode(part) for part in raw.split(b"\0") if part]
    except FileNotFoundError:
        return []
    except OSError:
        pass
    if Path("/proc/self").exists():
        return []
    try:  # no procfs (macOS): ps, bounded; arguments split on spaces is enough to match DIR
        out = subprocess.run(
            ["ps", "-ww", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return os.fsdecode(out.stdout).split()


def _reap(pid: int) -> None:
    # Our own children (tests start components in-process) must not linger as zombies.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _is_ours(paths: StatePaths, pid: int) -> bool:
    """The process is alive and was started for this DIR (its arguments name a path under it)."""
    _reap(pid)
    args = _cmdline(pid)
    # A process in the middle of exec (just spawned) shows no arguments for an instant.
    for _ in range(10):
        if args or not _alive_not_zombie(pid):
            break
        time.sleep(0.02)
        args = _cmdline(pid)
    root = str(paths.root)
    return any(arg == root or arg.startswith(root + os.sep) for arg in args)


def _alive_not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read(4096).rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def component_pid(paths: StatePaths, name: str) -> int | None:
    """The pid of component `name` if its pid file names a live process of this DIR."""
    try:
        text = paths.pid_file(name).read_text()[:32].strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    if not text.isdigit() or int(text) <= 1:
        return None
    pid = int(text)
    return pid if _is_ours(paths, pid) else None


def status(paths: StatePaths) -> dict[str, int | None]:
    """Each component's pid, or None when it is not running."""
    return {name: component_pid(paths, name) for name in COMPONENTS}


def stop_all(paths: StatePaths, timeout: float = STOP_TIMEOUT_S) -> list[Proc]:
    """Stop this DIR's components, last started first; remove pid files and sockets.

    SIGTERM to each process group, up to `timeout` seconds to exit, then SIGKILL. Returns what
    was running. A pid file naming a dead or foreign process is only removed.
    """
    stopped = []
    for name in reversed(ALL_COMPONENTS):
        pid = component_pid(paths, name)
        if pid is not None:
            _stop_group(paths, pid, timeout)
            stopped.append(Proc(name, pid, paths.log(name)))
        with contextlib.suppress(FileNotFoundError):
            paths.pid_file(name).unlink()
    for leftover in (
        paths.nsm_socket,
        paths.enclave_socket,
        feed_socket(paths),
        paths.kms_port_file,
    ):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    if paths.socket_dir != paths.run:
        with contextlib.suppress(OSError):  # only if empty: never remove what we did not make
            paths.socket_dir.rmdir()
    return stopped


def _stop_group(paths: StatePaths, pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_ours(paths, pid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    # Whatever is left of the group (a stuck leader, or workers it left behind).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while _is_ours(paths, pid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _wait_for(
    what: str, done: Callable[[], bool], proc: Proc, paths: StatePaths, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if not _is_ours(paths, proc.pid):
            raise StackError(f"{proc.name} exited before {what}", proc.name)
        if time.monotonic() > deadline:
            raise StackError(f"{proc.name}: no {what} after {timeout:.0f} s", proc.name)
        time.sleep(_POLL_S)


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it can be bound on 127.0.0.1 now, else a port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise StackError("no free port on 127.0.0.1")


# ---- the components ----------------------------------------------------------------------------


def start_kms(
    paths: StatePaths, *, port: int = 0, timeout: float = START_TIMEOUT_S
) -> tuple[Proc, str]:
    """Start the KMS emulator and wait for its port file; returns it and its endpoint URL."""
    with contextlib.suppress(FileNotFoundError):
        paths.kms_port_file.unlink()
    argv = _command("nitro-kms-emulator", "emulator.kms_server") + [
        "--state-dir",
        str(paths.root),
        "--port-file",
        str(paths.kms_port_file),
        "--attestation-root",
        str(paths.ca_dir / "root.pem"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--region",
        REGION,
        "--account-id",
        ACCOUNT_ID,
    ]
    proc = spawn(paths, "kms", argv)
    _wait_for(
        "port file", lambda: _read_port(paths.kms_port_file) is not None, proc, paths, timeout
    )
    return proc, f"http://127.0.0.1:{_read_port(paths.kms_port_file)}"


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text()[:16].strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 65536 else None


def kms_client(endpoint: str, key: AccessKey, region: str = REGION) -> Any:
    """A boto3 KMS client for one of the emulator's principals, with bounded waits."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "kms",
        region_name=region,
        endpoint_url=endpoint,
        aws_access_key_id=key.access_key_id,
        aws_secret_access_key=key.secret_access_key,
        config=Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2}),
    )


def create_or_load_key(
    paths: StatePaths,
    admin_client: Any,
    *,
    alias: str = KEY_ALIAS,
    record: Path | None = None,
    description: str = "nitro-llm local key (nitro-local)",
) -> str:
    """The key's ARN: the one recorded in `record` (default DIR/key.json) if KMS still has it,
    else `alias`'s, else a new key with that alias. Recorded in `record`."""
    from botocore.exceptions import ClientError

    record = record or paths.key_file
    candidates = []
    if record.exists():
        recorded = _read_json(record)
        if isinstance(recorded, dict) and isinstance(recorded.get("key_arn"), str):
            candidates.append(recorded["key_arn"])
    candidates.append(alias)
    arn = None
    for ref in candidates:
        try:
            arn = admin_client.describe_key(KeyId=ref)["KeyMetadata"]["Arn"]
            break
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NotFoundException":
                raise
    if arn is None:
        metadata = admin_client.create_key(
            Description=description,
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
        )["KeyMetadata"]
        arn = metadata["Arn"]
        admin_client.create_alias(AliasName=alias, TargetKeyId=metadata["KeyId"])
    _write_file(record, json.dumps({"key_arn": arn}, indent=2) + "\n", mode=0o600)
    return arn


def write_enclave_config(
    paths: StatePaths,
    *,
    key_arn: str,
    model_dir: Path,
    kms_endpoint: str,
    compat_key_arn: str | None = None,
    sealed: SealedModel | None = None,
) -> Path:
    """DIR/enclave.json, the enclave's measured configuration (PCR2 covers it)."""
    config = {
        "region": REGION,
        "key_ids": [key_arn],
        "model_dir": str(model_dir),
        "kms_endpoint": kms_endpoint,
    }
    if sealed is not None:  # the digest is pinned instead of a directory
        del config["model_dir"]
        config["model_manifest_sha256"] = sealed.manifest_sha256
        config["model_key_id"] = sealed.key_arn
        config["model_feed"] = f"unix://{feed_socket(paths)}"
    if compat_key_arn is not None:
        config["compat_key_id"] = compat_key_arn
    _write_file(paths.enclave_config, json.dumps(config, indent=2) + "\n", mode=0o644)
    return paths.enclave_config


def checkout_root() -> Path:
    """The checkout this package lives in."""
    import emulator

    return Path(emulator.__file__).resolve().parents[1]


def app_root(paths: StatePaths | None = None) -> Path:
    """The app root whose enclave/ and protocol/ the NSM emulator measures and the enclave server
    runs: the one recorded in DIR/app.json by `up`, else this checkout."""
    if paths is None or not paths.app_file.exists():
        return checkout_root()
    recorded = _read_json(paths.app_file)
    root = recorded.get("app_root") if isinstance(recorded, dict) else None
    if not isinstance(root, str) or not os.path.isabs(root):
        raise StackError(f"{paths.app_file} names no absolute app_root; remove it")
    return Path(root)


def check_app_root(root: Path) -> Path:
    """`root` made absolute, if it holds an enclave application (enclave/ and protocol/)."""
    root = Path(os.path.abspath(root))
    for needed in ("enclave/main.py", "protocol/__init__.py"):
        if not (root / needed).is_file():
            raise StackError(
                f"{root} is not an enclave app root (no {needed}): it must hold a copy of the "
                "checkout's enclave/ and protocol/"
            )
    return root


def record_app_root(paths: StatePaths, root: Path | None) -> Path:
    """Write DIR/app.json naming `root` (checked), or this checkout when `root` is None."""
    chosen = check_app_root(root) if root is not None else checkout_root()
    _write_file(paths.app_file, json.dumps({"app_root": str(chosen)}, indent=2) + "\n", mode=0o644)
    return chosen


def measure_pcrs(
    paths: StatePaths, model_dir: Path | None, app: Path | None = None
) -> dict[int, bytes]:
    """The PCRs the NSM emulator will report for the app root, DIR's config and the model."""
    from emulator.measure import measure

    return measure(app if app is not None else app_root(paths), paths.enclave_config, model_dir)


def apply_local_policy(
    admin_client: Any, key_arn: str, pcrs: dict[int, bytes], layout: str = "strict"
) -> dict[str, Any]:
    """PutKeyPolicy with the local policy pinned to `pcrs`; returns the policy document."""
    policy = render_local_policy(
        pcrs, admin_arn=ADMIN_ARN, user_arn=USER_ARN, parent_arn=PARENT_ARN, layout=layout
    )
    admin_client.put_key_policy(KeyId=key_arn, PolicyName="default", Policy=json.dumps(policy))
    return policy


def start_nsm(
    paths: StatePaths,
    model_dir: Path | None,
    *,
    app: Path | None = None,
    timeout: float = START_TIMEOUT_S,
) -> Proc:
    """Start the NSM emulator, measuring `app` (by default DIR's app root); wait for its socket."""
    with contextlib.suppress(FileNotFoundError):
        paths.nsm_socket.unlink()
    argv = (
        _command("nitro-nsm-emulator", "emulator.nsm_server")
        + [
            "--socket",
            str(paths.nsm_socket),
            "--state-dir",
            str(paths.root),
            "--app-root",
            str(app if app is not None else app_root(paths)),
            "--enclave-config",
            str(paths.enclave_config),
        ]
        + (["--model-dir", str(model_dir)] if model_dir is not None else [])
    )
    proc = spawn(paths, "nsm", argv)
    _wait_for("socket", paths.nsm_socket.exists, proc, paths, timeout)
    return proc


def start_enclave(paths: StatePaths, app: Path | None = None) -> Proc:
    """Start the enclave server on its unix socket, talking to the NSM emulator.

    It runs from `app` (by default DIR's app root): `python -m enclave.main` in that directory,
    which is also first on PYTHONPATH, so that the files the NSM emulator measures are the files
    that run, even when the app root is a copy of the checkout.
    Not waited for here: it loads the model before it answers, which `wait_ready` follows.
    """
    root = app if app is not None else app_root(paths)
    argv = [sys.executable, "-m", "enclave.main"] + [
        "--config",
        str(paths.enclave_config),
        "--listen",
        f"unix://{paths.enclave_socket}",
        "--nsm",
        f"unix://{paths.nsm_socket}",
    ]
    env = _child_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return spawn(paths, "enclave", argv, cwd=root, env=env)


def write_parent_credentials(paths: StatePaths, parent: AccessKey) -> Path:
    """DIR/parent.json (0600): the parent role's keys, which only the proxy reads."""
    creds = {
        "credentials": {
            "access_key_id": parent.access_key_id,
            "secret_access_key": parent.secret_access_key,
            "session_token": None,
        }
    }
    _write_file(paths.parent_credentials, json.dumps(creds, indent=2) + "\n", mode=0o600)
    return paths.parent_credentials


def start_proxy(paths: StatePaths, port: int, *, compat: bool = False) -> Proc:
    """Start the parent proxy (HTTPS on 127.0.0.1:`port`) relaying to the enclave's socket."""
    argv = (
        _command("parent-proxy", "parent_proxy.main")
        + [
            "--bind",
            f"127.0.0.1:{port}",
            "--enclave",
            f"unix://{paths.enclave_socket}",
            "--certfile",
            str(paths.cert),
            "--keyfile",
            str(paths.tls_key),
            "--credentials-file",
            str(paths.parent_credentials),
        ]
        + (["--compat-v1"] if compat else [])
    )
    return spawn(paths, "proxy", argv)


def _tls_context(cafile: Path) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise StackError(f"cannot use the proxy's certificate {cafile}: {exc}", "proxy") from exc


def _https_status(url: str, context: ssl.SSLContext, timeout: float = 5.0) -> int | None:
    """The HTTP status of GET `url` (TLS verified with `context`), or None if unreachable."""
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=timeout) as answer:
            answer.read(4096)
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return None


def wait_ready(
    paths: StatePaths,
    proxy_url: str,
    procs: list[Proc],
    *,
    timeout: float = READY_TIMEOUT_S,
    tick: Callable[[], None] | None = None,
) -> None:
    """Poll `proxy_url`/readyz until it answers 200; `tick` is called about once a second.

    Fails early when one of `procs` exits or the enclave's model fails to load; on timeout,
    blames the proxy if it never answered /healthz, else the enclave.
    """
    context = _tls_context(paths.cert)
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + 1.0
    while True:
        for proc in procs:
            if not _is_ours(paths, proc.pid):
                raise StackError(f"{proc.name} exited while the stack was starting", proc.name)
        if _https_status(f"{proxy_url}/readyz", context) == 200:
            return
        # The enclave stays up, unready, when its model cannot load: no point waiting for it.
        load_error = _model_load_error(paths)
        if load_error is not None:
            raise StackError(f"the enclave could not load its model ({load_error})", "enclave")
        now = time.monotonic()
        if now > deadline:
            healthy = _https_status(f"{proxy_url}/healthz", context) == 200
            culprit = "enclave" if healthy else "proxy"
            raise StackError(f"not ready after {timeout:.0f} s", culprit)
        if tick is not None and now >= next_tick:
            tick()
            next_tick = now + 1.0
        time.sleep(0.5)


def write_profile(
    paths: StatePaths,
    *,
    proxy_url: str,
    kms_endpoint: str,
    key_arn: str,
    user: AccessKey,
    attestation_root: Path,
    compat_key_arn: str | None = None,
    model_key_arn: str | None = None,
) -> Path:
    """DIR/profile.json (0600, it holds the user's secret key): what `chatbot --local` reads."""
    profile = {
        "proxy_url": proxy_url,
        "ca_bundle": str(paths.cert),
        "attestation_root": str(attestation_root),
        "kms_endpoint": kms_endpoint,
        "region": REGION,
        "key_id": key_arn,
        "user": {
            "access_key_id": user.access_key_id,
            "secret_access_key": user.secret_access_key,
        },
    }
    if compat_key_arn is not None:
        profile["compat_key_id"] = compat_key_arn
    if model_key_arn is not None:
        profile["model_key_id"] = model_key_arn  # the model owner's key (up --sealed-model)
    _write_file(paths.profile, json.dumps(profile, indent=2) + "\n", mode=0o600)
    return paths.profile


def read_profile(paths: StatePaths) -> dict[str, Any]:
    """DIR/profile.json as written by the last successful `up` (it holds the user's secret)."""
    try:
        profile = _read_json(paths.profile)
    except FileNotFoundError as exc:
        raise StackError(f"{paths.profile} does not exist; run `nitro-local up`") from exc
    if not isinstance(profile, dict):
        raise StackError(f"{paths.profile} must hold an object")
    return profile


def previous_proxy_port(paths: StatePaths) -> int | None:
    """The port of the last run's proxy, to keep the URL stable across restarts."""
    try:
        url = read_profile(paths).get("proxy_url")
    except StackError:
        return None
    port = url.rpartition(":")[2] if isinstance(url, str) else ""
    return int(port) if port.isdigit() and 0 < int(port) < 65536 else None


def _current_run(path: Path) -> list[str]:
    """The lines of a log since its component last started (the log is appended across runs)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - _MAX_SMALL_FILE))
            data = handle.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(_START_MARK)]
    return lines[starts[-1] :] if starts else lines


def _log_event(line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a component's current run, only its warnings and errors if it has any.

    Logs carry ids, sizes and timings, never content, so they may be shown.
    """
    run = _current_run(path)
    # Readiness probes fill the log with info lines; what explains a failure is rarer.
    notable = [line for line in run if _log_event(line).get("level") not in ("info", "debug")]
    return (notable if len(notable) > 1 else run)[-lines:]


def log_events(path: Path, *names: str) -> list[dict[str, Any]]:
    """The JSON records of a component's current run, in order (only events `names`, if given).

    Logs carry ids, codes, sizes and timings, never content.
    """
    records = (_log_event(line) for line in _current_run(path))
    return [record for record in records if record and (not names or record.get("event") in names)]


def _model_load_error(paths: StatePaths) -> str | None:
    """The error type the enclave logged when its model failed to load in this run, if it did."""
    failures = log_events(paths.log("enclave"), "model_load_failed")
    return str(failures[0].get("error", "error")) if failures else None


# ---- the whole stack ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoints:
    proxy_url: str
    kms_endpoint: str
    profile: Path
    logs: Path
    key_arn: str


def bring_up(
    paths: StatePaths,
    *,
    model_dir: Path | None = None,
    app: Path | None = None,
    progress: Progress | None = None,
    tick: Callable[[], None] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
    compat: bool = False,
    sealed_model: bool = False,
) -> Endpoints:
    """Start every component for DIR (none may be running) and wait until the proxy is ready.

    `compat` adds protocol v1 (the original sample's clients): its own key with the compat
    policy, named in the enclave's measured config, and the proxy's `POST /`.

    `sealed_model` plays a model owner (DIR/owner: the tiny model, or `model_dir`'s, and a key
    of its own) who seals the model; the parent side gets only DIR/sealed-model, served by the
    model feed, and the enclave's measured config pins the manifest digest.

    The enclave runs from `app` (a copy of the checkout's enclave/ and protocol/), by default
    from this checkout; DIR/app.json records which, for `measure` and `restart enclave`.
    On failure, stops what it started and raises StackError naming the component to blame.
    """
    report = progress or (lambda _line: None)
    if app is not None:
        check_app_root(app)  # before anything is created
    paths.prepare()
    record_app_root(paths, app)
    attestation_root = ensure_ca(paths)
    principals = ensure_principals(paths)
    if sealed_model:
        owner = ensure_model_owner(paths)
        model = ensure_owner_model(paths, model_dir, report)
    else:
        model = ensure_model(paths, model_dir, report)
    ensure_tls_cert(paths)
    procs: list[Proc] = []
    try:
        report("starting the KMS emulator")
        kms, kms_endpoint = start_kms(paths)
        procs.append(kms)
        admin = kms_client(kms_endpoint, principals.admin)
        key_arn = _step("kms", "creating the key", lambda: create_or_load_key(paths, admin))
        compat_arn = None
        if compat:
            compat_arn = _step(
                "kms",
                "creating the compat key",
                lambda: create_or_load_key(
                    paths,
                    admin,
                    alias=COMPAT_KEY_ALIAS,
                    record=paths.root / "compat_key.json",
                    description="nitro-llm protocol v1 key (nitro-local up --compat)",
                ),
            )
        sealed = None
        if sealed_model:
            report("sealing the model as its owner, under a model key of the owner's")
            sealed = _step(
                "kms", "sealing the model", lambda: seal_owner_model(paths, model, admin, owner)
            )
        write_enclave_config(
            paths,
            key_arn=key_arn,
            model_dir=model,
            kms_endpoint=kms_endpoint,
            compat_key_arn=compat_arn,
            sealed=sealed,
        )
        report("measuring the enclave and pinning the key policy to its PCRs")
        measured_model = None if sealed is not None else model
        pcrs = measure_pcrs(paths, measured_model)
        if sealed is not None:
            _step(
                "kms",
                "setting the model key policy",
                lambda: apply_model_key_policy(admin, sealed.key_arn, pcrs),
            )
        _step("kms", "setting the key policy", lambda: apply_local_policy(admin, key_arn, pcrs))
        if compat_arn is not None:
            _step(
                "kms",
                "setting the compat key policy",
                lambda: apply_local_policy(admin, compat_arn, pcrs, layout="compat"),
            )
        report("starting the NSM emulator, the enclave server and the parent proxy")
        write_parent_credentials(paths, principals.parent)
        if sealed is not None:
            procs.append(start_feed(paths, sealed.sealed_dir))
        procs.append(start_nsm(paths, measured_model))
        procs.append(start_enclave(paths))
        port = free_port(previous_proxy_port(paths))
        proxy_url = f"https://127.0.0.1:{port}"
        procs.append(start_proxy(paths, port, compat=compat))
        report("waiting for the enclave to load its model")
        wait_ready(paths, proxy_url, procs, timeout=ready_timeout, tick=tick)
    except BaseException:
        stop_all(paths)
        raise
    profile = write_profile(
        paths,
        proxy_url=proxy_url,
        kms_endpoint=kms_endpoint,
        key_arn=key_arn,
        user=principals.user,
        attestation_root=attestation_root,
        compat_key_arn=compat_arn,
        model_key_arn=sealed.key_arn if sealed is not None else None,
    )
    return Endpoints(proxy_url, kms_endpoint, profile, paths.logs, key_arn)


def _step(component: str, what: str, action: Callable[[], Any]) -> Any:
    """Run a KMS call, turning botocore's errors into a StackError that blames `component`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return action()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise StackError(f"{what} failed: {code}", component) from exc
    except BotoCoreError as exc:
        raise StackError(f"{what} failed: {type(exc).__name__}", component) from exc


# ---- restart the enclave alone; measure the enclave as it stands ------------------------------


def restart_enclave(
    paths: StatePaths,
    *,
    timeout: float = READY_TIMEOUT_S,
    tick: Callable[[], None] | None = None,
) -> Proc:
    """Stop the enclave server alone, start it again with the same arguments, wait until the
    proxy's /readyz answers.

    The new process opens a new connection to the NSM emulator, which measures the app root
    again (a boot): an edited file gives new PCRs. KMS, the NSM emulator and the proxy keep
    running; the key policy is not touched.
    """
    pids = status(paths)
    stopped = [name for name in ("kms", "nsm", "proxy") if pids[name] is None]
    if stopped:
        raise StackError(
            f"the stack in {paths.root} is not running ({', '.join(stopped)} stopped); "
            "run `nitro-local up`"
        )
    proxy_url = read_profile(paths).get("proxy_url")
    if not isinstance(proxy_url, str):
        raise StackError(f"{paths.profile} names no proxy_url; run `nitro-local down` and `up`")
    old = pids["enclave"]
    if old is not None:
        _stop_group(paths, old, STOP_TIMEOUT_S)
        if _is_ours(paths, old):
            raise StackError(f"the enclave (pid {old}) did not stop", "enclave")
    with contextlib.suppress(FileNotFoundError):
        paths.enclave_socket.unlink()
    enclave = start_enclave(paths)
    others = [
        Proc(name, pid, paths.log(name))
        for name, pid in pids.items()
        if pid is not None and name != "enclave"
    ]
    wait_ready(paths, proxy_url, [enclave, *others], timeout=timeout, tick=tick)
    return enclave


@dataclass(frozen=True)
class Measurement:
    """The PCRs of the enclave as its files stand, and what was measured."""

    pcrs: dict[int, bytes]
    app_root: Path
    enclave_config: Path
    model_dir: Path | None  # None: a sealed model, pinned by digest in the configuration


def measure_enclave(
    paths: StatePaths, *, model_dir: Path | None = None, app: Path | None = None
) -> Measurement:
    """What the NSM emulator would report if the enclave booted now: the app root (DIR's unless
    `app`), DIR/enclave.json and the model (the one enclave.json names unless `model_dir`)."""
    from emulator.measure import MeasureError, measure

    if not paths.enclave_config.is_file():
        raise StackError(
            f"{paths.enclave_config} does not exist: run `nitro-local up` once, it writes the "
            "enclave's measured configuration"
        )
    if model_dir is None:
        config = _read_json(paths.enclave_config)
        named = config.get("model_dir") if isinstance(config, dict) else None
        if isinstance(config, dict) and config.get("model_manifest_sha256"):
            named = None  # a sealed model is pinned by its digest, not measured as files
        elif not isinstance(named, str):
            raise StackError(f"{paths.enclave_config} names no model_dir; pass --model-dir")
        model_dir = Path(named) if named is not None else None
    root = check_app_root(app) if app is not None else app_root(paths)
    model_dir = Path(os.path.abspath(model_dir)) if model_dir is not None else None
    try:
        pcrs = measure(root, paths.enclave_config, model_dir)
    except MeasureError as exc:
        raise StackError(f"cannot measure the enclave: {exc}") from exc
    return Measurement(pcrs, root, paths.enclave_config, model_dir)


# Attestation condition keys; ImageSha384 is PCR0 under another name (AWS KMS documentation).
_ATTESTATION_KEY = re.compile(r"kms:RecipientAttestation:(?:PCR(\d{1,2})|(ImageSha384))", re.I)


def policy_pins(policy: Any) -> dict[int, frozenset[str]]:
    """The values (lowercase hex) each PCR is compared with anywhere in the policy's conditions.

    A report, not an evaluation: values are taken as exact strings, whatever the operator.
    """
    statements = policy.get("Statement", []) if isinstance(policy, dict) else []
    if isinstance(statements, dict):
        statements = [statements]
    pins: dict[int, set[str]] = {}
    for statement in statements if isinstance(statements, list) else []:
        conditions = statement.get("Condition") if isinstance(statement, dict) else None
        for keys in (conditions or {}).values() if isinstance(conditions, dict) else []:
            for key, values in keys.items() if isinstance(keys, dict) else []:
                match = _ATTESTATION_KEY.fullmatch(key)
                if match is None:
                    continue
                index = int(match.group(1)) if match.group(1) is not None else 0
                listed = [values] if isinstance(values, str) else values
                if isinstance(listed, list):
                    pins.setdefault(index, set()).update(
                        value.lower() for value in listed if isinstance(value, str)
                    )
    return {index: frozenset(values) for index, values in sorted(pins.items())}


def _load_principal(paths: StatePaths, arn: str) -> AccessKey | None:
    """The access key DIR/principals.json holds for `arn`, without creating one."""
    try:
        raw = _read_json(paths.principals)
    except FileNotFoundError:
        return None
    for akid, entry in raw.items() if isinstance(raw, dict) else []:
        if isinstance(entry, dict) and entry.get("arn") == arn:
            return AccessKey(akid, str(entry.get("secret_access_key", "")), arn)
    return None


def read_key_policy(paths: StatePaths) -> tuple[str, dict[str, Any]] | None:
    """(key ARN, policy document) read from DIR's running KMS emulator as the key's admin, or
    None when that KMS is not running."""
    if component_pid(paths, "kms") is None:
        return None
    port = _read_port(paths.kms_port_file)
    admin = _load_principal(paths, ADMIN_ARN)
    recorded = _read_json(paths.key_file) if paths.key_file.exists() else None
    key_arn = recorded.get("key_arn") if isinstance(recorded, dict) else None
    if port is None or admin is None or not isinstance(key_arn, str):
        return None
    client = kms_client(f"http://127.0.0.1:{port}", admin)
    text = _step(
        "kms",
        "reading the key policy",
        lambda: client.get_key_policy(KeyId=key_arn, PolicyName="default")["Policy"],
    )
    try:
        policy = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StackError("the key policy KMS returned is not JSON", "kms") from exc
    return key_arn, policy if isinstance(policy, dict) else {}


# ---- a sealed model (`up --sealed-model`) --------------------------------------------------------

MODEL_OWNER_ARN = f"arn:aws:iam::{ACCOUNT_ID}:user/nitro-llm-model-owner"
MODEL_KEY_ALIAS = "alias/nitro-llm-model"


@dataclass(frozen=True)
class SealedModel:
    key_arn: str  # the model owner's KMS key
    sealed_dir: Path  # the parent's copy: ciphertext, manifest and wrapped key only
    manifest_sha256: str  # what the enclave's measured configuration pins


def owner_dir(paths: StatePaths) -> Path:
    """DIR/owner stands for the model owner's machine: the parent side never reads it."""
    return paths.root / "owner"


def sealed_model_dir(paths: StatePaths) -> Path:
    return paths.root / "sealed-model"


def feed_socket(paths: StatePaths) -> Path:
    return paths.socket_dir / "feed.sock"


def ensure_model_owner(paths: StatePaths) -> AccessKey:
    """The model owner's access key, added to DIR/principals.json once (the KMS emulator re-reads
    the file when it changes)."""
    found = _load_principal(paths, MODEL_OWNER_ARN)
    if found is not None:
        return found
    table = _read_json(paths.principals)
    owner = _new_access_key(MODEL_OWNER_ARN)
    table[owner.access_key_id] = {"secret_access_key": owner.secret_access_key, "arn": owner.arn}
    _write_file(paths.principals, json.dumps(table, indent=2) + "\n", mode=0o600)
    return owner


def ensure_owner_model(
    paths: StatePaths, model_dir: Path | None = None, progress: Progress | None = None
) -> Path:
    """DIR/owner/model: a copy of `model_dir` (or of the tiny model, built once) with the fast
    engine's prepared weights, on the owner's side.

    Without `model_dir`, the tiny model DIR/model that an earlier plain `up` built is moved to
    the owner's side (or, if the owner has one already, removed): the parent side keeps only
    the sealed copy. Either is said through `progress`.
    """
    import shutil

    report = progress or (lambda _line: None)
    target = owner_dir(paths) / "model"
    parent_copy = paths.default_model_dir
    if (target / PREPARED_WEIGHTS).is_file():
        if model_dir is None and parent_copy.exists():
            _remove_tree(parent_copy)
            report(f"removed {parent_copy} (plaintext): the parent side keeps only the sealed copy")
        return target
    owner_dir(paths).mkdir(mode=0o700, exist_ok=True)
    if model_dir is None and (parent_copy / "config.json").is_file():
        ensure_model(paths, None, progress)  # prepared in place if an older build lacks it
        if target.exists():  # an interrupted copy
            _remove_tree(target)
        os.replace(parent_copy, target)
        report(
            f"moved {parent_copy} (plaintext) to {target}, the owner's side: the parent side "
            "keeps only the sealed copy"
        )
        return target
    if model_dir is None:
        # Built on the owner's side: the parent's side never holds the plaintext model.
        return ensure_model(StatePaths(owner_dir(paths)), None, progress)
    source = ensure_model(paths, model_dir, progress)
    staging = Path(tempfile.mkdtemp(dir=owner_dir(paths), prefix=".model-"))
    try:
        for item in source.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copyfile(item, staging / item.name)
        os.replace(staging, target)
    finally:
        if staging.exists():
            _remove_tree(staging)
    return target


def seal_owner_model(
    paths: StatePaths, model: Path, admin_client: Any, owner: AccessKey
) -> SealedModel:
    """The model owner's key (created once by the admin) and DIR/sealed-model, sealed by the owner
    with its own credentials; an existing sealing is kept while the model's files are unchanged."""
    from protocol.errors import NitroError
    from protocol.sealed_model import (
        Manifest,
        build_manifest,
        read_key_file,
        read_manifest,
        seal_directory,
    )

    key_arn = create_or_load_key(
        paths,
        admin_client,
        alias=MODEL_KEY_ALIAS,
        record=owner_dir(paths) / "model_key.json",
        description="nitro-llm model owner's key (nitro-local up --sealed-model)",
    )
    target = sealed_model_dir(paths)
    try:
        manifest = Manifest.parse(read_manifest(target))
        kept = read_key_file(target).key_id == key_arn and manifest.files == (
            build_manifest(model, manifest.chunk_size).files
        )
    except (OSError, ValueError, NitroError):  # absent or unreadable: sealed again
        kept = False
    if kept:
        return SealedModel(key_arn, target, manifest.digest.hex())
    client = kms_client(_kms_endpoint_of(admin_client), owner)

    def wrap(context: Any) -> tuple[bytes, bytes, str]:
        answer = client.generate_data_key(
            KeyId=key_arn, KeySpec="AES_256", EncryptionContext=dict(context)
        )
        return answer["Plaintext"], answer["CiphertextBlob"], answer["KeyId"]

    staging = Path(tempfile.mkdtemp(dir=paths.root, prefix=".sealed-model-"))
    try:
        manifest = seal_directory(model, staging / "out", wrap)
        if target.exists():
            _remove_tree(target)
        os.replace(staging / "out", target)
    finally:
        _remove_tree(staging)
    return SealedModel(key_arn, target, manifest.digest.hex())


def _kms_endpoint_of(client: Any) -> str:
    return str(client.meta.endpoint_url)


def apply_model_key_policy(
    admin_client: Any, key_arn: str, pcrs: dict[int, bytes]
) -> dict[str, Any]:
    """The model key's policy: the owner seals (purpose "model"), only the enclave of `pcrs`
    decrypts (scripts/render_key_policy.py --purpose model)."""
    from emulator.local_policy import PINNED_PCRS, renderer

    render = renderer()
    principals = render.Principals(
        account_id=ACCOUNT_ID,
        user_arns=(MODEL_OWNER_ARN,),
        parent_role_arn=PARENT_ARN,
        admin_arns=(ADMIN_ARN,),
    )
    policy = render.render(
        {n: pcrs[n].hex() for n in PINNED_PCRS}, principals, layout="strict", purpose="model"
    )
    admin_client.put_key_policy(KeyId=key_arn, PolicyName="default", Policy=json.dumps(policy))
    return policy


def start_feed(paths: StatePaths, sealed_dir: Path, timeout: float = START_TIMEOUT_S) -> Proc:
    """Start the model feed serving `sealed_dir` on its unix socket; wait for the socket."""
    with contextlib.suppress(FileNotFoundError):
        feed_socket(paths).unlink()
    argv = _command("nitro-model-feed", "parent_proxy.model_feed") + [
        "--sealed-dir",
        str(sealed_dir),
        "--listen",
        f"unix://{feed_socket(paths)}",
        "--credentials-file",
        str(paths.parent_credentials),
    ]
    proc = spawn(paths, "feed", argv)
    _wait_for("socket", feed_socket(paths).exists, proc, paths, timeout)
    return proc
