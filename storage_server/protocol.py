"""What the Storage service (proto/storage.proto) and its clients agree on: the service's name
and the limits of its messages and calls. The server (`storage_server.server`) enforces them and
the clients (`storage_server.client`) size their calls by them; both import them from here."""

from __future__ import annotations

SERVICE = "cachefs.storage.v1.Storage"
MAX_NEEDLE_BYTES = 64 << 20
MAX_MESSAGE_BYTES = 80 << 20  # a 64 MiB needle plus framing
MAX_KEYS_PER_CALL = 100_000  # Put needles, Has keys
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
