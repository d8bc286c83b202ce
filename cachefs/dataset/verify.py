"""fsck for a dataset: every object reachable from a version is fetched and re-hashed.

From the starting commit, every ancestor commit, every tree (each distinct tree once: shared
subtrees are checked once) and every chunk is read and checked against its name, and every
distinct file content is re-assembled from its extents and checked against the file's content
hash. Problems are collected, not raised one by one, so a single run lists everything broken.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from blake3 import blake3

from cachefs.dataset.fetch import ChunkStream, collapse_repeats
from cachefs.dataset.objects import Kind, TreeEntry
from cachefs.dataset.repo import Repository
from cachefs.errors import CachefsError
from cachefs.progress import NoProgress, Progress

log = logging.getLogger("cachefs.verify")


@dataclass
class VerifyReport:
    commits: int = 0
    trees: int = 0
    chunks: int = 0
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(repo: Repository, commit: str, progress: Progress | None = None,
           workers: int = 8) -> VerifyReport:
    """Check everything reachable from `commit`; the report lists each problem found."""
    progress = progress or NoProgress()
    report = VerifyReport()
    contents, where = _walk_history(repo, commit, report)
    _check_files(repo, contents, where, report, progress, workers)
    return report


def _walk_history(repo: Repository, commit: str,
                  report: VerifyReport) -> tuple[dict[str, TreeEntry], dict[str, str]]:
    """Read every commit and tree reachable from `commit`: the distinct file contents (content
    hash -> one file having it) and where each is (content hash -> path)."""
    seen_commits: set[str] = set()
    seen_trees: set[str] = set()
    contents: dict[str, TreeEntry] = {}  # content hash -> one file having it
    where: dict[str, str] = {}
    stack = [commit]
    while stack:
        name = stack.pop()
        if name in seen_commits:
            continue
        seen_commits.add(name)
        try:
            c = repo.get_commit(name)
        except CachefsError as e:
            report.problems.append(str(e))
            continue
        report.commits += 1
        stack.extend(c.parents)
        _walk_tree(repo, c.tree, "", seen_trees, contents, where, report)
    return contents, where


def _check_files(repo: Repository, contents: dict[str, TreeEntry], where: dict[str, str],
                 report: VerifyReport, progress: Progress, workers: int) -> None:
    """Re-assemble each distinct file content from its chunks and check it against its hash;
    unreadable chunks are listed first, once each."""
    files = sorted(contents.values(), key=lambda e: [x.chunk for x in e.extents])
    progress.start(sum(e.size for e in files), "B", "verify")
    plan = collapse_repeats(x.chunk for e in files for x in e.extents)
    with ChunkStream(repo, plan, workers=workers) as stream:
        chunks = _ChunkCursor(stream)
        for entry in files:
            broken = _file_problem(entry, chunks)
            report.files += 1
            report.bytes += entry.size
            progress.update(entry.size)
            if broken is not None:
                report.problems.append(f"file {where[entry.hash]}: {broken}")
    progress.close()
    report.chunks = len(chunks.good | chunks.bad.keys())
    report.problems[:0] = list(chunks.bad.values())


class _ChunkCursor:
    """The stream's chunks in plan order: the current one, those read, those that failed."""

    def __init__(self, stream: ChunkStream) -> None:
        self.stream = stream
        self.name, self.data = "", b""
        self.good: set[str] = set()
        self.bad: dict[str, str] = {}  # chunk -> the error reading it

    def move_to(self, chunk: str) -> None:
        if chunk != self.name:
            self.name = chunk
            try:
                self.data = self.stream.take(chunk)
                self.good.add(chunk)
            except CachefsError as e:
                self.data = b""
                self.bad.setdefault(chunk, str(e))


def _file_problem(entry: TreeEntry, chunks: _ChunkCursor) -> str | None:
    """What is wrong with one file content (None: it matches its hash)."""
    hasher = blake3()
    broken = None
    for x in entry.extents:
        chunks.move_to(x.chunk)
        if x.chunk in chunks.bad:
            broken = f"chunk {x.chunk}"
            continue
        piece = memoryview(chunks.data)[x.offset : x.offset + x.length]
        if len(piece) != x.length:
            broken = f"chunk {x.chunk} is too short"
        hasher.update(piece)
    if broken is None and hasher.hexdigest() != entry.hash:
        broken = "its content does not match its hash"
    return broken


def _walk_tree(repo: Repository, tree: str, prefix: str, seen: set[str],
               contents: dict[str, TreeEntry], where: dict[str, str],
               report: VerifyReport) -> None:
    if tree in seen:
        return
    seen.add(tree)
    try:
        entries = repo.get_tree(tree).entries
    except CachefsError as e:
        report.problems.append(f"{prefix or '/'}: {e}")
        return
    report.trees += 1
    for entry in entries:
        path = prefix + entry.name
        if entry.kind is Kind.DIR:
            _walk_tree(repo, entry.hash, path + "/", seen, contents, where, report)
        elif entry.kind is Kind.FILE and entry.hash not in contents:
            contents[entry.hash] = entry
            where[entry.hash] = path
