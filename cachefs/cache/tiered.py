"""The read path's object source: memory, local SSD, peers, then the origin, one fetch per object.

A request for an object (a chunk, a tree, a commit) is answered by the first tier that has it,
and every faster tier is filled on the way back. With a peer tier (`peer.py`), a chunk missing
from memory and SSD is asked of its owner on the peer ring before the origin. Concurrent misses
on the same key share one fetch (single flight), so a hundred readers of one packed chunk cost
one origin request. The origin is called on worker threads (boto3 and the file remote block)
through a capacity limiter that bounds parallel requests, and within a deadline: a read that the
origin cannot serve in time fails (EIO for the reader) instead of hanging the mount; the
abandoned worker thread ends on its own when the client library times out. Every object from the
origin is verified against its name before anyone sees it; a corrupt one is counted and refused.
The disk tier verifies its own entries on every hit (by the sums of the sub-blocks read; by hash
without sums). A failing cache tier is a logged miss, never an error. A read of part of a chunk
(`chunk_range`) that is on the SSD but not in memory reads only that part from the SSD, and does
not pull the whole chunk into memory.

Runs inside the FUSE daemon's trio loop; the memory tier is touched directly (it is an
in-process dict), and so is a range of the disk tier that the page cache holds (a worker thread
would cost more than reading it); the rest of the disk tier, the peer tier and the origin run
on worker threads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from cachefs.cache.base import Blob, CacheTier
from cachefs.cache.memory import MemoryCache
from cachefs.cache.peer import PEER_KEYS, PeerTier
from cachefs.cache.singleflight import SingleFlight
from cachefs.dataset.objects import (
    COMMIT_MAGIC,
    TREE_MAGIC,
    Commit,
    Tree,
    check_stored_meta,
    decode_commit,
    decode_tree,
    hash_bytes,
)
from cachefs.dataset.repo import Repository, chunk_key, commit_key, tree_key
from cachefs.errors import CachefsError, CorruptObject, RemoteError

log = logging.getLogger("cachefs.cache.tiered")

# The numeric figures of `TieredStore.stats()`: (key, whether it counts events, what it is).
# Declared once here for every door that exports them as metrics (the mount's `cachefs_mount_*`,
# the gateway's `cachefs_gateway_*`): counters get ``_total``, the rest are gauges.
TIER_FIGURES: tuple[tuple[str, bool, str], ...] = (
    ("memory_hits", True, "chunk reads answered by the memory tier"),
    ("ssd_hits", True, "chunk reads answered by the SSD tier"),
    ("ssd_misses", True, "chunk reads the SSD tier could not answer"),
    ("ssd_evictions", True, "objects evicted from the SSD tier by this process"),
    ("ssd_range_reads", True,
     "reads of part of a chunk from the SSD tier (without reading the whole chunk)"),
    ("ssd_bytes_read", True, "bytes read from the SSD tier"),
    ("ssd_direct_reads", True, "SSD tier reads done with O_DIRECT"),
    ("ssd_pack_prefetches", True,
     "packed chunks whose neighbours were prefetched into memory from the SSD tier"),
    ("ssd_pack_prefetches_skipped", True,
     "pack prefetches skipped (memory already held them, or no room)"),
    ("origin_requests", True, "objects fetched from the origin (the remote)"),
    ("origin_bytes", True, "bytes fetched from the origin"),
    ("origin_errors", True, "origin fetches that failed"),
    ("origin_timeouts", True, "origin fetches that ran past --timeout"),
    ("corrupt_chunks", True,
     "chunks refused because their bytes did not match their name (origin or SSD tier)"),
    ("peer_hits", True, "chunks the peer tier answered"),
    ("peer_bytes", True, "bytes the peer tier answered"),
    ("peer_misses", True, "chunks asked of the peer tier that no member could answer"),
    ("peer_errors", True, "peer calls that failed (refused, unreachable, ...)"),
    ("peer_timeouts", True, "peer calls that ran past their deadline"),
    ("hedged_requests", True,
     "chunks also asked of a second member because the first was slow"),
    ("peer_corrupt", True,
     "chunks a peer served with bytes not matching their name (the peer is quarantined)"),
    ("memory_bytes_used", False, "bytes of chunks held in the memory tier"),
    ("memory_capacity_bytes", False, "capacity of the memory tier, in bytes"),
    ("ssd_bytes_used", False,
     "bytes used in the SSD cache directory (node-wide: every process sharing it)"),
    ("ssd_capacity_bytes", False, "capacity of the SSD tier, in bytes"),
    ("trees_cached", False, "decoded directory trees held in memory"),
    ("tree_entries_cached", False, "entries of the decoded directory trees held in memory"),
    ("live_peers", False, "peer ring members answering now"),
    ("quarantined_peers", False,
     "peer ring members this process skips for having served a corrupt chunk"),
)


def object_is_intact(key: str, data: bytes) -> bool:
    """True if `data` is the object `key` names: its hash matches (trees and commits are
    decompressed first, not parsed: parsing a 100,000-entry tree costs a second, hashing it
    milliseconds, and the reader decodes it once anyway)."""
    kind, _, name = key.partition("/")
    name = name.rpartition("/")[2]
    try:
        if kind == "chunks":
            return hash_bytes(data) == name
        if kind == "trees":
            check_stored_meta(name, data, TREE_MAGIC)
            return True
        if kind == "commits":
            check_stored_meta(name, data, COMMIT_MAGIC)
            return True
    except CorruptObject:
        return False
    return False


@dataclass
class OriginStats:
    requests: int = 0
    bytes: int = 0
    errors: int = 0
    timeouts: int = 0
    corrupt: int = 0


class TieredStore:
    """Objects by key from memory -> disk -> origin, with single flight and verification."""

    def __init__(
        self,
        repo: Repository,
        memory: MemoryCache,
        disk: CacheTier | None,
        origin_timeout: float = 30.0,
        origin_parallelism: int = 16,
        tree_cache_entries: int = 2_000_000,
        peer: PeerTier | None = None,
    ) -> None:
        self.repo = repo
        self.memory = memory
        self.disk = disk
        self.peer = peer
        # Peer calls wait on the network, not on the CPU: as many as origin requests may be
        # in flight (each bounded by its own deadline).
        self._peer_limiter = trio.CapacityLimiter(origin_parallelism)
        self.origin_timeout = origin_timeout
        self.origin = OriginStats()
        self._origin_limiter = trio.CapacityLimiter(origin_parallelism)
        self._disk_limiter = trio.CapacityLimiter(8)
        self._flights: SingleFlight[Blob] = SingleFlight()
        self._tree_loads: SingleFlight[Tree] = SingleFlight()
        # Decoded trees, bounded by their total number of entries (what costs memory).
        self._trees: OrderedDict[str, Tree] = OrderedDict()
        self._tree_entries = 0
        self._tree_entries_limit = tree_cache_entries

    # -- objects --------------------------------------------------------------------------
    async def get(self, key: str, *, into_memory: bool = True) -> Blob:
        """The verified bytes of `key`, from the fastest tier that has them."""
        data = self.memory.get(key)
        if data is not None:
            return data
        return await self._flights.run(key, lambda: self._fetch(key, into_memory))

    async def get_range(self, key: str, offset: int, length: int,
                        prefetch_entry: bool = False) -> bytes | memoryview:
        """Bytes [offset, offset + length) of `key` (fewer if the object ends first).

        From memory if the object is there (a slice); else from the disk tier, which reads and
        checks only the sub-blocks covering the range, and the range does not enter the memory
        tier (whole objects get there from the origin and through readahead); else the whole
        object is fetched from the origin as by `get` (memory and disk filled) and sliced.
        A range the page cache holds is read right here, on the event loop (a worker thread
        would cost more than the read); others on a worker thread. `prefetch_entry`: see
        `DiskCache.get_range` (the rest of the object is wanted soon: a pack of small files).
        """
        data = self.memory.get(key)
        if data is None and self.disk is not None and key not in self._flights:
            get_range = getattr(self.disk, "get_range", None)
            if get_range is not None:
                if_cached = getattr(self.disk, "get_range_if_cached", None)
                part = None if if_cached is None else if_cached(key, offset, length)
                if part is not None:
                    return part
                part = await self._disk_call(get_range, key, offset, length, prefetch_entry)
                if part is not None:
                    return part  # type: ignore[return-value]
                # A miss, or a corrupt entry (dropped): the origin, not the disk again. Another
                # reader's fetch may have finished while we asked the disk: memory first.
                data = self.memory.get(key)
                if data is None:
                    data = await self._flights.run(
                        key, lambda: self._fetch(key, True, ask_disk=False,
                                                 pack=prefetch_entry))
        if data is None:
            data = await self._flights.run(key, lambda: self._fetch(key, True,
                                                                    pack=prefetch_entry))
        return memoryview(data)[offset : offset + length]

    async def _fetch(self, key: str, into_memory: bool, ask_disk: bool = True,
                     pack: bool = False) -> Blob:
        """From the disk tier (unless `ask_disk` is False), a peer or the origin, filling the
        tiers above. `pack`: a small file's chunk, stored with the disk tier's `put_pack`
        where it has one (its other files are read from the entry soon)."""
        if self.disk is not None and ask_disk:
            data = await self._disk_call(self.disk.get, key)
            if data is not None:
                if into_memory:
                    self.memory.put(key, data)
                return data
        data = None
        if self.peer is not None:  # each call bounded by the tier's own deadlines
            data = await self._tier_call(self.peer, self._peer_limiter, self.peer.get, key)
        if data is None:
            data = await self._from_origin(key)
        if into_memory:
            self.memory.put(key, data)
        if self.disk is not None:  # the asker keeps a copy (a peer's chunk too)
            put = getattr(self.disk, "put_pack", None) if pack else None
            await self._disk_call(put or self.disk.put, key, data)
        return data

    async def _disk_call(self, fn: Callable, *args: object) -> object:  # type: ignore[type-arg]
        assert self.disk is not None
        return await self._tier_call(self.disk, self._disk_limiter, fn, *args)

    @staticmethod
    async def _tier_call(tier: CacheTier, limiter: trio.CapacityLimiter,
                         fn: Callable, *args: object) -> object:  # type: ignore[type-arg]
        """`fn(*args)` of a blocking tier on a worker thread; None if it raised."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=limiter)
        except Exception as e:  # a tier promises not to raise; be safe anyway
            log.warning("%s tier failed on %s: %s", tier.name, args[0], e)
            return None

    async def _from_origin(self, key: str) -> bytes:
        self.origin.requests += 1
        started = trio.current_time()
        try:
            with trio.fail_after(self.origin_timeout):
                data = await trio.to_thread.run_sync(
                    self.repo.remote.get, key, limiter=self._origin_limiter,
                    abandon_on_cancel=True)
        except trio.TooSlowError:
            self.origin.timeouts += 1
            raise RemoteError(
                f"origin did not answer for {key} within {self.origin_timeout:g} s") from None
        except CachefsError:
            self.origin.errors += 1
            raise
        except Exception as e:
            self.origin.errors += 1
            raise RemoteError(f"origin failed on {key}: {e}") from e
        self.origin.bytes += len(data)
        if self.peer is not None:  # how long an owner's origin read may take, too
            self.peer.observe_origin(trio.current_time() - started)
        if not await trio.to_thread.run_sync(object_is_intact, key, data):
            self.origin.corrupt += 1
            log.error("object %s from the origin is corrupt (hash mismatch): refused", key)
            raise CorruptObject(f"object {key} from the origin is corrupt", key)
        return data

    async def warm(self, key: str) -> int:
        """Make sure the disk tier holds `key` (without filling memory); bytes fetched."""
        if self.disk is None:
            await self.get(key)
            return 0
        if await self._disk_call(self.disk.contains, key):
            return 0
        data = await self.get(key, into_memory=False)
        return len(data)

    def keys_in_memory(self) -> tuple[Mapping[str, object], ...]:
        """Live maps of the keys this store answers from memory, or soon will: the memory
        tier's entries and the fetches in flight (see `MemoryCache.live_keys`)."""
        return self.memory.live_keys(), self._flights.live_keys()

    def prefetch(self, nursery: trio.Nursery, key: str) -> None:
        """Start fetching `key` in the background unless it is cached or already in flight."""
        if key in self._flights or self.memory.contains(key):
            return
        nursery.start_soon(self._prefetch_quietly, key)

    async def _prefetch_quietly(self, key: str) -> None:
        try:
            await self.get(key)
        except CachefsError as e:
            log.debug("prefetch of %s failed: %s", key, e)

    # -- typed helpers --------------------------------------------------------------------
    async def chunk(self, name: str) -> Blob:
        return await self.get(chunk_key(name))

    async def chunk_range(self, name: str, offset: int, length: int,
                          prefetch_entry: bool = False) -> bytes | memoryview:
        """Bytes [offset, offset + length) of chunk `name` (see `get_range`)."""
        return await self.get_range(chunk_key(name), offset, length, prefetch_entry)

    def cached_tree(self, name: str) -> Tree | None:
        """The decoded tree if it is in memory now, else None (without a wait)."""
        tree = self._trees.get(name)
        if tree is not None:
            self._trees.move_to_end(name)
        return tree

    def get_range_now(self, key: str, offset: int, length: int) -> Blob | None:
        """`get_range` where it needs no wait: from the memory tier, or from a disk entry whose
        covering sub-blocks the page cache holds; else None (nothing counted as a miss)."""
        data = self.memory.get(key)
        if data is not None:
            return memoryview(data)[offset : offset + length]
        if self.disk is None or key in self._flights:
            return None
        if_cached = getattr(self.disk, "get_range_if_cached", None)
        return None if if_cached is None else if_cached(key, offset, length)

    async def tree(self, name: str) -> Tree:
        tree = self._trees.get(name)
        if tree is not None:
            self._trees.move_to_end(name)
            return tree
        return await self._tree_loads.run(name, lambda: self._load_tree(name))

    async def _load_tree(self, name: str) -> Tree:
        stored = await self.get(tree_key(name), into_memory=False)
        # Off the trio thread: a 100,000-entry tree takes about a second to decode, and every
        # FUSE request would wait for it.
        tree = await trio.to_thread.run_sync(decode_tree, name, bytes(stored))
        self._remember_tree(name, tree)
        return tree

    def _remember_tree(self, name: str, tree: Tree) -> None:
        """Cache a decoded tree, evicting the least recently used while over the entry bound
        (the newest tree stays even when it alone is over it)."""
        if name in self._trees:
            return
        self._trees[name] = tree
        self._tree_entries += len(tree.entries)
        while self._tree_entries > self._tree_entries_limit and len(self._trees) > 1:
            _, old = self._trees.popitem(last=False)
            self._tree_entries -= len(old.entries)

    async def commit(self, name: str) -> Commit:
        return decode_commit(name, bytes(await self.get(commit_key(name), into_memory=False)))

    def stats(self) -> dict[str, object]:
        memory = self.memory.stats()
        disk = self.disk.stats() if self.disk is not None else None
        return {
            "memory_hits": memory.hits,
            "memory_bytes_used": memory.used_bytes,
            "memory_capacity_bytes": memory.capacity_bytes,
            "ssd_hits": disk.hits if disk else 0,
            "ssd_misses": disk.misses if disk else 0,
            "ssd_bytes_used": disk.used_bytes if disk else 0,
            "ssd_capacity_bytes": disk.capacity_bytes if disk else 0,
            "ssd_evictions": disk.evictions if disk else 0,
            "ssd_range_reads": disk.range_reads if disk else 0,
            "ssd_bytes_read": disk.bytes_read if disk else 0,
            "ssd_direct_reads": disk.direct_reads if disk else 0,
            "ssd_pack_prefetches": disk.entry_prefetches if disk else 0,
            "ssd_pack_prefetches_skipped": disk.entry_prefetches_skipped if disk else 0,
            "origin_requests": self.origin.requests,
            "origin_bytes": self.origin.bytes,
            "origin_errors": self.origin.errors,
            "origin_timeouts": self.origin.timeouts,
            "corrupt_chunks": self.origin.corrupt + (disk.corrupt if disk else 0),
            "trees_cached": len(self._trees),
            "tree_entries_cached": self._tree_entries,
            **(self.peer.peer_stats() if self.peer is not None else dict.fromkeys(PEER_KEYS, 0)),
            **({"peer_ring": self.peer.membership.state()} if self.peer is not None else {}),
        }
