"""Range reads from the SSD tier, checked by sub-block sums (`cachefs.cache.disk`, issue 19).

- the sums: written with every new entry (the xattr `user.cachefs.sums` of its file), one CRC-32
  per 64 KiB sub-block; a range read reads and checks only the sub-blocks that cover it.
- damage: a flipped byte inside one sub-block is caught by a range read that covers it (the
  entry is dropped and counted corrupt, never returned), and through the tiered store and the
  file-system core the read is answered from the origin with the right bytes.
- compatibility: an entry without sums (what the previous version writes) is read whole,
  verified and given its sums; sums of another length are ignored; a daemon running the
  previous commit's code and a new one share one directory, each reading the other's entries,
  with nothing dropped.
- threads: concurrent range readers of one entry get the right bytes.
- around the page cache: entries are written with O_DIRECT (exact size, sums in place, nothing
  cached) and a range not in the page cache is read with O_DIRECT, checked like any other; a file
  system that refuses O_DIRECT falls back to the page cache; a failed write stores nothing.
- the counters: `ssd_range_reads`, `ssd_bytes_read` and `ssd_direct_reads` beside the existing keys.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from benchmarks.ssd_pressure import MemoryLimit
from cachefs.cache.disk import (
    SUMS_XATTR,
    DiskCache,
    cached_sizes,
    change_marker,
    compute_sums,
    parse_sums,
    read_cached,
    stored_bytes,
)
from cachefs.cache.memory import MemoryCache
from cachefs.cache.tiered import TieredStore, object_is_intact
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.objects import MIN_CHUNK_SIZE, Extent
from cachefs.dataset.repo import Repository
from cachefs.directio import DIRECT_READ_MIN, Cachestat, cachestat
from cachefs.fs import ROOT_INODE, DatasetFS, FsError, MountOptions
from cachefs.remotes.local import LocalRemote
from tests.contract.cache_suite import chunk_is_intact, make_object
from tests.test_read_integrity import file_entry, store_chunk, store_tree

REPO_ROOT = Path(__file__).resolve().parent.parent
# The code of the previous version (the last commit before sub-block sums): the "old daemon".
OLD_COMMIT = "906ec24ae8ea81232147cc53c9d9a44b8e7d1fe0"
PROCESS_TIMEOUT_S = 60
MiB = 1 << 20
BLOCK = 64 << 10
OpenCache = Callable[..., DiskCache]


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def open_cache(cache_dir: Path) -> Iterator[OpenCache]:
    opened: list[DiskCache] = []

    def open_(capacity: int = 64 * MiB, **kwargs: object) -> DiskCache:
        kwargs.setdefault("verify", chunk_is_intact)
        kwargs.setdefault("free_space_floor", 0)
        kwargs.setdefault("touch_interval_s", 0)
        opened.append(DiskCache(cache_dir, capacity, **kwargs))  # type: ignore[arg-type]
        return opened[-1]

    yield open_
    for cache in opened:
        cache.close()


def entry(cache_dir: Path, key: str) -> Path:
    return cache_dir / "objects" / key


def sums_of(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, SUMS_XATTR)
    except OSError:
        return None


def flip(path: Path, offset: int) -> None:
    """Flip one bit of the file in place (same inode: its xattr stays)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


# --- the sums --------------------------------------------------------------------------------


def test_sums_format_and_sub_block_size() -> None:
    data = random.Random(1).randbytes(4 * MiB + 5)
    shift, crcs = parse_sums(compute_sums(data), len(data))  # type: ignore[misc]
    assert shift == 16 and len(crcs) == 65
    assert parse_sums(compute_sums(data), len(data) - 1) is None  # another length: ignored
    assert parse_sums(b"junk", len(data)) is None and parse_sums(None, 0) is None
    big = bytes(64 * MiB + 1)  # over 512 sub-blocks of 64 KiB: the sub-block doubles
    shift, crcs = parse_sums(compute_sums(big), len(big))  # type: ignore[misc]
    assert shift == 18 and len(crcs) <= 512
    assert parse_sums(compute_sums(b""), 0) == (16, ())


def test_a_put_stores_sums_and_a_range_reads_only_its_sub_blocks(
        open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache()
    key, data = make_object(1, 4 * MiB)
    cache.put(key, data)
    assert parse_sums(sums_of(entry(cache_dir, key)), len(data)) is not None
    before = cache.stats()
    offset, length = 1_000_000, 110_000  # inside sub-blocks 15 and 16
    assert cache.get_range(key, offset, length) == data[offset : offset + length]
    stats = cache.stats()
    assert stats.range_reads - before.range_reads == 1
    assert stats.bytes_read - before.bytes_read == 2 * BLOCK
    assert stats.hits - before.hits == 1 and stats.hit_bytes - before.hit_bytes == length
    # the edges: the first byte, the last sub-block (short), past the end, empty
    assert cache.get_range(key, 0, 1) == data[:1]
    assert cache.get_range(key, len(data) - 10, 100) == data[-10:]
    assert cache.get_range(key, len(data), 10) == b""
    assert cache.get_range(key, 5, 0) == b""
    assert cache.stats().upgrades == 0 and cache.stats().corrupt == 0
    with pytest.raises(ValueError):
        cache.get_range(key, -1, 10)


def test_a_range_read_is_charged_only_its_sub_blocks_by_the_kernel(
        open_cache: OpenCache) -> None:
    """The bytes the process reads (/proc/thread-self/io rchar) are those of the covering
    sub-blocks, not the 4 MiB entry."""
    io = Path("/proc/thread-self/io")
    if not io.exists():
        pytest.skip("no /proc/thread-self/io")

    def rchar() -> int:
        return int(next(line for line in io.read_text().splitlines()
                        if line.startswith("rchar:")).split()[1])

    cache = open_cache()
    key, data = make_object(2, 4 * MiB)
    cache.put(key, data)
    start = rchar()
    assert cache.get_range(key, 3 * MiB + 10, 110_000) == data[3 * MiB + 10 : 3 * MiB + 110_010]
    read = rchar() - start
    assert 2 * BLOCK <= read < 2 * BLOCK + 16_384, read  # two sub-blocks (+ /proc's own read)


# --- damage ----------------------------------------------------------------------------------


def test_a_flipped_byte_is_caught_by_a_range_that_covers_it_and_never_returned(
        open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache()
    key, data = make_object(3, 4 * MiB)
    cache.put(key, data)
    path = entry(cache_dir, key)
    flip(path, 20 * BLOCK + 777)  # inside sub-block 20
    # a range elsewhere reads only its own sub-blocks: right bytes, nothing noticed
    assert cache.get_range(key, 5 * BLOCK, 1000) == data[5 * BLOCK : 5 * BLOCK + 1000]
    assert cache.stats().corrupt == 0
    # a range inside sub-block 20 that does not even include the flipped byte: caught
    assert cache.get_range(key, 20 * BLOCK + 1000, 50) is None
    stats = cache.stats()
    assert stats.corrupt == 1 and not path.exists()
    assert stats.used_bytes == 0
    assert cache.get_range(key, 0, 10) is None  # a plain miss now
    cache.put(key, data)  # stored again, with its sums
    assert cache.get_range(key, 20 * BLOCK, 1000) == data[20 * BLOCK : 20 * BLOCK + 1000]


def test_a_truncated_entry_is_corrupt_for_a_range_read(open_cache: OpenCache,
                                                       cache_dir: Path) -> None:
    cache = open_cache()
    key, data = make_object(4, MiB)
    cache.put(key, data)
    os.truncate(entry(cache_dir, key), MiB - 100)  # the sums no longer describe it
    assert cache.get_range(key, 0, 100) is None  # read whole, verified: corrupt
    assert cache.stats().corrupt == 1 and not entry(cache_dir, key).exists()


# --- around the page cache ---------------------------------------------------------------------


def drop_cached(path: Path) -> None:
    """Write the file back and drop its pages, so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def page_cache_state(path: Path) -> Cachestat:
    """cachestat(2) of the whole file (skips the test on a kernel without it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = cachestat(fd, 0, max(1, path.stat().st_size))
    finally:
        os.close(fd)
    if stat is None:
        pytest.skip("no cachestat(2) on this kernel")
    return stat


def resident_pages(path: Path) -> int:
    return page_cache_state(path).nr_cache


def test_entries_are_written_and_read_around_the_page_cache(open_cache: OpenCache,
                                                            cache_dir: Path) -> None:
    """A stored chunk costs no page-cache fill (O_DIRECT, padded to whole blocks and cut to its
    length), and a large range (DIRECT_READ_MIN or more) not in the page cache is read with
    O_DIRECT: right bytes, exact size, sums in place, and the page cache still empty. Small
    ranges go through the page cache (twice as fast here for 110 KB random reads), and a
    range that is cached is read from it."""
    cache = open_cache()
    key, data = make_object(30, 4 * MiB + 5)  # the last block is partial
    cache.put(key, data)
    path = entry(cache_dir, key)
    if not cache._direct:
        pytest.skip("this file system refuses O_DIRECT")
    assert resident_pages(path) <= 1  # written around it (cutting the padding reads the last)
    assert path.stat().st_size == len(data) and path.read_bytes() == data
    assert parse_sums(sums_of(path), len(data)) is not None
    drop_cached(path)
    for offset, length in ((100_000, DIRECT_READ_MIN), (0, len(data))):
        before = cache.stats().direct_reads
        assert cache.get_range(key, offset, length) == data[offset : offset + length]
        assert cache.stats().direct_reads == before + 1
    assert cache.get(key) == data and resident_pages(path) == 0
    before = cache.stats().direct_reads
    assert cache.get_range(key, 1_000_000, 110_000) == data[1_000_000:1_110_000]
    assert cache.get_range(key, len(data) - 10, 100) == data[-10:]
    assert cache.stats().direct_reads == before and resident_pages(path) > 0
    path.read_bytes()  # now all in the page cache: read from there, large ranges too
    assert cache.get_range(key, 2_000_000, 2 * MiB) == data[2_000_000 : 2_000_000 + 2 * MiB]
    assert cache.stats().direct_reads == before
    assert cache.stats().corrupt == 0 and cache.stats().errors == 0


def test_a_range_is_read_on_the_caller_s_thread_only_when_the_page_cache_holds_it(
        open_cache: OpenCache, cache_dir: Path) -> None:
    """`get_range_if_cached` never reads the disk: None (and no miss counted) while the range's
    sub-blocks are not in the page cache, or the entry is missing; the verified bytes once they
    are; and a flipped byte in the page cache is still caught by the sums."""
    cache = open_cache()
    key, data = make_object(33, 4 * MiB)
    cache.put(key, data)
    path = entry(cache_dir, key)
    drop_cached(path)
    assert resident_pages(path) == 0  # (skips without cachestat(2))
    assert cache.get_range_if_cached(key, 1_000_000, 110_000) is None
    assert cache.get_range_if_cached(key, 0, 2 * MiB) is None  # large: no O_DIRECT read either
    assert cache.stats().direct_reads == 0 and resident_pages(path) == 0
    assert cache.get_range_if_cached("chunks/ab/" + "ab" * 32, 0, 10) is None
    assert cache.stats().misses == 0 and cache.stats().hits == 0
    assert cache.get_range(key, 1_000_000, 110_000) == data[1_000_000:1_110_000]  # fills it
    assert cache.get_range_if_cached(key, 1_000_000, 110_000) == data[1_000_000:1_110_000]
    assert cache.stats().hits == 2
    flip(path, 1_000_000 + 5)  # through the page cache: what the next read sees
    assert cache.get_range_if_cached(key, 1_000_000, 110_000) is None
    assert cache.stats().corrupt == 1 and not path.exists()


def test_prefetch_entry_brings_the_whole_entry_into_the_page_cache(
        open_cache: OpenCache, cache_dir: Path) -> None:
    """A small range read with `prefetch_entry` (a packed small file) asks for the whole entry,
    so its neighbours are then readable without the disk; without it, only the range's
    sub-blocks are read."""
    cache = open_cache()
    key, data = make_object(34, 4 * MiB)
    cache.put(key, data)
    path = entry(cache_dir, key)
    drop_cached(path)
    assert resident_pages(path) == 0  # (skips without cachestat(2))
    assert cache.get_range(key, 0, 110_000) == data[:110_000]
    assert resident_pages(path) < (4 * MiB) // os.sysconf("SC_PAGE_SIZE") // 2
    drop_cached(path)
    assert cache.get_range(key, 0, 110_000, prefetch_entry=True) == data[:110_000]
    # WILLNEED does not wait for the read it starts
    trio.run(_until, lambda: cache.get_range_if_cached(key, 3 * MiB, 110_000) is not None)
    assert cache.get_range_if_cached(key, 3 * MiB, 110_000) == data[3 * MiB : 3 * MiB + 110_000]


def evicted_pages(path: Path) -> int:
    """Pages of the file that reclaim evicted (their shadows, as cachestat(2) counts them)."""
    return page_cache_state(path).nr_evicted


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh memory cgroup limited to `limit` bytes (the benchmark's `MemoryLimit`); yields
    its cgroup.procs."""
    reason = MemoryLimit.unavailable()
    if reason is not None:
        pytest.skip(f"no memory cgroup here: {reason}")
    group = MemoryLimit.create()
    try:
        group.limit(limit)
        yield group.procs
    finally:
        group.remove()


def test_whole_entries_are_not_asked_for_while_the_page_cache_evicts_them(
        open_cache: OpenCache, cache_dir: Path) -> None:
    """A data set larger than the page cache: entries whose pages reclaim evicted (read through
    a memory cgroup far smaller than they are) are read by range only, the rest of each entry
    left on the disk; entries without evictions met next are read by range too while the share
    of evicting entries is high, and are asked for whole again once it has fallen."""
    cache = open_cache(capacity=256 * MiB)
    read_in_cgroup = [make_object(200 + i, 1 * MiB) for i in range(64)]
    clean = [make_object(300 + i, 256 << 10) for i in range(60)]
    for key, data in read_in_cgroup + clean:
        cache.put(key, data)
    paths = [entry(cache_dir, key) for key, _ in read_in_cgroup]
    with memory_cgroup(16 * MiB) as procs:
        def join() -> None:
            procs.write_text(str(os.getpid()))

        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True,
                       preexec_fn=join, timeout=PROCESS_TIMEOUT_S)
    # Reclaim evicted all but the last 16 MiB read (dropping pages with POSIX_FADV_DONTNEED
    # would drop the shadows too: only reclaim leaves them).
    evicting = [(obj, path) for obj, path in zip(read_in_cgroup, paths, strict=True)
                if evicted_pages(path) > 0 and resident_pages(path) == 0]
    assert len(evicting) >= 40

    for (key, data), path in evicting:
        assert cache.get_range(key, 0, 100_000, prefetch_entry=True) == data[:100_000]
        assert resident_pages(path) * os.sysconf("SC_PAGE_SIZE") < 256 << 10  # the range only
    stats = cache.stats()
    assert (stats.entry_prefetches, stats.entry_prefetches_skipped) == (0, len(evicting))

    asked = []
    for key, data in clean:
        before = cache.stats().entry_prefetches
        assert cache.get_range(key, 0, 16 << 10, prefetch_entry=True) == data[: 16 << 10]
        asked.append(cache.stats().entry_prefetches > before)
    assert not asked[0] and asked[-1]  # skipped while evictions were recent, then asked again
    assert asked.index(True) > 10 and all(asked[asked.index(True):])


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.005)


def test_a_flipped_byte_in_the_last_partial_block_is_caught_by_a_direct_read(
        open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache()
    key, data = make_object(31, 3 * MiB + 123)
    cache.put(key, data)
    path = entry(cache_dir, key)
    flip(path, len(data) - 7)
    drop_cached(path)  # read back from the disk
    assert cache.get_range(key, len(data) - 50, 50) is None
    assert cache.stats().corrupt == 1 and not path.exists()


def test_without_o_direct_the_tier_goes_through_the_page_cache(
        open_cache: OpenCache, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system that refuses O_DIRECT (EINVAL at open, like tmpfs) turns it off: entries
    are written and read through the page cache, with the same results."""
    import cachefs.cache.disk as disk

    def refused(path: str, flags: int, mode: int = 0o777) -> None:
        if flags & os.O_CREAT:  # like the kernel: the file may be created all the same
            os.close(os.open(path, flags & ~os.O_DIRECT, mode))
        return None

    monkeypatch.setattr(disk, "open_direct", refused)
    cache = open_cache()
    key, data = make_object(32, 4 * MiB)
    cache.put(key, data)
    assert not cache._direct and entry(cache_dir, key).read_bytes() == data
    assert not [p for p in entry(cache_dir, key).parent.iterdir() if p.name.startswith(".tmp-")]
    drop_cached(entry(cache_dir, key))
    assert cache.get_range(key, 100, 200_000) == data[100:200_100]
    assert cache.get(key) == data
    assert cache.stats().direct_reads == 0 and cache.stats().errors == 0


def test_a_failed_direct_write_stores_nothing(open_cache: OpenCache, cache_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (ENOSPC) leaves no entry and no temporary file, releases nothing it
    did not reserve, and is a counted error, not an exception for the reader."""
    cache = open_cache()
    key, data = make_object(33, 2 * MiB)

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    cache.put(key, data)
    monkeypatch.undo()
    assert not entry(cache_dir, key).exists()
    assert not [p for p in entry(cache_dir, key).parent.iterdir() if p.name.startswith(".tmp-")]
    assert cache.stats().errors == 1 and cache.stats().used_bytes == 0
    cache.put(key, data)
    assert cache.get(key) == data


class FakeRemote:
    """The origin: a dict, counting gets."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self.lock:
            self.gets += 1
        return self.objects[key]


def test_the_tiered_store_refetches_a_chunk_whose_range_fails(
        open_cache: OpenCache, cache_dir: Path) -> None:
    key, data = make_object(5, 4 * MiB)
    name = key.rpartition("/")[2]
    remote = FakeRemote({key: data})
    disk = open_cache(verify=object_is_intact)
    disk.put(key, data)
    flip(entry(cache_dir, key), 40 * BLOCK + 3)

    async def main() -> TieredStore:
        store = TieredStore(SimpleNamespace(remote=remote), MemoryCache(64 * MiB), disk)
        # a range from the SSD: not put into memory
        got = await store.chunk_range(name, 100, 110_000)
        assert bytes(got) == data[100:110_100] and not store.memory.contains(key)
        assert remote.gets == 0
        # the damaged sub-block: dropped, fetched whole from the origin, memory and SSD filled
        got = await store.chunk_range(name, 40 * BLOCK, 110_000)
        assert bytes(got) == data[40 * BLOCK : 40 * BLOCK + 110_000]
        assert remote.gets == 1 and store.memory.contains(key)
        # from memory now, and the fresh SSD entry is whole again
        got = await store.chunk_range(name, 40 * BLOCK, 10)
        assert bytes(got) == data[40 * BLOCK : 40 * BLOCK + 10]
        return store

    store = trio.run(main)
    stats = store.stats()
    assert disk.get_range(key, 40 * BLOCK, 10) == data[40 * BLOCK : 40 * BLOCK + 10]
    assert stats["corrupt_chunks"] == 1 and stats["origin_requests"] == 1
    assert stats["ssd_range_reads"] == 2  # the good range, and the one that failed its sum
    assert stats["ssd_hits"] == 1 and stats["ssd_misses"] == 1  # one miss: not asked twice
    assert stats["ssd_bytes_read"] == 2 * BLOCK + 2 * BLOCK
    assert 0 <= stats["ssd_direct_reads"] <= stats["ssd_range_reads"]  # 2 with O_DIRECT
    for old in ("memory_hits", "memory_bytes_used", "memory_capacity_bytes", "ssd_hits",
                "ssd_misses", "ssd_bytes_used", "ssd_capacity_bytes", "ssd_evictions",
                "origin_requests", "origin_bytes", "origin_errors", "origin_timeouts",
                "corrupt_chunks", "trees_cached", "tree_entries_cached"):
        assert old in stats


def one_big_file(tmp_path: Path, content: bytes, chunk: int,
                 memory: int) -> Callable[[], DatasetFS]:
    """Commit `content` as big.bin in `chunk`-sized chunks; a factory of file systems over
    the commit, each with an empty memory tier and the same SSD tier (a remount)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(content)
    repo = Repository(LocalRemote(tmp_path / "repo"))
    repo.create_dataset("ds", chunk_size=chunk)
    commit = commit_directory(repo, "ds", "main", src, "v1").commit
    c = repo.get_commit(commit)

    def make_fs() -> DatasetFS:
        store = TieredStore(repo, MemoryCache(memory),
                            DiskCache(tmp_path / "cache", 256 * MiB, verify=object_is_intact,
                                      free_space_floor=0))
        return DatasetFS(store, commit, c.tree, c.time_ns, chunk,
                         MountOptions(uid=os.getuid(), gid=os.getgid()), {"dataset": "ds"})

    return make_fs


def test_the_file_system_reads_a_range_from_the_ssd_and_refetches_a_damaged_one(
        tmp_path: Path) -> None:
    chunk = 4 * MiB
    content = random.Random(6).randbytes(chunk * 2)
    make_fs = one_big_file(tmp_path, content, chunk, 64 * MiB)

    async def read(fs: DatasetFS, offset: int, size: int) -> bytes:
        node = await fs.lookup(ROOT_INODE, "big.bin")
        fh = fs.open(node.ino, os.O_RDONLY)
        try:
            return bytes(await fs.read(fh, offset, size))
        finally:
            fs.release(fh)

    async def main() -> None:
        first = make_fs()
        assert await read(first, 0, len(content)) == content  # origin -> memory and SSD
        fs = make_fs()  # a remount: empty memory, the same SSD
        offset = chunk + 30 * BLOCK + 5
        assert await read(fs, offset, 110_000) == content[offset : offset + 110_000]
        stats = fs.stats()
        assert stats["ssd_range_reads"] == 1 and stats["origin_requests"] == 0
        assert stats["memory_bytes_used"] == 0  # the chunk was not pulled into memory
        # damage both chunks' entries in the sub-block the read covers (only the second
        # chunk is read)
        damaged = _chunk_keys(tmp_path / "cache")
        assert len(damaged) == 2
        for k in damaged:
            flip(tmp_path / "cache" / "objects" / k, 30 * BLOCK + 100)
        assert await read(fs, offset, 110_000) == content[offset : offset + 110_000]
        stats = fs.stats()
        assert stats["corrupt_chunks"] == 1 and stats["origin_requests"] == 1
        assert stats["read_bytes"] == 220_000

    trio.run(main)


def test_a_large_read_around_the_page_cache_is_handed_on_without_a_copy(
        open_cache: OpenCache, cache_dir: Path) -> None:
    """A whole chunk read with O_DIRECT is returned as a read-only view of the buffer it was
    read into, and the memory tier keeps that very object; a writable view it copies."""
    cache = open_cache()
    if not cache._direct:
        pytest.skip("this file system refuses O_DIRECT")
    key, data = make_object(32, 4 * MiB)
    cache.put(key, data)
    drop_cached(entry(cache_dir, key))
    got = cache.get(key)
    assert isinstance(got, memoryview) and got.readonly and got == data
    assert cache.stats().direct_reads == 1
    memory = MemoryCache(64 * MiB)
    memory.put(key, got)
    assert memory.get(key) is got
    writable = memoryview(bytearray(data))
    memory.put("chunks/ab/" + "ab" * 32, writable)
    kept = memory.get("chunks/ab/" + "ab" * 32)
    assert isinstance(kept, bytes) and kept == data


def test_a_sequential_read_from_the_ssd_reads_each_chunk_whole_once(tmp_path: Path) -> None:
    """A file streamed from the SSD tier (after a remount) costs one whole read per chunk,
    requests arriving out of order by one included (the kernel keeps several in flight): no
    range reads of the same chunk beside it, and the origin is never asked."""
    chunk = 4 * MiB
    content = random.Random(7).randbytes(chunk * 6)
    make_fs = one_big_file(tmp_path, content, chunk, 256 * MiB)

    async def main() -> None:
        first = make_fs()
        node = await first.lookup(ROOT_INODE, "big.bin")
        fh = first.open(node.ino, os.O_RDONLY)
        assert bytes(await first.read(fh, 0, len(content))) == content  # fills the SSD
        fs = make_fs()
        node = await fs.lookup(ROOT_INODE, "big.bin")
        fh = fs.open(node.ino, os.O_RDONLY)
        step = MiB
        got = bytearray(len(content))
        async with trio.open_nursery() as nursery:
            fs.nursery = nursery

            async def read(offset: int) -> None:
                got[offset : offset + step] = await fs.read(fh, offset, step)

            for pair in range(0, len(content), 2 * step):  # each pair's second one first
                nursery.start_soon(read, pair + step)
                nursery.start_soon(read, pair)
                await trio.testing.wait_all_tasks_blocked()
        assert bytes(got) == content
        stats = fs.stats()
        assert stats["ssd_range_reads"] == 0 and stats["origin_requests"] == 0
        assert stats["ssd_hits"] == 6 + 1  # six chunks, whole, and the tree

    trio.run(main)


def _chunk_keys(cache_dir: Path) -> list[str]:
    root = cache_dir / "objects"
    return sorted(str(p.relative_to(root)) for p in (root / "chunks").rglob("*") if p.is_file())


# --- compatibility ---------------------------------------------------------------------------


def test_an_entry_without_sums_is_verified_whole_once_and_upgraded(
        open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache()
    key, data = make_object(7, 4 * MiB)
    path = entry(cache_dir, key)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)  # what the previous version stores: the bytes, nothing else
    assert sums_of(path) is None
    assert cache.get_range(key, 123, 110_000) == data[123:110_123]
    stats = cache.stats()
    assert stats.upgrades == 1 and stats.bytes_read == len(data) and stats.range_reads == 0
    assert parse_sums(sums_of(path), len(data)) is not None
    assert path.read_bytes() == data  # the data file is unchanged
    assert cache.get_range(key, 3 * MiB, 10) == data[3 * MiB : 3 * MiB + 10]
    stats = cache.stats()
    assert stats.upgrades == 1 and stats.range_reads == 1
    assert stats.bytes_read == len(data) + BLOCK


def test_a_whole_get_upgrades_too_and_a_corrupt_old_entry_is_dropped(
        open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache()
    (key, data), (bad, bad_data) = make_object(8, 300_000), make_object(9, 300_000)
    for k, d in ((key, data), (bad, bad_data)):
        entry(cache_dir, k).parent.mkdir(parents=True, exist_ok=True)
        entry(cache_dir, k).write_bytes(d)
    flip(entry(cache_dir, bad), 250_000)
    assert cache.get(key) == data
    assert parse_sums(sums_of(entry(cache_dir, key)), len(data)) is not None
    assert cache.get_range(bad, 0, 10) is None  # verified whole: corrupt, never returned
    assert cache.stats().corrupt == 1 and not entry(cache_dir, bad).exists()
    assert sums_of(entry(cache_dir, key)) is not None and cache.stats().upgrades == 1


def test_sums_of_another_length_are_ignored_and_replaced(open_cache: OpenCache,
                                                        cache_dir: Path) -> None:
    cache = open_cache()
    key, data = make_object(10, 500_000)
    path = entry(cache_dir, key)
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    os.setxattr(path, SUMS_XATTR, compute_sums(data[:1000]))
    assert cache.get_range(key, 400_000, 1000) == data[400_000:401_000]
    assert cache.stats().upgrades == 1 and cache.stats().corrupt == 0
    assert parse_sums(sums_of(path), len(data)) is not None


def test_the_inventory_helpers_read_the_layout(open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache()
    (a, da), (b, _) = make_object(11, 1000), make_object(12, 2000)
    cache.put(a, da)
    def decode(data: bytes) -> bytes:
        if not chunk_is_intact(a, data):
            raise ValueError("corrupt")
        return data

    assert dict(cached_sizes(cache_dir, [a, b])) == {a: 1000}
    assert read_cached(cache_dir, a, decode) == da
    assert read_cached(cache_dir, b, decode) is None
    flip(entry(cache_dir, a), 10)
    assert read_cached(cache_dir, a, decode) is None
    assert entry(cache_dir, a).exists()  # read-only: left for a mount to drop
    marker, used = change_marker(cache_dir), stored_bytes(cache_dir)
    assert used == 1000 and marker != 0
    cache.put(b, bytes(2000))  # not its bytes, but the tier trusts its caller
    assert stored_bytes(cache_dir) == 3000 and change_marker(cache_dir) != marker


OLD_DAEMON = textwrap.dedent("""
    import json, random, sys, threading
    from pathlib import Path
    from blake3 import blake3

    import cachefs.cache.disk as disk
    from cachefs.cache.disk import DiskCache
    assert not hasattr(disk, "compute_sums"), disk.__file__  # really the previous version

    def intact(key, data):
        return blake3(data).hexdigest() == key.rpartition("/")[2]

    directory, seed, n_ops = sys.argv[1:]
    objects = json.loads(sys.stdin.readline())
    objects = [(k, bytes.fromhex(d)) for k, d in objects]
    cache = DiskCache(Path(directory), 256 << 20, verify=intact, free_space_floor=0,
                      touch_interval_s=0)
    for key, data in objects[4:10]:  # entries only the old version wrote (no sums)
        cache.put(key, data)
    print("ready", flush=True)
    sys.stdin.readline()
    wrong, failures = [], []

    def work(t):
        rng = random.Random(int(seed) * 100 + t)
        try:
            for _ in range(int(n_ops)):
                key, data = rng.choice(objects)
                got = cache.get(key)
                if got is None:
                    cache.put(key, data)
                elif got != data:
                    wrong.append(key)
        except BaseException as e:
            failures.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    cache.close()
    print(json.dumps({"wrong": wrong, "failures": failures, "hits": s.hits,
                      "inserts": s.inserts, "corrupt": s.corrupt, "errors": s.errors}),
          flush=True)
""")


def _old_code(tmp_path: Path) -> Path:
    """The previous commit's cachefs package, extracted (skip without git or its history)."""
    git = shutil.which("git")
    if git is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs git and this repository's history")
    old = tmp_path / "old"
    old.mkdir()
    archive = subprocess.run([git, "archive", OLD_COMMIT, "cachefs"], cwd=REPO_ROOT,
                             capture_output=True, timeout=PROCESS_TIMEOUT_S)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} not available: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True,
                   timeout=PROCESS_TIMEOUT_S)
    return old


def test_an_old_daemon_and_a_new_one_share_a_directory(tmp_path: Path,
                                                       open_cache: OpenCache,
                                                       cache_dir: Path) -> None:
    old_code = _old_code(tmp_path)
    objects = [make_object(100 + i, 200_000 + 37_000 * i) for i in range(16)]
    expected = dict(objects)
    new = open_cache(capacity=256 * MiB)
    for key, data in objects[:4]:  # some entries exist before, written by the new code
        new.put(key, data)
    proc = subprocess.Popen(
        [sys.executable, "-c", OLD_DAEMON, str(cache_dir), "1", "150"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=old_code, env={**os.environ, "PYTHONPATH": str(old_code)},
    )
    wrong: list[str] = []
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps([(k, d.hex()) for k, d in objects]) + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ready", proc.stderr
        proc.stdin.write("go\n")
        proc.stdin.flush()

        def reader(t: int) -> None:
            rng = random.Random(t)
            for _ in range(150):
                key, data = rng.choice(objects)
                offset = rng.randrange(len(data))
                length = rng.randrange(1, 150_000)
                got = new.get_range(key, offset, length)
                if got is None:
                    new.put(key, data)
                elif got != data[offset : offset + length]:
                    wrong.append(key)

        with ThreadPoolExecutor(3) as pool:
            for f in [pool.submit(reader, t) for t in range(3)]:
                f.result(timeout=PROCESS_TIMEOUT_S)
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    old = json.loads(out.strip().splitlines()[-1])
    assert wrong == [] and old["wrong"] == [] and old["failures"] == []
    # no churn: neither side found the other's entries corrupt, nothing was dropped
    assert (old["corrupt"], old["errors"]) == (0, 0)
    stats = new.stats()
    assert (stats.corrupt, stats.errors) == (0, 0)
    assert old["hits"] > 0 and old["inserts"] >= 6 and stats.range_reads > 0
    assert stats.upgrades > 0  # the old daemon's entries got their sums when first read
    # every object is stored once, unchanged; those the old daemon wrote and the new one read
    # were upgraded in place
    for key, _ in objects:
        path = entry(cache_dir, key)
        if path.exists():
            assert path.read_bytes() == expected[key]
    assert (cache_dir / "format").read_text() == "1\n"
    assert not list(cache_dir.rglob(".tmp-*"))


# --- threads ---------------------------------------------------------------------------------


def test_concurrent_range_readers_of_one_entry(open_cache: OpenCache) -> None:
    first, second = open_cache(), open_cache()  # two "processes" on one directory
    key, data = make_object(13, 4 * MiB)
    first.put(key, data)
    n_threads = 12
    barrier = threading.Barrier(n_threads, timeout=30)

    def run(t: int) -> int:
        rng = random.Random(t)
        cache = (first, second)[t % 2]
        barrier.wait()
        bad = 0
        for _ in range(200):
            offset = rng.randrange(len(data))
            length = rng.randrange(1, 300_000)
            if cache.get_range(key, offset, length) != data[offset : offset + length]:
                bad += 1
        return bad

    with ThreadPoolExecutor(n_threads) as pool:
        assert sum(pool.map(run, range(n_threads))) == 0
    for cache in (first, second):
        stats = cache.stats()
        assert (stats.corrupt, stats.errors, stats.misses) == (0, 0, 0)
        assert stats.range_reads == 200 * n_threads // 2


def test_an_extent_past_its_chunk_is_eio_when_read_from_the_ssd(tmp_path: Path) -> None:
    """A lying tree's extent read as a range from the SSD tier: EIO, never a short piece."""
    repo = Repository(LocalRemote(tmp_path / "repo"))
    data = random.Random(14).randbytes(300_000)
    name = store_chunk(repo, data)
    tree = store_tree(repo, [file_entry("lying", [Extent(name, 250_000, 100_000)]),
                             file_entry("honest", [Extent(name, 200_000, 100_000)])])
    disk = DiskCache(tmp_path / "cache", 64 * MiB, verify=object_is_intact, free_space_floor=0)
    disk.put(f"chunks/{name[:2]}/{name}", data)

    async def main() -> DatasetFS:
        store = TieredStore(repo, MemoryCache(64 * MiB), disk)
        fs = DatasetFS(store, "c" * 64, tree, 0, MIN_CHUNK_SIZE,
                       MountOptions(uid=os.getuid(), gid=os.getgid()), {"dataset": "ds"})
        honest = fs.open((await fs.lookup(ROOT_INODE, "honest")).ino, os.O_RDONLY)
        assert bytes(await fs.read(honest, 0, 100_000)) == data[200_000:]
        lying = fs.open((await fs.lookup(ROOT_INODE, "lying")).ino, os.O_RDONLY)
        with pytest.raises(FsError) as info:
            await fs.read(lying, 0, 100_000)
        assert info.value.errno == errno.EIO
        return fs

    try:
        stats = trio.run(main).stats()
    finally:
        disk.close()
    assert stats["bad_extents"] == 1 and stats["ssd_range_reads"] == 2
    assert stats["origin_requests"] == 1  # the tree; the chunk only ever came from the SSD
