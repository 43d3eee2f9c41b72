"""Tests for enclave/engine.py on the tiny model, and on a scripted stand-in model for decoding."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from emulator.tiny_model import load_faq
from enclave.engine import GenerationParams, Step, TransformersEngine, check_params
from protocol.errors import ErrorCode, NitroError
from protocol.prompt import format_prompt


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TransformersEngine:
    return TransformersEngine.load(tiny_model_dir, max_prompt_tokens=64)


def _faq(i: int) -> tuple[str, str]:
    return load_faq()[i]


def _run(engine: TransformersEngine, prompt: str, **params: Any) -> list[Step]:
    return list(engine.generate(prompt, GenerationParams(**params)))


def _text(steps: list[Step]) -> str:
    return "".join(step.text for step in steps)


def _ids(steps: list[Step], eos: int) -> list[int]:
    return [step.token_id for step in steps if step.token_id != eos]


def test_greedy_answers_only_the_new_text(engine: TransformersEngine) -> None:
    question, answer = _faq(0)
    prompt = format_prompt(question)
    steps = _run(engine, prompt, max_new_tokens=100)
    text = _text(steps)
    # The prompt is not echoed: the stream is an answer alone, then eos.
    assert "Question" not in text and question not in text
    assert len(set(text.lower().split()) & set(answer.lower().split())) >= 8
    assert steps[-1].finish_reason == "stop"
    assert steps[-1].token_id == engine.eos_token_id
    assert steps[-1].text == ""
    assert all(step.finish_reason is None for step in steps[:-1])


def test_generation_leaves_no_inference_mode_behind(engine: TransformersEngine) -> None:
    stream = engine.generate(format_prompt(_faq(0)[0]), GenerationParams(max_new_tokens=3))
    next(stream)
    assert not torch.is_inference_mode_enabled()  # while suspended between steps
    stream.close()


def test_greedy_is_deterministic(engine: TransformersEngine) -> None:
    prompt = format_prompt(_faq(10)[0])
    first = _run(engine, prompt, max_new_tokens=40)
    assert _run(engine, prompt, max_new_tokens=40) == first


def test_min_new_tokens_forces_exactly_max_new_tokens(engine: TransformersEngine) -> None:
    # Greedy would stop at eos well before 90 tokens; masking eos must carry it to the cap.
    steps = _run(engine, format_prompt(_faq(3)[0]), max_new_tokens=90, min_new_tokens=90)
    assert len(steps) == 90
    assert steps[-1].finish_reason == "length"
    assert engine.eos_token_id not in [step.token_id for step in steps]


@pytest.mark.parametrize("max_new_tokens", [1, 5])
def test_max_new_tokens_is_a_count_of_new_tokens(
    engine: TransformersEngine, max_new_tokens: int
) -> None:
    steps = _run(engine, format_prompt(_faq(3)[0]), max_new_tokens=max_new_tokens)
    assert len(steps) == max_new_tokens
    assert [s.finish_reason for s in steps][-1] == "length"


def test_step_texts_concatenate_to_the_decoded_ids(engine: TransformersEngine) -> None:
    # High temperature wanders into rare byte tokens, which is where incremental decoding breaks.
    for seed in range(6):
        steps = _run(
            engine, "Question: What?\nAnswer:", max_new_tokens=60, temperature=2.0, seed=seed
        )
        ids = _ids(steps, engine.eos_token_id)
        assert _text(steps) == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_seeded_sampling_is_deterministic_and_seed_dependent(engine: TransformersEngine) -> None:
    prompt = format_prompt("What is a pension?")
    runs = {
        seed: _run(engine, prompt, max_new_tokens=30, temperature=1.5, top_p=0.95, seed=seed)
        for seed in (1, 2, 3)
    }
    assert _run(engine, prompt, max_new_tokens=30, temperature=1.5, top_p=0.95, seed=1) == runs[1]
    assert len({tuple(s.token_id for s in steps) for steps in runs.values()}) > 1


def test_tiny_top_p_keeps_only_the_most_likely_token(engine: TransformersEngine) -> None:
    prompt = format_prompt(_faq(20)[0])
    greedy = _run(engine, prompt, max_new_tokens=30)
    nucleus = _run(engine, prompt, max_new_tokens=30, temperature=1.0, top_p=1e-6, seed=5)
    assert [s.token_id for s in nucleus] == [s.token_id for s in greedy]


def test_tiny_temperature_is_greedy_not_nan(engine: TransformersEngine) -> None:
    prompt = format_prompt(_faq(30)[0])
    greedy = _run(engine, prompt, max_new_tokens=20, min_new_tokens=20)
    cold = _run(engine, prompt, max_new_tokens=20, min_new_tokens=20, temperature=1e-30, seed=1)
    assert [s.token_id for s in cold] == [s.token_id for s in greedy]


def test_unseeded_sampling_differs_between_requests(engine: TransformersEngine) -> None:
    prompt = "Question: What?\nAnswer:"
    runs = {
        tuple(s.token_id for s in _run(engine, prompt, max_new_tokens=20, temperature=2.0))
        for _ in range(3)
    }
    assert len(runs) > 1


def test_should_stop_cancels_between_tokens(engine: TransformersEngine) -> None:
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) >= 3

    params = GenerationParams(max_new_tokens=50, min_new_tokens=50)
    steps = list(engine.generate(format_prompt(_faq(5)[0]), params, should_stop))
    assert len(steps) == 3
    assert steps[-1].finish_reason == "cancelled"


def test_prompt_over_the_token_limit_is_refused(engine: TransformersEngine) -> None:
    long_prompt = format_prompt(" ".join(q for q, _ in load_faq()[:10]))
    assert engine.count_tokens(long_prompt) > engine.max_prompt_tokens
    with pytest.raises(NitroError) as err:
        engine.generate(long_prompt, GenerationParams())
    assert err.value.code is ErrorCode.PROMPT_TOO_LONG


def test_prompt_at_the_token_limit_is_accepted(tiny_model_dir: Path) -> None:
    prompt = format_prompt(_faq(0)[0])
    limit = TransformersEngine.load(tiny_model_dir).count_tokens(prompt)
    exact = TransformersEngine.load(tiny_model_dir, max_prompt_tokens=limit)
    assert len(_run(exact, prompt, max_new_tokens=2)) == 2
    short = TransformersEngine.load(tiny_model_dir, max_prompt_tokens=limit - 1)
    with pytest.raises(NitroError) as err:
        short.generate(prompt, GenerationParams())
    assert err.value.code is ErrorCode.PROMPT_TOO_LONG


def test_huge_prompt_is_refused_before_tokenizing(engine: TransformersEngine) -> None:
    with pytest.raises(NitroError) as err:
        engine.generate("x" * 10_000_000, GenerationParams())
    assert err.value.code is ErrorCode.PROMPT_TOO_LONG


@pytest.mark.parametrize(
    "params",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 513},
        {"max_new_tokens": True},
        {"max_new_tokens": 2.0},
        {"min_new_tokens": -1},
        {"min_new_tokens": 65},  # above max_new_tokens (64)
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"temperature": "1"},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": float("inf")},
        {"seed": -1},
        {"seed": 2**63},
        {"seed": "7"},
    ],
)
def test_bad_parameters_are_refused(engine: TransformersEngine, params: dict[str, Any]) -> None:
    with pytest.raises(NitroError) as err:
        engine.generate("Question: x\nAnswer:", GenerationParams(**params))
    assert err.value.code is ErrorCode.INVALID_PARAMETERS


def test_empty_prompt_is_refused(engine: TransformersEngine) -> None:
    with pytest.raises(NitroError) as err:
        engine.generate("", GenerationParams())
    assert err.value.code is ErrorCode.INVALID_PARAMETERS


def test_edge_parameters_are_accepted() -> None:
    check_params(GenerationParams(max_new_tokens=512, min_new_tokens=512, temperature=2.0))
    check_params(GenerationParams(max_new_tokens=1, temperature=0, top_p=1e-9, seed=2**63 - 1))


def test_the_reference_runs_one_request_at_a_time(tiny_model_dir: Path) -> None:
    single = TransformersEngine.load(tiny_model_dir, max_queue=1)
    prompt = format_prompt(_faq(0)[0])
    params = GenerationParams(max_new_tokens=5)
    try:
        streams = [single.generate(prompt, params) for _ in range(2)]
        assert [len(list(s)) for s in streams] == [5, 5]
        assert single.scheduler.stats.peak_batch == 1  # the sample's way: never batched
    finally:
        single.close()


def test_generations_from_threads_do_not_mix(engine: TransformersEngine) -> None:
    prompts = [format_prompt(_faq(i)[0]) for i in (1, 2)]
    expected = [_run(engine, p, max_new_tokens=20) for p in prompts]
    results: dict[int, list[Step]] = {}
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, _run(engine, prompts[i], max_new_tokens=20))
        )
        for i in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[0], results[1]] == expected


# ---- incremental decoding, on a stand-in model that emits a fixed script of tokens ----------


class _ScriptedModel:
    """Emits `script` token by token (then eos), checking the engine feeds back what it chose."""

    def __init__(self, script: list[int], vocab: int, eos: int) -> None:
        self.script, self.vocab = script, vocab
        self.config = SimpleNamespace(eos_token_id=eos)
        self.fed: list[int] = []

    def __call__(self, input_ids: torch.Tensor, use_cache: bool, past_key_values: Any = None):
        if past_key_values is not None:
            self.fed.append(int(input_ids[0, -1]))
        position = 0 if past_key_values is None else past_key_values + 1
        token = self.script[position] if position < len(self.script) else self.config.eos_token_id
        logits = torch.zeros((1, input_ids.shape[1], self.vocab))
        logits[0, -1, token] = 10.0
        return SimpleNamespace(logits=logits, past_key_values=position)


def _scripted(tiny_model_dir: Path, script_text: str) -> tuple[TransformersEngine, list[int]]:
    real = TransformersEngine.load(tiny_model_dir)
    script = real.tokenizer(script_text).input_ids
    model = _ScriptedModel(script, len(real.tokenizer), real.eos_token_id)
    return TransformersEngine(model, real.tokenizer), script


def test_multibyte_characters_are_held_back_until_complete(tiny_model_dir: Path) -> None:
    engine, script = _scripted(tiny_model_dir, "Fee: 5 € or é.")
    steps = _run(engine, "Question: x\nAnswer:", max_new_tokens=100)
    assert [s.token_id for s in steps] == [*script, engine.eos_token_id]
    assert _text(steps) == "Fee: 5 € or é."
    assert not any("\ufffd" in s.text for s in steps)
    assert "" in [s.text for s in steps[:-1]]  # a partial character produced no text yet
    assert engine.model.fed == script  # each chosen token was fed back, in order


def test_an_incomplete_character_at_the_end_is_flushed(tiny_model_dir: Path) -> None:
    engine, script = _scripted(tiny_model_dir, "ok €")
    cut = len(script) - 1  # stop one byte short of the euro sign
    steps = _run(engine, "Question: x\nAnswer:", max_new_tokens=cut)
    ids = [s.token_id for s in steps]
    assert _text(steps) == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert _text(steps).endswith("\ufffd")
    assert steps[-1].finish_reason == "length"


@pytest.mark.parametrize("text", ["Fee: 5 € or é, 日本語 and 🙂.", "  leading spaces\n\nand lines"])
def test_the_fast_engines_pieces_add_up_to_the_whole_decode(tiny_model_dir: Path, text: str):
    # ScheduledEngine decodes only the tokens since its last piece: the pieces must still be
    # exactly the decode of the whole answer, with no replacement character on the way.
    from enclave.engine import ScheduledEngine, _TokenizersCodec

    codec = _TokenizersCodec.load(tiny_model_dir)
    ids = codec.encode(text)

    def stream():
        for token in ids:
            yield token, None
        yield 0, "stop"

    engine = SimpleNamespace(codec=codec)
    steps = list(ScheduledEngine._steps(engine, stream(), None))
    assert "".join(step.text for step in steps) == codec.decode(ids) == text
    assert not any("\ufffd" in step.text for step in steps)
    assert [step.token_id for step in steps[:-1]] == ids
    assert steps[-1].finish_reason == "stop"
