"""The storage server's memory cache of needles (`--memory-cache`, storage_server/needle_cache.py):
concurrent readers of the same needles make one disk read each (counted by the server process's
/proc/PID/io), a corrupt needle is never admitted, a scan does not flush the hot needles, and
eviction keeps the bound. The first tests drive `NeedleCache` alone; the rest real servers."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from benchmarks.read import evict_tree
from cachefs.errors import CorruptObject
from storage_server.needle_cache import FrequencySketch, Loaded, NeedleCache
from tests.helpers import run_cli
from tests.storage_servers import MIB, StorageServer, flip_a_byte_of_the_segment, key_of, needles

KIB = 1 << 10


def _key(i: int) -> bytes:
    return key_of(b"key-%d" % i)


def _loader(size: int, calls: list[bytes], key: bytes, delay: float = 0.0) -> Callable[[], Loaded]:
    def load() -> Loaded:
        calls.append(key)
        time.sleep(delay)
        return memoryview(bytes(size)), size
    return load


# -- NeedleCache alone -----------------------------------------------------------------------


def test_single_flight_one_load_for_32_concurrent_misses() -> None:
    cache = NeedleCache(64 * MIB)
    calls: list[bytes] = []
    keys = [_key(i) for i in range(4)]
    barrier = threading.Barrier(32)

    def reader(seed: int) -> list[int]:
        order = list(keys)
        random.Random(seed).shuffle(order)
        barrier.wait()
        return [len(cache.get(k, 1, _loader(MIB, calls, k, 0.05)) or b"") for k in order]

    with ThreadPoolExecutor(32) as pool:
        assert all(sizes == [MIB] * 4 for sizes in pool.map(reader, range(32)))
    assert sorted(calls) == sorted(keys)  # one load per needle
    stats = cache.stats()
    assert stats["misses"] == 4 and stats["hits"] + stats["shared_misses"] == 31 * 4
    assert stats["entries"] == 4 and stats["used_bytes"] == 4 * MIB


def test_a_failed_load_reaches_every_waiter_and_is_not_admitted() -> None:
    cache = NeedleCache(64 * MIB)
    calls: list[int] = []
    barrier = threading.Barrier(8)

    def load() -> Loaded:
        calls.append(1)
        time.sleep(0.1)
        raise CorruptObject("needle: checksum mismatch")

    def reader(_: int) -> str:
        barrier.wait()
        try:
            cache.get(_key(0), 1, load)
        except CorruptObject as e:
            return str(e)
        return "no error"

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(reader, range(8))) == {"needle: checksum mismatch"}
    assert len(calls) < 8 and cache.stats()["entries"] == 0
    with pytest.raises(CorruptObject):  # not cached: the next read loads (and fails) again
        cache.get(_key(0), 1, load)
    assert cache.stats()["entries"] == 0 and cache.stats()["admissions"] == 0


def test_a_new_sequence_is_a_different_needle() -> None:
    cache = NeedleCache(MIB)
    calls: list[bytes] = []
    key = _key(0)
    cache.get(key, 1, _loader(100, calls, key))
    cache.get(key, 1, _loader(100, calls, key))
    assert len(calls) == 1
    cache.get(key, 2, _loader(50, calls, key))  # deleted and stored again
    assert len(calls) == 2 and cache.stats()["used_bytes"] == 50


def test_a_scan_does_not_flush_the_hot_needles_and_the_bound_holds() -> None:
    cache = NeedleCache(10 * 100 * KIB)
    calls: list[bytes] = []
    hot = [_key(i) for i in range(5)]
    for _ in range(3):
        for k in hot:
            cache.get(k, 1, _loader(100 * KIB, calls, k))
    for i in range(1000, 1200):  # a scan: 200 needles read once each, 20x the bound
        k = _key(i)
        cache.get(k, 1, _loader(100 * KIB, calls, k))
        assert cache.used_bytes <= cache.max_bytes
    before = len(calls)
    for k in hot:
        cache.get(k, 1, _loader(100 * KIB, calls, k))
    assert len(calls) == before  # every hot needle still in memory
    assert cache.stats()["admissions_refused"] >= 190
    # needles asked for more often than what is held get in, evicting within the bound
    for i in range(2000, 2020):
        k = _key(i)
        for _ in range(4):
            cache.get(k, 1, _loader(100 * KIB, calls, k))
            assert cache.used_bytes <= cache.max_bytes
    stats = cache.stats()
    # the five scanned needles that filled the free room go; the hot ones (asked for as often)
    # stay
    assert stats["evictions"] == 5 and stats["used_bytes"] <= 10 * 100 * KIB


def test_a_needle_larger_than_the_bound_is_refused() -> None:
    cache = NeedleCache(MIB)
    calls: list[bytes] = []
    assert len(cache.get(_key(1), 1, _loader(2 * MIB, calls, _key(1))) or b"") == 2 * MIB
    assert cache.stats()["entries"] == 0 and cache.stats()["admissions_refused"] == 1


def test_the_sketch_counts_and_forgets() -> None:
    sketch = FrequencySketch(1024)
    for _ in range(5):
        sketch.add(_key(1))
    assert sketch.estimate(_key(1)) == 5 and sketch.estimate(_key(2)) <= 1
    for _ in range(10 * 1024 - 5):  # the samples after which every counter is halved
        sketch.add(_key(2))
    assert sketch.estimate(_key(1)) == 2 and sketch.estimate(_key(2)) == 7


# -- real servers ----------------------------------------------------------------------------


def _disk_read_bytes(pid: int) -> int:
    """Bytes the process made the block layer read (page-cache hits do not count)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise AssertionError(f"no read_bytes in /proc/{pid}/io")


def _drop_volume_pages(server: StorageServer) -> None:
    """Write back and drop from the page cache every segment file of `server`."""
    evict_tree(server.data_dir / "volumes")


def _start(tmp_path: Path, storage_servers: list[StorageServer], size: str) -> StorageServer:
    server = StorageServer(tmp_path / "data", extra=("--memory-cache", size))
    storage_servers.append(server)
    return server.start()


def _memory_cache(server: StorageServer) -> dict[str, int]:
    with server.client() as client:
        return dict(client.stat()["memory_cache"])


def test_32_concurrent_readers_read_each_needle_from_disk_once(
        tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    server = _start(tmp_path, storage_servers, "64MiB")
    stored = needles(6, 2 * MIB, tag=b"hot")
    with server.client() as client:
        client.put_many(list(stored.items()))
    _drop_volume_pages(server)
    assert server.proc is not None
    before = _disk_read_bytes(server.proc.pid)
    barrier = threading.Barrier(32)

    def reader(seed: int) -> bool:
        order = list(stored)
        random.Random(seed).shuffle(order)
        with server.client() as client:
            barrier.wait()
            return all(client.get(key) == stored[key] for key in order)

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(reader, range(32)))
    read = _disk_read_bytes(server.proc.pid) - before
    unique = sum(len(data) for data in stored.values())
    assert unique <= read <= unique * 1.05 + 256 * KIB, (read, unique)
    cache = _memory_cache(server)
    assert cache["misses"] == 6 and cache["entries"] == 6
    assert cache["hits"] + cache["shared_misses"] == 31 * 6
    stat = run_cli("storage", "stat", server.address).stdout
    assert "memory cache: " in stat and f"{cache['hits']} hits" in stat


def test_a_corrupt_needle_is_never_admitted(tmp_path: Path,
                                            storage_servers: list[StorageServer]) -> None:
    server = _start(tmp_path, storage_servers, "64MiB")
    data = os.urandom(1536 * KIB)
    with server.client() as client:
        client.put_many([(key_of(data), data)])
    flip_a_byte_of_the_segment(server, len(data))
    _drop_volume_pages(server)
    barrier = threading.Barrier(8)

    def reader(_: int) -> str:
        with server.client() as client:
            barrier.wait()
            try:
                client.get(key_of(data))
            except Exception as e:  # the type is what is checked
                return type(e).__name__
            return "no error"

    for _ in range(2):
        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(reader, range(8))) == {"CorruptObject"}
    cache = _memory_cache(server)
    assert cache["entries"] == 0 and cache["admissions"] == 0 and cache["hits"] == 0
    assert cache["misses"] >= 2  # each round read the disk again
    result = run_cli("storage", "verify", server.address, "--json", check=False)
    assert result.returncode == 6 and json.loads(result.stdout)["corrupt"] == [
        key_of(data).hex()]


def test_a_scan_keeps_the_hot_needles_in_memory(tmp_path: Path,
                                                storage_servers: list[StorageServer]) -> None:
    server = _start(tmp_path, storage_servers, "4MiB")
    hot = needles(4, 512 * KIB, tag=b"hot")
    scan = needles(40, 200 * KIB, tag=b"scan")
    with server.client() as client:
        client.put_many(list(hot.items()))
        client.put_many(list(scan.items()))
        for _ in range(3):
            for key, data in hot.items():
                assert client.get(key) == data
        for key, data in scan.items():  # 6.5 MiB read once: 1.6x the bound
            assert client.get(key) == data
        _drop_volume_pages(server)
        assert server.proc is not None
        before = _disk_read_bytes(server.proc.pid)
        hits = _memory_cache(server)["hits"]
        for key, data in hot.items():
            assert client.get(key) == data
        assert _disk_read_bytes(server.proc.pid) - before < 64 * KIB  # no needle read
    cache = _memory_cache(server)
    assert cache["hits"] == hits + 4
    assert cache["admissions_refused"] > 0 and cache["used_bytes"] <= 4 * MIB
    # needles read again and again displace those read once, within the bound
    with server.client() as client:
        for key, data in list(scan.items())[-12:]:  # refused on their first read
            for _ in range(5):
                assert client.get(key) == data
    cache = _memory_cache(server)
    assert cache["evictions"] > 0, json.dumps(cache)
    assert cache["used_bytes"] <= cache["capacity_bytes"] == 4 * MIB


def test_memory_cache_off_by_default(tmp_path: Path,
                                     storage_servers: list[StorageServer]) -> None:
    server = StorageServer(tmp_path / "data")
    storage_servers.append(server)
    server.start()
    assert _memory_cache(server) == {"capacity_bytes": 0}
    assert "memory cache: off" in run_cli("storage", "stat", server.address).stdout
    bad = run_cli("storage", "serve", "--data-dir", str(tmp_path / "other"), "--listen",
                  "127.0.0.1:1", "--memory-cache", "lots", check=False)
    assert bad.returncode == 2 and "lots" in bad.stderr
