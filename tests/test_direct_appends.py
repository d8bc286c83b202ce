"""O_DIRECT appends and large reads (storage_server/direct.py): needles bypass the page cache, the
zero fill past the last needle is cut at close and, after a crash, quietly by recovery; a failed
write is cut back; a large needle is read from the page cache when it is all there and with
O_DIRECT otherwise; without O_DIRECT the store appends and reads through the page cache."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cachefs.directio import BLOCK, DIRECT_READ_MIN, AlignedBuffers
from cachefs.errors import CorruptObject, LocalIOError
from storage_server.needle import HEADER_BYTES, needle_size
from storage_server.store import VolumeStore
from tests.storage_servers import needles


def segment(data_dir: Path) -> Path:
    (only,) = sorted((data_dir / "volumes").glob("*/*.seg"))
    return only


def packed_size(items: dict[bytes, bytes]) -> int:
    return sum(needle_size(len(d)) for d in items.values())


def resident_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux fincore, which asks mincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES",
                          str(path)], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def test_appends_bypass_the_page_cache_and_close_cuts_the_zero_fill(tmp_path: Path) -> None:
    items = needles(40, size=7000)  # needles cross block boundaries at every offset
    with VolumeStore(tmp_path, volumes=1) as store:
        for key, data in items.items():  # one append each: every one rewrites the last block
            store.put_many([(key, data)])
        path = segment(tmp_path)
        size = path.stat().st_size
        assert size % BLOCK == 0 and 0 <= size - packed_size(items) < BLOCK
        assert resident_bytes(path) == 0  # nothing went through the page cache
        with open(path, "rb") as f:
            f.seek(packed_size(items))
            assert not any(f.read())  # the fill is zeros
        for key, data in items.items():
            assert store.get(key) == data
    assert path.stat().st_size == packed_size(items)  # at rest: exactly the needles


def test_recovery_cuts_the_zero_fill_a_crash_left_without_reporting_a_torn_tail(
        tmp_path: Path) -> None:
    first, second = needles(25, size=3000), needles(25, size=3000, tag=b"more")
    live = tmp_path / "live"
    # the indexer never runs: LMDB stays as it was opened, so a copy is a crashed store
    with VolumeStore(live, volumes=1, index_interval_ms=3_600_000) as store:
        store.put_many(list(first.items()))
        crashed = tmp_path / "crashed"
        shutil.copytree(live, crashed)
    assert segment(crashed).stat().st_size % BLOCK == 0
    with VolumeStore(crashed) as store:
        report = store.recovered
        assert report["needles_indexed"] == len(first)
        assert report["bytes_truncated"] == 0 and report["truncated"] == []
        assert segment(crashed).stat().st_size == packed_size(first)
        store.put_many(list(second.items()))  # its last block is read back from disk
    with VolumeStore(crashed) as store:
        assert store.recovered["needles_indexed"] == 0
        for key, data in {**first, **second}.items():
            assert store.get(key) == data
        assert store.verify()["corrupt"] == []
    assert segment(crashed).stat().st_size == packed_size(first) + packed_size(second)


def test_a_failed_direct_write_is_cut_back_and_writing_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before, failed, after = (needles(10, size=5000, tag=t) for t in (b"a", b"b", b"c"))
    real_pwrite = os.pwrite

    def disk_full(fd: int, data: object, offset: int) -> int:
        real_pwrite(fd, memoryview(data)[:BLOCK], offset)  # type: ignore[arg-type]
        raise OSError(errno.ENOSPC, "No space left on device")

    with VolumeStore(tmp_path, volumes=1) as store:
        store.put_many(list(before.items()))
        monkeypatch.setattr(os, "pwrite", disk_full)
        with pytest.raises(LocalIOError, match="No space left"):
            store.put_many([next(iter(failed.items()))])
        monkeypatch.undo()
        store.put_many(list(after.items()))
        for key, data in {**before, **after}.items():
            assert store.get(key) == data
        assert store.has_many(list(failed)[:1]) == [False]
    assert segment(tmp_path).stat().st_size == packed_size(before) + packed_size(after)
    with VolumeStore(tmp_path) as store:
        assert store.recovered["bytes_truncated"] == 0
        assert store.verify() == {"checked": 20, "corrupt": [], "volumes": [0]}


@pytest.mark.parametrize("how", ["refused", "buffered"])
def test_without_o_direct_appends_go_through_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    items = needles(20, size=7000)
    if how == "refused":  # a file system without O_DIRECT refuses the open with EINVAL
        real_open = os.open

        def no_direct(path: str, flags: int, *args: int) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", no_direct)
    with VolumeStore(tmp_path, volumes=1, direct_io=how != "buffered") as store:
        store.put_many(list(items.items()))
        path = segment(tmp_path)
        assert path.stat().st_size == packed_size(items)  # no zero fill
        assert resident_bytes(path) > 0  # the page cache holds what was written
        for key, data in items.items():
            assert store.get(key) == data


def test_aligned_buffers_are_page_aligned_and_reused() -> None:
    pool = AlignedBuffers(keep_bytes=1 << 20)
    buf = pool.take(100_000)
    assert len(buf) == 128 << 10
    assert ctypes.addressof(ctypes.c_char.from_buffer(buf)) % BLOCK == 0
    pool.give(buf)
    assert pool.take(70_000) is buf  # same size class: the warm mapping again
    big = pool.take(4 << 20)  # more than it keeps: not kept
    pool.give(big)
    assert big.closed


def test_large_needles_missing_from_the_page_cache_are_read_around_it(tmp_path: Path) -> None:
    small = needles(5, size=100_000)
    large = needles(3, size=2 * DIRECT_READ_MIN, tag=b"large")
    with VolumeStore(tmp_path, volumes=1) as store:
        store.put_many([*small.items(), *large.items()])
        path = segment(tmp_path)
        for _ in range(2):  # cold both times: a direct read leaves nothing cached
            for key, data in large.items():
                assert store.get(key) == data
                assert store.get(key, 1000, 10) == data[1000:1010]
        assert store.stat()["direct_reads"] == 2 * 2 * len(large)
        assert resident_bytes(path) == 0
        for key, data in small.items():  # small needles: through the page cache
            assert store.get(key) == data
        assert 0 < resident_bytes(path) < packed_size(large)
        path.read_bytes()  # now all of it is cached: large reads come from the page cache
        before = store.stat()
        for key, data in large.items():
            assert store.get(key) == data
        after = store.stat()
        assert after["direct_reads"] == before["direct_reads"]
        assert after["preads"] - before["preads"] == len(large)  # one data read each


def test_a_corrupt_large_needle_read_directly_is_reported(tmp_path: Path) -> None:
    large = needles(2, size=2 * DIRECT_READ_MIN, tag=b"bad")
    key = next(iter(large))
    with VolumeStore(tmp_path, volumes=1) as store:
        store.put_many(list(large.items()))
        entry = store.index.get(0, key)
        assert entry is not None
        fd = os.open(segment(tmp_path), os.O_RDWR)
        try:  # flip a byte on disk, not through the page cache the read would skip
            where = entry.offset + HEADER_BYTES + DIRECT_READ_MIN // 2
            byte = os.pread(fd, 1, where)
            os.pwrite(fd, bytes([byte[0] ^ 1]), where)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        with pytest.raises(CorruptObject, match="checksum"):
            store.get(key)
        assert store.stat()["corrupt_reads"] == 1 and store.stat()["direct_reads"] == 1


def test_without_cachestat_large_needles_are_read_through_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cachefs.directio as directio

    monkeypatch.setattr(directio, "_cachestat_works", False)  # an older kernel
    large = needles(2, size=2 * DIRECT_READ_MIN, tag=b"old")
    with VolumeStore(tmp_path, volumes=1) as store:
        store.put_many(list(large.items()))
        for key, data in large.items():
            assert store.get(key) == data
        assert store.stat()["direct_reads"] == 0
        assert resident_bytes(segment(tmp_path)) > 0


def test_cachestat_through_ctypes_agrees_with_the_compiled_call(tmp_path: Path) -> None:
    import cachefs.directio as directio

    try:
        from storage_server import _needle
    except ImportError:
        pytest.skip("storage_server._needle is not built")
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3 * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            compiled = _needle.cachestat(fd, 0, 3 * 4096)
        except OSError as e:
            if e.errno in (errno.ENOSYS, errno.EPERM):
                pytest.skip("no cachestat(2) on this kernel")
            raise
        by_ctypes = directio._cachestat_call(fd, 0, 3 * 4096)
        assert compiled[0] == by_ctypes.nr_cache == 3
        assert directio.cachestat(fd, 10, 5000).nr_cache == 2  # the two pages the range touches
        with pytest.raises(OSError):
            _needle.cachestat(-1, 0, 4096)
    finally:
        os.close(fd)
