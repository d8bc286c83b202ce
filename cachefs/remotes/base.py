"""The remote (origin store) interface that every backend implements, one module per backend.

A remote is a flat key -> bytes store. All of these operations must be idempotent, like JuiceFS's
ObjectStorage: `put` of the same key with the same bytes any number of times is harmless, because
every key but a ref generation is the content hash of its bytes. The one conditional write,
`put_if_absent`, is what the ref protocol (`cachefs.dataset.refs`) builds compare-and-swap on;
a backend may name how it asks for it in `conditional_write` (S3 `If-None-Match: *`, OSS
`x-oss-forbid-overwrite`), which the refusal of a store that ignores it names.

Errors of HTTP backends are one line naming the server (`server_of`: scheme, host and port only),
whatever the server answered, however malformed (`one_line`).

Keys are '/'-separated ASCII paths built by the repository layer, never from raw user input.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Protocol, runtime_checkable
from urllib.parse import urlparse

ONE_LINE_LIMIT = 300  # characters of a server's error kept in a message (parsers quote bodies)


def server_of(endpoint: str) -> str:
    """``scheme://host[:port]`` of an endpoint URL: all of it a message may name (user info,
    path and query can hold secrets)."""
    parsed = urlparse(endpoint)
    try:
        port = f":{parsed.port}" if parsed.port else ""
    except ValueError:  # not a number: name no port rather than fail while reporting
        port = ""
    if not parsed.hostname:
        return "the server"
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"{parsed.scheme}://{host}{port}"


def one_line(error: BaseException | str, limit: int = ONE_LINE_LIMIT) -> str:
    """An error's text on one line, cut to `limit` characters: errors are one line on stderr."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ObjectInfo(NamedTuple):
    """One listed object: what a store's listing reports without reading the object."""

    key: str
    size: int
    mtime_ns: int  # last modification, by the store's clock (S3 LastModified, file mtime)
    etag: str  # changes whenever the content does (S3/OSS ETag; size+mtime on files)


@runtime_checkable
class Remote(Protocol):
    """A store of immutable objects plus put-if-absent, selected by URL scheme."""

    url: str

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Return the object's bytes (or `length` bytes from `start`); ObjectNotFound if absent."""
        ...

    def put(self, key: str, data: bytes | memoryview) -> None:
        """Store `data` under `key`, replacing nothing observable (same key, same bytes)."""
        ...

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create `key` only if it does not exist; True if this call created it."""
        ...

    def has(self, keys: Iterable[str]) -> set[str]:
        """Return the subset of `keys` that exist (many at once: one call, parallel inside)."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Yield every key starting with `prefix`, in lexicographic order."""
        ...

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        """Like `list`, with each object's size, modification time and ETag (one listing)."""
        ...

    def delete(self, key: str) -> None:
        """Remove `key`; removing an absent key succeeds silently."""
        ...

    def flush(self) -> None:
        """Make every `put` so far durable before returning (a no-op where puts already are)."""
        ...

    def close(self) -> None:
        """Release connections and threads; calling it twice is harmless."""
        ...


class ParallelHas:
    """`has` as parallel one-key `_exists` probes on a thread pool, `list` from `list_info`.

    For backends that check one key per request (an HTTP HEAD on S3 and OSS, a directory
    lookup on haystack). A backend sets `parallelism` and `pool_name` and implements
    `_exists` (one probe) and `list_info`; `close` must call `_close_pool`."""

    parallelism: int
    pool_name: str
    _pool: ThreadPoolExecutor | None = None

    def _exists(self, key: str) -> bool:
        raise NotImplementedError

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def has(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        if len(keys) <= 1:
            return {k for k in keys if self._exists(k)}
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.parallelism, thread_name_prefix=self.pool_name)
        return {k for k, ok in zip(keys, self._pool.map(self._exists, keys)) if ok}

    def list(self, prefix: str) -> Iterator[str]:
        return (info.key for info in self.list_info(prefix))

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
