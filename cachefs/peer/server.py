"""The peer server: one node's shared SSD cache directory, served to the cluster (proto/peer.proto).

`cachefs peer serve --cache-dir DIR --listen HOST:PORT` runs `serve`. A `GetChunk` is answered
from the node's SSD cache (the directory every mount of the node shares, `cachefs/cache/disk.py`)
or, on a miss, fetched from the origin once for every asker of this node: concurrent requests
for one chunk share one fetch (`_Flights`), the chunk is verified against its name, stored in
the cache (so the node's own mounts find it there too) and served. So a chunk's owner on the
ring (`cachefs/peer/ring.py`) is the one node that reads it from the origin for everyone.

The trust boundary: a request names the remote by the name configured on *this* node (its
`config.toml`, or the `--remote` names it was started with) and never carries a URL, so the
node's credentials only ever reach the origins its own operator configured; a name it does not
serve is PERMISSION_DENIED. The dataset a chunk is read for is checked against `--dataset` (any
dataset when none is given). Every request is checked in full first (a hash is 64 lowercase hex
characters; names follow cachefs's rules); with a token, `cachefs.grpc_auth.TokenInterceptor`
guards every call; without one the server listens on loopback only. It serves named chunks only,
never a path.

With `--metrics-listen ADDR` it serves Prometheus metrics at http://ADDR/metrics
(`cachefs.metrics`): the counters its Status reports, as `cachefs_peer_*` (PEER_METRICS), its
draining state and cache size, and its RPCs by method and status code with their latency
(`cachefs_peer_rpcs_total`, `cachefs_peer_rpc_seconds`; calls refused for a wrong or missing
token are those with code UNAUTHENTICATED). Quarantines are decided by the mounts (a mount skips
a member that served it a corrupt chunk), so they are the mounts' metrics
(`cachefs_mount_quarantined_peers`), not the server's.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from cachefs import names
from cachefs.cache.base import Blob
from cachefs.cache.disk import DiskCache
from cachefs.dataset.objects import hash_bytes
from cachefs.dataset.repo import chunk_key
from cachefs.errors import (
    CachefsError,
    CorruptObject,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
)
from cachefs.grpc_auth import listening_server, serve_until_signalled
from cachefs.grpc_errors import invalid, rpc
from cachefs.metrics import (
    GrpcMetrics,
    StatsCollector,
    new_registry,
    serve_metrics,
)
from cachefs.peer.proto import peer_pb2 as pb
from cachefs.peer.proto import peer_pb2_grpc as pb_grpc
from cachefs.peer.protocol import MAX_HASHES_PER_CALL, MAX_MESSAGE_BYTES
from cachefs.remotes.base import Remote
from cachefs.remotes.registry import open_remote_url

log = logging.getLogger("cachefs.peer.server")

WORKERS = 32
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing it
]
_HASH_RE = re.compile(r"[0-9a-f]{64}")

# The server's counters (`PeerService.counters`, what Status reports) as Prometheus metrics:
# (counter key, metric name after ``cachefs_peer_`` and before ``_total``, help text).
PEER_METRICS: tuple[tuple[str, str, str], ...] = (
    ("get_requests", "get_chunk_requests",
     "GetChunk calls accepted (checked, not draining), answered from the cache or the origin"),
    ("served_from_cache", "chunks_served_from_cache",
     "chunks sent to askers straight from this node's SSD cache"),
    ("served_from_origin", "chunks_served_from_origin",
     "chunks sent to askers after a fetch from the origin on their behalf (this call's or a "
     "concurrent one's for the same chunk)"),
    ("served_bytes", "served_bytes", "bytes of chunks sent to askers"),
    ("origin_fetches", "origin_fetches",
     "chunks fetched from the origin on behalf of askers (one fetch for concurrent askers)"),
    ("origin_bytes", "origin_bytes", "bytes fetched from the origin on behalf of askers"),
    ("origin_errors", "origin_errors",
     "origin fetches on behalf of askers that failed or returned corrupt bytes"),
    ("not_found", "chunks_not_found",
     "chunks asked for that were not there (not cached, with cached_only; or not at the origin)"),
    ("refused", "refused",
     "GetChunk calls refused for naming a remote this node does not serve or a dataset outside "
     "--datasets (PERMISSION_DENIED); wrong or missing tokens: cachefs_peer_rpcs_total"
     "{code=\"UNAUTHENTICATED\"}"),
    ("refused_draining", "refused_draining",
     "chunk requests refused because the server was draining (UNAVAILABLE)"),
    ("has_requests", "has_chunks_requests", "HasChunks calls answered"),
)
PEER_GAUGES = {
    "draining": "1 while the server drains (out of the rings, refusing chunk requests)",
    "uptime_seconds": "seconds since the server started",
    "cache_used_bytes": "bytes used in the node's SSD cache directory (every process sharing it)",
    "cache_capacity_bytes": "capacity of the node's SSD cache, in bytes",
}


def check_hash(value: str, field: str) -> str:
    if not isinstance(value, str) or not _HASH_RE.fullmatch(value):
        raise invalid(f"{field}: {value[:80]!r} is not a chunk name (64 lowercase hex characters)")
    return value


class _Flights:
    """One origin fetch per chunk at a time, shared by every request for it (threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Future[tuple[bytes, bool]]] = {}

    def run(self, key: str, fetch: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(bytes, whether this call fetched them) from `fetch`, or from the call in flight."""
        with self._lock:
            running = self._running.get(key)
            leader = running is None
            if leader:
                running = self._running[key] = Future()
        assert running is not None
        if not leader:
            data, _ = running.result()
            return data, False
        try:
            data = fetch()
        except BaseException as e:
            running.set_exception(e)
            raise
        else:
            running.set_result((data, True))
            return data, True
        finally:
            with self._lock:
                del self._running[key]


class PeerService(pb_grpc.PeerServicer):
    """The Peer service over a node's SSD cache and its configured remotes.

    `remotes`: name -> URL of the remotes this node fetches from for others; `datasets`:
    glob patterns of the datasets it serves (empty: every dataset); `address`: the address the
    other members know this node by (reported by Status)."""

    def __init__(self, cache: DiskCache, remotes: dict[str, str], datasets: Sequence[str] = (),
                 address: str = "", opener: Callable[[str], Remote] = open_remote_url) -> None:
        self.cache = cache
        self.remotes = dict(remotes)
        self.datasets = list(datasets)
        self.address = address
        self._opener = opener
        self._opened: dict[str, Remote] = {}
        self._open_lock = threading.Lock()
        self._flights = _Flights()
        self._started = time.time()
        # Draining: out of every ring while still up (Drain, or SIGTERM before stopping).
        self.draining = threading.Event()
        self._counters_lock = threading.Lock()
        self.counters = {
            "get_requests": 0, "served_from_cache": 0, "served_from_origin": 0,
            "served_bytes": 0, "origin_fetches": 0, "origin_bytes": 0, "origin_errors": 0,
            "not_found": 0, "refused": 0, "has_requests": 0, "refused_draining": 0,
        }

    def _count(self, **deltas: int) -> None:
        with self._counters_lock:
            for name, delta in deltas.items():
                self.counters[name] += delta

    # -- checks -------------------------------------------------------------------------------
    def _check_request(self, remote: str, dataset: str) -> None:
        try:
            names.check_name(remote, "remote")
            names.check_name(dataset, "dataset", existing=True)
        except CachefsError as e:
            raise invalid(str(e)) from e
        if remote not in self.remotes:
            self._count(refused=1)
            raise PermissionDenied(f"remote {remote!r} is not served by peer {self.address}: "
                                   "a peer fetches only from remotes configured on its node")
        if self.datasets and not any(fnmatch.fnmatchcase(dataset, p) for p in self.datasets):
            self._count(refused=1)
            raise PermissionDenied(f"dataset {dataset!r} is not served by peer {self.address}")

    def _remote(self, name: str) -> Remote:
        with self._open_lock:
            remote = self._opened.get(name)
            if remote is None:
                remote = self._opened[name] = self._opener(self.remotes[name])
            return remote

    # -- the service --------------------------------------------------------------------------
    @rpc
    def GetChunk(self, request: pb.GetChunkRequest,
                 context: grpc.ServicerContext) -> pb.GetChunkResponse:
        name = check_hash(request.hash, "hash")
        self._check_request(request.remote, request.dataset)
        self._check_serving()
        self._count(get_requests=1)
        key = chunk_key(name)
        data = self.cache.get(key)
        if data is not None:
            self._count(served_from_cache=1, served_bytes=len(data))
            return pb.GetChunkResponse(data=bytes(data), from_origin=False)  # a view, maybe
        if request.cached_only:
            self._count(not_found=1)
            raise ObjectNotFound(f"chunk {name} is not cached on peer {self.address}")
        data, fetched = self._flights.run(key, lambda: self._fetch(request.remote, key, name))
        self._count(served_from_origin=1, served_bytes=len(data))
        return pb.GetChunkResponse(data=bytes(data), from_origin=fetched)

    def _fetch(self, remote_name: str, key: str, name: str) -> Blob:
        # Another request may have stored it between our cache miss and our turn.
        data = self.cache.get(key)
        if data is not None:
            return data
        try:
            data = self._remote(remote_name).get(key)
        except ObjectNotFound:
            self._count(not_found=1)
            raise
        except CachefsError:
            self._count(origin_errors=1)
            raise
        self._count(origin_fetches=1, origin_bytes=len(data))
        if hash_bytes(data) != name:
            self._count(origin_errors=1)
            log.error("remote %s returned corrupt bytes for chunk %s", remote_name, name)
            raise CorruptObject(f"the origin of remote {remote_name!r} returned corrupt bytes "
                                f"for chunk {name}")
        self.cache.put(key, data)
        return data

    @rpc
    def HasChunks(self, request: pb.HasChunksRequest,
                  context: grpc.ServicerContext) -> pb.HasChunksResponse:
        if len(request.hashes) > MAX_HASHES_PER_CALL:
            raise invalid(f"hashes: {len(request.hashes)} entries, at most "
                          f"{MAX_HASHES_PER_CALL} per call")
        hashes = [check_hash(h, f"hashes[{i}]") for i, h in enumerate(request.hashes)]
        self._check_serving()
        self._count(has_requests=1)
        return pb.HasChunksResponse(present=[self.cache.contains(chunk_key(h)) for h in hashes])

    @rpc
    def Status(self, request: pb.StatusRequest,
               context: grpc.ServicerContext) -> pb.StatusResponse:
        return pb.StatusResponse(json=json.dumps(self.status()))

    @rpc
    def Drain(self, request: pb.DrainRequest,
              context: grpc.ServicerContext) -> pb.DrainResponse:
        if request.resume:
            self.resume()
        else:
            self.drain()
        return pb.DrainResponse(draining=self.draining.is_set())

    def drain(self) -> None:
        """Leave the rings without stopping: chunk requests are refused at once (UNAVAILABLE:
        the asker turns to the chunk's next member, and counts this one down), Status says
        draining (probers keep it out); calls already running finish."""
        if not self.draining.is_set():
            self.draining.set()
            log.info("peer server %s draining: refusing chunk requests", self.address)

    def resume(self) -> None:
        if self.draining.is_set():
            self.draining.clear()
            log.info("peer server %s serving again", self.address)

    def _check_serving(self) -> None:
        if self.draining.is_set():
            self._count(refused_draining=1)
            raise RemoteError(f"peer {self.address} is draining: ask the chunk's next member")

    def metric_figures(self) -> dict[str, object]:
        """The figures of the server's metrics (PEER_METRICS, PEER_GAUGES), read at a scrape."""
        with self._counters_lock:
            counters = dict(self.counters)
        disk = self.cache.stats()
        return {
            **{name: counters[key] for key, name, _ in PEER_METRICS},
            "draining": self.draining.is_set(),
            "uptime_seconds": time.time() - self._started,
            "cache_used_bytes": disk.used_bytes,
            "cache_capacity_bytes": disk.capacity_bytes,
        }

    def status(self) -> dict[str, Any]:
        """The document `Status` returns (docs/design.md, "peer status")."""
        with self._counters_lock:
            counters = dict(self.counters)
        disk = self.cache.stats()
        return {
            "address": self.address,
            "draining": self.draining.is_set(),
            "uptime_s": round(time.time() - self._started, 1),
            "remotes": sorted(self.remotes),
            "datasets": self.datasets or ["*"],
            "cache": {"dir": str(self.cache.directory), "bytes_used": disk.used_bytes,
                      "capacity_bytes": disk.capacity_bytes},
            **counters,
        }


def metrics_registry(service: PeerService) -> tuple[CollectorRegistry, GrpcMetrics]:
    """The server's metrics (its figures, read at each scrape) and the interceptor that counts
    its RPCs into them."""
    registry = new_registry()
    registry.register(StatsCollector(
        "cachefs_peer_", service.metric_figures,
        counters=[name for _, name, _ in PEER_METRICS],
        help_text={**{name: text for _, name, text in PEER_METRICS}, **PEER_GAUGES}))
    return registry, GrpcMetrics(registry, "cachefs_peer")


def build_server(service: PeerService, listen: str, token: str | None,
                 observers: Sequence[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, str]:
    """A server (not started) bound to `listen`, and the address it bound (the real port when
    `listen` asks for port 0). Refuses a non-loopback address without a token. `observers`
    (GrpcMetrics) see every call, those refused for their token included."""
    server, address = listening_server(listen, token, WORKERS, "peer", GRPC_OPTIONS,
                                       observers=observers)
    pb_grpc.add_PeerServicer_to_server(service, server)
    return server, address


def serve(service: PeerService, listen: str, token: str | None, grace: float = 10.0,
          ready: Callable[[str], None] | None = None, drain_s: float = 2.0,
          metrics_listen: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT; then drain for `drain_s` seconds (chunk requests refused
    at once, Status "draining": askers and probers take the member out of their rings, and a
    Kubernetes readiness probe fails) and let calls in flight finish (up to `grace` seconds).
    `ready(address)` is called once the server accepts calls. With `metrics_listen`, metrics
    are served at http://METRICS_LISTEN/metrics until the server stops."""
    registry, rpcs = metrics_registry(service)
    endpoint = serve_metrics(metrics_listen, registry)
    try:
        server, address = build_server(service, listen, token,
                                       observers=[rpcs] if metrics_listen else ())
        if not service.address:
            service.address = address
        remotes = ", ".join(sorted(service.remotes)) or "none"

        def stopping() -> None:
            service.drain()
            time.sleep(drain_s)

        serve_until_signalled(server, address, token,
                              f"peer server of {service.cache.directory} (advertised as "
                              f"{service.address}, remotes: {remotes})", ready, grace,
                              stopping=stopping)
    finally:
        if endpoint is not None:
            endpoint.stop()

