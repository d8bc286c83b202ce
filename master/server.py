"""The master's gRPC service (proto/master.proto) over a `MasterRaft`, and `serve`.

`cachefs master serve --id N --listen HOST:PORT --raft HOST:PORT --peers ... --data-dir DIR`
runs `serve`. Every member answers every call:

- **Writes** (RegisterStorage, DeclareDead, DirPut, DirDelete, RegisterNode) are raft commands:
  pysyncobj forwards one submitted on a follower to the leader. Directory operations (and the
  barriers of current reads) arriving together share one command (`master.batching`). Each
  waits at most `commit_timeout` seconds; without a leader or a quorum it fails UNAVAILABLE
  naming the problem ("no raft leader: a majority of the masters is unreachable").
- **Current reads** (DirGet, DirList, and GetPlacement and Status on the leader) commit a
  barrier first and then read the local state (master/state.py explains why).
- **Soft state** (liveness of storage servers and cachefs nodes, needle counts, repairs:
  master/liveness.py) lives on the leader only, so a follower **forwards** Heartbeat,
  RegisterNode, ListNodes, GetPlacement and Status to the leader's gRPC address (from --peers),
  once (a forwarded call carries `x-cachefs-forwarded` and is never
  forwarded again). Without a reachable leader, Heartbeat, RegisterNode, ListNodes and
  GetPlacement fail UNAVAILABLE and Status answers with what this member knows,
  `"leader": null`.
- **Node registry.** RegisterNode is a cachefs node's registration and, re-sent every few
  seconds, its heartbeat: the leader commits the node's record through the log only when it
  changed (address, cache size, inventory, the versions it serves) and notes the heartbeat in
  its soft state; ListNodes lists the nodes heard from within --down-after, from that soft
  state without a log entry (polled by every mount, it must cost the log nothing).

A maintenance thread on the leader configures the cluster on its first term (N, R,
min_replicas: the first leader's flags win and are kept in the replicated state), places the
volumes once at least R storage servers registered and registrations paused for
`PLACEMENT_SETTLE_S`, and declares dead, through the log, each storage server silent for
`down_after + dead_after` seconds.

Requests are checked in full before anything changes (INVALID_ARGUMENT naming the field);
cachefs errors map to status codes through `cachefs.grpc_errors.rpc`; with a token every call
needs it (`TokenInterceptor`) and the raft transport is encrypted with it.

With `--metrics-listen HOST:PORT` (`MasterConfig.metrics_listen`) the member serves Prometheus
metrics at http://HOST:PORT/metrics (master/metrics.py): its RPCs, and its view of raft, the
directory and the cluster, read without committing anything.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cachefs.contracts import KEY_BYTES
from cachefs.errors import NotFound, RemoteError, UsageError
from cachefs.grpc_auth import bearer_metadata, check_listen, listening_server
from cachefs.grpc_errors import RpcAbort, error_from_rpc, invalid, rpc
from cachefs.httpserver import parse_listen
from cachefs.metrics import MetricsEndpoint, serve_metrics
from master.batching import CommandBatcher
from master.client import LEADER_HINT
from master.liveness import Done, Liveness, NodeLiveness
from master.metrics import MasterMetrics
from master.proto import master_pb2 as pb
from master.proto import master_pb2_grpc as pb_grpc
from master.state import NO_LEADER, MasterRaft, MasterState, RaftView, StoredDirEntry

log = logging.getLogger("cachefs.master")

NAME_MAX_BYTES = 1024
INLINE_MAX_BYTES = 4096
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
MAX_INVENTORY_BYTES = 1 << 20
WORKERS = 32
FORWARD_TIMEOUT_S = 10.0
STATUS_READ_TIMEOUT_S = 3.0
MAINTENANCE_PERIOD_S = 0.5
PLACEMENT_SETTLE_S = 3.0  # the first placement waits for registrations to pause this long
FORWARDED = "x-cachefs-forwarded"
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing it
]
ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ZONE_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")
NODE_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")
SERVING_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}@[0-9a-f]{64}")  # DATASET@COMMIT
MAX_SERVING = 1000


# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One member of the raft group: its id, gRPC address and raft address."""

    id: str
    grpc: str
    raft: str


def parse_address(text: str, what: str) -> str:
    """HOST:PORT with a host and a port 1..65535, else UsageError naming `what`."""
    host, sep, port = text.rpartition(":")
    if (not sep or not host or not port.isdecimal() or not 0 < int(port) < 65536
            or len(text) > 255 or any(c.isspace() for c in text)):
        raise UsageError(f"{what} {text!r}: expected HOST:PORT, e.g. 10.0.0.5:8700")
    return text


def parse_peers(text: str) -> tuple[Peer, ...]:
    """``ID=GRPC_HOST:PORT/RAFT_HOST:PORT,...`` (every member, this one included or not)."""
    peers: list[Peer] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pid, eq, rest = item.partition("=")
        grpc_addr, slash, raft_addr = rest.partition("/")
        if not eq or not slash or not ID_RE.fullmatch(pid):
            raise UsageError(f"--peers {item!r}: expected ID=GRPC_HOST:PORT/RAFT_HOST:PORT")
        peers.append(Peer(pid, parse_address(grpc_addr, "--peers"),
                          parse_address(raft_addr, "--peers")))
    ids = [p.id for p in peers]
    if len(set(ids)) != len(ids):
        raise UsageError(f"--peers: an id appears twice ({', '.join(ids)})")
    rafts = [p.raft for p in peers]
    if len(set(rafts)) != len(rafts):
        raise UsageError("--peers: a raft address appears twice")
    return tuple(peers)


@dataclass(frozen=True)
class MasterConfig:
    """One master's settings (`cachefs master serve` flags)."""

    id: str
    listen: str
    raft: str
    data_dir: Path
    peers: tuple[Peer, ...] = ()
    token: str | None = None
    volumes: int = 64
    replicas: int = 2
    min_replicas: int = 0       # 0: every live replica of a set
    down_after: float = 10.0
    dead_after: float = 600.0   # 0: never declare dead automatically
    commit_timeout: float = 5.0
    metrics_listen: str | None = None  # HOST:PORT of the Prometheus endpoint; None: off
    members: tuple[Peer, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not ID_RE.fullmatch(self.id):
            raise UsageError(f"--id {self.id!r}: 1 to 64 of A-Z a-z 0-9 . _ -")
        parse_listen(self.listen, "--listen")
        parse_address(self.raft, "--raft")
        if self.metrics_listen:
            parse_listen(self.metrics_listen, "--metrics-listen")
        if self.volumes < 1 or self.volumes > 1 << 16:
            raise UsageError(f"--volumes {self.volumes}: between 1 and 65536")
        if self.replicas < 1:
            raise UsageError(f"--replicas {self.replicas}: at least 1")
        if not 0 <= self.min_replicas <= self.replicas:
            raise UsageError(f"--min-replicas {self.min_replicas}: between 0 (every live "
                             f"replica) and --replicas {self.replicas}")
        if self.down_after <= 0 or self.dead_after < 0 or self.commit_timeout <= 0:
            raise UsageError("--down-after and --commit-timeout must be positive, --dead-after "
                             "0 or more")
        members = list(self.peers)
        mine = [p for p in members if p.id == self.id]
        if mine and mine[0].raft != self.raft:
            raise UsageError(f"--peers names member {self.id} with raft address "
                             f"{mine[0].raft}, but --raft is {self.raft}")
        if any(p.raft == self.raft and p.id != self.id for p in members):
            raise UsageError(f"--peers: raft address {self.raft} (this member's --raft) is "
                             "given to another id")
        if not mine:
            members.append(Peer(self.id, self.listen, self.raft))
        object.__setattr__(self, "members", tuple(sorted(members, key=lambda p: p.id)))

    @property
    def grpc_address(self) -> str:
        """How the other members and clients reach this one (its --peers entry, else
        --listen)."""
        return next(p.grpc for p in self.members if p.id == self.id)


# -- request checks --------------------------------------------------------------------------


def check_name(name: str, field_name: str, allow_empty: bool = False) -> None:
    if not name:
        if allow_empty:
            return
        raise invalid(f"{field_name}: empty")
    if not name.isascii():
        raise invalid(f"{field_name}: {name[:64]!r}...: names are ASCII")
    if len(name) > NAME_MAX_BYTES:
        raise invalid(f"{field_name}: {len(name)} bytes, at most {NAME_MAX_BYTES}")
    if "\0" in name:
        raise invalid(f"{field_name}: contains NUL")


def check_id(sid: str, field_name: str = "id") -> None:
    if not ID_RE.fullmatch(sid):
        raise invalid(f"{field_name}: {sid[:80]!r}: 1 to 64 of A-Z a-z 0-9 . _ -")


def check_address(address: str, field_name: str) -> None:
    try:
        parse_address(address, field_name)
    except UsageError as e:
        raise invalid(str(e)) from None


def check_serving(serving: Sequence[str], field_name: str = "serving") -> None:
    """Dataset versions as a node names them: DATASET@COMMIT (the full 64-hex commit)."""
    if len(serving) > MAX_SERVING:
        raise invalid(f"{field_name}: {len(serving)} versions, at most {MAX_SERVING}")
    for i, version in enumerate(serving):
        if not SERVING_RE.fullmatch(version):
            raise invalid(f"{field_name}[{i}]: {version[:80]!r}: expected DATASET@COMMIT "
                          "(the commit's 64 hex digits)")


def check_entry(entry: pb.DirEntry) -> tuple[bytes | None, bytes | None, int]:
    """(inline, needle, size) of a DirEntry to store."""
    check_name(entry.name, "entry.name")
    if entry.has_inline:
        if len(entry.inline) > INLINE_MAX_BYTES:
            raise invalid(f"entry.inline: {len(entry.inline)} bytes, at most "
                          f"{INLINE_MAX_BYTES} inline (store a needle instead)")
        if entry.needle:
            raise invalid("entry.needle: set together with an inline value")
        if entry.size not in (0, len(entry.inline)):
            raise invalid(f"entry.size: {entry.size}, the inline value has "
                          f"{len(entry.inline)} bytes")
        return bytes(entry.inline), None, len(entry.inline)
    if entry.inline:
        raise invalid("entry.inline: set without has_inline")
    if len(entry.needle) != KEY_BYTES:
        raise invalid(f"entry.needle: a needle key is {KEY_BYTES} bytes (a BLAKE3 hash), got "
                      f"{len(entry.needle)}")
    return None, bytes(entry.needle), entry.size


def entry_message(name: str, value: StoredDirEntry) -> pb.DirEntry:
    inline, needle, size, mtime_ns, _ = value
    return pb.DirEntry(name=name, inline=inline or b"", has_inline=inline is not None,
                       needle=needle or b"", size=size, mtime_ns=mtime_ns)


# -- the master ------------------------------------------------------------------------------


class Master:
    """One member: the replicated state, its raft node, the leader's soft state, and the
    maintenance thread. `service()` is its gRPC servicer."""

    def __init__(self, config: MasterConfig) -> None:
        self.config = config
        self.state = MasterState()
        self.liveness = Liveness(config.down_after, config.dead_after)
        self.node_liveness = NodeLiveness(config.down_after)
        others = [p.raft for p in config.members if p.id != config.id]
        self.raft = MasterRaft(self.state, config.raft, others, config.data_dir, config.token)
        self.by_raft = {p.raft: p for p in config.members}
        self._channels: dict[str, tuple[grpc.Channel, pb_grpc.MasterStub]] = {}
        self._channels_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._led_term: int | None = None
        self._lead_lock = threading.Lock()
        # Calls this member answered, by outcome, for the metrics (master/metrics.py).
        self._counts: collections.Counter[str] = collections.Counter()
        self._counts_lock = threading.Lock()
        self.directory: CommandBatcher[tuple[Any, ...]] = CommandBatcher(
            lambda ops, timeout: self.raft.run(self.state.dir_apply, list(ops),
                                               timeout=timeout),
            name="directory-batcher")

    def count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

    def counted(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    # -- raft helpers ----------------------------------------------------------------------

    def timeout(self, context: grpc.ServicerContext | None, limit: float | None = None) -> float:
        """The commit timeout, cut to what the caller's deadline leaves (so the caller gets
        our answer, not DEADLINE_EXCEEDED)."""
        timeout = min(self.config.commit_timeout, limit or self.config.commit_timeout)
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            timeout = min(timeout, max(0.05, remaining - 0.25))
        return timeout

    def run(self, context: grpc.ServicerContext | None, command: Callable[..., Any],
            *args: Any) -> Any:
        """Commit one command (`MasterRaft.run`) within `timeout(context)`."""
        result = self.raft.run(command, *args, timeout=self.timeout(context))
        self.hint_leader(context)
        return result

    def dir_op(self, context: grpc.ServicerContext | None, op: tuple[Any, ...],
               limit: float | None = None) -> Any:
        """Commit one directory operation (`MasterState.dir_apply`) in the next batch of
        them (`master.batching`) within `timeout(context, limit)`; its result."""
        result = self.directory.call(op, self.timeout(context, limit))
        self.hint_leader(context)
        return result

    def read_barrier(self, context: grpc.ServicerContext | None,
                     limit: float | None = None) -> None:
        self.dir_op(context, ("barrier",), limit)

    def hint_leader(self, context: grpc.ServicerContext | None) -> None:
        """Tell a client that reached a follower where the leader is (`LEADER_HINT`)."""
        if context is None or self.raft._isLeader():  # the leader: nothing to tell, cheaply
            return
        view = self.raft.view()
        leader = None if view.is_leader else self.leader_peer(view)
        if leader is not None:
            context.set_trailing_metadata(((LEADER_HINT, leader.grpc),))

    def leader_peer(self, view: RaftView | None = None) -> Peer | None:
        view = view or self.raft.view()
        return None if view.leader is None else self.by_raft.get(view.leader)

    def leading(self, view: RaftView | None = None) -> bool:
        """Whether this member leads; the first time in a term, its soft state starts over
        (every registered server's clock starts now)."""
        view = view or self.raft.view()
        if not view.is_leader:
            return False
        with self._lead_lock:
            if self._led_term != view.term:
                self._led_term = view.term
                log.info("leading (term %d): soft state starts now", view.term)
                self.liveness.reset(list(self.state.placement_view()["servers"]))
                self.node_liveness.reset(list(self.state.nodes_view()))
        return True

    def forward(self, method: str, request: Any, context: grpc.ServicerContext) -> Any | None:
        """Send a call to the leader when this member is a follower; None when this member
        should answer itself (it leads, or the call was forwarded already). RemoteError when
        no leader is known."""
        if any(key == FORWARDED for key, _ in context.invocation_metadata() or ()):
            return None
        view = self.raft.view()
        if view.is_leader:
            return None
        leader = self.leader_peer(view)
        if leader is None:
            raise RemoteError(f"master {self.config.id}: {NO_LEADER}")
        stub = self._stub(leader.grpc)
        metadata = (*bearer_metadata(self.config.token), (FORWARDED, self.config.id))
        try:
            return getattr(stub, method)(request, timeout=FORWARD_TIMEOUT_S, metadata=metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"via the leader (master {leader.id} at {leader.grpc})") \
                from None

    def _stub(self, address: str) -> pb_grpc.MasterStub:
        with self._channels_lock:
            if address not in self._channels:
                channel = grpc.insecure_channel(address)
                self._channels[address] = (channel, pb_grpc.MasterStub(channel))
            return self._channels[address][1]

    # -- maintenance (leader only) ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._maintain, name="master-maintenance",
                                        daemon=True)
        self._thread.start()

    def _maintain(self) -> None:
        while not self._stop.wait(MAINTENANCE_PERIOD_S):
            try:
                self._maintain_once()
            except RemoteError as e:
                log.info("maintenance: %s", e)
            except Exception:
                log.exception("maintenance failed")

    def _maintain_once(self) -> None:
        if not self.leading():
            return
        if not self.state.volumes:
            self.ensure_configured()
        view = self.state.placement_view()
        alive = [sid for sid, info in view["servers"].items() if not info["dead"]]
        first_placement = (view["volumes"] and not any(view["sets"])
                           and len(alive) >= view["replicas"]
                           and self.liveness.since_registration() >= PLACEMENT_SETTLE_S)
        if first_placement and self.run(None, self.state.place_volumes):
            log.info("placed %d volumes on %d storage servers", view["volumes"], len(alive))
        for sid in alive:
            self.liveness.state(sid)  # starts the clock of one first seen now
        for sid in self.liveness.due_dead(alive):
            changed = self.run(None, self.state.mark_dead, sid, time.time_ns())
            log.warning("storage server %s: no heartbeat for %g s: declared dead, replaced in "
                        "%s replica sets", sid, self.config.down_after + self.config.dead_after,
                        changed)

    def ensure_configured(self, context: grpc.ServicerContext | None = None) -> None:
        c = self.config
        got = self.run(context, self.state.configure, c.volumes, c.replicas,
                       c.min_replicas)
        if got is not None and tuple(got) != (c.volumes, c.replicas, c.min_replicas):
            log.warning("the cluster was created with volumes=%d replicas=%d min_replicas=%d; "
                        "this master's flags (%d, %d, %d) are ignored", *got, c.volumes,
                        c.replicas, c.min_replicas)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.directory.close()
        with self._channels_lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
        self.raft.destroy_synchronous()

    # -- views ---------------------------------------------------------------------------------

    def replica_state(self, sid: str, servers: dict[str, Any], lag: int | None,
                      leading: bool, unknown: str = "unknown") -> str:
        """"dead", "down", "lagging" or "up"; `unknown` on a member that does not lead (it
        has no liveness)."""
        if servers.get(sid, {}).get("dead"):
            return "dead"
        if not leading:
            return unknown
        if self.liveness.state(sid) == "down":
            return "down"
        return "lagging" if lag else "up"

    def placement_message(self) -> pb.Placement:
        view = self.state.placement_view()
        leading = self.leading()
        volumes = []
        for vid, members in enumerate(view["sets"]):
            lags = self.liveness.vid_lags(vid, members) if leading else {}
            volumes.append(pb.VolumePlacement(vid=vid, replicas=[
                pb.Replica(id=sid, address=view["servers"][sid]["address"],
                           state=self.replica_state(sid, view["servers"], lags.get(sid),
                                                    leading, unknown="up"))
                for sid in members]))
        if not any(view["sets"]):
            volumes = []
        return pb.Placement(epoch=view["epoch"], volumes=view["volumes"],
                            replicas=view["replicas"], min_replicas=view["min_replicas"],
                            placement=volumes)

    def status(self, context: grpc.ServicerContext | None = None) -> dict[str, Any]:
        """This member's view of everything; the replicated parts through a barrier when a
        leader can commit one (else `"stale": true` and `"error"`)."""
        error = None
        try:
            self.read_barrier(context, STATUS_READ_TIMEOUT_S)
        except RemoteError as e:
            error = str(e)
        return self.local_status(error)

    def local_status(self, error: str | None = None) -> dict[str, Any]:
        """`status` from this member's state as it is, without a barrier (`error`: why it
        may be stale, None if it is known current). The metrics read this: a scrape must
        cost the raft log nothing."""
        raft = self.raft.view()
        leader = self.leader_peer(raft)
        leading = self.leading(raft)
        members = self._members_status(raft, leader, leading)
        view = self.state.placement_view()
        storage = self._storage_status(view, leading)
        volumes = [self._volume_status(vid, set_members, view, leading)
                   for vid, set_members in enumerate(view["sets"])]
        return {
            "leader": leader.grpc if leader else None,
            "leader_id": leader.id if leader else None,
            "term": raft.term,
            "self": self.config.id,
            "has_quorum": raft.has_quorum,
            "commit_index": raft.commit_index,
            "last_applied": raft.last_applied,
            "stale": error is not None,
            "error": error,
            "members": members,
            "volume_count": view["volumes"],
            "replicas": view["replicas"],
            "min_replicas": view["min_replicas"],
            "epoch": view["epoch"],
            "storage": storage,
            "volumes": volumes,
            "under_replicated": [v["vid"] for v in volumes if v["under_replicated"]],
            "lagging": [v["vid"] for v in volumes if v["lagging"]],
            "directory_entries": self.state.entry_count(),
            "nodes": self._nodes_status(leading),
        }

    def _nodes_status(self, leading: bool) -> list[dict[str, Any]]:
        """Each registered cachefs node: its record and, on the leader, its liveness."""
        nodes = []
        for name, info in sorted(self.state.nodes_view().items()):
            age = self.node_liveness.age(name) if leading else None
            nodes.append({"name": name, "peer_address": info["peer_address"],
                          "cache_bytes": info["cache_bytes"], "serving": info["serving"],
                          "state": ("unknown" if not leading
                                    else "up" if self.node_liveness.live(name) else "down"),
                          "last_seen_s": None if age is None else round(age, 3)})
        return nodes

    def live_nodes(self, serving: str = "") -> list[pb.Node]:
        """The nodes heard from within the node timeout (on the leader), by name; with
        `serving`, only those serving that DATASET@COMMIT."""
        nodes = []
        for name, info in sorted(self.state.nodes_view().items()):
            age = self.node_liveness.age(name)
            if age is None or age > self.node_liveness.timeout:
                continue
            if serving and serving not in info["serving"]:
                continue
            nodes.append(pb.Node(name=name, peer_address=info["peer_address"],
                                 cache_bytes=info["cache_bytes"], last_seen_s=round(age, 3),
                                 serving=info["serving"]))
        return nodes


    def _members_status(self, raft: RaftView, leader: Peer | None,
                        leading: bool) -> list[dict[str, Any]]:
        """Each member of the group: its addresses, its role as this member sees it, and
        whether this member's raft is connected to it."""
        members = []
        for peer in self.config.members:
            if peer.id == self.config.id:
                role = "leader" if leading else ("follower" if leader else "candidate")
                connected = True
            else:
                connected = raft.connected.get(peer.raft, False)
                role = ("leader" if leader is not None and peer.id == leader.id
                        else "follower" if connected else "unreachable")
            members.append({"id": peer.id, "grpc": peer.grpc, "raft": peer.raft,
                            "role": role, "connected": connected,
                            "self": peer.id == self.config.id})
        return members

    def _storage_status(self, view: dict[str, Any], leading: bool) -> list[dict[str, Any]]:
        """Each storage server: where it is, its liveness (known to the leader only) and the
        replica sets it is in."""
        storage = []
        for sid, info in sorted(view["servers"].items()):
            if info["dead"]:
                state = "dead"
            elif leading:
                state = self.liveness.state(sid)
            else:
                state = "unknown"
            age = self.liveness.age(sid) if leading else None
            storage.append({
                "id": sid, "address": info["address"], "zone": info["zone"],
                "capacity_bytes": info["capacity_bytes"],
                "free_bytes": self.liveness.free_bytes(sid) if leading else None,
                "state": state,
                "last_heartbeat_age_s": None if age is None else round(age, 3),
                "replica_of": sum(1 for s in view["sets"] if sid in s)})
        return storage

    def _volume_status(self, vid: int, set_members: list[str], view: dict[str, Any],
                       leading: bool) -> dict[str, Any]:
        """One volume: each replica's state, needles, lag and repair, and whether the volume
        is under-replicated or lagging."""
        lags = self.liveness.vid_lags(vid, set_members) if leading else {}
        replicas = []
        up = 0
        for sid in set_members:
            lag = lags.get(sid)
            state = self.replica_state(sid, view["servers"], lag, leading)
            up += state in ("up", "lagging")
            replicas.append({"id": sid, "address": view["servers"][sid]["address"],
                             "state": state,
                             "needles": self.liveness.count(sid, vid) if leading else None,
                             "lag": lag,
                             "repairing_from": self.liveness.inflight(sid, vid)
                             if leading else None})
        max_lag = max((r["lag"] or 0 for r in replicas), default=0)
        return {"vid": vid, "replicas": replicas,
                "under_replicated": (up < view["replicas"]) if leading
                else len(set_members) < view["replicas"],
                "lagging": max_lag > 0, "max_lag": max_lag}

class MasterService(pb_grpc.MasterServicer):
    """The Master gRPC service of one member."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self.state = master.state

    # -- storage membership ------------------------------------------------------------------

    @rpc
    def RegisterStorage(self, request: pb.RegisterStorageRequest,
                        context: grpc.ServicerContext) -> pb.RegisterStorageResponse:
        check_id(request.id)
        check_address(request.address, "address")
        if not ZONE_RE.fullmatch(request.zone):
            raise invalid(f"zone: {request.zone[:80]!r}: 0 to 64 of A-Z a-z 0-9 . _ -")
        if request.volumes < 1:
            raise invalid("volumes: the server's volume count is required")
        if not self.state.volumes:
            self.master.ensure_configured(context)
        refused = self.master.run(context, self.state.register_storage, request.id,
                                  request.address, request.zone or "default",
                                  request.capacity_bytes, request.volumes, time.time_ns())
        if refused:
            raise UsageError(refused)
        self.master.liveness.registered(request.id)
        log.info("storage server %s registered at %s (zone %s)", request.id, request.address,
                 request.zone or "default")
        return pb.RegisterStorageResponse(volumes=self.state.volumes,
                                          replicas=self.state.replicas)

    @rpc
    def Heartbeat(self, request: pb.HeartbeatRequest,
                  context: grpc.ServicerContext) -> pb.HeartbeatResponse:
        check_id(request.id)
        volumes = self.state.volumes
        for i, count in enumerate(request.counts):
            if volumes and count.vid >= volumes:
                raise invalid(f"counts[{i}].vid: {count.vid}, the cluster has {volumes} volumes")
        for i, done in enumerate(request.repaired):
            if volumes and done.vid >= volumes:
                raise invalid(f"repaired[{i}].vid: {done.vid}, the cluster has {volumes} "
                              "volumes")
        forwarded = self.master.forward("Heartbeat", request, context)
        if forwarded is not None:
            return forwarded
        if not self.master.leading():  # a forwarded call reached a member that lost the lead
            raise RemoteError(f"master {self.master.config.id}: not the raft leader (any "
                              "more): send the heartbeat again")
        view = self.state.placement_view()
        info = view["servers"].get(request.id)
        if info is None or info["dead"]:
            return pb.HeartbeatResponse(registered=False)
        repaired = [Done(d.vid, d.source, d.ok, d.error) for d in request.repaired]
        for done in repaired:
            if not done.ok:
                log.warning("storage server %s: repair of volume %d from %s failed: %s",
                            request.id, done.vid, done.source_id, done.error)
        vids = [vid for vid, members in enumerate(view["sets"]) if request.id in members]
        self.master.liveness.beat(request.id, request.free_bytes,
                                  {c.vid: c.needles for c in request.counts}, repaired)
        tasks = self.master.liveness.repairs(request.id, view["sets"])
        for task in tasks:
            log.info("storage server %s: repair volume %d from %s", request.id, task.vid,
                     task.source_id)
        return pb.HeartbeatResponse(
            registered=True, vids=vids, epoch=view["epoch"],
            repairs=[pb.RepairTask(vid=t.vid, source_id=t.source_id,
                                   source_address=view["servers"][t.source_id]["address"])
                     for t in tasks])

    @rpc
    def DeclareDead(self, request: pb.DeclareDeadRequest,
                    context: grpc.ServicerContext) -> pb.DeclareDeadResponse:
        check_id(request.id)
        replaced = self.master.run(context, self.state.mark_dead, request.id, time.time_ns())
        if replaced is None or replaced < 0:
            raise NotFound(f"storage server {request.id}: not registered")
        log.warning("storage server %s declared dead: replaced in %d replica sets", request.id,
                    replaced)
        return pb.DeclareDeadResponse(replaced=replaced)

    # -- placement -----------------------------------------------------------------------------

    @rpc
    def GetPlacement(self, request: pb.GetPlacementRequest,
                     context: grpc.ServicerContext) -> pb.Placement:
        forwarded = self.master.forward("GetPlacement", request, context)
        if forwarded is not None:
            return forwarded
        self.master.read_barrier(context)
        return self.master.placement_message()

    # -- object directory ----------------------------------------------------------------------

    @rpc
    def DirGet(self, request: pb.DirGetRequest,
               context: grpc.ServicerContext) -> pb.DirGetResponse:
        check_name(request.name, "name")
        self.master.read_barrier(context)
        value = self.state.entry(request.name)
        if value is None:
            return pb.DirGetResponse(found=False)
        return pb.DirGetResponse(found=True, entry=entry_message(request.name, value))

    @rpc
    def DirPut(self, request: pb.DirPutRequest,
               context: grpc.ServicerContext) -> pb.DirPutResponse:
        inline, needle, size = check_entry(request.entry)
        if request.only_if_last_under:
            if not request.if_absent:
                raise invalid("only_if_last_under: needs if_absent")
            if not request.entry.name.startswith(request.only_if_last_under):
                raise invalid("only_if_last_under: not a prefix of entry.name")
        created = self.master.dir_op(context, (
            "put", request.entry.name, inline, needle, size, time.time_ns(), request.if_absent,
            request.request_id, request.only_if_last_under))
        if request.if_absent:  # the compare-and-swap that refs are built on
            self.master.count("conditional_puts_created" if created
                              else "conditional_puts_refused")
        return pb.DirPutResponse(created=bool(created))

    @rpc
    def DirPutMany(self, request: pb.DirPutManyRequest,
                   context: grpc.ServicerContext) -> pb.DirPutManyResponse:
        if len(request.entries) > MAX_LIST_LIMIT:
            raise invalid(f"entries: {len(request.entries)}, at most {MAX_LIST_LIMIT} per call")
        items = []
        for i, entry in enumerate(request.entries):
            try:
                items.append((entry.name, *check_entry(entry)))
            except RpcAbort as e:
                raise invalid(f"entries[{i}]: {e}") from None
        count = self.master.run(context, self.state.dir_put_many, items, time.time_ns())
        return pb.DirPutManyResponse(count=int(count or 0))

    @rpc
    def DirDelete(self, request: pb.DirDeleteRequest,
                  context: grpc.ServicerContext) -> pb.DirDeleteResponse:
        check_name(request.name, "name")
        deleted = self.master.dir_op(context, ("delete", request.name))
        return pb.DirDeleteResponse(deleted=bool(deleted))

    @rpc
    def DirList(self, request: pb.DirListRequest,
                context: grpc.ServicerContext) -> pb.DirListResponse:
        check_name(request.prefix, "prefix", allow_empty=True)
        check_name(request.start_after, "start_after", allow_empty=True)
        if request.limit > MAX_LIST_LIMIT:
            raise invalid(f"limit: {request.limit}, at most {MAX_LIST_LIMIT}")
        self.master.read_barrier(context)
        entries, more = self.state.list_entries(request.prefix, request.start_after,
                                                request.limit or DEFAULT_LIST_LIMIT)
        return pb.DirListResponse(entries=[entry_message(n, v) for n, v in entries], more=more)

    # -- nodes ---------------------------------------------------------------------------------

    @rpc
    def RegisterNode(self, request: pb.RegisterNodeRequest,
                     context: grpc.ServicerContext) -> pb.RegisterNodeResponse:
        if not NODE_RE.fullmatch(request.name):
            raise invalid(f"name: {request.name[:80]!r}: 1 to 253 of A-Z a-z 0-9 . _ -")
        if request.peer_address:
            check_address(request.peer_address, "peer_address")
        if len(request.inventory_json) > MAX_INVENTORY_BYTES:
            raise invalid(f"inventory_json: {len(request.inventory_json)} bytes, at most "
                          f"{MAX_INVENTORY_BYTES}")
        if request.inventory_json:
            try:
                json.loads(request.inventory_json)
            except ValueError as e:
                raise invalid(f"inventory_json: not JSON: {e}") from None
        check_serving(request.serving)
        forwarded = self.master.forward("RegisterNode", request, context)
        if forwarded is not None:
            return forwarded
        if not self.master.leading():  # a forwarded call reached a member that lost the lead
            raise RemoteError(f"master {self.master.config.id}: not the raft leader (any "
                              "more): register again")
        serving = sorted(set(request.serving))
        record = self.state.nodes_view().get(request.name)
        wanted = {"peer_address": request.peer_address, "cache_bytes": request.cache_bytes,
                  "inventory_json": request.inventory_json, "serving": serving}
        if record is None or any(record.get(k) != v for k, v in wanted.items()):
            self.master.run(context, self.state.register_node, request.name,
                            request.peer_address, request.cache_bytes, request.inventory_json,
                            time.time_ns(), serving)
            log.info("node %s registered: peer %s, serving %s", request.name,
                     request.peer_address or "-", ", ".join(serving) or "nothing")
        self.master.node_liveness.beat(request.name)
        return pb.RegisterNodeResponse(timeout_s=self.master.node_liveness.timeout)

    @rpc
    def ListNodes(self, request: pb.ListNodesRequest,
                  context: grpc.ServicerContext) -> pb.ListNodesResponse:
        if request.serving:
            check_serving([request.serving], "serving")
        forwarded = self.master.forward("ListNodes", request, context)
        if forwarded is not None:
            return forwarded
        # No read barrier: liveness is the leader's soft state, not the log's, and mounts ask
        # every few seconds; an isolated leader steps down within leaderFallbackTimeout (5 s).
        if not self.master.leading():
            raise RemoteError(f"master {self.master.config.id}: not the raft leader (any "
                              "more): ask again")
        return pb.ListNodesResponse(nodes=self.master.live_nodes(request.serving),
                                    timeout_s=self.master.node_liveness.timeout)

    # -- status --------------------------------------------------------------------------------

    @rpc
    def Status(self, request: pb.StatusRequest,
               context: grpc.ServicerContext) -> pb.StatusResponse:
        try:
            forwarded = self.master.forward("Status", request, context)
        except RemoteError as e:
            log.info("status: answering locally: %s", e)
            forwarded = None
        if forwarded is not None:
            return forwarded
        return pb.StatusResponse(json=json.dumps(self.master.status(context)))


# -- serving ---------------------------------------------------------------------------------


def lock_data_dir(data_dir: Path) -> int:
    """Create the data directory and hold its lock: one master per directory."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        raise UsageError(f"--data-dir {data_dir}: another master is using it") from e
    return fd


def serve(config: MasterConfig, grace: float = 5.0,
          ready: Callable[[str], None] | None = None) -> None:
    """Run one member until SIGTERM or SIGINT, then stop accepting calls, let those in flight
    finish (up to `grace` s), and leave the raft group (journal closed). `ready(address)` is
    called once the member accepts calls."""
    host, _ = parse_listen(config.listen, "--listen")  # checked before raft starts, too
    check_listen(host, config.token)
    raft_host, _ = parse_listen(config.raft, "--raft")
    check_listen(raft_host, config.token, "--raft")
    lock_fd = lock_data_dir(config.data_dir)
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set())
                for signum in (signal.SIGTERM, signal.SIGINT)}
    master: Master | None = None
    server: grpc.Server | None = None
    endpoint: MetricsEndpoint | None = None
    try:
        master = Master(config)
        master.raft.wait_bound()
        metrics = MasterMetrics(master) if config.metrics_listen else None
        server, address = listening_server(config.listen, config.token, WORKERS, "master",
                                           GRPC_OPTIONS,
                                           observers=[metrics.grpc] if metrics else ())
        pb_grpc.add_MasterServicer_to_server(MasterService(master), server)
        if metrics is not None:
            endpoint = serve_metrics(config.metrics_listen, metrics.registry)
        server.start()
        master.start()
        if config.token is None:
            log.warning("no token (--token-file or CACHEFS_TOKEN): serving without "
                        "authentication, on loopback only")
        log.info("master %s serving on %s, raft on %s", config.id, address, config.raft)
        if ready is not None:
            ready(address)
        stop.wait()
        log.info("stopping: finishing the calls in flight")
        server.stop(grace=grace).wait()
    finally:
        if endpoint is not None:
            endpoint.stop()
        if server is not None:
            server.stop(grace=None)
        if master is not None:
            master.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(lock_fd)
