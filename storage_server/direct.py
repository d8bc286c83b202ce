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

Large reads. A needle of at least `cachefs.directio.DIRECT_READ_MIN` bytes (a cachefs chunk) is
read from the page cache when all of it is there (`fully_cached` asks with cachestat(2), which
starts no I/O, where a read with RWF_NOWAIT would start readahead on a miss) and otherwise with
O_DIRECT (`DirectReader`) into a reused aligned buffer and copied out: a cold chunk costs no
page-cache fill (measured: that fill was 2.2 s of system CPU per storage server for a 3.2 GB
checkout), and chunks streaming through do not evict the small, hot needles. Small needles are
always read through the page cache, which is their cache.

The aligned buffers, `DirectReader` and cachestat(2) are shared with the SSD tier in
`cachefs/directio.py`. A file system without O_DIRECT (tmpfs) makes `DirectAppender.open` and
`DirectReader.open` return None: the volume then appends and reads through the page cache as before.
"""

from __future__ import annotations

import errno
import logging
import os

from cachefs.directio import BLOCK, BUFFERS, align_down, align_up, open_direct
from cachefs.errors import LocalIOError

log = logging.getLogger(__name__)

_ZEROS = bytes(BLOCK)


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
        fd = open_direct(path, os.O_WRONLY)
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
