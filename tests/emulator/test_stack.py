"""Tests of the local stack's building blocks and `nitro-local`: policy, paths, processes, CLI.

They start only stand-in processes (sleepers whose arguments name the state directory); the
whole stack with real components is tests/e2e's.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from emulator import kms_policy, local, stack
from emulator.local_policy import render_local_policy

pytestmark = pytest.mark.integration

PCRS = {0: bytes([0xAB]) * 48, 1: bytes([0xCD]) * 48, 2: bytes([0xEF]) * 48}


# ---- the key policy ----------------------------------------------------------------------------


def _policy() -> dict:
    return render_local_policy(
        PCRS, admin_arn=stack.ADMIN_ARN, user_arn=stack.USER_ARN, parent_arn=stack.PARENT_ARN
    )


def _allowed(principal: str, action: str, **context: object) -> bool:
    # The KMS emulator's own evaluator, with the base context its server adds to every call.
    ctx = {"aws:PrincipalArn": principal, "aws:PrincipalAccount": stack.ACCOUNT_ID, **context}
    return kms_policy.evaluate(
        _policy(), principal_arn=principal, action=action, context=ctx
    ).allowed


def _attested(pcrs: dict[int, bytes]) -> dict[str, str]:
    return {f"kms:RecipientAttestation:PCR{n}": value.hex() for n, value in pcrs.items()}


def test_policy_pins_the_parents_decrypt_to_pcr0_to_2_in_lowercase_hex() -> None:
    (parent,) = [s for s in _policy()["Statement"] if s["Principal"] == {"AWS": stack.PARENT_ARN}]
    assert parent["Action"] == "kms:Decrypt"
    assert parent["Condition"] == {
        "StringEqualsIgnoreCase": {
            "kms:RecipientAttestation:PCR0": "ab" * 48,
            "kms:RecipientAttestation:PCR1": "cd" * 48,
            "kms:RecipientAttestation:PCR2": "ef" * 48,
        }
    }
    assert _allowed(stack.PARENT_ARN, "kms:Decrypt", **_attested(PCRS))
    upper = {key: value.upper() for key, value in _attested(PCRS).items()}
    assert _allowed(stack.PARENT_ARN, "kms:Decrypt", **upper)


def test_policy_refuses_decrypt_without_attestation_or_with_another_image() -> None:
    assert not _allowed(stack.PARENT_ARN, "kms:Decrypt")
    for n in (0, 1, 2):
        tampered = {**PCRS, n: bytes(48)}
        assert not _allowed(stack.PARENT_ARN, "kms:Decrypt", **_attested(tampered)), n
    for action in ("kms:GenerateDataKey", "kms:PutKeyPolicy", "kms:Encrypt", "kms:CreateGrant"):
        assert not _allowed(stack.PARENT_ARN, action, **_attested(PCRS)), action


def test_policy_lets_the_user_only_wrap_keys_for_this_app() -> None:
    app = {"kms:EncryptionContext:app": "nitro-llm"}
    assert _allowed(stack.USER_ARN, "kms:GenerateDataKey", **app)
    assert _allowed(stack.USER_ARN, "kms:DescribeKey")
    assert not _allowed(stack.USER_ARN, "kms:GenerateDataKey", **{"kms:EncryptionContext:app": "x"})
    assert not _allowed(stack.USER_ARN, "kms:GenerateDataKey")
    for action in ("kms:Decrypt", "kms:PutKeyPolicy", "kms:Encrypt", "kms:ReEncryptFrom"):
        assert not _allowed(stack.USER_ARN, action, **app, **_attested(PCRS)), action


def test_policy_lets_the_admin_manage_but_never_use_the_key() -> None:
    for action in ("kms:PutKeyPolicy", "kms:GetKeyPolicy", "kms:DescribeKey", "kms:CreateAlias"):
        assert _allowed(stack.ADMIN_ARN, action), action
    for action in ("kms:Decrypt", "kms:GenerateDataKey", "kms:CreateGrant", "kms:ReEncryptTo"):
        assert not _allowed(stack.ADMIN_ARN, action, **_attested(PCRS)), action
    actions = [s["Action"] for s in _policy()["Statement"]]
    flat = [a for group in actions for a in ([group] if isinstance(group, str) else group)]
    assert not {"*", "kms:*"} & set(flat)


def test_policy_needs_all_three_pcrs() -> None:
    with pytest.raises(ValueError, match="PCR2"):
        render_local_policy({0: PCRS[0], 1: PCRS[1]}, admin_arn="a", user_arn="u", parent_arn="p")
    with pytest.raises(ValueError, match="48 bytes"):
        render_local_policy({**PCRS, 1: b"short"}, admin_arn="a", user_arn="u", parent_arn="p")


# ---- state paths and files ---------------------------------------------------------------------


def test_short_state_dir_keeps_sockets_under_run(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path / "state")
    paths.prepare()
    assert paths.enclave_socket == paths.root / "run" / "enclave.sock"
    recorded = json.loads(paths.sockets_file.read_text())
    assert recorded == {"nsm": str(paths.nsm_socket), "enclave": str(paths.enclave_socket)}
    assert stat.S_IMODE(paths.root.stat().st_mode) == 0o700


def test_long_state_dir_moves_sockets_to_a_short_private_dir_under_tmp(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path / ("d" * 120))
    try:
        paths.prepare()
        for sock in (paths.nsm_socket, paths.enclave_socket):
            assert len(os.fsencode(sock)) < stack.MAX_SOCKET_PATH
            assert sock.parent.parent == Path("/tmp") and sock.parent.name.startswith("nitro-")
        assert stat.S_IMODE(paths.socket_dir.stat().st_mode) == 0o700
        recorded = json.loads(paths.sockets_file.read_text())
        assert recorded["enclave"] == str(paths.enclave_socket)
        # Derived from DIR: the same DIR always finds the same sockets, another DIR others.
        assert stack.StatePaths(paths.root).socket_dir == paths.socket_dir
        assert stack.StatePaths(tmp_path / ("e" * 120)).socket_dir != paths.socket_dir
        stack.stop_all(paths)
        assert not paths.socket_dir.exists()
    finally:
        shutil.rmtree(paths.socket_dir, ignore_errors=True)


def test_principals_are_created_once_with_aws_shaped_keys(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    first = stack.ensure_principals(paths)
    again = stack.ensure_principals(paths)
    assert first == again
    keys = [first.admin, first.user, first.parent]
    assert [k.arn for k in keys] == [stack.ADMIN_ARN, stack.USER_ARN, stack.PARENT_ARN]
    for key in keys:
        assert key.access_key_id.startswith("AKIA") and len(key.access_key_id) == 20
        assert len(key.secret_access_key) == 40
        assert key.secret_access_key not in repr(key)
    assert len({k.access_key_id for k in keys}) == 3
    assert stat.S_IMODE(paths.principals.stat().st_mode) == 0o600
    table = json.loads(paths.principals.read_text())
    assert table[first.parent.access_key_id] == {
        "secret_access_key": first.parent.secret_access_key,
        "arn": stack.PARENT_ARN,
    }


def test_tls_certificate_names_loopback_and_is_made_once(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    stack.ensure_tls_cert(paths)
    pem = paths.cert.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE(paths.tls_key.stat().st_mode) == 0o600
    stack.ensure_tls_cert(paths)
    assert paths.cert.read_bytes() == pem


def test_profile_has_exactly_the_documented_fields_and_mode_0600(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    user = stack.ensure_principals(paths).user
    stack.write_profile(
        paths,
        proxy_url="https://127.0.0.1:5001",
        kms_endpoint="http://127.0.0.1:4000",
        key_arn="arn:aws:kms:us-east-1:111122223333:key/k",
        user=user,
        attestation_root=paths.ca_dir / "root.pem",
    )
    profile = json.loads(paths.profile.read_text())
    assert set(profile) == {
        "proxy_url",
        "ca_bundle",
        "attestation_root",
        "kms_endpoint",
        "region",
        "key_id",
        "user",
    }
    assert profile["user"] == {
        "access_key_id": user.access_key_id,
        "secret_access_key": user.secret_access_key,
    }
    assert profile["ca_bundle"] == str(paths.cert) and profile["region"] == "us-east-1"
    assert stat.S_IMODE(paths.profile.stat().st_mode) == 0o600
    assert stack.previous_proxy_port(paths) == 5001


# ---- processes and the CLI ---------------------------------------------------------------------


def _sleeper(paths: stack.StatePaths, name: str, code: str = "") -> stack.Proc:
    # Its last argument names DIR, as every real component's arguments do.
    script = f"import time\n{code}\ntime.sleep(60)"
    return stack.spawn(paths, name, [sys.executable, "-c", script, str(paths.root)])


def _gone(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_status_on_an_empty_dir_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert local.main(["status", "--state-dir", str(tmp_path / "never-used")]) == 3
    out = capsys.readouterr().out
    for name in stack.COMPONENTS:
        assert f"{name:<8}  stopped" in out
    assert not (tmp_path / "never-used").exists()


def test_down_on_an_empty_dir_is_a_clean_no_op(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emulator.local", "down", "--state-dir", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0
    assert "nothing running" in result.stderr
    assert not (tmp_path / "x").exists()


def test_down_never_touches_a_pid_that_is_not_this_dirs(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    # A stale pid file naming a live process that is not ours (this very test).
    paths.pid_file("enclave").write_text(f"{os.getpid()}\n")
    assert stack.status(paths)["enclave"] is None
    assert stack.stop_all(paths) == []
    assert not paths.pid_file("enclave").exists()


def test_status_and_down_follow_running_components(tmp_path: Path, capsys) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    procs = [_sleeper(paths, name) for name in stack.COMPONENTS]
    paths.enclave_socket.write_text("")  # stands for a socket the enclave left
    assert local.main(["status", "--state-dir", str(tmp_path)]) == 0
    assert f"running (pid {procs[0].pid})" in capsys.readouterr().out
    assert local.main(["down", "--state-dir", str(tmp_path)]) == 0
    said = capsys.readouterr().err
    assert said.index("proxy") < said.index("enclave") < said.index("nsm") < said.index("kms")
    assert all(_gone(proc.pid) for proc in procs)
    assert not any(paths.pid_file(name).exists() for name in stack.COMPONENTS)
    assert not paths.enclave_socket.exists()
    assert local.main(["status", "--state-dir", str(tmp_path)]) == 3


def test_stop_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    child_pid_file = tmp_path / "child.pid"
    stubborn = (
        "import signal, subprocess, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(child_pid_file)!r}, 'w').write(str(child.pid))\n"
    )
    proc = _sleeper(paths, "proxy", stubborn)
    deadline = time.monotonic() + 20
    while not child_pid_file.exists() or not child_pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(child_pid_file.read_text())
    started = time.monotonic()
    assert [p.pid for p in stack.stop_all(paths, timeout=1.0)] == [proc.pid]
    assert time.monotonic() - started < 5
    assert _gone(proc.pid)
    assert _wait_gone(child)  # reparented to init, which reaps it


def test_up_when_everything_runs_changes_nothing(tmp_path: Path, capsys) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    procs = [_sleeper(paths, name) for name in stack.COMPONENTS]
    try:
        before = {name: paths.pid_file(name).read_text() for name in stack.COMPONENTS}
        assert local.main(["up", "--state-dir", str(tmp_path)]) == 0
        assert "already running" in capsys.readouterr().err
        assert {name: paths.pid_file(name).read_text() for name in stack.COMPONENTS} == before
        assert not paths.principals.exists()  # nothing was set up
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _wait_gone(proc.pid)


def test_up_refuses_a_model_dir_without_a_model_and_starts_nothing(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    state = tmp_path / "state"
    assert local.main(["up", "--state-dir", str(state), "--model-dir", str(empty)]) == 1
    assert "holds no model" in capsys.readouterr().err
    assert stack.status(stack.StatePaths(state)) == dict.fromkeys(stack.COMPONENTS)
    assert not list((state / "run").glob("*.pid"))


# ---- logs on failure -----------------------------------------------------------------------------


def _log_line(level: str, event: str, **fields: object) -> str:
    return json.dumps({"level": level, "component": "enclave", "event": event, **fields})


def test_tail_shows_this_runs_warnings_and_errors_only(tmp_path: Path) -> None:
    log = tmp_path / "enclave.log"
    lines = [
        "--- nitro-local: starting enclave at earlier",
        _log_line("error", "old_failure"),
        "--- nitro-local: starting enclave at now",
        *[_log_line("info", "request", kind="ready") for _ in range(50)],
        _log_line("error", "model_load_failed", error="OSError"),
        _log_line("info", "request", kind="ready"),
    ]
    log.write_text("\n".join(lines) + "\n")
    shown = stack.tail(log)
    assert shown == [lines[2], lines[-2]]
    log.write_text("\n".join(lines[2:5]) + "\n")  # nothing notable: the plain last lines
    assert stack.tail(log, lines=2) == lines[3:5]
    assert stack.tail(tmp_path / "missing.log") == []


def test_log_events_are_this_runs_json_records_by_name(tmp_path: Path) -> None:
    log = tmp_path / "enclave.log"
    lines = [
        "--- nitro-local: starting enclave at earlier",
        _log_line("info", "model_loaded", model="reference"),
        "--- nitro-local: starting enclave at now",
        "a line that is not JSON",
        "[1, 2]",
        _log_line("info", "request", kind="ready"),
        _log_line("info", "model_loaded", model="fast", int8_kernel="avx2"),
    ]
    log.write_text("\n".join(lines) + "\n")
    loaded = stack.log_events(log, "model_loaded")
    assert [record["model"] for record in loaded] == ["fast"]  # this run's only
    assert [record["event"] for record in stack.log_events(log)] == ["request", "model_loaded"]
    assert stack.log_events(tmp_path / "missing.log") == []


def test_wait_ready_stops_waiting_when_the_model_cannot_load(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    stack.ensure_tls_cert(paths)
    paths.log("enclave").write_text(
        "--- nitro-local: starting enclave at now\n"
        + _log_line("error", "model_load_failed", error="FileNotFoundError")
        + "\n"
    )
    started = time.monotonic()
    with pytest.raises(stack.StackError, match="FileNotFoundError") as caught:
        stack.wait_ready(paths, f"https://127.0.0.1:{stack.free_port()}", [], timeout=30)
    assert caught.value.component == "enclave"
    assert time.monotonic() - started < 10


def test_model_is_built_once_and_never_half(tmp_path: Path, monkeypatch) -> None:
    from emulator import tiny_model

    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    builds = []

    def failing_build(out_dir: Path, progress=None) -> Path:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tiny_model, "build_tiny_model", failing_build)
    with pytest.raises(RuntimeError):
        stack.ensure_model(paths)
    assert not paths.default_model_dir.exists()
    assert not list(tmp_path.glob(".model-*"))

    def build(out_dir: Path, progress=None) -> Path:
        builds.append(out_dir)
        progress("step 1/1")
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(tiny_model, "build_tiny_model", build)
    prepared: list[Path] = []

    def prepare(model_dir: Path) -> None:  # the image build's int8 step, recorded
        prepared.append(model_dir)
        (model_dir / stack.PREPARED_WEIGHTS).write_bytes(b"")

    monkeypatch.setattr(stack, "prepare_weights", prepare)
    said: list[str] = []
    assert stack.ensure_model(paths, progress=said.append) == paths.default_model_dir
    assert stack.ensure_model(paths) == paths.default_model_dir
    assert len(builds) == 1 and "step 1/1" in said
    assert (paths.default_model_dir / "config.json").is_file()
    assert len(prepared) == 1 and prepared[0] == builds[0]  # prepared before the rename
    # A model built before the fast engine existed is prepared in place, once.
    (paths.default_model_dir / stack.PREPARED_WEIGHTS).unlink()
    assert stack.ensure_model(paths) == paths.default_model_dir
    assert len(prepared) == 2 and len(builds) == 1


def test_a_sealed_up_leaves_no_plaintext_model_on_the_parent_side(
    tmp_path: Path, monkeypatch
) -> None:
    from emulator import tiny_model

    paths = stack.StatePaths(tmp_path)
    paths.prepare()
    weights = b"owner-weights-" + os.urandom(16)

    def plain_up_model() -> None:  # DIR/model, as a plain `up` leaves it
        paths.default_model_dir.mkdir()
        (paths.default_model_dir / "config.json").write_text("{}")
        (paths.default_model_dir / stack.PREPARED_WEIGHTS).write_bytes(weights)

    def no_build(*_args, **_kwargs):
        raise AssertionError("the model is built once, not again")

    monkeypatch.setattr(tiny_model, "build_tiny_model", no_build)
    plain_up_model()
    said: list[str] = []
    owner = stack.ensure_owner_model(paths, progress=said.append)
    assert owner == stack.owner_dir(paths) / "model"
    assert (owner / stack.PREPARED_WEIGHTS).read_bytes() == weights
    assert not paths.default_model_dir.exists()
    assert [line for line in said if line.startswith(f"moved {paths.default_model_dir}")]
    # A plain `up` built DIR/model again; the next sealed `up` removes it, and says so.
    plain_up_model()
    said.clear()
    assert stack.ensure_owner_model(paths, progress=said.append) == owner
    assert not paths.default_model_dir.exists()
    assert [line for line in said if line.startswith(f"removed {paths.default_model_dir}")]
    parent_side = [
        path
        for path in tmp_path.rglob("*")
        if path.is_file() and stack.owner_dir(paths) not in path.parents
    ]
    assert not [path for path in parent_side if weights in path.read_bytes()]


# ---- app root, measure, restart enclave ----------------------------------------------------------

# An enclave application that records where it runs from, then serves its socket after a pause
# (standing for the model load), as `python -m enclave.main` with the real flags.
FAKE_ENCLAVE_MAIN = """
import json, os, socket, sys, time
import enclave, protocol
args = sys.argv[1:]
record = {"enclave": enclave.__file__, "protocol": protocol.__file__, "cwd": os.getcwd(),
          "argv": args, "pythonpath": os.environ.get("PYTHONPATH", "")}
with open(os.path.join(os.getcwd(), "started.jsonl"), "a") as out:
    out.write(json.dumps(record) + "\\n")
time.sleep(0.5)
server = socket.socket(socket.AF_UNIX)
server.bind(args[args.index("--listen") + 1].removeprefix("unix://"))
server.listen()
while True:
    server.accept()[0].close()
"""

# The proxy's /readyz, reduced to its meaning: 200 once the enclave's socket accepts.
FAKE_PROXY = """
import http.server, socket, ssl, sys
port, cert, key, enclave = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(1)
                probe.connect(enclave)
            ready = self.path == "/readyz"
        except OSError:
            ready = False
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
httpd = http.server.HTTPServer(("127.0.0.1", port), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
httpd.serve_forever()
"""


def _fake_app(root: Path, main: str = FAKE_ENCLAVE_MAIN) -> Path:
    (root / "enclave").mkdir(parents=True)
    (root / "protocol").mkdir()
    (root / "enclave" / "__init__.py").write_text("")
    (root / "enclave" / "main.py").write_text(main)
    (root / "protocol" / "__init__.py").write_text("")
    return root


def _fake_model(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "bloom"}')
    return root


def _state_with_config(tmp_path: Path, model: Path) -> stack.StatePaths:
    paths = stack.StatePaths(tmp_path / "state")
    paths.prepare()
    stack.write_enclave_config(
        paths,
        key_arn="arn:aws:kms:us-east-1:111122223333:key/k",
        model_dir=model,
        kms_endpoint="http://127.0.0.1:4000",
    )
    return paths


def _started(app: Path) -> list[dict]:
    path = app / "started.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_app_root_is_recorded_checked_and_defaults_to_the_checkout(tmp_path: Path) -> None:
    paths = stack.StatePaths(tmp_path / "state")
    paths.prepare()
    checkout = stack.checkout_root()
    assert (checkout / "enclave" / "main.py").is_file()
    assert stack.app_root(paths) == checkout  # nothing recorded
    assert stack.record_app_root(paths, None) == checkout
    app = _fake_app(tmp_path / "app")
    assert stack.record_app_root(paths, app) == app
    assert stack.app_root(paths) == app
    assert json.loads(paths.app_file.read_text()) == {"app_root": str(app)}
    (app / "protocol" / "__init__.py").unlink()
    with pytest.raises(stack.StackError, match="no protocol/__init__.py"):
        stack.record_app_root(paths, app)


def test_up_refuses_an_app_root_without_the_enclave_and_starts_nothing(tmp_path, capsys) -> None:
    state, model = tmp_path / "state", _fake_model(tmp_path / "model")
    (tmp_path / "empty").mkdir()
    argv = ["up", "--state-dir", str(state), "--model-dir", str(model)]
    assert local.main([*argv, "--app-root", str(tmp_path / "empty")]) == 1
    assert "is not an enclave app root (no enclave/main.py)" in capsys.readouterr().err
    assert stack.status(stack.StatePaths(state)) == dict.fromkeys(stack.COMPONENTS)
    assert not (state / "app.json").exists() and not (state / "principals.json").exists()


def test_the_enclave_runs_from_the_app_root_not_the_installed_checkout(tmp_path: Path) -> None:
    # The venv maps `enclave` and `protocol` to the checkout (editable install): the copy must
    # still be what runs, or the measured files would not be the running ones.
    paths = _state_with_config(tmp_path, _fake_model(tmp_path / "model"))
    app = _fake_app(tmp_path / "app")
    stack.record_app_root(paths, app)
    proc = stack.start_enclave(paths)
    try:
        deadline = time.monotonic() + 20
        while not _started(app):
            assert time.monotonic() < deadline, paths.log("enclave").read_text()
            time.sleep(0.05)
        [record] = _started(app)
        assert record["enclave"] == str(app / "enclave" / "__init__.py")
        assert record["protocol"] == str(app / "protocol" / "__init__.py")
        assert record["cwd"] == str(app)
        assert record["pythonpath"].split(os.pathsep)[0] == str(app)
        assert record["argv"] == [
            "--config", str(paths.enclave_config),
            "--listen", f"unix://{paths.enclave_socket}",
            "--nsm", f"unix://{paths.nsm_socket}",
        ]  # fmt: skip
        assert stack.component_pid(paths, "enclave") == proc.pid
    finally:
        stack.stop_all(paths)


def test_restart_enclave_stops_it_starts_it_with_the_same_arguments_and_waits(tmp_path) -> None:
    paths = _state_with_config(tmp_path, _fake_model(tmp_path / "model"))
    app = _fake_app(tmp_path / "app")
    stack.record_app_root(paths, app)
    stack.ensure_tls_cert(paths)
    port = stack.free_port()
    stack.write_profile(
        paths,
        proxy_url=f"https://127.0.0.1:{port}",
        kms_endpoint="http://127.0.0.1:4000",
        key_arn="arn:aws:kms:us-east-1:111122223333:key/k",
        user=stack.ensure_principals(paths).user,
        attestation_root=paths.ca_dir / "root.pem",
    )
    try:
        kms, nsm = _sleeper(paths, "kms"), _sleeper(paths, "nsm")
        proxy_argv = [str(port), str(paths.cert), str(paths.tls_key), str(paths.enclave_socket)]
        proxy = stack.spawn(paths, "proxy", [sys.executable, "-c", FAKE_PROXY, *proxy_argv])
        first = stack.start_enclave(paths)
        stack.wait_ready(paths, f"https://127.0.0.1:{port}", [first, proxy], timeout=60)

        started = time.monotonic()
        second = stack.restart_enclave(paths, timeout=60)
        took = time.monotonic() - started
        # Waited for the new process to serve (it pauses 0.5 s before listening), no longer.
        assert 0.5 <= took < 30
        assert second.pid != first.pid and _gone(first.pid)
        assert stack.component_pid(paths, "enclave") == second.pid
        runs = _started(app)
        assert len(runs) == 2 and runs[0]["argv"] == runs[1]["argv"]
        assert runs[1]["enclave"] == str(app / "enclave" / "__init__.py")
        # The other components were left alone.
        assert [stack.component_pid(paths, n) for n in ("kms", "nsm", "proxy")] == [
            kms.pid,
            nsm.pid,
            proxy.pid,
        ]
        log = paths.log("enclave").read_text()
        assert log.count("--- nitro-local: starting enclave") == 2
    finally:
        stack.stop_all(paths)


def test_restart_refuses_when_the_stack_is_not_running(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    assert local.main(["restart", "enclave", "--state-dir", str(state)]) == 1
    err = capsys.readouterr().err
    assert "is not running (kms, nsm, proxy stopped)" in err and "nitro-local up" in err
    assert stack.status(stack.StatePaths(state)) == dict.fromkeys(stack.COMPONENTS)
    for argv in (["restart"], ["restart", "kms"], ["measure", "enclave"], ["up", "--json"]):
        with pytest.raises(SystemExit) as exited:
            local.main([*argv, "--state-dir", str(state)])
        assert exited.value.code == 2


def test_measure_json_is_what_the_nsm_emulator_would_report(tmp_path: Path, capsys) -> None:
    from emulator.measure import measure

    model = _fake_model(tmp_path / "model")
    paths = _state_with_config(tmp_path, model)
    app = _fake_app(tmp_path / "app")
    stack.record_app_root(paths, app)
    assert local.main(["measure", "--state-dir", str(paths.root), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = measure(app, paths.enclave_config, model)
    assert printed == {f"PCR{n}": expected[n].hex() for n in (0, 1, 2)}
    # The checkout measured instead of the copy, the model named on the command line: others.
    argv = ["measure", "--state-dir", str(paths.root), "--json"]
    assert local.main([*argv, "--app-root", str(stack.checkout_root())]) == 0
    assert json.loads(capsys.readouterr().out)["PCR2"] != printed["PCR2"]
    other = _fake_model(tmp_path / "other-model")
    (other / "weights.bin").write_bytes(b"\0" * 64)
    assert local.main([*argv, "--model-dir", str(other)]) == 0
    assert (
        json.loads(capsys.readouterr().out)["PCR2"]
        == measure(app, paths.enclave_config, other)[2].hex()
    )
    # An edit to the copy shows at once.
    (app / "enclave" / "main.py").write_text(FAKE_ENCLAVE_MAIN + "# edited\n")
    assert local.main(argv) == 0
    edited = json.loads(capsys.readouterr().out)
    assert edited["PCR0"] != printed["PCR0"] and edited["PCR1"] == printed["PCR1"]


def test_measure_without_a_config_says_to_run_up(tmp_path: Path, capsys) -> None:
    assert local.main(["measure", "--state-dir", str(tmp_path / "state")]) == 1
    err = capsys.readouterr().err
    assert "enclave.json does not exist" in err and "nitro-local up" in err


def test_policy_pins_reads_every_attestation_condition() -> None:
    assert stack.policy_pins(_policy()) == {
        0: frozenset({"ab" * 48}),
        1: frozenset({"cd" * 48}),
        2: frozenset({"ef" * 48}),
    }
    strict = {
        "Statement": [
            {
                "Effect": "Deny",
                "Condition": {
                    "StringNotEqualsIgnoreCase": {
                        "kms:RecipientAttestation:ImageSha384": "AA" * 48,
                        "kms:recipientattestation:pcr8": ["11" * 48, "22" * 48],
                    },
                    "Bool": {"aws:SecureTransport": "true"},
                },
            },
            {"Effect": "Allow", "Condition": "not an object"},
            "not a statement",
        ]
    }
    assert stack.policy_pins(strict) == {
        0: frozenset({"aa" * 48}),
        8: frozenset({"11" * 48, "22" * 48}),
    }
    assert stack.policy_pins({"Statement": {"Effect": "Allow"}}) == {}
    assert stack.policy_pins([]) == {}


def test_measure_compares_with_the_policy_the_running_kms_holds(tmp_path: Path, capsys) -> None:
    model = _fake_model(tmp_path / "model")
    paths = _state_with_config(tmp_path, model)
    stack.record_app_root(paths, _fake_app(tmp_path / "app"))
    stack.ensure_ca(paths)
    principals = stack.ensure_principals(paths)
    argv = ["measure", "--state-dir", str(paths.root)]
    assert local.main(argv) == 0
    assert "key policy not checked: this stack's KMS is not running" in capsys.readouterr().out
    try:
        _kms, endpoint = stack.start_kms(paths)
        admin = stack.kms_client(endpoint, principals.admin)
        key_arn = stack.create_or_load_key(paths, admin)
        pcrs = stack.measure_pcrs(paths, model)
        stack.apply_local_policy(admin, key_arn, pcrs)
        assert local.main(argv) == 0
        out = capsys.readouterr().out
        for n in (0, 1, 2):
            assert f"  PCR{n}  {pcrs[n].hex()}\n" in out
            assert f"  PCR{n}  matches\n" in out
        assert f"the key policy of {key_arn} pins PCR0, PCR1, PCR2:" in out
        assert "admits these PCRs" in out and "DIFFERS" not in out

        stack.apply_local_policy(admin, key_arn, {**pcrs, 2: bytes([0x5A]) * 48})
        assert local.main(argv) == 0
        out = capsys.readouterr().out
        assert f"  PCR2  DIFFERS: the policy admits {'5a' * 48}\n" in out
        assert "  PCR0  matches\n" in out and "KMS will refuse the key" in out
    finally:
        stack.stop_all(paths)
