"""The response cache on its own: keys, LRU bound, TTL with an injected clock, Cache-Control."""

from __future__ import annotations

import pytest

from service.predict.cache import CacheKey, CacheUse, PredictionCache


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def key(text: str, revision: str = "main") -> CacheKey:
    return CacheKey("", "model", revision, "classification", text)


def test_a_stored_result_is_served_and_an_unknown_text_misses() -> None:
    cache: PredictionCache[str] = PredictionCache(max_entries=4, ttl_s=0)
    cache.put(key("great"), "POSITIVE")
    assert cache.get(key("great")) == "POSITIVE"
    assert cache.get(key("Great")) is None  # the exact text, nothing normalised
    assert cache.get(key("great", revision="v2")) is None  # another revision, another result


def test_the_least_recently_used_entry_goes_first_beyond_the_size() -> None:
    cache: PredictionCache[int] = PredictionCache(max_entries=2, ttl_s=0)
    cache.put(key("a"), 1)
    cache.put(key("b"), 2)
    assert cache.get(key("a")) == 1  # "a" is now the most recently used
    cache.put(key("c"), 3)
    assert len(cache) == 2
    assert cache.get(key("b")) is None
    assert (cache.get(key("a")), cache.get(key("c"))) == (1, 3)


def test_an_entry_expires_after_the_ttl() -> None:
    clock = FakeClock()
    cache: PredictionCache[int] = PredictionCache(max_entries=4, ttl_s=60, clock=clock)
    cache.put(key("a"), 1)
    clock.now_s += 59.9
    assert cache.get(key("a")) == 1
    clock.now_s += 0.1
    assert cache.get(key("a")) is None
    assert len(cache) == 0  # an expired entry does not keep its place


def test_storing_again_refreshes_the_entry_and_its_age() -> None:
    clock = FakeClock()
    cache: PredictionCache[int] = PredictionCache(max_entries=4, ttl_s=60, clock=clock)
    cache.put(key("a"), 1)
    clock.now_s += 50
    cache.put(key("a"), 2)
    clock.now_s += 50
    assert cache.get(key("a")) == 2


def test_a_ttl_of_zero_never_expires() -> None:
    clock = FakeClock()
    cache: PredictionCache[int] = PredictionCache(max_entries=4, ttl_s=0, clock=clock)
    cache.put(key("a"), 1)
    clock.now_s += 10**9
    assert cache.get(key("a")) == 1


@pytest.mark.parametrize(
    ("header", "read", "write"),
    [
        (None, True, True),
        ("", True, True),
        ("max-age=0", True, True),
        ("no-cache", False, True),
        ("No-Cache", False, True),
        ("no-store", True, False),
        ("no-cache, no-store", False, False),
    ],
)
def test_cache_control_says_whether_to_read_and_to_store(
    header: str | None, read: bool, write: bool
) -> None:
    assert CacheUse.from_cache_control(header) == CacheUse(read=read, write=write)


@pytest.mark.parametrize(("size", "ttl_s"), [(0, 10.0), (4, -1.0)])
def test_impossible_limits_are_refused(size: int, ttl_s: float) -> None:
    with pytest.raises(ValueError):
        PredictionCache(max_entries=size, ttl_s=ttl_s)
