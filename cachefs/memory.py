"""Process-wide malloc settings for moving 4 MiB chunks around without page-fault storms.

cachefs handles data as chunk-sized `bytes` (up to 4 MiB by default): gRPC messages, needles,
blocks read from disk. With glibc's defaults, buffers that size (and protobuf's arenas around
them) keep coming from fresh pages: `mmap`ped, zero-filled on first touch, given back when
freed, so every copy of a chunk pays ~1,000 page faults. Keeping them on the heap and not
trimming it took four threads encoding 120 Put requests of 4 MiB from ~494,000 page faults
and ~1.1 s of system time to ~20,000 and ~0.03 s, and a client sending 4 MiB Puts to a
storage server from ~3.5 to ~1.7 ms of system time per Put (tests/test_memory.py).

The cost is memory kept after a burst: at most `TRIM_THRESHOLD` per malloc arena, with
`ARENAS` arenas. `CACHEFS_MALLOC_DEFAULTS=1` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("cachefs.memory")

# mallopt(3) parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 << 20  # glibc's maximum: anything up to a 32 MiB buffer comes from the heap
TRIM_THRESHOLD = 128 << 20  # free heap kept per arena before it is given back
ARENAS = 4  # bounds the memory kept: threads share these arenas

_tuned = False


def tune_malloc() -> bool:
    """Apply the settings above once per process (glibc only); whether they are in effect."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get("CACHEFS_MALLOC_DEFAULTS"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_ARENA_MAX, ARENAS)))
    if not ok:
        log.debug("mallopt refused a setting; keeping glibc's defaults for it")
    _tuned = ok
    return ok
