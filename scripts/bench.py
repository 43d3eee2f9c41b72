"""`make bench`: the fast backend against the original sample's engine, and the whole local stack.

One run measures, side by side, on a BLOOM with bloom-560m's configuration and random weights
(built once, cached under .bench-cache/), always 64 new tokens after a 32-token prompt: the
reference backend one request at a time, the fast backend at batch 1, 8 concurrent clients
through the whole local stack, the stack's added latency, the enclave's peak memory, and the
fast backend's agreement with the reference. It prints a table with each target and PASS/FAIL
and writes bench-results.json. A failed target is a measurement, not an error: exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing: the packages live at the repository root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

PROMPT_TOKENS = 32
NEW_TOKENS = 64
CLIENTS = 8
MAX_BATCH = 8
# bigscience/bloom-560m's config.json, the fields that decide speed and memory.
BLOOM_560M = {
    "vocab_size": 250880,
    "hidden_size": 1024,
    "n_layer": 24,
    "n_head": 16,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "apply_residual_connection_post_layernorm": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "slow_but_exact": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
MODEL_SEED = 0
CACHE_VERSION = "v1"  # bump when the cached model's recipe changes
SECTIONS = ("reference", "fast", "accuracy", "stack", "overhead")
RESULT_KEYS = (
    "reference_b1_tok_s",
    "reference_serial_tok_s",
    "fast_b1_tok_s",
    "fast_ttft_ms",
    "fast_8_concurrent_tok_s",
    "stack_8_clients_tok_s",
    "stack_overhead_pct",
    "enclave_peak_rss_mb",
    "rel_logit_error",
    "top1_agreement",
    "mean_kl",
)
STACK_READY_TIMEOUT_S = 600.0
CLIENT_TIMEOUT_S = 900.0
RELAY_TIMEOUT_S = 900
# Above this share of the CPUs used by processes other than the bench's own, the table says so.
BUSY_SHARE = 0.1


# ---- the targets and the table (pure: tested in tests/scripts/test_bench.py) -------------------


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: a measured quantity, how it is computed, and its bar."""

    name: str
    keys: tuple[str, ...]  # the result keys it needs
    value: Callable[[dict[str, Any]], float]
    threshold: float
    higher_is_better: bool
    unit: str

    def check(self, results: dict[str, Any]) -> tuple[float | None, str]:
        """(the value, "PASS" | "FAIL" | "N/A"): N/A when a needed key was not measured."""
        if any(not _is_number(results.get(key)) for key in self.keys):
            return None, "N/A"
        try:
            value = self.value(results)
        except ZeroDivisionError:
            return None, "N/A"
        if not math.isfinite(value):
            return None, "N/A"
        ok = value >= self.threshold if self.higher_is_better else value <= self.threshold
        return value, "PASS" if ok else "FAIL"

    @property
    def bar(self) -> str:
        return f"{'>=' if self.higher_is_better else '<='} {self.threshold:g}{self.unit}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


TARGETS = (
    Target(
        "fast batch-1 decode vs reference",
        ("fast_b1_tok_s", "reference_b1_tok_s"),
        lambda r: r["fast_b1_tok_s"] / r["reference_b1_tok_s"],
        4.0,
        True,
        "x",
    ),
    Target(
        "8 clients through the stack vs reference serial",
        ("stack_8_clients_tok_s", "reference_serial_tok_s"),
        lambda r: r["stack_8_clients_tok_s"] / r["reference_serial_tok_s"],
        15.0,
        True,
        "x",
    ),
    Target(
        "stack's added latency (64 tokens)",
        ("stack_overhead_pct",),
        lambda r: r["stack_overhead_pct"],
        5.0,
        False,
        " %",
    ),
    Target(
        "top-1 agreement, trained tiny model",
        ("top1_agreement",),
        lambda r: r["top1_agreement"],
        0.95,
        True,
        "",
    ),
    Target(
        "enclave peak RSS, bloom-560m shape",
        ("enclave_peak_rss_mb",),
        lambda r: r["enclave_peak_rss_mb"],
        1536.0,  # 1.5 GiB, in MiB
        False,
        " MiB",
    ),
)

# Label, result key and format of each measured row of the table.
MEASUREMENTS = (
    ("reference decode, batch 1", "reference_b1_tok_s", "{:.1f} tok/s"),
    ("reference serial throughput", "reference_serial_tok_s", "{:.1f} tok/s"),
    ("fast decode, batch 1", "fast_b1_tok_s", "{:.1f} tok/s"),
    ("fast time to first token", "fast_ttft_ms", "{:.0f} ms"),
    ("fast, 8 requests at once, in-process", "fast_8_concurrent_tok_s", "{:.1f} tok/s"),
    ("8 clients through the stack", "stack_8_clients_tok_s", "{:.1f} tok/s"),
    ("stack's added latency", "stack_overhead_pct", "{:.2f} %"),
    ("enclave peak RSS (VmHWM)", "enclave_peak_rss_mb", "{:.0f} MiB"),
    ("relative logit error, full size", "rel_logit_error", "{:.2e}"),
    ("top-1 agreement, tiny model", "top1_agreement", "{:.4f}"),
    ("mean KL(ref || fast), tiny model", "mean_kl", "{:.2e}"),
)


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target's name, bar, value and status, in the order of TARGETS."""
    rows = []
    for target in TARGETS:
        value, status = target.check(results)
        rows.append(
            {
                "name": target.name,
                "bar": target.bar,
                "value": None if value is None else round(value, 4),
                "status": status,
            }
        )
    return rows


def format_table(results: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    """The printed report: the measurements, then the targets with PASS/FAIL/N/A."""
    meta = results.get("meta", {})
    lines = []
    fast_label = meta.get("fast_backend", "?")
    if meta.get("fast_is_stand_in"):
        lines.append(
            "NOTE: no fast backend in enclave/engine.py yet: the reference backend ran in the "
            "fast slot (a stand-in), so 'fast' numbers below are the reference's."
        )
    if meta.get("harness_check"):
        lines.append(
            "NOTE: harness check: every section ran on the tiny model; the numbers below "
            "do not measure the targets."
        )
    foreign = meta.get("other_cpu_share")
    if _is_number(foreign) and foreign > BUSY_SHARE:
        lines.append(
            f"NOTE: the machine was busy: other processes used {foreign:.0%} of its "
            f"{meta.get('cpus')} CPUs during this run, competing for the cores and the memory "
            "bus; timings are lower (and ratios noisier) than on an idle machine."
        )
    lines.append(
        f"nitro-llm bench: {meta.get('prompt_tokens', PROMPT_TOKENS)}-token prompt, "
        f"{NEW_TOKENS} new tokens, fast backend = {fast_label} "
        f"(int8 kernel {meta.get('int8_kernel', '?')}), "
        f"{meta.get('cpus', '?')} CPUs, torch {meta.get('torch', '?')}"
    )
    width = max(len(label) for label, _key, _fmt in MEASUREMENTS)
    lines.append("")
    lines.append(f"{'measurement':<{width}}  value")
    lines.append(f"{'-' * width}  {'-' * 16}")
    for label, key, fmt in MEASUREMENTS:
        value = results.get(key)
        text = fmt.format(value) if _is_number(value) else "not measured"
        lines.append(f"{label:<{width}}  {text}")
    # Batch-1 decode reads every weight once per token: bytes x tok/s is the bandwidth it used.
    for role, key in (("reference", "reference_b1_tok_s"), ("fast", "fast_b1_tok_s")):
        size = meta.get("weight_bytes", {}).get(role)
        if _is_number(size) and _is_number(results.get(key)):
            rate = size * results[key] / 1e9
            lines.append(
                f"({role}: {size / 1e9:.2f} GB of weights per token at batch 1 = {rate:.1f} GB/s)"
            )
    for section, detail in meta.get("errors", {}).items():
        lines.append(f"ERROR in {section}: {detail}")
    note = meta.get("overhead_model")
    if note:
        lines.append(f"(stack's added latency measured on the {note} model)")
    lines.append("")
    name_width = max(len(row["name"]) for row in targets)
    lines.append(f"{'target':<{name_width}}  {'bar':<10}  {'measured':>10}  result")
    lines.append(f"{'-' * name_width}  {'-' * 10}  {'-' * 10}  ------")
    for row in targets:
        value = "-" if row["value"] is None else f"{row['value']:.4g}"
        lines.append(f"{row['name']:<{name_width}}  {row['bar']:<10}  {value:>10}  {row['status']}")
    return "\n".join(lines)


def results_document(measured: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """What bench-results.json holds: every RESULT_KEY (null when not measured), the targets,
    and `meta` (how it was measured)."""
    doc: dict[str, Any] = {key: _rounded(measured.get(key)) for key in RESULT_KEYS}
    doc["targets"] = evaluate_targets(doc)
    doc["meta"] = meta
    return doc


def _rounded(value: Any) -> Any:
    if not _is_number(value):
        return None
    return float(f"{value:.6g}")


def parse_sections(text: str | None) -> tuple[str, ...]:
    """--only's comma-separated section names (all sections when None), checked."""
    if text is None:
        return SECTIONS
    wanted = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in wanted if name not in SECTIONS]
    if not wanted or unknown:
        raise ValueError(f"--only takes a comma-separated list of: {', '.join(SECTIONS)}")
    return wanted


class OtherCpu:
    """How much of the machine's CPU time went to processes other than this one and its
    children (the stack included, once reaped) since it was made: a shared machine's noise."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        machine_busy: Callable[[], float] | None = None,
        own: Callable[[], float] | None = None,
    ) -> None:
        self._read = (clock, machine_busy or _machine_busy_s, own or _own_cpu_s)
        self._start = [read() for read in self._read]

    def share(self) -> float:
        wall, busy, own = (
            read() - then for read, then in zip(self._read, self._start, strict=True)
        )
        cpus = os.cpu_count() or 1
        return max(0.0, busy - own) / (wall * cpus) if wall > 0 else math.nan


def _machine_busy_s() -> float:
    """CPU seconds spent not idle, all CPUs together, since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(x) for x in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    guest = sum(fields[8:10]) if len(fields) > 9 else 0  # already counted in user and nice
    return (sum(fields) - idle - guest) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ---- progress ----------------------------------------------------------------------------------

_STARTED = time.monotonic()


def say(line: str) -> None:
    print(f"bench [{time.monotonic() - _STARTED:6.1f}s] {line}", file=sys.stderr, flush=True)


# ---- the models --------------------------------------------------------------------------------


def fast_backend_available() -> bool:
    """True once enclave/engine.py offers load_engine (the fast backend and the scheduler)."""
    import enclave.engine as engine_module

    return hasattr(engine_module, "load_engine")


def ensure_tiny_model(cache: Path) -> Path:
    """The trained tiny BLOOM: NITRO_TINY_MODEL when it names a built one, else cache/tiny."""
    given = os.environ.get("NITRO_TINY_MODEL")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    target = cache / "tiny-model"
    if (target / "config.json").is_file():
        return target
    from emulator.tiny_model import build_tiny_model

    say("building the trained tiny model once (about half a minute)")
    return _build_aside(target, lambda staging: build_tiny_model(staging))


def ensure_full_model(cache: Path, tokenizer_dir: Path) -> Path:
    """bloom-560m's configuration with random weights (seeded), saved once as safetensors."""
    target = cache / f"bloom-560m-random-{CACHE_VERSION}"
    if (target / "config.json").is_file():
        return target

    def build(staging: Path) -> None:
        import torch
        from transformers import BloomConfig, BloomForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its bar would break the progress lines
        say("building the bloom-560m-shaped model with random weights once (about a minute)")
        torch.manual_seed(MODEL_SEED)
        config = BloomConfig(**BLOOM_560M)
        model = BloomForCausalLM(config).eval()
        model.save_pretrained(staging, safe_serialization=True)
        # The tiny model's tokenizer: its vocabulary is smaller than the model's; ids past it
        # decode to nothing, which changes no timing.
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tokenizer_dir / name, staging / name)
        del model

    return _build_aside(target, build)


def ensure_fast_weights(cache: Path, source: Path) -> Path:
    """The fast backend's prepared weights for `source`, by scripts/save_model.py --quantize."""
    target = cache / f"{source.name}-fast"
    # Re-prepared when the model or the fast backend's code (its weight format) is newer.
    fast_code = _ROOT / "enclave" / "fast_engine.py"
    made = (target / "config.json").stat().st_mtime if (target / "config.json").is_file() else 0
    if made >= max((source / "config.json").stat().st_mtime, fast_code.stat().st_mtime):
        return target
    say(f"preparing the fast backend's weights for {source.name} (save_model.py --quantize)")

    def build(staging: Path) -> None:
        staging.rmdir()  # save_model.py makes its own output directory
        done = subprocess.run(
            [sys.executable, str(_ROOT / "scripts" / "save_model.py"), "--quantize"]
            + [str(source), str(staging)],
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if done.returncode != 0:
            raise BenchError(f"save_model.py --quantize failed: {done.stderr.strip()[-400:]}")

    return _build_aside(target, build)


def _build_aside(target: Path, build: Callable[[Path], Any]) -> Path:
    """Build into a staging directory and rename it: an interrupted build never passes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(staging)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


class BenchError(Exception):
    """A step of the bench failed (not a missed target): exit non-zero with this message."""


@dataclass
class Backends:
    """Which engine plays each part, and which model directory it reads."""

    fast_available: bool
    full_model: Path
    tiny_model: Path
    full_fast_dir: Path | None  # the prepared weights, when the fast backend exists
    tiny_fast_dir: Path | None
    harness_check: bool = False  # "full" is the tiny model too

    @property
    def fast_label(self) -> str:
        return "fast" if self.fast_available else "reference (stand-in)"

    def load(self, role: str, model: str, *, max_batch: int = MAX_BATCH) -> Any:
        """Load an engine in this process: role "reference" or "fast", model "full" or "tiny"."""
        source = self.full_model if model == "full" else self.tiny_model
        if role == "reference" or not self.fast_available:
            from enclave.engine import TransformersEngine

            return TransformersEngine.load(source)
        from enclave.engine import load_engine

        prepared = self.full_fast_dir if model == "full" else self.tiny_fast_dir
        assert prepared is not None
        return load_engine(prepared, "fast", max_batch=max_batch)

    def weight_bytes(self, role: str) -> int:
        """The size of the weight files the `role` backend reads for the full-size model."""
        if role == "fast" and self.fast_available and self.full_fast_dir is not None:
            folder = self.full_fast_dir
        else:
            folder = self.full_model
        return sum(path.stat().st_size for path in folder.glob("*.safetensors"))

    def stack_model_dir(self, model: str) -> Path:
        if self.fast_available:
            prepared = self.full_fast_dir if model == "full" else self.tiny_fast_dir
            assert prepared is not None
            return prepared
        return self.full_model if model == "full" else self.tiny_model


def prepare(
    cache: Path, sections: Sequence[str], overhead_model: str, *, harness_check: bool = False
) -> Backends:
    tiny = ensure_tiny_model(cache)
    # A harness check runs every section on the tiny model: minutes become seconds.
    full = tiny if harness_check else ensure_full_model(cache, tiny)
    available = fast_backend_available()
    full_fast = tiny_fast = None
    if available:
        needs_full = {"fast", "accuracy", "stack"} & set(sections) or overhead_model == "full"
        if needs_full:
            full_fast = ensure_fast_weights(cache, full)
        if "accuracy" in sections or ("overhead" in sections and overhead_model == "tiny"):
            tiny_fast = ensure_fast_weights(cache, tiny)
    else:
        say("enclave.engine has no load_engine yet: the reference backend stands in for 'fast'")
    return Backends(available, full, tiny, full_fast, tiny_fast, harness_check)


# ---- prompts -----------------------------------------------------------------------------------


def make_question(tokenizer: Any, tokens: int = PROMPT_TOKENS) -> tuple[str, str, int]:
    """(question, prompt, prompt's token count): a question from the bundled FAQ text whose
    formatted prompt (what the chatbot sends) is `tokens` long, or as close as words allow."""
    from emulator.tiny_model import load_faq
    from protocol.prompt import format_prompt

    words = " ".join(q + " " + a for q, a in load_faq()).split()
    best: tuple[int, str] | None = None
    for count in range(1, len(words)):
        question = " ".join(words[:count])
        n = len(tokenizer(format_prompt(question)).input_ids)
        if best is None or abs(n - tokens) < abs(best[0] - tokens):
            best = (n, question)
        if n >= tokens:
            break
    assert best is not None
    n, question = best
    return question, format_prompt(question), n


# ---- engine measurements -----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    tokens: int
    ttft_s: float  # from the call to the first token
    decode_s: float  # from the first token to the last
    total_s: float

    @property
    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else math.nan


def timed_generation(engine: Any, prompt: str, new_tokens: int = NEW_TOKENS) -> Run:
    """Generate exactly `new_tokens` greedily (min_new_tokens = max_new_tokens), timed."""
    from enclave.engine import GenerationParams

    params = GenerationParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    start = time.perf_counter()
    first = last = start
    tokens = 0
    for _step in engine.generate(prompt, params):
        last = time.perf_counter()
        if tokens == 0:
            first = last
        tokens += 1
    if tokens != new_tokens:
        raise BenchError(f"{engine.name} generated {tokens} tokens, not {new_tokens}")
    return Run(tokens, first - start, last - first, last - start)


def measure_backend(engine: Any, prompt: str, runs: int, label: str) -> list[Run]:
    say(f"{label}: warm-up")
    timed_generation(engine, prompt, 4)
    out = []
    for i in range(runs):
        run = timed_generation(engine, prompt)
        say(
            f"{label}: run {i + 1}/{runs}: {run.decode_tok_s:.1f} tok/s decode, "
            f"ttft {run.ttft_s * 1000:.0f} ms, {run.total_s:.2f} s"
        )
        out.append(run)
    return out


def section_reference(backends: Backends, prompt: str, runs: int) -> dict[str, Any]:
    """The sample's way: the reference backend, one request at a time, back to back."""
    say("reference: loading the fp32 reference backend (bloom-560m shape)")
    engine = backends.load("reference", "full")
    done = measure_backend(engine, prompt, runs, "reference")
    _close(engine)
    del engine  # frees the fp32 weights (2.2 GB) before the next section
    gc.collect()
    return {
        "reference_b1_tok_s": statistics.median(r.decode_tok_s for r in done),
        "reference_serial_tok_s": sum(r.tokens for r in done) / sum(r.total_s for r in done),
    }


def section_fast(backends: Backends, prompt: str, runs: int) -> dict[str, Any]:
    say(f"fast: loading the {backends.fast_label} backend (bloom-560m shape)")
    engine = backends.load("fast", "full")
    done = measure_backend(engine, prompt, runs, "fast")
    # The engine alone with 8 requests at once (its batching, without the stack around it).
    concurrent = concurrent_generations(engine, prompt, CLIENTS)
    say(f"fast: {CLIENTS} concurrent requests in this process: {concurrent:.1f} tok/s")
    _close(engine)
    return {
        "fast_b1_tok_s": statistics.median(r.decode_tok_s for r in done),
        "fast_ttft_ms": statistics.median(r.ttft_s for r in done) * 1000,
        "fast_8_concurrent_tok_s": concurrent,
    }


def concurrent_generations(engine: Any, prompt: str, n: int) -> float:
    """Aggregate tok/s of `n` requests of exactly NEW_TOKENS submitted together."""
    runs: list[Run] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            runs.append(timed_generation(engine, prompt))
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S)
    wall = time.perf_counter() - start
    if errors or len(runs) != n:
        raise BenchError(f"concurrent generations failed: {errors[:1] or 'timed out'}")
    return sum(run.tokens for run in runs) / wall


def _close(engine: Any) -> None:
    """Stop the engine's inference thread (which holds its model); the caller drops it."""
    close = getattr(engine, "close", None)
    if callable(close):
        close()


# ---- agreement ---------------------------------------------------------------------------------


class LogitsUnavailable(Exception):
    """The engine offers no way to read its logits for a token sequence."""


def engine_logits(engine: Any, ids: Sequence[int]) -> Any:
    """The logits (positions x vocabulary, float32) the engine computes for `ids`, teacher-forced.

    Uses the engine's own `logits(ids)` when it has one, else its transformers model (the
    reference), else enclave.fast_engine.teacher_forced_logits on its BloomForward (the fast one).
    """
    import torch

    ids = list(ids)
    method = getattr(engine, "logits", None)
    if callable(method):
        return torch.as_tensor(method(ids)).float().reshape(len(ids), -1)
    model = getattr(engine, "model", None)
    if isinstance(model, torch.nn.Module):
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].float()
    # The fast engine: ScheduledEngine -> its scheduler -> the batch model -> BloomForward.
    holder = getattr(getattr(engine, "scheduler", None), "model", None)
    forward = getattr(holder, "forward", None)
    if type(forward).__name__ == "BloomForward":
        from enclave.fast_engine import teacher_forced_logits

        with torch.inference_mode():
            return teacher_forced_logits(forward, ids).float().reshape(len(ids), -1)
    raise LogitsUnavailable(f"{type(engine).__name__} exposes neither logits() nor a model")


def rel_logit_error(ref_logits: Any, fast_logits: Any) -> float:
    """||fast - ref|| / ||ref|| (Frobenius, over all positions given)."""
    import torch

    return float(torch.linalg.norm(fast_logits - ref_logits) / torch.linalg.norm(ref_logits))


def agreement(ref_logits: Any, fast_logits: Any) -> tuple[int, int, float]:
    """(positions whose argmax agrees, positions, summed KL(ref || fast)) for one sequence."""
    import torch

    ref_log = torch.log_softmax(ref_logits.double(), dim=-1)
    fast_log = torch.log_softmax(fast_logits.double(), dim=-1)
    kl = (ref_log.exp() * (ref_log - fast_log)).sum(dim=-1)
    same = int((ref_logits.argmax(dim=-1) == fast_logits.argmax(dim=-1)).sum())
    return same, ref_logits.shape[0], float(kl.sum())


def section_accuracy(backends: Backends, prompt: str) -> dict[str, Any]:
    from emulator.tiny_model import load_faq
    from protocol.prompt import format_turn

    out: dict[str, Any] = {}
    say(f"accuracy: full-size logits, reference vs {backends.fast_label}")
    ref = backends.load("reference", "full")
    ids = ref.tokenizer(prompt).input_ids
    # The prompt and the reference's own greedy continuation: a few dozen positions.
    cont = [step.token_id for step in ref.generate(prompt, _greedy(16))]
    seq = (ids + cont)[:-1]
    ref_logits = engine_logits(ref, seq)
    _close(ref)
    del ref
    gc.collect()
    fast = backends.load("fast", "full")
    try:
        out["rel_logit_error"] = rel_logit_error(ref_logits, engine_logits(fast, seq))
        error = out["rel_logit_error"]
        say(f"accuracy: relative logit error {error:.3e} over {len(seq)} positions")
    except LogitsUnavailable as exc:
        say(f"accuracy: cannot compare full-size logits: {exc}")
    _close(fast)
    del ref_logits

    say("accuracy: teacher-forced agreement on the trained tiny model over the FAQ text")
    ref = backends.load("reference", "tiny")
    fast = backends.load("fast", "tiny")
    same = total = 0
    kl_sum = 0.0
    try:
        for question, answer in load_faq():
            tokens = ref.tokenizer(format_turn(question, answer)).input_ids + [ref.eos_token_id]
            s, n, kl = agreement(engine_logits(ref, tokens), engine_logits(fast, tokens))
            same, total, kl_sum = same + s, total + n, kl_sum + kl
        out["top1_agreement"] = same / total
        out["mean_kl"] = kl_sum / total
        say(f"accuracy: top-1 {same}/{total}, mean KL {out['mean_kl']:.3e}")
    except LogitsUnavailable as exc:
        say(f"accuracy: cannot compare tiny-model logits: {exc}")
    _close(fast)
    _close(ref)
    out["_agreement_positions"] = total
    return out


def _greedy(n: int) -> Any:
    from enclave.engine import GenerationParams

    return GenerationParams(max_new_tokens=n, min_new_tokens=n)


# ---- the local stack ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningStack:
    paths: Any  # emulator.stack.StatePaths
    proxy_url: str
    enclave_pid: int
    served: dict[str, Any]  # the engine the enclave loaded, its batch and queue limits


@contextlib.contextmanager
def local_stack(model_dir: Path, log_copy: Path) -> Iterator[RunningStack]:
    """The whole local stack (emulator/stack.py's bring_up, as `nitro-local up` runs it): KMS
    emulator, NSM emulator, enclave server on a unix socket, gunicorn TLS proxy, serving
    `model_dir` with the measured configuration's default engine. Stopped and removed on exit;
    on a failure its logs (ids, sizes and timings, never content) are copied to `log_copy`."""
    from emulator import stack

    root = Path(tempfile.mkdtemp(prefix="nitro-bench-"))
    paths = stack.StatePaths(root)
    try:
        # A request queued behind seven others on a slow, shared machine is measured, not
        # timed out: the proxy waits up to RELAY_TIMEOUT_S between frames (default 120 s).
        with _environ(PARENT_PROXY_RELAY_TIMEOUT=str(RELAY_TIMEOUT_S)):
            endpoints = stack.bring_up(
                paths,
                model_dir=model_dir,
                progress=lambda line: say(f"stack: {line}"),
                ready_timeout=STACK_READY_TIMEOUT_S,
            )
        pid = stack.component_pid(paths, "enclave")
        if pid is None:
            raise BenchError("the enclave server is not running")
        config = json.loads(paths.enclave_config.read_text())
        served = {
            "engine": _loaded_engine(paths.log("enclave")),
            **{k: config[k] for k in ("max_batch", "max_queue") if k in config},
        }
        say(f"stack: up (enclave pid {pid}, {served})")
        yield RunningStack(paths, endpoints.proxy_url, pid, served)
    except BaseException as exc:
        if paths.logs.is_dir():
            shutil.rmtree(log_copy, ignore_errors=True)
            shutil.copytree(paths.logs, log_copy)
            say(f"stack: its logs are copied to {log_copy}")
        if isinstance(exc, stack.StackError):
            raise BenchError(f"local stack: {exc} (see {log_copy})") from exc
        raise
    finally:
        stack.stop_all(paths)
        shutil.rmtree(root, ignore_errors=True)


def _int8_kernel() -> str:
    """The fast engine's int8 kernel in this environment: avx2 (ours) or fbgemm."""
    from enclave.fast_engine import INT8_KERNEL

    return INT8_KERNEL


def _loaded_engine(log: Path) -> str | None:
    """The engine the enclave logged as loaded (its `model_loaded` event)."""
    from emulator.stack import log_events

    loaded = log_events(log, "model_loaded")
    return str(loaded[-1].get("model")) if loaded else None


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def peak_rss_mib(pid: int) -> float:
    """VmHWM (the peak resident set) of a live process, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    raise BenchError(f"no VmHWM for pid {pid}")


def _client(running: RunningStack) -> Any:
    from chatbot.client import SecureChatClient
    from chatbot.profile import load_profile

    profile = load_profile(running.paths.root)
    settings = dataclasses.replace(profile.settings, timeout_s=CLIENT_TIMEOUT_S)
    return SecureChatClient.from_settings(settings, profile.credentials)


def _ask_params(conversation: Any, new_tokens: int) -> dict[str, Any]:
    """64 new tokens; exactly 64 when the client can ask for min_new_tokens."""
    import inspect

    params: dict[str, Any] = {"max_new_tokens": new_tokens}
    if "min_new_tokens" in inspect.signature(conversation.ask).parameters:
        params["min_new_tokens"] = new_tokens
    return params


def _fresh_turn(conversation: Any, question: str, new_tokens: int) -> Any:
    # The same 32-token prompt each turn: the history would grow it. The data key (and the
    # enclave's cached copy of it) stays: the conversation keeps its session.
    conversation.history.clear()
    return conversation.ask(question, **_ask_params(conversation, new_tokens))


def concurrent_clients(
    running: RunningStack, question: str, clients: int, turns: int
) -> dict[str, Any]:
    """`clients` threads, one SecureChatClient and conversation each: a warm-up turn, then
    `turns` 64-token turns started together. Aggregate tokens over wall time."""
    barrier = threading.Barrier(clients + 1, timeout=CLIENT_TIMEOUT_S * 2)
    warm_up = threading.Lock()  # one at a time: a warm-up, not a thundering herd
    tokens: list[int] = []
    errors: list[str] = []
    ends: list[float] = []
    lock = threading.Lock()

    def client_thread() -> None:
        try:
            with _client(running) as client:
                conversation = client.conversation()
                with warm_up:
                    _fresh_turn(conversation, question, 4)  # the key fetched and cached
                barrier.wait()
                for _ in range(turns):
                    answer = _fresh_turn(conversation, question, NEW_TOKENS)
                    with lock:
                        tokens.append(answer.completion_tokens)
                with lock:
                    ends.append(time.perf_counter())
        except Exception as exc:  # reported, and the barrier broken so nobody waits forever
            with lock:
                errors.append(f"{type(exc).__name__}: {getattr(exc, 'code', exc)}")
            barrier.abort()

    threads = [threading.Thread(target=client_thread, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT_S * (turns + 1))
    if errors or len(ends) != clients:
        raise BenchError(f"clients failed: {errors or 'timed out'}")
    wall = max(ends) - start
    return {
        "stack_8_clients_tok_s": sum(tokens) / wall,
        "_answers": len(tokens),
        "_tokens_min": min(tokens),
        "_tokens_total": sum(tokens),
        "_wall_s": wall,
    }


class EngineWorker:
    """The fast engine alone, in a fresh process started like the enclave server: the same
    interpreter, environment (emulator.stack's) and torch thread settings, loaded by
    `load_engine` with the enclave configuration's limits. The baseline of the stack's added
    latency: the bench's own process has run other models and threads, which would change it.

    One request at a time: a JSON line on its stdin; it answers the engine's own wall time for it.
    """

    def __init__(self, model_dir: Path, enclave_config: Path, log: Path) -> None:
        from emulator import stack

        self._log = log
        argv = [sys.executable, str(Path(__file__).resolve()), "--engine-worker", str(model_dir)]
        with open(log, "ab") as err:
            self._proc = subprocess.Popen(
                [*argv, "--engine-config", str(enclave_config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=stack._child_env(),
                cwd=_ROOT,
                text=True,
            )
        self._reply(STACK_READY_TIMEOUT_S)  # {"ready": true} once loaded

    def generate(self, prompt: str, new_tokens: int, min_new_tokens: int) -> tuple[float, int]:
        """(seconds the engine took, tokens it generated) for one request."""
        assert self._proc.stdin is not None
        request = {"prompt": prompt, "max_new_tokens": new_tokens, "min_new_tokens": min_new_tokens}
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        reply = self._reply(CLIENT_TIMEOUT_S)
        return float(reply["seconds"]), int(reply["tokens"])

    def _reply(self, timeout: float) -> dict[str, Any]:
        import select

        assert self._proc.stdout is not None
        readable, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if readable else ""
        if not line:
            self.close()
            tail = self._log.read_text(errors="replace")[-400:] if self._log.exists() else ""
            raise BenchError(f"the engine-alone process gave no answer: {tail.strip()}")
        return json.loads(line)

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # end of input: it closes its engine and exits
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)


def engine_worker(model_dir: Path, enclave_config: Path) -> int:
    """--engine-worker: load the engine as enclave/main.py does, then time requests from stdin."""
    from enclave.config import EnclaveConfig
    from enclave.engine import GenerationParams, load_engine

    config = EnclaveConfig.load(enclave_config)
    engine = load_engine(
        model_dir,
        config.engine,
        max_prompt_tokens=config.max_prompt_tokens,
        max_batch=config.max_batch,
        max_queue=config.max_queue,
    )
    print(json.dumps({"ready": True}), flush=True)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            params = GenerationParams(
                max_new_tokens=int(request["max_new_tokens"]),
                min_new_tokens=int(request["min_new_tokens"]),
            )
            start = time.perf_counter()
            tokens = sum(1 for _step in engine.generate(str(request["prompt"]), params))
            seconds = time.perf_counter() - start
            print(json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)
    finally:
        _close(engine)
    return 0


def paired_latencies(
    running: RunningStack, worker: EngineWorker, question: str, prompt: str, requests: int
) -> tuple[list[float], list[float]]:
    """Wall times of `requests` one-at-a-time turns through the stack (warm key), as the client
    sees them, and of the same request to the engine alone (its own time, in its own process),
    alternating which goes first so that both see the same machine."""
    out_stack: list[float] = []
    out_engine: list[float] = []
    lengths = set()
    with _client(running) as client:
        conversation = client.conversation()
        params = _ask_params(conversation, NEW_TOKENS)
        minimum = params.get("min_new_tokens", 0)

        def through_stack() -> None:
            start = time.perf_counter()
            answer = _fresh_turn(conversation, question, NEW_TOKENS)
            out_stack.append(time.perf_counter() - start)
            lengths.add(answer.completion_tokens)

        def engine_alone() -> None:
            seconds, tokens = worker.generate(prompt, NEW_TOKENS, minimum)
            out_engine.append(seconds)
            lengths.add(tokens)

        # Warm-up: the key fetched and cached, both engines past their first request.
        _fresh_turn(conversation, question, NEW_TOKENS)
        worker.generate(prompt, NEW_TOKENS, minimum)
        for i in range(requests):
            pair = (through_stack, engine_alone)
            for measure in pair if i % 2 == 0 else pair[::-1]:
                measure()
    if lengths != {NEW_TOKENS}:
        # Without min_new_tokens on the wire the model may end an answer early.
        say(f"overhead: answers had {sorted(lengths)} tokens (stack and engine alone alike)")
    return out_stack, out_engine


def overhead_pct(stack_times: Sequence[float], engine_times: Sequence[float]) -> float:
    """(median through the stack - median engine alone) / median through the stack, in %."""
    through, alone = statistics.median(stack_times), statistics.median(engine_times)
    return (through - alone) / through * 100


def measure_overhead(
    running: RunningStack, model_dir: Path, question: str, prompt: str, n: int, log: Path
) -> dict[str, Any]:
    say("overhead: starting the engine alone in a process of its own")
    worker = EngineWorker(model_dir, running.paths.enclave_config, log)
    try:
        say(f"overhead: {n} requests through the stack and {n} to the engine alone, alternating")
        through, alone = paired_latencies(running, worker, question, prompt, n)
    finally:
        worker.close()
    say(
        f"overhead: median {statistics.median(through) * 1000:.0f} ms through the stack, "
        f"{statistics.median(alone) * 1000:.0f} ms for the engine alone"
    )
    return {
        "stack_overhead_pct": overhead_pct(through, alone),
        "_stack_median_ms": statistics.median(through) * 1000,
        "_engine_median_ms": statistics.median(alone) * 1000,
        "_stack_ms": [round(t * 1000, 1) for t in through],
        "_engine_ms": [round(t * 1000, 1) for t in alone],
        "_requests": n,
        "_baseline": "engine alone in a fresh process, the enclave's configuration",
    }


def section_stack(
    backends: Backends,
    sections: Sequence[str],
    question: str,
    prompt: str,
    *,
    turns: int,
    overhead_model: str,
    overhead_requests: int,
    log_copy: Path,
) -> tuple[dict[str, Any], dict[str, Any]]:
    out: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    with_full = "stack" in sections or ("overhead" in sections and overhead_model == "full")
    if with_full:
        say(f"stack: bringing up the local stack with the {backends.fast_label} backend")
        with local_stack(backends.stack_model_dir("full"), log_copy) as running:
            meta["stack_served"] = running.served
            if "stack" in sections:
                say(f"stack: {CLIENTS} clients, warm-up turn then {turns} turn(s) each")
                done = concurrent_clients(running, question, CLIENTS, turns)
                out["stack_8_clients_tok_s"] = done["stack_8_clients_tok_s"]
                meta["stack_8_clients"] = {k[1:]: v for k, v in done.items() if k[0] == "_"}
                say(
                    f"stack: {done['_tokens_total']} tokens in {done['_wall_s']:.1f} s = "
                    f"{done['stack_8_clients_tok_s']:.1f} tok/s"
                )
            if "overhead" in sections and overhead_model == "full":
                got = measure_overhead(
                    running,
                    backends.stack_model_dir("full"),
                    question,
                    prompt,
                    overhead_requests,
                    log_copy.parent / "engine-alone.log",
                )
                out["stack_overhead_pct"] = got.pop("stack_overhead_pct")
                meta["overhead"] = {k[1:]: v for k, v in got.items()}
            out["enclave_peak_rss_mb"] = peak_rss_mib(running.enclave_pid)
            say(f"stack: enclave peak RSS {out['enclave_peak_rss_mb']:.0f} MiB")
    if "overhead" in sections and overhead_model == "tiny":
        say("overhead: bringing up the local stack with the tiny model")
        with local_stack(backends.stack_model_dir("tiny"), log_copy) as running:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(backends.tiny_model, local_files_only=True)
            tiny_question, tiny_prompt, _n = make_question(tokenizer)
            got = measure_overhead(
                running,
                backends.stack_model_dir("tiny"),
                tiny_question,
                tiny_prompt,
                overhead_requests,
                log_copy.parent / "engine-alone.log",
            )
            out["stack_overhead_pct"] = got.pop("stack_overhead_pct")
            meta["overhead"] = {k[1:]: v for k, v in got.items()}
    if "overhead" in sections:
        full_size = overhead_model == "full" and not backends.harness_check
        meta["overhead_model"] = "full-size (bloom-560m shape)" if full_size else "trained tiny"

    return out, meta


# ---- the run -----------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a rough check)")
    parser.add_argument(
        "--only", metavar="SECTION[,SECTION]", help=f"run only these: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument(
        "--cache", type=Path, default=_ROOT / ".bench-cache", help="where built models are kept"
    )
    parser.add_argument(
        "--harness-check",
        action="store_true",
        help="run every section on the tiny model (checks the harness; measures no target)",
    )
    # Internal: the engine-alone process of the overhead measurement (EngineWorker).
    parser.add_argument("--engine-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine-config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--overhead-model",
        choices=("full", "tiny", "auto"),
        default="auto",
        help="model for the stack's added latency (auto: full with the fast backend, else tiny)",
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    # transformers' deprecation notices about its own cache API are not the bench's business.
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)

    sections = parse_sections(args.only)
    available = fast_backend_available()
    overhead_model = args.overhead_model
    if overhead_model == "auto" or args.harness_check:
        overhead_model = "full" if available or args.harness_check else "tiny"
    runs = 2 if args.quick else 3
    turns = 1 if args.quick or not available else 2
    overhead_requests = 20
    other_cpu = OtherCpu()
    say(f"sections: {', '.join(sections)}{' (quick)' if args.quick else ''}")
    backends = prepare(args.cache, sections, overhead_model, harness_check=args.harness_check)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backends.full_model, local_files_only=True)
    question, prompt, prompt_tokens = make_question(tokenizer)
    measured: dict[str, Any] = {}
    meta: dict[str, Any] = {
        "fast_backend": backends.fast_label,
        "int8_kernel": _int8_kernel(),
        "fast_is_stand_in": not backends.fast_available,
        "prompt_tokens": prompt_tokens,
        "new_tokens": NEW_TOKENS,
        "sections": list(sections),
        "quick": bool(args.quick),
        "cpus": os.cpu_count(),
        "load_before": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "tiny (harness check)" if args.harness_check else "bloom-560m shape, random",
        "harness_check": bool(args.harness_check),
        "weight_bytes": {role: backends.weight_bytes(role) for role in ("reference", "fast")},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {},
    }
    timings = meta["seconds"]

    def timed(name: str, action: Callable[[], dict[str, Any]]) -> None:
        start = time.monotonic()
        try:
            got = action()
        except Exception as exc:  # one failed section must not lose the others' numbers
            detail = str(exc) if isinstance(exc, BenchError) else f"{type(exc).__name__}: {exc}"
            say(f"{name}: error: {detail}")
            meta.setdefault("errors", {})[name] = detail
            got = {}
        measured.update({k: v for k, v in got.items() if not k.startswith("_")})
        extras = {k[1:]: v for k, v in got.items() if k.startswith("_")}
        if extras:
            meta[name] = extras
        timings[name] = round(time.monotonic() - start, 1)

    if "reference" in sections:
        timed("reference", lambda: section_reference(backends, prompt, runs))
    if "fast" in sections:
        timed("fast", lambda: section_fast(backends, prompt, runs))
    if "accuracy" in sections:
        timed("accuracy", lambda: section_accuracy(backends, prompt))
    if "stack" in sections or "overhead" in sections:

        def stack_part() -> dict[str, Any]:
            got, extra = section_stack(
                backends,
                sections,
                question,
                prompt,
                turns=turns,
                overhead_model=overhead_model,
                overhead_requests=overhead_requests,
                log_copy=args.cache / "last-stack-logs",
            )
            meta.update(extra)
            return got

        timed("stack", stack_part)
    meta["load_after"] = round(os.getloadavg()[0], 2)
    meta["other_cpu_share"] = round(other_cpu.share(), 3)
    meta["total_seconds"] = round(time.monotonic() - _STARTED, 1)
    return results_document(measured, meta)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.engine_worker is not None:
        if args.engine_config is None:
            print("bench: --engine-worker needs --engine-config", file=sys.stderr)
            return 2
        return engine_worker(args.engine_worker, args.engine_config)
    try:
        parse_sections(args.only)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    try:
        doc = run(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(format_table(doc, doc["targets"]))
    say(f"wrote {args.out}")
    # A missed target is a measurement (exit 0); a section that could not run is an error.
    return 1 if doc["meta"].get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
