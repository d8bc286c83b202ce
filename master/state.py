"""The master's replicated state and the pysyncobj raft node that replicates it.

`MasterState` is plain data (dicts, lists, a sorted list of names) changed only in its
`@replicated` methods, which are deterministic: every argument that varies between masters
(times, above all) is passed in by the caller, never read inside, and an apply never raises
(an exception there would make pysyncobj retry the entry forever), so every member applying the
same log reaches the same state. It holds the cluster's shape (N volumes, R replicas,
min_replicas), the storage servers (id, address, zone, capacity, dead flag), each vid's replica
set and the placement epoch, the object directory and the registry of cachefs client nodes.

`MasterRaft` is the `SyncObj` around it: journal and full dumps under the data directory (so the
state survives a restart of every member), the raft transport encrypted with the cluster token
(a peer without it cannot join), and `run`, which submits one command with a bounded wait and
turns pysyncobj's failures into `RemoteError` (gRPC UNAVAILABLE) naming the problem. pysyncobj
forwards a command submitted on a follower to the leader and calls back once the follower has
applied it, so `run` works on every member.

pysyncobj has no ReadIndex and an isolated leader believes it leads until
`leaderFallbackTimeout`: a read that must be current first commits a barrier (a `dir_apply`
operation that changes nothing) and then reads the local state, which is then at least as new as
the log was when the read began. The local read happens outside the raft thread under the
state's lock, so one barrier serves a whole listing page without running the listing on every
member.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pysyncobj import SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.config import FAIL_REASON
from pysyncobj.syncobj import SyncObjException
from sortedcontainers import SortedList

from cachefs.errors import RemoteError, UsageError
from master import journal, placement

log = logging.getLogger("cachefs.master")

T = TypeVar("T")

# A directory entry as the master stores it (the client side is master.client.DirEntry):
# (inline value or None, needle key or None, size, mtime_ns, request id).
StoredDirEntry = tuple[bytes | None, bytes | None, int, int, str]

NO_LEADER = ("no raft leader: a majority of the masters is unreachable (or an election is in "
             "progress)")


def _never_raises(fn: Callable[..., T]) -> Callable[..., T | None]:
    """An apply that fails logs and returns None instead of raising: pysyncobj would retry a
    raising entry on every tick forever. (Only a bug gets here; applies check their input.)"""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T | None:
        try:
            return fn(self, *args, **kwargs)
        except Exception:
            log.exception("applying %s failed", fn.__name__)
            return None

    return wrapper


class MasterState(SyncObjConsumer):
    """The replicated state. Mutated only by the `@replicated` methods (on the raft thread);
    read by the `*_view` and `entry`/`list_entries` methods from any thread, under `lock`."""

    def __init__(self) -> None:
        # Attributes set before SyncObjConsumer.__init__ are not serialized into dumps.
        self.lock = threading.RLock()
        super().__init__()
        self.volumes = 0          # N; 0 until `configure` is applied
        self.replicas = 0         # R
        self.min_replicas = 0     # 0: every live replica
        self.epoch = 0            # bumped whenever a replica set or a replica's address changes
        self.servers: dict[str, dict[str, Any]] = {}
        self.sets: list[list[str]] = []
        self.entries: dict[str, StoredDirEntry] = {}
        self.names: SortedList = SortedList()
        self.nodes: dict[str, dict[str, Any]] = {}

    def _deserialize(self, data: dict[str, Any]) -> None:
        with self.lock:
            super()._deserialize(data)

    # -- replicated commands (run on every member, in log order) ----------------------------

    @replicated
    @_never_raises
    def configure(self, volumes: int, replicas: int, min_replicas: int) -> tuple[int, int, int]:
        """Fix N, R and min_replicas; the first call wins, later ones change nothing. Returns
        the values in force."""
        with self.lock:
            if not self.volumes:
                self.volumes, self.replicas, self.min_replicas = volumes, replicas, min_replicas
                self.sets = [[] for _ in range(volumes)]
            return self.volumes, self.replicas, self.min_replicas

    @replicated
    @_never_raises
    def register_storage(self, sid: str, address: str, zone: str, capacity_bytes: int,
                         volumes: int, now_ns: int) -> str | None:
        """Add or update a storage server (a dead one registering again is alive again, with
        no replicas until placement gives it some). Returns None, or why it was refused."""
        with self.lock:
            if self.volumes and volumes != self.volumes:
                return (f"storage server {sid} has {volumes} volumes, the cluster has "
                        f"{self.volumes}: create its data directory with --volumes "
                        f"{self.volumes}")
            for other, info in self.servers.items():
                if other != sid and info["address"] == address and not info["dead"]:
                    return (f"address {address} is registered by storage server {other}: "
                            f"declare {other} dead first (cachefs master declare-dead)")
            old = self.servers.get(sid)
            self.servers[sid] = {
                "address": address, "zone": zone, "capacity_bytes": capacity_bytes,
                "dead": False, "registered_ns": old["registered_ns"] if old else now_ns,
                "updated_ns": now_ns,
            }
            if old and old["address"] != address and any(sid in s for s in self.sets):
                self.epoch += 1
            self._place()
            return None

    @replicated
    @_never_raises
    def mark_dead(self, sid: str, now_ns: int) -> int:
        """Declare a storage server dead and replace it in every replica set it was in.
        Returns the number of sets changed, -1 for an unknown id."""
        with self.lock:
            info = self.servers.get(sid)
            if info is None:
                return -1
            info["dead"] = True
            info["updated_ns"] = now_ns
            before = [list(s) for s in self.sets]
            self._place()
            return sum(1 for old, new in zip(before, self.sets) if old != new)

    @replicated
    def dir_apply(self, ops: list[tuple[Any, ...]]) -> list[bool | None]:
        """Apply directory operations in order, one result each (`master.batching` sends
        concurrent requests as one command):

        - `("put", name, inline, needle, size, mtime_ns, if_absent, request_id, last_under)`:
          `_put`, whether it was set;
        - `("delete", name)`: whether it existed;
        - `("barrier",)`: True, changing nothing (committing it makes this member's state
          current for a read).

        An operation that fails to apply (a bug: requests are checked before they are
        submitted) logs and answers None, alone: the others in the command still apply."""
        results: list[bool | None] = []
        with self.lock:
            for op in ops:
                try:
                    if op[0] == "put":
                        results.append(self._put(*op[1:]))
                    elif op[0] == "delete":
                        results.append(self._delete(*op[1:]))
                    elif op[0] == "barrier":
                        results.append(True)
                    else:
                        raise ValueError(f"unknown directory operation {op[0]!r}")
                except Exception:
                    log.exception("applying directory operation %r failed", op[:2])
                    results.append(None)
        return results

    def _put(self, name: str, inline: bytes | None, needle: bytes | None, size: int,
             mtime_ns: int, if_absent: bool, request_id: str = "", last_under: str = "") -> bool:
        """Set `name`. With `if_absent`, only if it is absent (and, with `last_under`, no name
        with that prefix sorts after it); a retry of the very call that created it (same
        non-empty `request_id`: the client's first attempt was applied but its answer lost)
        still reports created, any other call reports False."""
        old = self.entries.get(name)
        if old is not None and if_absent:
            return bool(request_id) and old[4] == request_id
        if if_absent and last_under:
            later = self.names.bisect_right(name)
            if later < len(self.names) and self.names[later].startswith(last_under):
                return False
        if old is None:
            self.names.add(name)
        self.entries[name] = (inline, needle, size, mtime_ns, request_id)
        return True

    def _delete(self, name: str) -> bool:
        if self.entries.pop(name, None) is None:
            return False
        self.names.remove(name)
        return True

    @replicated
    @_never_raises
    def dir_put_many(self, items: list[tuple[str, bytes | None, bytes | None, int]],
                     mtime_ns: int) -> int:
        """Set every (name, inline, needle, size) of `items` (overwriting). Size 0 for the
        needle a name already has keeps its known size (a client naming a chunk it found but
        did not write does not know it)."""
        with self.lock:
            for name, inline, needle, size in items:
                old = self.entries.get(name)
                if old is None:
                    self.names.add(name)
                elif needle is not None and old[1] == needle and not size:
                    size = old[2]
                self.entries[name] = (inline, needle, size, mtime_ns, "")
            return len(items)

    @replicated
    @_never_raises
    def register_node(self, name: str, peer_address: str, cache_bytes: int,
                      inventory_json: str, now_ns: int,
                      serving: list[str] | None = None) -> bool:
        """Add or update a cachefs node's record (`serving`: the "DATASET@COMMIT" versions its
        mounts show; a default, so entries journaled before it existed still apply)."""
        with self.lock:
            self.nodes[name] = {"peer_address": peer_address, "cache_bytes": cache_bytes,
                                "inventory_json": inventory_json, "updated_ns": now_ns,
                                "serving": sorted(serving or ())}
            return True

    @replicated
    @_never_raises
    def place_volumes(self) -> bool:
        """The first placement (issued by the leader once at least R servers registered and
        registrations settled, so a cluster brought up server by server is not all on the
        first R). Returns whether every vid now has a replica set."""
        with self.lock:
            self._place(first=True)
            return bool(self.sets) and all(self.sets)

    def placed(self) -> bool:
        with self.lock:
            return any(self.sets)

    def _place(self, first: bool = False) -> None:
        """Recompute the replica sets (placement.place) over the servers not dead: fill short
        sets and replace dead servers once the cluster is placed, or place it (`first`)."""
        if not self.volumes or not (first or any(self.sets)):
            return
        candidates = {sid: info["zone"] for sid, info in self.servers.items()
                      if not info["dead"]}
        sets = placement.place(self.volumes, self.replicas, candidates, self.sets)
        if sets != self.sets:
            self.sets = sets
            self.epoch += 1

    # -- local reads (current only after a barrier) ------------------------------------------

    def entry(self, name: str) -> StoredDirEntry | None:
        with self.lock:
            return self.entries.get(name)

    def list_entries(self, prefix: str, start_after: str,
                     limit: int) -> tuple[list[tuple[str, StoredDirEntry]], bool]:
        """Up to `limit` entries whose names start with `prefix` and sort after `start_after`,
        in name order, and whether more follow. O(log n + limit)."""
        with self.lock:
            start = max(prefix, start_after)
            out: list[tuple[str, StoredDirEntry]] = []
            for name in self.names.irange(start, inclusive=(start != start_after, True)):
                if not name.startswith(prefix):
                    break
                if len(out) == limit:
                    return out, True
                out.append((name, self.entries[name]))
            return out, False

    def placement_view(self) -> dict[str, Any]:
        """A consistent copy of the cluster's shape, servers and replica sets."""
        with self.lock:
            return {"volumes": self.volumes, "replicas": self.replicas,
                    "min_replicas": self.min_replicas, "epoch": self.epoch,
                    "servers": {sid: dict(info) for sid, info in self.servers.items()},
                    "sets": [list(s) for s in self.sets]}

    def nodes_view(self) -> dict[str, dict[str, Any]]:
        """Every registered node's record (a copy; `serving` is [] in records from before it
        existed)."""
        with self.lock:
            return {name: {**info, "serving": list(info.get("serving", ()))}
                    for name, info in self.nodes.items()}

    def entry_count(self) -> int:
        with self.lock:
            return len(self.entries)


@dataclass(frozen=True)
class RaftView:
    """What this member knows of the raft group right now."""

    self_address: str
    is_leader: bool
    leader: str | None                 # the leader's raft address, None when unknown or
                                       # unreachable from here
    term: int
    connected: dict[str, bool]         # other members' raft addresses -> connected
    has_quorum: bool
    commit_index: int
    last_applied: int
    ready: bool


class MasterRaft(SyncObj):
    """The pysyncobj node replicating a `MasterState` (see the module docstring)."""

    def __init__(self, state: MasterState, self_address: str, others: list[str],
                 data_dir: Path, password: str | None,
                 leader_fallback_timeout: float = 5.0) -> None:
        conf = SyncObjConf(
            journalFile=str(data_dir / "raft.journal"),
            fullDumpFile=str(data_dir / "raft.dump"),
            password=password,
            # Fail at once without a leader (run() retries until its deadline) rather than
            # queueing a command that could apply long after its caller gave up.
            commandsWaitLeader=False,
            # An isolated leader steps down after this (pysyncobj's default is 30 s).
            leaderFallbackTimeout=leader_fallback_timeout,
            raftMinTimeout=0.8, raftMaxTimeout=2.0, connectionTimeout=3.5,
            connectionRetryTime=1.0,
            # Dumps are written by a fork()ed child from a copy-on-write snapshot, so a big
            # directory never stalls the raft thread (the child only pickles, writes the file
            # and _exit()s: it touches no gRPC or lock state of the parent).
            useFork=True,
            # Wake the raft thread for each command and send it at once (with batching a
            # command waits for the next tick: ~100 ms per write).
            appendEntriesUseBatch=False, autoTickPeriod=0.01,
            bindRetryTime=0.5, maxBindRetries=10,
            onStateChanged=self._on_state_changed,
        )
        journal.install()  # entries on disk before they are acknowledged (master/journal.py)
        # Set before SyncObj.__init__: attributes that exist then are not part of the dumps.
        self.state = state
        self.self_address = self_address
        self.files = (Path(conf.journalFile), Path(conf.fullDumpFile))
        super().__init__(self_address, others, conf, consumers=[state])

    def _on_state_changed(self, old: int, new: int) -> None:
        names = {0: "follower", 1: "candidate", 2: "leader"}
        log.info("raft: %s -> %s (term %d)", names.get(old, old), names.get(new, new),
                 self.raftCurrentTerm)

    def wait_bound(self) -> None:
        """Return once the raft port is bound; UsageError if it cannot be."""
        try:
            self.waitBinded()
        except SyncObjException as e:
            raise UsageError(f"--raft {self.self_address}: cannot listen there "
                             "(address in use?)") from e

    def run(self, command: Callable[..., T], *args: Any, timeout: float) -> T:
        """Submit one replicated command and wait (at most `timeout` s) until this member has
        applied it; its result. RemoteError when there is no leader, no quorum or the leader
        kept changing until the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteError(f"{NO_LEADER}; gave up after {timeout:g} s")
            if not self.has_leader():
                time.sleep(min(0.1, remaining))
                continue
            try:
                return command(*args, sync=True, timeout=remaining)
            except SyncObjException as e:
                code = e.errorCode
                if code == "Timeout":
                    raise RemoteError(
                        f"no raft quorum: the command was not committed within {timeout:g} s "
                        "(the leader lost a majority of the masters?)") from None
                if code == FAIL_REASON.REQUEST_DENIED:
                    raise RemoteError("the raft leader refused the command") from None
                # MISSING_LEADER (none known), QUEUE_FULL, or NOT_LEADER, LEADER_CHANGED,
                # DISCARDED, UNKNOWN_OUTCOME (the leader changed before it committed): every
                # command is idempotent, so submit it again until the deadline.
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def leader_node(self) -> Any:
        """The leader's raft node, if this member leads or is connected to it (pysyncobj
        keeps naming a leader it lost contact with until an election, and a member cut off
        from every other holds no election)."""
        leader = self._getLeader()
        if leader is None or leader == self.selfNode or self.isNodeConnected(leader):
            return leader
        return None

    def has_leader(self) -> bool:
        return self.leader_node() is not None

    def log_entries(self) -> int:
        """Entries in this member's raft log (since its last log compaction), from pysyncobj's
        status (retried if the raft thread changes it while it is read)."""
        for _ in range(10):
            try:
                return int(self.getStatus()["log_len"])
            except RuntimeError:  # a dict changed size while getStatus iterated it
                time.sleep(0.001)
        raise RemoteError("raft state kept changing while being read")

    def disk_bytes(self) -> tuple[int, int]:
        """(size of the journal file, size of the last full dump) on disk; 0 for a missing
        file. pysyncobj grows the journal file by doubling, so it can exceed its entries."""
        sizes = []
        for path in self.files:
            try:
                sizes.append(path.stat().st_size)
            except FileNotFoundError:
                sizes.append(0)
        return sizes[0], sizes[1]

    def view(self) -> RaftView:
        """This member's view of the group (read from the raft thread's fields; retried if
        they change under us)."""
        for _ in range(10):
            try:
                leader = self.leader_node()
                return RaftView(
                    self_address=self.self_address, is_leader=self._isLeader(),
                    leader=None if leader is None else str(leader.id),
                    term=self.raftCurrentTerm,
                    connected={str(n.id): self.isNodeConnected(n) for n in self.otherNodes},
                    has_quorum=self.hasQuorum, commit_index=self.raftCommitIndex,
                    last_applied=self.raftLastApplied, ready=self.isReady())
            except RuntimeError:  # a set changed size while being read
                time.sleep(0.001)
        raise RemoteError("raft state kept changing while being read")
