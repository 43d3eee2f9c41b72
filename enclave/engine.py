"""The LLM engine inside the enclave: a prompt in, a stream of generated tokens out.

`Engine` is the interface the server uses; `TransformersEngine` is the `reference` backend
(transformers, fp32, eager attention, CPU) with a manual decode loop over the KV cache.
"""

from __future__ import annotations

import math
import secrets
import threading
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


class TransformersEngine:
    """The reference backend: one generation at a time, fp32, eager attention."""

    name = "reference"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_prompt_tokens: int = 1024,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> None:
        if max_prompt_tokens < 1:
            raise ValueError("max_prompt_tokens must be at least 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.busy_timeout = busy_timeout
        self.eos_token_id: int = model.config.eos_token_id
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: Path,
        *,
        max_prompt_tokens: int = 1024,
        threads: int | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
    ) -> TransformersEngine:
        """Load the tokenizer (tokenizer.json) and the BLOOM weights from a local directory.

        Never reaches a hub. `threads` sets torch's intra-op thread count for the process.
        """
        import torch
        from transformers import AutoTokenizer, BloomForCausalLM
        from transformers.utils import logging as hf_logging

        if threads is not None:
            if threads < 1:
                raise ValueError("threads must be at least 1")
            torch.set_num_threads(threads)
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
        return cls(model, tokenizer, max_prompt_tokens=max_prompt_tokens, busy_timeout=busy_timeout)

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Step]:
        """Check the request now, then return an iterator of Steps, one per generated token.

        Raises INVALID_PARAMETERS or PROMPT_TOO_LONG before any model work. The last Step has
        a finish_reason. `should_stop` is asked after each token; True ends the stream there
        with "cancelled". The concatenated Step texts equal the tokenizer's decode of the
        generated ids (special tokens skipped, no space clean-up); the prompt is never repeated.
        """
        check_params(params)
        if not isinstance(prompt, str) or not prompt:
            raise NitroError(ErrorCode.INVALID_PARAMETERS, "prompt must be a non-empty string")
        if len(prompt) > self.max_prompt_tokens * MAX_PROMPT_CHARS_PER_TOKEN:
            raise NitroError(ErrorCode.PROMPT_TOO_LONG)
        prompt_ids = self._encode(prompt)
        if not prompt_ids:
            raise NitroError(ErrorCode.INVALID_PARAMETERS, "prompt has no tokens")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise NitroError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt has {len(prompt_ids)} tokens, the limit is {self.max_prompt_tokens}",
            )
        return self._generate(prompt_ids, params, should_stop)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def _decode(self, ids: list[int]) -> str:
        # No "clean-up" of spaces before punctuation: it could rewrite text already streamed.
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _generate(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        should_stop: Callable[[], bool] | None,
    ) -> Iterator[Step]:
        import torch

        # A bounded wait: a caller that cannot get the model in time is told the server is busy.
        if not self._lock.acquire(timeout=self.busy_timeout):
            raise NitroError(ErrorCode.OVERLOADED, "engine busy")
        try:
            sampler = _Sampler(params) if params.temperature > 0 else None
            generated: list[int] = []
            emitted = ""
            # Inference mode only around model work: it is thread-local state and must not leak
            # into the caller's code while this generator is suspended at a yield.
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            while True:
                with torch.inference_mode():
                    logits = out.logits[0, -1, :].float()
                    if len(generated) < params.min_new_tokens:
                        logits[self.eos_token_id] = -math.inf
                    token = sampler.pick(logits) if sampler else int(torch.argmax(logits))
                if token == self.eos_token_id:
                    yield Step(self._decode(generated)[len(emitted) :], token, "stop")
                    return
                generated.append(token)
                if len(generated) >= params.max_new_tokens:
                    reason: str | None = "length"
                elif should_stop is not None and should_stop():
                    reason = "cancelled"
                else:
                    reason = None
                text = self._decode(generated)
                # Hold back an incomplete UTF-8 sequence until a later token completes it; the
                # last step flushes whatever is left, so the texts always add up to the decode.
                if reason is None and text.endswith(_REPLACEMENT_CHAR):
                    new = ""
                else:
                    new, emitted = text[len(emitted) :], text
                yield Step(new, token, reason)
                if reason is not None:
                    return
                with torch.inference_mode():
                    out = self.model(
                        input_ids=torch.tensor([[token]]),
                        past_key_values=out.past_key_values,
                        use_cache=True,
                    )
        finally:
            self._lock.release()


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
