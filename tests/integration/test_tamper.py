"""The tamper story, shown: edit a file the enclave runs, restart it, and KMS refuses the key.

The whole stack runs as a user runs it (console scripts in subprocesses), with the enclave
started from a copy of enclave/ and protocol/ in a temporary directory (`nitro-local up
--app-root`): the test edits that copy, never the checkout other work shares.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from emulator import stack
from protocol.errors import ErrorCode

pytestmark = pytest.mark.integration
QUESTION = "How do I enroll in the retirement plan?"
TAMPER = b"\n# an edit the key policy never measured\n"


@pytest.fixture
def app_copy(tmp_path: Path, app_snapshot: Any) -> Path:
    """enclave/ and protocol/ of this checkout, copied: what the enclave runs and is measured by."""
    return app_snapshot(tmp_path / "app")


def ask(local: Any, *extra: str) -> subprocess.CompletedProcess:
    return local.cli.run(
        "chatbot", "--local", "--state-dir", str(local.root), "ask", QUESTION, *extra
    )


def restart(local: Any) -> float:
    started = time.monotonic()
    result = local.cli.run("nitro-local", "restart", "enclave", "--state-dir", str(local.root))
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - started


def refusals(local: Any) -> list[dict]:
    return local.logs.events("enclave", "kms_decrypt_refused")


def test_edit_restart_refused_revert_restart_answers(
    app_copy: Path, local_stack: Any, processes: Any
) -> None:
    assert not app_copy.is_relative_to(stack.checkout_root())

    local = local_stack("tamper", "--app-root", str(app_copy))  # `nitro-local up` succeeded
    state, paths = local.root, local.paths
    # The enclave really runs from the copy: its working directory, and the bytecode Python
    # wrote beside the sources it imported.
    enclave_pid = stack.component_pid(paths, "enclave")
    assert enclave_pid is not None
    assert Path(os.readlink(f"/proc/{enclave_pid}/cwd")) == app_copy
    if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
        assert list((app_copy / "enclave" / "__pycache__").glob("server.*.pyc"))
        assert list((app_copy / "protocol" / "__pycache__").glob("envelope.*.pyc"))

    answered = ask(local)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
    pinned = local.measure()
    assert set(pinned) == {"PCR0", "PCR1", "PCR2"}
    report = local.cli.run("nitro-local", "measure", "--state-dir", str(state))
    assert report.returncode == 0, report.stderr
    assert "pins PCR0, PCR1, PCR2" in report.stdout and "DIFFERS" not in report.stdout
    assert "admits these PCRs" in report.stdout

    # ---- edit a file the enclave runs, boot it again: KMS refuses the key ----------------
    server = app_copy / "enclave" / "server.py"
    original = server.read_bytes()
    server.write_bytes(original + TAMPER)
    tampered = local.measure()
    assert tampered["PCR0"] != pinned["PCR0"] and tampered["PCR2"] != pinned["PCR2"]
    assert tampered["PCR1"] == pinned["PCR1"]  # the runtime did not change
    report = local.cli.run("nitro-local", "measure", "--state-dir", str(state))
    assert f"PCR0  DIFFERS: the policy admits {pinned['PCR0']}" in report.stdout
    assert f"PCR2  DIFFERS: the policy admits {pinned['PCR2']}" in report.stdout
    assert "PCR1  matches" in report.stdout
    assert "KMS will refuse the key" in report.stdout

    print(f"restart enclave (tampered): {restart(local):.1f} s")
    assert stack.component_pid(paths, "enclave") not in (None, enclave_pid)
    refused = ask(local)
    assert refused.returncode != 0
    expected = f"error: attestation_rejected: {ErrorCode.ATTESTATION_REJECTED.client_text}"
    assert refused.stderr.splitlines()[0] == expected
    assert "nitro-local measure" in refused.stderr
    assert tampered["PCR0"] not in refused.stderr  # the server's words only with --verbose
    assert refused.stdout == ""

    verbose = ask(local, "--verbose")
    assert verbose.returncode != 0
    assert verbose.stderr.splitlines()[0] == expected
    assert (
        "server said (untrusted): KMS refused the key to this enclave image; "
        f"it presented PCR0 {tampered['PCR0']}"
    ) in verbose.stderr.splitlines()
    # The enclave's own log names the PCR0 it presented, once per refused question.
    assert [line["pcr0"] for line in refusals(local)] == [tampered["PCR0"]] * 2

    # ---- revert, boot again: the same image as the policy's, and it answers ---------------
    server.write_bytes(original)
    assert local.measure() == pinned
    print(f"restart enclave (reverted): {restart(local):.1f} s")
    again = ask(local)
    assert again.returncode == 0, again.stderr
    assert again.stdout == answered.stdout  # greedy decoding: the same answer as before
    assert len(refusals(local)) == 2

    # ---- down: nothing left running ------------------------------------------------------
    pids = {name: pid for name, pid in stack.status(paths).items() if pid is not None}
    assert set(pids) == set(stack.COMPONENTS)
    down = local.cli.run("nitro-local", "down", "--state-dir", str(state))
    assert down.returncode == 0, down.stderr
    assert stack.status(paths) == dict.fromkeys(stack.COMPONENTS)
    deadline = time.monotonic() + 10
    while processes.naming(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes.naming(state) == []
