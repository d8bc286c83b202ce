"""Who is in the peer ring, as one node sees it: the members its sources give, minus the
unhealthy ones.

The members come from one or more sources (`cachefs/peer/sources.py`: a static list, a watched
file, DNS records, a haystack cluster's node registry), each refreshed every `refresh_s` seconds
by the prober thread; the member list is the union of the sources' lists, sorted. A member is
its address, HOST:PORT, the same string on every node (`cachefs.peer.ring.parse_member`).

A source that cannot be used at start (a malformed or unreadable list, an unknown remote) is a
UsageError naming it; one whose service cannot answer now (DNS, the masters: RemoteError) starts
without members and is asked again, so a mount never waits on its peers' discovery; one that
fails later keeps the members it gave last (logged when the error starts or changes, then at
most once a minute, and shown by `state()`), so a DNS or master outage never empties a ring
that works.

Health, per member, from the calls the tier makes (no traffic while all is well):
- a call that cannot reach it (UNAVAILABLE) puts it **down** at once; three deadline misses in
  a row do too. A down member leaves the ring (its chunks go to their next-ranked member) and is
  probed with `Status` every `probe_interval_s`: it rejoins as soon as it answers, unless it
  says it is draining (`cachefs peer drain`, or SIGTERM: it refuses chunk requests with
  UNAVAILABLE meanwhile, so askers take it out at their first call). So a member that stops
  answering leaves within seconds, and comes back within a second of answering.
- a member that served bytes that do not match the chunk's name is **quarantined** for
  `quarantine_s` (logged with the member and the chunk, and counted); then probed like a down
  one.
A call that answers (even NOT_FOUND) resets the deadline-miss count.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cachefs.errors import RemoteError, UsageError
from cachefs.peer.client import PeerCallError, PeerClient
from cachefs.peer.sources import FileSource, MemberSource, build_sources

log = logging.getLogger("cachefs.peer.members")

DEFAULT_PROBE_INTERVAL_S = 1.0
DEFAULT_QUARANTINE_S = 60.0
PROBE_TIMEOUT_S = 1.0
MISSES_TO_DOWN = 3
ERROR_LOG_INTERVAL_S = 60.0  # a source failing the same way is logged again this often


@dataclass
class MemberHealth:
    down_since: float | None = None
    quarantined_until: float | None = None
    missed_deadlines: int = 0
    quarantines: int = 0


@dataclass
class SourceState:
    """A source, the members it gave last, and how its last refresh went."""

    source: MemberSource
    members: list[str] = field(default_factory=list)
    refreshed_at: float | None = None  # time.time() of the last successful refresh
    due: float = 0.0                   # the prober's clock: when to refresh it next
    error: str | None = None           # the last refresh's error (None: it worked)
    error_logged: float | None = None


class Membership:
    """The ring's members and their health; thread-safe. `start` runs the background prober
    (source refreshes, probes of down and quarantined members); `close` stops it.

    `members` is a list of --cache-peers items (`cachefs.peer.sources` syntax: plain
    HOST:PORT members, dns:, file:, master:), `members_file` a file of members
    (--cache-peers-file); one of the two, or `sources` made by the caller."""

    def __init__(self, members: list[str] | None = None, members_file: str | None = None,
                 token: str | None = None, *, sources: list[MemberSource] | None = None,
                 probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
                 quarantine_s: float = DEFAULT_QUARANTINE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if sources is None:
            if (members is None) == (members_file is None):
                raise UsageError("peers: give either a list of members or a members file")
            sources = (build_sources(members) if members is not None
                       else [FileSource(members_file, refresh_s=probe_interval_s)])  # type: ignore[arg-type]
        self.members_file = members_file
        self._token = token
        self.probe_interval_s = probe_interval_s
        self.quarantine_s = quarantine_s
        self._clock = clock
        self._lock = threading.Lock()
        self._members: list[str] = []
        self._health: dict[str, MemberHealth] = {}
        self._clients: dict[str, PeerClient] = {}
        self._sources = [SourceState(source) for source in sources]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        try:
            for state in self._sources:
                self._start_source(state)
        except BaseException:
            self._close_sources()
            raise
        self._set_members(self._union())

    def _start_source(self, state: SourceState) -> None:
        try:
            state.members = state.source.resolve()
        except RemoteError as e:
            # DNS or the masters cannot answer now (a headless Service before its first pod
            # is ready, a master election): the peer tier is a cache, so the mount starts
            # without this source's members and the prober keeps asking.
            state.error = str(e)
            state.error_logged = self._clock()
            state.due = self._clock() + min(state.source.refresh_s, self.probe_interval_s)
            log.warning("peers %s: %s (starting without its members; asking again every "
                        "%g s)", state.source.describe(), e, state.source.refresh_s)
            return
        except Exception as e:
            what = (f"--cache-peers-file {self.members_file}" if self.members_file
                    else f"peers {state.source.describe()}")
            raise UsageError(f"{what}: {e}") from e
        state.refreshed_at = time.time()
        state.due = self._clock() + state.source.refresh_s

    # -- the list -------------------------------------------------------------------------------
    def reload(self, force: bool = True) -> bool:
        """Refresh the sources (every one with `force`, else those due); True if the member
        list changed. A source that fails keeps its previous members (logged); this never
        raises for a source's failure."""
        now = self._clock()
        for state in self._sources:
            if force or state.due <= now:
                self._refresh(state, now)
        changed = self._set_members(self._union())
        if changed:
            self.reloads += 1
        return changed

    def _refresh(self, state: SourceState, now: float) -> None:
        source = state.source
        state.due = now + source.refresh_s
        try:
            members = source.resolve()
        except Exception as e:  # any failure of any source: keep what it gave last
            error = str(e) or type(e).__name__
            loud = (error != state.error or state.error_logged is None
                    or now - state.error_logged >= ERROR_LOG_INTERVAL_S)
            state.error = error
            if loud:
                state.error_logged = now
                log.warning("peers %s: %s (keeping its previous %d members)",
                            source.describe(), error, len(state.members))
            return
        if state.error is not None:
            log.info("peers %s: answers again", source.describe())
        state.error = None
        state.error_logged = None
        state.refreshed_at = time.time()
        if members != state.members:
            log.info("peers %s: %d members", source.describe(), len(members))
            state.members = members

    def _union(self) -> list[str]:
        return sorted({m for state in self._sources for m in state.members})

    def _set_members(self, members: list[str]) -> bool:
        with self._lock:
            if members == self._members:
                return False
            gone = [m for m in self._members if m not in members]
            self._members = list(members)
            for member in members:
                self._health.setdefault(member, MemberHealth())
            for member in gone:
                self._health.pop(member, None)
                client = self._clients.pop(member, None)
                if client is not None:
                    client.close()
            return True

    def members(self) -> list[str]:
        with self._lock:
            return list(self._members)

    def live(self) -> list[str]:
        """The members in the ring now: neither down nor quarantined."""
        now = self._clock()
        with self._lock:
            return [m for m in self._members if self._usable(self._health[m], now)]

    @staticmethod
    def _usable(health: MemberHealth, now: float) -> bool:
        if health.down_since is not None:
            return False
        return health.quarantined_until is None or health.quarantined_until <= now

    def client(self, member: str) -> PeerClient:
        with self._lock:
            client = self._clients.get(member)
            if client is None:
                client = self._clients[member] = PeerClient(member, self._token)
            return client

    # -- health -------------------------------------------------------------------------------
    def report_ok(self, member: str) -> None:
        with self._lock:
            health = self._health.get(member)
            if health is not None:
                health.missed_deadlines = 0

    def report_unreachable(self, member: str, error: Exception) -> None:
        self._down(member, f"unreachable: {error}")

    def report_missed_deadline(self, member: str) -> None:
        with self._lock:
            health = self._health.get(member)
            if health is None:
                return
            health.missed_deadlines += 1
            down = health.missed_deadlines >= MISSES_TO_DOWN
        if down:
            self._down(member, f"{MISSES_TO_DOWN} deadlines missed in a row")

    def _down(self, member: str, why: str) -> None:
        with self._lock:
            health = self._health.get(member)
            if health is None or health.down_since is not None:
                return
            health.down_since = self._clock()
        log.warning("peer %s leaves the ring: %s", member, why)

    def quarantine(self, member: str, why: str) -> None:
        with self._lock:
            health = self._health.get(member)
            if health is None:
                return
            health.quarantined_until = self._clock() + self.quarantine_s
            health.quarantines += 1
        log.error("peer %s quarantined for %.0f s: %s", member, self.quarantine_s, why)

    def quarantined(self) -> list[str]:
        now = self._clock()
        with self._lock:
            return [m for m in self._members
                    if (self._health[m].quarantined_until or 0) > now]

    def state(self) -> dict[str, Any]:
        """Members, live, down and quarantined ones (seconds left), and each source (its
        description, members, refresh interval, last successful refresh as a Unix time,
        last error), for status documents."""
        now = self._clock()
        with self._lock:
            members = list(self._members)
            down = [m for m in members if self._health[m].down_since is not None]
            quarantined = {m: round(self._health[m].quarantined_until - now, 1)  # type: ignore[operator]
                           for m in members if (self._health[m].quarantined_until or 0) > now}
        sources = [{"source": s.source.describe(), "members": list(s.members),
                    "refresh_s": None if s.source.refresh_s == math.inf else s.source.refresh_s,
                    "last_refresh": None if s.refreshed_at is None else round(s.refreshed_at, 3),
                    "last_error": s.error}
                   for s in self._sources]
        return {"members": members,
                "live": [m for m in members if m not in down and m not in quarantined],
                "down": down, "quarantined": quarantined, "sources": sources}

    # -- the prober ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="peer-prober", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.probe_interval_s):
            try:
                self.reload(force=False)
                self.probe_unhealthy()
            except Exception:  # the prober must outlive any one bad round
                log.exception("peer prober round failed")

    def probe_unhealthy(self) -> None:
        """Ask every down member, and every quarantined one whose time is up, for its Status;
        one that answers, and does not say it is draining, rejoins the ring."""
        now = self._clock()
        with self._lock:
            due = [m for m in self._members
                   if self._health[m].down_since is not None
                   or (self._health[m].quarantined_until is not None
                       and self._health[m].quarantined_until <= now)]
        for member in due:
            try:
                if self.client(member).status(PROBE_TIMEOUT_S).get("draining"):
                    continue
            except PeerCallError:
                continue
            with self._lock:
                health = self._health.get(member)
                if health is None:
                    continue
                health.down_since = None
                health.quarantined_until = None
                health.missed_deadlines = 0
            log.info("peer %s answers again: back in the ring", member)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            client.close()
        self._close_sources()

    def _close_sources(self) -> None:
        for state in self._sources:
            try:
                state.source.close()
            except Exception:  # closing must not stop the others
                log.exception("closing peers source %s failed", state.source.describe())
