"""The cache-tier interface: a bounded store of immutable objects addressed by their remote key.

Keys are repository keys (`chunks/ab/<hash>`, `trees/ab/<hash>`, `commits/ab/<hash>`): the
object's name is in the key, so any tier can check an entry against it. Because objects are
immutable, an entry is never stale: a tier only ever has the right bytes, or none (a corrupt
entry is dropped and reported as a miss). A tier that fails is a logged miss, never an error
for the reader (mountpoint-s3's rule); only the origin failing is.

Tiers are called from several threads at once and must be thread-safe.

Two tiers implement it: `memory.MemoryCache` (in the daemon, not verified: it only holds what
was verified on the way in) and `disk.DiskCache` (the node's SSD, checked on every hit by the
sums of the sub-blocks it reads; an entry without sums by its hash); `tiered.TieredStore`
puts them in front of the origin. A peer tier (other nodes' caches) is designed in
docs/design.md but not built yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# An object's bytes as the tiers hand them on: a bytes object, or a read-only memoryview of a
# buffer that nobody writes (the disk tier's large reads around the page cache, kept without a
# copy: cachefs.directio.result_buffer). Either is immutable; either slices without a copy.
Blob = bytes | memoryview

# verify(key, data) -> True if `data` is the intact object named by `key`.
Verifier = Callable[[str, bytes], bool]


@dataclass
class TierStats:
    """Counters of one tier (monotonic, except `used_bytes`)."""

    hits: int = 0
    misses: int = 0
    hit_bytes: int = 0
    inserts: int = 0
    insert_bytes: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    corrupt: int = 0
    errors: int = 0
    range_reads: int = 0  # hits answered from a part of an entry (the disk tier's get_range)
    direct_reads: int = 0  # reads that went around the page cache (O_DIRECT)
    bytes_read: int = 0  # bytes read from the tier's storage (the disk tier: from its files)
    upgrades: int = 0  # the disk tier: entries without sub-block sums verified and given them
    entry_prefetches: int = 0  # the disk tier: whole entries asked for (a pack of small files)
    entry_prefetches_skipped: int = 0  # ... not asked for: the page cache had evicted them
    used_bytes: int = 0
    capacity_bytes: int = 0


class CacheTier(Protocol):
    """One cache tier: memory, the SSD directory, or the peer ring (`peer.py`)."""

    name: str

    def get(self, key: str) -> Blob | None:
        """The object's bytes if this tier holds an intact copy, else None (never raises)."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes | memoryview | None:
        """Bytes [offset, offset + length) of the object (fewer if it ends first) if this tier
        holds an intact copy, else None (never raises for a valid range)."""
        ...

    def put(self, key: str, data: Blob) -> None:
        """Offer an object (already verified by the caller); the tier may decline or evict."""
        ...

    def contains(self, key: str) -> bool:
        """True if the tier holds `key` (without reading or verifying it)."""
        ...

    def stats(self) -> TierStats:
        """A snapshot of the tier's counters."""
        ...

    def close(self) -> None:
        """Release resources; calling it twice is harmless."""
        ...
