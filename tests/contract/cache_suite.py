"""The shared cache-tier conformance suite: every `CacheTier` (memory, disk, ...) must pass it.

Written once as an abstract test class (trio/fsspec style). A tier's test module subclasses it
as ``TestXxx(CacheTierContract)`` and supplies a `make_tier` fixture: a factory that opens a
fresh, empty tier of the given capacity in bytes (and closes every tier it opened afterwards).
The class name does not start with ``Test``, so pytest collects it only through such subclasses.

What it checks: round trips (bytes, empty objects), counters, that a put of a present key changes
nothing, the byte bound after every put, least-recently-used eviction (a hit protects an entry),
objects larger than the capacity, and many threads putting and getting at once.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cachefs.cache.base import CacheTier
from cachefs.dataset.objects import hash_bytes
from cachefs.dataset.repo import chunk_key

MakeTier = Callable[[int], CacheTier]
JOIN_TIMEOUT = 30.0  # seconds; well under pytest-timeout, so a hang fails with a clear message


def chunk_is_intact(key: str, data: bytes) -> bool:
    """A real verifier for chunk keys: `data` hashes to the name in `key`."""
    kind, _, rest = key.partition("/")
    return kind == "chunks" and hash_bytes(data) == rest.rpartition("/")[2]


def make_object(seed: int, size: int) -> tuple[str, bytes]:
    """A deterministic chunk of `size` bytes and its key."""
    data = random.Random(seed).randbytes(size)
    return chunk_key(hash_bytes(data)), data


def make_objects(n: int, size: int, first_seed: int = 0) -> list[tuple[str, bytes]]:
    return [make_object(first_seed + i, size) for i in range(n)]


class CacheTierContract:
    """Conformance tests for a CacheTier."""

    @pytest.fixture
    def make_tier(self) -> Iterator[MakeTier]:
        raise NotImplementedError("a tier's test class must provide the `make_tier` fixture")

    # --- basics ------------------------------------------------------------------------------

    def test_has_the_tier_interface(self, make_tier: MakeTier) -> None:
        tier = make_tier(1 << 20)
        assert isinstance(tier.name, str) and tier.name
        for method in ("get", "put", "contains", "stats", "close"):
            assert callable(getattr(tier, method))
        assert tier.stats().capacity_bytes == 1 << 20

    def test_round_trip(self, make_tier: MakeTier) -> None:
        tier = make_tier(1 << 20)
        key, data = make_object(1, 5000)
        assert tier.get(key) is None
        assert not tier.contains(key)
        tier.put(key, data)
        assert tier.contains(key)
        assert tier.get(key) == data
        stats = tier.stats()
        assert (stats.hits, stats.misses, stats.hit_bytes) == (1, 1, 5000)
        assert (stats.inserts, stats.insert_bytes, stats.used_bytes) == (1, 5000, 5000)
        assert (stats.corrupt, stats.errors) == (0, 0)

    def test_round_trip_empty_object(self, make_tier: MakeTier) -> None:
        tier = make_tier(1 << 20)
        key, data = make_object(2, 0)
        tier.put(key, data)
        assert tier.get(key) == b""

    def test_many_objects_round_trip(self, make_tier: MakeTier) -> None:
        tier = make_tier(1 << 20)
        objects = [make_object(i, 100 + 37 * i) for i in range(50)]
        for key, data in objects:
            tier.put(key, data)
        for key, data in objects:
            assert tier.get(key) == data
        assert tier.stats().used_bytes == sum(len(d) for _, d in objects)

    def test_put_of_a_present_key_changes_nothing(self, make_tier: MakeTier) -> None:
        tier = make_tier(1 << 20)
        key, data = make_object(3, 4000)
        tier.put(key, data)
        tier.put(key, data)
        stats = tier.stats()
        assert (stats.inserts, stats.used_bytes) == (1, 4000)
        assert tier.get(key) == data

    def test_close_twice_is_harmless(self, make_tier: MakeTier) -> None:
        tier = make_tier(1 << 20)
        tier.close()
        tier.close()

    # --- the bound and eviction ----------------------------------------------------------------

    def test_used_bytes_never_exceed_the_capacity(self, make_tier: MakeTier) -> None:
        capacity = 20_000
        tier = make_tier(capacity)
        rng = random.Random(7)
        stored = []
        for i in range(60):
            key, data = make_object(100 + i, rng.randint(1, 6000))
            tier.put(key, data)
            stored.append((key, data))
            assert tier.stats().used_bytes <= capacity
            present = sum(len(d) for k, d in stored if tier.contains(k))
            assert present <= capacity
        assert tier.stats().evictions > 0
        # the newest object is always kept
        assert tier.get(stored[-1][0]) == stored[-1][1]

    def test_least_recently_used_is_evicted_first(self, make_tier: MakeTier) -> None:
        tier = make_tier(3000)
        (a, da), (b, db), (c, dc), (d, dd) = make_objects(4, 1000, first_seed=200)
        for key, data in [(a, da), (b, db), (c, dc)]:
            tier.put(key, data)
        assert tier.get(a) == da  # a is now more recent than b and c
        tier.put(d, dd)
        assert not tier.contains(b)
        assert tier.get(a) == da
        assert tier.get(d) == dd
        stats = tier.stats()
        assert stats.evictions >= 1 and stats.evicted_bytes >= 1000

    def test_object_larger_than_the_capacity_is_not_cached(self, make_tier: MakeTier) -> None:
        tier = make_tier(10_000)
        small_key, small = make_object(300, 3000)
        big_key, big = make_object(301, 10_001)
        tier.put(small_key, small)
        tier.put(big_key, big)
        assert not tier.contains(big_key)
        assert tier.get(big_key) is None
        assert tier.get(small_key) == small  # nothing was evicted for it
        assert tier.stats().used_bytes == 3000

    def test_object_of_exactly_the_capacity_is_cached(self, make_tier: MakeTier) -> None:
        tier = make_tier(10_000)
        key, data = make_object(302, 10_000)
        tier.put(key, data)
        assert tier.get(key) == data

    # --- threads -------------------------------------------------------------------------------

    def test_many_threads_put_and_get(self, make_tier: MakeTier) -> None:
        capacity = 64_000
        tier = make_tier(capacity)
        objects = [make_object(400 + i, 500 + 97 * i) for i in range(48)]  # ~130 KB in all
        expected = dict(objects)
        n_threads, n_ops = 12, 250
        barrier = threading.Barrier(n_threads, timeout=JOIN_TIMEOUT)
        gets = [0] * n_threads

        def run(t: int) -> list[str]:
            rng = random.Random(t)
            wrong = []
            barrier.wait()
            for _ in range(n_ops):
                key, data = rng.choice(objects)
                got = tier.get(key)
                gets[t] += 1
                if got is None:
                    tier.put(key, data)
                elif got != expected[key]:
                    wrong.append(key)
            return wrong

        with ThreadPoolExecutor(n_threads) as pool:
            futures = [pool.submit(run, t) for t in range(n_threads)]
            wrong = [k for f in futures for k in f.result(timeout=JOIN_TIMEOUT)]
        assert wrong == []
        stats = tier.stats()
        assert stats.hits + stats.misses == sum(gets)
        assert stats.hits > 0 and stats.evictions > 0
        assert (stats.corrupt, stats.errors) == (0, 0)
        assert stats.used_bytes <= capacity
        assert sum(len(d) for k, d in objects if tier.contains(k)) <= capacity
