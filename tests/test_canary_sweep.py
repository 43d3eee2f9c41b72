"""The canary sweep: nothing the run wrote holds a canary question or an answer a test opened.

tests/conftest.py keeps the session's canaries and moves the sweep to the end of every run, even
when only part of the suite was selected. The unit tests below prove that the sweep finds a
planted canary, so that a clean sweep means something.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_the_sweep_finds_a_canary_planted_in_a_log(canary, tmp_path: Path) -> None:
    # A registry of its own: the session's must not learn this canary (its file stays behind).
    registry = type(canary)(tmp_path)
    planted = registry.new()
    answer = 'An answer with "quotes"\nand a second line, long enough.'
    registry.answer(answer)
    registry.answer("too short")  # under MIN_ANSWER_CHARS: not a canary
    logs = tmp_path / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "proxy.log").write_text('{"event":"request","status":200}\n')
    scanned, leaks = registry.leaks()
    assert (scanned, leaks) == (1, [])

    (logs / "enclave.log").write_text(f'{{"event":"request","detail":"{planted}"}}\n')
    # An answer in a JSON log line is escaped: the sweep looks for that form too.
    (logs / "gateway.log").write_text(json.dumps({"event": "x", "text": answer}) + "\n")
    scanned, leaks = registry.leaks()
    assert scanned == 3
    ordered = sorted(registry.secrets)
    assert leaks == sorted(
        [
            (str(logs / "enclave.log"), ordered.index(planted)),
            (str(logs / "gateway.log"), ordered.index(answer)),
        ]
    )


def test_the_sweep_finds_a_canary_across_a_read_boundary_and_in_a_capture(
    canary, tmp_path: Path
) -> None:
    registry = type(canary)(tmp_path)
    planted = registry.new()
    big = tmp_path / "metrics.txt"
    # The canary straddles the sweep's 1 MiB read step.
    big.write_bytes(b"x" * ((1 << 20) - 5) + planted.encode() + b"\n")
    registry.capture("relay.bin", b"\x00\x01ciphertext only\x02")
    assert registry.leaks() == (2, [(str(big), 0)])
    registry.capture("relay.bin", b"\x00" + planted.encode())
    scanned, leaks = registry.leaks()
    assert scanned == 3 and len(leaks) == 2


def test_no_canary_in_anything_the_run_wrote(canary) -> None:
    """Run last (tests/conftest.py): every log, state directory, metrics page and relay capture
    under the session's base directory, against every canary and opened answer of the run."""
    if not canary.secrets:
        pytest.skip("no test selected in this run used a canary or opened an answer")
    scanned, leaks = canary.leaks()
    assert scanned > 0, "the sweep found no file: the tests' logs are not where it looks"
    where = sorted({str(Path(path).relative_to(canary.base)) for path, _i in leaks})
    # Only where: a failure message must not print the secret itself.
    assert not leaks, f"{len(leaks)} canary leak(s) in: {where}"
