"""Tests for enclave/fast_engine.py: the forward against transformers, int8 agreement, loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emulator.tiny_model import load_faq
from enclave.engine import GenerationParams, TransformersEngine, load_engine
from enclave.fast_engine import (
    PREPARED_FILE,
    PREPARED_FORMAT,
    BloomForward,
    BloomShape,
    PreparedWeightsError,
    Work,
    _Int8Linear,
    prepare_model,
    quantize_rows,
    teacher_forced_logits,
)
from protocol.prompt import format_prompt


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    from transformers import BloomForCausalLM

    return BloomForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def shape(tiny_model_dir: Path) -> BloomShape:
    return BloomShape.from_config(tiny_model_dir / "config.json")


@pytest.fixture(scope="module")
def fp32_forward(tiny_model_dir: Path, shape: BloomShape) -> BloomForward:
    state = {
        name.removeprefix("transformer."): value
        for name, value in load_file(tiny_model_dir / "model.safetensors").items()
    }
    return BloomForward.from_hf_state(shape, state)


@pytest.fixture(scope="module")
def int8_forward(tiny_model_dir: Path) -> BloomForward:
    return BloomForward.from_prepared(tiny_model_dir)


@pytest.fixture(scope="module")
def faq_ids(tiny_model_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    return [tokenizer.encode(f"{format_prompt(q)} {a}").ids for q, a in load_faq()[:40]]


def _reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(input_ids=torch.tensor([ids])).logits[0]


def test_fp32_forward_matches_transformers(hf_model, fp32_forward, faq_ids) -> None:
    ids = faq_ids[0]
    reference = _reference_logits(hf_model, ids)
    mine = teacher_forced_logits(fp32_forward, ids)
    assert torch.allclose(mine, reference, atol=1e-4, rtol=1e-4)
    # A prefill of 7 tokens and then decoding: the causal mask over a partly filled cache.
    cache = fp32_forward.new_cache(len(ids))
    with torch.inference_mode():
        (first,) = fp32_forward.step([Work(cache, ids[:7], True)])
        (second,) = fp32_forward.step([Work(cache, ids[7:12], True)])
    assert torch.allclose(first, reference[6], atol=1e-4, rtol=1e-4)
    assert torch.allclose(second, reference[11], atol=1e-4, rtol=1e-4)


def test_int8_agrees_with_the_reference_teacher_forced(hf_model, int8_forward, faq_ids) -> None:
    agree = total = 0
    errors = []
    for ids in faq_ids:
        reference = _reference_logits(hf_model, ids)
        mine = teacher_forced_logits(int8_forward, ids)
        agree += int((mine.argmax(-1) == reference.argmax(-1)).sum())
        total += len(ids)
        errors.append(float((mine - reference).norm() / reference.norm()))
    assert total > 1000
    assert agree / total >= 0.95
    assert max(errors) < 0.05


@pytest.mark.parametrize("slice_rows", [64, 256])  # the output layer's slices; one matrix
@pytest.mark.parametrize("rows", [1, 3, 9, 17])
def test_int8_rows_do_not_depend_on_their_batch_mates(rows: int, slice_rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn((256, 192), generator=generator)
    bias = torch.randn(256, generator=generator)
    layer = _Int8Linear.of(*quantize_rows(weight), bias, slice_rows)
    assert len(layer.packed) == 256 // slice_rows
    x = torch.randn((rows, 192), generator=generator) * torch.linspace(0.1, 30, rows)[:, None]
    together = layer(x, 2)  # the products on two threads, as a step runs them
    alone = torch.cat([layer(x[i : i + 1]) for i in range(rows)])
    assert torch.equal(together, alone)
    # And it is the product it claims to be (to int8 precision).
    exact = x @ weight.T
    assert float((together - layer.bias - exact).norm() / exact.norm()) < 0.02


def test_a_step_gives_the_threads_back(int8_forward, faq_ids) -> None:
    # A step runs its small operations on one thread and hands the threads to the products:
    # the process's setting is what it was afterwards, also when the step fails.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cache = int8_forward.new_cache(8)
        with torch.inference_mode():
            (logits,) = int8_forward.step([Work(cache, faq_ids[0][:8], True)])
        assert logits is not None and torch.isfinite(logits).all()
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="longer than its cache"):
            int8_forward.step([Work(cache, [1], True)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_prepared_file_is_safetensors_with_int8_weights(tiny_model_dir: Path) -> None:
    path = tiny_model_dir / PREPARED_FILE
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    with safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == PREPARED_FORMAT
        assert f.get_tensor("word_embeddings.qweight").dtype == torch.int8
        assert f.get_tensor("h.0.self_attention.query_key_value.qweight").dtype == torch.int8


def test_fast_backend_refuses_an_unprepared_directory(tiny_model_dir: Path, tmp_path) -> None:
    for item in tiny_model_dir.iterdir():
        if item.name != PREPARED_FILE:
            shutil.copyfile(item, tmp_path / item.name)
    with pytest.raises(PreparedWeightsError, match="save_model.py --quantize"):
        load_engine(tmp_path, "fast")
    prepare_model(tmp_path, tmp_path / "prepared")
    engine = load_engine(tmp_path / "prepared", "fast", max_batch=2)
    try:
        assert engine.name == "fast"
        assert not (tmp_path / "prepared" / "model.safetensors").exists()  # int8 alone suffices
    finally:
        engine.close()


def test_prepare_refuses_a_non_bloom_model(tiny_model_dir: Path, tmp_path) -> None:
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(PreparedWeightsError, match="not a BLOOM"):
        prepare_model(tmp_path / "m", tmp_path / "out")


def test_unknown_backend_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        load_engine(tiny_model_dir, "turbo")


def test_fast_engine_answers_like_the_reference(tiny_model_dir: Path) -> None:
    fast = load_engine(tiny_model_dir, "fast", max_prompt_tokens=64)
    reference = TransformersEngine.load(tiny_model_dir, max_prompt_tokens=64)
    try:
        same = 0
        for question, _answer in load_faq()[:6]:
            prompt = format_prompt(question)
            assert fast.count_tokens(prompt) == reference.count_tokens(prompt)
            params = GenerationParams(max_new_tokens=24)
            got = list(fast.generate(prompt, params))
            want = list(reference.generate(prompt, params))
            ids = [s.token_id for s in got if s.token_id != fast.eos_token_id]
            assert "".join(s.text for s in got) == reference.codec.decode(ids)
            same += [s.token_id for s in got] == [s.token_id for s in want]
        assert same >= 4  # int8 may turn a near tie, rarely
    finally:
        fast.close()
        reference.close()
