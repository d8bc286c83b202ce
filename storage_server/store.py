"""`VolumeStore`: the storage engine one storage server runs over its data directory.

DATA_DIR holds `format` (JSON: format version, number of volumes, cookie), `lock` (flock'ed
by the one process that owns the directory), `index/` (the LMDB needle index) and
`volumes/VVVV/SSSSSSSS.seg` (segment files). A key (a 32-byte chunk hash) lives in volume
`cachefs.contracts.volume_of(key, volumes)` (key mod volumes). Every method is safe to call from
many threads at once; writes (`put_many`, `delete`) return only once durable, and many of them,
in many volumes, share each fsync (see storage_server/volume.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachefs.contracts import check_key, volume_of
from cachefs.errors import (
    CorruptObject,
    InvalidName,
    LocalIOError,
    ObjectNotFound,
    RepositoryBusy,
    UsageError,
)
from cachefs.fsutil import fsync_dir
from storage_server.index import DEFAULT_CACHE_ENTRIES, DEFAULT_MAP_SIZE, Index, NeedleLocation
from storage_server.needle import (
    FLAG_TOMBSTONE,
    HEADER_BYTES,
    MAX_DATA_BYTES,
    verified_data_end,
)
from storage_server.needle_cache import NeedleCache
from storage_server.volume import (
    DEFAULT_SEGMENT_BYTES,
    Counters,
    GroupCommit,
    Volume,
)

log = logging.getLogger(__name__)

FORMAT_NAME = "cachefs-haystack"
FORMAT_VERSION = 1
DEFAULT_VOLUMES = 64
MAX_VOLUMES = 1 << 16  # a vid is a u16 in the index keys
_READ_ATTEMPTS = 8  # lookups per get when compaction keeps moving the needle


class VolumeStore:
    """The volumes of one data directory: put, get, has, delete, list, stat, compact, verify."""

    def __init__(self, data_dir: str | os.PathLike[str], volumes: int | None = None,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, fsync_interval_ms: float = 0.0,
                 map_size: int = DEFAULT_MAP_SIZE, index_interval_ms: float = 50.0,
                 direct_io: bool = True,
                 index_cache_entries: int = DEFAULT_CACHE_ENTRIES,
                 memory_cache_bytes: int = 0) -> None:
        if volumes is not None and not 1 <= volumes <= MAX_VOLUMES:
            raise UsageError(f"--volumes {volumes}: must be between 1 and {MAX_VOLUMES}")
        if segment_bytes < 4096:
            raise UsageError(f"segment size {segment_bytes}: at least 4096 bytes")
        if index_cache_entries < 0:
            raise UsageError(f"--index-cache {index_cache_entries}: must not be negative")
        if fsync_interval_ms < 0:
            raise UsageError(f"--fsync-interval-ms {fsync_interval_ms}: must not be negative")
        if memory_cache_bytes < 0:
            raise UsageError(f"--memory-cache {memory_cache_bytes}: must not be negative")
        self.memory_cache = NeedleCache(memory_cache_bytes) if memory_cache_bytes else None
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RepositoryBusy(f"{self.data_dir}: another storage server is using it") from None
        try:
            fmt = self._load_format(volumes)
            self.volumes: int = fmt["volumes"]
            self.cookie: int = fmt["cookie"]
            self.counters = Counters()
            self.index = Index(self.data_dir / "index", map_size, index_cache_entries)
            self._volumes = [Volume(self.data_dir / "volumes" / f"{vid:04x}", vid, self.cookie,
                                    segment_bytes, self.counters, direct_io)
                             for vid in range(self.volumes)]
            self.recovered = self._recover()
            self.commit = GroupCommit(self.index, self.counters, fsync_interval_ms,
                                      index_interval_ms=index_interval_ms)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._closed = False

    # -- opening -------------------------------------------------------------------------------

    def _load_format(self, volumes: int | None) -> dict[str, Any]:
        path = self.data_dir / "format"
        try:
            fmt = json.loads(path.read_text())
        except FileNotFoundError:
            fmt = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                   "volumes": volumes or DEFAULT_VOLUMES, "cookie": secrets.randbits(32)}
            for vid in range(fmt["volumes"]):
                (self.data_dir / "volumes" / f"{vid:04x}").mkdir(parents=True, exist_ok=True)
            fsync_dir(self.data_dir / "volumes")
            tmp = self.data_dir / "format.tmp"
            with open(tmp, "w") as f:
                json.dump(fmt, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(self.data_dir)
            return fmt
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: unreadable: {e}") from e
        if not isinstance(fmt, dict) or fmt.get("format") != FORMAT_NAME:
            raise UsageError(f"{path}: not a cachefs storage data directory")
        if fmt.get("version") != FORMAT_VERSION:
            raise UsageError(f"{path}: format version {fmt.get('version')}, this build reads "
                             f"{FORMAT_VERSION}")
        if volumes is not None and volumes != fmt["volumes"]:
            raise UsageError(f"--volumes {volumes}: {self.data_dir} was created with "
                             f"{fmt['volumes']} volumes, fixed for its lifetime")
        return fmt

    def _recover(self) -> dict[str, Any]:
        total: dict[str, Any] = {"segments_scanned": 0, "needles_indexed": 0,
                                 "tombstones_indexed": 0, "bytes_truncated": 0,
                                 "truncated": [], "retired_removed": 0, "missing": []}
        for vol in self._volumes:
            report = vol.open(self.index)
            for name, value in report.items():
                if isinstance(value, list):
                    total[name].extend({"vid": vol.vid, **v} for v in value)
                else:
                    total[name] += value
        if total["needles_indexed"] or total["bytes_truncated"] or total["missing"]:
            log.warning("recovery: indexed %d needles, truncated %d bytes in %d places, "
                        "%d segments missing", total["needles_indexed"],
                        total["bytes_truncated"], len(total["truncated"]),
                        len(total["missing"]))
        return total

    # -- keys ----------------------------------------------------------------------------------

    def vid_of(self, key: bytes) -> int:
        """The volume a key lives in."""
        return volume_of(key, self.volumes)

    def _check_vid(self, vid: int) -> Volume:
        if not isinstance(vid, int) or not 0 <= vid < self.volumes:
            raise UsageError(f"volume {vid}: there are {self.volumes} (0 to {self.volumes - 1})")
        return self._volumes[vid]

    # -- the API -------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        """Store each (key, data); durable on return. A key already stored live with the same
        size is skipped (needles are immutable and named by their content). Returns the data
        bytes newly written."""
        self.commit.check()
        for key, data in items:
            check_key(key)
            if len(data) > MAX_DATA_BYTES:
                raise InvalidName(f"needle data: {len(data)} bytes, at most {MAX_DATA_BYTES}")
        keys = [bytes(key) for key, _ in items]
        entries = self.index.get_many((self.vid_of(k), k) for k in keys)
        seen: set[bytes] = set()
        written = 0
        appended = []
        for key, (_, data), entry in zip(keys, items, entries):
            if key in seen or (entry is not None and not entry.deleted
                               and entry.size == len(data)):
                continue
            seen.add(key)
            appended.append(self._volumes[self.vid_of(key)].append(key, data, 0, self.commit))
            written += len(data)
        if appended:
            self.commit.make_durable(appended)
            self.counters.add("bytes_written", written)
        return written

    def get(self, key: bytes, start: int = 0, length: int | None = None) -> bytes | memoryview:
        """The data of `key`, or `length` bytes of it from `start` (b"" past the end), as a
        read-only view into the one buffer the needle was read into (no copy; `bytes()` of it
        for one). Raises ObjectNotFound if absent or deleted, CorruptObject if it fails its
        checksum."""
        check_key(key)
        if start < 0 or (length is not None and length < 0):
            raise UsageError(f"range: start {start}, length {length}: must not be negative")
        key = bytes(key)
        vid = self.vid_of(key)
        vol = self._volumes[vid]
        for _ in range(_READ_ATTEMPTS):
            entry = self.index.get(vid, key)
            if entry is None or entry.deleted:
                raise ObjectNotFound(f"needle {key.hex()}: not stored here")
            if self.memory_cache is None:
                read = self._read(vol, entry, key)
                data = None if read is None else read[0]
            else:
                data = self.memory_cache.get(key, entry.sequence,
                                             functools.partial(self._read, vol, entry, key))
            if data is None:
                continue  # compaction moved it between the lookup and the read
            if not start and length is None:
                self.counters.add("bytes_read", len(data))
                return data
            stop = len(data) if length is None else min(len(data), start + length)
            if start >= stop:
                return b""
            self.counters.add("bytes_read", stop - start)
            return data[start:stop]
        raise ObjectNotFound(f"needle {key.hex()}: kept moving while being read; try again")

    def _read(self, vol: Volume, entry: NeedleLocation,
              key: bytes) -> tuple[memoryview, int] | None:
        """(the verified data of the needle `entry` points at, as a read-only view into the
        buffer it was read into; that buffer's size), or None if compaction moved it. Raises
        CorruptObject (and counts it) if a check fails."""
        got = vol.read(entry, key, self.cookie)
        if got is None:
            return None
        buf, end = got
        try:
            if end < 0:
                verified_data_end(buf, key, self.cookie)  # raises, naming the field
        except CorruptObject as e:
            self.counters.add("corrupt_reads")
            log.error("volume %d segment %08x offset %d: %s", vol.vid, entry.segment,
                      entry.offset, e)
            raise CorruptObject(f"needle {key.hex()} (volume {vol.vid}, segment "
                                f"{entry.segment:08x}, offset {entry.offset}): {e}",
                                key.hex()) from e
        return memoryview(buf)[HEADER_BYTES:end], len(buf)  # of bytes: read-only

    def has_many(self, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is stored live (one index lookup each, no data read)."""
        for key in keys:
            check_key(key)
        entries = self.index.get_many((self.vid_of(bytes(k)), bytes(k)) for k in keys)
        return [e is not None and not e.deleted for e in entries]

    def delete(self, key: bytes) -> bool:
        """Delete `key` by appending a tombstone; durable on return. True if it was live."""
        self.commit.check()
        check_key(key)
        key = bytes(key)
        vid = self.vid_of(key)
        entry = self.index.get(vid, key)
        if entry is None or entry.deleted:
            return False
        self.commit.make_durable([self._volumes[vid].append(key, b"", FLAG_TOMBSTONE,
                                                            self.commit)])
        if self.memory_cache is not None:
            self.memory_cache.discard(key)
        return True

    def list_keys(self, vid: int, start_after: bytes | None = None,
                  limit: int = 1000) -> list[bytes]:
        """Up to `limit` live keys of volume `vid` after `start_after`, in byte order."""
        self._check_vid(vid)
        if start_after is not None:
            check_key(start_after)
            start_after = bytes(start_after)
        if limit < 0:
            raise UsageError(f"limit {limit}: must not be negative")
        return [key for key, _ in self.index.entries(vid, start_after, limit, live_only=True)]

    def stat(self) -> dict[str, Any]:
        """Counts and sizes, per volume and in total; JSON-able."""
        with contextlib.suppress(LocalIOError):  # the counts live in LMDB: catch it up first
            self.commit.wait_indexed()
        per_volume = []
        totals = {"segments": 0, "needles": 0, "live": 0, "deleted": 0, "bytes": 0,
                  "live_bytes": 0}
        for vol in self._volumes:
            segments, size = vol.size()
            counts = self.index.counts(vol.vid)
            row = {"vid": vol.vid, "segments": segments,
                   "needles": counts.live + counts.deleted, "live": counts.live,
                   "deleted": counts.deleted, "bytes": size, "live_bytes": counts.live_bytes}
            per_volume.append(row)
            for name in totals:
                totals[name] += row[name]
        fs = os.statvfs(self.data_dir)
        counters = dict(self.counters.values)
        return {"volumes": self.volumes, "data_dir": str(self.data_dir),
                "per_volume": per_volume, "totals": totals,
                "free_bytes": fs.f_bavail * fs.f_frsize,
                "corrupt_reads": counters.get("corrupt_reads", 0),
                "preads": counters.get("preads", 0),
                "direct_reads": counters.get("direct_reads", 0),
                "fsyncs": counters.get("fsyncs", 0),
                "group_commits": counters.get("group_commits", 0),
                "index_commits": counters.get("index_commits", 0),
                "needles_committed": counters.get("needles_committed", 0),
                "bytes_read": counters.get("bytes_read", 0),
                "bytes_written": counters.get("bytes_written", 0),
                "index_cache": {"entries": self.index.cached,
                                "capacity": self.index.cache_entries},
                "memory_cache": (self.memory_cache.stats() if self.memory_cache is not None
                                 else {"capacity_bytes": 0}),
                "recovered": self.recovered}

    def compact(self, vid: int | None = None) -> dict[str, Any]:
        """Compact one volume, or all when `vid` is None, while reads and writes go on."""
        vols = self._volumes if vid is None else [self._check_vid(vid)]
        self.commit.check()
        reports = [vol.compact(self.index, self.commit) for vol in vols]
        return {"volumes": reports,
                "bytes_before": sum(r["bytes_before"] for r in reports),
                "bytes_after": sum(r["bytes_after"] for r in reports),
                "reclaimed": sum(r["reclaimed"] for r in reports),
                "corrupt": [k for r in reports for k in r["corrupt"]]}

    def verify(self, vid: int | None = None) -> dict[str, Any]:
        """Read every live needle (of one volume, or all) and check it. Returns
        {"checked": n, "corrupt": [hex keys], "volumes": [vids]}."""
        vols = self._volumes if vid is None else [self._check_vid(vid)]
        checked = 0
        corrupt: list[str] = []
        for vol in vols:
            for key, _ in self.index.entries(vol.vid, live_only=True):
                checked += 1
                try:
                    self.get(key)
                except CorruptObject:
                    corrupt.append(key.hex())
                except ObjectNotFound:
                    checked -= 1  # deleted meanwhile
        return {"checked": checked, "corrupt": corrupt, "volumes": [v.vid for v in vols]}

    def close(self) -> None:
        """Finish queued writes and release the directory. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self.commit.close()
        for vol in self._volumes:
            vol.close()
        self.index.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> VolumeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
