"""The leader's soft state: storage-server and cachefs-node liveness, needle counts, lag and
repair tasks.

None of this goes through the raft log: it is rebuilt from the next heartbeats after a failover
(a new leader starts every registered server's clock at its own start, so nobody is declared
down or dead for silence that happened before it led).

- A server is **up** while its last heartbeat is at most `down_after` seconds old, **down**
  after that, and due to be declared **dead** (by a raft command from the leader) once down
  for `dead_after` more seconds (0: never automatically).
- **Lag**: for each vid, the highest needle count among its up replicas is the reference; a
  replica whose last reported count is below it lags by the difference. A down replica shows
  its lag from its last count.
- **Repair**: a lagging up replica is given a `RepairTask` from the up replica with the highest
  count (ties: the smallest id). A task stays in flight (not given again) until the server
  reports it done in a heartbeat, re-registers, or `REPAIR_EXPIRY_S` passes.
- **Nodes** (`NodeLiveness`): a cachefs node is live while its last RegisterNode (its
  heartbeat) is at most `timeout` seconds old; one silent longer leaves the node list on its
  own, and comes back with its next heartbeat.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

REPAIR_EXPIRY_S = 600.0


@dataclass(frozen=True)
class Task:
    vid: int
    source_id: str


@dataclass(frozen=True)
class Done:
    vid: int
    source_id: str
    ok: bool
    error: str = ""


class Liveness:
    """Heartbeat times, counts and repairs in flight; thread-safe."""

    def __init__(self, down_after: float, dead_after: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.down_after = down_after
        self.dead_after = dead_after
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}            # id -> clock() of the last heartbeat
        self._beats: set[str] = set()                # ids heard from since this leader began
        self._counts: dict[str, dict[int, int]] = {}  # id -> vid -> live needles
        self._free: dict[str, int] = {}
        self._inflight: dict[tuple[str, int], tuple[str, float]] = {}  # (id, vid) -> (src, t)
        self.last_done: dict[tuple[str, int], Done] = {}
        self._last_registration = clock()

    def reset(self, ids: Sequence[str]) -> None:
        """Forget everything and start every server's clock now (a new leader)."""
        now = self.clock()
        with self._lock:
            self._last_registration = now
            self._seen = dict.fromkeys(ids, now)
            self._beats.clear()
            self._counts.clear()
            self._free.clear()
            self._inflight.clear()

    def registered(self, sid: str) -> None:
        """A (re)registration: the server is alive and its earlier repairs are void."""
        with self._lock:
            self._seen[sid] = self._last_registration = self.clock()
            for key in [k for k in self._inflight if k[0] == sid]:
                del self._inflight[key]

    def beat(self, sid: str, free_bytes: int, counts: Mapping[int, int],
             repaired: Sequence[Done]) -> None:
        with self._lock:
            self._seen[sid] = self.clock()
            self._beats.add(sid)
            self._free[sid] = free_bytes
            self._counts.setdefault(sid, {}).update(counts)
            for done in repaired:
                self._inflight.pop((sid, done.vid), None)
                self.last_done[(sid, done.vid)] = done

    def state(self, sid: str) -> str:
        """"up" or "down" ("up" also for a server not heard from yet, within its grace)."""
        with self._lock:
            seen = self._seen.get(sid)
        if seen is None:
            self.registered(sid)  # first sight of it on this leader: start its clock
            return "up"
        return "up" if self.clock() - seen <= self.down_after else "down"

    def age(self, sid: str) -> float | None:
        """Seconds since its last heartbeat on this leader (None: none yet)."""
        with self._lock:
            if sid not in self._beats:
                return None
            return self.clock() - self._seen[sid]

    def since_registration(self) -> float:
        """Seconds since the last registration (or since this leader began)."""
        with self._lock:
            return self.clock() - self._last_registration

    def free_bytes(self, sid: str) -> int | None:
        with self._lock:
            return self._free.get(sid)

    def count(self, sid: str, vid: int) -> int | None:
        with self._lock:
            return self._counts.get(sid, {}).get(vid)

    def due_dead(self, ids: Sequence[str]) -> list[str]:
        """The servers silent for `down_after + dead_after` seconds (none if dead_after is 0)."""
        if self.dead_after <= 0:
            return []
        limit = self.down_after + self.dead_after
        now = self.clock()
        with self._lock:
            return [sid for sid in ids if sid in self._seen and now - self._seen[sid] > limit]

    def vid_lags(self, vid: int, members: Sequence[str]) -> dict[str, int | None]:
        """Each member's lag for `vid` (None: no count known)."""
        reference = self._reference(vid, members)
        out: dict[str, int | None] = {}
        for sid in members:
            count = self.count(sid, vid)
            out[sid] = None if count is None or reference is None else max(0, reference - count)
        return out

    def _reference(self, vid: int, members: Sequence[str]) -> int | None:
        counts = [c for sid in members if self.state(sid) == "up"
                  and (c := self.count(sid, vid)) is not None]
        return max(counts) if counts else None

    def repairs(self, sid: str, sets: Sequence[Sequence[str]]) -> list[Task]:
        """The repairs `sid` should start now: one per vid where it lags behind an up replica,
        not already in flight."""
        now = self.clock()
        tasks: list[Task] = []
        for vid, members in enumerate(sets):
            if sid not in members:
                continue
            mine = self.count(sid, vid)
            if mine is None:
                continue
            sources = sorted((-c, other) for other in members
                             if other != sid and self.state(other) == "up"
                             and (c := self.count(other, vid)) is not None and c > mine)
            if not sources:
                continue
            with self._lock:
                inflight = self._inflight.get((sid, vid))
                if inflight is not None and now - inflight[1] < REPAIR_EXPIRY_S:
                    continue
                source = sources[0][1]
                self._inflight[(sid, vid)] = (source, now)
            tasks.append(Task(vid, source))
        return tasks

    def inflight(self, sid: str, vid: int) -> str | None:
        with self._lock:
            entry = self._inflight.get((sid, vid))
            return entry[0] if entry else None


class NodeLiveness:
    """When the leader last heard from each cachefs node; thread-safe."""

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}

    def reset(self, names: Sequence[str]) -> None:
        """A new leader: every registered node counts as heard from now (its heartbeats went
        to the old leader), so the list does not empty while they find this one."""
        now = self.clock()
        with self._lock:
            self._seen = dict.fromkeys(names, now)

    def beat(self, name: str) -> None:
        with self._lock:
            self._seen[name] = self.clock()

    def age(self, name: str) -> float | None:
        """Seconds since the node was last heard from (None: never, on this leader)."""
        with self._lock:
            seen = self._seen.get(name)
        return None if seen is None else self.clock() - seen

    def live(self, name: str) -> bool:
        age = self.age(name)
        return age is not None and age <= self.timeout
