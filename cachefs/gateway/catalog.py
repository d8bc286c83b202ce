"""The gateway's view of a remote's datasets: versions by ref, entries by path, bytes by range.

One `Catalog` serves every dataset of the gateway's configured remote through the node's cache
tiers: one memory tier and one SSD cache dir shared by all datasets (and with every mount on the
node that uses the same cache dir), and one `TieredStore` per dataset (the peer tier asks peers
per dataset). What a request names is a dataset of that remote, a ref and a path, never a place
to connect to.

Refs are resolved to commits and remembered for `ref_ttl` seconds (a branch that moves is seen
within that time; a commit hash never changes). A file's bytes are planned as pieces
(`plan`) and read piece by piece: a range inside a chunk from the fastest tier that has it
(`TieredStore.chunk_range`: from the SSD only the covering sub-blocks); a long read asks for
whole chunks and prefetches the next ones, as the mount's readahead does. The `*_now` methods
answer without waiting where memory (or the page cache) holds the answer, else None: the
gateway's HTTP loop calls them first and crosses into the tiers' trio code only on a miss
(cachefs.gateway.bridge).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from cachefs.cache.base import CacheTier
from cachefs.cache.memory import MemoryCache
from cachefs.cache.peer import PeerTier
from cachefs.cache.singleflight import SingleFlight
from cachefs.cache.tiered import TieredStore
from cachefs.dataset.objects import Kind, TreeEntry, zero_chunk_hash
from cachefs.dataset.repo import Repository, chunk_key
from cachefs.errors import CorruptObject, PathNotFound, RefNotFound
from cachefs.lookup import FileLayout
from cachefs.names import check_name, is_hash_prefix, split_path

log = logging.getLogger("cachefs.gateway.catalog")

DEFAULT_REF_TTL = 5.0
READ_PIECE = 1 << 20  # a response body is sent in pieces of at most this many bytes
WHOLE_CHUNK_MIN = 1 << 20  # a read of this much of an extent or more asks for the whole chunk
READAHEAD_CHUNKS = 4  # chunks fetched ahead of a long read
SYMLINK_HOPS = 8
LISTING_ORDERS_KEPT = 64
PER_STORE = ("origin_", "peer_", "trees_", "tree_")  # figures each dataset's store has


@dataclass(frozen=True)
class Version:
    """One resolved version of a dataset: what a REF named when it was resolved."""

    dataset: str
    ref: str
    commit: str
    tree: str
    time_ns: int
    by_hash: bool  # REF was a commit hash (prefix): the response never changes


@dataclass
class _Dataset:
    store: TieredStore
    created_ns: int
    zero_chunks: frozenset[str]
    refs: dict[str, tuple[float, Version]] = field(default_factory=dict)


@dataclass(frozen=True)
class Piece:
    """Part of one extent of a file: `length` bytes at `offset` in `chunk`."""

    chunk: str
    offset: int
    length: int
    extent_index: int
    zero: bool  # a chunk of zeros: never read
    whole_chunk: bool  # a long read: the whole chunk is fetched (and kept in memory)
    small_file: bool  # likely a pack of small files: the SSD tier reads the pack ahead


@dataclass(frozen=True)
class Listed:
    """One key of a listing: `key` relative to the listing's root, its entry."""

    key: str
    entry: TreeEntry


def sort_key(entry: TreeEntry) -> bytes:
    """Where an entry's keys sort among its siblings' (S3 lists keys in UTF-8 byte order): a
    directory `a` holds keys `a/...`, which sort after a file `a-b` ('-' < '/')."""
    name = entry.name.encode()
    return name + b"/" if entry.kind is Kind.DIR else name


class Catalog:
    """Datasets of one repository, read through shared cache tiers."""

    def __init__(self, repo: Repository, memory: MemoryCache, disk: CacheTier | None, *,
                 ref_ttl: float = DEFAULT_REF_TTL, origin_timeout: float = 30.0,
                 origin_parallelism: int = 16,
                 peer_factory: Callable[[str, int], PeerTier | None] | None = None) -> None:
        self.repo = repo
        self.memory = memory
        self.disk = disk
        self.ref_ttl = ref_ttl
        self.origin_timeout = origin_timeout
        self.origin_parallelism = origin_parallelism
        self._peer_factory = peer_factory
        self._datasets: dict[str, _Dataset] = {}
        self._opening: SingleFlight[_Dataset] = SingleFlight()
        self._resolving: SingleFlight[Version] = SingleFlight()
        self._orders: OrderedDict[str, tuple[list[bytes], list[int]]] = OrderedDict()
        self.nursery: trio.Nursery | None = None  # set by the server: where prefetches run

    # -- datasets and versions ------------------------------------------------------------
    async def datasets(self) -> list[str]:
        return sorted(await trio.to_thread.run_sync(self.repo.datasets))

    async def refs(self, dataset: str) -> tuple[list[str], list[str]]:
        """(branches, tags) of `dataset`, sorted."""
        await self._dataset(dataset)

        def both() -> tuple[list[str], list[str]]:
            return (sorted(self.repo.refs.list(dataset, "heads")),
                    sorted(self.repo.refs.list(dataset, "tags")))

        return await trio.to_thread.run_sync(both)

    async def _dataset(self, name: str) -> _Dataset:
        found = self._datasets.get(name)
        if found is not None:
            return found
        check_name(name, "dataset name", existing=True)
        return await self._opening.run(name, lambda: self._open(name))

    async def _open(self, name: str) -> _Dataset:
        settings = await trio.to_thread.run_sync(self.repo.dataset, name)
        peer = None if self._peer_factory is None else self._peer_factory(name,
                                                                         settings.chunk_size)
        store = TieredStore(self.repo, self.memory, self.disk, origin_timeout=self.origin_timeout,
                            origin_parallelism=self.origin_parallelism, peer=peer)
        opened = _Dataset(store, settings.created_ns,
                          frozenset({zero_chunk_hash(settings.chunk_size)}))
        self._datasets[name] = opened
        return opened

    async def created(self, names: list[str]) -> list[int]:
        """When each dataset was created (ns)."""
        return [(await self._dataset(name)).created_ns for name in names]

    def stats(self) -> dict[str, object]:
        """The tiers' figures: memory and SSD as one store reports them (all share them), the
        origin's and peers' summed over the datasets' stores."""
        stores = [d.store for d in self._datasets.values()]
        if not stores:
            return {}
        total = dict(stores[0].stats())
        total.pop("peer_ring", None)
        for store in stores[1:]:
            for key, value in store.stats().items():
                if key.startswith(PER_STORE) and isinstance(value, int):
                    total[key] = int(total.get(key, 0)) + value  # type: ignore[call-overload]
        total["datasets_open"] = len(stores)
        return total

    def version_now(self, dataset: str, ref: str) -> Version | None:
        """The version `ref` names if it was resolved within `ref_ttl` (or is a commit hash
        resolved before), else None: then `version`."""
        opened = self._datasets.get(dataset)
        if opened is None:
            return None
        known = opened.refs.get(ref)
        if known is not None and (known[1].by_hash or time.monotonic() - known[0] < self.ref_ttl):
            return known[1]
        return None

    async def version(self, dataset: str, ref: str) -> Version:
        """The version `ref` (a branch, a tag, or a commit hash prefix) names now."""
        opened = await self._dataset(dataset)
        known = self.version_now(dataset, ref)
        if known is not None:
            return known
        return await self._resolving.run(f"{dataset}\0{ref}",
                                         lambda: self._resolve(opened, dataset, ref))

    async def _resolve(self, opened: _Dataset, dataset: str, ref: str) -> Version:
        resolved = await trio.to_thread.run_sync(self.repo.resolve, dataset, ref)
        commit = await opened.store.commit(resolved.commit)
        version = Version(dataset, ref, resolved.commit, commit.tree, commit.time_ns,
                          by_hash=resolved.kind is None)
        opened.refs[ref] = (time.monotonic(), version)
        return version

    async def pinned(self, dataset: str, ref: str, commit: str) -> Version:
        """The version of `commit` as `ref` showed it (a listing's continuation): it must be a
        commit of `dataset`."""
        opened = await self._dataset(dataset)
        if not is_hash_prefix(commit) or len(commit) != 64:
            raise RefNotFound(f"not a commit: {commit!r}")
        try:
            found = await opened.store.commit(commit)
        except CorruptObject:
            raise
        except Exception as e:
            raise RefNotFound(f"no commit {commit[:12]} in dataset {dataset!r}") from e
        if found.dataset != dataset:
            raise RefNotFound(f"no commit {commit[:12]} in dataset {dataset!r}")
        return Version(dataset, ref, commit, found.tree, found.time_ns, by_hash=True)

    # -- entries ----------------------------------------------------------------------------
    def root(self, version: Version) -> TreeEntry:
        return TreeEntry("", Kind.DIR, 0o755, 0, version.time_ns, version.tree)

    def entry_now(self, version: Version, path: str) -> TreeEntry | None:
        """`entry` where every tree on the way is decoded in memory and no symlink is on it,
        else None (then `entry`). PathNotFound where the cached trees say so."""
        store = self._datasets[version.dataset].store
        entry = self.root(version)
        walked: list[str] = []
        for part in split_path(path):
            if not entry.is_dir:
                raise PathNotFound(f"{'/'.join(walked)} is not a directory")
            tree = store.cached_tree(entry.hash)
            if tree is None:
                return None
            child = tree.get(part)
            walked.append(part)
            if child is None:
                raise PathNotFound(f"no such file or directory: {'/'.join(walked)}")
            if child.kind is Kind.SYMLINK:
                return None
            entry = child
        return entry

    async def entry(self, version: Version, path: str, follow: bool = True) -> TreeEntry:
        """The entry at `path` in `version`; symlinks are followed inside the version (never out
        of it) when `follow`."""
        store = (await self._dataset(version.dataset)).store
        parts = split_path(path)
        hops = 0
        walked: list[str] = []
        entry = self.root(version)
        while parts:
            part = parts.pop(0)
            if not entry.is_dir:
                raise PathNotFound(f"{'/'.join(walked)} is not a directory")
            child = (await store.tree(entry.hash)).get(part)
            if child is None:
                raise PathNotFound(f"no such file or directory: {'/'.join([*walked, part])}")
            if child.kind is Kind.SYMLINK and (follow or parts):
                hops += 1
                if hops > SYMLINK_HOPS:
                    raise PathNotFound(f"too many symlinks in {path!r}")
                target = child.target
                if target.startswith("/"):
                    raise PathNotFound(f"{'/'.join([*walked, part])} points outside the "
                                       f"dataset ({target!r})")
                base = walked
                resolved: list[str] = list(base)
                for piece in target.split("/"):
                    if piece in ("", "."):
                        continue
                    if piece == "..":
                        if not resolved:
                            raise PathNotFound(f"{'/'.join([*walked, part])} points outside "
                                               f"the dataset ({target!r})")
                        resolved.pop()
                    else:
                        resolved.append(piece)
                parts = resolved + parts
                walked = []
                entry = self.root(version)
                continue
            walked.append(part)
            entry = child
        return entry

    async def children(self, version: Version, entry: TreeEntry) -> tuple[TreeEntry, ...]:
        store = (await self._dataset(version.dataset)).store
        return (await store.tree(entry.hash)).entries

    async def walk(self, version: Version, prefix: str, after: str, recurse: bool
                   ) -> AsyncIterator[Listed]:
        """Entries of `version` whose keys (paths, a directory's ending in '/') start with
        `prefix` and sort after `after`, in UTF-8 byte order of their keys: files (and
        symlinks), and directories themselves where `recurse` is False (S3's delimiter '/')."""
        store = (await self._dataset(version.dataset)).store
        # The deepest directory that holds every key under `prefix`.
        dir_part, _, _ = prefix.rpartition("/")
        start = self.root(version)
        base = ""
        if dir_part:
            try:
                start = await self.entry(version, dir_part, follow=False)
            except PathNotFound:
                return
            if not start.is_dir:
                return
            base = dir_part + "/"
        async for item in self._walk_dir(store, start, base, prefix, after, recurse):
            yield item

    async def _walk_dir(self, store: TieredStore, entry: TreeEntry, base: str, prefix: str,
                        after: str, recurse: bool) -> AsyncIterator[Listed]:
        tree = await store.tree(entry.hash)
        keys, order = self._listing_order(entry.hash, tree.entries)
        base_b, prefix_b, after_b = base.encode(), prefix.encode(), after.encode()
        # The first child that can hold a key both under `prefix` and after `after`: the keys
        # of a child sorting before the first path component either names here are all before
        # it (a directory's keys all start with its own key).
        start = 0
        for bound in (prefix_b, after_b):
            if bound.startswith(base_b) and len(bound) > len(base_b):
                rest = bound[len(base_b):]
                slash = rest.find(b"/")
                start = max(start, bisect.bisect_left(keys, rest if slash < 0
                                                      else rest[:slash + 1]))
            elif bound > base_b and not bound.startswith(base_b):
                return  # everything here sorts before `after` or beside `prefix`
        for i in range(start, len(order)):
            child = tree.entries[order[i]]
            key_b = base_b + keys[i]
            if not key_b.startswith(prefix_b):
                if child.is_dir and prefix_b.startswith(key_b):
                    pass  # the prefix continues inside this directory
                elif key_b > prefix_b:
                    return
                else:
                    continue
            key = key_b.decode()
            if not child.is_dir:
                if key_b > after_b:
                    yield Listed(key, child)
                continue
            inside = after_b.startswith(key_b)
            if after_b >= key_b and not inside:
                continue  # every key in it sorts before `after`
            if not recurse and key_b.startswith(prefix_b):
                if key_b != after_b:
                    yield Listed(key, child)  # a common prefix (S3's delimiter '/')
                continue
            async for item in self._walk_dir(store, child, key, prefix, after, recurse):
                yield item

    def _listing_order(self, name: str, entries: tuple[TreeEntry, ...]
                       ) -> tuple[list[bytes], list[int]]:
        """(sort keys in listing order, entry indexes in that order) of a tree: name order
        except where a directory sorts after a name continuing it below '/'. Remembered for
        the last few trees (a paged listing comes back to the same directory)."""
        known = self._orders.get(name)
        if known is not None:
            self._orders.move_to_end(name)
            return known
        keys = [sort_key(e) for e in entries]
        order = list(range(len(entries)))
        if any(keys[i] > keys[i + 1] for i in range(len(keys) - 1)):
            order.sort(key=keys.__getitem__)
            keys = [keys[i] for i in order]
        self._orders[name] = (keys, order)
        while len(self._orders) > LISTING_ORDERS_KEPT:
            self._orders.popitem(last=False)
        return keys, order

    # -- bytes ------------------------------------------------------------------------------
    def plan(self, version: Version, entry: TreeEntry, start: int, end: int) -> list[Piece]:
        """The pieces (at most READ_PIECE each) that make bytes [start, end) of file `entry`.
        CorruptObject if its extents do not cover it."""
        zero_chunks = self._datasets[version.dataset].zero_chunks
        layout = FileLayout(entry.extents)
        if layout.size < entry.size and end > layout.size:
            raise CorruptObject(f"{entry.name!r}: extents cover {layout.size} of {entry.size} "
                                "bytes")
        long_read = end - start >= WHOLE_CHUNK_MIN
        pieces: list[Piece] = []
        for index, lo, length in layout.pieces(start, end - start):
            extent = entry.extents[index]
            for piece_lo in range(lo, lo + length, READ_PIECE):
                pieces.append(Piece(extent.chunk, piece_lo, min(READ_PIECE, lo + length - piece_lo),
                                    index, extent.chunk in zero_chunks,
                                    long_read and extent.length >= WHOLE_CHUNK_MIN,
                                    entry.size < WHOLE_CHUNK_MIN))
        return pieces

    def piece_now(self, version: Version, piece: Piece) -> bytes | memoryview | None:
        """A piece's bytes if memory or the page cache holds them, else None (then `piece`)."""
        if piece.zero:
            return bytes(piece.length)
        store = self._datasets[version.dataset].store
        data = store.get_range_now(chunk_key(piece.chunk), piece.offset, piece.length)
        if data is not None and len(data) != piece.length:
            raise self._short(piece)
        return data

    async def piece(self, version: Version, piece: Piece) -> bytes | memoryview:
        """A piece's verified bytes from the fastest tier that has them."""
        if piece.zero:
            return bytes(piece.length)
        store = (await self._dataset(version.dataset)).store
        if piece.whole_chunk:
            whole = await store.chunk(piece.chunk)
            data: bytes | memoryview = memoryview(whole)[piece.offset : piece.offset
                                                         + piece.length]
        else:
            data = await store.chunk_range(piece.chunk, piece.offset, piece.length,
                                           piece.small_file)
        if len(data) != piece.length:
            raise self._short(piece)
        return data

    def _short(self, piece: Piece) -> CorruptObject:
        log.error("an extent (%d+%d) does not fit chunk %s: refusing the read", piece.offset,
                  piece.length, piece.chunk)
        return CorruptObject(f"a file's tree lies about chunk {piece.chunk[:12]}")

    async def prefetch(self, version: Version, entry: TreeEntry, after_index: int) -> None:
        """Fetch the READAHEAD_CHUNKS chunks after extent `after_index` in the background."""
        opened = await self._dataset(version.dataset)
        if self.nursery is None:
            return
        for ahead in entry.extents[after_index + 1 : after_index + 1 + READAHEAD_CHUNKS]:
            if ahead.chunk not in opened.zero_chunks:
                opened.store.prefetch(self.nursery, chunk_key(ahead.chunk))
