"""The storage server's read path: the compiled needle read agrees with the Python reference,
a page-cache hit costs no GIL handoff, and the index's entry cache never serves an entry a
commit has replaced (deletes, compaction) and stays within its bound."""

from __future__ import annotations

import errno
import gc
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.directio import cachestat
from cachefs.errors import ObjectNotFound
from storage_server import _needle as compiled
from storage_server import needle, volume
from storage_server.index import Index, NeedleLocation, Record
from storage_server.needle import encode_needle
from storage_server.store import VolumeStore
from tests.test_haystack_store import MALFORMED, data_of, key_of

Read = Callable[[int, int, int, bytes, int], tuple[bytes, int]]
READS: list[Read] = [needle.pread_needle, compiled.pread_needle]


def test_the_compiled_read_is_built_and_used() -> None:
    assert volume.COMPILED_READ is True
    assert volume.pread_needle is compiled.pread_needle
    assert compiled.__file__.endswith(".so")
    assert compiled.DIRECT_CRC32 is True  # ISA-L's C function found in python-isal


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    path = tmp_path / "segment"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd, path
    finally:
        os.close(fd)


def _write(fd: int, buf: bytes, offset: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, buf, offset)


def _evict(fd: int) -> None:
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), offset=st.integers(0, 9000),
       flip=st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 7)),
       extra=st.integers(-9, 9), cookie=st.sampled_from([7, 8]), evict=st.booleans(),
       ask_cachestat=st.booleans())
def test_compiled_read_agrees_with_the_reference(segment: tuple[int, Path], data: bytes,
                                                 offset: int, flip: tuple[int, int] | None,
                                                 extra: int, cookie: int, evict: bool,
                                                 ask_cachestat: bool) -> None:
    fd, _ = segment
    buf = bytearray(encode_needle(key_of(1), data, 7, sequence=3))
    if flip is not None:
        where, bit = flip
        buf[where % len(buf)] ^= 1 << bit
    _write(fd, bytes(buf), offset)
    length = max(0, len(buf) + extra)  # a wrong length, or one past the end of the file
    answers = []
    previous = compiled.use_cachestat(ask_cachestat)  # its first try: cachestat, or RWF_NOWAIT
    try:
        for read in READS:
            if evict:  # the read misses the page cache: the path that releases the GIL
                _evict(fd)
            answers.append(read(fd, length, offset, key_of(1), cookie))
    finally:
        compiled.use_cachestat(previous)
    assert answers[0] == answers[1]
    got, end = answers[1]
    assert got == bytes(buf)[:length]
    intact = flip is None and extra == 0 and cookie == 7
    assert (end == needle.HEADER_BYTES + len(data)) if intact else (end == -1)


@pytest.mark.parametrize(("buf", "message"), MALFORMED)
@pytest.mark.parametrize("read", READS, ids=["reference", "compiled"])
def test_every_malformed_needle_fails_the_read_check(segment: tuple[int, Path], buf: bytes,
                                                     message: str, read: Read) -> None:
    fd, _ = segment
    _write(fd, buf, 100)
    got, end = read(fd, len(buf), 100, key_of(1), 7)
    assert got == buf and end == -1


@pytest.mark.parametrize("read", READS, ids=["reference", "compiled"])
def test_read_errors(segment: tuple[int, Path], read: Read) -> None:
    fd, _ = segment
    _write(fd, encode_needle(key_of(1), b"abc", 7), 0)
    with pytest.raises(ValueError):
        read(fd, -1, 0, key_of(1), 7)
    with pytest.raises(ValueError):
        read(fd, 64, -1, key_of(1), 7)
    with pytest.raises(ValueError):
        read(fd, 64, 0, b"short", 7)
    bad = os.open(os.devnull, os.O_RDONLY)
    os.close(bad)
    with pytest.raises(OSError) as e:
        read(bad, 64, 0, key_of(1), 7)
    assert e.value.errno == errno.EBADF


class _GilWatcher:
    """Another Python thread, woken on entry and needing the GIL to note that it ran: while
    this thread holds the GIL it cannot run, so it ran during whatever released the GIL.
    Meanwhile forced switches are put off, and so is the garbage collector (a finalizer it runs
    may release the GIL: closing a file does)."""

    def __init__(self) -> None:
        self._go = threading.Event()
        self.ran = False
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        self._go.wait()
        self.ran = True

    def __enter__(self) -> _GilWatcher:
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(10.0)
        gc.disable()
        self._thread.start()
        self._go.set()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.enable()
        sys.setswitchinterval(self._interval)
        self._thread.join()


def _releases_gil(reads: Iterator[object]) -> bool:
    """Whether the watcher gets to run during one of `reads` (it may take it a while to be
    scheduled, on a loaded machine: the reads go on until it does, or run out)."""
    with _GilWatcher() as watcher:
        for _ in reads:
            if watcher.ran:
                return True
        return watcher.ran


def _keeps_gil(reads: Iterator[object]) -> bool:
    """Whether the watcher never runs during `reads`."""
    with _GilWatcher() as watcher:
        for _ in reads:
            pass
        return not watcher.ran


@pytest.mark.parametrize("ask_cachestat", [True, False], ids=["cachestat", "rwf-nowait"])
def test_a_short_page_cache_hit_keeps_the_gil(segment: tuple[int, Path],
                                              ask_cachestat: bool) -> None:
    fd, _ = segment
    buf = encode_needle(key_of(1), data_of(1, 110_000), 7)
    assert len(buf) < compiled.GIL_COPY_MAX
    count = 300
    os.ftruncate(fd, 0)
    os.pwrite(fd, buf * count, 0)
    os.pread(fd, len(buf) * count, 0)
    stat = cachestat(fd, 0, len(buf) * count)
    assert stat is not None and stat.nr_cache * 4096 >= len(buf) * count  # all cached

    def reads(read: Read, rounds: int = 1) -> Iterator[int]:
        for i in range(rounds * count):
            yield read(fd, len(buf), (i % count) * len(buf), key_of(1), 7)[1]

    assert _releases_gil(reads(needle.pread_needle, rounds=100))  # os.pread, crc32 release it
    previous = compiled.use_cachestat(ask_cachestat)
    try:
        assert _keeps_gil(reads(compiled.pread_needle, rounds=3))
        _evict(fd)  # misses wait for the disk with the GIL released
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # each read a miss, as in the store
        assert _releases_gil(reads(compiled.pread_needle))
    finally:
        compiled.use_cachestat(previous)


def test_a_long_copy_releases_the_gil(segment: tuple[int, Path]) -> None:
    """A cached chunk of megabytes is copied with the GIL released: other threads (gRPC
    calls) do not wait milliseconds for it."""
    fd, _ = segment
    buf = encode_needle(key_of(1), data_of(1, 32 << 20), 7)
    _write(fd, buf, 4096)
    os.pread(fd, len(buf), 4096)
    assert _releases_gil(compiled.pread_needle(fd, len(buf), 4096, key_of(1), 7)[1]
                         for _ in range(50))
    assert compiled.pread_needle(fd, len(buf), 4096, key_of(1), 7)[1] == 56 + (32 << 20)


def test_gets_read_only_their_needles(tmp_path: Path) -> None:
    """Readahead is off for gets: reading needles one after another in segment order (the
    pattern readahead ramps up on) brings only their own pages into the page cache."""
    data_dir = tmp_path / "store"
    items = [(key_of(i), data_of(i, 3000)) for i in range(200)]
    with VolumeStore(data_dir, volumes=1) as store:
        store.put_many(items)
    with VolumeStore(data_dir, volumes=1) as store:
        entries = sorted((store.index.get(0, key), key) for key, _ in items)
        (path,) = sorted((data_dir / "volumes").glob("*/*.seg"))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            read = entries[20:30]
            for _, key in read:
                store.get(key)
            start, end = read[0][0].offset, read[-1][0].offset + read[-1][0].length
            stat = cachestat(fd, 0, entries[150][0].offset)  # the tail: recovery's to read
            assert stat is not None
            assert stat.nr_cache <= (end - start) // 4096 + 2
        finally:
            os.close(fd)


# -- the index's entry cache -----------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[VolumeStore]:
    with VolumeStore(tmp_path / "store", volumes=4, segment_bytes=16 << 10) as s:
        yield s


def _lmdb_entry(store: VolumeStore, key: bytes) -> NeedleLocation | None:
    """The entry LMDB holds, past the overlay and the cache."""
    store.commit.wait_indexed()
    found = store.index.get_many([(store.vid_of(key), key)])
    return found[0]


def test_a_cached_entry_goes_when_its_key_is_deleted(store: VolumeStore) -> None:
    key = key_of(1)
    store.put_many([(key, data_of(1))])
    store.commit.wait_indexed()
    assert store.get(key) == data_of(1)
    assert store.index._cache.get(key) == _lmdb_entry(store, key)
    assert store.delete(key)
    store.commit.wait_indexed()  # the tombstone is in LMDB and out of the overlay
    assert key not in store.index._cache
    with pytest.raises(ObjectNotFound):
        store.get(key)


def test_cached_entries_follow_compaction(store: VolumeStore) -> None:
    items = [(key_of(i), data_of(i, 3000)) for i in range(30)]
    store.put_many(items)
    store.commit.wait_indexed()
    for key, data in items:
        assert store.get(key) == data  # every entry cached, pointing into the old segments
    for key, _ in items[::2]:
        store.delete(key)
    report = store.compact()
    assert report["reclaimed"] > 0
    for key, data in items[1::2]:
        assert store.get(key) == data
        assert store.index._cache[key] == _lmdb_entry(store, key)  # the moved entry
    for key, _ in items[::2]:
        with pytest.raises(ObjectNotFound):
            store.get(key)


def test_a_lookup_that_raced_a_commit_is_not_cached(tmp_path: Path) -> None:
    index = Index(tmp_path / "index")
    try:
        key = key_of(1)
        old = NeedleLocation(segment=0, offset=0, size=10, flags=0, sequence=1)
        new = NeedleLocation(segment=0, offset=80, size=10, flags=0, sequence=2)
        index.apply([Record(0, key, old)], {})
        began = index._cache_generation  # a lookup begins and reads `old` from LMDB...
        index.apply([Record(0, key, new)], {})  # ...a commit replaces it...
        index._remember(key, old, began)  # ...and the lookup would cache what it read
        assert key not in index._cache
        assert index.get(0, key) == new and index._cache[key] == new
    finally:
        index.close()


@pytest.mark.parametrize("capacity", [0, 3])
def test_the_entry_cache_is_bounded(tmp_path: Path, capacity: int) -> None:
    index = Index(tmp_path / "index", cache_entries=capacity)
    try:
        entries = {key_of(i): NeedleLocation(0, 80 * i, 10, 0, i + 1) for i in range(10)}
        index.apply([Record(0, k, e) for k, e in entries.items()], {})
        for _ in range(2):
            for key, entry in entries.items():
                assert index.get(0, key) == entry
                assert index.cached <= capacity
        assert index.cached == capacity
    finally:
        index.close()
