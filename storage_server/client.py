"""The storage servers' client side: one server (`StorageClient`) and the replicated data path
of a haystack cluster over the servers a placement names (`ReplicatedStorage`).

`StorageClient`: one storage server's gRPC API as Python calls that raise cachefs errors.

    client = StorageClient("10.0.0.5:8700", token=load_token(None))
    client.put_many([(key, data), ...])      # durable on return
    client.get(key, start=0, length=None)    # ObjectNotFound, CorruptObject, UsageError
    client.has_many(keys) -> [bool, ...]
    client.delete(key) -> bool
    client.list_keys(vid, start_after=None, limit=1000) -> (keys, more); iter_keys(vid)
    client.stat() / compact(vid=None) / verify(vid=None) -> dict

A failed call raises the cachefs exception of its status (`cachefs.grpc_errors`):
UNAUTHENTICATED -> PermissionDenied, NOT_FOUND -> ObjectNotFound, DATA_LOSS -> CorruptObject,
INVALID_ARGUMENT -> UsageError, UNAVAILABLE and DEADLINE_EXCEEDED -> RemoteError.

`ReplicatedStorage`: put, get, has, delete and list over the storage servers that a placement
names. A key lives in logical volume `vid = cachefs.contracts.volume_of(key, N)` (key mod N),
and the placement (`cachefs.contracts.Placement`, from the master) maps each vid to its
replicas, each with a state: "up", "lagging" (up, being repaired), "down" (missed heartbeats) or
"dead" (declared; being replaced).

- **Writes** go, per vid, to every replica that is "up" or "lagging", in parallel, in batches of
  about `PUT_BATCH_BYTES` (`put_batches`). "down" replicas are skipped, not tried with a short
  timeout: a down server costs a write nothing, and repair (`storage_server.repair`) copies what
  it missed when it is back. A write returns once, for every needle, at least `min_replicas`
  replicas (0 means every writable replica; never fewer than 1) acknowledged it; a storage server
  acknowledges only after fsync. Slower replicas keep writing in the background (their failures
  are logged).
- **Reads** go to one replica: "up" ones first, then "lagging", then "down", and among equals a
  stable hash of the key picks the first, so load spreads over the replicas. A replica that
  answers not found, corrupt, or nothing at all is a fallback to the next. A whole read
  (`start=0`, no length) is also checked against its name (BLAKE3) here; a mismatch counts as
  a corrupt copy.
- **Deletes** go to every replica that is not "dead" and are best effort across them: a replica
  that is down keeps the needle, and repair (which only adds) may copy it back to the others.
  That is harmless because gc is the only deleter and deletes only what nothing refers to.
- **Listing** reads each vid's keys from one reachable replica (falling back mid-listing) and
  merges the vids in key order. A lagging replica may list fewer keys than the cluster holds.

The placement is cached. When an operation fails as a whole (a read found nothing, a write
lacks acknowledgements, a vid had no reachable replica), it asks `placement_source` once for a
fresh one and retries with it; such refreshes happen at most every `REFRESH_INTERVAL` seconds,
and concurrent failures share one.
"""

from __future__ import annotations

import heapq
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Self

import blake3
import grpc

from cachefs.contracts import WRITABLE_STATES, Placement, ReplicaInfo, check_key
from cachefs.errors import (
    CachefsError,
    CorruptObject,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    UsageError,
)
from cachefs.grpc_auth import bearer_metadata
from cachefs.grpc_errors import error_from_rpc
from storage_server import wire
from storage_server.proto import storage_pb2 as pb
from storage_server.proto import storage_pb2_grpc as pb_grpc
from storage_server.protocol import (
    DEFAULT_LIST_LIMIT,
    MAX_KEYS_PER_CALL,
    MAX_MESSAGE_BYTES,
    MAX_NEEDLE_BYTES,
    SERVICE,
)

PUT_BATCH_BYTES = MAX_NEEDLE_BYTES  # put_many splits bigger batches into calls of about this
ADMIN_TIMEOUT = 3600.0  # compact and verify read whole volumes


def put_batches(items: Iterable[tuple[bytes, bytes]]) -> Iterator[list[tuple[bytes, bytes]]]:
    """Split needles into Put calls of about PUT_BATCH_BYTES (a bigger needle goes alone)."""
    batch: list[tuple[bytes, bytes]] = []
    size = 0
    for key, data in items:
        if batch and (size + len(data) > PUT_BATCH_BYTES or len(batch) >= MAX_KEYS_PER_CALL):
            yield batch
            batch, size = [], 0
        batch.append((key, data))
        size += len(data)
    if batch:
        yield batch


class StorageClient:
    """A channel to one storage server; `timeout` bounds each call (seconds)."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 60.0,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        """`options`: extra gRPC channel arguments (e.g. reconnect backoff), after the defaults."""
        self.address = address
        self.timeout = timeout
        self._metadata = bearer_metadata(token)
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *options,
        ])
        self._stub = pb_grpc.StorageStub(self._channel)
        # The bulk calls through `storage_server.wire` instead of the generated stub's
        # (de)serializers: Put takes a request already encoded, Get answers the data itself.
        self._bulk = {
            "Put": self._channel.unary_unary(
                f"/{SERVICE}/Put", request_serializer=None,
                response_deserializer=pb.PutResponse.FromString),
            "Get": self._channel.unary_unary(
                f"/{SERVICE}/Get", request_serializer=pb.GetRequest.SerializeToString,
                response_deserializer=wire.decode_get_response),
        }

    def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        try:
            call = self._bulk.get(method) or getattr(self._stub, method)
            return call(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"storage {self.address} {method}") from None

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> int:
        """Store needles durably; returns the bytes newly written. Big batches go as several
        calls (each durable when it returns; needles are idempotent)."""
        return sum(self.put_encoded(wire.encode_put_request(batch))
                   for batch in put_batches(items))

    def put_encoded(self, request: bytes) -> int:
        """Send a PutRequest already serialized by `wire.encode_put_request` (so that one
        encoding serves every replica it goes to); returns the bytes newly written."""
        return int(self._call("Put", request).bytes_written)

    def put(self, key: bytes, data: bytes) -> int:
        return self.put_many([(key, data)])

    def get(self, key: bytes, start: int = 0, length: int | None = None) -> bytes:
        request = pb.GetRequest(key=key, offset=start, length=length or 0,
                                has_length=length is not None)
        return self._call("Get", request)

    def has_many(self, keys: Sequence[bytes]) -> list[bool]:
        present: list[bool] = []
        for i in range(0, len(keys), MAX_KEYS_PER_CALL):
            page = list(keys[i:i + MAX_KEYS_PER_CALL])
            present.extend(self._call("Has", pb.HasRequest(keys=page)).present)
        return present

    def delete(self, key: bytes) -> bool:
        return self._call("Delete", pb.DeleteRequest(key=key)).deleted

    def list_keys(self, vid: int, start_after: bytes | None = None,
                  limit: int = DEFAULT_LIST_LIMIT) -> tuple[list[bytes], bool]:
        """One page of a volume's keys and whether more follow the last one."""
        response = self._call("ListKeys", pb.ListKeysRequest(
            vid=vid, start_after=start_after or b"", limit=limit))
        return list(response.keys), response.more

    def iter_keys(self, vid: int, page: int = DEFAULT_LIST_LIMIT) -> Iterator[list[bytes]]:
        """Every key of a volume, a page at a time."""
        start_after = None
        while True:
            keys, more = self.list_keys(vid, start_after, page)
            if keys:
                yield keys
            if not more or not keys:
                return
            start_after = keys[-1]

    def stat(self) -> dict[str, Any]:
        return json.loads(self._call("Stat", pb.StatRequest()).json)

    def compact(self, vid: int | None = None) -> dict[str, Any]:
        request = pb.CompactRequest(vid=vid or 0, has_vid=vid is not None)
        return json.loads(self._call("Compact", request, ADMIN_TIMEOUT).json)

    def verify(self, vid: int | None = None) -> dict[str, Any]:
        request = pb.VerifyRequest(vid=vid or 0, has_vid=vid is not None)
        return json.loads(self._call("Verify", request, ADMIN_TIMEOUT).json)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


log = logging.getLogger("cachefs.storage.replicated")

READ_RANK = {"up": 0, "lagging": 1, "down": 2}  # "dead" replicas are never read
LIST_PAGE = 1000
REFRESH_INTERVAL = 0.5  # seconds between two placement refreshes
DEFAULT_TIMEOUT = 30.0
DEFAULT_WORKERS = 16
# A storage server that restarts is retried within seconds (gRPC's default backoff reaches 120 s).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# Errors that make a read or a listing try another replica; any other error (a refused token,
# a malformed request) would be the same everywhere and is raised at once.
FALLBACK_ERRORS = (RemoteError, ObjectNotFound, CorruptObject)
FATAL_ERRORS = (PermissionDenied, UsageError)


# -- reading order ---------------------------------------------------------------------------


def read_order(replicas: Sequence[ReplicaInfo], key: bytes) -> list[ReplicaInfo]:
    """The replicas to try for `key`, in order: by state ("up", "lagging", "down"; never
    "dead"), each group rotated by a stable hash of the key so reads spread over replicas.
    The hash takes the key's leading bytes, independent of the trailing ones `vid` depends on."""
    spin = int.from_bytes(key[:8], "big")
    order: list[ReplicaInfo] = []
    for state in ("up", "lagging", "down"):
        group = [r for r in replicas if r.state == state]
        if group:
            start = spin % len(group)
            order += group[start:] + group[:start]
    return order


def _errors_text(errors: dict[str, str]) -> str:
    return "; ".join(f"{address}: {error}" for address, error in errors.items()) or "no replica"


# -- the replicated store ---------------------------------------------------------------------


@dataclass
class _PutUnit:
    """One batch of one vid's needles and the replicas that acknowledged it."""

    vid: int
    items: list[tuple[bytes, bytes]]
    request: bytes = b""  # the items' PutRequest, encoded once for every replica
    acked: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    pending: int = 0


class ReplicatedStorage:
    """The storage servers of one cluster as one store of needles (see the module docstring).

    Thread-safe. `close()` closes every channel and waits for background writes; calling it
    again does nothing.
    """

    def __init__(self, placement_source: Callable[[], Placement], token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, workers: int = DEFAULT_WORKERS) -> None:
        if timeout <= 0 or workers < 1:
            raise UsageError(f"timeout {timeout} and workers {workers} must be positive")
        self._source = placement_source
        self._token = token
        self.timeout = timeout
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="cachefs-replicated")
        self._lock = threading.Lock()            # clients, counters, closed
        self._placement_lock = threading.Lock()  # placement and refreshes
        self._placement: Placement | None = None
        self._last_refresh = float("-inf")
        self._clients: dict[str, StorageClient] = {}
        self._reads: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._closed = False

    # -- placement ------------------------------------------------------------------------------

    def placement(self) -> Placement:
        """The cached placement (fetched on first use, or while the cluster has none)."""
        if self._closed:
            raise RemoteError("replicated storage: closed")
        with self._placement_lock:
            current = self._placement
            if current is not None and current.vids:
                return current
            if current is not None and not self._refresh_allowed():
                raise RemoteError(f"the cluster has no placement yet (epoch {current.epoch}): "
                                  f"fewer than {current.volumes} storage servers registered")
            fresh = self._fetch()
            if not fresh.vids:
                raise RemoteError(f"the cluster has no placement yet (epoch {fresh.epoch}): "
                                  f"fewer than {fresh.volumes} storage servers registered")
            return fresh

    def _refresh_allowed(self) -> bool:
        return time.monotonic() - self._last_refresh >= REFRESH_INTERVAL

    def _fetch(self) -> Placement:
        """Call the source (placement lock held)."""
        if self._placement is not None:
            self._last_refresh = time.monotonic()
            self._count("refreshes")
        fresh = self._source()
        if not isinstance(fresh, Placement):
            raise TypeError(f"placement_source returned {type(fresh).__name__}, not Placement")
        if self._placement is not None and fresh.volumes != self._placement.volumes:
            raise RemoteError(f"the cluster's volume count changed from "
                              f"{self._placement.volumes} to {fresh.volumes}")
        if self._placement is None or fresh.epoch >= self._placement.epoch:
            self._placement = fresh
        return self._placement

    def _refresh(self, stale: Placement) -> Placement | None:
        """A placement newer than `stale` for a failed operation to retry with, or None: the
        refresh is throttled (one every REFRESH_INTERVAL) or the source failed. Callers that
        failed on one placement share one refresh."""
        with self._placement_lock:
            current = self._placement
            if current is not None and current is not stale:
                return current
            if not self._refresh_allowed():
                return None
            try:
                return self._fetch()
            except CachefsError as e:
                log.warning("placement refresh failed, keeping epoch %d: %s", stale.epoch, e)
                return None

    # -- clients and counters -------------------------------------------------------------------

    def _client(self, address: str) -> StorageClient:
        with self._lock:
            if self._closed:
                raise RemoteError("replicated storage: closed")
            client = self._clients.get(address)
            if client is None:
                client = StorageClient(address, self._token, self.timeout, CHANNEL_OPTIONS)
                self._clients[address] = client
            return client

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def counters(self) -> dict[str, Any]:
        """`reads` (successful reads per replica address), `fallbacks` (reads or listings that
        moved on to another replica), `corrupt` (corrupt copies met: server checksum or
        client-side hash), `refreshes` (placement refreshes), `write_errors` (failed replica
        writes)."""
        with self._lock:
            return {"reads": dict(self._reads),
                    **{name: self._counts[name]
                       for name in ("fallbacks", "corrupt", "refreshes", "write_errors")}}

    # -- writes ---------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Store every (key, data) on the replicas of its vid; returns once each needle is
        durable on `min_replicas` of them. RemoteError names each vid that fell short."""
        seen: set[bytes] = set()
        by_vid: dict[int, list[tuple[bytes, bytes]]] = {}
        placement = self.placement()
        for key, data in items:
            key = check_key(key)
            if len(data) > MAX_NEEDLE_BYTES:
                raise UsageError(f"needle {key.hex()}: {len(data)} bytes, at most "
                                 f"{MAX_NEEDLE_BYTES}")
            if key not in seen:
                seen.add(key)
                by_vid.setdefault(placement.vid_of(key), []).append((key, bytes(data)))
        units = [_PutUnit(vid, batch) for vid, vid_items in sorted(by_vid.items())
                 for batch in put_batches(vid_items)]
        if not units:
            return
        failed = self._put_round(placement, units)
        if failed:
            newer = self._refresh(placement)
            if newer is not None:
                for unit in failed:
                    members = {r.address for r in newer.replicas_of(unit.vid)}
                    unit.acked &= members
                placement = newer
                failed = self._put_round(placement, failed)
        if failed:
            raise RemoteError("put: " + " | ".join(
                f"volume {unit.vid} ({len(unit.items)} needles): {len(unit.acked)} of "
                f"{placement.required_acks(unit.vid)} required replicas acknowledged "
                f"({_errors_text(unit.errors)})" for unit in failed))

    def _put_round(self, placement: Placement, units: list[_PutUnit]) -> list[_PutUnit]:
        """Send each unit to its vid's writable replicas that have not acknowledged it yet;
        return the units still short of `required_acks` once their replica writes are done."""
        futures: dict[Future[int], tuple[_PutUnit, str]] = {}
        for unit in units:
            unit.errors = {}
            for replica in placement.replicas_of(unit.vid):
                if replica.state not in WRITABLE_STATES:
                    unit.errors[replica.address] = f"skipped: {replica.state}"
                elif replica.address not in unit.acked:
                    client = self._client(replica.address)
                    if not unit.request:
                        unit.request = wire.encode_put_request(unit.items)
                    futures[self._pool.submit(client.put_encoded, unit.request)] = (
                        unit, replica.address)
                    unit.pending += 1
        fatal: CachefsError | None = None
        waiting = set(futures)

        def satisfied(unit: _PutUnit) -> bool:
            return len(unit.acked) >= placement.required_acks(unit.vid)

        while waiting and not all(satisfied(u) or not u.pending for u in units):
            done, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for future in done:
                unit, address = futures[future]
                unit.pending -= 1
                error = future.exception()
                if error is None:
                    unit.acked.add(address)
                    continue
                self._count("write_errors")
                log.warning("put: volume %d: replica %s: %s", unit.vid, address, error)
                unit.errors[address] = str(error)
                if isinstance(error, FATAL_ERRORS):
                    fatal = error
        for future in waiting:  # enough replicas acknowledged; the rest go on in the background
            unit, address = futures[future]
            future.add_done_callback(
                lambda f, vid=unit.vid, address=address: _log_late_failure(f, vid, address))
        if fatal is not None:
            raise fatal
        return [unit for unit in units if not satisfied(unit)]

    def delete(self, key: bytes) -> bool:
        """Delete `key` on every replica that is not dead; True if one of them had it live.
        Best effort across replicas (see the module docstring); RemoteError only if no
        replica could be reached."""
        key = check_key(key)
        placement = self.placement()
        replicas = [r for r in placement.replicas_of(placement.vid_of(key)) if r.state != "dead"]
        futures = {self._pool.submit(self._client(r.address).delete, key): r for r in replicas}
        deleted = reached = False
        errors: dict[str, str] = {}
        for future, replica in futures.items():
            try:
                deleted |= future.result()
                reached = True
            except FATAL_ERRORS:
                raise
            except CachefsError as e:
                log.warning("delete %s: replica %s (%s): %s", key.hex(), replica.address,
                            replica.state, e)
                errors[replica.address] = str(e)
        if not reached:
            raise RemoteError(f"delete {key.hex()}: no replica reached ({_errors_text(errors)})")
        return deleted

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: bytes, start: int = 0, length: int | None = None) -> bytes:
        """The needle's data, or `length` bytes from `start`, from one replica with fallback.
        ObjectNotFound if every reachable replica lacks it, CorruptObject if only corrupt copies
        exist, RemoteError if no replica answered."""
        key = check_key(key)
        if start < 0 or (length is not None and length < 0):
            raise UsageError(f"range: start {start}, length {length}: must not be negative")
        placement = self.placement()
        vid = placement.vid_of(key)
        try:
            return self._get_from(placement.replicas_of(vid), key, start, length)
        except FALLBACK_ERRORS:
            newer = self._refresh(placement)
            if newer is None or newer.replicas_of(vid) == placement.replicas_of(vid):
                raise
            log.info("get %s: retrying with placement epoch %d", key.hex(), newer.epoch)
            return self._get_from(newer.replicas_of(vid), key, start, length)

    def _get_from(self, replicas: Sequence[ReplicaInfo], key: bytes, start: int,
                  length: int | None) -> bytes:
        whole = start == 0 and length is None
        missing: dict[str, str] = {}
        corrupt: dict[str, str] = {}
        unreachable: dict[str, str] = {}
        for attempt, replica in enumerate(read_order(replicas, key)):
            if attempt:
                self._count("fallbacks")
            try:
                data = self._client(replica.address).get(key, start, length)
            except ObjectNotFound as e:
                missing[replica.address] = str(e)
                continue
            except CorruptObject as e:
                self._count("corrupt")
                log.error("get %s: replica %s has a corrupt copy: %s", key.hex(),
                          replica.address, e)
                corrupt[replica.address] = str(e)
                continue
            except RemoteError as e:
                unreachable[replica.address] = str(e)
                continue
            if whole and blake3.blake3(data).digest() != key:
                self._count("corrupt")
                log.error("get %s: replica %s returned %d bytes that hash to %s", key.hex(),
                          replica.address, len(data), blake3.blake3(data).hexdigest())
                corrupt[replica.address] = "data does not match its BLAKE3 name"
                continue
            with self._lock:
                self._reads[replica.address] += 1
            return data
        detail = _errors_text({**corrupt, **missing, **unreachable})
        if corrupt:
            raise CorruptObject(f"needle {key.hex()}: only corrupt copies ({detail})",
                                key.hex())
        if missing:
            raise ObjectNotFound(f"needle {key.hex()}: not stored ({detail})")
        raise RemoteError(f"needle {key.hex()}: no replica reachable ({detail})")

    def has_many(self, keys: Sequence[bytes]) -> list[bool]:
        """For each key, whether any reachable replica of its vid has it: the first replica in
        read order is asked for all, the next ones only for what it lacked. RemoteError if no
        replica of some vid answered."""
        keys = [check_key(k) for k in keys]
        placement = self.placement()
        by_vid: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_vid.setdefault(placement.vid_of(key), []).append(i)
        present = [False] * len(keys)

        def ask(vid: int, indexes: list[int]) -> None:
            try:
                self._has_in(placement.replicas_of(vid), keys, indexes, present)
            except RemoteError:
                newer = self._refresh(placement)
                if newer is None or newer.replicas_of(vid) == placement.replicas_of(vid):
                    raise
                self._has_in(newer.replicas_of(vid), keys, indexes, present)

        if len(by_vid) == 1:
            for vid, indexes in by_vid.items():
                ask(vid, indexes)
        else:
            futures = [self._pool.submit(ask, vid, idx) for vid, idx in by_vid.items()]
            for future in futures:
                future.result()
        return present

    def _has_in(self, replicas: Sequence[ReplicaInfo], keys: list[bytes], indexes: list[int],
                present: list[bool]) -> None:
        pending = [i for i in indexes if not present[i]]
        errors: dict[str, str] = {}
        reached = False
        # Order by the first key so that a vid's questions go to one replica, spread over vids.
        for replica in read_order(replicas, keys[pending[0]]) if pending else []:
            try:
                answers = self._client(replica.address).has_many([keys[i] for i in pending])
            except FATAL_ERRORS:
                raise
            except CachefsError as e:
                errors[replica.address] = str(e)
                continue
            reached = True
            for i, answer in zip(pending, answers):
                present[i] = answer
            pending = [i for i, answer in zip(pending, answers) if not answer]
            if not pending:
                return
        if not reached:
            raise RemoteError(f"has: no replica reachable ({_errors_text(errors)})")

    def iter_keys(self) -> Iterator[bytes]:
        """Every key of the cluster, in byte order: each vid's keys from one reachable replica
        (falling back mid-listing), merged."""
        placement = self.placement()
        listings = [self._vid_keys(placement, vid) for vid in range(placement.volumes)]
        last: bytes | None = None
        for key in heapq.merge(*listings):
            if key != last:
                yield key
                last = key

    def _vid_keys(self, placement: Placement, vid: int) -> Iterator[bytes]:
        start_after: bytes | None = None
        errors: dict[str, str] = {}
        replicas = placement.replicas_of(vid)
        for round_no in range(2):
            # A stable order per vid (its number picks the first "up" replica).
            for attempt, replica in enumerate(read_order(replicas, vid.to_bytes(8, "big"))):
                if attempt or round_no:
                    self._count("fallbacks")
                client = self._client(replica.address)
                try:
                    while True:
                        page, more = client.list_keys(vid, start_after, LIST_PAGE)
                        if page:
                            start_after = page[-1]
                            yield from page
                        if not more or not page:
                            return
                except FATAL_ERRORS:
                    raise
                except CachefsError as e:
                    log.warning("list volume %d: replica %s: %s", vid, replica.address, e)
                    errors[replica.address] = str(e)
            newer = None if round_no else self._refresh(placement)
            if newer is None or newer.replicas_of(vid) == replicas:
                break
            placement, replicas = newer, newer.replicas_of(vid)
        raise RemoteError(f"list volume {vid}: no replica could list it "
                          f"({_errors_text(errors)})")

    def stat(self) -> dict[str, Any]:
        """Each replica server's Stat document by address (or {"error": ...}), the placement
        epoch and the counters."""
        placement = self.placement()
        addresses = sorted({r.address for replicas in placement.vids for r in replicas
                            if r.state != "dead"})
        futures = {a: self._pool.submit(self._client(a).stat) for a in addresses}
        servers: dict[str, Any] = {}
        for address, future in futures.items():
            try:
                servers[address] = future.result()
            except CachefsError as e:
                servers[address] = {"error": str(e)}
        return {"epoch": placement.epoch, "servers": servers, "counters": self.counters()}

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for background writes, close every channel. Harmless when already closed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_late_failure(future: Future[int], vid: int, address: str) -> None:
    error = future.exception()
    if error is not None:
        log.warning("put: volume %d: replica %s (after the write was acknowledged): %s",
                    vid, address, error)
