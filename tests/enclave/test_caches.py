"""The enclave's two memories: the data-key cache and the replay guard, both bounded."""

import pytest

from enclave.kms import KeyCache
from enclave.server import ReplayGuard, _chunks
from protocol.errors import ErrorCode, NitroError


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_key_cache_hits_expires_and_is_bounded():
    clock = Clock()
    cache = KeyCache(size=2, ttl_s=10, clock=clock)
    a = KeyCache.key("k", b"edk-a", {"app": "nitro-llm", "session": "s"})
    b = KeyCache.key("k", b"edk-b", {"app": "nitro-llm", "session": "s"})
    c = KeyCache.key("k", b"edk-c", {"app": "nitro-llm", "session": "s"})
    cache.put(a, b"A" * 32)
    assert cache.get(a) == b"A" * 32
    assert cache.get(KeyCache.key("k", b"edk-a", {"app": "nitro-llm", "session": "t"})) is None
    assert cache.get(KeyCache.key("other", b"edk-a", {"app": "nitro-llm", "session": "s"})) is None
    cache.put(b, b"B" * 32)
    cache.put(c, b"C" * 32)
    assert len(cache) == 2 and cache.get(a) is None  # least recently used went first
    clock.now += 11
    assert cache.get(b) is None and cache.get(c) is None


def test_replay_guard_refuses_repeats_and_stale_requests():
    clock = Clock(1_000_000.0)
    guard = ReplayGuard(window_s=300, clock=clock)
    now_ms = int(clock.now * 1000)
    guard.check("id-1", now_ms)
    with pytest.raises(NitroError) as err:
        guard.check("id-1", now_ms)
    assert err.value.code is ErrorCode.REPLAYED_REQUEST
    for sent_at in (now_ms - 301_000, now_ms + 301_000):
        with pytest.raises(NitroError) as err:
            guard.check("id-2", sent_at)
        assert err.value.code is ErrorCode.STALE_REQUEST
    clock.now += 700  # both the window and the memory of id-1 have passed
    with pytest.raises(NitroError) as err:
        guard.check("id-1", now_ms)
    assert err.value.code is ErrorCode.STALE_REQUEST
    guard.check("id-1", int(clock.now * 1000))


class Step:
    def __init__(self, text, finish=None):
        self.text, self.finish_reason = text, finish


def test_chunks_group_a_fixed_number_of_tokens():
    steps = [Step("a"), Step("b"), Step("c"), Step("d"), Step("e", "stop")]
    assert list(_chunks(iter(steps), 2)) == [("ab", 2, None), ("cd", 2, None), ("e", 1, "stop")]
    assert list(_chunks(iter(steps), 1 << 30)) == [("abcde", 5, "stop")]
    assert list(_chunks(iter(steps[:3]), 2)) == [("ab", 2, None), ("c", 1, "cancelled")]
