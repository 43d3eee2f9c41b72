"""Per-client token buckets: a bounded, thread-safe rate limiter for the proxy and the enclave.

Each client (an IP address, a conversation) has a bucket of `burst` tokens refilled at `rate`
tokens a second; a request takes one. Memory is bounded: at most `max_clients` buckets are kept,
the least recently seen forgotten first (a forgotten client starts again with a full bucket).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from protocol.errors import ErrorCode, NitroError

DEFAULT_MAX_CLIENTS = 10_000


class RateLimited(NitroError):
    """A client over its rate; `retry_after` is how many seconds until it has a token again."""

    def __init__(self, retry_after: float, detail: str | None = None) -> None:
        super().__init__(ErrorCode.RATE_LIMITED, detail)
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """The Retry-After value: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))

    @property
    def public_message(self) -> str:
        """What the enclave may tell the parent: which limit, and the wait (nothing secret)."""
        return f"{self.detail or self.code.client_text}; try again in {self.retry_after_header} s"


class RateLimiter:
    """Token buckets by client key; `clock` (monotonic seconds) is injectable for tests."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # Configuration, not input: a bad value is a programming or configuration error.
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError("rate must be a positive number of tokens a second")
        if not (math.isfinite(burst) and burst >= 1):
            raise ValueError("burst must be at least 1")
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.rate, self.burst, self.max_clients = float(rate), float(burst), max_clients
        self._clock = clock
        # client -> (tokens, when they were counted); oldest-seen first.
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _tokens(self, client: Hashable, now: float) -> float:
        entry = self._buckets.get(client)
        if entry is None:
            return self.burst
        tokens, then = entry
        # max(): a clock that steps back must not drain a bucket.
        return min(self.burst, tokens + max(0.0, now - then) * self.rate)

    def acquire(self, client: Hashable) -> float:
        """Take a token for `client`: 0.0 if it had one, else the seconds until it will."""
        with self._lock:
            now = self._clock()
            tokens = self._tokens(client, now)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                self._buckets.move_to_end(client)
                while len(self._buckets) > self.max_clients:
                    self._buckets.popitem(last=False)
                return 0.0
            # A refusal takes nothing (a client that keeps knocking waits no longer than one
            # that stops) but keeps the client remembered, so that it cannot age out of the map.
            self._buckets.move_to_end(client)
            return (1.0 - tokens) / self.rate

    def check(self, client: Hashable, what: str = "requests") -> None:
        """Take a token for `client` or raise RateLimited."""
        wait = self.acquire(client)
        if wait > 0:
            raise RateLimited(wait, f"too many {what} from this client")

    def refund(self, client: Hashable) -> None:
        """Give back a token taken by `acquire` for a request that did not go ahead."""
        with self._lock:
            entry = self._buckets.get(client)
            if entry is not None:
                now = self._clock()
                self._buckets[client] = (min(self.burst, self._tokens(client, now) + 1.0), now)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)
