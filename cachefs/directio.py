"""Reads and writes around the page cache: O_DIRECT with page-aligned buffers, and cachestat(2).

Why. Data that streams through once (a chunk fetched into the SSD tier, a large needle read from a
storage server's segment) gains nothing from the page cache and costs a kernel copy of every byte
into freshly allocated pages: measured here, 2 GB of 4 MiB buffered writes cost 2.6-5.0 s of
system CPU where O_DIRECT from a reused aligned buffer cost 0.2 s, and a 3.2 GB checkout's cold
chunk reads cost each storage server 2.2 s of system CPU filling pages it never used again. So
large transfers go around it, while what is already cached is read from the cache: `fully_cached`
asks cachestat(2), which only looks, where a read with RWF_NOWAIT would start readahead on a miss.

How. O_DIRECT needs the file offset, the length and the buffer address aligned to the device's
block (`BLOCK`, 4096: a multiple of every logical block size in use); `AlignedBuffers` keeps
page-aligned anonymous mappings for reuse, since a fresh mapping faults and zeroes every page
(`result_buffer` gives a fresh one for a read whose bytes are kept). A
file system without O_DIRECT (tmpfs) makes `open_direct` return None: callers then go through
the page cache. Without cachestat(2) (Linux < 6.5, or a seccomp filter) `fully_cached` returns
None and callers read through the page cache.

Shared ground: the SSD tier (cachefs/cache/disk.py) and the storage server (storage_server/
direct.py, storage_server/volume.py) both use it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
import threading

log = logging.getLogger("cachefs.directio")

BLOCK = 4096
# Reads of at least this much (a chunk) go around the page cache when it does not hold them,
# in the SSD tier and in the storage server; smaller ones through it: on this kind of VM a
# random 110 KB read took twice as long with O_DIRECT (5,000 against 11,000 reads/s, 8
# threads), and a small read's page-cache fill is cheap, where a chunk's is not.
DIRECT_READ_MIN = 1 << 20
_MIN_BUFFER = 64 << 10
_LARGE_STEP = 1 << 20  # buffers above this grow in steps of it (a 4 MiB chunk's needle: 5 MiB)


def align_down(n: int) -> int:
    return n & ~(BLOCK - 1)


def align_up(n: int) -> int:
    return (n + BLOCK - 1) & ~(BLOCK - 1)


def open_direct(path: os.PathLike[str] | str, flags: int, mode: int = 0o777) -> int | None:
    """`path` opened with `flags | O_DIRECT`; None where the file system refuses O_DIRECT
    (with O_CREAT the file may have been created all the same)."""
    try:
        return os.open(path, flags | os.O_DIRECT, mode)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        log.info("%s: the file system refuses O_DIRECT; going through the page cache", path)
        return None


class AlignedBuffers:
    """Reusable page-aligned buffers (anonymous mmaps) for O_DIRECT. A fresh mapping is slow
    to fill (every page faults and is zeroed), so buffers are kept, in power-of-two sizes up to
    1 MiB and whole MiB above, up to `keep_bytes` in all; what is beyond that is unmapped."""

    def __init__(self, keep_bytes: int = 128 << 20) -> None:
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0

    def take(self, size: int) -> mmap.mmap:
        """A page-aligned buffer of at least `size` bytes (contents undefined)."""
        if size > _LARGE_STEP:
            cls = (size + _LARGE_STEP - 1) // _LARGE_STEP * _LARGE_STEP
        else:
            cls = max(_MIN_BUFFER, 1 << (size - 1).bit_length())
        with self._lock:
            free = self._free.get(cls)
            if free:
                self._kept -= cls
                return free.pop()
        return mmap.mmap(-1, cls)

    def give(self, buf: mmap.mmap) -> None:
        """Return a buffer from `take` (no view of it may outlive this call)."""
        with self._lock:
            if self._kept + len(buf) <= self.keep_bytes:
                self._free.setdefault(len(buf), []).append(buf)
                self._kept += len(buf)
                return
        buf.close()


BUFFERS = AlignedBuffers()


def result_buffer(size: int) -> mmap.mmap:
    """A fresh page-aligned buffer of at least `size` bytes for an O_DIRECT read whose bytes
    are kept (handed on without a copy: a chunk the memory tier will hold). Its pages fault in
    inside the read system call, outside the GIL, where copying a pooled buffer out into a new
    bytes object faults and copies every page while holding it (measured: that copy was most
    of the time the GIL was held while large files streamed from the SSD tier).

    Private, because Python's anonymous maps are shared by default, which makes them shmem
    (slower faults). No transparent huge pages: on this kind of VM, clearing fresh huge pages
    made whole passes 3x slower, one time in two."""
    return mmap.mmap(-1, align_up(max(size, 1)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class Cachestat(ctypes.Structure):
    """Page counts of a file range in the page cache (struct cachestat of cachestat(2))."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


_SYS_CACHESTAT = 451  # Linux >= 6.5, the same number on every architecture
_libc = ctypes.CDLL(None, use_errno=True)
_cachestat_works = sys.platform == "linux"


def _pages(offset: int, length: int) -> tuple[int, int]:
    """(first page, number of pages) holding `length` bytes at `offset`."""
    first = offset // mmap.PAGESIZE
    return first, (offset + length + mmap.PAGESIZE - 1) // mmap.PAGESIZE - first


def _cachestat_call(fd: int, offset: int, length: int) -> Cachestat:
    """cachestat(2) through ctypes (a few microseconds: this is for reads of a MiB or more)."""
    span = _CachestatRange(offset, length)
    stat = Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return stat


def cachestat(fd: int, offset: int, length: int) -> Cachestat | None:
    """The page-cache state of the pages holding `length` bytes at `offset` (cachestat(2):
    it only looks, where a read with RWF_NOWAIT would start readahead on a miss); None where
    the kernel has no cachestat."""
    global _cachestat_works
    if not _cachestat_works:
        return None
    first, pages = _pages(offset, length)
    try:
        return _cachestat_call(fd, first * mmap.PAGESIZE, pages * mmap.PAGESIZE)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM):  # an older kernel, or a seccomp filter
            log.info("no cachestat(2) (%s): large reads go through the page cache",
                     os.strerror(e.errno))
            _cachestat_works = False
            return None
        raise


def fully_cached(fd: int, offset: int, length: int) -> bool | None:
    """Whether every page of the range is in the page cache; None without cachestat."""
    stat = cachestat(fd, offset, length)
    if stat is None:
        return None
    return stat.nr_cache >= _pages(offset, length)[1]


class DirectReader:
    """Reads byte ranges of one segment with O_DIRECT (see the module docstring)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, path: os.PathLike[str] | str) -> DirectReader | None:
        """A reader of the segment at `path`; None where the file system refuses O_DIRECT."""
        fd = open_direct(path, os.O_RDONLY)
        return None if fd is None else cls(fd)

    def read(self, offset: int, length: int) -> bytes:
        """The bytes at `offset` (fewer at the end of the file): the aligned blocks around them
        are read into a reused buffer, and they are copied out of it."""
        start, stop = align_down(offset), align_up(offset + length)
        buf = BUFFERS.take(stop - start)
        try:
            with memoryview(buf) as view:
                n = os.preadv(self.fd, [view[:stop - start]], start)
                return bytes(view[offset - start:min(n, offset - start + length)])
        finally:
            BUFFERS.give(buf)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
