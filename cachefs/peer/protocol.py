"""The peer protocol's limits, shared by the server and its clients (proto/peer.proto)."""

from __future__ import annotations

MAX_CHUNK_BYTES = 64 << 20  # the largest chunk a dataset may have
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (1 << 20)  # a chunk plus framing
MAX_HASHES_PER_CALL = 10_000
DEFAULT_PORT = 7470
