"""The disk tier: a bounded, verified, least-recently-used object cache on a node's local SSD.

One cache directory serves a whole node: every mount process on it (different datasets, or two
versions of one dataset, in different pods) opens the same directory at once. Each object is one
file, ``DIR/objects/<key>``, mirroring its repository key (``chunks/ab/<hash>``,
``trees/ab/<hash>``, ``commits/ab/<hash>``); keys are content names, so an object that two
versions or two datasets share is stored once, whoever fetched it first. ``DIR/format`` holds the
layout version (a directory written by a newer cachefs is refused), and ``DIR/state`` is both the
node-wide lock (``fcntl.flock``) and the running total of bytes stored (an 8-byte counter). A
writer reserves the object's size in that counter under the lock, writes a temporary file
(``.tmp-<size>-<random>``) in the entry's own directory and links it into place without
replacing anything, so a reader never sees a partial file and, when two processes store the same
object at once, the first one wins and the other takes its reservation back. When a reservation
would exceed the capacity, the writer evicts under the lock: it rescans the directory itself (so
writes and deletions by every process, and by crashed ones, are accounted for exactly; in-flight
temporary files count at the size in their name, and abandoned ones are removed), then deletes
the entries with the oldest mtime until the usage is down to 90% of the capacity. Unlinking a
file that another process is reading is harmless on Linux. Recency is the file's mtime: a hit
sets it to now, at most once per entry per `touch_interval_s` (one minute by default) so hits stay
cheap. The directory is rescanned when a cache is opened; between scans nobody walks it. Entries
survive remounts and reboots (they are plain files) and are not fsynced: an entry torn by a crash
is caught on its next read, because every hit is checked: against the entry's sub-block sums
(below; a torn file fails them, or its length no longer matches them), or, for an entry without
sums, whole with the caller's `verify(key, data)`; an entry that
fails is deleted, counted as corrupt and reported as a miss. Any I/O failure is a
logged miss or a skipped insert, never an error for the reader. Puts are also skipped while the
file system's free space is below a floor, whatever the capacity says, so the cache never fills
the disk that other tenants of the node need.

Range reads (`get_range`) check only the sub-blocks they cover. Beside its bytes, an entry keeps
the CRC-32 (ISA-L) of each fixed sub-block (64 KiB, doubled for objects over 32 MiB so there are
at most 512) in the extended attribute ``user.cachefs.sums`` of its own file: written on the
temporary file before it is linked into place (so an entry and its sums appear together), and
gone with the inode when the entry is evicted or dropped, by any process. The data file stays
exactly the object's bytes, so daemons of the previous version, which read entries whole and
verify their hash, share the directory unchanged. An entry is verified against its name once,
when stored (by the caller, before `put`) or, for an entry without sums (written by an older
daemon, or on a file system without user xattrs), when first read: `get` and a range read of
such an entry read it whole, verify it and then add its sums. Sums that do not describe the
file's current length are ignored (treated as missing). A sub-block whose sum fails makes the
entry corrupt: it is deleted and the read is a miss, never a short or wrong answer. The sums
guard against the disk (bit rot, torn files), not against someone who may write the directory:
whoever can do that could as well write a matching sum.

Around the page cache, and through it (`cachefs.directio`): entries of `DIRECT_WRITE_MIN` bytes
or more are written with O_DIRECT (zero-padded to whole blocks, then cut to their length, before
the sums and the link), and reads of `DIRECT_READ_MIN` bytes or more not all in the page cache
(cachestat(2)) are read with O_DIRECT into a fresh buffer that is checked there and handed on as
a read-only view (no copy). What the tier serves is cached again above it (the mount's pages of
the file, the memory tier), and a chunk streaming through it would otherwise cost a page-cache
fill on the way in and on the way out. Smaller reads (a small file inside a pack) go through the
page cache, which is faster for them on this kind of machine; `get_range(prefetch_entry=True)`
also asks for the whole entry (POSIX_FADV_WILLNEED, once the range is read), whose neighbours
are wanted soon, unless
the page cache has evicted pages of it before (then it is too small to keep whole entries until
their neighbours are read, and only the range is read), and
`get_range_if_cached` reads only what the page cache holds, for callers on an event loop. A file
system that refuses O_DIRECT turns it off for the cache.

A FUSE mount also reads this layout in C (`compiled_reads`: cachefs.cache._fastread, given the
constants below), for the READs of its files; its counters join this tier's `stats`. A change to
the entry path, the sums, the O_DIRECT rule or the prefetch policy is a change to both.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from isal.isal_zlib import crc32

from cachefs.cache.base import Blob, TierStats, Verifier
from cachefs.cache.compiled_reads import DEFAULT_THREADS as DEFAULT_READ_THREADS
from cachefs.cache.compiled_reads import TIER_COUNTERS as COMPILED_COUNTERS
from cachefs.cache.compiled_reads import CompiledReads
from cachefs.directio import (
    BLOCK,
    BUFFERS,
    DIRECT_READ_MIN,
    align_up,
    cachestat,
    fully_cached,
    open_direct,
    result_buffer,
)
from cachefs.errors import ConfigError
from cachefs.fsutil import link_into_place, write_new_file

log = logging.getLogger("cachefs.cache.disk")
T = TypeVar("T")

FORMAT_VERSION = 1
DEFAULT_TOUCH_INTERVAL_S = 60.0
DEFAULT_LOW_WATER = 0.9  # an eviction frees space down to this fraction of the capacity
DEFAULT_CAPACITY_FRACTION = 0.5  # of (free space + what the cache already holds)
DEFAULT_FLOOR_FRACTION = 0.10  # of the file system's size ...
DEFAULT_FLOOR_MAX = 5 << 30  # ... or this, whichever is smaller
STALE_TEMP_S = 600.0  # a temporary file this old belongs to a writer that died
LOG_INTERVAL_S = 60.0  # repeated warnings of one kind are logged at most this often

_KEY_RE = re.compile(r"([a-z]+)/([0-9a-f]{2})/([0-9a-f]{64})")
_KIND_RE = re.compile(r"[a-z]+")
_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_NAME_RE = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_COUNTER = struct.Struct("<Q")
_NO_HARDLINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}

# Whole packs are asked for while fewer than this share of the entries recently met had pages
# evicted by reclaim (a moving average with this weight per entry; see _prefetch_decision).
EVICTION_RATE_LIMIT = 0.25
EVICTION_RATE_WEIGHT = 1 / 32
DIRECT_WRITE_MIN = 64 << 10  # smaller entries (trees, commits) go through the page cache
_NOT_CACHED = object()  # get_range_if_cached: the range is not (all) in the page cache
SUMS_XATTR = "user.cachefs.sums"
SUB_BLOCK_SHIFT = 16  # 64 KiB sub-blocks ...
MAX_SUB_BLOCKS = 512  # ... doubled until an object has at most this many (2 KiB of sums)
# The sums' header: version, log2 of the sub-block size, the object's length; then one
# little-endian u32 CRC-32 per sub-block.
_SUMS_HEADER = struct.Struct("<BBxxQ")
_SUMS_VERSION = 1

# (mtime_ns, size, path) of one complete file in the cache (an object of the SSD tier)
_CachedFile = tuple[int, int, str]


def split_cache_key(key: str) -> tuple[str, str, str]:
    """Split a repository key into (kind, fan-out, name); ValueError unless it is well formed.

    Only ``kind/xx/<64 hex>`` with ``xx`` the name's first two characters is accepted, so a key
    can never reach outside the cache directory.
    """
    m = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None or m.group(3)[:2] != m.group(2):
        raise ValueError(f"not a cache key (kind/xx/<64 hex>): {key!r}")
    return m.group(1), m.group(2), m.group(3)


def _sub_block_shift(size: int) -> int:
    shift = SUB_BLOCK_SHIFT
    while (size + (1 << shift) - 1) >> shift > MAX_SUB_BLOCKS:
        shift += 1
    return shift


def compute_sums(data: bytes | memoryview) -> bytes:
    """The sub-block sums of an object's bytes, as stored in its entry's `SUMS_XATTR`."""
    view = memoryview(data)
    shift = _sub_block_shift(len(view))
    step = 1 << shift
    crcs = [crc32(view[i : i + step]) for i in range(0, len(view), step)]
    return _SUMS_HEADER.pack(_SUMS_VERSION, shift, len(view)) + struct.pack(
        f"<{len(crcs)}I", *crcs)


def parse_sums(raw: bytes | None, size: int) -> tuple[int, tuple[int, ...]] | None:
    """(sub-block shift, CRCs) from stored sums, or None unless they describe `size` bytes."""
    if raw is None or len(raw) < _SUMS_HEADER.size:
        return None
    version, shift, length = _SUMS_HEADER.unpack_from(raw)
    if version != _SUMS_VERSION or length != size or shift != _sub_block_shift(size):
        return None
    count = (size + (1 << shift) - 1) >> shift
    if len(raw) != _SUMS_HEADER.size + 4 * count:
        return None
    return shift, struct.unpack_from(f"<{count}I", raw, _SUMS_HEADER.size)


def _read_sums(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, SUMS_XATTR)
    except OSError:
        return None  # ENODATA (none yet), ENOTSUP (no user xattrs here): read whole instead


def _pread_exactly(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset` (fewer only at the end of the file)."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _listdir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _temp_size(name: str) -> int:
    """The size reserved by an in-flight temporary file, from its name (0 if unreadable)."""
    size = name[len(_TMP_PREFIX):].partition("-")[0]
    return int(size) if size.isdigit() else 0


def _scan(objects: str, remove_stale_temps: bool,
          exclude: str | None = None) -> tuple[list[_CachedFile], int]:
    """Every complete entry under `objects`, and the bytes in use (in-flight writes included,
    except the temporary file `exclude`: the caller's own, which it counts itself)."""
    entries: list[_CachedFile] = []
    total = 0
    stale_before = time.time_ns() - int(STALE_TEMP_S * 1e9)
    for kind in _listdir(objects):
        if not (_KIND_RE.fullmatch(kind.name) and kind.is_dir(follow_symlinks=False)):
            continue
        for fan in _listdir(kind.path):
            if not (_FANOUT_RE.fullmatch(fan.name) and fan.is_dir(follow_symlinks=False)):
                continue
            for f in _listdir(fan.path):
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                if f.name.startswith(_TMP_PREFIX):
                    if f.path == exclude:
                        continue
                    if st.st_mtime_ns >= stale_before:
                        total += max(st.st_size, _temp_size(f.name))
                    elif remove_stale_temps:
                        with suppress(OSError):
                            os.unlink(f.path)
                elif _NAME_RE.fullmatch(f.name) and f.name[:2] == fan.name:
                    entries.append((st.st_mtime_ns, st.st_size, f.path))
                    total += st.st_size
    return entries, total


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _floor_for(st: os.statvfs_result) -> int:
    return min(int(st.f_blocks * st.f_frsize * DEFAULT_FLOOR_FRACTION), DEFAULT_FLOOR_MAX)


def _capacity_for(st: os.statvfs_result, used: int, floor: int) -> int:
    free = st.f_bavail * st.f_frsize
    return max(0, min(int((free + used) * DEFAULT_CAPACITY_FRACTION), free + used - floor))


# --- read-only views of a cache directory (for the node inventory; nothing is changed) -------


def stored_bytes(directory: Path | str) -> int:
    """The bytes a cache directory holds, from its usage counter (0 if unreadable)."""
    try:
        with open(Path(directory) / "state", "rb") as f:
            raw = f.read(_COUNTER.size)
    except OSError:
        return 0
    return _COUNTER.unpack(raw)[0] if len(raw) == _COUNTER.size else 0


def change_marker(directory: Path | str) -> int:
    """A number that changes whenever the directory's usage counter is written (every put,
    eviction and dropped entry, by any process); 0 if unreadable."""
    try:
        return os.stat(Path(directory) / "state").st_mtime_ns
    except OSError:
        return 0


def cached_sizes(directory: Path | str, keys: Iterable[str]) -> Iterator[tuple[str, int]]:
    """(key, size) for each of `keys` that the cache directory holds (not read, not verified,
    not a use)."""
    objects = Path(directory) / "objects"
    for key in keys:
        kind, fan, name = split_cache_key(key)
        try:
            st = os.stat(objects / kind / fan / name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            yield key, st.st_size


def read_cached(directory: Path | str, key: str, decode: Callable[[bytes], T]) -> T | None:
    """`decode(data)` of the cached bytes of `key`; None if the entry is absent, unreadable or
    `decode` raises. `decode` must verify the object against its name (`decode_tree` and
    `decode_commit` do). Read-only: not a use, and a corrupt entry is left for a mount to drop.
    """
    kind, fan, name = split_cache_key(key)
    try:
        data = (Path(directory) / "objects" / kind / fan / name).read_bytes()
    except OSError:
        return None
    try:
        return decode(data)
    except Exception as e:
        log.debug("cached %s does not decode: %s", key, e)
        return None


class DiskCache:
    """The `CacheTier` named "disk": verified object files in a directory shared by processes.

    `capacity_bytes` bounds the bytes stored (default: `default_capacity`); `free_space_floor`
    is the free space a put must leave on the file system (default: `default_free_space_floor`).
    `touch_interval_s` and `low_water` (the fraction of the capacity an eviction frees down to)
    are tuning knobs, mostly for tests. Opening creates the directory if needed and scans it;
    it raises ConfigError for a directory of a newer format and OSError if it cannot be used.
    """

    name = "disk"

    def __init__(
        self,
        directory: Path,
        capacity_bytes: int | None = None,
        *,
        verify: Verifier,
        free_space_floor: int | None = None,
        touch_interval_s: float = DEFAULT_TOUCH_INTERVAL_S,
        low_water: float = DEFAULT_LOW_WATER,
    ) -> None:
        if capacity_bytes is not None and capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, not {capacity_bytes}")
        if not 0.0 < low_water <= 1.0:
            raise ValueError(f"low_water must be in (0, 1], not {low_water}")
        self.directory = Path(directory)
        self._objects = str(self.directory / "objects")
        self._verify = verify
        self._touch_interval_ns = int(touch_interval_s * 1e9)
        self._low_water = low_water
        self._lock = threading.Lock()  # guards the flock (shared by threads) and the counter
        self._stats_lock = threading.Lock()
        self._stats = TierStats()
        self._skipped_low_space = 0
        self._skipped_too_large = 0
        self._low_space_logged = False
        self._xattrs = True  # False once the file system refused a user xattr
        self._direct = True  # False once the file system refused O_DIRECT
        self._eviction_rate = 0.0  # share of entries recently met with evicted pages
        self._compiled: CompiledReads | None = None  # its counters join ours (compiled_reads)
        self._last_logged: dict[str, float] = {}
        self._closed = False

        os.makedirs(self._objects, exist_ok=True)
        self._fd = os.open(self.directory / "state", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            with self._locked():
                self._check_format()
                _, used = _scan(self._objects, remove_stale_temps=True)
                self._write_counter(used)
            st = os.statvfs(self.directory)
        except BaseException:
            os.close(self._fd)
            self._closed = True
            raise
        self._used_estimate = used
        self._floor = _floor_for(st) if free_space_floor is None else free_space_floor
        self._capacity = (
            _capacity_for(st, used, self._floor) if capacity_bytes is None else capacity_bytes
        )
        self._stats.capacity_bytes = self._capacity
        log.debug(
            "disk cache %s: %d bytes used of %d, free-space floor %d",
            self.directory, used, self._capacity, self._floor,
        )

    # --- sizing ------------------------------------------------------------------------------

    @staticmethod
    def default_free_space_floor(directory: Path) -> int:
        """10% of the file system holding `directory`, or 5 GiB, whichever is smaller."""
        return _floor_for(os.statvfs(_existing_ancestor(Path(directory))))

    @staticmethod
    def default_capacity(directory: Path, floor: int | None = None) -> int:
        """The capacity a cache in `directory` gets when none is given.

        Half of (the file system's free space + what the cache already holds), but never so much
        that less than `floor` (default: `default_free_space_floor`) would stay free.
        """
        directory = Path(directory)
        st = os.statvfs(_existing_ancestor(directory))
        _, used = _scan(str(directory / "objects"), remove_stale_temps=False)
        return _capacity_for(st, used, _floor_for(st) if floor is None else floor)

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def free_space_floor(self) -> int:
        return self._floor

    @property
    def skipped_low_space(self) -> int:
        """Puts skipped because the file system's free space was below the floor."""
        return self._skipped_low_space

    @property
    def skipped_too_large(self) -> int:
        """Puts skipped because the object alone is larger than the capacity."""
        return self._skipped_too_large

    # --- the tier ----------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        kind, fan, name = split_cache_key(key)
        return os.path.join(self._objects, kind, fan, name)

    def get(self, key: str) -> Blob | None:
        """The verified bytes of `key`, or None (a miss, a corrupt entry, an I/O error): a
        bytes object, or, for an entry of `DIRECT_READ_MIN` or more read around the page cache, a
        read-only memoryview of a buffer nobody else holds (as immutable as bytes).

        An entry with valid sums is checked against them (it was verified with `verify` when
        stored: the sums guard the disk since, at CRC speed instead of the hash's); one without
        is checked with `verify` and given them.
        """
        return self._read(key, 0, None)

    def _read_whole(self, key: str, path: str, fd: int, st: os.stat_result,
                    raw_sums: bytes | None) -> bytes | None:
        """The whole entry, verified against its name (and given its sums), or None."""
        data = _pread_exactly(fd, st.st_size, 0)
        with self._stats_lock:
            self._stats.bytes_read += len(data)
        if not self._verified_whole(key, path, fd, st, data, raw_sums):
            return None
        return data

    def _hit(self, path: str, st: os.stat_result, data: Blob) -> Blob:
        self._touch(path, st.st_mtime_ns)
        with self._stats_lock:
            self._stats.hits += 1
            self._stats.hit_bytes += len(data)
        return data

    def get_range(self, key: str, offset: int, length: int,
                  prefetch_entry: bool = False) -> Blob | None:
        """The verified bytes [offset, offset + length) of `key` (fewer if the object ends
        first), or None (a miss, a corrupt entry, an I/O error).

        Reads and checks only the sub-blocks that cover the range; an entry without valid sums
        is read whole, verified with `verify` and given its sums (then later ranges are cheap).
        `prefetch_entry`: the caller expects the rest of the entry to be read soon (a pack of
        small files): when the range is not in the page cache, the whole entry is asked for
        once the range is read (POSIX_FADV_WILLNEED, which does not wait; after the range, so
        that the reader does not wait behind the whole entry's I/O), so that its neighbours come
        from the disk
        in one large read with it instead of one small read each; unless the page cache has
        already evicted pages of it, a sign that it cannot keep a whole entry until the
        neighbours are read (see `_prefetch_decision`).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: {offset}+{length}")
        return self._read(key, offset, length, prefetch_entry=prefetch_entry)

    def get_range_if_cached(self, key: str, offset: int, length: int) -> Blob | None:
        """`get_range`, but only where the sub-blocks covering the range are in the page cache
        (cachestat(2)), so it never waits for the disk: for a caller on an event loop, where a
        worker thread costs more than such a read (about 100 us against 50 here). None, and not
        counted, where the read would go to the disk (or that cannot be told), or the entry is
        missing or without sums: the caller then calls `get_range` on a worker thread."""
        if offset < 0 or length < 0:
            raise ValueError(f"bad range: {offset}+{length}")
        return self._read(key, offset, length, cached_only=True)

    def _read(self, key: str, offset: int, length: int | None, cached_only: bool = False,
              prefetch_entry: bool = False) -> Blob | None:
        """`get` (length None: the whole entry, not counted as a range read), `get_range` and
        `get_range_if_cached` (`cached_only`)."""
        path = self._path(key)
        if self._closed:
            return None if cached_only else self._miss()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None if cached_only else self._miss()
        except OSError as e:
            self._error("read", key, e)
            return self._miss()
        try:
            st = os.fstat(fd)
            raw = _read_sums(fd) if self._xattrs else None
            sums = parse_sums(raw, st.st_size)
            if sums is None and cached_only:
                return None  # read whole and verified first: a job for a worker thread
            if sums is None:
                data = self._read_whole(key, path, fd, st, raw)
                part = data if data is None or length is None else data[offset : offset + length]
            else:
                whole = length is None
                part = self._read_checked(key, path, fd, st, sums, offset,
                                          st.st_size if whole else length, whole, cached_only,
                                          prefetch_entry)
                if part is _NOT_CACHED:
                    return None
        except OSError as e:
            self._error("read", key, e)
            return self._miss()
        finally:
            os.close(fd)
        if part is None:
            return self._miss()
        return self._hit(path, st, part)

    def put(self, key: str, data: bytes) -> None:
        """Store `data` (verified by the caller) unless present, too large or the disk is low."""
        self._put(key, data, direct=True)

    def put_pack(self, key: str, data: bytes) -> None:
        """`put` a chunk whose small files are being read (a pack), through the page cache
        where the compiled read path runs: it answers the pack's other files from this entry,
        which would otherwise be read back from the disk just after being written around the
        page cache. Without it, Python answers them from the memory tier: as `put`."""
        self._put(key, data, direct=self._compiled is None or not self._compiled.running)

    def _put(self, key: str, data: bytes, direct: bool) -> None:
        path = self._path(key)
        size = len(data)
        if self._closed:
            return
        if size > self._capacity:
            with self._stats_lock:
                self._skipped_too_large += 1
            return
        try:
            st = os.stat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._error("stat", key, e)
            return
        else:
            self._touch(path, st.st_mtime_ns)  # someone else stored it first: just a use
            return
        if not self._space_left_for(size):
            return
        # Write first, reserve second: an eviction scan by any thread or process then always
        # sees this write (as its temporary file) once it is counted, so the shared total can
        # only ever be too high, never too low.
        try:
            tmp = self._write_temp(path, data, direct)
        except OSError as e:
            self._error("write", key, e)
            return
        try:
            if not self._reserve(size, own_temp=tmp):
                return
            stored = self._publish(tmp, path)
        except OSError as e:
            self._error("write", key, e)
            return
        finally:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
        if not stored:
            self._release(size)
            return
        with self._stats_lock:
            self._stats.inserts += 1
            self._stats.insert_bytes += size

    def contains(self, key: str) -> bool:
        """True if an entry file for `key` exists (not read, not verified, not a use)."""
        path = self._path(key)
        if self._closed:
            return False
        try:
            os.stat(path)
        except OSError:
            return False
        return True

    def compiled_reads(self, threads: int = DEFAULT_READ_THREADS) -> CompiledReads:
        """The compiled read path over this tier's entries (not started; see
        `cachefs.cache.compiled_reads`), whose counters `stats` then includes. RuntimeError
        where the engine is not built."""
        reads = CompiledReads(
            self._objects, xattr=SUMS_XATTR, sums_version=_SUMS_VERSION,
            sub_block_shift=SUB_BLOCK_SHIFT, max_sub_blocks=MAX_SUB_BLOCKS,
            touch_interval_ns=self._touch_interval_ns, eviction_limit=EVICTION_RATE_LIMIT,
            eviction_weight=EVICTION_RATE_WEIGHT,
            direct_read_min=DIRECT_READ_MIN if self._direct else 0, threads=threads)
        self._compiled = reads
        return reads

    def stats(self) -> TierStats:
        """This process's counters (with the compiled read path's); used_bytes is the node-wide
        total of the shared directory."""
        with self._stats_lock:
            snapshot = replace(self._stats)
        if self._compiled is not None:
            for name, value in self._compiled.counters().items():
                field = COMPILED_COUNTERS.get(name)
                if field is not None:
                    setattr(snapshot, field, getattr(snapshot, field) + value)
        used = self._used_estimate
        if not self._closed:
            with suppress(OSError):
                used = self._read_counter()
        snapshot.used_bytes = used
        snapshot.capacity_bytes = self._capacity
        return snapshot

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._fd)

    # --- internals ---------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[bool]:
        """Hold the node-wide lock (yields False, holding nothing, once the cache is closed)."""
        with self._lock:
            if self._closed:
                yield False
                return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield True
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _check_format(self) -> None:
        path = self.directory / "format"
        try:
            text = path.read_bytes().decode("ascii", errors="replace")
        except FileNotFoundError:
            tmp = self.directory / f"{_TMP_PREFIX}format-{secrets.token_hex(8)}"
            tmp.write_text(f"{FORMAT_VERSION}\n")
            os.replace(tmp, path)
            return
        version = text.split()[0] if text.split() else ""
        if not version.isdigit():
            raise ConfigError(f"{self.directory} is not a cachefs disk cache (bad {path})")
        if int(version) > FORMAT_VERSION:
            raise ConfigError(
                f"the disk cache {self.directory} has format {version}, newer than this cachefs "
                f"understands ({FORMAT_VERSION}): upgrade cachefs or use another cache directory"
            )

    def _read_counter(self) -> int:
        raw = os.pread(self._fd, _COUNTER.size, 0)
        return _COUNTER.unpack(raw)[0] if len(raw) == _COUNTER.size else 0

    def _write_counter(self, used: int) -> None:
        os.pwrite(self._fd, _COUNTER.pack(max(0, used)), 0)
        self._used_estimate = max(0, used)

    def _reserve(self, size: int, own_temp: str | None = None) -> bool:
        """Count `size` more bytes as used, evicting first if needed; False if it cannot fit."""
        with self._locked() as held:
            if not held:
                return False
            used = self._read_counter()
            if used + size > self._capacity:
                used = self._evict(size, own_temp)
                if used + size > self._capacity:
                    self._write_counter(used)
                    return False
            self._write_counter(used + size)
            return True

    def _release(self, size: int) -> None:
        """Take back `size` bytes counted as used (a reservation not needed, a deleted entry)."""
        try:
            with self._locked() as held:
                if held:
                    self._write_counter(self._read_counter() - size)
        except OSError as e:
            self._error("release", "state", e)

    def _evict(self, size: int, own_temp: str | None = None) -> int:
        """Under the lock: rescan and delete oldest entries to make room; return bytes used."""
        entries, total = _scan(self._objects, remove_stale_temps=True, exclude=own_temp)
        if total + size <= self._capacity:
            return total
        goal = int(self._capacity * self._low_water)
        target = goal - size if size <= goal else self._capacity - size
        entries.sort()
        evicted = evicted_bytes = 0
        for _, entry_size, path in entries:
            if total <= target:
                break
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass  # another process deleted it (a corrupt entry) after the scan
            except OSError as e:
                self._error("evict", path, e)
                continue
            else:
                evicted += 1
                evicted_bytes += entry_size
            total -= entry_size
        with self._stats_lock:
            self._stats.evictions += evicted
            self._stats.evicted_bytes += evicted_bytes
        log.debug("disk cache %s: evicted %d entries, %d bytes", self.directory, evicted,
                  evicted_bytes)
        return total

    def _write_temp(self, path: str, data: bytes, direct: bool = True) -> str:
        """Write `data` to a temporary file beside `path` (its name carries the size), around
        the page cache if `direct` and it is large enough."""
        tmp = os.path.join(
            os.path.dirname(path), f"{_TMP_PREFIX}{len(data)}-{secrets.token_hex(8)}"
        )

        def stamp(fd: int) -> None:
            self._write_sums(fd, data, path)
            now = time.time_ns()
            os.utime(fd, ns=(now, now))  # a fine-grained mtime orders evictions exactly

        if direct and self._direct and len(data) >= DIRECT_WRITE_MIN and self._write_direct(
                tmp, data, stamp):
            return tmp
        write_new_file(tmp, data, mode=0o666, extra_flags=os.O_CLOEXEC, make_parent=True,
                       before_close=stamp)
        return tmp

    def _write_direct(self, tmp: str, data: bytes, stamp: Callable[[int], None]) -> bool:
        """Write `data` to the new file `tmp` with O_DIRECT, then `stamp` it; False (nothing
        written) where the file system refuses O_DIRECT, which turns it off for this cache.

        Around the page cache because an entry is written once and read back rarely, and then
        from the disk anyway (see `_read_direct`): through the page cache, every stored chunk
        cost a kernel copy into freshly allocated pages, the largest single cost of a cold
        read (issue 19). The file is written in whole blocks, zero-padded, and cut to its
        length; a crash before the entry is linked into place leaves only a temporary file."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = open_direct(tmp, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fd = open_direct(tmp, flags, 0o666)
        if fd is None:
            self._direct = False
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            return False
        size = len(data)
        padded = align_up(size)
        buf = BUFFERS.take(padded)
        try:
            with memoryview(buf) as view:
                view[:size] = data
                view[size:padded] = bytes(padded - size)
                done = 0
                while done < padded:
                    n = os.pwrite(fd, view[done:padded], done)
                    if n <= 0:
                        raise OSError(errno.EIO, f"O_DIRECT pwrite wrote {n} bytes")
                    done += n
            if padded != size:
                os.ftruncate(fd, size)
            stamp(fd)
        except BaseException:
            os.close(fd)
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            BUFFERS.give(buf)
        os.close(fd)
        return True

    def _verified_whole(self, key: str, path: str, fd: int, st: os.stat_result, data: bytes,
                        raw_sums: bytes | None) -> bool:
        """Check a whole entry with `verify`; drop it if corrupt, else add missing sums."""
        try:
            intact = bool(self._verify(key, data))
        except Exception as e:
            log.debug("verifying %s raised %r: treated as corrupt", key, e)
            intact = False
        if not intact:
            self._drop_corrupt(key, path, st, len(data))
            return False
        if (self._xattrs and parse_sums(raw_sums, len(data)) is None
                and len(data) == st.st_size and self._write_sums(fd, data, key)):
            with self._stats_lock:
                self._stats.upgrades += 1
        return True

    def _read_checked(self, key: str, path: str, fd: int, st: os.stat_result,
                      sums: tuple[int, tuple[int, ...]], offset: int,
                      length: int, whole: bool = False, cached_only: bool = False,
                      prefetch_entry: bool = False) -> Blob | object | None:
        """Read the sub-blocks covering the range and check their sums; None (the entry
        dropped) if one fails. `whole`: the whole entry for a get (not counted as a range).
        `cached_only`: `_NOT_CACHED` instead of reading what the page cache does not hold.

        `DIRECT_READ_MIN` bytes or more not all in the page cache are read with O_DIRECT (see
        `_read_direct`); less, through the page cache (see `get_range` for `prefetch_entry`)."""
        shift = sums[0]
        end = min(offset + length, st.st_size)
        if offset >= end:
            with self._stats_lock:
                self._stats.range_reads += not whole
            return b""
        start = (offset >> shift) << shift
        want = min((((end - 1) >> shift) + 1) << shift, st.st_size) - start
        # cachestat(2) once, and only where the answer decides something (None: cannot tell)
        cached = (fully_cached(fd, start, want)
                  if cached_only or (self._direct and want >= DIRECT_READ_MIN)
                  or (prefetch_entry and want < st.st_size) else None)
        if cached_only and cached is not True:
            return _NOT_CACHED
        if self._direct and want >= DIRECT_READ_MIN and cached is False:
            view = memoryview(result_buffer(want))  # handed on as it is: no copy
            got = self._read_direct(path, view, start, want)
            if got is not None:
                return self._checked(key, path, st, sums, view[:got], start, want,
                                     offset, end, whole, direct=True)
        prefetch = (prefetch_entry and want < st.st_size and cached is False
                    and self._prefetch_decision(fd, st.st_size))
        data = _pread_exactly(fd, want, start)
        if prefetch:  # after the range: the reader does not wait behind the whole pack's I/O
            os.posix_fadvise(fd, 0, st.st_size, os.POSIX_FADV_WILLNEED)
        return self._checked(key, path, st, sums, memoryview(data), start, want, offset, end,
                             whole, direct=False)

    def _prefetch_decision(self, fd: int, size: int) -> bool:
        """Whether to ask for a whole entry whose neighbours of the range are wanted soon (a
        pack of small files; the caller asks once it has read the range), or not, because the
        page cache cannot keep it that long.

        The sign is eviction: the kernel keeps a shadow of each page reclaim evicted, which
        cachestat(2) counts (`nr_evicted`). Where entries met here had pages evicted, the data
        set is larger than the page cache, and a whole entry read for one file is evicted before
        its neighbours are read (measured here, 400 MiB of memory for 660 MB of small files:
        18-23x the data read from the disk, and 2.7-3.8x slower than reading ranges alone).
        One entry's own shadows are not enough (on a first pass no entry has any, and shadows
        are reclaimed too), so the decision follows the share of recent entries found with
        evicted pages (a moving average); where that is high, no entry is asked for whole and
        only the range is read, without the kernel's readahead around it (POSIX_FADV_RANDOM
        on this descriptor). The share falls again once the page cache stops evicting."""
        stat = cachestat(fd, 0, size)
        evicted = stat is not None and stat.nr_evicted > 0
        with self._stats_lock:
            rate = self._eviction_rate = (
                self._eviction_rate * (1 - EVICTION_RATE_WEIGHT) + EVICTION_RATE_WEIGHT * evicted)
            prefetch = not evicted and rate < EVICTION_RATE_LIMIT
            if prefetch:
                self._stats.entry_prefetches += 1
            else:
                self._stats.entry_prefetches_skipped += 1
        if not prefetch:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return prefetch

    def _checked(self, key: str, path: str, st: os.stat_result,
                 sums: tuple[int, tuple[int, ...]], view: memoryview, start: int, want: int,
                 offset: int, end: int, whole: bool, direct: bool) -> Blob | None:
        """Bytes [offset, end) out of `view` (the sub-blocks read from `start`), or None (the
        entry dropped) if `view` is short or a sub-block fails its sum. `direct`: `view` is a
        buffer of this read's own, returned as a read-only slice instead of copied."""
        shift, crcs = sums
        got = len(view)
        with self._stats_lock:
            self._stats.range_reads += not whole
            self._stats.bytes_read += got
            self._stats.direct_reads += direct
        step = 1 << shift
        first = start >> shift
        intact = got == want and all(
            crc32(view[pos : pos + step]) == crcs[first + (pos >> shift)]
            for pos in range(0, want, step))
        if not intact:
            self._drop_corrupt(key, path, st, got)
            return None
        if direct:  # a buffer of this read's own: a read-only view of it, not a copy
            return view[offset - start : end - start].toreadonly()
        if offset != start or end - start != got:
            return bytes(view[offset - start : end - start])
        return view.obj  # type: ignore[return-value]  # the bytes read, exactly the range

    def _read_direct(self, path: str, view: memoryview, start: int, want: int) -> int | None:
        """Read `want` bytes at `start` (a sub-block boundary, so block-aligned) into `view` (a
        page-aligned buffer of at least `align_up(want)` bytes) with O_DIRECT; the count read,
        or None where the file system refuses O_DIRECT (which turns it off for this cache).

        Around the page cache because what the tier serves is cached again above it (the
        mount's pages of the file, or the memory tier), and a chunk streaming through the tier
        would cost a page-cache fill (allocating and filling fresh pages) for nothing."""
        fd = open_direct(path, os.O_RDONLY | os.O_CLOEXEC)
        if fd is None:
            self._direct = False
            return None
        try:
            got, stop = 0, align_up(want)
            while got < want:
                n = os.preadv(fd, [view[got:stop]], start + got)
                got += n
                if n <= 0 or got % BLOCK:  # the end of the file
                    break
            return min(got, want)
        finally:
            os.close(fd)

    def _write_sums(self, fd: int, data: bytes | memoryview, what: str) -> bool:
        """Store the sums of `data` on the open entry file `fd`; False if not stored (never
        raises: an entry without sums is read whole and verified instead)."""
        if not self._xattrs:
            return False
        try:
            os.setxattr(fd, SUMS_XATTR, compute_sums(data))
        except OSError as e:
            if e.errno in _NO_XATTRS:
                self._xattrs = False
                log.info("disk cache %s: no user xattrs on this file system: range reads "
                         "read whole entries", self.directory)
            else:  # EACCES (another user's entry), ENOSPC, ...: read whole, as before
                log.debug("storing the sums of %s failed: %s", what, e)
            return False
        return True

    @staticmethod
    def _publish(tmp: str, path: str) -> bool:
        """Link the written temporary file to `path`; False if the entry was already there.
        Never replaces: the first writer of an object wins; on a file system without hard
        links the temporary file is renamed over it instead (same bytes anyway)."""
        return link_into_place(tmp, path, replace_without_links=_NO_HARDLINKS)

    def _touch(self, path: str, mtime_ns: int) -> None:
        """Mark an entry as just used, unless that was done less than touch_interval_s ago."""
        now = time.time_ns()
        if now - mtime_ns < self._touch_interval_ns:
            return
        try:
            os.utime(path, ns=(now, now))
        except PermissionError:  # an exact time needs ownership, "now" only write access
            with suppress(OSError):
                os.utime(path)
        except OSError:
            pass  # evicted meanwhile

    def _drop_corrupt(self, key: str, path: str, st: os.stat_result, size: int) -> None:
        with self._stats_lock:
            self._stats.corrupt += 1
        log.warning("disk cache entry %s is corrupt (%d bytes read): deleted", key, size)
        try:
            current = os.stat(path)
            if (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
                return  # replaced by a fresh copy since we read it
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as e:
            self._error("delete", key, e)
            return
        self._release(current.st_size)

    def _space_left_for(self, size: int) -> bool:
        try:
            st = os.statvfs(self.directory)
        except OSError as e:
            self._error("statvfs", str(self.directory), e)
            return False
        free = st.f_bavail * st.f_frsize
        if free - size >= self._floor:
            self._low_space_logged = False
            return True
        with self._stats_lock:
            self._skipped_low_space += 1
            first = not self._low_space_logged
            self._low_space_logged = True
        if first:
            log.warning(
                "disk cache %s: %d bytes free, below the floor of %d: not caching new objects",
                self.directory, free, self._floor,
            )
        return False

    def _miss(self) -> None:
        with self._stats_lock:
            self._stats.misses += 1
        return None

    def _error(self, what: str, key: str, e: OSError) -> None:
        now = time.monotonic()
        with self._stats_lock:
            self._stats.errors += 1
            last = self._last_logged.get(what)
            loud = last is None or now - last >= LOG_INTERVAL_S
            if loud:
                self._last_logged[what] = now
        log.log(logging.WARNING if loud else logging.DEBUG,
                "disk cache %s of %s failed: %s", what, key, e)
