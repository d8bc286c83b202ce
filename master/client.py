"""`MasterClient`: the master group's gRPC API as Python calls that raise cachefs errors.

    client = MasterClient(["10.0.0.1:7700", "10.0.0.2:7700", "10.0.0.3:7700"], token)
    client.dir_put(DirEntry("refs/x", inline=b"..."), if_absent=True) -> bool (created)
    client.dir_get("refs/x") -> DirEntry | None
    client.dir_delete("refs/x") -> bool;  client.dir_list("refs/") -> iterator of DirEntry
    client.placement() -> Placement (cachefs.contracts: epoch, volumes, R, vids[vid])
    client.register_storage(...), heartbeat(...), declare_dead(id)
    client.register_node(name, peer_address, ...) -> float (the node timeout; also the heartbeat)
    client.list_nodes(serving="") -> list[NodeInfo] (the live cachefs nodes)
    client.status() -> dict (the JSON of `cachefs master status --json`)

Every member answers every call (followers forward to the leader), so the client sends each
call to the master that answered last (or to the leader, when a follower's answer names it)
and, when a master is unreachable or answers UNAVAILABLE (no leader, no quorum) or runs past
the per-attempt timeout, tries the next, going round with growing pauses until `timeout`
seconds have passed since the call began; then it
raises the last RemoteError. Other failures raise at once: UNAUTHENTICATED -> PermissionDenied,
INVALID_ARGUMENT -> UsageError, NOT_FOUND -> ObjectNotFound (`cachefs.grpc_errors`).

A retried write may have been applied by its first attempt: every write is idempotent (an
if-absent put carries a request id, the same on every retry, so the retry of a create that was
applied still reports created and nobody else's call does; a delete retried after it applied
reports False).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import grpc

from cachefs.contracts import Placement
from cachefs.errors import RemoteError, UsageError
from cachefs.grpc_auth import bearer_metadata
from cachefs.grpc_errors import error_from_rpc
from master.proto import master_pb2 as pb
from master.proto import master_pb2_grpc as pb_grpc

RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
ATTEMPT_TIMEOUT_S = 12.0  # one master's answer; above the masters' commit timeout (5 s)
MAX_PAUSE_S = 1.0
MIN_ATTEMPT_S = 0.3
SCHEME = "haystack://"
# Trailing metadata a follower sets (master/server.py): the leader's gRPC address, so that a
# client that reached a follower sends its next calls to the leader (one hop less).
LEADER_HINT = "x-cachefs-leader"


def parse_masters(addresses: str | Sequence[str]) -> list[str]:
    """``haystack://a:1,b:2`` or ``a:1,b:2`` or a list of those -> ["a:1", "b:2"]."""
    items = [addresses] if isinstance(addresses, str) else list(addresses)
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item.startswith(SCHEME):
            item = item[len(SCHEME):]
        item = item.split("/", 1)[0].split("?", 1)[0]
        for address in filter(None, (a.strip() for a in item.split(","))):
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdecimal():
                raise UsageError(f"master address {address!r}: expected HOST:PORT")
            if address not in out:
                out.append(address)
    if not out:
        raise UsageError("no master address given (HOST:PORT[,HOST:PORT...])")
    return out


@dataclass(frozen=True)
class DirEntry:
    """A directory entry: an inline value (at most 4 KiB) or a needle's 32-byte key."""

    name: str
    inline: bytes | None = None
    needle: bytes | None = None
    size: int = 0
    mtime_ns: int = 0  # set by the master

    def message(self) -> pb.DirEntry:
        if (self.inline is None) == (self.needle is None):
            raise UsageError(f"directory entry {self.name!r}: give inline or needle, not both")
        if self.inline is not None:
            return pb.DirEntry(name=self.name, inline=self.inline, has_inline=True,
                               size=len(self.inline))
        return pb.DirEntry(name=self.name, needle=self.needle, size=self.size)

    @classmethod
    def of(cls, message: pb.DirEntry) -> DirEntry:
        if message.has_inline:
            return cls(message.name, inline=bytes(message.inline), size=message.size,
                       mtime_ns=message.mtime_ns)
        return cls(message.name, needle=bytes(message.needle), size=message.size,
                   mtime_ns=message.mtime_ns)


@dataclass(frozen=True)
class RepairTask:
    vid: int
    source_id: str
    source_address: str


@dataclass(frozen=True)
class RepairDone:
    vid: int
    source_id: str
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class HeartbeatAnswer:
    registered: bool
    repairs: tuple[RepairTask, ...]
    vids: tuple[int, ...]
    epoch: int


@dataclass(frozen=True)
class NodeInfo:
    """A live cachefs node of the registry (ListNodes)."""

    name: str
    peer_address: str
    cache_bytes: int
    last_seen_s: float
    serving: tuple[str, ...]


class MasterClient:
    """Channels to every master; see the module docstring for the retry rule."""

    def __init__(self, addresses: str | Sequence[str], token: str | None = None,
                 timeout: float = 30.0, attempt_timeout: float = ATTEMPT_TIMEOUT_S) -> None:
        self.addresses = parse_masters(addresses)
        self.timeout = timeout
        self.attempt_timeout = attempt_timeout
        self._metadata = bearer_metadata(token)
        self._channels = [grpc.insecure_channel(a) for a in self.addresses]
        self._stubs = [pb_grpc.MasterStub(c) for c in self._channels]
        self._current = 0

    @property
    def current(self) -> str:
        """The master that answered last."""
        return self.addresses[self._current]

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        total = timeout or self.timeout
        deadline = time.monotonic() + total
        pause = 0.05
        errors: dict[str, grpc.Call] = {}  # each master's last retryable failure
        while True:
            start = self._current
            for step in range(len(self._stubs)):
                i = (start + step) % len(self._stubs)
                remaining = deadline - time.monotonic()
                if remaining <= MIN_ATTEMPT_S and errors:
                    break  # too short for an answer: report the ones we have
                try:
                    response, call = getattr(self._stubs[i], method).with_call(
                        request, timeout=min(remaining, self.attempt_timeout),
                        metadata=self._metadata)
                except grpc.RpcError as e:
                    if not isinstance(e, grpc.Call) or e.code() not in RETRIED:
                        raise error_from_rpc(e, f"master {self.addresses[i]} {method}") \
                            from None
                    # keep a master's own explanation over a deadline cut short by ours
                    earlier = errors.get(self.addresses[i])
                    if earlier is None or e.code() == grpc.StatusCode.UNAVAILABLE or \
                            earlier.code() != grpc.StatusCode.UNAVAILABLE:
                        errors[self.addresses[i]] = e
                    continue
                self._current = self._leader_hinted(call, i)
                return response
            remaining = deadline - time.monotonic()
            if remaining <= MIN_ATTEMPT_S:
                raise self._failure(method, total, errors)
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, MAX_PAUSE_S)

    def _leader_hinted(self, call: grpc.Call, answered: int) -> int:
        """The master to send the next call to: the leader a follower named, if known."""
        for key, value in call.trailing_metadata() or ():
            if key == LEADER_HINT and value in self.addresses:
                return self.addresses.index(value)
        return answered

    def _failure(self, method: str, total: float, errors: dict[str, grpc.Call]) -> RemoteError:
        """RemoteError naming what each master answered last."""
        if not errors:
            return RemoteError(f"masters {','.join(self.addresses)} {method}: no answer within "
                               f"{total:g} s")
        reasons = "; ".join(f"{address}: {e.code().name}: {e.details()}"
                            for address, e in errors.items())
        return RemoteError(f"masters {method}: none could serve the call within {total:g} s "
                           f"({reasons})")

    # -- storage membership ----------------------------------------------------------------

    def register_storage(self, server_id: str, address: str, zone: str = "",
                         capacity_bytes: int = 0, volumes: int = 0) -> tuple[int, int]:
        """Announce a storage server; the cluster's (volumes, replicas)."""
        response = self._call("RegisterStorage", pb.RegisterStorageRequest(
            id=server_id, address=address, zone=zone, capacity_bytes=capacity_bytes,
            volumes=volumes))
        return response.volumes, response.replicas

    def heartbeat(self, server_id: str, free_bytes: int = 0,
                  counts: Mapping[int, int] | None = None,
                  repaired: Sequence[RepairDone] = (),
                  timeout: float | None = None) -> HeartbeatAnswer:
        request = pb.HeartbeatRequest(
            id=server_id, free_bytes=free_bytes,
            counts=[pb.VolumeCount(vid=v, needles=n) for v, n in sorted((counts or {}).items())],
            repaired=[pb.RepairDone(vid=d.vid, source=d.source_id, ok=d.ok, error=d.error)
                      for d in repaired])
        response = self._call("Heartbeat", request, timeout)
        return HeartbeatAnswer(
            registered=response.registered,
            repairs=tuple(RepairTask(t.vid, t.source_id, t.source_address)
                          for t in response.repairs),
            vids=tuple(response.vids), epoch=response.epoch)

    def declare_dead(self, server_id: str) -> int:
        """Declare a storage server dead; the number of replica sets changed."""
        return self._call("DeclareDead", pb.DeclareDeadRequest(id=server_id)).replaced

    def placement(self) -> Placement:
        response = self._call("GetPlacement", pb.GetPlacementRequest())
        return Placement.from_message(response)

    # -- object directory ------------------------------------------------------------------

    def dir_get(self, name: str) -> DirEntry | None:
        response = self._call("DirGet", pb.DirGetRequest(name=name))
        return DirEntry.of(response.entry) if response.found else None

    def dir_put(self, entry: DirEntry, if_absent: bool = False, last_under: str = "") -> bool:
        """Set an entry; with `if_absent`, False when the name exists (or, with `last_under`,
        when a name with that prefix sorts after it)."""
        return self._call("DirPut", pb.DirPutRequest(
            entry=entry.message(), if_absent=if_absent, request_id=os.urandom(16).hex(),
            only_if_last_under=last_under)).created

    def dir_put_many(self, entries: Sequence[DirEntry]) -> int:
        """Set many entries in one raft command (overwriting); pages of 10,000."""
        count = 0
        for i in range(0, len(entries), 10_000):
            page = [e.message() for e in entries[i:i + 10_000]]
            count += self._call("DirPutMany", pb.DirPutManyRequest(entries=page)).count
        return count

    def dir_delete(self, name: str) -> bool:
        return self._call("DirDelete", pb.DirDeleteRequest(name=name)).deleted

    def dir_list_page(self, prefix: str = "", start_after: str = "",
                      limit: int = 0) -> tuple[list[DirEntry], bool]:
        """One page of the names starting with `prefix` after `start_after`, and whether
        more follow."""
        response = self._call("DirList", pb.DirListRequest(prefix=prefix,
                                                           start_after=start_after,
                                                           limit=limit))
        return [DirEntry.of(e) for e in response.entries], response.more

    def dir_list(self, prefix: str = "", start_after: str = "",
                 page: int = 0) -> Iterator[DirEntry]:
        """Every entry whose name starts with `prefix`, in name order, a page at a time."""
        while True:
            entries, more = self.dir_list_page(prefix, start_after, page)
            yield from entries
            if not more or not entries:
                return
            start_after = entries[-1].name

    # -- nodes and status --------------------------------------------------------------------

    def register_node(self, name: str, peer_address: str = "", cache_bytes: int = 0,
                      inventory_json: str = "", serving: Sequence[str] = (),
                      timeout: float | None = None) -> float:
        """Register a cachefs node, or heartbeat it (the same call every few seconds); the
        seconds of silence after which the masters drop it from the node list."""
        return self._call("RegisterNode", pb.RegisterNodeRequest(
            name=name, peer_address=peer_address, cache_bytes=cache_bytes,
            inventory_json=inventory_json, serving=list(serving)), timeout).timeout_s

    def list_nodes(self, serving: str = "", timeout: float | None = None) -> list[NodeInfo]:
        """The live cachefs nodes, by name (with `serving`, those serving that
        DATASET@COMMIT)."""
        response = self._call("ListNodes", pb.ListNodesRequest(serving=serving), timeout)
        return [NodeInfo(n.name, n.peer_address, n.cache_bytes, n.last_seen_s,
                         tuple(n.serving)) for n in response.nodes]

    def status(self) -> dict[str, Any]:
        """The leader's view (a follower forwards), or, with no leader, the first reachable
        member's view with ``"leader": None``."""
        return json.loads(self._call("Status", pb.StatusRequest()).json)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
