"""A client of one member's peer server (proto/peer.proto): a reused channel, the cluster token.

Errors come back as `PeerCallError` with the gRPC status, so that the peer tier can tell a slow
member (DEADLINE_EXCEEDED), a gone one (UNAVAILABLE), a chunk the origin lacks (NOT_FOUND) and a
refusal (PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT) apart.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from cachefs.errors import RemoteError
from cachefs.grpc_auth import bearer_metadata
from cachefs.grpc_errors import rpc_status
from cachefs.peer.proto import peer_pb2 as pb
from cachefs.peer.proto import peer_pb2_grpc as pb_grpc
from cachefs.peer.protocol import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A member that went away is retried soon after it comes back, not after gRPC's default
    # reconnect backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),  # the peer tier decides what to do next, not the channel
]


class PeerCallError(RemoteError):
    """A call to a member failed; `code` is its gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class PeerClient:
    """Calls to one member, `address` (HOST:PORT), with `token` if the cluster has one."""

    def __init__(self, address: str, token: str | None) -> None:
        self.address = address
        self._metadata = bearer_metadata(token)
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.PeerStub(self._channel)

    def get_chunk(self, remote: str, dataset: str, name: str, timeout: float,
                  cached_only: bool = False) -> tuple[bytes, bool]:
        """(the chunk's bytes as the member sent them, whether it fetched them from the origin);
        not verified here."""
        request = pb.GetChunkRequest(remote=remote, dataset=dataset, hash=name,
                                     cached_only=cached_only)
        reply = self._call(self._stub.GetChunk, request, timeout, "GetChunk")
        return reply.data, reply.from_origin

    def has_chunks(self, names: list[str], timeout: float) -> list[bool]:
        reply = self._call(self._stub.HasChunks, pb.HasChunksRequest(hashes=names), timeout,
                           "HasChunks")
        return list(reply.present)

    def status(self, timeout: float) -> dict[str, Any]:
        reply = self._call(self._stub.Status, pb.StatusRequest(), timeout, "Status")
        doc = json.loads(reply.json)
        if not isinstance(doc, dict):
            raise PeerCallError(f"peer {self.address} Status: not a JSON object",
                                grpc.StatusCode.INTERNAL)
        return doc

    def drain(self, resume: bool, timeout: float) -> bool:
        """Ask the member to drain (or, `resume`, to serve again); whether it drains now."""
        reply = self._call(self._stub.Drain, pb.DrainRequest(resume=resume), timeout, "Drain")
        return bool(reply.draining)

    def _call(self, method: Any, request: Any, timeout: float, what: str) -> Any:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            code, details = rpc_status(e)
            raise PeerCallError(f"peer {self.address} {what}: {code.name}: {details}",
                                code) from None

    def close(self) -> None:
        self._channel.close()
