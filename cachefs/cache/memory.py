"""The memory tier: an in-process LRU of whole objects, bounded by the sum of their sizes.

Entries are the very objects that were offered (bytes, or read-only views of buffers nobody writes:
`cachefs.cache.base.Blob`), and `get` hands back that same object, so the FUSE layer replies
with `memoryview` slices of a cached chunk instead of copies. The
total size of the entries (sum of ``len(data)``) never exceeds the capacity: a put evicts the
least recently used entries until the new one fits, and an object larger than the whole capacity
is not cached at all. One lock guards an `OrderedDict` (most recently used last), so get and put
are O(1) and safe from any number of threads. Nothing is verified here: entries arrive verified
by the caller and live in process memory, where nothing can tear them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace

from cachefs.cache.base import Blob, TierStats


class MemoryCache:
    """A thread-safe, byte-bounded LRU of immutable objects (the `CacheTier` named "memory")."""

    name = "memory"

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, not {capacity_bytes}")
        self._capacity = capacity_bytes
        self._entries: OrderedDict[str, Blob] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._stats = TierStats(capacity_bytes=capacity_bytes)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def get(self, key: str) -> Blob | None:
        """The stored bytes object itself (not a copy), or None; a hit makes it most recent."""
        with self._lock:
            data = self._entries.get(key)
            if data is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            self._stats.hit_bytes += len(data)
            return data

    def get_range(self, key: str, offset: int, length: int) -> memoryview | None:
        """A slice (no copy) of the stored object, or None; counted as a hit like `get`."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: {offset}+{length}")
        data = self.get(key)
        return None if data is None else memoryview(data)[offset : offset + length]

    def put(self, key: str, data: Blob) -> None:
        """Cache `data` under `key`, evicting least recently used entries to make room."""
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and data.readonly):
            data = bytes(data)  # a bytearray or a writable view could change under us
        size = len(data)
        with self._lock:
            if key in self._entries:  # immutable objects: same key, same bytes
                self._entries.move_to_end(key)
                return
            if size > self._capacity:
                return
            while self._used + size > self._capacity:
                _, old = self._entries.popitem(last=False)
                self._used -= len(old)
                self._stats.evictions += 1
                self._stats.evicted_bytes += len(old)
            self._entries[key] = data
            self._used += size
            self._stats.inserts += 1
            self._stats.insert_bytes += size

    def contains(self, key: str) -> bool:
        """True if `key` is cached (does not count as a use)."""
        with self._lock:
            return key in self._entries

    def live_keys(self) -> Mapping[str, Blob]:
        """The entries' map itself, for a reader that only tests membership while holding
        the GIL (the compiled read path's hook): no copy, no lock, never to be changed."""
        return self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> TierStats:
        with self._lock:
            return replace(self._stats, used_bytes=self._used)

    def close(self) -> None:
        """Drop every entry (the counters are kept); harmless to call twice."""
        with self._lock:
            self._entries.clear()
            self._used = 0
