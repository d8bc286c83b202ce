"""A logical volume on disk: append-only segment files of needles, and the group commit.

Writes. A writer encodes its needle and, under the volume's lock, registers it with the
`GroupCommit` and appends it to the volume's active segment with O_DIRECT (storage_server/
direct.py; through the page cache where the file system refuses it), rolling to a new segment,
whose directory entry is fsynced at once, when the next needle would pass `segment_bytes`. Outside
the lock it then fdatasyncs the segment itself: every needle below its own was written before
the sync started, so the sync covers them all, and concurrent writers' syncs share one journal
commit (measured here: 16 writers syncing their own appends reach twice the rate of a flusher
thread taking turns with them, see benchmarks/haystack.py). A needle a finished sync already
covered needs no sync of its own; `fsync_interval_ms` spaces a segment's syncs out so that
more writers share each under light load. The needle is then staged in the index's in-memory
overlay and the put returns: durable and findable. The indexer thread commits staged entries
to LMDB in larger transactions (every `index_interval_ms`) and then drops them from the
overlay; until then recovery would find them past the indexed ends, which never pass a needle
that is not yet in LMDB.

Reads. One index lookup gives (segment, offset, size) (from the index's entry cache when the
key was read lately); one pread of the whole needle follows, and the needle is verified (key,
cookie, CRC-32) before any byte is returned. Both are compiled (`pread_needle`, storage_server/
_needle.pyx): a needle in the page cache is read and checked without releasing the GIL.

Recovery. At open, each segment is scanned from its indexed end: complete valid needles are
indexed, the first torn or invalid one and everything after it is truncated (only the tail of
a crashed write can be there, as nothing past the indexed end was ever acknowledged without
its fsync). Segments a finished compaction retired are deleted first.

Compaction. Seal the active segment (new writes go to a fresh one), wait until everything
written so far is indexed, then copy each needle the index points into a sealed segment to new
output segments, in (segment, offset) order, dropping tombstones (no older needle of their key
survives the compaction, so the key simply becomes absent) and corrupt needles (absent, so
repair fetches them again from a replica). Fsync the outputs, then one LMDB transaction moves
every entry that is still the one copied (a write or delete that raced wins, as it carries a
higher sequence) and retires the sealed segments, whose files are then deleted. Readers that
found an entry in a retired segment pin it open until they are done, or retry the lookup.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cachefs.directio import BLOCK, DIRECT_READ_MIN, DirectReader, fully_cached
from cachefs.errors import CorruptObject, LocalIOError
from cachefs.fsutil import fsync_dir
from storage_server.direct import DirectAppender
from storage_server.index import Index, NeedleLocation, Record
from storage_server.needle import (
    HEADER_BYTES,
    data_end,
    decode_needle,
    encode_needle_parts,
    parse_header,
)

try:  # the compiled read (storage_server/_needle.pyx), built at install time
    from storage_server._needle import pread_needle

    COMPILED_READ = True
except ImportError as e:  # pragma: no cover - exercised only without a build
    from storage_server.needle import pread_needle

    COMPILED_READ = False
    logging.getLogger(__name__).warning(
        "storage_server._needle (the compiled needle read) is not built: using the slower "
        "pure-Python read (%s); reinstall with `pip install -e .` to build it", e)

log = logging.getLogger(__name__)

SEGMENT_NAME = re.compile(r"^([0-9a-f]{8})\.seg$")
DEFAULT_SEGMENT_BYTES = 1 << 30
_SCAN_BATCH = 4096


def segment_name(segment: int) -> str:
    return f"{segment:08x}.seg"


class Segment:
    """One open segment file: its id, descriptor and the end of what has been appended."""

    def __init__(self, vid: int, segment: int, path: Path, fd: int, end: int) -> None:
        self.vid = vid
        self.id = segment
        self.path = path
        self.fd = fd
        self.end = end
        # How far a finished fdatasync reached: all of a segment found at open (recovery
        # synced what it scanned; the rest was synced before it was indexed), none of a new one.
        self.synced = end
        self.syncing = False  # an fdatasync of this segment is running
        self.sync_done = threading.Condition(threading.Lock())
        self.last_sync = 0.0
        self.readers = 0
        self.retired = False
        # Appends go through O_DIRECT once the first one opens this (storage_server/direct.py);
        # `direct` turns False where the file system refuses it.
        self.appender: DirectAppender | None = None
        self.reader: DirectReader | None = None  # large reads that miss the page cache
        # Gets read through a descriptor of their own with readahead off (POSIX_FADV_RANDOM,
        # which is per open file): a get reads one needle at a random place, and readahead
        # would read its neighbours too (measured on the benchmark's store, cold random reads
        # cost 1.12-1.17x their bytes in disk reads with readahead, 1.00x without). Scans
        # (recovery, compaction) keep `fd` and its readahead. Opened by the first get.
        self.read_fd = -1
        self.direct = True

    def seal(self) -> None:
        """No more appends: cut the zero fill of the last direct append (so a segment at rest
        is exactly its needles) and close the O_DIRECT descriptor."""
        if self.appender is None:
            return
        if self.appender.padded_end > self.end and self.fd >= 0 and not self.retired:
            try:
                os.ftruncate(self.fd, self.end)
            except OSError as e:  # recovery cuts it at the next open instead
                log.warning("%s: cutting the zero fill at %d failed: %s", self.path, self.end, e)
        self.appender.close()
        self.appender = None

    def close(self) -> None:
        self.seal()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Counters:
    """Thread-safe event counters (preads, fsyncs, corrupt reads...) without a shared lock:
    each thread counts in its own dict (only it writes there); reading sums them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # registering a thread's dict only
        self._local = threading.local()
        self._dicts: list[dict[str, int]] = []

    def add(self, name: str, n: int = 1) -> None:
        try:
            mine: dict[str, int] = self._local.d
        except AttributeError:
            mine = self._local.d = {}
            with self._lock:
                self._dicts.append(mine)
        mine[name] = mine.get(name, 0) + n

    @property
    def values(self) -> dict[str, int]:
        with self._lock:
            dicts = list(self._dicts)
        total: dict[str, int] = {}
        for d in dicts:
            for name, n in d.copy().items():  # dict.copy holds the GIL throughout
                total[name] = total.get(name, 0) + n
        return total

    def get(self, name: str) -> int:
        return self.values.get(name, 0)


class GroupCommit:
    """Durability and indexing of appended needles: writers fdatasync their own segments
    (concurrent fdatasyncs share the journal commit; a needle already covered by another
    writer's sync is not synced again), and the indexer thread commits many durable needles
    per LMDB transaction.

    A writer calls `register` for each needle under its volume's lock (before writing it), then
    `make_durable` with everything it appended. `wait_indexed(ticket)` returns once every
    needle registered up to that ticket is committed to LMDB, not only findable in the
    overlay."""

    def __init__(self, index: Index, counters: Counters, fsync_interval_ms: float = 0.0,
                 fsync: Callable[[int], None] = os.fdatasync, index_interval_ms: float = 50.0,
                 index_batch: int = 8192) -> None:
        self.index = index
        self.counters = counters
        self.interval = max(0.0, fsync_interval_ms) / 1000.0
        self.index_interval = max(0.0, index_interval_ms) / 1000.0
        self.index_batch = max(1, index_batch)
        self.fsync = fsync
        # Called with the seconds each segment fdatasync took (the metrics' histogram).
        self.fsync_observer: Callable[[float], None] | None = None
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)  # wait_indexed waits for index commits
        self._idx = threading.Condition(self._lock)  # the indexer waits for staged needles
        self._ticket = 0
        # Registered needles not yet committed to LMDB, by ticket: written or being written
        # (not yet durable), or durable and staged. The indexer never records a segment end
        # past one of them, so recovery scans from below it.
        self._unindexed: dict[int, tuple[Record, Segment]] = {}
        self._staged: list[int] = []  # durable tickets waiting for the indexer
        # The lowest ticket of the batch the indexer is committing to LMDB right now (out of
        # `_unindexed` already, not in LMDB yet): wait_indexed must wait for it too.
        self._applying: int | None = None
        self._index_wanted = 0  # someone waits until every ticket up to this is indexed
        self._failed: BaseException | None = None
        self._closing = False
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync")
        self._thread = threading.Thread(target=self._index_run, name="group-commit-index",
                                        daemon=True)
        self._thread.start()

    def check(self) -> None:
        if self._failed is not None:
            raise LocalIOError(f"storage writes stopped after a failed flush: {self._failed}")
        if self._closing:
            raise LocalIOError("storage is closed")

    def register(self, record: Record, segment: Segment) -> int:
        """Note a needle about to be written (called under its volume's lock, so a segment's
        needles register in offset order); returns its ticket."""
        with self._lock:
            self._ticket += 1
            self._unindexed[self._ticket] = (record, segment)
            return self._ticket

    def unregister(self, ticket: int) -> None:
        """Forget a needle whose write failed (its bytes were cut off again)."""
        with self._lock:
            self._unindexed.pop(ticket, None)
            self._done.notify_all()

    def ticket(self) -> int:
        with self._lock:
            return self._ticket

    def make_durable(self, written: list[tuple[int, Segment, int]]) -> None:
        """Return once every (ticket, segment, end) a writer appended is on disk and findable.

        A writer appends under its volume's lock, so when its fdatasync starts, every needle
        below its own in that segment is written too: the sync covers them, acknowledged
        needles are always a prefix of each segment, and recovery may cut at the first torn
        needle. `seg.synced` is how far a finished sync reached; a needle below it is already
        durable and needs no sync of its own."""
        self.check()
        ends: dict[int, tuple[Segment, int]] = {}
        for _, seg, end in written:
            if ends.get(id(seg), (seg, 0))[1] < end:
                ends[id(seg)] = (seg, end)
        if len(ends) == 1:
            self._sync_segment(*next(iter(ends.values())))
        else:  # concurrent syncs of many segments share the journal commit
            list(self._pool.map(lambda item: self._sync_segment(*item), ends.values()))
        with self._lock:
            records = []
            for ticket, _, _ in written:
                item = self._unindexed.get(ticket)
                if item is not None:
                    records.append(item[0])
                    self._staged.append(ticket)
            if len(self._staged) == len(records) or len(self._staged) >= self.index_batch:
                self._idx.notify()  # start the indexer's interval, or commit now
            self.index.stage(records)
        self.counters.add("needles_committed", len(written))

    def _sync_segment(self, seg: Segment, end: int) -> None:
        """Return once `seg` is durable up to `end`. One fdatasync per segment runs at a time;
        writers arriving meanwhile wait for it, and if it started before their needle was
        written, one of them (the next leader) syncs for all of them."""
        with seg.sync_done:
            while seg.synced < end:
                if not seg.syncing:
                    break
                seg.sync_done.wait()
            else:
                return
            seg.syncing = True
        ok = False
        try:
            if self.interval:  # gather more writers into this sync under light load
                delay = seg.last_sync + self.interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            covered = seg.end  # written (under the volume's lock) before this sync starts
            seg.last_sync = started = time.monotonic()
            self.fsync(seg.fd)
            took = time.monotonic() - started
            ok = True
        except BaseException as e:  # the state of the disk is unknown: stop writing
            self._fail(e)
            raise LocalIOError(f"flushing to disk failed: {e}") from e
        finally:
            with seg.sync_done:
                seg.syncing = False
                if ok and seg.synced < covered:
                    seg.synced = covered
                seg.sync_done.notify_all()
            if ok:
                self.counters.add("fsyncs")
                self.counters.add("group_commits")
                if self.fsync_observer is not None:
                    self.fsync_observer(took)
        if self._failed is not None:
            raise LocalIOError(f"flushing to disk failed: {self._failed}")

    def wait_indexed(self, ticket: int | None = None) -> None:
        """Return once every needle registered up to `ticket` (default: every one so far) is
        in LMDB, not just in the overlay: compaction and stat need the committed index.
        A needle still being written counts as pending until its writer finishes."""
        with self._lock:
            if ticket is None:
                ticket = self._ticket
            while self._failed is None and self._first_unindexed(ticket + 1) <= ticket:
                self._index_wanted = max(self._index_wanted, ticket)
                self._idx.notify()
                self._done.wait()
            if self._failed is not None:
                raise LocalIOError(f"flushing to disk failed: {self._failed}")

    def close(self) -> None:
        """Commit every staged entry to LMDB and stop the indexer (writers have returned)."""
        with self._lock:
            self._closing = True
            self._idx.notify_all()
        self._thread.join()
        self._pool.shutdown()

    def _index_run(self) -> None:
        """The indexer: every `index_interval` (sooner when `index_batch` entries wait, or
        someone needs them in LMDB, or at close) commit every staged entry in one LMDB
        transaction, raising the indexed ends, and only then drop them from the overlay."""
        while True:
            with self._lock:
                deadline = None
                while True:
                    if self._staged and (self._closing or len(self._staged) >= self.index_batch
                                         or self._index_wanted):
                        break
                    if not self._staged:
                        if self._closing:
                            return
                        deadline = None
                        self._idx.wait()
                        continue
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.index_interval
                    if now >= deadline:
                        break
                    self._idx.wait(deadline - now)
                tickets, self._staged = self._staged, []
                batch = [self._unindexed.pop(t) for t in tickets]
                ends = self._indexed_ends(batch)
                self._applying = min(tickets)
            if self._failed is None:
                try:
                    self.index.apply([record for record, _ in batch], ends)
                    self.index.unstage(record for record, _ in batch)
                    self.counters.add("index_commits")
                except BaseException as e:  # entries stay in the overlay: reads still work
                    self._fail(e)
            with self._lock:
                self._applying = None
                if self._index_wanted and self._first_unindexed(self._index_wanted + 1) \
                        > self._index_wanted:
                    self._index_wanted = 0
                self._done.notify_all()

    def _first_unindexed(self, default: int) -> int:
        """(Under the lock.) The lowest ticket not yet in LMDB: unindexed, or in the batch
        being committed; `default` when there is none."""
        first = min(self._unindexed, default=default)
        return first if self._applying is None else min(first, self._applying)

    def _indexed_ends(self, batch: list[tuple[Record, Segment]]) -> dict[tuple[int, int], int]:
        """(Under the lock.) The end to record for each segment of `batch`: past its needles,
        but never past a needle of that segment that is still unindexed (recovery must scan
        it if it was acknowledged)."""
        ends: dict[tuple[int, int], int] = {}
        for record, seg in batch:
            end = record.entry.offset + record.entry.length
            if ends.get((seg.vid, seg.id), 0) < end:
                ends[(seg.vid, seg.id)] = end
        if self._unindexed:
            for record, seg in self._unindexed.values():
                where = (seg.vid, seg.id)
                if where in ends and record.entry.offset < ends[where]:
                    ends[where] = record.entry.offset
        return ends

    def _fail(self, e: BaseException) -> None:
        log.error("storage writes failed, refusing further writes: %r", e)
        with self._lock:
            if self._failed is None:
                self._failed = e
            self._done.notify_all()


class Volume:
    """One logical volume: its segment files in DATA_DIR/volumes/VVVV/."""

    def __init__(self, root: Path, vid: int, cookie: int, segment_bytes: int,
                 counters: Counters, direct_io: bool = True) -> None:
        self.root = root
        self.direct_io = direct_io  # appends bypass the page cache (storage_server/direct.py)
        self.vid = vid
        self.cookie = cookie
        self.segment_bytes = segment_bytes
        self.counters = counters
        self.lock = threading.Lock()  # appends, rolling, the sequence counter
        self._pins = threading.Lock()  # the segments dict and reader pins
        self._compacting = threading.Lock()
        self.segments: dict[int, Segment] = {}
        self.active: Segment | None = None
        self.next_segment = 0
        self.next_sequence = 1

    # -- opening and recovery ----------------------------------------------------------------

    def open(self, index: Index) -> dict[str, Any]:
        """Open the segments, finish a compaction's deletions, scan every segment past its
        indexed end. Returns this volume's recovery report."""
        self.root.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {"segments_scanned": 0, "needles_indexed": 0,
                                  "tombstones_indexed": 0, "bytes_truncated": 0,
                                  "truncated": [], "retired_removed": 0, "missing": []}
        retired = index.retired(self.vid)
        for seg in retired:
            try:
                (self.root / segment_name(seg)).unlink()
                report["retired_removed"] += 1
            except FileNotFoundError:
                pass
        if retired:
            fsync_dir(self.root)
            index.forget_retired(self.vid, retired)
        ends = index.segment_ends(self.vid)
        ids = sorted(int(m.group(1), 16) for name in os.listdir(self.root)
                     if (m := SEGMENT_NAME.match(name)))
        max_sequence = index.counts(self.vid).max_sequence
        for seg_id in ids:
            path = self.root / segment_name(seg_id)
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
            segment = Segment(self.vid, seg_id, path, fd, size)
            self.segments[seg_id] = segment
            indexed = ends.get(seg_id, 0)
            if size < indexed:
                log.error("volume %d segment %08x: %d bytes, but %d were indexed", self.vid,
                          seg_id, size, indexed)
                report["missing"].append({"segment": seg_id, "size": size, "indexed": indexed})
            elif size > indexed or seg_id not in ends:
                report["segments_scanned"] += 1
                max_sequence = max(max_sequence, self._recover(index, segment, indexed, report))
        for seg_id in ends.keys() - set(ids):
            log.error("volume %d: indexed segment %08x is missing", self.vid, seg_id)
            report["missing"].append({"segment": seg_id, "size": None,
                                      "indexed": ends[seg_id]})
        self.next_sequence = max_sequence + 1
        self.next_segment = ids[-1] + 1 if ids else 0
        self.active = self.segments[ids[-1]] if ids else None
        return report

    def _recover(self, index: Index, segment: Segment, start: int,
                 report: dict[str, Any]) -> int:
        """Index the complete needles of `segment` from `start`; truncate a torn tail."""
        max_sequence = 0
        records: list[Record] = []
        offset = start
        reason = None
        # What a killed process wrote may still be only in the page cache: make it durable
        # before indexing it (a put of one of these keys is then skipped as already stored).
        os.fdatasync(segment.fd)
        with open(segment.path, "rb", buffering=1 << 20) as f:
            f.seek(start)
            while offset < segment.end:
                head = f.read(HEADER_BYTES)
                try:
                    header = parse_header(head)
                    rest = f.read(header.length - HEADER_BYTES)
                    needle = decode_needle(head + rest, expect_cookie=self.cookie)
                except CorruptObject as e:
                    reason = str(e)
                    break
                entry = NeedleLocation(segment.id, offset, len(needle.data), needle.flags,
                              needle.sequence)
                records.append(Record(self.vid, needle.key, entry))
                report["needles_indexed"] += 1
                report["tombstones_indexed"] += needle.tombstone
                max_sequence = max(max_sequence, needle.sequence)
                offset += header.length
                if len(records) >= _SCAN_BATCH:
                    index.apply(records, {(self.vid, segment.id): offset})
                    records = []
        if reason is not None:
            cut = segment.end - offset
            # The zeros a direct append wrote past its needle up to the block boundary are cut
            # too, but they are not a torn write: nothing to report.
            torn = not _zero_fill(segment.fd, offset, segment.end)
            if torn:
                log.warning("volume %d segment %08x: truncating %d bytes at offset %d: %s",
                            self.vid, segment.id, cut, offset, reason)
            os.ftruncate(segment.fd, offset)
            os.fsync(segment.fd)
            segment.end = offset
            if torn:
                report["bytes_truncated"] += cut
                report["truncated"].append({"vid": self.vid, "segment": segment.id,
                                            "offset": offset, "bytes": cut, "reason": reason})
        index.apply(records, {(self.vid, segment.id): offset})
        return max_sequence

    def close(self) -> None:
        with self._pins:
            for seg in self.segments.values():
                seg.close()
            self.segments.clear()

    # -- writing -----------------------------------------------------------------------------

    def _create_segment(self) -> Segment:
        """A new, empty segment file with the next id (called under `self.lock`)."""
        seg_id = self.next_segment
        self.next_segment += 1
        path = self.root / segment_name(seg_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fsync_dir(self.root)  # before any needle in it can be acknowledged
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self.counters.add("fsyncs")
        segment = Segment(self.vid, seg_id, path, fd, 0)
        with self._pins:
            self.segments[seg_id] = segment
        return segment

    def append(self, key: bytes, data: bytes | memoryview, flags: int,
               commit: GroupCommit) -> tuple[int, Segment, int]:
        """Append one needle (not yet durable: pass the result to `commit.make_durable`);
        returns (ticket, segment, end of the needle)."""
        with self.lock:
            sequence = self.next_sequence
            parts = encode_needle_parts(key, data, self.cookie, flags, sequence)
            length = sum(len(p) for p in parts)
            seg = self.active
            if seg is None or (seg.end and seg.end + length > self.segment_bytes):
                if seg is not None:
                    seg.seal()
                seg = self.active = self._create_segment()
            offset = seg.end
            entry = NeedleLocation(seg.id, offset, len(data), flags, sequence)
            ticket = commit.register(Record(self.vid, key, entry), seg)
            try:
                if self.direct_io and seg.direct and seg.appender is None:
                    seg.appender = DirectAppender.open(seg.path, seg.fd, offset)
                    seg.direct = seg.appender is not None
                if seg.appender is not None:
                    seg.appender.append(parts, length, offset)
                else:
                    _write_parts_at(seg.fd, parts, length, offset)
            except BaseException:
                commit.unregister(ticket)
                raise
            seg.end = offset + length
            self.next_sequence = sequence + 1
            return ticket, seg, seg.end

    # -- reading -----------------------------------------------------------------------------

    def read(self, entry: NeedleLocation, key: bytes, cookie: int) -> tuple[bytes, int] | None:
        """The raw needle `entry` points at, by one pread (a large needle not in the page
        cache: by one O_DIRECT read, storage_server/direct.py), and where its data ends if it
        passes every check for `key` and `cookie` (`data_end`: -1 if one fails); None if its
        segment was retired (the caller looks the key up again)."""
        length = entry.length
        direct = self.direct_io and length >= DIRECT_READ_MIN
        with self._pins:
            seg = self.segments.get(entry.segment)
            if seg is None:
                return None
            if seg.read_fd < 0:
                seg.read_fd = _open_for_gets(seg.path)
            if direct and seg.direct and seg.reader is None:
                seg.reader = DirectReader.open(seg.path)
                seg.direct = seg.reader is not None
            reader = seg.reader if direct else None
            seg.readers += 1
        try:
            self.counters.add("preads")
            if reader is None or fully_cached(seg.fd, entry.offset, length) is not False:
                return pread_needle(seg.read_fd, length, entry.offset, key, cookie)
            self.counters.add("direct_reads")
            buf = reader.read(entry.offset, length)
            return buf, data_end(buf, key, cookie)
        finally:
            with self._pins:
                seg.readers -= 1
                if seg.retired and not seg.readers:
                    seg.close()

    def size(self) -> tuple[int, int]:
        """(segments, bytes) on disk."""
        with self._pins:
            return len(self.segments), sum(s.end for s in self.segments.values())

    # -- compaction --------------------------------------------------------------------------

    def compact(self, index: Index, commit: GroupCommit) -> dict[str, Any]:
        """Rewrite the live needles of every sealed segment into new segments (module doc)."""
        with self._compacting:
            return self._compact(index, commit)

    def _compact(self, index: Index, commit: GroupCommit) -> dict[str, Any]:
        started = time.monotonic()
        commit.wait_indexed()  # the counts and the entries below are LMDB's
        _, size = self.size()
        counts = index.counts(self.vid)
        if size <= counts.live_bytes:  # nothing dead to reclaim (pending writes only add)
            return {"vid": self.vid, "segments_compacted": 0, "segments_written": 0,
                    "needles_moved": 0, "entries_dropped": 0, "entries_changed": 0,
                    "corrupt": [], "bytes_before": size, "bytes_after": size, "reclaimed": 0,
                    "seconds": round(time.monotonic() - started, 3)}
        sealed = self._seal_all(commit)
        _, bytes_before = self.size()
        sealed_bytes = sum(s.end for s in sealed.values())
        moved, dropped, corrupt, outputs = self._copy_live_needles(index, sealed)
        changed = self._swap_in(index, sealed, outputs, moved, dropped)
        self._retire(index, sealed)
        _, bytes_after = self.size()
        output_bytes = sum(seg.end for seg in outputs)
        return {"vid": self.vid, "segments_compacted": len(sealed),
                "segments_written": len(outputs), "needles_moved": len(moved),
                "entries_dropped": len(dropped), "entries_changed": changed,
                "corrupt": corrupt, "bytes_before": bytes_before, "bytes_after": bytes_after,
                "reclaimed": sealed_bytes - output_bytes,
                "seconds": round(time.monotonic() - started, 3)}

    def _seal_all(self, commit: GroupCommit) -> dict[int, Segment]:
        """Seal the active segment (when it holds anything) and return every sealed segment,
        once all their needles are indexed in LMDB."""
        with self.lock:
            if self.active is not None and self.active.end:
                self.active.seal()
                self.active = self._create_segment()
            with self._pins:
                sealed = {i: s for i, s in self.segments.items() if s is not self.active}
            ticket = commit.ticket()
        # Every needle in a sealed segment must be in LMDB, not only in the overlay: the swap
        # moves LMDB entries, and the sealed files are deleted after it.
        commit.wait_indexed(ticket)
        return sealed

    def _copy_live_needles(
        self, index: Index, sealed: dict[int, Segment],
    ) -> tuple[list[tuple[bytes, NeedleLocation, NeedleLocation]],
               list[tuple[bytes, NeedleLocation]], list[str], list[Segment]]:
        """Copy the live, intact needles of `sealed` into new detached segments, synced.

        Returns (moved: key, old and new location; dropped: deleted or corrupt entries;
        corrupt key hexes; the new segments). On failure the new segments are removed."""
        work = sorted(((e.segment, e.offset, key, e) for key, e in index.entries(self.vid)
                       if e.segment in sealed), key=lambda t: (t[0], t[1]))
        moved: list[tuple[bytes, NeedleLocation, NeedleLocation]] = []
        dropped: list[tuple[bytes, NeedleLocation]] = []
        corrupt: list[str] = []
        outputs: list[Segment] = []
        out: Segment | None = None
        try:
            for seg_id, offset, key, entry in work:
                if entry.deleted:
                    dropped.append((key, entry))
                    continue
                buf = os.pread(sealed[seg_id].fd, entry.length, offset)
                try:
                    decode_needle(buf, expect_key=key, expect_cookie=self.cookie)
                except CorruptObject as e:
                    log.error("volume %d: dropping corrupt needle %s in compaction: %s",
                              self.vid, key.hex(), e)
                    self.counters.add("corrupt_compacted")
                    corrupt.append(key.hex())
                    dropped.append((key, entry))
                    continue
                if out is None or (out.end and out.end + len(buf) > self.segment_bytes):
                    with self.lock:
                        out = self._create_segment_detached()
                    outputs.append(out)
                _write_at(out.fd, buf, out.end)
                moved.append((key, entry, entry._replace(segment=out.id, offset=out.end)))
                out.end += len(buf)
            for seg in outputs:
                os.fsync(seg.fd)
                seg.synced = seg.end
            if outputs:
                fsync_dir(self.root)
            self.counters.add("fsyncs", len(outputs) + bool(outputs))
        except BaseException:
            for seg in outputs:
                seg.close()
                seg.path.unlink(missing_ok=True)
            raise
        return moved, dropped, corrupt, outputs

    def _swap_in(self, index: Index, sealed: dict[int, Segment], outputs: list[Segment],
                 moved: list[tuple[bytes, NeedleLocation, NeedleLocation]],
                 dropped: list[tuple[bytes, NeedleLocation]]) -> int:
        """Publish the new segments and point the index at them; returns the entries changed."""
        with self._pins:
            for seg in outputs:
                self.segments[seg.id] = seg
        return index.swap(self.vid, moved, dropped, sorted(sealed),
                          {seg.id: seg.end for seg in outputs})

    def _retire(self, index: Index, sealed: dict[int, Segment]) -> None:
        """Drop the compacted segments: closed once their last reader finishes, then deleted."""
        with self._pins:
            for seg_id, seg in sealed.items():
                del self.segments[seg_id]
                seg.retired = True
                if not seg.readers:
                    seg.close()
        for seg in sealed.values():
            seg.path.unlink(missing_ok=True)
        if sealed:
            fsync_dir(self.root)
            index.forget_retired(self.vid, sorted(sealed))

    def _create_segment_detached(self) -> Segment:
        """A new segment for compaction output: not yet in `segments` (no entry points into
        it until the swap), so neither readers nor writers see it."""
        seg_id = self.next_segment
        self.next_segment += 1
        path = self.root / segment_name(seg_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        return Segment(self.vid, seg_id, path, fd, 0)


def _open_for_gets(path: Path) -> int:
    """A read-only descriptor of a segment with readahead off (see `Segment.read_fd`)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def _zero_fill(fd: int, offset: int, end: int) -> bool:
    """Whether the bytes from `offset` to `end` are the zero fill of a direct append: fewer
    than a block, all zero."""
    return (0 < end - offset < BLOCK and not end % BLOCK
            and not any(os.pread(fd, end - offset, offset)))


def _write_parts_at(fd: int, parts: tuple[bytes, bytes | memoryview, bytes], length: int,
                    offset: int) -> None:
    """Write a needle's parts at `offset` with one pwritev (the data is not copied); a short
    write (rare) is finished by `_write_at`."""
    try:
        done = os.pwritev(fd, parts, offset)
    except OSError:
        done = 0
    if done < length:
        _write_at(fd, b"".join(parts)[done:], offset + done)


def _write_at(fd: int, buf: bytes, offset: int) -> None:
    """Write all of `buf` at `offset`; on failure cut the file back so no partial needle
    stays (recovery would truncate it anyway)."""
    view = memoryview(buf)
    done = 0
    try:
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            done += n
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, offset)
        raise LocalIOError(f"writing a needle failed: {e}") from e
