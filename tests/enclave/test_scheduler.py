"""Tests for enclave/scheduler.py, driving the fast engine on the tiny model.

Batching must not change a greedy answer; a full queue answers `overloaded` and recovers;
cancellation (should_stop, or a closed stream) frees the slot and stops the generation.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from emulator.tiny_model import load_faq
from enclave.engine import GenerationParams, ScheduledEngine, load_engine
from protocol.errors import ErrorCode, NitroError
from protocol.prompt import format_prompt


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path):
    engine = load_engine(tiny_model_dir, "fast", max_prompt_tokens=128, max_batch=4)
    yield engine
    engine.close()


class _Gate:
    """Wraps the engine's real model so that a test decides when each step may run."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.eos_token_id, self.max_batch = inner.eos_token_id, inner.max_batch
        self.open = threading.Event()  # set: every step may run
        self.permits = threading.Semaphore(0)  # else one step per permit
        self.fail_next = False

    def new_sequence(self, capacity: int) -> Any:
        return self.inner.new_sequence(capacity)

    def step(self, work: Any) -> list[Any]:
        deadline = time.monotonic() + 30
        while not (self.open.is_set() or self.permits.acquire(timeout=0.01)):
            assert time.monotonic() < deadline, "step never allowed"
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected")
        return self.inner.step(work)


def _gated(engine: ScheduledEngine, *, max_batch: int, max_queue: int, **kw: Any):
    gate = _Gate(engine.scheduler.model)
    gated = ScheduledEngine(
        "fast",
        engine.codec,
        gate,
        max_prompt_tokens=128,
        max_batch=max_batch,
        max_queue=max_queue,
        **kw,
    )
    return gated, gate


def _prompt(i: int) -> str:
    return format_prompt(load_faq()[i][0])


def _ids(steps) -> list[int]:
    return [s.token_id for s in steps]


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_greedy_output_does_not_depend_on_batch_mates(engine: ScheduledEngine) -> None:
    params = GenerationParams(max_new_tokens=40, min_new_tokens=40)
    alone = _ids(engine.generate(_prompt(0), params))
    gated, gate = _gated(engine, max_batch=4, max_queue=8)
    try:
        target = gated.generate(_prompt(0), params)
        gate.permits.release(5)  # the prefill and 4 decode steps: 5 tokens, then it waits
        first = [next(target) for _ in range(5)]
        # Others join mid-way, with other prompts, lengths and sampling.
        mates = [
            gated.generate(_prompt(7), GenerationParams(max_new_tokens=9)),
            gated.generate(
                _prompt(12) + " and more words",
                GenerationParams(max_new_tokens=60, temperature=1.3, seed=4),
            ),
            gated.generate(_prompt(3), GenerationParams(max_new_tokens=25, min_new_tokens=25)),
        ]
        gate.open.set()
        rest = list(target)
        for mate in mates:
            assert list(mate)[-1].finish_reason in ("stop", "length")
        assert gated.scheduler.stats.peak_batch == 4  # all four decoded together
    finally:
        gate.open.set()
        gated.close()
    assert _ids(first + rest) == alone


def test_batched_sampling_is_reproducible_by_seed(engine: ScheduledEngine) -> None:
    params = GenerationParams(max_new_tokens=30, temperature=1.2, seed=11)
    alone = _ids(engine.generate(_prompt(5), params))
    streams = [engine.generate(_prompt(5), params) for _ in range(3)]
    assert [_ids(s) for s in streams] == [alone] * 3


def test_a_full_queue_is_overloaded_then_recovers(engine: ScheduledEngine) -> None:
    gated, gate = _gated(engine, max_batch=1, max_queue=1)
    params = GenerationParams(max_new_tokens=5)
    try:
        running = gated.generate(_prompt(1), params)
        _wait_for(lambda: gated.scheduler.queue_depth() == (1, 0))
        waiting = gated.generate(_prompt(2), params)
        assert gated.scheduler.full()
        with pytest.raises(NitroError) as err:
            gated.generate(_prompt(3), params)  # refused at once, not after a wait
        assert err.value.code is ErrorCode.OVERLOADED
        gate.open.set()
        assert len(list(running)) == 5 and len(list(waiting)) == 5
        assert not gated.scheduler.full()
        assert len(list(gated.generate(_prompt(3), params))) == 5
        assert gated.scheduler.stats.overloaded == 1
    finally:
        gate.open.set()
        gated.close()


def test_a_request_waiting_too_long_is_overloaded(engine: ScheduledEngine) -> None:
    gated, gate = _gated(engine, max_batch=1, max_queue=4, max_wait_s=0.2)
    try:
        running = gated.generate(_prompt(1), GenerationParams(max_new_tokens=3))
        late = gated.generate(_prompt(2), GenerationParams(max_new_tokens=3))
        time.sleep(0.4)
        gate.open.set()
        assert len(list(running)) == 3
        with pytest.raises(NitroError) as err:
            next(late)
        assert err.value.code is ErrorCode.OVERLOADED
    finally:
        gate.open.set()
        gated.close()


def test_should_stop_cancels_and_frees_the_slot(engine: ScheduledEngine) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    params = GenerationParams(max_new_tokens=400, min_new_tokens=400)
    steps = list(engine.generate(_prompt(4), params, should_stop))
    assert len(steps) == 3
    assert steps[-1].finish_reason == "cancelled"
    _wait_for(lambda: engine.scheduler.queue_depth() == (0, 0))
    produced = engine.scheduler.stats.tokens
    time.sleep(0.2)
    assert engine.scheduler.stats.tokens == produced  # nothing more generated for it


def test_closing_the_stream_stops_generation(engine: ScheduledEngine) -> None:
    gated, gate = _gated(engine, max_batch=2, max_queue=2)
    try:
        stream = gated.generate(
            _prompt(6), GenerationParams(max_new_tokens=500, min_new_tokens=500)
        )
        gate.open.set()
        for _ in range(4):
            next(stream)
        stream.close()  # the client went away
        _wait_for(lambda: gated.scheduler.queue_depth() == (0, 0))
        stopped_at = gated.scheduler.stats.tokens
        assert stopped_at < 500
        time.sleep(0.2)
        assert gated.scheduler.stats.tokens == stopped_at
        assert gated.scheduler.stats.cancelled == 1
        assert len(list(gated.generate(_prompt(6), GenerationParams(max_new_tokens=4)))) == 4
    finally:
        gate.open.set()
        gated.close()


def test_a_failing_step_errors_its_batch_and_serving_goes_on(engine: ScheduledEngine) -> None:
    gated, gate = _gated(engine, max_batch=2, max_queue=2)
    try:
        gate.fail_next = True
        broken = gated.generate(_prompt(8), GenerationParams(max_new_tokens=5))
        gate.open.set()
        with pytest.raises(NitroError) as err:
            list(broken)
        assert err.value.code is ErrorCode.INTERNAL_ERROR
        assert len(list(gated.generate(_prompt(8), GenerationParams(max_new_tokens=5)))) == 5
    finally:
        gate.open.set()
        gated.close()


def test_a_closed_engine_refuses_new_requests(tiny_model_dir: Path) -> None:
    closed = load_engine(tiny_model_dir, "fast", max_batch=1)
    closed.close()
    with pytest.raises(NitroError) as err:
        closed.generate(_prompt(0), GenerationParams(max_new_tokens=2))
    assert err.value.code is ErrorCode.NOT_READY
