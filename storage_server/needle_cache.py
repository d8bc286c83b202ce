"""Keeps the data of hot needles in a storage server's memory, so repeated reads skip the disk.

`NeedleCache` is bounded in bytes (each entry counts the whole buffer its needle was read into:
header, data, footer and padding). It holds only needles whose checksum passed (the store
hands it the verified data), keyed by (key, sequence): a needle that was deleted and stored
again has a new sequence, so an entry can never answer for another needle; the store looks the
key up in its index before asking, so a deleted needle is never served from here either.

**Admission** (TinyLFU, Einziger et al. 2017): every request counts in a count-min sketch of
recent accesses (four rows of 4-bit counters, all halved every `SAMPLE_FACTOR` x width requests,
so old popularity fades). While the cache has room every needle read is admitted; once it is
full a needle is admitted only if it was asked for more often than each entry it would evict
(least recently used first). A scan of many distinct needles, each asked for once, is refused
instead of flushing the hot ones. Chosen over "admit on the second touch" because that costs
a second disk read of every needle that is read again (at the start of an epoch: of every
chunk), while TinyLFU admits the first read while there is room and only filters at eviction.

**Single flight**: concurrent misses on one needle make one disk read: the first caller reads,
the others wait for its result (or its error: a corrupt needle is reported to each of them and
admitted for none). A flight joined by others counts each of them in the sketch.

Counters (`stats()`): hits, misses (disk reads the cache asked for), shared misses (callers
that waited for another's read), hit bytes, admissions, evictions, admissions refused, plus
the entries and bytes held and the bound. Thread-safe; one lock, held only for dictionary
work, never during a read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

ROWS = 4
MIN_WIDTH = 1 << 10
MAX_WIDTH = 1 << 20
WIDTH_PER_BYTES = 64 << 10  # one sketch counter per 64 KiB of the bound (per row)
COUNTER_MAX = 15
SAMPLE_FACTOR = 10  # halve the sketch every SAMPLE_FACTOR x width requests
_HALVE = bytes(i >> 1 for i in range(256))

Loaded = tuple[memoryview, int] | None
"""What a loader returns: (the verified data, bytes it holds in memory), or None: the needle
moved meanwhile and the caller looks it up again (nothing is cached)."""


class FrequencySketch:
    """A count-min sketch of how often each key was asked for recently (4-bit counters, halved
    periodically). Keys are BLAKE3 hashes, so their bytes are the hash functions."""

    def __init__(self, width: int) -> None:
        self.width = 1 << max(width - 1, 1).bit_length()  # a power of two
        self._mask = self.width - 1
        self._rows = [bytearray(self.width) for _ in range(ROWS)]
        self._samples = 0
        self._reset_at = SAMPLE_FACTOR * self.width

    def _slots(self, key: bytes) -> list[int]:
        return [int.from_bytes(key[4 * i:4 * i + 4], "little") & self._mask
                for i in range(ROWS)]

    def add(self, key: bytes, times: int = 1) -> None:
        for row, slot in zip(self._rows, self._slots(key)):
            row[slot] = min(COUNTER_MAX, row[slot] + times)
        self._samples += times
        if self._samples >= self._reset_at:
            self._rows = [bytearray(row.translate(_HALVE)) for row in self._rows]
            self._samples //= 2

    def estimate(self, key: bytes) -> int:
        return min(row[slot] for row, slot in zip(self._rows, self._slots(key)))


class _Flight:
    """One disk read in progress and the callers waiting for it."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Loaded = None
        self.error: BaseException | None = None


class NeedleCache:
    """Verified needle data in memory, at most `max_bytes`, TinyLFU admission, single flight."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"memory cache of {max_bytes} bytes: must not be negative")
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[bytes, tuple[int, memoryview, int]] = OrderedDict()
        self._flights: dict[tuple[bytes, int], _Flight] = {}
        self._lock = threading.Lock()
        self._sketch = FrequencySketch(min(MAX_WIDTH, max(MIN_WIDTH,
                                                          max_bytes // WIDTH_PER_BYTES)))
        self.hits = self.misses = self.shared = self.hit_bytes = 0
        self.evictions = self.refused = self.admissions = 0

    def get(self, key: bytes, sequence: int, load: Callable[[], Loaded]) -> memoryview | None:
        """The data of needle (`key`, `sequence`): from memory, or from `load()` (called by
        one caller at a time per needle; the others wait for its answer). None where `load`
        says the needle moved; `load`'s exception reaches every caller waiting on it."""
        with self._lock:
            self._sketch.add(key)
            cached = self._entries.get(key)
            if cached is not None:
                if cached[0] == sequence:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    self.hit_bytes += len(cached[1])
                    return cached[1]
                self._drop(key)  # another needle of this key now: this one is gone
            flight = self._flights.get((key, sequence))
            leader = flight is None
            if leader:
                self.misses += 1
                flight = self._flights[(key, sequence)] = _Flight()
            else:
                self.shared += 1
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return None if flight.result is None else flight.result[0]
        try:
            flight.result = load()
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[(key, sequence)]
                if flight.result is not None:
                    self._admit(key, sequence, *flight.result)
            flight.done.set()
        return None if flight.result is None else flight.result[0]

    def _admit(self, key: bytes, sequence: int, data: memoryview, nbytes: int) -> None:
        """Keep `data` if it fits, evicting least recently used entries that were asked for
        less often than it (caller holds the lock)."""
        if key in self._entries:
            return
        if nbytes > self.max_bytes:
            self.refused += 1
            return
        need = self.used_bytes + nbytes - self.max_bytes
        if need > 0:
            frequency = self._sketch.estimate(key)
            freed = 0
            victims = []
            for victim, (_, _, size) in self._entries.items():
                if self._sketch.estimate(victim) >= frequency:
                    self.refused += 1
                    return
                victims.append(victim)
                freed += size
                if freed >= need:
                    break
            for victim in victims:
                self._drop(victim)
                self.evictions += 1
        self._entries[key] = (sequence, data, nbytes)
        self.used_bytes += nbytes
        self.admissions += 1

    def _drop(self, key: bytes) -> None:
        _, _, nbytes = self._entries.pop(key)
        self.used_bytes -= nbytes

    def discard(self, key: bytes) -> None:
        """Forget `key` (a delete: its memory is given back now rather than at eviction)."""
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def stats(self) -> dict[str, Any]:
        """The counters and the current size; JSON-able."""
        with self._lock:
            return {"capacity_bytes": self.max_bytes, "used_bytes": self.used_bytes,
                    "entries": len(self._entries), "hits": self.hits, "misses": self.misses,
                    "shared_misses": self.shared, "hit_bytes": self.hit_bytes,
                    "admissions": self.admissions, "evictions": self.evictions,
                    "admissions_refused": self.refused}
