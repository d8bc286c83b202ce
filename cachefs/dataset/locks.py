"""Repository locks that keep gc's sweep and writers (commit, push, import) from overlapping.

A writer may reuse an object it finds already stored (a chunk another dataset has, a tree of an
interrupted commit) without uploading it again. If gc deleted that object at the same moment, the
new version would point at nothing. So the sweep and writers exclude each other, with lock objects
in the repository itself (restic's approach, since object stores have no locking):

- a lock is the object `locks/KIND-TIME-RANDOM` (KIND is `writer` or `gc`), rewritten by its
  holder every `refresh_s` seconds; one not rewritten for `stale_s` seconds belongs to a process
  that died (kill -9, a lost node) and is ignored;
- a writer creates its lock, then lists the others: if gc holds one, it removes its own and waits
  for gc to finish, then tries again;
- gc creates its lock, then lists the others, and waits until no writer holds one.

A writer whose refreshes fail keeps working, but it must not move a ref once gc may have taken
its lock for stale: gc may have deleted objects the writer reused. So a writer lock guards every
ref move through its remote (`refs.add_ref_guard`): the move is refused (LockLost) unless the last
successful rewrite is younger than half of `stale_s` (the other half absorbs clock skew between
machines and the time the move itself takes) and the lock object still exists (whoever removed
it treated the writer as gone). The refresher never re-creates a lock it finds removed.

Listing is strongly consistent on every supported store, so of a writer and gc that lock at the
same moment at least one sees the other: they never both proceed. Writers never wait for each
other (refs are compare-and-swap already), and gc only holds its lock for the sweep.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cachefs.dataset.refs import add_ref_guard, remove_ref_guard, who_am_i
from cachefs.errors import LockLost, RepositoryBusy
from cachefs.remotes.base import ObjectInfo, Remote

log = logging.getLogger("cachefs.locks")

LockKind = Literal["writer", "gc"]
LOCK_PREFIX = "locks/"
DEFAULT_REFRESH_S = 60.0
DEFAULT_STALE_S = 600.0  # ten refreshes missed: the holder is gone (tolerates clock skew too)
DEFAULT_WAIT_S = 3600.0
FRESH_FRACTION = 0.5  # a ref moves only while the last rewrite is younger than this * stale_s


@dataclass(frozen=True)
class LockInfo:
    key: str
    kind: LockKind
    who: str
    started_ns: int
    mtime_ns: int

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_ns / 1e9))
        return f"{self.kind} lock held by {self.who} since {started}"


def _parse(info: ObjectInfo, remote: Remote) -> LockInfo | None:
    name = info.key[len(LOCK_PREFIX) :]
    kind = name.split("-", 1)[0]
    if kind not in ("writer", "gc"):
        return None
    try:
        doc = json.loads(remote.get(info.key))
        who, started = str(doc.get("who", "?")), int(doc.get("started_ns", 0))
    except Exception:  # being rewritten or removed right now, or damaged: its name says enough
        who, started = "?", info.mtime_ns
    return LockInfo(info.key, kind, who, started, info.mtime_ns)  # type: ignore[arg-type]


def live_locks(remote: Remote, stale_s: float = DEFAULT_STALE_S) -> list[LockInfo]:
    """Every lock whose holder rewrote it within `stale_s` seconds."""
    now = time.time_ns()
    found = []
    for info in remote.list_info(LOCK_PREFIX):
        if now - info.mtime_ns > stale_s * 1e9:
            log.info("ignoring stale lock %s (not refreshed for %.0f s)", info.key,
                     (now - info.mtime_ns) / 1e9)
            continue
        lock = _parse(info, remote)
        if lock is not None:
            found.append(lock)
    return found


class RepositoryLock:
    """One held lock; use `RepositoryLock.writer(...)` or `RepositoryLock.gc(...)` as a context."""

    def __init__(self, remote: Remote, kind: LockKind, refresh_s: float = DEFAULT_REFRESH_S,
                 stale_s: float = DEFAULT_STALE_S, wait_s: float = DEFAULT_WAIT_S,
                 poll_s: float = 1.0, on_wait: Callable[[LockInfo], None] | None = None) -> None:
        self.remote = remote
        self.kind = kind
        self.refresh_s = refresh_s
        self.stale_s = stale_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.on_wait = on_wait or (lambda lock: log.warning("waiting for the %s", lock.describe()))
        self.key = f"{LOCK_PREFIX}{kind}-{time.time_ns():020d}-{secrets.token_hex(6)}"
        self._doc = json.dumps({"kind": kind, "who": who_am_i(), "pid": os.getpid(),
                                "started_ns": time.time_ns()}).encode()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self._written_at = 0.0  # monotonic start of the last successful write of the lock
        self._lost: str | None = None  # why the lock no longer protects us, once known
        self._last_error: str | None = None  # of the last failed refresh

    # -- acquiring ------------------------------------------------------------------------
    def _others(self) -> list[LockInfo]:
        return [lock for lock in live_locks(self.remote, self.stale_s) if lock.key != self.key]

    def _blockers(self, others: list[LockInfo]) -> list[LockInfo]:
        if self.kind == "writer":
            return [lock for lock in others if lock.kind == "gc"]
        return [lock for lock in others if lock.kind == "writer"]

    def acquire(self) -> RepositoryLock:
        deadline = time.monotonic() + self.wait_s
        announced: set[str] = set()
        while True:
            self._write()
            others = self._others()
            if self.kind == "gc":
                rival = [lock for lock in others if lock.kind == "gc" and lock.key < self.key]
                if rival:
                    self.remote.delete(self.key)
                    raise RepositoryBusy(f"gc is already running on {self.remote.url} "
                                         f"({rival[0].describe()})")
            blockers = self._blockers(others)
            if not blockers:
                break
            if self.kind == "writer":
                self.remote.delete(self.key)  # writers yield to gc: it holds only for the sweep
            while blockers:
                for lock in blockers:
                    if lock.key not in announced:
                        announced.add(lock.key)
                        self.on_wait(lock)
                if time.monotonic() > deadline:
                    self.remote.delete(self.key)
                    raise RepositoryBusy(
                        f"{self.remote.url} is busy: {blockers[0].describe()}; waited "
                        f"{self.wait_s:.0f} s. If that process is gone, its lock expires "
                        f"{self.stale_s:.0f} s after its last refresh")
                time.sleep(self.poll_s)  # an object store has no way to await a deletion
                blockers = self._blockers(self._others())
        self._refresher = threading.Thread(target=self._refresh, name="cachefs-lock",
                                           daemon=True)
        self._refresher.start()
        if self.kind == "writer":
            add_ref_guard(self.remote, self.check_held)
        log.debug("acquired %s", self.key)
        return self

    def _write(self) -> None:
        started = time.monotonic()  # the store's mtime is no older than this
        self.remote.put(self.key, self._doc)
        self._written_at = started

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if not self.remote.has([self.key]):
                    # Removed by someone who took us for dead: re-creating it would hide that.
                    self._lost = "its lock object was removed"
                    log.warning("lock %s was removed; this writer may no longer move refs",
                                self.key)
                    return
                self._write()
                self._last_error = None
            except Exception as e:  # keep trying: stale only after many misses
                self._last_error = f"{type(e).__name__}: {e}"
                log.warning("could not refresh lock %s: %s", self.key, e)

    @property
    def lost(self) -> str | None:
        """Why this lock no longer protects its holder, once known (None: not known lost)."""
        return self._lost

    def check_held(self) -> None:
        """LockLost unless this lock still keeps gc's sweep away (see the module docstring)."""
        age = time.monotonic() - self._written_at
        if self._lost is None and age > self.stale_s * FRESH_FRACTION:
            last = f"; last refresh error: {self._last_error}" if self._last_error else ""
            self._lost = (f"it was not refreshed for {age:.0f} s (gc ignores a lock after "
                          f"{self.stale_s:.0f} s){last}")
        if self._lost is None and not self.remote.has([self.key]):
            self._lost = "its lock object was removed"
        if self._lost is not None:
            raise LockLost(
                f"{self.kind} lock {self.key} on {self.remote.url} lapsed: {self._lost}. gc may "
                "have deleted objects this command reused, so the ref was not moved; run the "
                "command again"
            )

    def release(self) -> None:
        self._stop.set()
        if self.kind == "writer":
            remove_ref_guard(self.remote, self.check_held)
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        try:
            self.remote.delete(self.key)
        except Exception as e:  # it expires by itself
            log.warning("could not remove lock %s: %s", self.key, e)

    def __enter__(self) -> RepositoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
