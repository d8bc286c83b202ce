"""Committing a directory as a new version: read only what changed, upload only new bytes.

A commit runs in three passes. The scan walks the directory in path order (names sorted by
bytes) with lstat alone, and asks the scan index which files are certainly unchanged since the
last commit from this directory (same size, mtime, ctime and inode; not racily clean): those are
reused without being opened. The read pass then reads the remaining files in path order: a file
whose content hash the parent already has (a rename, a copy) reuses those extents; large files
are cut into whole chunks and small files packed into shared chunks (packing.py). Sealed chunks
are hashed and stored by a bounded pool of worker threads (the reader keeps reading meanwhile);
a chunk the remote already has is not uploaded again. Last, trees are built bottom-up (an
unchanged directory encodes to the same tree name and is not stored again), the commit is
written, the remote is flushed, and only then does the branch move, by compare-and-swap: a commit
that lost a race leaves the branch untouched and says so.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from blake3 import blake3

from cachefs.dataset.ignore import IgnoreRules
from cachefs.dataset.locks import RepositoryLock
from cachefs.dataset.objects import Commit, Extent, Kind, Tree, TreeEntry, encode, hash_bytes
from cachefs.dataset.packing import ChunkPacker, ChunkSlot, PendingExtent
from cachefs.dataset.refs import RefValue, who_am_i
from cachefs.dataset.repo import Repository, chunk_key, tree_key
from cachefs.dataset.scanindex import ScanIndex, ScanRecord, is_racy
from cachefs.errors import LocalIOError, NotFound, RefNotFound, UsageError
from cachefs.progress import NoProgress, Progress

log = logging.getLogger("cachefs.commit")


@dataclass(frozen=True)
class CommitResult:
    commit: str
    parent: str | None
    files: int
    bytes: int
    new_bytes: int
    new_meta_bytes: int
    read_bytes: int
    reused_files: int
    unchanged: bool = False
    ignored: int = 0  # entries left out by .cachefsignore


class ChunkUploader:
    """Hashes sealed chunks and stores those the remote lacks, on a bounded pool of threads."""

    def __init__(self, repo: Repository, workers: int, max_pending: int) -> None:
        self.repo = repo
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cachefs-upload")
        self._pending = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._stored: set[str] = set()
        self._futures: list[Future[None]] = []
        self.new_bytes = 0
        self.new_chunks = 0

    def seal(self, slot: ChunkSlot, data: bytes | bytearray) -> None:
        self._pending.acquire()
        try:
            future = self._pool.submit(self._store, slot, data)
        except BaseException:
            self._pending.release()
            raise
        self._futures.append(future)
        if len(self._futures) > 256:
            done = [f for f in self._futures if f.done()]
            for f in done:
                f.result()  # surface a failed upload early
            self._futures = [f for f in self._futures if not f.done()]

    def _store(self, slot: ChunkSlot, data: bytes | bytearray) -> None:
        try:
            name = hash_bytes(data)
            slot.name = name
            with self._lock:
                if name in self._stored:
                    return
                self._stored.add(name)
            if not self.repo.remote.has([chunk_key(name)]):
                self.repo.put_chunk(name, data)
                with self._lock:
                    self.new_bytes += len(data)
                    self.new_chunks += 1
        finally:
            self._pending.release()

    def run(self, fn, *args) -> Future:  # type: ignore[no-untyped-def]
        return self._pool.submit(fn, *args)

    def wait(self) -> None:
        for future in self._futures:
            future.result()
        self._futures = []

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _File:
    name: str
    path: str  # relative to the source root, '/'-separated
    st: os.stat_result
    record: ScanRecord | None
    content_hash: str = ""
    extents: list[PendingExtent] = field(default_factory=list)
    size: int = 0
    etag: str = ""  # objects imported from a bucket: identity instead of the stat fields


@dataclass
class _Link:
    name: str
    st: os.stat_result
    target: str


@dataclass
class _Dir:
    name: str
    st: os.stat_result
    children: list[_File | _Link | _Dir] = field(default_factory=list)


def _read_exactly(f, n: int) -> bytes:  # type: ignore[no-untyped-def]
    """Read up to n bytes, looping over short reads (network and FUSE file systems make them)."""
    parts = []
    while n > 0:
        piece = f.read(n)
        if not piece:
            break
        parts.append(piece)
        n -= len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class Committer:
    """What every commit source shares: packing, uploading, building trees (`run_commit`).

    A subclass supplies the two source-specific passes: `scan` (what is there, reusing what the
    scan index shows unchanged) and `read_files` (read the rest through `add_content`)."""

    def __init__(self, repo: Repository, dataset: str, progress: Progress,
                 workers: int | None) -> None:
        self.repo = repo
        self.dataset = dataset
        self.progress = progress
        self.chunk_size = repo.dataset(dataset).chunk_size
        parallelism = workers or getattr(repo.remote, "parallelism", 4)
        self.uploader = ChunkUploader(repo, parallelism, max_pending=parallelism + 2)
        self.packer = ChunkPacker(self.chunk_size, self.uploader.seal)
        self.files: list[_File] = []
        self.read_bytes = 0
        self.ignore: IgnoreRules | None = None
        self.ignored = 0  # entries left out by .cachefsignore (an ignored directory counts once)

    @property
    def reused_files(self) -> int:
        return sum(1 for f in self.files if f.record is not None)

    def scan(self, index: ScanIndex | None) -> _Dir:
        raise NotImplementedError

    def read_files(self, known: KnownContents) -> None:
        raise NotImplementedError

    def reuse_recorded(self, file: _File) -> bool:
        """Take a file's content from its scan-index record, if it has one."""
        if file.record is None:
            return False
        file.content_hash = file.record.content_hash
        file.extents = [PendingExtent.of(x) for x in file.record.extents]
        file.size = file.record.size
        return True

    def add_content(self, file: _File, known: KnownContents,
                    read_piece: Callable[[], bytes]) -> None:
        """Hash and pack one file whose content `read_piece` returns a chunk size at a time
        (short only at the end, then b"")."""
        if file.st.st_size < self.chunk_size:
            data = read_piece()
            if len(data) < self.chunk_size:  # the common case: the whole small file
                file.size = len(data)
                file.content_hash = hash_bytes(data)
                reused = known.get(file.content_hash)
                if reused is not None:
                    file.extents = reused
                elif data:
                    file.extents = known.add(file.content_hash, [self.packer.add_small(data)])
                return
            first: bytes | None = data  # it grew past one chunk since the scan
        else:
            first = None
        hasher = blake3()
        extents = []
        while True:
            piece = first if first is not None else read_piece()
            first = None
            if not piece:
                break
            hasher.update(piece)
            file.size += len(piece)
            extents.append(self.packer.add_whole(piece))
        file.content_hash = hasher.hexdigest()
        file.extents = known.add(file.content_hash, extents)

    # -- pass 3: trees --------------------------------------------------------------------
    def build_trees(self, root: _Dir) -> tuple[str, list[dict[str, bytes]], int, int]:
        """Encode every tree bottom-up; return (root tree, [{key: stored}] by height, files,
        bytes). Height 0 holds trees without subdirectories; each later level refers only to
        earlier ones, which is the order they are stored in."""
        levels: list[dict[str, bytes]] = []
        totals = [0, 0]

        def build(node: _Dir) -> tuple[str, int]:
            entries = []
            height = 0
            for child in node.children:
                st = child.st
                mode = stat.S_IMODE(st.st_mode)
                if isinstance(child, _Dir):
                    name, child_height = build(child)
                    height = max(height, child_height + 1)
                    entries.append(TreeEntry(child.name, Kind.DIR, mode, 0, st.st_mtime_ns, name))
                elif isinstance(child, _Link):
                    target = os.fsencode(child.target)
                    entries.append(TreeEntry(child.name, Kind.SYMLINK, mode, len(target),
                                             st.st_mtime_ns, hash_bytes(target),
                                             target=child.target))
                else:
                    totals[0] += 1
                    totals[1] += child.size
                    entries.append(TreeEntry(
                        child.name, Kind.FILE, mode, child.size, st.st_mtime_ns,
                        child.content_hash, tuple(x.resolve() for x in child.extents)))
            tree = Tree.from_entries(entries)
            name, stored = encode(tree)
            while len(levels) <= height:
                levels.append({})
            levels[height][tree_key(name)] = stored
            return name, height

        root_name, _ = build(root)
        return root_name, levels, totals[0], totals[1]

    def store_trees(self, levels: list[dict[str, bytes]]) -> int:
        """Store the trees the remote lacks, a level at a time from the bottom, so a stored tree
        never refers to one that is not stored yet (even if the commit is interrupted)."""
        present = self.repo.remote.has([k for level in levels for k in level])
        written = 0
        for level in levels:
            missing = [(k, v) for k, v in level.items() if k not in present]
            for future in [self.uploader.run(self.repo.remote.put, k, v) for k, v in missing]:
                future.result()
            written += sum(len(v) for _, v in missing)
        return written


class DirectoryCommitter(Committer):
    """One commit of one local directory; use `commit_directory`."""

    def __init__(self, repo: Repository, dataset: str, source: Path, progress: Progress,
                 workers: int | None) -> None:
        super().__init__(repo, dataset, progress, workers)
        self.source = source

    # -- pass 1: scan ---------------------------------------------------------------------
    def scan(self, index: ScanIndex | None) -> _Dir:
        try:
            root_st = os.stat(self.source)
        except OSError as e:
            raise LocalIOError(f"cannot read {self.source}: {e.strerror}") from e
        if not stat.S_ISDIR(root_st.st_mode):
            raise UsageError(f"{self.source} is not a directory")
        root = _Dir("", root_st)
        self.ignore = IgnoreRules.load(self.source)
        self._scan_dir(root, self.source, "", index)
        return root

    def _scan_dir(self, node: _Dir, abspath: Path, rel: str, index: ScanIndex | None) -> None:
        try:
            with os.scandir(abspath) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            raise LocalIOError(f"cannot list {abspath}: {e.strerror}") from e
        for entry in entries:
            path = rel + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
                if self.ignore is not None and self.ignore.ignores(path, stat.S_ISDIR(st.st_mode)):
                    self.ignored += 1
                    continue
                if stat.S_ISDIR(st.st_mode):
                    child = _Dir(entry.name, st)
                    node.children.append(child)
                    self._scan_dir(child, Path(entry.path), path + "/", index)
                elif stat.S_ISREG(st.st_mode):
                    record = index.lookup(path, st) if index else None
                    file = _File(entry.name, path, st, record)
                    node.children.append(file)
                    self.files.append(file)
                elif stat.S_ISLNK(st.st_mode):
                    node.children.append(_Link(entry.name, st, os.readlink(entry.path)))
                else:
                    log.warning("skipping %s: not a regular file, directory or symlink", path)
            except OSError as e:
                raise LocalIOError(f"cannot read {entry.path}: {e.strerror}") from e

    # -- pass 2: read and pack --------------------------------------------------------------
    def read_files(self, known: KnownContents) -> None:
        to_read = sum(f.st.st_size for f in self.files if f.record is None)
        self.progress.start(to_read, "B", "commit")
        for file in self.files:
            if self.reuse_recorded(file):
                continue
            try:
                self._read_file(file, known)
            except OSError as e:
                raise LocalIOError(f"cannot read {self.source / file.path}: {e.strerror}") from e
            self.read_bytes += file.size
            self.progress.update(file.size)
        self.packer.flush()

    def _read_file(self, file: _File, known: KnownContents) -> None:
        with open(self.source / file.path, "rb", buffering=0) as f:
            self.add_content(file, known, lambda: _read_exactly(f, self.chunk_size))

class KnownContents:
    """Content hash -> extents, from the parent version and from this commit so far.

    Holds the parent's extents as they are and converts one only when a re-read file turns out
    to have that content (a rename or a copy): most commits re-read few files.
    """

    def __init__(self, parent_extents: dict[str, tuple[Extent, ...]]) -> None:
        self._parent = parent_extents
        self._new: dict[str, list[PendingExtent]] = {}

    @classmethod
    def of_parent(cls, repo: Repository, index: ScanIndex | None,
                  parent: str | None) -> KnownContents:
        if index is not None:
            return cls({r.content_hash: r.extents for r in index.records.values()})
        found: dict[str, tuple[Extent, ...]] = {}
        if parent is not None:
            for _, entry in repo.walk(repo.get_commit(parent).tree):
                if entry.kind is Kind.FILE:
                    found.setdefault(entry.hash, entry.extents)
        return cls(found)

    def get(self, content_hash: str) -> list[PendingExtent] | None:
        extents = self._new.get(content_hash)
        if extents is None and content_hash in self._parent:
            extents = [PendingExtent.of(x) for x in self._parent[content_hash]]
            self._new[content_hash] = extents
        return extents

    def add(self, content_hash: str, extents: list[PendingExtent]) -> list[PendingExtent]:
        """Remember `extents` for the content unless it is known; return the extents to use."""
        return self.get(content_hash) or self._new.setdefault(content_hash, extents)


def check_branch(repo: Repository, dataset: str, branch: str) -> RefValue:
    """The branch a commit will move (absent only for a dataset's first version)."""
    repo.dataset(dataset)
    if repo.refs.read(dataset, "tags", branch).commit is not None:
        raise UsageError(f"{branch!r} is a tag of {dataset!r}; tags are fixed, commit to a branch")
    head = repo.refs.read(dataset, "heads", branch)
    if head.commit is None and repo.refs.list(dataset, "heads"):
        raise RefNotFound(
            f"branch {branch!r} does not exist in dataset {dataset!r} "
            f"(create it first: cachefs branch {dataset} {branch} [START])"
        )
    return head


def commit_directory(
    repo: Repository,
    dataset: str,
    branch: str,
    source: str | os.PathLike[str],
    message: str,
    author: str | None = None,
    progress: Progress | None = None,
    allow_empty: bool = False,
    workers: int | None = None,
) -> CommitResult:
    """Commit the directory `source` as the next version of `dataset` on `branch`."""
    source_path = Path(source).absolute()
    if not source_path.is_dir():
        raise NotFound(f"source directory {source} does not exist or is not a directory")
    head = check_branch(repo, dataset, branch)
    committer = DirectoryCommitter(repo, dataset, source_path, progress or NoProgress(), workers)
    return run_commit(committer, branch, head, str(source_path), message, author, allow_empty)


def run_commit(committer: Committer, branch: str, head: RefValue, source_id: str,
               message: str, author: str | None, allow_empty: bool) -> CommitResult:
    """Scan, read, store and record one commit; the branch moves last, by compare-and-swap.

    `source_id` names the source for the scan index (a directory, or a bucket URL)."""
    repo, dataset, progress = committer.repo, committer.dataset, committer.progress
    index_path = ScanIndex.path_for(repo.remote.url, dataset, source_id)
    index = ScanIndex.load(index_path)
    if index is not None and (head.commit is None or index.commit != head.commit):
        index = None
    lock = RepositoryLock(repo.remote, "writer").acquire()  # gc's sweep waits for us
    scan_started_ns = time.time_ns()
    try:
        root = committer.scan(index)
        committer.read_files(KnownContents.of_parent(repo, index, head.commit))
        committer.uploader.wait()
        tree, levels, files, total_bytes = committer.build_trees(root)
        if (not allow_empty and head.commit is not None
                and repo.get_commit(head.commit).tree == tree):
            log.info("nothing changed since %s", head.commit)
            _save_index(index_path, head.commit, scan_started_ns, committer.files)
            return CommitResult(head.commit, head.commit, files, total_bytes, 0, 0,
                                committer.read_bytes, committer.reused_files, unchanged=True,
                                ignored=committer.ignored)
        meta_bytes = committer.store_trees(levels)
        commit = Commit(
            tree=tree,
            parents=(head.commit,) if head.commit else (),
            dataset=dataset,
            author=author or who_am_i(),
            message=message,
            time_ns=time.time_ns(),
            files=files,
            bytes=total_bytes,
        )
        commit_name, commit_bytes = repo.put_meta(commit)
        repo.remote.flush()  # every object durable before the ref can point at it
        repo.refs.compare_and_swap(dataset, "heads", branch, head, commit_name,
                                   f"commit: {message.splitlines()[0] if message else ''}")
    finally:
        committer.uploader.close()
        progress.close()
        lock.release()
    _save_index(index_path, commit_name, scan_started_ns, committer.files)
    return CommitResult(commit_name, head.commit, files, total_bytes, committer.uploader.new_bytes,
                        meta_bytes + commit_bytes, committer.read_bytes, committer.reused_files,
                        ignored=committer.ignored)


def _save_index(path: Path, commit: str, scan_started_ns: int, files: list[_File]) -> None:
    records = {
        f.path: f.record if f.record is not None else ScanRecord(
            f.size, f.st.st_mtime_ns, f.st.st_ctime_ns, f.st.st_ino, f.content_hash,
            tuple(x.resolve() for x in f.extents),
            racy=not f.etag and (f.size != f.st.st_size
                                 or is_racy(f.st.st_mtime_ns, f.st.st_ctime_ns, scan_started_ns)),
            etag=f.etag,
        )
        for f in files
    }
    ScanIndex(commit, scan_started_ns, records).save(path)

