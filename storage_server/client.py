"""`StorageClient`: one storage server's gRPC API as Python calls that raise cachefs errors.

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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Self

import grpc

from cachefs.grpc_auth import bearer_metadata
from cachefs.grpc_errors import error_from_rpc
from storage_server import wire
from storage_server.proto import storage_pb2 as pb
from storage_server.proto import storage_pb2_grpc as pb_grpc
from storage_server.server import (
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
