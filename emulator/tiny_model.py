"""Builds the tiny BLOOM that tests and the local demo use in place of bloom-560m.

No machine of this project reaches a model hub, so we train a byte-level BPE tokenizer and a
2-layer BLOOM on the bundled FAQ text (emulator/data/benefits_faq.txt), seeded and deterministic.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from protocol.prompt import ANSWER_PREFIX, QUESTION_PREFIX, format_prompt

FAQ_RESOURCE = "benefits_faq.txt"
VOCAB_SIZE = 1000
# The same special tokens, in the same order, as bigscience/bloom-560m's tokenizer.
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]
HIDDEN_SIZE = 128
N_LAYER = 2
N_HEAD = 4
BATCH_SIZE = 12
# Batches are formed within groups of this many batches, sorted by length.
GROUP_BATCHES = 4
LEARNING_RATE = 3e-3
# Fixed so that a build gives the same bytes however many cores the machine has.
BUILD_THREADS = 2
MAX_STEPS = 5000


def load_faq() -> list[tuple[str, str]]:
    """The bundled (question, answer) pairs, in file order."""
    text = resources.files("emulator").joinpath("data").joinpath(FAQ_RESOURCE).read_text("utf-8")
    return parse_faq(text)


def parse_faq(text: str) -> list[tuple[str, str]]:
    """Blocks of "Question: ...\\nAnswer: ..." separated by blank lines."""
    pairs = []
    for block in text.strip().split("\n\n"):
        lines = block.strip().split("\n")
        answer_prefix = f"{ANSWER_PREFIX} "
        if (
            len(lines) != 2
            or not lines[0].startswith(QUESTION_PREFIX)
            or not lines[1].startswith(answer_prefix)
        ):
            raise ValueError(f"FAQ block {len(pairs) + 1} is not a Question/Answer pair")
        pairs.append((lines[0].removeprefix(QUESTION_PREFIX), lines[1].removeprefix(answer_prefix)))
    return pairs


def build_tiny_model(
    out_dir: Path,
    *,
    steps: int = 300,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Train the tokenizer and the model on the FAQ text and save both into `out_dir`.

    The same `steps` and `seed` give the same files. `progress` receives short status lines
    (step counts and losses, never text from the data set). Returns `out_dir`.
    """
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be 1-{MAX_STEPS}")
    report = progress or (lambda _line: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pairs = load_faq()

    tokenizer = _train_tokenizer(pairs)
    tokenizer.save_pretrained(out_dir)
    report(f"tokenizer: {len(tokenizer)} tokens")

    with _deterministic_torch(seed), _no_progress_bars():
        model = _train_model(tokenizer, pairs, steps=steps, seed=seed, report=report)
        model.save_pretrained(out_dir)
    _write_generation_config(out_dir)
    for path in out_dir.iterdir():
        # safetensors writes 0600; an image build copying the directory keeps that mode, and a
        # non-root server user could then not read the weights.
        path.chmod(0o644)
    report(f"saved to {out_dir} in {time.monotonic() - started:.1f} s")
    return out_dir


def _train_tokenizer(pairs: list[tuple[str, str]]):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_example_text(q, a) for q, a in pairs], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # Keeps decode(ids) a plain concatenation, which streaming decoders rely on.
        clean_up_tokenization_spaces=False,
    )


def _example_text(question: str, answer: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    # Exactly what the engine will be asked to continue, then the answer.
    return f"{format_prompt(question, history)} {answer}"


def _training_examples(
    tokenizer, pairs: list[tuple[str, str]], rng: random.Random
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of every pair alone, and after another pair's turn.

    The second copy teaches the model to answer the last question of a conversation, which is
    what the chatbot sends; without it, follow-up questions get answers to the earlier one.
    """
    examples = []
    for i, (question, answer) in enumerate(pairs):
        j = rng.randrange(len(pairs) - 1)
        earlier = pairs[j + (j >= i)]  # any pair but this one
        for history in ((), (earlier,)):
            ids = tokenizer(_example_text(question, answer, history)).input_ids
            # "Answer:" and the space opening the answer are separate pre-tokens, so the
            # prompt's tokens are a prefix of the example's.
            prompt_len = len(tokenizer(format_prompt(question, history)).input_ids)
            examples.append(([*ids, tokenizer.eos_token_id], prompt_len))
    return examples


def _train_model(tokenizer, pairs, *, steps: int, seed: int, report):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
    )
    model = BloomForCausalLM(config)
    model.train()
    rng = random.Random(seed)
    examples = _training_examples(tokenizer, pairs, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.05, 1 - step / steps)
    )
    batches: list[list[tuple[list[int], int]]] = []
    for step in range(1, steps + 1):
        if not batches:
            batches = _length_grouped_batches(examples, rng)
        input_ids, attention, labels = _pad(batches.pop(), tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            report(f"step {step}/{steps} loss {loss.item():.3f}")
    model.eval()
    return model


def _length_grouped_batches(examples: list, rng: random.Random) -> list:
    """One shuffled epoch in batches of similar lengths: padding costs as much as real tokens."""
    order = rng.sample(examples, len(examples))
    batches = []
    for start in range(0, len(order), BATCH_SIZE * GROUP_BATCHES):
        group = sorted(order[start : start + BATCH_SIZE * GROUP_BATCHES], key=lambda e: len(e[0]))
        batches += [group[i : i + BATCH_SIZE] for i in range(0, len(group), BATCH_SIZE)]
    rng.shuffle(batches)
    return batches


def _pad(rows: list[tuple[list[int], int]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (ids, prompt_len) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention[r, : len(ids)] = 1
        # Only the answer and its eos are scored: the model's capacity goes to answering, and
        # padding (on the right) is never scored.
        labels[r, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    return input_ids, attention, labels


def _write_generation_config(out_dir: Path) -> None:
    # Only the token ids: sampling choices belong to the engine's GenerationParams.
    config = json.loads((out_dir / "config.json").read_text("utf-8"))
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


@contextmanager
def _deterministic_torch(seed: int) -> Iterator[None]:
    """Seed torch and fix its thread count and algorithms, restoring them afterwards."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars would interleave with the caller's progress lines."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
