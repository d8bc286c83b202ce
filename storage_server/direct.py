"""O_DIRECT appends to a segment file: page-aligned write buffers and the partial last block.

Why. Appending through the page cache costs a kernel copy of every byte into freshly allocated
page-cache pages, then writeback: measured here, 2 GB of 4 MiB buffered writes with an
fdatasync every 16 cost 2.6-5.0 s of system CPU and ran at 310-540 MB/s, where the same writes
with O_DIRECT from one reused aligned buffer cost 0.2 s and ran at 980-1,060 MB/s (the disk's
speed). A storage server's CPU goes to exactly that copy, so writes go around the page cache.

How. O_DIRECT needs the file offset, the length and the buffer address aligned to the device's
block (`BLOCK`, 4096: a multiple of every logical block size in use). Needles are packed
(8-byte padding, storage_server/FORMAT.md), so an append starts inside the segment's last,
partial block: the appender keeps that block's bytes in memory and writes them again in front
of the new needle, from `align_down(end)`, zero-filled up to the next block boundary. The bytes
rewritten are the ones already on disk, so a reader of the previous needle sees the same data
whichever version of the block it gets, and a failed write leaves nothing but a tail to cut.
Appends of one segment are serialized by the volume's lock (the rewritten block is shared by
neighbours). The zeros past the last needle are cut by `Segment.close` and, after a crash, by
recovery (storage_server/volume.py), so a segment's size is its needles' size at rest.

Durability is unchanged: an O_DIRECT write may still sit in the device's volatile cache and the
file's new size is metadata, so the group commit's fdatasync is what makes the needle durable.
Reads stay buffered (warm reads are the page cache's job); the kernel drops cached pages of a
range an O_DIRECT write covers.

Large reads. A needle of at least `DIRECT_READ_MIN` bytes (a cachefs chunk) is read from the
page cache when all of it is there (`fully_cached` asks with cachestat(2), which starts no I/O,
where a read with RWF_NOWAIT would start readahead on a miss) and otherwise with O_DIRECT
(`DirectReader`) into a reused aligned buffer and copied out: a cold chunk costs no page-cache
fill (measured: that fill was 2.2 s of system CPU per storage server for a 3.2 GB checkout),
and chunks streaming through do not evict the small, hot needles. Small needles are always read
through the page cache, which is their cache.

A file system without O_DIRECT (tmpfs) makes `DirectAppender.open` and `DirectReader.open` return
None: the volume then appends and reads through the page cache as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
import threading

from cachefs.errors import LocalIOError

log = logging.getLogger(__name__)

BLOCK = 4096
DIRECT_READ_MIN = 1 << 20
_ZEROS = bytes(BLOCK)
_MIN_BUFFER = 64 << 10
_LARGE_STEP = 1 << 20  # buffers above this grow in steps of it (a 4 MiB chunk's needle: 5 MiB)


def align_down(n: int) -> int:
    return n & ~(BLOCK - 1)


def align_up(n: int) -> int:
    return (n + BLOCK - 1) & ~(BLOCK - 1)


def _open_direct(path: os.PathLike[str] | str, flags: int) -> int | None:
    """`path` opened with `flags | O_DIRECT`; None where the file system refuses O_DIRECT."""
    try:
        return os.open(path, flags | os.O_DIRECT)
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


class DirectAppender:
    """Appends needles to one segment with O_DIRECT (see the module docstring). Not
    thread-safe: its volume's lock serializes appends."""

    def __init__(self, fd: int, tail: bytes) -> None:
        self.fd = fd
        self.tail = tail  # the bytes of the segment's last partial block
        self.padded_end = 0  # how far the zero fill of the last write reached

    @classmethod
    def open(cls, path: os.PathLike[str] | str, buffered_fd: int,
             end: int) -> DirectAppender | None:
        """An appender for the segment at `path` whose needles end at `end` (its partial last
        block is read through `buffered_fd`); None where the file system refuses O_DIRECT."""
        fd = _open_direct(path, os.O_WRONLY)
        if fd is None:
            return None
        head = end - align_down(end)
        tail = os.pread(buffered_fd, head, align_down(end)) if head else b""
        if len(tail) != head:
            os.close(fd)
            raise LocalIOError(f"{path}: {len(tail)} bytes of its last block, expected {head}")
        return cls(fd, tail)

    def append(self, parts: tuple[bytes | memoryview, ...], length: int, offset: int) -> None:
        """Write the needle `parts` (`length` bytes in all) at `offset`, the segment's end.
        On failure the file is cut back to `offset` and LocalIOError raised."""
        head = len(self.tail)
        start = offset - head
        if align_down(offset) != start:
            raise LocalIOError(f"direct append at {offset}: the kept tail covers {head} bytes")
        total = head + length
        size = align_up(total)
        buf = BUFFERS.take(size)
        try:
            with memoryview(buf) as view:
                view[:head] = self.tail
                pos = head
                for part in parts:
                    view[pos:pos + len(part)] = part
                    pos += len(part)
                view[total:size] = _ZEROS[:size - total]
                self._write(view[:size], start, offset)
                self.tail = bytes(view[align_down(total):total])
        finally:
            BUFFERS.give(buf)
        self.padded_end = start + size

    def _write(self, view: memoryview, start: int, offset: int) -> None:
        done = 0
        try:
            while done < len(view):
                n = os.pwrite(self.fd, view[done:], start + done)
                if n <= 0 or (n % BLOCK and done + n < len(view)):
                    raise OSError(errno.EIO, f"O_DIRECT pwrite wrote {n} bytes")
                done += n
        except OSError as e:
            try:
                os.ftruncate(self.fd, offset)
            except OSError:
                log.exception("cutting a failed append back to %d", offset)
            raise LocalIOError(f"writing a needle failed: {e}") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def _cachestat_ctypes(fd: int, offset: int, length: int) -> Cachestat:
    """cachestat(2) through ctypes, where storage_server._needle is not built."""
    span = _CachestatRange(offset, length)
    stat = Cachestat()
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(stat), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return stat


def _cachestat_compiled(fd: int, offset: int, length: int) -> Cachestat:
    return Cachestat(*_compiled_cachestat(fd, offset, length))


try:  # the compiled call (storage_server/_needle.pyx), where it is built
    from storage_server._needle import cachestat as _compiled_cachestat
except ImportError:
    _cachestat_call = _cachestat_ctypes
else:
    _cachestat_call = _cachestat_compiled


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
        fd = _open_direct(path, os.O_RDONLY)
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
