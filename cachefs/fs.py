"""The read-only file-system core of a mount: inodes, lookups, attributes, reads, readahead.

No pyfuse3 here: `cachefs.fuse.operations` is a thin adapter over this class, and tests can drive
it directly. One instance shows one commit, forever.

Inodes are created on lookup (and by readdirplus) and dropped when the kernel forgets them, so
memory follows what the kernel holds, not the size of the dataset; directory trees are loaded
lazily, one directory at a time, through the tiered store (a million-file dataset mounts as fast
as a ten-file one).

Reads (`read` with a file handle from `open`, or `read_inode` when the kernel sends no OPEN:
see `cachefs.fuse.operations`): the extents covering a request come from the file's
`FileLayout` (the Cython hot path);
each needed piece comes from the tiered store, and the reply is a slice (memoryview) of the
cached chunk, not a copy. A chunk that is on the SSD but not in memory is not pulled into memory
by a read: only the sub-blocks covering the piece are read (`TieredStore.chunk_range`). Chunks of
zeros (sparse regions) are never fetched. Readahead: an open file that is read sequentially gets
a prefetch window, starting at one chunk past the request and doubling on every sequential read
up to `max_readahead_chunks`; a random read resets it. Readahead brings whole chunks into memory,
and so does a chunk's first read from the origin (then its neighbours in path order, small packed
files, come from memory). A sequential read of a long extent (`WHOLE_CHUNK_MIN`) fetches its
chunk whole too, in one disk read that the chunk's other requests join, instead of each request
reading its own range and the readahead reading the chunk again. Sequential is judged when a
request arrives, in the kernel's order, not when it completes: the kernel keeps several readahead
requests in flight, and they finish in any order.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from cachefs.cache.compiled_reads import CompiledReads
from cachefs.cache.tiered import TieredStore
from cachefs.dataset.objects import Extent, Kind, TreeEntry, zero_chunk_hash
from cachefs.errors import CachefsError
from cachefs.lookup import FileLayout

log = logging.getLogger("cachefs.fs")

ROOT_INODE = 1
XATTR_COMMIT = b"user.cachefs.commit"
XATTR_HASH = b"user.cachefs.hash"
XATTR_INFO = b"user.cachefs.info"  # root only: what is mounted (JSON)
XATTR_STATS = b"user.cachefs.stats"  # root only: counters (JSON)
XATTR_WARMUP = b"user.cachefs.warmup"  # files: fetch into the SSD tier; value = bytes fetched
# A sequentially read extent at least this long is fetched as its whole chunk (see above).
WHOLE_CHUNK_MIN = 1 << 20
_TYPE_BITS = {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}


class FsError(Exception):
    """An errno for the caller (the FUSE layer turns it into FUSEError)."""

    def __init__(self, errno_value: int) -> None:
        super().__init__(os.strerror(errno_value))
        self.errno = errno_value


def _first_fs_error(group: BaseExceptionGroup) -> BaseException:
    """The errno a failed multi-piece read answers with: its first piece's FsError when every
    piece failed with one, else the group itself (a cancellation must stay one)."""
    errors, rest = group.split(FsError)
    if errors is None or rest is not None:
        return group
    first: BaseException = errors
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


@dataclass(frozen=True)
class MountOptions:
    uid: int
    gid: int
    umask: int = 0
    max_readahead_chunks: int = 16
    # Warmups (`user.cachefs.warmup`) of this mount fetching at once; more wait for a slot, so
    # no caller can queue unbounded origin fetches.
    max_warmups: int = 4


@dataclass(frozen=True)
class Caller:
    """Who made a request (the FUSE request's uid, gid and pid; pid 0 when not known)."""

    uid: int
    gid: int
    pid: int = 0


# The daemon itself (and in-process callers): may do anything, like root.
TRUSTED_CALLER = Caller(0, 0)


def _supplementary_groups(pid: int) -> frozenset[int]:
    """The supplementary groups of process `pid` (FUSE sends only the primary gid); empty when
    they cannot be read (another pid namespace, an exited caller): then the primary gid alone
    decides (the kernel's default_permissions check, which sees every group, still applies)."""
    if pid <= 0:
        return frozenset()
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass
class Attributes:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    mtime_ns: int


class Inode:
    """One entry the kernel knows, with its lookup count."""

    __slots__ = ("entry", "ino", "key", "layout", "lookups")

    def __init__(self, ino: int, entry: TreeEntry, key: tuple[int, str]) -> None:
        self.ino = ino
        self.entry = entry
        self.key = key  # (parent inode, name): the same entry always gets the same inode
        self.lookups = 0
        self.layout: FileLayout | None = None


@dataclass
class Handle:
    inode: Inode
    next_offset: int = 0
    window: int = 0  # chunks of readahead


@dataclass
class ReadCounters:
    requests: int = 0
    bytes: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # request size -> count
    bad_extents: int = 0  # reads refused because an extent did not fit its chunk
    open_requests: int = 0  # OPENs the kernel sent (at most one without OPEN: see fuse.operations)


class DatasetFS:
    """One commit of a dataset as a read-only directory tree."""

    def __init__(self, store: TieredStore, commit: str, tree: str, commit_time_ns: int,
                 chunk_size: int, options: MountOptions, info: dict[str, object]) -> None:
        self.store = store
        # Sparse regions of large files are whole chunks of zeros: known by name, never fetched.
        self.zero_chunks = frozenset({zero_chunk_hash(chunk_size)})
        self._started = time.monotonic()
        self.commit = commit
        self.options = options
        self.info = info
        # What the daemon reports about itself beside the counters (e.g. "pinned"), in stats.
        self.status: dict[str, object] = {}
        root = TreeEntry("", Kind.DIR, 0o755, 0, commit_time_ns, tree)
        self.root = Inode(ROOT_INODE, root, (0, ""))
        self.root.lookups = 1
        self._inodes: dict[int, Inode] = {ROOT_INODE: self.root}
        self._by_key: dict[tuple[int, str], int] = {}
        self._next_ino = ROOT_INODE + 1
        self._handles: dict[int, Handle] = {}
        self._streams: dict[int, Handle] = {}  # inode -> reads without OPEN (read_inode)
        self._next_fh = 1
        self.reads = ReadCounters()
        self.nursery: trio.Nursery | None = None  # set by the daemon, for readahead tasks
        self._warmups = trio.CapacityLimiter(options.max_warmups)
        # The disk tier's compiled read path, when the mount daemon runs one (set before the
        # first lookup): small files' inodes are registered with it as they are created.
        self.compiled: CompiledReads | None = None

    # -- inodes ---------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        try:
            return self._inodes[ino]
        except KeyError:
            raise FsError(errno.ENOENT) from None

    def _remember(self, parent: int, entry: TreeEntry) -> Inode:
        key = (parent, entry.name)
        ino = self._by_key.get(key)
        if ino is not None:
            return self._inodes[ino]
        node = Inode(self._next_ino, entry, key)
        self._next_ino += 1
        self._inodes[node.ino] = node
        self._by_key[key] = node.ino
        if self.compiled is not None:
            self._offer_compiled(node)
        return node

    def _offer_compiled(self, node: Inode) -> None:
        """Let the compiled read path answer this file's READs: a small file (one piece of a
        pack, where Python's per-READ cost bounds a pass) or a large one (read as a stream:
        its chunks around the page cache, left to Python while the memory tier holds them)."""
        entry = node.entry
        if entry.kind is not Kind.FILE or entry.size <= 0:
            return
        if (sum(x.length for x in entry.extents) != entry.size
                or any(x.length <= 0 for x in entry.extents)):
            return  # a tree that does not add up: Python's read refuses it with EIO
        assert self.compiled is not None
        self.compiled.add(node.ino, [("" if x.chunk in self.zero_chunks else x.chunk, x.offset,
                                      x.length) for x in entry.extents],
                          large=entry.size >= WHOLE_CHUNK_MIN)

    def _drop(self, node: Inode) -> None:
        del self._inodes[node.ino]
        self._by_key.pop(node.key, None)
        self._streams.pop(node.ino, None)
        if self.compiled is not None:
            self.compiled.remove(node.ino)

    def forget(self, ino: int, count: int) -> None:
        node = self._inodes.get(ino)
        if node is None or ino == ROOT_INODE:
            return
        node.lookups -= count
        if node.lookups <= 0:
            self._drop(node)

    @property
    def inode_count(self) -> int:
        return len(self._inodes)

    async def _children(self, node: Inode) -> tuple[TreeEntry, ...]:
        if node.entry.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR)
        return (await self._call(self.store.tree(node.entry.hash))).entries

    async def _call(self, awaitable):  # type: ignore[no-untyped-def]
        """Await a store call, turning cachefs errors into EIO (logged once here)."""
        try:
            return await awaitable
        except CachefsError as e:
            log.error("%s", e)
            raise FsError(errno.EIO) from e

    async def lookup(self, parent: int, name: str) -> Inode:
        node = self.inode(parent)
        if name in (".", ".."):
            raise FsError(errno.ENOENT)  # the kernel answers these itself
        tree = await self._call(self.store.tree(node.entry.hash)) if node.entry.is_dir else None
        if tree is None:
            raise FsError(errno.ENOTDIR)
        entry = tree.get(name)
        if entry is None:
            raise FsError(errno.ENOENT)
        child = self._remember(parent, entry)
        child.lookups += 1
        return child

    def attributes(self, node: Inode) -> Attributes:
        e = node.entry
        mode = _TYPE_BITS[e.kind] | (e.mode & ~self.options.umask & 0o7777)
        if e.kind is Kind.SYMLINK:
            mode = stat.S_IFLNK | 0o777
        return Attributes(
            ino=node.ino, mode=mode, nlink=2 if e.kind is Kind.DIR else 1,
            uid=self.options.uid, gid=self.options.gid, size=e.size,
            blocks=(e.size + 511) // 512, mtime_ns=e.mtime_ns,
        )

    async def readdir(self, ino: int, start: int) -> Iterator[tuple[int, TreeEntry]]:
        """Entries from index `start` on, as (next index, entry). The caller makes an inode of
        each (`readdir_inode`) only as the kernel takes it: the kernel takes a buffer's worth
        per request, so creating inodes for the whole rest of a 100,000-entry directory on
        every request would be quadratic."""
        node = self.inode(ino)
        entries = await self._children(node)
        return ((i + 1, e) for i, e in enumerate(itertools.islice(entries, start, None), start))

    def readdir_inode(self, parent: int, entry: TreeEntry) -> Inode:
        return self._remember(parent, entry)

    @staticmethod
    def confirm_readdir(node: Inode) -> None:
        node.lookups += 1

    def drop_unreferenced(self, nodes: list[Inode]) -> None:
        """Forget inodes readdir created that the kernel did not take."""
        for node in nodes:
            if node.lookups <= 0 and node.ino in self._inodes:
                self._drop(node)

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if node.entry.kind is not Kind.SYMLINK:
            raise FsError(errno.EINVAL)
        return os.fsencode(node.entry.target)

    # -- files ----------------------------------------------------------------------------
    def open(self, ino: int, flags: int) -> int:
        node = self.inode(ino)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise FsError(errno.EROFS)
        if node.entry.kind is Kind.DIR:
            raise FsError(errno.EISDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(node)
        return fh

    def release(self, fh: int) -> None:
        self._handles.pop(fh, None)

    def _layout(self, node: Inode) -> FileLayout:
        if node.layout is None:
            node.layout = FileLayout(node.entry.extents)
        return node.layout

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return await self._read(handle, offset, size)

    async def read_inode(self, ino: int, offset: int, size: int) -> bytes | memoryview:
        """A read without a handle (the kernel sends no OPEN: see cachefs.fuse.operations).
        The file's readahead state is kept per inode, until the kernel forgets the inode."""
        handle = self._streams.get(ino)
        if handle is None:
            node = self._inodes.get(ino)
            if node is None or node.entry.kind is not Kind.FILE:
                raise FsError(errno.EBADF)
            handle = self._streams[ino] = Handle(node)
        return await self._read(handle, offset, size)

    async def _read(self, handle: Handle, offset: int, size: int) -> bytes | memoryview:
        node = handle.inode
        self.reads.requests += 1
        self.reads.sizes[size] = self.reads.sizes.get(size, 0) + 1
        pieces = self._layout(node).pieces(offset, size)
        extents = node.entry.extents
        if not pieces:
            return b""
        sequential = self._readahead(handle, offset, size, pieces[-1][0])
        small = node.entry.size < WHOLE_CHUNK_MIN  # packed with its neighbours, likely
        if len(pieces) == 1:
            index, start, length = pieces[0]
            reply: bytes | memoryview = await self._piece(extents[index], start, length,
                                                          sequential, small)
        else:
            parts: list[bytes | memoryview] = [b""] * len(pieces)

            async def fetch(i: int, index: int, start: int, length: int) -> None:
                parts[i] = await self._piece(extents[index], start, length, sequential, small)

            try:
                async with trio.open_nursery() as nursery:
                    for i, (index, start, length) in enumerate(pieces):
                        nursery.start_soon(fetch, i, index, start, length)
            except BaseExceptionGroup as group:
                raise _first_fs_error(group) from None
            reply = b"".join(parts)
        self.reads.bytes += len(reply)
        return reply

    async def _piece(self, extent: Extent, start: int, length: int,
                     sequential: bool, small_file: bool) -> bytes | memoryview:
        chunk = extent.chunk
        if chunk in self.zero_chunks:
            return bytes(length)
        # Only the extent: from memory a slice of the chunk, from the SSD only the sub-blocks
        # that cover it (see TieredStore.get_range), unless a sequential reader will want the
        # rest of a long extent soon; a piece shorter than asked means the extent does not fit
        # its chunk. A small file's chunk is most likely a pack of its neighbours in path
        # order, which a training epoch reads too: the SSD tier is asked to read it whole into
        # the page cache (one large read instead of one small read per file), where the
        # neighbours are then read without a worker thread.
        if sequential and extent.length >= WHOLE_CHUNK_MIN:
            whole = await self._call(self.store.chunk(chunk))
            data: bytes | memoryview = memoryview(whole)[start : start + length]
        else:
            data = await self._call(self.store.chunk_range(chunk, start, length, small_file))
        if len(data) != length:
            self.reads.bad_extents += 1
            log.error("an extent (%d+%d) does not fit chunk %s (%d bytes of it there): the tree "
                      "of this file lies, refusing the read", start, length, chunk, len(data))
            raise FsError(errno.EIO)
        return data

    def _readahead(self, handle: Handle, offset: int, length: int, last_index: int) -> bool:
        """Note a request as it arrives; True if it continues the file's sequential reading
        (then the window grows and the chunks after it are prefetched)."""
        # The kernel's own readahead requests arrive in file order but may overtake each other
        # by a request or so on their way through the daemon's worker tasks.
        gap = offset - handle.next_offset
        sequential = -2 * length <= gap <= 2 * length
        handle.next_offset = max(handle.next_offset, offset + length) if sequential \
            else offset + length
        if not sequential:
            handle.window = 0
            return False
        if self.nursery is None:
            return True
        handle.window = min(max(1, handle.window * 2), self.options.max_readahead_chunks)
        extents = handle.inode.entry.extents
        for x in extents[last_index + 1 : last_index + 1 + handle.window]:
            if x.chunk not in self.zero_chunks:
                self.store.prefetch(self.nursery, f"chunks/{x.chunk[:2]}/{x.chunk}")
        return True

    # -- extended attributes ----------------------------------------------------------------
    def listxattr(self, ino: int) -> list[bytes]:
        node = self.inode(ino)
        names = [XATTR_COMMIT]
        if node.entry.kind is Kind.FILE:
            names.append(XATTR_HASH)
        return names

    async def getxattr(self, ino: int, name: bytes, caller: Caller) -> bytes:
        node = self.inode(ino)
        if not name.startswith(b"user."):
            # Not ENODATA: on EOPNOTSUPP, ls and cp stop asking for security.selinux and
            # system.posix_acl_* on this file system, instead of two requests per file.
            raise FsError(errno.EOPNOTSUPP)
        if name == XATTR_COMMIT:
            return self.commit.encode()
        if name == XATTR_HASH and node.entry.kind is Kind.FILE:
            return node.entry.hash.encode()
        if name == XATTR_INFO and ino == ROOT_INODE:
            return json.dumps(self.info).encode()
        if name == XATTR_STATS and ino == ROOT_INODE:
            return json.dumps(self.stats()).encode()
        if name == XATTR_WARMUP and node.entry.kind is Kind.FILE:
            # A warmup reads the file from the origin on the caller's behalf: only a caller who
            # may read it may ask. Getting a user.* xattr needs read permission through the
            # kernel's default_permissions, but that is the mount's option, not this core's
            # rule; checked here too, before any fetch.
            if not self.may_read(node, caller):
                raise FsError(errno.EACCES)
            return str(await self.warm(node)).encode()
        raise FsError(errno.ENODATA)

    def may_read(self, node: Inode, caller: Caller) -> bool:
        """Whether `caller` may read `node` under this mount's modes and owner, as the kernel's
        generic_permission decides it: root reads everything; otherwise the owner's bits if the
        caller is the owner, else the group's if it is in the group, else the others'."""
        if caller.uid == 0:
            return True
        mode = self.attributes(node).mode
        if caller.uid == self.options.uid:
            return bool(mode & stat.S_IRUSR)
        # FUSE sends only the primary gid: the supplementary groups are read (from /proc) only
        # where membership changes the answer.
        in_group = caller.gid == self.options.gid or (
            bool(mode & stat.S_IRGRP) != bool(mode & stat.S_IROTH)
            and self.options.gid in _supplementary_groups(caller.pid))
        return bool(mode & (stat.S_IRGRP if in_group else stat.S_IROTH))

    async def warm(self, node: Inode) -> int:
        """Fetch every chunk of a file into the SSD tier (not memory); bytes fetched.

        At most `options.max_warmups` run at once; the others wait for a slot. Waiting is
        bounded: each waiter is one caller's blocked getxattr (one thread of theirs, one task
        here, no fetch), and each slot frees once its file is fetched or its origin reads time
        out (the tiered store bounds every origin read).
        """
        async with self._warmups:
            names = {x.chunk for x in node.entry.extents if x.chunk not in self.zero_chunks}
            fetched = 0

            async def one(name: str) -> None:
                nonlocal fetched
                # Not `fetched += await ...`: that reads `fetched` before the await, and
                # concurrent chunks then overwrite each other's sums.
                got = await self._call(self.store.warm(f"chunks/{name[:2]}/{name}"))
                fetched += got

            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(one, name)
            return fetched

    def stats(self) -> dict[str, object]:
        elapsed = time.monotonic() - self._started
        compiled = (self.compiled.counters() if self.compiled is not None
                    else dict.fromkeys(("reads", "read_bytes", "handed_back", "declined",
                                        "left_to_python", "inline_reads"), 0))
        read_bytes = self.reads.bytes + compiled["read_bytes"]
        return {
            **self.status,
            **self.store.stats(),
            "read_requests": self.reads.requests + compiled["reads"],
            "read_bytes": read_bytes,
            "read_throughput_bytes_per_s": read_bytes / elapsed if elapsed > 0 else 0.0,
            "compiled_reads_answered": compiled["reads"],
            "compiled_reads_handed_back": compiled["handed_back"],
            "compiled_reads_declined": compiled["declined"],
            "compiled_reads_left_to_memory": compiled["left_to_python"],
            "compiled_reads_inline": compiled["inline_reads"],
            "uptime_s": elapsed,
            "bad_extents": self.reads.bad_extents,
            "read_request_sizes": {str(k): v for k, v in sorted(self.reads.sizes.items())},
            "inodes": self.inode_count,
            "open_files": len(self._handles),
            "open_requests": self.reads.open_requests,
        }
