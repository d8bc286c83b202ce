"""The file:// remote: a repository in a local directory (the embedded default).

Objects are files named by their key. A put writes a temporary file and links it into place, so
a reader never sees a partial object; durability is batched: `flush` syncs the whole file system
once (syncfs) instead of fsyncing thousands of chunk files one by one, and the repository calls it
before any ref moves. Over an existing object (one put again after a crash, or by two writers at
once) the temporary file is fsynced first and then renamed over it: an object that is durable
and reachable is never replaced by one a crash could still tear. `put_if_absent` is a hard link
of a fully written, fsynced temporary file: link(2) fails with EEXIST atomically, so exactly one
of several racing writers wins and the winner's content is complete the moment the name appears.

Sync errors. syncfs goes through a descriptor of the root opened with the remote: the kernel
reports a writeback error (of any file of the file system) only to descriptors opened before it
happened, and a background writeback can fail before `flush` runs. A failed sync raises
RemoteError (naming the repository and the errno) and so does every later flush of this remote:
the failed pages may already count as clean, so a second sync could succeed over lost data.
Where libc has no syncfs, `flush` fsyncs every file this remote wrote or reported present since
the last flush, then their directories.

Crashes. Between its first put after a flush and that flush's success, a writer keeps a marker
`.dirty/live-HOST-PID-RANDOM` (written, fsynced, renamed in and its directory fsynced before the
put: the only syncs puts add, once per flush cycle; removed after the flush, unsynced; hidden, so
no key or listing sees it). After a power loss an object renamed into place but never synced
may be empty or torn, and `has` is how a writer decides to reuse an object. So a remote, when
opened (before it writes anything, so that nothing it writes is suspect to itself), looks at the
markers, and a marker whose writer is certainly gone becomes a record `.dirty/dead-START-END-...`:

- gone means: same host name and another boot (span END: this boot's start plus
  `_CLOCK_SLACK_NS`, as the clock may come back from the RTC behind), or same boot and pid
  namespace and that pid no longer runs the process that wrote the marker (killed: END is now;
  kill -9 is treated like a power loss, as its unsynced objects would be torn by one later;
  the judge then waits for the file clock to pass END, at most a tick);
- START is the marker's creation minus `_CLOCK_SLACK_NS`.

From then on `has` reports a content-addressed object (its name is 64 hex digits: chunks, trees,
commits) whose mtime falls in a recorded span as absent, so a writer puts it again: a put
replaces the file, and the new one is dated after the span. Other keys are never reused that way
(locks are mutable, settings and ref generations are fsynced before they appear): `has` answers
for them by existence alone. Nothing is hashed and nothing is deleted:

- lazily, not by a scan at open: finding the objects newer than a marker takes a stat of every
  object of the repository, and hashing them would need the dataset layer's naming rules (trees
  are named by their uncompressed bytes); `has` stats the object it is asked about anyway, so a
  healthy repository pays one listing of `.dirty` per open and nothing per object;
- an object in a span that nothing needs again stays (unreachable: gc removes it after its grace
  period); one that an acknowledged commit reaches is intact (that commit's flush synced it),
  and reporting it absent only costs one more put;
- records stay (a few bytes each, one per dead writer): whether every object of a span was put
  again is only known after a full scan.

A marker whose writer may be alive (another host, another pid namespace) is left alone and its
objects trusted: only its own host (and namespace) can judge it. Until a killed writer's marker
is judged, reusing its objects is safe: they are complete in the page cache, and the reuser's
own syncfs writes them back before its ref moves. Reads do not look at markers: a ref only points
at objects that a successful flush covered.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from cachefs.errors import ConfigError, ObjectNotFound, RemoteError
from cachefs.fsutil import fsync_dir, link_into_place, write_new_file
from cachefs.remotes.base import ObjectInfo
from cachefs.remotes.registry import url_options

log = logging.getLogger("cachefs.remotes.local")

_TMP_PREFIX = ".tmp."
_DIRTY_DIR = ".dirty"
_LIVE_PREFIX = "live-"
_DEAD_PREFIX = "dead-"
_CLOCK_SLACK_NS = 600 * 10**9  # a clock up to 10 min behind after a reboot (RTC, then NTP)
_CLOCK_REALTIME_COARSE = getattr(time, "CLOCK_REALTIME_COARSE", 5)  # 5 on Linux
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc_syncfs: Callable[[int], int] | None = getattr(_libc, "syncfs", None)
if _libc_syncfs is not None:
    _libc_syncfs.argtypes = [ctypes.c_int]  # type: ignore[attr-defined]


def syncfs(fd: int) -> None:
    """Write back every dirty page and inode of the file system holding `fd`; raise OSError on
    failure, including a writeback error since `fd` was opened (Linux >= 5.8)."""
    if _libc_syncfs is None:
        raise OSError(errno.ENOSYS, "this C library has no syncfs")
    if _libc_syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _fsync_path(path: Path) -> None:
    """fsync a file by name; one deleted meanwhile needs nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "?")
    return f"{e.strerror or e} ({name}, errno {e.errno})"


# -- who is writing ------------------------------------------------------------------------------

def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot), or None if it is gone or a zombie."""
    fields = _read_text(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


@dataclass(frozen=True)
class _Writer:
    """What identifies a writer process across hosts, reboots, pid namespaces and pid reuse."""

    host: str
    boot: str
    pidns: str
    pid: int
    start: str

    @classmethod
    def me(cls) -> _Writer:
        try:
            pidns = os.readlink("/proc/self/ns/pid")
        except OSError:
            pidns = ""
        pid = os.getpid()
        return cls(socket.gethostname(), _read_text("/proc/sys/kernel/random/boot_id"), pidns,
                   pid, _process_start(pid) or "")

    def fate(self, observer: _Writer) -> str:
        """"alive" unless `observer` can be sure this writer is gone: "rebooted" (its machine
        started again since) or "killed" (this boot, and its process no longer runs)."""
        if self.host != observer.host or not self.boot or not observer.boot:
            return "alive"  # another machine (or no boot id): its own host judges it
        if self.boot != observer.boot:
            return "rebooted"
        if self.pidns != observer.pidns or not self.start:
            return "alive"  # another container's pids mean nothing here
        return "alive" if _process_start(self.pid) == self.start else "killed"


def _marker_name(me: _Writer) -> str:
    host = re.sub(r"[^A-Za-z0-9_.]", "_", me.host)[:64] or "_"
    return f"{_LIVE_PREFIX}{host}-{me.pid}-{secrets.token_hex(4)}"


# -- dead writers' spans -------------------------------------------------------------------------

_DEAD_RE = re.compile(rf"{_DEAD_PREFIX}(\d+)-(\d+)-")
# Keys named by a hash of their bytes (chunks, trees, commits): the only ones a writer reuses
# after `has`, and can always put again. Others (locks, settings, ref generations) are mutable or
# fsynced before they appear, and `has` answers for them by existence alone.
_REPUTTABLE = re.compile(r"[0-9a-f]{64}\Z")


def _boot_time_ns() -> int | None:
    for line in _read_text("/proc/stat").splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) * 10**9
    return None


def _judge_marker(path: Path, observer: _Writer) -> tuple[int, int] | None:
    """The suspect span [start, end] of a marker whose writer is gone; None while it may live."""
    try:
        st = path.stat()
        raw = path.read_bytes()
    except FileNotFoundError:
        return None  # its writer flushed meanwhile
    try:
        doc = json.loads(raw)
        writer = _Writer(str(doc["host"]), str(doc["boot"]), str(doc["pidns"]), int(doc["pid"]),
                         str(doc["start"]))
        created_ns = min(int(doc["created_ns"]), st.st_mtime_ns)
        fate = writer.fate(observer)
    except (ValueError, KeyError, TypeError):
        # Markers are renamed in complete and fsynced, so this one was damaged afterwards:
        # nobody can claim it, and distrusting what came after it is the safe side.
        log.warning("unreadable writer marker %s: treating its writer as gone", path)
        created_ns, fate = st.st_mtime_ns, "rebooted"
    if fate == "alive":
        return None
    start = created_ns - _CLOCK_SLACK_NS
    boot_ns = _boot_time_ns()
    if fate == "killed" or boot_ns is None:
        # Everything it wrote is dated before now: its process had ended when we looked.
        return start, max(start, time.time_ns())
    # Its boot ended before ours began; our clock may have come back from the RTC behind.
    return start, max(start, boot_ns + _CLOCK_SLACK_NS)


def _after(end_ns: int) -> None:
    """Return once new files are dated after `end_ns`: file times come from the coarse clock,
    which lags `time.time_ns()` by up to a tick (bounded: a span ending later than a second
    from now, as one just after a reboot does, keeps what is put meanwhile suspect instead)."""
    if end_ns > time.time_ns() + 10**9:
        return
    deadline = time.monotonic() + 1.0
    while time.clock_gettime_ns(_CLOCK_REALTIME_COARSE) <= end_ns:
        if time.monotonic() > deadline:
            return
        time.sleep(0.001)


def _dead_spans(dirty: Path) -> list[tuple[int, int]]:
    """Every recorded dead writer's span, recording those of markers whose writer is gone."""
    try:
        names = sorted(os.listdir(dirty))
    except (FileNotFoundError, NotADirectoryError):
        return []
    observer: _Writer | None = None  # read from /proc only if there is a marker to judge
    spans = []
    for name in names:
        record = _DEAD_RE.match(name)
        if record:
            spans.append((int(record[1]), int(record[2])))
        elif name.startswith(_LIVE_PREFIX):
            observer = observer or _Writer.me()
            span = _judge_marker(dirty / name, observer)
            if span is None:
                continue
            spans.append(span)
            try:  # racing processes may record the same marker: either record will do
                os.rename(dirty / name, dirty / f"{_DEAD_PREFIX}{span[0]}-{span[1]}-{name}")
            except OSError as e:  # a reader without write access judges it on every open
                log.debug("could not record dead marker %s: %s", name, e)
            else:
                log.warning("%s: a writer died before its flush (%s); objects it may have "
                            "left torn will be written again", dirty.parent, name)
    if spans:
        _after(max(end for _, end in spans))  # so that what is put again is trusted again
    return _merge(spans)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _in_spans(mtime_ns: int, spans: list[tuple[int, int]]) -> bool:
    i = bisect.bisect_right(spans, (mtime_ns, 1 << 63)) - 1
    return i >= 0 and spans[i][0] <= mtime_ns <= spans[i][1]


# -- durability of puts --------------------------------------------------------------------------

class _Durability:
    """A remote's unsynced puts: the writer's marker, the sync descriptor, and sync failures."""

    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.dirty = root / _DIRTY_DIR
        # Judged before this remote writes anything, so that nothing it writes is suspect to it
        # (a crash of this host would end this process too: judging once is enough).
        self.spans = _dead_spans(self.dirty)
        # Opened before any put, so that syncfs through it reports any writeback error of the
        # file system from now on (one that happened before the open it would not).
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.lock = threading.Lock()
        self.marker: Path | None = None
        self.puts_started = 0
        self.puts_running = 0
        self.failure: str | None = None
        # Without syncfs: the files to fsync at the next flush (written or reused since the last).
        self.unsynced: set[Path] | None = None if _libc_syncfs is not None else set()

    # writers -----------------------------------------------------------------------------
    def begin_put(self) -> None:
        """Account for a put about to start, leaving a marker first if none is out."""
        with self.lock:
            if self.marker is None:
                self.marker = self._leave_marker()
            self.puts_started += 1
            self.puts_running += 1

    def end_put(self, path: Path | None) -> None:
        with self.lock:
            self.puts_running -= 1
            if path is not None and self.unsynced is not None:
                self.unsynced.add(path)

    def _leave_marker(self) -> Path:
        """Create, fsync and rename in this writer's marker (the extra syncs of a flush cycle)."""
        me = _Writer.me()
        doc = {"host": me.host, "boot": me.boot, "pidns": me.pidns, "pid": me.pid,
               "start": me.start, "created_ns": time.time_ns()}
        try:
            self.dirty.mkdir()
            fsync_dir(self.root)
        except FileExistsError:
            pass
        marker = self.dirty / _marker_name(me)
        tmp = self.dirty / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        write_new_file(tmp, json.dumps(doc).encode(), fsync=True)
        os.rename(tmp, marker)  # complete when it appears: a reader never judges half a marker
        fsync_dir(self.dirty)
        log.debug("left writer marker %s", marker)
        return marker

    def flush(self) -> None:
        with self.lock:
            if self.fd < 0:
                raise RemoteError(f"{self.url} was closed")
            if self.failure is not None:
                raise RemoteError(self.failure)
            marker, started, running = self.marker, self.puts_started, self.puts_running
            unsynced, self.unsynced = self.unsynced, (None if self.unsynced is None else set())
        try:
            if unsynced is None:
                syncfs(self.fd)
            else:
                _fsync_each(unsynced)
        except OSError as e:
            with self.lock:
                self.failure = (f"syncing {self.url} failed: {_describe(e)}; objects written "
                                f"since its last successful sync may be lost (and this process "
                                f"will not sync it again: open the repository anew)")
            raise RemoteError(self.failure) from e
        with self.lock:
            # A put that started after the snapshot may have renamed its file after the sync.
            if marker is not None and self.marker is marker and running == 0 \
                    and self.puts_started == started:
                marker.unlink(missing_ok=True)  # not synced: if it comes back, that is safe
                self.marker = None

    def close(self) -> None:
        """Flush what is unsynced (removing the marker), then release the descriptor."""
        if self.fd < 0:
            return
        if self.marker is not None and self.failure is None:
            try:
                self.flush()
            except RemoteError as e:
                log.warning("%s; its writer marker stays", e)
        os.close(self.fd)
        self.fd = -1

    # readers of `has` ---------------------------------------------------------------------
    def reused(self, path: Path) -> None:
        """Note a file `has` reported: without syncfs, our flush must cover it too."""
        if self.unsynced is not None:
            with self.lock:
                self.unsynced.add(path)


def _fsync_each(paths: set[Path]) -> None:
    for path in sorted(paths):
        _fsync_path(path)
    for directory in sorted({p.parent for p in paths}):
        fsync_dir(directory)


def parse_url(url: str) -> str:
    """The directory of a file:// URL, checked without touching it (it is created on first
    use); a file URL takes no options."""
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
        raise ConfigError("invalid file URL: expected file:///absolute/path (no host)")
    url_options(parsed, set(), "file")
    return unquote(parsed.path)


class LocalRemote:
    """A remote stored as files under one directory."""

    parallelism = 4  # worker threads worth running against it (hashing is the bound)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = "file://" + str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._durability = _Durability(self.root, self.url)
        except OSError as e:
            raise RemoteError(f"cannot open repository directory {self.root}: {e}") from e
        self._finalizer = weakref.finalize(self, self._durability.close)

    @classmethod
    def from_url(cls, url: str) -> LocalRemote:
        return cls(parse_url(url))

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ValueError(f"invalid remote key {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                if start == 0 and length is None:
                    return f.readall()
                size = os.fstat(f.fileno()).st_size
                end = size if length is None else min(size, start + length)
                return os.pread(f.fileno(), max(0, end - start), start)
        except (FileNotFoundError, NotADirectoryError):  # absent, or below a non-directory
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as e:
            raise RemoteError(f"reading {key} from {self.url}: {e}") from e

    def _write_temp(self, path: Path, data: bytes | memoryview, fsync: bool) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        write_new_file(tmp, data, fsync=fsync)
        return tmp

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        written = None
        try:
            self._durability.begin_put()
        except OSError as e:
            raise RemoteError(f"writing {key} to {self.url}: cannot leave a writer marker: "
                              f"{e}") from e
        try:
            tmp = self._write_temp(path, data, fsync=False)
            if link_into_place(tmp, path):  # a new name: durable at the next flush, like its bytes
                tmp.unlink()
            else:
                # Over an object that may be synced and reachable (or torn, and put again): an
                # unsynced replacement could be torn by a crash, so it is synced before it lands.
                _fsync_path(tmp)
                os.replace(tmp, path)
            written = path
        except OSError as e:
            raise RemoteError(f"writing {key} to {self.url}: {e}") from e
        finally:
            self._durability.end_put(written)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data, fsync=True)
            try:
                if not link_into_place(tmp, path):
                    return False
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(path.parent)
            return True
        except OSError as e:
            raise RemoteError(f"creating {key} in {self.url}: {e}") from e

    def has(self, keys: Iterable[str]) -> set[str]:
        """The keys stored, except those a writer that died before its flush may have left
        torn (see the module docstring): a caller puts those again."""
        spans = self._durability.spans
        found = set()
        for key in keys:
            path = self._path(key)
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as e:
                raise RemoteError(f"looking up {key} in {self.url}: {e}") from e
            if not stat.S_ISREG(st.st_mode):
                continue
            if spans and _in_spans(st.st_mtime_ns, spans) and _REPUTTABLE.match(path.name):
                log.debug("%s: written while a writer that died was unsynced; not reused", key)
                continue
            self._durability.reused(path)
            found.add(key)
        return found

    def list(self, prefix: str) -> Iterator[str]:
        base_key, _, _ = prefix.rpartition("/")
        base = self._path(base_key) if base_key else self.root
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            found.extend(
                rel + name
                for name in filenames
                if not name.startswith(".") and (rel + name).startswith(prefix)
            )
        return iter(sorted(found))

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                continue  # deleted since it was listed
            yield ObjectInfo(key, st.st_size, st.st_mtime_ns, f"{st.st_size:x}-{st.st_mtime_ns:x}")

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except NotADirectoryError:
            pass  # below a non-directory: absent
        except OSError as e:
            raise RemoteError(f"deleting {key} from {self.url}: {e}") from e

    def flush(self) -> None:
        """Make every put so far durable (and every object `has` reported); RemoteError if the
        file system reports a failure."""
        self._durability.flush()

    def close(self) -> None:
        self._finalizer()

    def __repr__(self) -> str:
        return f"LocalRemote({str(self.root)!r})"

