"""Tests of the memory and disk cache tiers (`cachefs.cache.memory`, `cachefs.cache.disk`).

- `TestMemoryCache`, `TestDiskCache`: the shared tier contract (tests/contract/cache_suite.py)
  plus what is particular to each: the memory tier's exact LRU and no-copy gets; the disk tier's
  verification (flipped and truncated entries), key checks, remounts, format marker, recency
  rule, eviction to the low-water mark, I/O errors, the free-space floor and default capacity.
- `test_two_processes_share_one_directory`: two real processes (four threads each) putting and
  getting over one small shared cache directory at once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cachefs.cache.base import CacheTier
from cachefs.cache.disk import SUMS_XATTR, DiskCache, split_cache_key
from cachefs.cache.memory import MemoryCache
from cachefs.errors import ConfigError
from tests.contract.cache_suite import (
    CacheTierContract,
    MakeTier,
    chunk_is_intact,
    make_object,
    make_objects,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_TIMEOUT_S = 60
HASH = "ab" + "0" * 62
OpenCache = Callable[..., DiskCache]


def directory_usage(directory: Path) -> int:
    """Bytes in every file under DIR/objects (entries and any temporary file)."""
    return sum(p.stat().st_size for p in (directory / "objects").rglob("*") if p.is_file())


def entry_path(directory: Path, key: str) -> Path:
    return directory / "objects" / key


# --- memory ----------------------------------------------------------------------------------


class TestMemoryCache(CacheTierContract):
    @pytest.fixture
    def make_tier(self) -> Iterator[MakeTier]:
        tiers: list[CacheTier] = []

        def make(capacity: int) -> CacheTier:
            tiers.append(MemoryCache(capacity))
            return tiers[-1]

        yield make
        for tier in tiers:
            tier.close()

    def test_get_returns_the_stored_object_itself(self) -> None:
        cache = MemoryCache(1 << 20)
        key, data = make_object(1, 1000)
        cache.put(key, data)
        assert cache.get(key) is data
        assert cache.name == "memory"

    def test_mutable_buffers_are_copied_once(self) -> None:
        cache = MemoryCache(1 << 20)
        key, data = make_object(1, 1000)
        buf = bytearray(data)
        cache.put(key, buf)  # type: ignore[arg-type]
        buf[0] ^= 0xFF
        got = cache.get(key)
        assert isinstance(got, bytes) and got == data

    def test_exact_lru_order(self) -> None:
        cache = MemoryCache(4000)
        objects = make_objects(6, 1000)
        for key, data in objects[:4]:
            cache.put(key, data)
        assert cache.get(objects[0][0]) is not None  # order now 1, 2, 3, 0
        cache.put(*objects[4])  # evicts 1
        cache.put(*objects[5])  # evicts 2
        assert [cache.contains(k) for k, _ in objects] == [True, False, False, True, True, True]
        stats = cache.stats()
        assert (stats.evictions, stats.evicted_bytes, stats.used_bytes) == (2, 2000, 4000)
        assert len(cache) == 4

    def test_a_big_put_evicts_as_many_as_needed(self) -> None:
        cache = MemoryCache(4000)
        for key, data in make_objects(4, 1000):
            cache.put(key, data)
        key, data = make_object(99, 3500)
        cache.put(key, data)
        assert len(cache) == 1 and cache.stats().used_bytes == 3500

    def test_contains_is_not_a_use(self) -> None:
        cache = MemoryCache(2000)
        (a, da), (b, db), (c, dc) = make_objects(3, 1000)
        cache.put(a, da)
        cache.put(b, db)
        assert cache.contains(a)
        cache.put(c, dc)
        assert not cache.contains(a) and cache.contains(b)
        assert (cache.stats().hits, cache.stats().misses) == (0, 0)

    def test_zero_capacity_caches_nothing_and_negative_is_refused(self) -> None:
        cache = MemoryCache(0)
        key, data = make_object(1, 10)
        cache.put(key, data)
        assert cache.get(key) is None
        with pytest.raises(ValueError):
            MemoryCache(-1)

    def test_close_empties_it(self) -> None:
        cache = MemoryCache(1 << 20)
        key, data = make_object(1, 10)
        cache.put(key, data)
        cache.close()
        assert cache.get(key) is None and cache.stats().used_bytes == 0


# --- disk ------------------------------------------------------------------------------------


class TestDiskCache(CacheTierContract):
    @pytest.fixture
    def make_tier(self, tmp_path: Path) -> Iterator[MakeTier]:
        tiers: list[CacheTier] = []

        def make(capacity: int) -> CacheTier:
            tiers.append(DiskCache(
                tmp_path / f"cache{len(tiers)}", capacity, verify=chunk_is_intact,
                free_space_floor=0, touch_interval_s=0,
            ))
            return tiers[-1]

        yield make
        for tier in tiers:
            tier.close()

    @pytest.fixture
    def cache_dir(self, tmp_path: Path) -> Path:
        return tmp_path / "cache"

    @pytest.fixture
    def open_cache(self, cache_dir: Path) -> Iterator[OpenCache]:
        """DiskCache(...) on `cache_dir` by default, floor 0, hits always touch; all closed."""
        opened: list[DiskCache] = []

        def open_(directory: Path = cache_dir, capacity: int | None = 1 << 20,
                  **kwargs: object) -> DiskCache:
            kwargs.setdefault("verify", chunk_is_intact)
            kwargs.setdefault("free_space_floor", 0)
            kwargs.setdefault("touch_interval_s", 0)
            opened.append(DiskCache(directory, capacity, **kwargs))  # type: ignore[arg-type]
            return opened[-1]

        yield open_
        for cache in opened:
            cache.close()

    # --- layout, keys, remount -----------------------------------------------------------------

    def test_layout_mirrors_the_repository_key(self, open_cache: OpenCache,
                                               cache_dir: Path) -> None:
        cache = open_cache()
        key, data = make_object(1, 100)
        cache.put(key, data)
        assert key.startswith("chunks/")
        assert entry_path(cache_dir, key).read_bytes() == data
        assert (cache_dir / "format").read_text().strip() == "1"
        assert cache.name == "disk"
        assert not [p for p in cache_dir.rglob(".tmp-*")]  # no temporary file left behind

    @pytest.mark.parametrize("key", [
        "chunks/ab/" + "ab" * 31,  # too short
        "chunks/ab/" + HASH + "0",  # too long
        "chunks/cd/" + HASH,  # fan-out is not the name's first two characters
        "chunks/AB/" + HASH.upper(),
        "Chunks/ab/" + HASH,
        "chunks/ab/" + HASH + "\n",
        "chunks/ab/" + HASH + "/x",
        "chunks/" + HASH,
        "../ab/" + HASH,
        "chunks/../../" + HASH,
        "/chunks/ab/" + HASH,
        "chunks/ab/" + HASH[:-1] + "g",
        "",
    ])
    def test_invalid_keys_are_rejected(self, open_cache: OpenCache, key: str) -> None:
        cache = open_cache()
        with pytest.raises(ValueError):
            cache.get(key)
        with pytest.raises(ValueError):
            cache.put(key, b"x")
        with pytest.raises(ValueError):
            cache.contains(key)
        with pytest.raises(ValueError):
            split_cache_key(key)

    def test_valid_keys_of_every_kind(self, open_cache: OpenCache) -> None:
        assert split_cache_key("trees/ab/" + HASH) == ("trees", "ab", HASH)
        cache = open_cache(verify=lambda key, data: True)
        for kind in ("trees", "commits", "somethingnew"):
            cache.put(f"{kind}/ab/{HASH}", kind.encode())
            assert cache.get(f"{kind}/ab/{HASH}") == kind.encode()

    def test_entries_survive_a_remount(self, open_cache: OpenCache) -> None:
        objects = make_objects(10, 3000)
        cache = open_cache()
        for key, data in objects:
            cache.put(key, data)
        cache.close()
        assert cache.get(objects[0][0]) is None  # a closed cache is inert
        cache = open_cache()
        assert cache.stats().used_bytes == 30_000
        for key, data in objects:
            assert cache.get(key) == data
        assert cache.stats().hits == 10

    def test_a_newer_format_is_refused(self, open_cache: OpenCache,
                                       cache_dir: Path) -> None:
        open_cache().close()
        (cache_dir / "format").write_text("2\n")
        with pytest.raises(ConfigError, match="newer"):
            open_cache()
        (cache_dir / "format").write_bytes(b"\xff\xfe garbage")
        with pytest.raises(ConfigError):
            open_cache()

    def test_open_counts_what_is_there_and_removes_abandoned_temporary_files(
            self, open_cache: OpenCache, cache_dir: Path) -> None:
        cache = open_cache()
        key, data = make_object(1, 1000)
        cache.put(key, data)
        cache.close()
        fan = entry_path(cache_dir, key).parent
        stale = fan / ".tmp-500-dead"
        stale.write_bytes(b"x" * 500)
        os.utime(stale, (1, 1))
        live = fan / ".tmp-700-busy"  # a write in flight elsewhere: counted at its final size
        live.write_bytes(b"x" * 100)
        (fan / "notes.txt").write_text("not ours")  # foreign files are neither counted nor removed
        cache = open_cache()
        assert not stale.exists() and live.exists() and (fan / "notes.txt").exists()
        assert cache.stats().used_bytes == 1700

    # --- verification --------------------------------------------------------------------------

    @pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
    def test_a_damaged_entry_is_deleted_counted_and_missed(
            self, open_cache: OpenCache, cache_dir: Path, damage: str,
            caplog: pytest.LogCaptureFixture) -> None:
        cache = open_cache()
        (key, data), (other, other_data) = make_objects(2, 5000)
        cache.put(key, data)
        cache.put(other, other_data)
        path = entry_path(cache_dir, key)
        raw = bytearray(path.read_bytes())
        if damage == "flip":
            raw[1234] ^= 0x01
        elif damage == "truncate":
            del raw[4000:]
        else:
            raw.clear()
        path.write_bytes(raw)
        with caplog.at_level(logging.WARNING, logger="cachefs.cache.disk"):
            assert cache.get(key) is None
        assert "corrupt" in caplog.text and key in caplog.text
        assert not path.exists()
        stats = cache.stats()
        assert (stats.corrupt, stats.misses, stats.hits, stats.errors) == (1, 1, 0, 0)
        # what was deleted no longer counts (a truncated entry's lost tail stays counted until
        # the next eviction's rescan: an overestimate, never an underestimate)
        assert stats.used_bytes == 10_000 - len(raw)
        assert directory_usage(cache_dir) == 5000
        assert cache.get(key) is None  # the next get is a plain miss
        assert cache.stats().corrupt == 1 and cache.stats().misses == 2
        assert cache.get(other) == other_data
        cache.put(key, data)  # and it can be stored again
        assert cache.get(key) == data

    def test_a_whole_get_checks_the_sums_not_the_hash(self, open_cache: OpenCache,
                                                      cache_dir: Path) -> None:
        calls: list[str] = []

        def verify(key: str, data: bytes) -> bool:
            calls.append(key)
            return chunk_is_intact(key, data)

        cache = open_cache(verify=verify)
        key, data = make_object(2, 300_000)
        cache.put(key, data)  # verified by the caller; its sums are written with it
        assert cache.get(key) == data and calls == []
        with open(entry_path(cache_dir, key), "r+b") as f:  # keeps the file and its xattr
            f.seek(200_000)
            f.write(bytes([data[200_000] ^ 1]))
        assert cache.get(key) is None  # caught by its sub-block's sum, never returned
        assert cache.stats().corrupt == 1 and not cache.contains(key)

    def test_a_verifier_that_raises_means_corrupt(self, open_cache: OpenCache,
                                                  cache_dir: Path) -> None:
        def verify(key: str, data: bytes) -> bool:
            raise RuntimeError("cannot decode")

        cache = open_cache(verify=verify)
        key, data = make_object(1, 100)
        cache.put(key, data)
        # Without its sums (an entry of the previous format) the get must verify it whole.
        os.removexattr(entry_path(cache_dir, key), SUMS_XATTR)
        assert cache.get(key) is None
        assert cache.stats().corrupt == 1 and not cache.contains(key)

    # --- recency and eviction ------------------------------------------------------------------

    def test_a_hit_refreshes_the_mtime_at_most_once_per_interval(
            self, open_cache: OpenCache, cache_dir: Path) -> None:
        cache = open_cache(touch_interval_s=60)
        key, data = make_object(1, 100)
        cache.put(key, data)
        path = entry_path(cache_dir, key)
        now = path.stat().st_mtime
        os.utime(path, (now - 30, now - 30))
        assert cache.get(key) == data
        assert path.stat().st_mtime == pytest.approx(now - 30)  # used 30 s ago: left alone
        os.utime(path, (now - 90, now - 90))
        assert cache.get(key) == data
        assert path.stat().st_mtime >= now - 1  # used 90 s ago: refreshed

    def test_eviction_goes_down_to_the_low_water_mark_oldest_first(
            self, open_cache: OpenCache, cache_dir: Path) -> None:
        cache = open_cache(capacity=10_000)
        objects = make_objects(11, 1000)
        for key, data in objects[:10]:
            cache.put(key, data)
        assert cache.stats().evictions == 0 and cache.stats().used_bytes == 10_000
        cache.put(*objects[10])  # 11 000 > 10 000: evict down to 9 000 with the new one
        present = [cache.contains(k) for k, _ in objects]
        assert present == [False, False] + [True] * 9
        assert cache.stats().used_bytes == 9000 == directory_usage(cache_dir)
        assert cache.stats().evictions == 2

    def test_recency_is_shared_through_the_directory(self, open_cache: OpenCache) -> None:
        first, second = open_cache(capacity=3000), open_cache(capacity=3000)
        (a, da), (b, db), (c, dc), (d, dd) = make_objects(4, 1000)
        for key, data in [(a, da), (b, db), (c, dc)]:
            first.put(key, data)
        assert second.get(a) == da  # the other "process" uses a
        first.put(d, dd)
        assert first.contains(a) and not first.contains(b)

    def test_two_caches_on_one_directory_share_the_bound(
            self, open_cache: OpenCache, cache_dir: Path) -> None:
        caches = [open_cache(capacity=20_000), open_cache(capacity=20_000)]
        objects = make_objects(40, 1500)
        for i, (key, data) in enumerate(objects):
            caches[i % 2].put(key, data)
            assert directory_usage(cache_dir) <= 20_000
        key, data = objects[0]
        caches[0].put(key, data)
        caches[1].put(key, data)  # the second writer of one object stores nothing
        assert caches[0].stats().used_bytes == directory_usage(cache_dir)

    # --- failures ------------------------------------------------------------------------------

    def test_io_errors_are_counted_misses_and_skipped_puts(
            self, open_cache: OpenCache, cache_dir: Path,
            caplog: pytest.LogCaptureFixture) -> None:
        cache = open_cache()
        key, data = make_object(1, 100)
        other, _ = make_object(2, 100)
        entry_path(cache_dir, key).parent.parent.mkdir(parents=True, exist_ok=True)
        entry_path(cache_dir, key).parent.write_bytes(b"a file where a directory should be")
        entry_path(cache_dir, other).mkdir(parents=True)  # a directory where an entry should be
        with caplog.at_level(logging.WARNING, logger="cachefs.cache.disk"):
            cache.put(key, data)
            assert cache.get(key) is None
            assert cache.get(other) is None
        stats = cache.stats()
        assert stats.errors >= 2 and stats.inserts == 0 and stats.used_bytes == 0
        assert "failed" in caplog.text

    def test_the_free_space_floor_skips_puts(self, open_cache: OpenCache, cache_dir: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
        cache_dir.mkdir()
        st = os.statvfs(cache_dir)
        floor = st.f_bavail * st.f_frsize + (1 << 30)  # more than is free
        cache = open_cache(free_space_floor=floor)
        assert cache.free_space_floor == floor
        with caplog.at_level(logging.WARNING, logger="cachefs.cache.disk"):
            for key, data in make_objects(3, 100):
                cache.put(key, data)
                assert not cache.contains(key)
        assert cache.skipped_low_space == 3 and cache.stats().inserts == 0
        assert caplog.text.count("below the floor") == 1  # logged once

    def test_default_capacity_obeys_the_floor(self, tmp_path: Path) -> None:
        directory = tmp_path / "not" / "yet" / "there"
        st = os.statvfs(tmp_path)
        free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        slack = 64 << 20  # other tests may write meanwhile
        assert DiskCache.default_capacity(directory, floor=free + (1 << 30)) == 0
        assert DiskCache.default_capacity(directory, floor=free - (8 << 20)) <= (8 << 20) + slack
        floor = DiskCache.default_free_space_floor(directory)
        assert abs(floor - min(size // 10, 5 << 30)) <= 1
        capacity = DiskCache.default_capacity(directory)
        assert capacity <= free // 2 + slack
        assert free - capacity >= floor - slack
        assert not directory.exists()  # asking does not create anything

    def test_default_capacity_counts_what_the_cache_holds(
            self, open_cache: OpenCache, cache_dir: Path) -> None:
        cache = open_cache(capacity=None, free_space_floor=None)
        assert 0 <= cache.capacity_bytes == cache.stats().capacity_bytes
        cache.put(*make_object(1, 1 << 20))
        st = os.statvfs(cache_dir)
        free = st.f_bavail * st.f_frsize
        floor = cache.free_space_floor
        expected = max(0, min((free + (1 << 20)) // 2, free + (1 << 20) - floor))
        assert abs(DiskCache.default_capacity(cache_dir, floor) - expected) < (64 << 20)

    def test_bad_arguments(self, open_cache: OpenCache) -> None:
        with pytest.raises(ValueError):
            open_cache(capacity=-1)
        with pytest.raises(ValueError):
            open_cache(low_water=0)


# --- two real processes ----------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, random, sys, threading
    from pathlib import Path

    from cachefs.cache.disk import DiskCache
    from tests.contract.cache_suite import chunk_is_intact, make_object

    directory, capacity, seed, n_threads, n_ops = sys.argv[1:]
    objects = [make_object(i, 1000 + 211 * i) for i in range(40)]  # ~200 KB, the same in both
    expected = dict(objects)
    cache = DiskCache(Path(directory), int(capacity), verify=chunk_is_intact,
                      free_space_floor=0, touch_interval_s=0)
    print("ready", flush=True)
    sys.stdin.readline()
    wrong, failures = [], []

    def work(t):
        rng = random.Random(int(seed) * 1000 + t)
        try:
            for _ in range(int(n_ops)):
                key, data = rng.choice(objects)
                got = cache.get(key)
                if got is None:
                    cache.put(key, data)
                elif got != expected[key] or not chunk_is_intact(key, got):
                    wrong.append(key)
        except BaseException as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(int(n_threads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    cache.close()
    print(json.dumps({"wrong": wrong, "failures": failures, "hits": s.hits,
                      "misses": s.misses, "inserts": s.inserts, "evictions": s.evictions,
                      "corrupt": s.corrupt, "errors": s.errors}), flush=True)
""")


def test_two_processes_share_one_directory(tmp_path: Path) -> None:
    directory, capacity = tmp_path / "cache", 60_000
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(directory), str(capacity), str(seed), "4", "300"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO_ROOT, env=env,
        )
        for seed in (1, 2)
    ]
    try:
        for proc in procs:  # both are open and waiting: release them together
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.stderr
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for r in results:
        assert r["wrong"] == [] and r["failures"] == []
        assert (r["corrupt"], r["errors"]) == (0, 0)
        assert r["hits"] > 0 and r["inserts"] > 0 and r["evictions"] > 0
    assert directory_usage(directory) <= capacity
    assert not list(directory.rglob(".tmp-*"))
    cache = DiskCache(directory, capacity, verify=chunk_is_intact, free_space_floor=0)
    try:
        assert cache.stats().used_bytes == directory_usage(directory)
    finally:
        cache.close()
