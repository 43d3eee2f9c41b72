"""The token-bucket rate limiter: burst, refill, per-client isolation, bounded memory, threads."""

import threading

import pytest

from protocol.errors import ErrorCode
from protocol.ratelimit import RateLimited, RateLimiter


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_refusal_with_the_wait_until_the_next_token():
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # one token every 0.5 s
    clock.now += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)


def test_refill_is_capped_at_the_burst():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    limiter.acquire("a")
    clock.now += 1000
    assert [limiter.acquire("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.acquire("a") > 0


def test_refusals_do_not_extend_the_wait():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    limiter.acquire("a")
    for _ in range(50):  # knocking while refused takes no tokens
        assert limiter.acquire("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert limiter.acquire("a") == 0.0


def test_clients_have_their_own_buckets():
    clock = Clock()
    limiter = RateLimiter(rate=0.1, burst=2, clock=clock)
    for _ in range(2):
        limiter.check("1.2.3.4")
    with pytest.raises(RateLimited) as err:
        limiter.check("1.2.3.4", "attestation requests")
    assert err.value.code is ErrorCode.RATE_LIMITED
    assert err.value.http_status == 429
    assert err.value.retry_after == pytest.approx(10.0)
    assert err.value.retry_after_header == "10"
    assert (
        err.value.public_message
        == "too many attestation requests from this client; try again in 10 s"
    )
    limiter.check("5.6.7.8")  # another client is not affected


def test_a_clock_that_steps_back_does_not_drain_or_fill():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    limiter.acquire("a")
    clock.now -= 50
    assert limiter.acquire("a") == pytest.approx(1.0)


def test_memory_is_bounded_and_active_clients_are_remembered():
    clock = Clock()
    limiter = RateLimiter(rate=0.001, burst=1, max_clients=3, clock=clock)
    limiter.acquire("abuser")
    for index in range(10):
        limiter.acquire(f"other-{index}")
        assert len(limiter) <= 3
        # The abuser keeps knocking: refused, and not forgotten by the churn of new clients.
        assert limiter.acquire("abuser") > 0
    assert len(limiter) == 3


def test_least_recently_seen_client_is_forgotten_first():
    clock = Clock()
    limiter = RateLimiter(rate=0.001, burst=1, max_clients=2, clock=clock)
    limiter.acquire("old")
    limiter.acquire("mid")
    limiter.acquire("new")  # "old" goes
    assert limiter.acquire("mid") > 0
    assert limiter.acquire("old") == 0.0  # forgotten: a full bucket again


def test_refund_gives_a_token_back_up_to_the_burst():
    clock = Clock()
    limiter = RateLimiter(rate=0.001, burst=2, clock=clock)
    limiter.acquire("a")
    limiter.acquire("a")
    assert limiter.acquire("a") > 0
    limiter.refund("a")
    assert limiter.acquire("a") == 0.0
    limiter.refund("a")
    limiter.refund("a")
    limiter.refund("a")
    assert [limiter.acquire("a") for _ in range(3)][2] > 0  # never above the burst
    limiter.refund("unknown")  # nothing to give back to; remembers nothing
    assert "unknown" not in limiter._buckets


def test_concurrent_callers_get_exactly_the_burst():
    limiter = RateLimiter(rate=0.001, burst=100, clock=Clock())
    granted = []
    barrier = threading.Barrier(8)

    def hammer():
        barrier.wait()
        granted.extend(1 for _ in range(50) if limiter.acquire("shared") == 0.0)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(granted) == 100


@pytest.mark.parametrize(
    ("rate", "burst", "max_clients"),
    [(0, 1, 1), (-1, 1, 1), (float("nan"), 1, 1), (float("inf"), 1, 1), (1, 0.5, 1), (1, 1, 0)],
)
def test_bad_settings_are_refused(rate, burst, max_clients):
    with pytest.raises(ValueError):
        RateLimiter(rate, burst, max_clients=max_clients)
