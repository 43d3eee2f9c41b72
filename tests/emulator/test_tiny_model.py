"""Tests for emulator/tiny_model.py: files, determinism, and that the trained model answers."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from emulator.tiny_model import build_tiny_model, load_faq, parse_faq
from protocol.prompt import format_prompt

# Words too common to show that an answer is about the question.
_STOPWORDS = set(
    "a an and are as at be by can for from if in is it its may of on or that the their this to "
    "you your yes no not with".split()
)


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOPWORDS}


def test_faq_is_a_list_of_question_answer_pairs() -> None:
    pairs = load_faq()
    assert 60 <= len(pairs) <= 100
    assert len({q for q, _ in pairs}) == len(pairs)  # no question twice
    assert all(q.endswith("?") and a for q, a in pairs)


def test_faq_text_uses_the_protocol_prompt_format() -> None:
    # The model only answers well if it was trained on what the engine is sent.
    question, answer = load_faq()[0]
    assert f"{format_prompt(question)} {answer}" == f"Question: {question}\nAnswer: {answer}"


def test_parse_faq_refuses_a_malformed_block() -> None:
    with pytest.raises(ValueError):
        parse_faq("Question: a?\nAnswer: b.\n\nQuestion: c?\nNo answer here.")


def test_steps_out_of_range_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_tiny_model(tmp_path, steps=0)


def test_build_writes_a_loadable_model_directory(tiny_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tiny_model_dir / name).is_file(), name


def test_tokenizer_has_bloom_special_tokens(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert 900 <= len(tok) <= 1000
    text = "Question: What is a 401(k) plan? é €\nAnswer:"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless, no cleanup


def test_same_seed_gives_identical_files_and_progress_hides_text(tmp_path: Path) -> None:
    lines: list[str] = []
    first = build_tiny_model(tmp_path / "a", steps=20, seed=7, progress=lines.append)
    second = build_tiny_model(tmp_path / "b", steps=20, seed=7)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        digest_a = hashlib.sha256((first / name).read_bytes()).hexdigest()
        digest_b = hashlib.sha256((second / name).read_bytes()).hexdigest()
        assert digest_a == digest_b, name
    assert any("step 20/20" in line for line in lines)
    faq_words = {w for q, a in load_faq() for w in _content_words(q + " " + a) if len(w) > 6}
    for line in lines:
        assert not faq_words & _content_words(line), "a progress line quoted the data set"


def test_trained_model_answers_questions_from_the_text(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BloomForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = BloomForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    pairs = load_faq()
    sample = pairs[::17]  # spread over the file: retirement, health, banking
    sensible = 0
    for question, reference in sample:
        ids = torch.tensor([tok(format_prompt(question)).input_ids])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=80, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        answer = tok.decode(new, skip_special_tokens=True)
        words = re.findall(r"[a-z]+", answer.lower())
        degenerate = any(words[i] == words[i + 1] == words[i + 2] for i in range(len(words) - 2))
        overlap = len(_content_words(answer) & _content_words(reference))
        ended = tok.eos_token_id in new
        sensible += ended and not degenerate and overlap >= 5
    assert sensible >= len(sample) - 1, f"{sensible}/{len(sample)} answers were sensible"
