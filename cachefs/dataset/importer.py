"""Committing a dataset straight from an object-store prefix (s3://, oss://), without a local copy.

`cachefs commit DATASET s3://bucket/prefix/ -m MSG` lists the prefix once (keys, sizes, ETags,
modification times), builds the directory tree from the keys, and streams each object through
hashing and packing exactly as a local commit does: objects are fetched in path order by a
bounded window of parallel requests (whole small objects; large ones a chunk-sized range at a
time), so memory stays bounded and the store's latency is hidden.

Re-importing reuses what is unchanged without reading it: the scan index of the last import from
the same prefix records each object's size and ETag, and an object whose both still match keeps
its extents. Keys that cannot be paths (empty segments, `.` or `..`) and keys that clash with a
directory of the same name are skipped with a warning and counted; a key ending in `/` (a folder
marker) is an empty directory.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from cachefs.dataset.commit import (
    CommitResult,
    Committer,
    KnownContents,
    _Dir,
    _File,
    check_branch,
    run_commit,
)
from cachefs.dataset.repo import Repository
from cachefs.dataset.scanindex import ScanIndex
from cachefs.errors import InvalidName, NotFound, RemoteError
from cachefs.names import check_entry_name
from cachefs.progress import NoProgress, Progress
from cachefs.remotes.base import ObjectInfo, Remote

log = logging.getLogger("cachefs.importer")

FILE_MODE = stat.S_IFREG | 0o644
DIR_MODE = stat.S_IFDIR | 0o755


def _stat(mode: int, size: int, mtime_ns: int) -> os.stat_result:
    """A stat result for an object (trees take mode, size and mtime from one)."""
    seconds = mtime_ns / 1e9
    return os.stat_result((mode, 0, 0, 1, 0, 0, size, seconds, seconds, seconds),
                          {"st_atime_ns": mtime_ns, "st_mtime_ns": mtime_ns,
                           "st_ctime_ns": mtime_ns})


class PrefixImporter(Committer):
    """One commit of the objects under a bucket prefix; use `import_prefix`."""

    def __init__(self, repo: Repository, dataset: str, source: Remote, progress: Progress,
                 workers: int | None) -> None:
        super().__init__(repo, dataset, progress, workers)
        self.source = source
        self.fetchers = workers or getattr(source, "parallelism", 8)
        self.skipped: list[str] = []

    # -- pass 1: list ---------------------------------------------------------------------
    def scan(self, index: ScanIndex | None) -> _Dir:
        listing = list(self.source.list_info(""))
        if not listing:
            raise NotFound(f"no objects under {self.source.url}")
        newest = max(info.mtime_ns for info in listing)
        root = _Dir("", _stat(DIR_MODE, 0, newest))
        dirs: dict[str, _Dir] = {"": root}
        files: set[str] = set()
        # Key order puts "a" before "a/b", so of an object and a directory of the same name
        # the first seen wins and the other is skipped.
        for info in listing:
            parts = info.key.rstrip("/").split("/")
            try:
                for part in parts:
                    check_entry_name(part)
            except InvalidName:
                self._skip(info.key, "not a valid path")
                continue
            is_marker = info.key.endswith("/")
            parent = self._directory(dirs, files, parts if is_marker else parts[:-1], info)
            if parent is None or is_marker:
                continue
            path = "/".join(parts)
            if path in dirs or path in files:
                self._skip(info.key, "a directory of the same name exists")
                continue
            record = index.lookup_object(path, info.size, info.etag) if index else None
            file = _File(parts[-1], path, _stat(FILE_MODE, info.size, info.mtime_ns), record,
                         etag=info.etag)
            parent.children.append(file)
            files.add(path)
        _sort(root)
        self.files = list(_files_in_order(root))
        return root

    def _directory(self, dirs: dict[str, _Dir], files: set[str], parts: list[str],
                   info: ObjectInfo) -> _Dir | None:
        """The directory at `parts`, created (with its parents) on first use; None (the key
        skipped) where an object already has one of those names."""
        path = ""
        node = dirs[""]
        for part in parts:
            path = f"{path}/{part}" if path else part
            child = dirs.get(path)
            if child is None:
                if path in files:
                    self._skip(info.key, f"{path!r} is an object, not a directory")
                    return None
                child = _Dir(part, _stat(DIR_MODE, 0, info.mtime_ns))
                node.children.append(child)
                dirs[path] = child
            node = child
        return node

    def _skip(self, key: str, why: str) -> None:
        log.warning("skipping %s/%s: %s", self.source.url, key, why)
        self.skipped.append(key)

    # -- pass 2: stream, hash and pack ------------------------------------------------------
    def read_files(self, known: KnownContents) -> None:
        to_read = [f for f in self.files if not self.reuse_recorded(f)]
        self.progress.start(sum(f.st.st_size for f in to_read), "B", "import")
        with ThreadPoolExecutor(self.fetchers, thread_name_prefix="cachefs-import") as pool:
            pieces = self._prefetch(pool, to_read)
            for file in to_read:
                remaining = [self._piece_count(file)]

                def read_piece(file: _File = file, remaining: list[int] = remaining) -> bytes:
                    if remaining[0] == 0:
                        return b""
                    remaining[0] -= 1
                    key, data = next(pieces)
                    assert key == file.path, (key, file.path)
                    return data

                expected = file.st.st_size
                self.add_content(file, known, read_piece)
                if file.size != expected:
                    raise RemoteError(
                        f"{self.source.url}/{file.path} changed during the import ({expected} "
                        f"bytes listed, {file.size} read); run the import again")
                self.read_bytes += file.size
                self.progress.update(file.size)
        self.packer.flush()

    def _piece_count(self, file: _File) -> int:
        size = file.st.st_size
        return 1 if size < self.chunk_size else -(-size // self.chunk_size)

    def _prefetch(self, pool: ThreadPoolExecutor,
                  files: list[_File]) -> Iterator[tuple[str, bytes]]:
        """Every file's pieces in order (a whole small object; a large one in chunk-sized
        ranges), fetched by a bounded window of parallel requests."""
        plan = ((f.path, start, None if f.st.st_size < self.chunk_size else self.chunk_size)
                for f in files
                for start in range(0, self._piece_count(f) * self.chunk_size, self.chunk_size))
        window = max(4, self.fetchers * 2)
        inflight: deque[tuple[str, Future[bytes]]] = deque()

        def submit() -> None:
            for key, start, length in plan:
                inflight.append((key, pool.submit(self.source.get, key, start, length)))
                return

        for _ in range(window):
            submit()
        while inflight:
            key, future = inflight.popleft()
            submit()
            try:
                yield key, future.result()
            except NotFound:
                raise RemoteError(f"{self.source.url}/{key} disappeared during the import; "
                                  "run the import again") from None


def _sort(node: _Dir) -> None:
    node.children.sort(key=lambda c: os.fsencode(c.name))
    for child in node.children:
        if isinstance(child, _Dir):
            _sort(child)


def _files_in_order(node: _Dir) -> Iterator[_File]:
    """Files depth-first in name order: the order a local commit packs them in."""
    for child in node.children:
        if isinstance(child, _Dir):
            yield from _files_in_order(child)
        elif isinstance(child, _File):
            yield child


def import_prefix(
    repo: Repository,
    dataset: str,
    branch: str,
    source: Remote,
    message: str,
    author: str | None = None,
    progress: Progress | None = None,
    allow_empty: bool = False,
    workers: int | None = None,
) -> tuple[CommitResult, list[str]]:
    """Commit the objects under `source` (a bucket prefix opened as a remote) as the next
    version of `dataset` on `branch`; return the result and the keys skipped."""
    head = check_branch(repo, dataset, branch)
    importer = PrefixImporter(repo, dataset, source, progress or NoProgress(), workers)
    result = run_commit(importer, branch, head, source.url, message, author, allow_empty)
    return result, importer.skipped
