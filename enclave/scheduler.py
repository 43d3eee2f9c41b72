"""Continuous batching: one inference thread decodes every admitted request together.

Callers (the server's connection threads) `submit` token ids and get an iterator of (token,
finish reason) back. Requests join the batch and leave it between decode steps; a bounded queue
holds the rest, and a full queue answers `overloaded` at once.
"""

from __future__ import annotations

import atexit
import logging
import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from protocol.errors import ErrorCode, NitroError

log = logging.getLogger("enclave.scheduler")
PREFILL_CHUNK_TOKENS = 128
DEFAULT_MAX_WAIT_S = 300.0
# How long a consumer waits for its next token before deciding the inference thread is stuck.
TOKEN_TIMEOUT_S = 120.0


class BatchModel(Protocol):
    """What the scheduler drives: sequences with caches, advanced together one step at a time."""

    eos_token_id: int
    max_batch: int

    def new_sequence(self, capacity: int) -> Any:
        """State (a KV cache) for a sequence of at most `capacity` tokens."""
        ...

    def step(self, work: Sequence[tuple[Any, Sequence[int], bool]]) -> list[Any]:
        """Feed (state, new tokens, want logits) for each sequence; [vocab] logits or None."""
        ...


@dataclass(eq=False)  # compared by identity: batch removals must not compare token lists
class _Request:
    prompt_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int
    pick: Callable[[Any], int]  # logits -> token (greedy or the request's own sampler)
    submitted: float
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: Any = None
    fed: int = 0  # prompt tokens already in the cache
    generated: int = 0
    last_token: int = -1

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass
class SchedulerStats:
    steps: int = 0
    tokens: int = 0
    admitted: int = 0
    overloaded: int = 0
    cancelled: int = 0
    peak_batch: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # decode steps, by batch size


class Scheduler:
    """Runs `model` on its own thread; `submit` from any thread."""

    def __init__(
        self,
        model: BatchModel,
        *,
        max_batch: int = 8,
        max_queue: int = 32,
        max_batch_tokens: int = 8192,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        prefill_chunk: int = PREFILL_CHUNK_TOKENS,
    ) -> None:
        if not 1 <= max_batch <= model.max_batch:
            raise ValueError(f"max_batch must be 1-{model.max_batch} for this model")
        if max_queue < 0 or max_batch_tokens < 1 or prefill_chunk < 1 or max_wait_s <= 0:
            raise ValueError("scheduler limits must be positive")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.prefill_chunk = prefill_chunk
        self.stats = SchedulerStats(batch_sizes=[0] * (max_batch + 1))
        self._waiting: deque[_Request] = deque()
        self._active: list[_Request] = []
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()
        # Stopped before the interpreter tears down: a daemon thread killed inside a torch
        # kernel aborts the process ("terminate called without an active exception").
        atexit.register(_close_at_exit, weakref.ref(self))

    # ---- callers -------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        min_new_tokens: int = 0,
        pick: Callable[[Any], int] | None = None,
    ) -> _Stream:
        """Queue a request; raises OVERLOADED now if the queue is full.

        The iterator yields (token id, finish reason or None); "stop" ends on eos, "length" at
        max_new_tokens. Closing it (or dropping it) cancels the request: it leaves the batch at
        the next step.
        """
        if len(prompt_ids) + max_new_tokens > self.max_batch_tokens:
            raise NitroError(ErrorCode.PROMPT_TOO_LONG, "prompt and answer exceed the batch budget")
        request = _Request(
            list(prompt_ids),
            max_new_tokens,
            min_new_tokens,
            pick or _greedy,
            time.monotonic(),
        )
        with self._lock:
            if self._closed:
                raise NitroError(ErrorCode.NOT_READY, "the engine is shut down")
            if self._is_full():
                self.stats.overloaded += 1
                raise NitroError(ErrorCode.OVERLOADED, "the request queue is full")
            self._waiting.append(request)
            self._lock.notify()
        return _Stream(request, self._lock, TOKEN_TIMEOUT_S + self.max_wait_s)

    def full(self) -> bool:
        """True when a request submitted now would be refused as overloaded."""
        with self._lock:
            return self._is_full()

    def _is_full(self) -> bool:
        # Requests not yet moved into free batch slots do not count against the queue.
        free_slots = max(0, self.max_batch - len(self._active))
        return len(self._waiting) >= self.max_queue + free_slots

    def queue_depth(self) -> tuple[int, int]:
        """(active, waiting) right now."""
        with self._lock:
            return len(self._active), len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)

    # ---- the inference thread ----------------------------------------------------------------

    def _has_room(self, request: _Request) -> bool:
        if len(self._active) >= self.max_batch:
            return False
        used = sum(r.tokens for r in self._active)
        return used + request.tokens <= self.max_batch_tokens

    def _admit(self) -> None:
        """Under the lock: move waiting requests into the batch while they fit, oldest first."""
        now = time.monotonic()
        kept: deque[_Request] = deque()
        while self._waiting:
            request = self._waiting.popleft()
            if request.cancelled.is_set():
                self.stats.cancelled += 1
                continue
            if now - request.submitted > self.max_wait_s:
                request.out.put(NitroError(ErrorCode.OVERLOADED, "waited too long for a slot"))
                self.stats.overloaded += 1
                continue
            if not kept and self._has_room(request):
                self._active.append(request)
                self.stats.admitted += 1
            else:
                kept.append(request)  # first come, first served: nobody overtakes
        self._waiting = kept

    def _run(self) -> None:
        import torch

        while True:
            with self._lock:
                self._active = [r for r in self._active if not self._drop_cancelled(r)]
                self._admit()
                while not self._active and not self._closed:
                    self._lock.wait(timeout=1.0)
                    self._admit()
                if self._closed:
                    for request in [*self._active, *self._waiting]:
                        request.out.put(NitroError(ErrorCode.NOT_READY, "the engine shut down"))
                    return
                batch = list(self._active)
            try:
                with torch.inference_mode():
                    self._step(batch)
            except Exception as exc:  # one bad step must not stop the engine for everyone
                log.error("inference step failed: %s", type(exc).__name__)
                with self._lock:
                    for request in batch:
                        request.out.put(NitroError(ErrorCode.INTERNAL_ERROR))
                        request.state = None
                    self._active = [r for r in self._active if r not in batch]

    def _drop_cancelled(self, request: _Request) -> bool:
        if request.cancelled.is_set():
            request.state = None  # frees the cache now
            self.stats.cancelled += 1
            return True
        return False

    def _step(self, batch: list[_Request]) -> None:
        work = []
        for request in batch:
            if request.state is None:
                request.state = self.model.new_sequence(request.tokens)
            if request.fed < len(request.prompt_ids):
                # Chunks of a fixed size: a sequence's own arithmetic never depends on others.
                chunk = request.prompt_ids[request.fed : request.fed + self.prefill_chunk]
                request.fed += len(chunk)
                work.append((request.state, chunk, request.fed == len(request.prompt_ids)))
            else:
                work.append((request.state, [request.last_token], True))
        logits = self.model.step(work)
        self.stats.steps += 1
        self.stats.peak_batch = max(self.stats.peak_batch, len(work))
        self.stats.batch_sizes[len(work)] += 1
        finished = []
        for request, row in zip(batch, logits, strict=True):
            if row is None:
                continue
            if request.generated < request.min_new_tokens:
                row[self.model.eos_token_id] = -math.inf
            token = request.pick(row)
            request.generated += 1
            request.last_token = token
            self.stats.tokens += 1
            if token == self.model.eos_token_id:
                reason: str | None = "stop"
            elif request.generated >= request.max_new_tokens:
                reason = "length"
            else:
                reason = None
            request.out.put((token, reason))
            if reason is not None:
                finished.append(request)
        if finished:
            with self._lock:
                for request in finished:
                    request.state = None
                self._active = [r for r in self._active if r not in finished]


def _close_at_exit(ref: weakref.ref) -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.close(timeout=5.0)


class _Stream:
    """The caller's side of one request: its tokens as they come; closing it cancels."""

    def __init__(self, request: _Request, lock: threading.Condition, timeout: float) -> None:
        self._request, self._lock, self._timeout = request, lock, timeout
        self._done = False

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> tuple[int, str | None]:
        if self._done:
            raise StopIteration
        try:
            item = self._request.out.get(timeout=self._timeout)
        except queue.Empty:
            self.close()
            raise NitroError(ErrorCode.INTERNAL_ERROR, "inference stalled") from None
        if isinstance(item, NitroError):
            self.close()
            raise item
        if item[1] is not None:
            self._done = True
        return item

    def close(self) -> None:
        """Stop generating for this request (a no-op once it finished)."""
        self._done = True
        if not self._request.cancelled.is_set():
            self._request.cancelled.set()
            with self._lock:
                self._lock.notify()

    @property
    def generated(self) -> int:
        """Tokens the inference thread produced for this request so far."""
        return self._request.generated

    def __del__(self) -> None:  # a caller that drops the stream has gone away too
        self._request.cancelled.set()


def _greedy(logits: Any) -> int:
    # numpy's argmax is vectorized and several times faster than torch's over 250880 logits;
    # both answer the first maximum.
    return int(logits.detach().numpy().argmax())
