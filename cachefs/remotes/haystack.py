"""The haystack:// remote: a cachefs cluster of raft masters and Haystack storage servers.

    haystack://10.0.0.1:7700,10.0.0.2:7700,10.0.0.3:7700[/NAMESPACE][?token_file=FILE]

The URL lists master gRPC addresses; an optional path names a namespace, so that several
repositories share one cluster (their directory names are kept apart; chunks are shared, as
they are content-addressed). the client retries across them and follows the leader
(`master.client.MasterClient`). The cluster token comes from `token_file=` or else
`CACHEFS_TOKEN`.

Where a key lives. Every name of a namespace is an entry of the master's replicated
directory, so listings are exact per namespace (like a SeaweedFS filer over its volumes):

- **chunks** (`chunks/xx/HASH` whose data hashes to HASH: every chunk the repository writes)
  are needles in the storage servers keyed by the hash itself: a write goes to every live
  replica of the chunk's volume and returns once `min_replicas` have it durably; a read goes to
  one replica and falls back to the others on a miss, an error or a checksum failure
  (`storage_server.client.ReplicatedStorage`), without asking the master (placement is
  cached, refreshed on a miss or an error). The chunk's name is recorded in the directory in
  batches, in the background; `flush` (which the repository calls before it moves a ref)
  returns once every name so far is recorded. `has` names the chunks it finds too: they may be
  another namespace's, and a caller that finds a chunk refers to it instead of uploading it.
- **everything else** (refs, locks, trees, commits, the scan index...): values up to 4 KiB
  inline in the directory, bigger ones as a needle (keyed by the BLAKE3 of the value) that is
  written first, then named. `put_if_absent` is the directory's create-if-absent, decided by
  the raft log: ref compare-and-swap rests on it, so refs are as safe as the master majority.

Needles are shared by every namespace that stores the same bytes, so `delete` removes the name
only and never a needle another namespace may still use: on a haystack cluster gc frees
names (trees, commits, ref generations, chunk names) but not yet the space of chunks.

`NodeRegistry.from_url` reaches the cluster's registry of cachefs nodes (one per cluster,
whatever the namespace): the peer tier lists live nodes there (`master:` membership) and
`cachefs peer serve --register` heartbeats into it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Self
from urllib.parse import urlparse

import blake3

from cachefs.errors import ConfigError, ObjectNotFound, UsageError
from cachefs.grpc_auth import load_token
from cachefs.remotes.base import ObjectInfo, ParallelHas
from cachefs.remotes.registry import url_options
from master.client import DirEntry, MasterClient, NodeInfo, parse_masters
from storage_server.client import ReplicatedStorage

log = logging.getLogger("cachefs.remotes.haystack")

CHUNK_KEY = re.compile(r"^chunks/([0-9a-f]{2})/([0-9a-f]{64})$")
CHUNK_PREFIX = "chunks/"
NAMESPACE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
INLINE_MAX = 4096  # the master keeps values up to this size in its log
NAME_LOOKUPS = 16  # directory lookups of `has` in flight at once
NAME_BATCH = 512  # chunk names per directory command
NAME_INTERVAL_S = 0.05  # how long a chunk name may wait for others to share its command


def chunk_hash(key: str) -> bytes | None:
    """The 32-byte needle key of a chunk key (`chunks/ab/ab...`), else None."""
    m = CHUNK_KEY.match(key)
    if m is None or not m.group(2).startswith(m.group(1)):
        return None
    return bytes.fromhex(m.group(2))


class NameRecorder:
    """Records chunk names in the master's directory in batches, from a background thread:
    one raft command per batch instead of one per chunk. `flush` waits for everything added
    so far and raises the first failure since the last flush."""

    def __init__(self, master: MasterClient) -> None:
        self.master = master
        self._cond = threading.Condition()
        self._queue: list[DirEntry] = []
        self._added = 0
        self._recorded = 0
        self._failure: BaseException | None = None
        self._closing = False
        self._thread: threading.Thread | None = None

    def add(self, entry: DirEntry) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="cachefs-haystack-names")
                self._thread.start()
            self._queue.append(entry)
            self._added += 1
            if len(self._queue) >= NAME_BATCH:
                self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            target = self._added
            self._cond.notify_all()
            while self._recorded < target and self._failure is None:
                self._cond.wait()
            failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.wait(NAME_INTERVAL_S)
                if not self._queue:
                    if self._closing:
                        return
                    continue
                batch, self._queue = self._queue, []
            try:
                self.master.dir_put_many(batch)
            except BaseException as e:  # reported by the next flush
                log.error("recording %d chunk names failed: %s", len(batch), e)
                with self._cond:
                    self._failure = self._failure or e
            with self._cond:
                self._recorded += len(batch)
                self._cond.notify_all()


def parse_url(url: str) -> tuple[list[str], str | None, float, str]:
    """(masters, token_file, timeout, namespace) of a haystack:// URL, checked without
    connecting or reading the token file (it may be written after `remote add`)."""
    parsed = urlparse(url)
    if parsed.scheme != "haystack" or not parsed.netloc:
        raise ConfigError("invalid haystack URL: expected "
                          "haystack://HOST:PORT[,HOST:PORT...][/NAMESPACE][?token_file=FILE]")
    options = url_options(parsed, {"token_file", "timeout"}, "haystack")
    try:
        masters = parse_masters(parsed.netloc)
    except UsageError as e:
        raise ConfigError(f"haystack URL: {e}") from e
    if "token_file" in options and not options["token_file"]:
        raise ConfigError("haystack remote option token_file is empty")
    try:
        timeout = float(options.get("timeout", "30"))
    except ValueError:
        timeout = 0.0
    if not 0 < timeout < float("inf"):
        raise ConfigError("haystack remote option timeout: expected a positive number of seconds")
    namespace = parsed.path.strip("/")
    if namespace and not NAMESPACE.match(namespace):
        raise ConfigError(f"haystack namespace {namespace!r}: use letters, digits, '.', "
                          "'_', '-' and '/' only")
    return masters, options.get("token_file"), timeout, namespace


class NodeRegistry:
    """The cluster's registry of cachefs nodes, through its masters (`master.client`)."""

    def __init__(self, masters: list[str], token: str | None, timeout: float) -> None:
        self.masters = masters
        self.timeout = timeout
        self.client = MasterClient(masters, token, timeout=timeout)

    @classmethod
    def from_url(cls, url: str, timeout: float | None = None) -> NodeRegistry:
        """The registry of the cluster a haystack:// URL names, with the token its remote
        uses (`token_file=`, else CACHEFS_TOKEN); `timeout` bounds each call (default: the
        URL's). ConfigError for any other URL."""
        if not url.startswith("haystack://"):
            raise ConfigError("the node registry is a haystack cluster's: the remote's URL "
                              "must be haystack://MASTERS...")
        masters, token_file, url_timeout, _ = parse_url(url)
        try:
            token = load_token(token_file)
        except UsageError as e:
            raise ConfigError(f"haystack remote: {e}") from e
        return cls(masters, token, timeout or url_timeout)

    def list_nodes(self, serving: str = "") -> list[NodeInfo]:
        return self.client.list_nodes(serving)

    def register(self, name: str, peer_address: str, cache_bytes: int,
                 serving: list[str]) -> float:
        """Register or heartbeat a node; the masters' node timeout."""
        return self.client.register_node(name, peer_address, cache_bytes, serving=serving)

    def close(self) -> None:
        self.client.close()


class HaystackRemote(ParallelHas):
    """A repository on a haystack cluster (see the module docstring)."""

    def __init__(self, masters: str | list[str], token: str | None = None,
                 timeout: float = 30.0, namespace: str = "") -> None:
        self.masters = parse_masters(masters)
        namespace = namespace.strip("/")
        if namespace and not NAMESPACE.match(namespace):
            raise ConfigError(f"haystack namespace {namespace!r}: use letters, digits, '.', "
                              "'_', '-' and '/' only")
        self.namespace = namespace + "/" if namespace else ""
        self.url = "haystack://" + ",".join(self.masters) + (f"/{namespace}" if namespace
                                                             else "")
        self.master = MasterClient(self.masters, token, timeout=timeout)
        self.storage = ReplicatedStorage(self.master.placement, token=token, timeout=timeout)
        self._names = NameRecorder(self.master)
        self.parallelism = NAME_LOOKUPS
        self.pool_name = "cachefs-haystack"

    @classmethod
    def from_url(cls, url: str) -> HaystackRemote:
        masters, token_file, timeout, namespace = parse_url(url)
        try:
            token = load_token(token_file)
        except UsageError as e:
            raise ConfigError(f"haystack remote: {e}") from e
        return cls(masters, token, timeout, namespace)

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        needle = chunk_hash(key)
        if needle is not None:
            try:
                return self.storage.get(needle, start, length)
            except ObjectNotFound:
                pass  # a chunk-shaped name whose data did not hash to it: in the directory
        entry = self.master.dir_get(self.namespace + key)
        if entry is None:
            raise ObjectNotFound(f"object {key} not found in {self.url}")
        if entry.inline is not None:
            stop = None if length is None else start + length
            return entry.inline[start:stop]
        assert entry.needle is not None
        return self.storage.get(entry.needle, start, length)

    def has(self, keys: Iterable[str]) -> set[str]:
        keys = list(dict.fromkeys(keys))
        chunks = {k: n for k in keys if (n := chunk_hash(k)) is not None}
        found: set[str] = set()
        if chunks:
            # A chunk is present exactly when its needle is stored: a name whose needle is
            # gone is not readable, so the directory is not asked (one raft barrier saved per
            # new chunk of a commit).
            present = self.storage.has_many(list(chunks.values()))
            for (key, needle), ok in zip(chunks.items(), present):
                if ok:  # possibly another namespace's: name it here too (the caller will
                    found.add(key)  # refer to it instead of uploading it)
                    self._names.add(DirEntry(self.namespace + key, needle=needle, size=0))
        found.update(super().has(k for k in keys if k not in chunks))
        return found

    def _exists(self, key: str) -> bool:
        return self.master.dir_get(self.namespace + key) is not None

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        self._names.flush()
        cut = len(self.namespace)
        for e in self.master.dir_list(self.namespace + prefix):
            yield ObjectInfo(e.name[cut:], e.size, e.mtime_ns, self._etag(e))

    @staticmethod
    def _etag(entry: DirEntry) -> str:
        if entry.needle is not None:
            return entry.needle.hex()
        return blake3.blake3(entry.inline or b"").hexdigest()[:32]

    # -- writing ---------------------------------------------------------------------------

    def _entry(self, key: str, data: bytes) -> DirEntry:
        """A directory entry for `data`, writing its needle first when it is not inline."""
        name = self.namespace + key
        if len(data) <= INLINE_MAX:
            return DirEntry(name, inline=data)
        needle = blake3.blake3(data).digest()
        self.storage.put_many([(needle, data)])
        return DirEntry(name, needle=needle, size=len(data))

    def put(self, key: str, data: bytes | memoryview) -> None:
        data = bytes(data)
        needle = chunk_hash(key)
        if needle is not None and blake3.blake3(data).digest() == needle:
            self.storage.put_many([(needle, data)])
            self._names.add(DirEntry(self.namespace + key, needle=needle, size=len(data)))
            return
        self.master.dir_put(self._entry(key, data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self._names.flush()  # a chunk name still queued is "present" too
        return self.master.dir_put(self._entry(key, bytes(data)), if_absent=True)

    def put_if_latest(self, key: str, data: bytes, prefix: str) -> bool:
        """Create `key` only if it is absent and no key starting with `prefix` sorts after it,
        in one raft command: ref compare-and-swap without a second round trip to check for a
        newer generation (`cachefs.dataset.refs`)."""
        self._names.flush()
        return self.master.dir_put(self._entry(key, bytes(data)), if_absent=True,
                                   last_under=self.namespace + prefix)

    def delete(self, key: str) -> None:
        self._names.flush()
        self.master.dir_delete(self.namespace + key)

    def flush(self) -> None:
        """Chunk data is durable when `put` returns; this waits until their names are
        recorded in the directory too (and raises what recording them raised)."""
        self._names.flush()

    def close(self) -> None:
        try:
            self._names.close()
        finally:
            self._close_pool()
            self.storage.close()
            self.master.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
