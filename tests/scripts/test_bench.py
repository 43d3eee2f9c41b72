"""Tests for scripts/bench.py's pure parts: the targets, the table, the JSON it writes, --only.

The measurements themselves need the full-size model and minutes of CPU: `make bench` runs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nitro_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load()

# Values at which every target passes.
PASSING = {
    "reference_b1_tok_s": 7.0,
    "reference_serial_tok_s": 6.5,
    "fast_b1_tok_s": 30.0,  # 4.29x
    "fast_ttft_ms": 80.0,
    "stack_8_clients_tok_s": 100.0,  # 15.4x
    "stack_overhead_pct": 2.0,
    "enclave_peak_rss_mb": 900.0,
    "rel_logit_error": 0.01,
    "top1_agreement": 0.97,
    "mean_kl": 0.001,
}


def _statuses(results: dict) -> dict[str, str]:
    return {row["name"]: row["status"] for row in bench.evaluate_targets(results)}


def test_all_targets_pass_on_good_numbers() -> None:
    rows = bench.evaluate_targets(PASSING)
    assert [row["status"] for row in rows] == ["PASS"] * 5
    by_name = {row["name"]: row for row in rows}
    assert by_name["fast batch-1 decode vs reference"]["value"] == pytest.approx(30 / 7, abs=1e-3)
    assert by_name["8 clients through the stack vs reference serial"]["value"] == pytest.approx(
        100 / 6.5, abs=1e-3
    )


@pytest.mark.parametrize(
    ("key", "value", "target"),
    [
        ("fast_b1_tok_s", 27.9, "fast batch-1 decode vs reference"),  # 3.99x
        ("stack_8_clients_tok_s", 97.0, "8 clients through the stack vs reference serial"),
        ("stack_overhead_pct", 5.01, "stack's added latency (64 tokens)"),
        ("top1_agreement", 0.949, "top-1 agreement, trained tiny model"),
        ("enclave_peak_rss_mb", 1537.0, "enclave peak RSS, bloom-560m shape"),
    ],
)
def test_each_target_fails_just_past_its_bar(key: str, value: float, target: str) -> None:
    statuses = _statuses({**PASSING, key: value})
    assert statuses[target] == "FAIL"
    assert sum(s == "PASS" for s in statuses.values()) == 4


def test_bars_are_inclusive() -> None:
    at_bar = {
        **PASSING,
        "fast_b1_tok_s": 28.0,  # exactly 4x
        "stack_8_clients_tok_s": 97.5,  # exactly 15x
        "stack_overhead_pct": 5.0,
        "top1_agreement": 0.95,
        "enclave_peak_rss_mb": 1536.0,
    }
    assert set(_statuses(at_bar).values()) == {"PASS"}


def test_missing_or_broken_values_are_not_applicable() -> None:
    results = {**PASSING, "fast_b1_tok_s": None, "reference_serial_tok_s": 0.0}
    results["top1_agreement"] = float("nan")
    del results["enclave_peak_rss_mb"]
    statuses = _statuses(results)
    assert statuses["fast batch-1 decode vs reference"] == "N/A"
    assert statuses["8 clients through the stack vs reference serial"] == "N/A"  # 0 divisor
    assert statuses["top-1 agreement, trained tiny model"] == "N/A"
    assert statuses["enclave peak RSS, bloom-560m shape"] == "N/A"
    assert statuses["stack's added latency (64 tokens)"] == "PASS"


def test_results_document_has_every_key_and_is_json() -> None:
    measured = {**PASSING, "extra_key": 1.0}
    del measured["mean_kl"]
    doc = bench.results_document(measured, {"fast_backend": "fast"})
    required = {
        "reference_b1_tok_s",
        "fast_b1_tok_s",
        "fast_ttft_ms",
        "reference_serial_tok_s",
        "stack_8_clients_tok_s",
        "stack_overhead_pct",
        "top1_agreement",
        "mean_kl",
        "rel_logit_error",
        "enclave_peak_rss_mb",
    }
    assert required <= doc.keys()
    assert "extra_key" not in doc
    assert doc["mean_kl"] is None  # not measured: null, not absent
    assert doc["fast_b1_tok_s"] == 30.0
    assert [row["status"] for row in doc["targets"]] == ["PASS"] * 5
    assert doc["meta"] == {"fast_backend": "fast"}
    assert json.loads(json.dumps(doc)) == doc


def test_table_shows_values_statuses_and_the_stand_in_note() -> None:
    doc = bench.results_document(
        {**PASSING, "fast_b1_tok_s": 7.1, "mean_kl": None},
        {
            "fast_backend": "reference (stand-in)",
            "fast_is_stand_in": True,
            "int8_kernel": "fbgemm",
            "prompt_tokens": 32,
            "weight_bytes": {"reference": 2_000_000_000, "fast": 500_000_000},
        },
    )
    table = bench.format_table(doc, doc["targets"])
    header = next(line for line in table.splitlines() if line.startswith("nitro-llm bench:"))
    assert "(int8 kernel fbgemm)" in header  # which product the numbers are of
    # Batch-1 decode reads all weights once per token: the bandwidth it used.
    assert "(reference: 2.00 GB of weights per token at batch 1 = 14.0 GB/s)" in table
    assert "(fast: 0.50 GB of weights per token at batch 1 = 3.5 GB/s)" in table
    assert "stand-in" in table.splitlines()[0]
    assert "7.1 tok/s" in table
    assert "not measured" in table  # mean_kl
    target_lines = [line for line in table.splitlines() if "vs reference" in line]
    assert target_lines[0].endswith("FAIL")  # 7.1 / 7.0 is far from 4x
    assert target_lines[1].endswith("PASS")
    assert ">= 4x" in target_lines[0]


def test_only_parses_sections() -> None:
    assert bench.parse_sections(None) == bench.SECTIONS
    assert bench.parse_sections("fast, stack") == ("fast", "stack")
    for bad in ("", "fast,gpu", ","):
        with pytest.raises(ValueError, match="--only"):
            bench.parse_sections(bad)


def test_overhead_is_a_share_of_the_stack_time() -> None:
    assert bench.overhead_pct([2.0, 2.2, 2.1], [2.0, 1.9, 2.0]) == pytest.approx(0.1 / 2.1 * 100)


def test_bad_only_exits_2_without_work(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "gpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--only" in done.stderr
    assert not out.exists()


def test_a_failed_section_is_reported_in_the_table() -> None:
    doc = bench.results_document(
        {"top1_agreement": 0.99}, {"errors": {"stack": "local stack: not ready after 600 s"}}
    )
    table = bench.format_table(doc, doc["targets"])
    assert "ERROR in stack: local stack: not ready after 600 s" in table
    assert doc["stack_8_clients_tok_s"] is None


def test_a_busy_machine_is_called_out() -> None:
    busy = bench.results_document(PASSING, {"cpus": 2, "other_cpu_share": 0.42})
    quiet = bench.results_document(PASSING, {"cpus": 2, "other_cpu_share": 0.03})
    assert "other processes used 42% of its 2 CPUs" in bench.format_table(busy, busy["targets"])
    assert "busy" not in bench.format_table(quiet, quiet["targets"])


def test_other_cpu_counts_only_what_this_process_did_not_use() -> None:
    readings = {"clock": [100.0, 110.0], "busy": [500.0, 516.0], "own": [20.0, 31.0]}

    def reader(name: str):  # each reader answers its start value, then its end value
        return lambda: readings[name].pop(0)

    meter = bench.OtherCpu(reader("clock"), reader("busy"), reader("own"))
    cpus = os.cpu_count() or 1
    # 16 CPU-seconds busy in 10 s, 11 of them ours: 5 s of others' work over 10 s x cpus.
    assert meter.share() == pytest.approx(5.0 / (10.0 * cpus))


def test_cpu_readers_count_up() -> None:
    busy, own = bench._machine_busy_s(), bench._own_cpu_s()
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        pass
    assert bench._machine_busy_s() >= busy > 0
    assert bench._own_cpu_s() > own


def test_the_engine_alone_runs_in_its_own_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The overhead's baseline: the engine loaded as the enclave loads it, in a fresh process,
    # timing each request it is sent; closing its input ends it.
    config = tmp_path / "enclave.json"
    config.write_text(
        json.dumps({"region": "us-east-1", "key_ids": ["k"], "model_dir": str(tiny_model_dir)})
    )
    log = tmp_path / "engine-alone.log"
    worker = bench.EngineWorker(tiny_model_dir, config, log)
    try:
        seconds, tokens = worker.generate("How do I reset my password?", 6, 6)
        assert tokens == 6
        assert 0 < seconds < 60
        assert worker._proc.pid != os.getpid()
    finally:
        worker.close()
    assert worker._proc.returncode == 0


def test_a_dead_engine_alone_is_an_error_not_a_hang(tmp_path: Path) -> None:
    config = tmp_path / "enclave.json"
    config.write_text(json.dumps({"region": "us-east-1", "key_ids": ["k"], "model_dir": "/nx"}))
    with pytest.raises(bench.BenchError, match="engine-alone process gave no answer"):
        bench.EngineWorker(tmp_path / "no-model", config, tmp_path / "engine-alone.log")
