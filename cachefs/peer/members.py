"""Who is in the peer ring, as one node sees it: the configured members minus the unhealthy ones.

The members come from a static list (`--cache-peers`) or a file (`--cache-peers-file`, re-read
when its modification time or size changes, checked every `probe_interval_s`); a member is its
address, HOST:PORT, the same string on every node (`cachefs.peer.ring.parse_member`).

Health, per member, from the calls the tier makes (no traffic while all is well):
- a call that cannot reach it (UNAVAILABLE) puts it **down** at once; three deadline misses in
  a row do too. A down member leaves the ring (its chunks go to their next-ranked member) and is
  probed with `Status` every `probe_interval_s`: it rejoins as soon as it answers. So a member
  that stops answering leaves within seconds, and comes back within a second of answering.
- a member that served bytes that do not match the chunk's name is **quarantined** for
  `quarantine_s` (logged with the member and the chunk, and counted); then probed like a down
  one.
A call that answers (even NOT_FOUND) resets the deadline-miss count.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cachefs.errors import UsageError
from cachefs.peer.client import PeerCallError, PeerClient
from cachefs.peer.ring import parse_members

log = logging.getLogger("cachefs.peer.members")

DEFAULT_PROBE_INTERVAL_S = 1.0
DEFAULT_QUARANTINE_S = 60.0
PROBE_TIMEOUT_S = 1.0
MISSES_TO_DOWN = 3


@dataclass
class MemberHealth:
    down_since: float | None = None
    quarantined_until: float | None = None
    missed_deadlines: int = 0
    quarantines: int = 0


class Membership:
    """The ring's members and their health; thread-safe. `start` runs the background prober
    (file reloads, probes of down and quarantined members); `close` stops it."""

    def __init__(self, members: list[str] | None = None, members_file: str | None = None,
                 token: str | None = None, *,
                 probe_interval_s: float = DEFAULT_PROBE_INTERVAL_S,
                 quarantine_s: float = DEFAULT_QUARANTINE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if (members is None) == (members_file is None):
            raise UsageError("peers: give either a list of members or a members file")
        self.members_file = members_file
        self._token = token
        self.probe_interval_s = probe_interval_s
        self.quarantine_s = quarantine_s
        self._clock = clock
        self._lock = threading.Lock()
        self._members: list[str] = []
        self._health: dict[str, MemberHealth] = {}
        self._clients: dict[str, PeerClient] = {}
        self._file_stamp: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads = 0
        if members is not None:
            self._set_members(members)
        else:
            self.reload()

    # -- the list -------------------------------------------------------------------------------
    def reload(self) -> bool:
        """Re-read the members file if it changed; True if the member list changed. A file that
        cannot be read or parsed keeps the previous list (logged); at start it is an error."""
        if self.members_file is None:
            return False
        try:
            st = os.stat(self.members_file)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._file_stamp:
                return False
            with open(self.members_file) as f:
                members = parse_members(f.read(), f"peer in {self.members_file}")
        except (OSError, UsageError) as e:
            if self._file_stamp is None and not self._members:
                raise UsageError(f"--cache-peers-file {self.members_file}: {e}") from e
            log.warning("peers file %s: %s (keeping the previous %d members)",
                        self.members_file, e, len(self._members))
            return False
        self._file_stamp = stamp
        changed = self._set_members(members)
        if changed:
            self.reloads += 1
            log.info("peers file %s: %d members", self.members_file, len(members))
        return changed

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
        """Members, live, down and quarantined ones (seconds left), for status documents."""
        now = self._clock()
        with self._lock:
            members = list(self._members)
            down = [m for m in members if self._health[m].down_since is not None]
            quarantined = {m: round(self._health[m].quarantined_until - now, 1)  # type: ignore[operator]
                           for m in members if (self._health[m].quarantined_until or 0) > now}
        return {"members": members,
                "live": [m for m in members if m not in down and m not in quarantined],
                "down": down, "quarantined": quarantined}

    # -- the prober ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="peer-prober", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.probe_interval_s):
            try:
                self.reload()
                self.probe_unhealthy()
            except Exception:  # the prober must outlive any one bad round
                log.exception("peer prober round failed")

    def probe_unhealthy(self) -> None:
        """Ask every down member, and every quarantined one whose time is up, for its Status;
        one that answers rejoins the ring."""
        now = self._clock()
        with self._lock:
            due = [m for m in self._members
                   if self._health[m].down_since is not None
                   or (self._health[m].quarantined_until is not None
                       and self._health[m].quarantined_until <= now)]
        for member in due:
            try:
                self.client(member).status(PROBE_TIMEOUT_S)
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
