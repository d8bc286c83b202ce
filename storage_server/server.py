"""The storage server's gRPC service (proto/storage.proto) over one `VolumeStore`.

`cachefs storage serve --data-dir DIR --listen HOST:PORT` runs `serve`. Every request is checked
in full before anything changes (keys of 32 bytes, needles of at most 64 MiB, offsets, lengths
and limits not negative or too large); a refusal is INVALID_ARGUMENT naming the field. Errors of
the store go through the one mapping of cachefs errors to status codes
(`cachefs.grpc_errors.rpc`). With a token, `cachefs.grpc_auth.TokenInterceptor` guards every
call; without one the server listens on loopback only and logs that it runs without
authentication. With `--metrics-listen HOST:PORT` it serves Prometheus metrics at
http://HOST:PORT/metrics (storage_server/metrics.py).

Messages up to `MAX_MESSAGE_BYTES` are accepted both ways (a 64 MiB needle plus framing); gRPC
itself refuses a bigger one with RESOURCE_EXHAUSTED. The pool has `WORKERS` threads, so many
concurrent Puts reach the store together and share its fsyncs (group commit).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from cachefs.contracts import check_key
from cachefs.grpc_auth import listening_server, serve_until_signalled
from cachefs.grpc_errors import invalid, rpc
from cachefs.metrics import serve_metrics
from storage_server import wire
from storage_server.metrics import StorageMetrics
from storage_server.proto import storage_pb2 as pb
from storage_server.proto import storage_pb2_grpc as pb_grpc
from storage_server.protocol import (
    DEFAULT_LIST_LIMIT,
    MAX_KEYS_PER_CALL,
    MAX_LIST_LIMIT,
    MAX_MESSAGE_BYTES,
    MAX_NEEDLE_BYTES,
    SERVICE,
)

log = logging.getLogger("cachefs.storage")

WORKERS = 32
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second server on a busy port fails instead of sharing it
]


def check_count(count: int, field: str) -> None:
    if count > MAX_KEYS_PER_CALL:
        raise invalid(f"{field}: {count} entries, at most {MAX_KEYS_PER_CALL} per call")


def check_vid(vid: int, volumes: int, field: str = "vid") -> None:
    if not 0 <= vid < volumes:
        raise invalid(f"{field}: {vid} is not a volume of this server (0..{volumes - 1})")


class StorageService(pb_grpc.StorageServicer):
    """The Storage service over a `VolumeStore` (storage_server/store.py)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    @rpc
    def Put(self, needles: list[tuple[bytes, memoryview]] | wire.MalformedMessage,
            context: grpc.ServicerContext) -> pb.PutResponse:
        """`needles`: the request as `wire.decode_put_request` reads it (data not copied),
        or what is wrong with it."""
        if isinstance(needles, wire.MalformedMessage):
            raise invalid(f"malformed PutRequest: {needles}")
        check_count(len(needles), "needles")
        total = 0
        for i, (key, data) in enumerate(needles):
            check_key(key, f"needles[{i}].key")
            size = len(data)
            if size > MAX_NEEDLE_BYTES:
                raise invalid(f"needles[{i}].data: {size} bytes, a needle holds at most "
                              f"{MAX_NEEDLE_BYTES} (64 MiB)")
            total += size
        if total > MAX_MESSAGE_BYTES:
            raise invalid(f"needles: {total} bytes in one call, at most {MAX_MESSAGE_BYTES}")
        return pb.PutResponse(bytes_written=self.store.put_many(needles))

    @rpc
    def Get(self, request: pb.GetRequest,
            context: grpc.ServicerContext) -> bytes | memoryview:
        """Answers the data; `wire.encode_get_response` frames it as a GetResponse."""
        check_key(request.key, "key")
        if request.offset < 0:
            raise invalid(f"offset: {request.offset} is negative")
        length = None
        if request.has_length:
            if request.length < 0:
                raise invalid(f"length: {request.length} is negative")
            length = request.length
        elif request.length:
            raise invalid("length: set without has_length")
        return self.store.get(request.key, request.offset, length)

    @rpc
    def Has(self, request: pb.HasRequest, context: grpc.ServicerContext) -> pb.HasResponse:
        keys = list(request.keys)
        check_count(len(keys), "keys")
        for i, key in enumerate(keys):
            check_key(key, f"keys[{i}]")
        return pb.HasResponse(present=self.store.has_many(keys))

    @rpc
    def Delete(self, request: pb.DeleteRequest,
               context: grpc.ServicerContext) -> pb.DeleteResponse:
        check_key(request.key, "key")
        return pb.DeleteResponse(deleted=self.store.delete(request.key))

    @rpc
    def ListKeys(self, request: pb.ListKeysRequest,
                 context: grpc.ServicerContext) -> pb.ListKeysResponse:
        check_vid(request.vid, self.store.volumes)
        if request.start_after:
            check_key(request.start_after, "start_after")
        if request.limit > MAX_LIST_LIMIT:
            raise invalid(f"limit: {request.limit}, at most {MAX_LIST_LIMIT}")
        limit = request.limit or DEFAULT_LIST_LIMIT
        keys = self.store.list_keys(request.vid, start_after=request.start_after or None,
                                    limit=limit + 1)
        return pb.ListKeysResponse(keys=keys[:limit], more=len(keys) > limit)

    @rpc
    def Stat(self, request: pb.StatRequest, context: grpc.ServicerContext) -> pb.StatResponse:
        doc = self.store.stat()
        return pb.StatResponse(json=json.dumps(doc), **stat_summary(doc))

    def _optional_vid(self, request: pb.CompactRequest | pb.VerifyRequest) -> int | None:
        """The volume a Compact or Verify names (None: every volume)."""
        if request.has_vid:
            check_vid(request.vid, self.store.volumes)
            return request.vid
        if request.vid:
            raise invalid("vid: set without has_vid")
        return None

    @rpc
    def Compact(self, request: pb.CompactRequest,
                context: grpc.ServicerContext) -> pb.CompactResponse:
        return pb.CompactResponse(json=json.dumps(self.store.compact(self._optional_vid(request))))

    @rpc
    def Verify(self, request: pb.VerifyRequest,
               context: grpc.ServicerContext) -> pb.VerifyResponse:
        report = self.store.verify(self._optional_vid(request))
        checked, corrupt = verify_summary(report)
        return pb.VerifyResponse(checked=checked, corrupt=corrupt, json=json.dumps(report))


def stat_summary(doc: dict[str, Any]) -> dict[str, int]:
    """The typed fields of StatResponse from the store's stat() document."""
    totals = doc["totals"]
    return {"volumes": doc["volumes"], "needles": totals["live"], "bytes": totals["bytes"],
            "free_bytes": doc["free_bytes"], "corrupt_reads": doc["corrupt_reads"]}


def verify_summary(report: dict[str, Any]) -> tuple[int, list[bytes]]:
    """(needles checked, keys of corrupt needles) from the store's verify() report."""
    return report["checked"], [bytes.fromhex(key) for key in report["corrupt"]]


def build_server(store: Any, listen: str, token: str | None,
                 observers: Sequence[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, str]:
    """A started-to-be server bound to `listen` and the address it bound (the real port when
    `listen` asks for port 0). Refuses a non-loopback address without a token. `observers`
    (the metrics' `GrpcMetrics`) see every call, refused ones included."""
    server, address = listening_server(listen, token, WORKERS, "storage", GRPC_OPTIONS,
                                       observers=observers)
    add_storage_service(server, StorageService(store))
    return server, address


def _put_request(message: bytes) -> list[tuple[bytes, memoryview]] | wire.MalformedMessage:
    # A deserializer that raises makes gRPC answer INTERNAL; Put answers INVALID_ARGUMENT.
    try:
        return wire.decode_put_request(message)
    except wire.MalformedMessage as e:
        return e


def add_storage_service(server: grpc.Server, service: StorageService) -> None:
    """Register `service` like the generated `add_StorageServicer_to_server`, except that
    Put's request and Get's response go through `storage_server.wire` (same bytes on the
    wire, no copies of needle data)."""
    def handler(method: Any, request: Any, response: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=request, response_serializer=response)

    handlers = {
        "Put": handler(service.Put, _put_request, pb.PutResponse.SerializeToString),
        "Get": handler(service.Get, pb.GetRequest.FromString, wire.encode_get_response),
        **{name: handler(getattr(service, name), getattr(pb, f"{name}Request").FromString,
                         getattr(pb, f"{name}Response").SerializeToString)
           for name in ("Has", "Delete", "ListKeys", "Stat", "Compact", "Verify")},
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def serve(store: Any, listen: str, token: str | None, grace: float = 10.0,
          ready: Any = None, agent: Any = None, metrics_listen: str | None = None) -> None:
    """Serve `store` until SIGTERM or SIGINT, then stop accepting, let calls in flight finish
    (up to `grace` seconds) and return; the caller closes the store. `ready(address)` is
    called once the server accepts calls. With `agent` (a `storage_server.agent.AgentConfig`)
    a `StorageAgent` registers the server with the masters, heartbeats and runs repairs
    while it serves. With `metrics_listen` (HOST:PORT) Prometheus metrics are served at
    http://HOST:PORT/metrics (storage_server/metrics.py)."""
    running: list[Any] = []

    def agent_stats() -> dict[str, int]:
        agents = list(running)  # a copy: stop_agent may empty it meanwhile
        return agents[0].stats() if agents else {}

    metrics = StorageMetrics(store, agent_stats) if metrics_listen else None
    server, address = build_server(store, listen, token,
                                   observers=[metrics.grpc] if metrics else ())
    endpoint = serve_metrics(metrics_listen, metrics.registry) if metrics else None

    def start_agent() -> None:
        if agent is not None:
            from storage_server.agent import StorageAgent, local_address

            running.append(StorageAgent(store, agent, token, local_address(address)))
            running[0].start()

    def stop_agent() -> None:
        while running:
            running.pop().stop()

    try:
        serve_until_signalled(server, address, token, "storage server", ready, grace,
                              started=start_agent, stopping=stop_agent)
    finally:
        stop_agent()
        if endpoint is not None:
            endpoint.stop()
