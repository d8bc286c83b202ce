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

    files = sorted(contents.values(), key=lambda e: [x.chunk for x in e.extents])
    progress.start(sum(e.size for e in files), "B", "verify")
    bad_chunks: dict[str, str] = {}
    good_chunks: set[str] = set()
    plan = collapse_repeats(x.chunk for e in files for x in e.extents)
    current_name, current = "", b""
    with ChunkStream(repo, plan, workers=workers) as stream:
        for entry in files:
            hasher = blake3()
            broken = None
            for x in entry.extents:
                if x.chunk != current_name:
                    current_name = x.chunk
                    try:
                        current = stream.take(x.chunk)
                        good_chunks.add(x.chunk)
                    except CachefsError as e:
                        current = b""
                        bad_chunks.setdefault(x.chunk, str(e))
                if x.chunk in bad_chunks:
                    broken = f"chunk {x.chunk}"
                    continue
                piece = memoryview(current)[x.offset : x.offset + x.length]
                if len(piece) != x.length:
                    broken = f"chunk {x.chunk} is too short"
                hasher.update(piece)
            report.files += 1
            report.bytes += entry.size
            progress.update(entry.size)
            if broken is None and hasher.hexdigest() != entry.hash:
                broken = "its content does not match its hash"
            if broken is not None:
                report.problems.append(f"file {where[entry.hash]}: {broken}")
    progress.close()
    report.chunks = len(good_chunks | bad_chunks.keys())
    report.problems[:0] = list(bad_chunks.values())
    return report


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
