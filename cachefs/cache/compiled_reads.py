"""The disk tier's compiled read path for FUSE mounts: start it, name its files, take back the rest.

The engine (`cachefs.cache._fastread`, Cython and C; its docstring has the why and the how)
answers READs from the disk tier's entries on its own threads, before Python sees them,
through the read hook of cachefs's pyfuse3 patch. This wrapper is what the mount daemon uses:
`DiskCache.compiled_reads` makes one with the tier's layout and policy, the FUSE layer installs
`hook` and runs `serve_handed_back`, the file system registers each file's inode and extents
(`add`) as the kernel learns it and drops it when the kernel forgets it (`remove`), and the
tiered store names the keys Python serves from memory (`leave_to_python`).
A request the engine cannot answer (the entry absent, without sums, corrupt) comes back to the
event loop and is answered by the normal path, which fetches from the origin.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

import trio
from isal import isal_zlib  # its module exports ISA-L's CRC-32, which the engine uses

try:
    from cachefs.cache import _fastread
except ImportError:  # not built (setup.py builds it as optional): every READ goes to Python
    _fastread = None  # type: ignore[assignment]

log = logging.getLogger("cachefs.cache.compiled_reads")

# Measured (10,000 small files, SSD entries on disk, 8 shuffled readers, 2 vCPUs): 2-4 threads
# 5,400-6,100 files/s, 8 threads 4,500-5,000 (a hit queued behind misses waits for the disk
# less, and fewer threads switch less), Python alone 4,300-5,100.
DEFAULT_THREADS = 4
# What `DiskCache.stats` adds from the engine's counters to its own, engine name -> TierStats
TIER_COUNTERS = {"hits": "hits", "hit_bytes": "hit_bytes", "range_reads": "range_reads",
                 "bytes_read": "bytes_read", "corrupt": "corrupt",
                 "direct_reads": "direct_reads",
                 "prefetches": "entry_prefetches",
                 "prefetches_skipped": "entry_prefetches_skipped"}

# answer(request address, inode, size, offset): answers a handed-back READ the normal way
Answer = Callable[[int, int, int, int], Awaitable[Any]]


def unavailable() -> str | None:
    """Why this build has no compiled read path, or None."""
    if _fastread is None:
        return "cachefs.cache._fastread is not built"
    return None


class CompiledReads:
    """The compiled read path of one mount daemon (one per process)."""

    def __init__(self, objects: str, *, xattr: str, sums_version: int, sub_block_shift: int,
                 max_sub_blocks: int, touch_interval_ns: int, eviction_limit: float,
                 eviction_weight: float, direct_read_min: int,
                 threads: int = DEFAULT_THREADS) -> None:
        why = unavailable()
        if why is not None:
            raise RuntimeError(why)
        self._layout = (objects, xattr, isal_zlib.__file__ or "", sums_version,
                        sub_block_shift, max_sub_blocks, touch_interval_ns, eviction_limit,
                        eviction_weight, direct_read_min)
        self.threads = threads
        self._eventfd: int | None = None

    def start(self) -> None:
        """Start the worker threads; RuntimeError if the engine cannot run here."""
        self._eventfd = _fastread.start(*self._layout, self.threads)
        log.debug("compiled read path: %d threads, CRC-32 by %s", self.threads,
                  _fastread.crc_implementation())

    @staticmethod
    def crc_implementation() -> str | None:
        """"isa-l" or "zlib" while running, else None."""
        return _fastread.crc_implementation()  # type: ignore[no-any-return]

    @property
    def hook(self) -> object:
        """The capsule for `pyfuse3.set_read_hook`."""
        return _fastread.hook_capsule()

    @property
    def running(self) -> bool:
        return bool(_fastread.running())

    @staticmethod
    def add(ino: int, extents: Sequence[tuple[str, int, int]], *, large: bool) -> None:
        """READs of inode `ino` may be answered from its `extents` ((chunk, offset, length) in
        file order; chunk "" for zeros). `large`: a file read as a stream (its chunks read
        around the page cache, and left to Python while its memory tier holds them), not a
        small file of a pack."""
        _fastread.register(ino, extents, large)

    @staticmethod
    def leave_to_python(*keys: Mapping[str, object]) -> None:
        """Large files' READs over a chunk whose key is in one of these live dicts (at most
        two: the memory tier's entries, the fetches in flight) are left to Python."""
        _fastread.leave_to_python(*keys)

    @staticmethod
    def remove(ino: int) -> None:
        _fastread.unregister(ino)

    @staticmethod
    def lookup(ino: int) -> tuple[tuple[tuple[str, int, int], ...], bool] | None:
        """What `add` registered for `ino`: (extents, large), or None."""
        return _fastread.lookup(ino)  # type: ignore[no-any-return]

    async def serve_handed_back(self, answer: Answer) -> None:
        """Answer what the engine hands back, each in a task of its own (forever)."""
        assert self._eventfd is not None, "start() first"
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(self._eventfd)
                with suppress(BlockingIOError):  # another wake-up read it first
                    os.read(self._eventfd, 8)
                for req, ino, size, off, reason in _fastread.take_handed_back():
                    if reason == _fastread.CORRUPT:
                        log.warning("inode %d: its disk-tier entry failed a sub-block sum and "
                                    "was deleted; fetching it again", ino)
                    nursery.start_soon(answer, req, ino, size, off)

    def stop(self) -> None:
        """Answer or hand back everything queued, then stop the threads (before the FUSE
        session ends: the engine holds its requests). Handed-back requests not yet answered
        are dropped with the session."""
        _fastread.stop()
        leftover = _fastread.take_handed_back()
        if leftover:
            log.debug("%d handed-back READs dropped with the session", len(leftover))
        if self._eventfd is not None:
            _fastread.close_eventfd()
            self._eventfd = None

    @staticmethod
    def counters() -> dict[str, int]:
        """The engine's counters: reads, read_bytes, hits, ..., handed_back, declined,
        direct_reads, left_to_python."""
        return _fastread.counters()  # type: ignore[no-any-return]
