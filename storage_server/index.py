"""The needle index: one LMDB environment in DATA_DIR/index (layout: storage_server/FORMAT.md).

The segments are the source of truth; the index is a cache of them that recovery can always
bring up to date. Each volume records, per segment, the *indexed end*: every needle below it is
in the index, none above it is. Index entries and indexed ends change in one transaction, so
after any crash the index is some consistent earlier state and recovery scans each segment past
its indexed end. Between two needles of one key the higher `sequence` wins, wherever each lies,
which keeps a re-scan (or a rebuild from nothing) right even after compaction moved needles.

Sync settings: `sync=True, metasync=False`. Each commit flushes its data pages (one fdatasync)
but not the meta page, so a power cut may undo the last commit yet never corrupts the tree
(LMDB keeps ACI; we drop only D, which recovery restores from the segments). `sync=False` would
save that fdatasync but lets a power cut corrupt the environment. Compaction, which deletes
segment files the index must no longer point into, forces a full `env.sync(True)` first.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import lmdb

from storage_server.needle import FLAG_TOMBSTONE, needle_size

DEFAULT_MAP_SIZE = 64 << 30  # virtual address space only; the file grows as entries arrive
DEFAULT_CACHE_ENTRIES = 1 << 17  # looked-up entries kept in memory: ~300 bytes each, ~40 MB
_VID = struct.Struct(">H")
_SEGKEY = struct.Struct(">HI")
_ENTRY = struct.Struct("<IQIB3xQ")
_END = struct.Struct("<Q")
_VOLUME = struct.Struct("<QQQQ")

T = TypeVar("T")


class NeedleLocation(NamedTuple):
    """Where a key's current needle lies: segment, offset, data size, flags, sequence."""

    segment: int
    offset: int
    size: int
    flags: int
    sequence: int

    @property
    def deleted(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)

    @property
    def length(self) -> int:
        return needle_size(self.size)


@dataclass
class VolumeCounts:
    """Per-volume totals kept in the index, changed in the same transaction as the entries."""

    max_sequence: int = 0
    live: int = 0
    deleted: int = 0
    live_bytes: int = 0

    def remove(self, entry: NeedleLocation) -> None:
        if entry.deleted:
            self.deleted -= 1
        else:
            self.live -= 1
            self.live_bytes -= entry.length

    def add(self, entry: NeedleLocation) -> None:
        if entry.deleted:
            self.deleted += 1
        else:
            self.live += 1
            self.live_bytes += entry.length
        self.max_sequence = max(self.max_sequence, entry.sequence)


class Record(NamedTuple):
    """One needle to index: its volume, key and location."""

    vid: int
    key: bytes
    entry: NeedleLocation


def _needle_key(vid: int, key: bytes) -> bytes:
    return _VID.pack(vid) + key


class _ReaderFlag:
    """One reader thread's flag: busy while it has a read transaction open (fast path)."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy = False


class _MapResizeLock:
    """Many readers or one map resizer: LMDB's map may grow only with no transaction open.

    Lookups take the lock-free fast path: set their thread's flag busy, then check `resizing`
    (falling back to `shared` when set); the resizer sets `resizing`, then waits for every flag
    to be idle. Each side writes its flag before reading the other's, and the GIL orders
    them, so at least one of the two sees the other."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._resizing = False
        self._local = threading.local()
        self._flags: list[_ReaderFlag] = []

    def reader_flag(self) -> _ReaderFlag:
        try:
            return self._local.flag  # type: ignore[no-any-return]
        except AttributeError:
            flag = self._local.flag = _ReaderFlag()
            with self._cond:
                self._flags.append(flag)
            return flag

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._readers:
                self._cond.wait()
            flags = list(self._flags)
        while any(flag.busy for flag in flags):  # fast-path lookups finishing
            time.sleep(0.0005)
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class Index:
    """key → NeedleLocation per volume, indexed segment ends, volume counts, retired segments."""

    def __init__(self, path: Path, map_size: int = DEFAULT_MAP_SIZE,
                 cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=8, max_readers=1024,
                             sync=True, metasync=False, readahead=False)
        self._needles = self.env.open_db(b"needles")
        self._segments = self.env.open_db(b"segments")
        self._volumes = self.env.open_db(b"volumes")
        self._retired = self.env.open_db(b"retired")
        self._resize_lock = _MapResizeLock()
        self._write_lock = threading.Lock()
        # The overlay: entries of needles already durable in their segments (fsynced, so
        # acknowledged) that the group commit's indexer has not committed to LMDB yet. Lookups
        # consult it first; it only ever holds a key's newest entry (see `stage`).
        self._pending: dict[int, dict[bytes, NeedleLocation]] = {}
        self._pending_lock = threading.Lock()
        # The entry cache: key → entry of recent `get`s, so that a warm read costs no LMDB
        # transaction (py-lmdb releases the GIL three times per lookup, in begin, get and
        # abort, and under many reader threads each release is a handoff: a futex wake and a
        # context switch, several times the cost of the lookup itself). LMDB stays the index:
        # every commit that changes entries (`apply`, `swap`) first drops their keys from the
        # cache and bumps the generation, and a lookup remembers what it read only if no such
        # commit happened since before its transaction began (else it may have read the old
        # entry). Bounded: the oldest remembered entry goes first.
        self.cache_entries = max(0, cache_entries)
        self._cache: dict[bytes, NeedleLocation] = {}
        self._cache_lock = threading.Lock()
        self._cache_generation = 0

    def close(self) -> None:
        self.env.close()

    # -- reading ---------------------------------------------------------------------------

    def get(self, vid: int, key: bytes) -> NeedleLocation | None:
        """The entry of `key` (a `bytes` in volume `vid`), or None."""
        # The overlay first, then the cache, then LMDB: an entry leaves the overlay only after
        # its LMDB commit has dropped the key from the cache, so none of the three steps can
        # miss a newer entry the one before it held.
        pending = self._pending.get(vid)
        if pending:
            entry = pending.get(key)
            if entry is not None:
                return entry
        entry = self._cache.get(key)
        if entry is not None:
            return entry
        generation = self._cache_generation
        lock = self._resize_lock
        flag = lock.reader_flag()
        flag.busy = True
        try:
            if lock._resizing:  # rare: wait for the resize like any other reader
                flag.busy = False
                with lock.shared(), self.env.begin(db=self._needles, buffers=True) as txn:
                    raw = txn.get(_VID.pack(vid) + key)
                    entry = NeedleLocation._make(_ENTRY.unpack(raw)) if raw is not None else None
            else:
                with self.env.begin(db=self._needles, buffers=True) as txn:
                    raw = txn.get(_VID.pack(vid) + key)
                    entry = NeedleLocation._make(_ENTRY.unpack(raw)) if raw is not None else None
        finally:
            flag.busy = False
        if entry is not None:
            self._remember(key, entry, generation)
        return entry

    def _remember(self, key: bytes, entry: NeedleLocation, generation: int) -> None:
        """Cache what a lookup that began at `generation` read, unless a commit has changed
        entries since (it may have read the old one)."""
        with self._cache_lock:
            if generation != self._cache_generation or not self.cache_entries:
                return
            cache = self._cache
            if len(cache) >= self.cache_entries and key not in cache:
                del cache[next(iter(cache))]  # the oldest remembered
            cache[key] = entry

    def _forget(self, keys: Iterable[bytes]) -> None:
        """Drop cached entries a commit has just changed (see `_cache`)."""
        with self._cache_lock:
            self._cache_generation += 1
            for key in keys:
                self._cache.pop(key, None)

    @property
    def cached(self) -> int:
        """Entries in the entry cache."""
        return len(self._cache)

    def get_many(self, pairs: Iterable[tuple[int, bytes]]) -> list[NeedleLocation | None]:
        out: list[NeedleLocation | None] = []
        overlay = self._pending
        with self._resize_lock.shared(), self.env.begin(db=self._needles, buffers=True) as txn:
            for vid, key in pairs:
                pending = overlay.get(vid)
                entry = pending.get(key) if pending else None
                if entry is None:
                    raw = txn.get(_needle_key(vid, key))
                    entry = NeedleLocation._make(_ENTRY.unpack(raw)) if raw is not None else None
                out.append(entry)
        return out

    def entries(self, vid: int, start_after: bytes | None = None, limit: int | None = None,
                live_only: bool = False) -> list[tuple[bytes, NeedleLocation]]:
        """Up to `limit` (key, entry) of one volume after `start_after`, in key byte order;
        with `live_only`, deleted keys are passed over (and not counted)."""
        prefix = _VID.pack(vid)
        out: list[tuple[bytes, NeedleLocation]] = []
        with self._pending_lock:  # snapshot the overlay before reading LMDB (see `get`)
            pending = dict(self._pending.get(vid, ()))
        if start_after is not None:
            pending = {k: e for k, e in pending.items() if k > start_after}
        extra = sorted(pending)
        i = 0
        with self._resize_lock.shared(), self.env.begin(db=self._needles) as txn:
            cursor = txn.cursor()
            start = prefix + start_after if start_after is not None else prefix
            found = cursor.set_range(start)
            if found and start_after is not None and cursor.key() == start:
                found = cursor.next()
            while limit is None or len(out) < limit:
                k = cursor.key() if found else b""
                stored = k[2:] if k.startswith(prefix) else None
                if stored is None and i == len(extra):
                    break
                if stored is not None and (i == len(extra) or stored < extra[i]):
                    key, entry = stored, NeedleLocation._make(_ENTRY.unpack(cursor.value()))
                    found = cursor.next()
                else:  # the overlay's entry is newer than LMDB's for the same key
                    key = extra[i]
                    entry = pending[key]
                    i += 1
                    if stored == key:
                        found = cursor.next()
                if not (live_only and entry.deleted):
                    out.append((key, entry))
        return out

    def segment_ends(self, vid: int) -> dict[int, int]:
        """segment id → indexed end, for one volume."""
        prefix = _VID.pack(vid)
        out: dict[int, int] = {}
        with self._resize_lock.shared(), self.env.begin(db=self._segments) as txn:
            cursor = txn.cursor()
            found = cursor.set_range(prefix)
            while found and cursor.key().startswith(prefix):
                out[_SEGKEY.unpack(cursor.key())[1]] = _END.unpack(cursor.value())[0]
                found = cursor.next()
        return out

    def retired(self, vid: int) -> list[int]:
        """Segments a finished compaction replaced whose files may still need removing."""
        prefix = _VID.pack(vid)
        out: list[int] = []
        with self._resize_lock.shared(), self.env.begin(db=self._retired) as txn:
            cursor = txn.cursor()
            found = cursor.set_range(prefix)
            while found and cursor.key().startswith(prefix):
                out.append(_SEGKEY.unpack(cursor.key())[1])
                found = cursor.next()
        return out

    def counts(self, vid: int) -> VolumeCounts:
        with self._resize_lock.shared(), self.env.begin(db=self._volumes) as txn:
            raw = txn.get(_VID.pack(vid))
        return VolumeCounts(*_VOLUME.unpack(raw)) if raw is not None else VolumeCounts()

    # -- the overlay -----------------------------------------------------------------------

    def stage(self, records: Iterable[Record]) -> None:
        """Make durable needles findable before their LMDB commit. Records come in the order
        the group commit acknowledged them, so a later one of a key is its newer needle."""
        with self._pending_lock:
            for vid, key, entry in records:
                pending = self._pending.get(vid)
                if pending is None:
                    pending = self._pending[vid] = {}
                old = pending.get(key)
                if old is None or old.sequence < entry.sequence:
                    pending[key] = entry

    def unstage(self, records: Iterable[Record]) -> None:
        """Drop the overlay entries of `records` once they are committed to LMDB (an entry a
        newer needle replaced meanwhile stays)."""
        with self._pending_lock:
            for vid, key, entry in records:
                pending = self._pending.get(vid)
                if pending is not None and pending.get(key) is entry:
                    del pending[key]

    def staged(self) -> int:
        """Entries in the overlay (not yet committed to LMDB)."""
        with self._pending_lock:
            return sum(len(p) for p in self._pending.values())

    # -- writing ---------------------------------------------------------------------------

    def _write(self, body: Callable[[Any], T]) -> T:
        """Run `body(txn)` in one write transaction, growing the map when it is full."""
        with self._write_lock:
            while True:
                try:
                    with self._resize_lock.shared(), self.env.begin(write=True) as txn:
                        return body(txn)
                except lmdb.MapFullError:
                    with self._resize_lock.exclusive():
                        self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _load_counts(self, txn: Any, cache: dict[int, VolumeCounts], vid: int) -> VolumeCounts:
        counts = cache.get(vid)
        if counts is None:
            raw = txn.get(_VID.pack(vid), db=self._volumes)
            counts = VolumeCounts(*_VOLUME.unpack(raw)) if raw is not None else VolumeCounts()
            cache[vid] = counts
        return counts

    @staticmethod
    def _store_counts(txn: Any, db: Any, cache: dict[int, VolumeCounts]) -> None:
        for vid, c in cache.items():
            txn.put(_VID.pack(vid), _VOLUME.pack(c.max_sequence, c.live, c.deleted,
                                                 c.live_bytes), db=db)

    def apply(self, records: Iterable[Record], ends: dict[tuple[int, int], int]) -> int:
        """Index `records` (a needle replaces the key's entry only if its sequence is higher)
        and raise the indexed end of each (vid, segment) in `ends`, in one transaction.
        Returns how many records took effect."""
        records = list(records)

        def body(txn: Any) -> int:
            cache: dict[int, VolumeCounts] = {}
            applied = 0
            for vid, key, entry in records:
                nkey = _needle_key(vid, key)
                raw = txn.get(nkey, db=self._needles)
                counts = self._load_counts(txn, cache, vid)
                if raw is not None:
                    old = NeedleLocation._make(_ENTRY.unpack(raw))
                    if old.sequence >= entry.sequence:
                        counts.max_sequence = max(counts.max_sequence, entry.sequence)
                        continue
                    counts.remove(old)
                txn.put(nkey, _ENTRY.pack(*entry), db=self._needles)
                counts.add(entry)
                applied += 1
            for (vid, seg), end in ends.items():
                skey = _SEGKEY.pack(vid, seg)
                raw = txn.get(skey, db=self._segments)
                if raw is None or _END.unpack(raw)[0] < end:
                    txn.put(skey, _END.pack(end), db=self._segments)
            self._store_counts(txn, self._volumes, cache)
            return applied

        applied = self._write(body)
        self._forget(key for _, key, _ in records)
        return applied

    def set_end(self, vid: int, segment: int, end: int) -> None:
        """Record the indexed end of a segment as exactly `end` (after truncating a tail)."""
        self._write(lambda txn: txn.put(_SEGKEY.pack(vid, segment), _END.pack(end),
                                        db=self._segments))

    def swap(self, vid: int, moved: list[tuple[bytes, NeedleLocation, NeedleLocation]],
             dropped: list[tuple[bytes, NeedleLocation]], retired: list[int],
             added: dict[int, int]) -> int:
        """The atomic step of compaction: point each moved key at its copy and remove each
        dropped key, but only where the entry is still the one compaction read (a write or
        delete that came meanwhile wins); forget the `retired` segments (and list them for
        removal) and record the `added` ones fully indexed. Returns entries changed."""

        def body(txn: Any) -> int:
            cache: dict[int, VolumeCounts] = {}
            counts = self._load_counts(txn, cache, vid)
            changed = 0
            for key, old, new in moved:
                nkey = _needle_key(vid, key)
                raw = txn.get(nkey, db=self._needles)
                if raw is not None and NeedleLocation._make(_ENTRY.unpack(raw)) == old:
                    txn.put(nkey, _ENTRY.pack(*new), db=self._needles)
                    counts.remove(old)
                    counts.add(new)
                    changed += 1
            for key, old in dropped:
                nkey = _needle_key(vid, key)
                raw = txn.get(nkey, db=self._needles)
                if raw is not None and NeedleLocation._make(_ENTRY.unpack(raw)) == old:
                    txn.delete(nkey, db=self._needles)
                    counts.remove(old)
                    changed += 1
            for seg in retired:
                txn.delete(_SEGKEY.pack(vid, seg), db=self._segments)
                txn.put(_SEGKEY.pack(vid, seg), b"", db=self._retired)
            for seg, end in added.items():
                txn.put(_SEGKEY.pack(vid, seg), _END.pack(end), db=self._segments)
            self._store_counts(txn, self._volumes, cache)
            return changed

        changed = self._write(body)
        self._forget([key for key, _, _ in moved] + [key for key, _ in dropped])
        self.env.sync(True)  # the retired files are deleted next: this must not be undone
        return changed

    def forget_retired(self, vid: int, segments: list[int]) -> None:
        def body(txn: Any) -> None:
            for seg in segments:
                txn.delete(_SEGKEY.pack(vid, seg), db=self._retired)

        self._write(body)
