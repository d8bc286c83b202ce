"""A logical volume on disk: append-only segment files of needles, and the group commit.

Writes. A writer encodes its needle, appends it to the volume's active segment under the
volume's lock (rolling to a new segment when the next needle would pass `segment_bytes`) and,
still under that lock, queues it with the `GroupCommit`. So the queue holds each segment's
needles in offset order, and a batch taken from it covers a prefix of every segment. The one
flusher thread takes whatever is queued, fsyncs every segment the batch touched (in parallel),
fsyncs the directory of any segment new since the last flush, stages the batch's entries in the
index's in-memory overlay and wakes every writer the batch covered. A put therefore returns only
when its needle is on disk and findable; writers that queue while a flush runs share the next
one. `fsync_interval_ms` spaces flushes out to batch more under light load. The indexer thread
commits staged entries to LMDB in larger transactions (every `index_interval_ms`) and then
drops them from the overlay; until then recovery would find them past the indexed ends.

Reads. One index lookup gives (segment, offset, size); one `os.pread` of the whole needle
follows, and the needle is verified (key, cookie, CRC-32) before any byte is returned.

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

from cachefs.errors import CorruptObject, LocalIOError
from storage_server.index import Entry, Index, Record
from storage_server.needle import (
    HEADER_BYTES,
    decode_needle,
    encode_needle_parts,
    parse_header,
)

log = logging.getLogger(__name__)

SEGMENT_NAME = re.compile(r"^([0-9a-f]{8})\.seg$")
DEFAULT_SEGMENT_BYTES = 1 << 30
_SCAN_BATCH = 4096
FLUSHERS = 4  # concurrent fsync rounds (acknowledged in order)


def segment_name(segment: int) -> str:
    return f"{segment:08x}.seg"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Segment:
    """One open segment file: its id, descriptor and the end of what has been appended."""

    def __init__(self, vid: int, segment: int, path: Path, fd: int, end: int,
                 dir_synced: bool) -> None:
        self.vid = vid
        self.id = segment
        self.path = path
        self.fd = fd
        self.end = end
        self.dir_synced = dir_synced
        self.readers = 0
        self.retired = False

    def close(self) -> None:
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
    """The flusher and the indexer: many queued needles, of many volumes, share each fsync,
    and many fsynced batches share each LMDB transaction. `enqueue` returns a ticket;
    `wait(ticket)` returns once that needle is durable in its segment (and findable through the
    index's overlay); `wait_indexed(ticket)` once it is committed to LMDB as well."""

    def __init__(self, index: Index, counters: Counters, fsync_interval_ms: float = 0.0,
                 fsync: Callable[[int], None] = os.fsync, index_interval_ms: float = 50.0,
                 index_batch: int = 8192) -> None:
        self.index = index
        self.counters = counters
        self.interval = max(0.0, fsync_interval_ms) / 1000.0
        self.index_interval = max(0.0, index_interval_ms) / 1000.0
        self.index_batch = max(1, index_batch)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the flusher waits for queued needles
        self._done = threading.Condition(self._lock)  # writers wait for acks, flushes to LMDB
        self._idx = threading.Condition(self._lock)  # the indexer waits for staged needles
        self._queue: list[tuple[Record, Segment]] = []
        self._ticket = 0
        self._flushed = 0  # tickets fsynced and staged (acknowledged)
        self._staged: list[tuple[Record, Segment]] = []  # acknowledged, not yet in LMDB
        self._staged_upto = 0
        self._indexed = 0  # tickets committed to LMDB
        self._index_wanted = 0  # someone waits until `_indexed` reaches this
        self._failed: BaseException | None = None
        self._closing = False
        self._syncer_done = False
        self._last = 0.0
        self._rounds_taken = 0  # flush rounds handed to flushers
        self._rounds_acked = 0  # rounds acknowledged, in order
        self._rounds_done: dict[int, tuple[bool, list[tuple[Record, Segment]], int]] = {}
        self._flushers = FLUSHERS
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fsync")
        self._threads = [*(threading.Thread(target=self._run, name=f"group-commit-fsync-{i}",
                                            daemon=True) for i in range(FLUSHERS)),
                         threading.Thread(target=self._index_run, name="group-commit-index",
                                          daemon=True)]
        for thread in self._threads:
            thread.start()

    def check(self) -> None:
        if self._failed is not None:
            raise LocalIOError(f"storage writes stopped after a failed flush: {self._failed}")
        if self._closing:
            raise LocalIOError("storage is closed")

    def enqueue(self, record: Record, segment: Segment) -> int:
        """Queue one appended needle (called under its volume's lock, in offset order)."""
        with self._lock:
            self._queue.append((record, segment))
            self._ticket += 1
            self._work.notify()
            return self._ticket

    def ticket(self) -> int:
        with self._lock:
            return self._ticket

    def wait(self, ticket: int) -> None:
        """Return once needle `ticket` (and every earlier one) is on disk."""
        with self._lock:
            while self._flushed < ticket:
                self._done.wait()
            if self._failed is not None:
                raise LocalIOError(f"flushing to disk failed: {self._failed}")

    def wait_indexed(self, ticket: int | None = None) -> None:
        """Return once needle `ticket` (default: every one queued so far) is in LMDB, not just
        in the overlay: compaction and stat need the committed index."""
        with self._lock:
            if ticket is None:
                ticket = self._ticket
            while self._flushed < ticket:
                self._done.wait()
            if self._indexed < ticket and self._failed is None:
                self._index_wanted = max(self._index_wanted, ticket)
                self._idx.notify()
                while self._indexed < ticket and self._failed is None:
                    self._done.wait()
            if self._failed is not None:
                raise LocalIOError(f"flushing to disk failed: {self._failed}")

    def close(self) -> None:
        """Flush what is queued, commit every staged entry to LMDB, stop the threads."""
        with self._lock:
            self._closing = True
            self._work.notify_all()
            self._idx.notify_all()
        for thread in self._threads:
            thread.join()
        self._pool.shutdown()

    def _run(self) -> None:
        """A flusher (there are FLUSHERS): take everything queued, fsync it; rounds run
        concurrently (so the journal can merge their flushes, and a round never waits for
        another to start), but are acknowledged strictly in the order they were taken: a
        round's entries are staged in the overlay and its writers woken only once every earlier
        round is on disk, so the acknowledged needles are always a prefix of each segment."""
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._closing:
                        self._work.wait()
                    if not self._queue:
                        return
                    while self.interval and not self._closing:
                        remaining = self._last + self.interval - time.monotonic()
                        if remaining <= 0:
                            break
                        self._work.wait(remaining)
                    if not self._queue:
                        continue  # another flusher took it meanwhile
                    batch, self._queue = self._queue, []
                    upto = self._ticket
                    self._last = time.monotonic()
                    round_id = self._rounds_taken
                    self._rounds_taken += 1
                ok = self._failed is None
                if ok:
                    try:
                        self._sync_batch(batch)
                    except BaseException as e:  # the state of the disk is unknown: stop writing
                        self._fail(e)
                        ok = False
                with self._lock:
                    self._rounds_done[round_id] = (ok, batch, upto)
                    self._acknowledge_in_order()
        finally:
            with self._lock:
                self._flushers -= 1
                if self._flushers == 0:
                    self._syncer_done = True
                self._idx.notify_all()
                self._done.notify_all()

    def _acknowledge_in_order(self) -> None:
        """(Under the lock.) Stage and acknowledge every finished round whose predecessors are
        all finished."""
        while self._rounds_acked in self._rounds_done:
            ok, batch, upto = self._rounds_done.pop(self._rounds_acked)
            self._rounds_acked += 1
            if ok and self._failed is None:
                self.index.stage(record for record, _ in batch)
                self.counters.add("group_commits")
                self.counters.add("needles_committed", len(batch))
                if not self._staged or len(self._staged) + len(batch) >= self.index_batch:
                    self._idx.notify()  # start its interval, or commit now
                self._staged.extend(batch)
                self._staged_upto = upto
            self._flushed = upto
        self._done.notify_all()

    def _index_run(self) -> None:
        """The indexer: every `index_interval` (sooner when `index_batch` entries wait, or
        someone needs them in LMDB, or at close) commit every staged entry in one LMDB
        transaction, raising the indexed ends, and only then drop them from the overlay."""
        while True:
            with self._lock:
                deadline = None
                while True:
                    if self._staged and (self._syncer_done or self._closing
                                         or len(self._staged) >= self.index_batch
                                         or self._index_wanted > self._indexed):
                        break
                    if not self._staged:
                        if self._syncer_done:
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
                batch, self._staged = self._staged, []
                upto = self._staged_upto
            if self._failed is None:
                try:
                    self._index_batch(batch)
                    self.index.unstage(record for record, _ in batch)
                except BaseException as e:  # entries stay in the overlay: reads still work
                    self._fail(e)
            with self._lock:
                self._indexed = upto
                self._done.notify_all()

    def _fail(self, e: BaseException) -> None:
        log.error("group commit failed, refusing further writes: %r", e)
        with self._lock:
            if self._failed is None:
                self._failed = e
            self._done.notify_all()

    def _sync(self, fd: int) -> None:
        self.fsync(fd)

    def _sync_batch(self, batch: list[tuple[Record, Segment]]) -> None:
        segments = list({id(seg): seg for _, seg in batch}.values())
        if len(segments) == 1:
            self._sync(segments[0].fd)
        else:  # concurrent fsyncs: the journal commits them together
            list(self._pool.map(self._sync, [seg.fd for seg in segments]))
        self.counters.add("fsyncs", len(segments))
        dirs = {seg.path.parent for seg in segments if not seg.dir_synced}
        for path in dirs:
            fsync_dir(path)
        self.counters.add("fsyncs", len(dirs))
        for seg in segments:
            seg.dir_synced = True

    def _index_batch(self, batch: list[tuple[Record, Segment]]) -> None:
        ends: dict[tuple[int, int], int] = {}
        for record, seg in batch:
            end = record.entry.offset + record.entry.length
            if ends.get((seg.vid, seg.id), 0) < end:
                ends[(seg.vid, seg.id)] = end
        self.index.apply([record for record, _ in batch], ends)
        self.counters.add("index_commits")


class Volume:
    """One logical volume: its segment files in DATA_DIR/volumes/VVVV/."""

    def __init__(self, root: Path, vid: int, cookie: int, segment_bytes: int,
                 counters: Counters) -> None:
        self.root = root
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
            segment = Segment(self.vid, seg_id, path, fd, size, dir_synced=True)
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
                entry = Entry(segment.id, offset, len(needle.data), needle.flags,
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
            log.warning("volume %d segment %08x: truncating %d bytes at offset %d: %s",
                        self.vid, segment.id, cut, offset, reason)
            os.ftruncate(segment.fd, offset)
            os.fsync(segment.fd)
            segment.end = offset
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
        segment = Segment(self.vid, seg_id, path, fd, 0, dir_synced=False)
        with self._pins:
            self.segments[seg_id] = segment
        return segment

    def append(self, key: bytes, data: bytes | memoryview, flags: int,
               commit: GroupCommit) -> int:
        """Append one needle and queue it for the group commit; returns its ticket."""
        with self.lock:
            sequence = self.next_sequence
            parts = encode_needle_parts(key, data, self.cookie, flags, sequence)
            length = sum(len(p) for p in parts)
            seg = self.active
            if seg is None or (seg.end and seg.end + length > self.segment_bytes):
                seg = self.active = self._create_segment()
            offset = seg.end
            _write_parts_at(seg.fd, parts, length, offset)
            seg.end = offset + length
            self.next_sequence = sequence + 1
            entry = Entry(seg.id, offset, len(data), flags, sequence)
            return commit.enqueue(Record(self.vid, key, entry), seg)

    # -- reading -----------------------------------------------------------------------------

    def read(self, entry: Entry) -> bytes | None:
        """The raw needle `entry` points at, by one pread; None if its segment was retired
        (the caller looks the key up again)."""
        with self._pins:
            seg = self.segments.get(entry.segment)
            if seg is None:
                return None
            seg.readers += 1
        try:
            self.counters.add("preads")
            return os.pread(seg.fd, entry.length, entry.offset)
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
        with self.lock:
            if self.active is not None and self.active.end:
                self.active = self._create_segment()
            with self._pins:
                sealed = {i: s for i, s in self.segments.items() if s is not self.active}
            ticket = commit.ticket()
        # Every needle in a sealed segment must be in LMDB, not only in the overlay: the swap
        # moves LMDB entries, and the sealed files are deleted after it.
        commit.wait_indexed(ticket)
        _, bytes_before = self.size()
        sealed_bytes = sum(s.end for s in sealed.values())
        work = sorted(((e.segment, e.offset, key, e) for key, e in index.entries(self.vid)
                       if e.segment in sealed), key=lambda t: (t[0], t[1]))
        moved: list[tuple[bytes, Entry, Entry]] = []
        dropped: list[tuple[bytes, Entry]] = []
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
            if outputs:
                fsync_dir(self.root)
            self.counters.add("fsyncs", len(outputs) + bool(outputs))
        except BaseException:
            for seg in outputs:
                seg.close()
                seg.path.unlink(missing_ok=True)
            raise
        with self._pins:
            for seg in outputs:
                seg.dir_synced = True
                self.segments[seg.id] = seg
        changed = index.swap(self.vid, moved, dropped, sorted(sealed),
                             {seg.id: seg.end for seg in outputs})
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
        _, bytes_after = self.size()
        output_bytes = sum(seg.end for seg in outputs)
        return {"vid": self.vid, "segments_compacted": len(sealed),
                "segments_written": len(outputs), "needles_moved": len(moved),
                "entries_dropped": len(dropped), "entries_changed": changed,
                "corrupt": corrupt, "bytes_before": bytes_before, "bytes_after": bytes_after,
                "reclaimed": sealed_bytes - output_bytes,
                "seconds": round(time.monotonic() - started, 3)}

    def _create_segment_detached(self) -> Segment:
        """A new segment for compaction output: not yet in `segments` (no entry points into
        it until the swap), so neither readers nor writers see it."""
        seg_id = self.next_segment
        self.next_segment += 1
        path = self.root / segment_name(seg_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        return Segment(self.vid, seg_id, path, fd, 0, dir_synced=False)


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
