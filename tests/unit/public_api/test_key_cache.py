"""The gate's key cache: entries expire, stay bounded, and are dropped per key on demand."""

from __future__ import annotations

from dataclasses import dataclass

from public_api.key_cache import KeyCache, KnownCaller
from public_api.keys import ApiKey


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


def _caller(key_id: str, accepted: str | None = "1") -> KnownCaller:
    return KnownCaller(ApiKey(key_id, f"name-{key_id}", 0.0), accepted)


def test_an_entry_lives_for_its_ttl_only() -> None:
    clock = Clock()
    cache = KeyCache(ttl_s=5.0, clock=clock)
    cache.put("d1", _caller("k_1"))
    clock.now += 4.9
    assert cache.get("d1") == _caller("k_1")
    clock.now += 0.2
    assert cache.get("d1") is None
    assert cache.get("unknown") is None


def test_forget_drops_every_token_of_one_key() -> None:
    cache = KeyCache(clock=Clock())
    cache.put("d1", _caller("k_1", None))
    cache.put("d2", _caller("k_1", None))
    cache.put("d3", _caller("k_2"))
    cache.forget("k_1")
    assert cache.get("d1") is None and cache.get("d2") is None
    assert cache.get("d3") == _caller("k_2")


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = KeyCache(max_entries=2, clock=Clock())
    cache.put("d1", _caller("k_1"))
    cache.put("d2", _caller("k_2"))
    assert cache.get("d1") is not None  # d1 is now the most recent
    cache.put("d3", _caller("k_3"))
    assert cache.get("d2") is None
    assert cache.get("d1") is not None and cache.get("d3") is not None


def test_a_zero_ttl_caches_nothing() -> None:
    cache = KeyCache(ttl_s=0.0, clock=Clock())
    cache.put("d1", _caller("k_1"))
    assert cache.get("d1") is None
