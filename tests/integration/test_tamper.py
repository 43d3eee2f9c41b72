"""The tamper story, shown: edit a file the enclave runs, restart it, and KMS refuses the key.

The whole stack runs as a user runs it (console scripts in subprocesses), with the enclave
started from a copy of enclave/ and protocol/ in a temporary directory (`nitro-local up
--app-root`): the test edits that copy, never the checkout other work shares.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator import stack
from protocol.errors import ErrorCode

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
QUESTION = "How do I enroll in the retirement plan?"
TAMPER = b"\n# an edit the key policy never measured\n"


def run(*argv: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost")
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def processes_naming(path: Path) -> list[int]:
    """Live processes whose arguments name a path under `path`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z" and any(os.fsencode(path) in arg for arg in args):
            found.append(int(entry.name))
    return found


@pytest.fixture
def app_copy(tmp_path: Path) -> Path:
    """enclave/ and protocol/ of this checkout, copied: what the enclave runs and is measured by."""
    app = tmp_path / "app"
    checkout = stack.checkout_root()
    for name in ("enclave", "protocol"):
        shutil.copytree(
            checkout / name, app / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    return app


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "state"
    try:
        yield root
    finally:
        run("nitro-local", "down", "--state-dir", str(root))


def ask(state: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("chatbot", "--local", "--state-dir", str(state), "ask", QUESTION, *extra)


def measure_json(state: Path) -> dict[str, str]:
    result = run("nitro-local", "measure", "--state-dir", str(state), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def restart(state: Path) -> float:
    started = time.monotonic()
    result = run("nitro-local", "restart", "enclave", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - started


def refusals(state: Path) -> list[dict]:
    log = stack.StatePaths(state).log("enclave")
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("event") == "kms_decrypt_refused"]


def test_edit_restart_refused_revert_restart_answers(
    app_copy: Path, state: Path, tiny_model_dir: Path
) -> None:
    paths = stack.StatePaths(state)
    assert not app_copy.is_relative_to(stack.checkout_root())

    up = run(
        "nitro-local",
        "up",
        "--state-dir",
        str(state),
        "--model-dir",
        str(tiny_model_dir),
        "--app-root",
        str(app_copy),
    )
    assert up.returncode == 0, up.stderr[-3000:]
    # The enclave really runs from the copy: its working directory, and the bytecode Python
    # wrote beside the sources it imported.
    enclave_pid = stack.component_pid(paths, "enclave")
    assert enclave_pid is not None
    assert Path(os.readlink(f"/proc/{enclave_pid}/cwd")) == app_copy
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        assert list((app_copy / "enclave" / "__pycache__").glob("server.*.pyc"))
        assert list((app_copy / "protocol" / "__pycache__").glob("envelope.*.pyc"))

    answered = ask(state)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
    pinned = measure_json(state)
    assert set(pinned) == {"PCR0", "PCR1", "PCR2"}
    report = run("nitro-local", "measure", "--state-dir", str(state))
    assert report.returncode == 0, report.stderr
    assert "pins PCR0, PCR1, PCR2" in report.stdout and "DIFFERS" not in report.stdout
    assert "admits these PCRs" in report.stdout

    # ---- edit a file the enclave runs, boot it again: KMS refuses the key ----------------
    server = app_copy / "enclave" / "server.py"
    original = server.read_bytes()
    server.write_bytes(original + TAMPER)
    tampered = measure_json(state)
    assert tampered["PCR0"] != pinned["PCR0"] and tampered["PCR2"] != pinned["PCR2"]
    assert tampered["PCR1"] == pinned["PCR1"]  # the runtime did not change
    report = run("nitro-local", "measure", "--state-dir", str(state))
    assert f"PCR0  DIFFERS: the policy admits {pinned['PCR0']}" in report.stdout
    assert f"PCR2  DIFFERS: the policy admits {pinned['PCR2']}" in report.stdout
    assert "PCR1  matches" in report.stdout
    assert "KMS will refuse the key" in report.stdout

    print(f"restart enclave (tampered): {restart(state):.1f} s")
    assert stack.component_pid(paths, "enclave") not in (None, enclave_pid)
    refused = ask(state)
    assert refused.returncode != 0
    expected = f"error: attestation_rejected: {ErrorCode.ATTESTATION_REJECTED.client_text}"
    assert refused.stderr.splitlines()[0] == expected
    assert "nitro-local measure" in refused.stderr
    assert tampered["PCR0"] not in refused.stderr  # the server's words only with --verbose
    assert refused.stdout == ""

    verbose = ask(state, "--verbose")
    assert verbose.returncode != 0
    assert verbose.stderr.splitlines()[0] == expected
    assert (
        "server said (untrusted): KMS refused the key to this enclave image; "
        f"it presented PCR0 {tampered['PCR0']}"
    ) in verbose.stderr.splitlines()
    # The enclave's own log names the PCR0 it presented, once per refused question.
    assert [line["pcr0"] for line in refusals(state)] == [tampered["PCR0"]] * 2

    # ---- revert, boot again: the same image as the policy's, and it answers ---------------
    server.write_bytes(original)
    assert measure_json(state) == pinned
    print(f"restart enclave (reverted): {restart(state):.1f} s")
    again = ask(state)
    assert again.returncode == 0, again.stderr
    assert again.stdout == answered.stdout  # greedy decoding: the same answer as before
    assert len(refusals(state)) == 2

    # ---- down: nothing left running ------------------------------------------------------
    pids = {name: pid for name, pid in stack.status(paths).items() if pid is not None}
    assert set(pids) == set(stack.COMPONENTS)
    down = run("nitro-local", "down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert stack.status(paths) == dict.fromkeys(stack.COMPONENTS)
    deadline = time.monotonic() + 10
    while processes_naming(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(state) == []
