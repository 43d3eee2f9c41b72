"""The LLM engine inside the enclave: a prompt in, a stream of generated tokens out.

`Engine` is the interface the server uses; `load_engine` builds one of two backends, both run by
the continuous-batching scheduler (enclave/scheduler.py): `reference` (transformers, fp32, eager
attention, one request at a time: the original sample's configuration) and `fast` (int8 BLOOM
in plain torch, many requests per step: enclave/fast_engine.py).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from protocol.errors import ErrorCode, NitroError

MAX_NEW_TOKENS_CAP = 512
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
# Tokenizing costs time before any length check can run, so the text itself is capped first:
# no prompt of more characters than this fits any sane token limit.
MAX_PROMPT_CHARS_PER_TOKEN = 64
DEFAULT_BUSY_TIMEOUT = 300.0
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class GenerationParams:
    """How to generate; checked by `check_params` before any work."""

    max_new_tokens: int = 64  # new tokens, not prompt + new (the original sample's bug)
    min_new_tokens: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling only; None draws a fresh seed


@dataclass(frozen=True)
class Step:
    """One generated token and the text it completed."""

    text: str  # "" while a UTF-8 sequence is still incomplete, and for the eos token
    token_id: int
    finish_reason: str | None  # None until the last step: "stop", "length" or "cancelled"


class Engine(Protocol):
    name: str
    max_prompt_tokens: int

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Step]: ...


def check_params(params: GenerationParams) -> None:
    """Raise INVALID_PARAMETERS for any value out of its range (or of the wrong type)."""
    bad = ErrorCode.INVALID_PARAMETERS

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value: Any) -> bool:
        return (is_int(value) or isinstance(value, float)) and math.isfinite(value)

    if not is_int(params.max_new_tokens) or not 1 <= params.max_new_tokens <= MAX_NEW_TOKENS_CAP:
        raise NitroError(bad, f"max_new_tokens must be 1-{MAX_NEW_TOKENS_CAP}")
    if not is_int(params.min_new_tokens) or not 0 <= params.min_new_tokens:
        raise NitroError(bad, "min_new_tokens must be a non-negative integer")
    if params.min_new_tokens > params.max_new_tokens:
        raise NitroError(bad, "min_new_tokens must not exceed max_new_tokens")
    if not is_number(params.temperature) or not 0.0 <= params.temperature <= MAX_TEMPERATURE:
        raise NitroError(bad, f"temperature must be 0-{MAX_TEMPERATURE}")
    if not is_number(params.top_p) or not 0.0 < params.top_p <= 1.0:
        raise NitroError(bad, "top_p must be above 0 and at most 1")
    if params.seed is not None and (not is_int(params.seed) or not 0 <= params.seed <= MAX_SEED):
        raise NitroError(bad, "seed must be a non-negative 63-bit integer or null")


BACKENDS = ("reference", "fast")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 32
# Keys and values of every admitted sequence together: bounds the caches' memory (fp32 BLOOM-560m
# takes 192 KiB a token, so 8192 tokens are 1.5 GiB at most; docs/performance.md).
DEFAULT_MAX_BATCH_TOKENS = 8192


def load_engine(
    model_dir: Path,
    backend: str = "fast",
    *,
    max_prompt_tokens: int = 1024,
    threads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> ScheduledEngine:
    """The engine of `backend` over the model in `model_dir` (never a hub).

    `fast` needs the weights prepared ahead (`scripts/save_model.py --quantize`) and refuses a
    directory without them; `reference` reads transformers' own files. `threads` sets torch's
    intra-op thread count for the process.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}")
    _set_threads(threads)
    if backend == "reference":
        return TransformersEngine.load(
            model_dir, max_prompt_tokens=max_prompt_tokens, max_queue=max_queue
        )
    from enclave.fast_engine import BloomForward

    model_dir = Path(model_dir)
    codec = _TokenizersCodec.load(model_dir)
    forward = BloomForward.from_prepared(model_dir)
    return ScheduledEngine(
        "fast",
        codec,
        _FastBatchModel(forward, max_batch),
        max_prompt_tokens=max_prompt_tokens,
        max_batch=max_batch,
        max_queue=max_queue,
        max_batch_tokens=max_batch_tokens,
    )


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        torch.set_num_threads(threads)


class ScheduledEngine:
    """An Engine over a scheduler: checks and tokenizes in the caller's thread, decodes text there.

    The inference thread only runs the model and picks tokens; turning tokens into text and
    asking `should_stop` happen in the caller's (the connection's) thread.
    """

    def __init__(
        self,
        name: str,
        codec: Any,
        model: Any,
        *,
        max_prompt_tokens: int = 1024,
        max_batch: int = 1,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_wait_s: float = DEFAULT_BUSY_TIMEOUT,
        prefill_chunk: int | None = None,
    ) -> None:
        from enclave.scheduler import PREFILL_CHUNK_TOKENS, Scheduler

        if max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be at least 1")
        self.name = name
        self.codec = codec
        self.max_prompt_tokens = max_prompt_tokens
        self.eos_token_id: int = model.eos_token_id
        self.scheduler = Scheduler(
            model,
            max_batch=max_batch,
            max_queue=max_queue,
            # Any single request fits: a prompt at the cap and the longest answer.
            max_batch_tokens=max(max_batch_tokens, max_prompt_tokens + MAX_NEW_TOKENS_CAP),
            max_wait_s=max_wait_s,
            prefill_chunk=prefill_chunk or PREFILL_CHUNK_TOKENS,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.codec.encode(text))

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Step]:
        """Check the request and queue it now, then return an iterator of Steps, one per token.

        Raises INVALID_PARAMETERS, PROMPT_TOO_LONG or OVERLOADED (the queue is full) before any
        model work. The last Step has a finish_reason. `should_stop` is asked after each token;
        True ends the stream there with "cancelled", and so does closing the iterator: either
        way the request leaves the batch at the next step. The concatenated Step texts equal
        the tokenizer's decode of the generated ids (special tokens skipped, no space clean-up);
        the prompt is never repeated.
        """
        check_params(params)
        if not isinstance(prompt, str) or not prompt:
            raise NitroError(ErrorCode.INVALID_PARAMETERS, "prompt must be a non-empty string")
        if len(prompt) > self.max_prompt_tokens * MAX_PROMPT_CHARS_PER_TOKEN:
            raise NitroError(ErrorCode.PROMPT_TOO_LONG)
        prompt_ids = self.codec.encode(prompt)
        if not prompt_ids:
            raise NitroError(ErrorCode.INVALID_PARAMETERS, "prompt has no tokens")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise NitroError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt has {len(prompt_ids)} tokens, the limit is {self.max_prompt_tokens}",
            )
        sampler = _Sampler(params) if params.temperature > 0 else None
        stream = self.scheduler.submit(
            prompt_ids,
            params.max_new_tokens,
            params.min_new_tokens,
            sampler.pick if sampler else None,
        )
        return self._steps(stream, should_stop)

    def _steps(self, stream: Any, should_stop: Callable[[], bool] | None) -> Iterator[Step]:
        # Only the tokens after the last emitted text are decoded at each step (not the whole
        # answer again): BLOOM's byte-level decoding splits at any token boundary where the text
        # so far was complete UTF-8, so the pieces add up to decoding the whole answer.
        pending: list[int] = []
        try:
            for token, finish in stream:
                if finish == "stop":
                    yield Step(self.codec.decode(pending), token, "stop")
                    return
                pending.append(token)
                reason = finish
                if reason is None and should_stop is not None and should_stop():
                    reason = "cancelled"
                text = self.codec.decode(pending)
                # Hold back an incomplete UTF-8 sequence until a later token completes it; the
                # last step flushes whatever is left, so the texts always add up to the decode.
                if reason is None and text.endswith(_REPLACEMENT_CHAR):
                    text = ""
                else:
                    pending = []
                yield Step(text, token, reason)
                if reason is not None:
                    return
        finally:
            stream.close()  # cancelled, or a no-op after the last token

    def close(self) -> None:
        """Stop the inference thread (pending requests get not_ready)."""
        self.scheduler.close()


class _TransformersCodec:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def decode(self, ids: list[int]) -> str:
        # No "clean-up" of spaces before punctuation: it could rewrite text already streamed.
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


class _TokenizersCodec:
    """tokenizer.json through `tokenizers` alone: the fast backend never imports transformers."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, model_dir: Path) -> _TokenizersCodec:
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class _FastBatchModel:
    """The fast forward as the scheduler's BatchModel."""

    def __init__(self, forward: Any, max_batch: int) -> None:
        self.forward = forward
        self.eos_token_id = forward.shape.eos_token_id
        self.max_batch = max_batch

    def new_sequence(self, capacity: int) -> Any:
        return self.forward.new_cache(capacity)

    def step(self, work: Any) -> list[Any]:
        from enclave.fast_engine import Work

        return self.forward.step([Work(cache, tokens, want) for cache, tokens, want in work])


class _HfSequence:
    past: Any = None


class _HfBatchModel:
    """transformers' BloomForCausalLM as a BatchModel of one sequence at a time."""

    max_batch = 1

    def __init__(self, model: Any) -> None:
        self.model = model
        self.eos_token_id: int = model.config.eos_token_id

    def new_sequence(self, capacity: int) -> _HfSequence:
        return _HfSequence()

    def step(self, work: Any) -> list[Any]:
        import torch

        ((sequence, tokens, want),) = work
        out = self.model(
            input_ids=torch.tensor([list(tokens)]),
            past_key_values=sequence.past,
            use_cache=True,
        )
        sequence.past = out.past_key_values
        return [out.logits[0, -1, :].float() if want else None]


class TransformersEngine(ScheduledEngine):
    """The reference backend: one generation at a time, fp32, eager attention."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_prompt_tokens: int = 1024,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        super().__init__(
            "reference",
            _TransformersCodec(tokenizer),
            _HfBatchModel(model),
            max_prompt_tokens=max_prompt_tokens,
            max_batch=1,
            max_queue=max_queue,
            max_wait_s=busy_timeout,
            # The whole prompt in one forward, as the sample did.
            prefill_chunk=max_prompt_tokens,
        )

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        max_prompt_tokens: int = 1024,
        threads: int | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> TransformersEngine:
        """Load the tokenizer (tokenizer.json) and the BLOOM weights from a local directory.

        Never reaches a hub. `threads` sets torch's intra-op thread count for the process.
        """
        import torch
        from transformers import AutoTokenizer, BloomForCausalLM
        from transformers.utils import logging as hf_logging

        _set_threads(threads)
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            # Without it transformers would try to build a slow tokenizer or look elsewhere.
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        # The loader's progress bar would break the one-JSON-object-a-line log on stderr.
        hf_logging.disable_progress_bar()
        model = BloomForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.float32,
            attn_implementation="eager",  # BLOOM (ALiBi) has no SDPA path
            local_files_only=True,
        )
        model.eval()
        return cls(
            model,
            tokenizer,
            max_prompt_tokens=max_prompt_tokens,
            busy_timeout=busy_timeout,
            max_queue=max_queue,
        )


class _Sampler:
    """Temperature and nucleus (top-p) sampling from a generator of its own, seeded per request."""

    def __init__(self, params: GenerationParams) -> None:
        import torch

        self.temperature = params.temperature
        self.top_p = params.top_p
        self.generator = torch.Generator(device="cpu")
        # Unseeded requests draw from the OS so that they never repeat each other.
        seed = secrets.randbits(63) if params.seed is None else params.seed
        self.generator.manual_seed(seed)

    def pick(self, logits: Any) -> int:
        import torch

        # Shift before scaling: a tiny temperature must not overflow the logits into NaN.
        probs = torch.softmax((logits - logits.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))
