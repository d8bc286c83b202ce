"""Copying a dataset between two repositories (push and pull): only what is missing, resumably.

`transfer_dataset(src, dst, dataset)` makes every branch and tag of `dataset` in `src` available
in `dst`:

1. The walk starts at every branch and tag tip in `src` and stops at any object `dst` already
   has: writers store bottom-up, so an object present in `dst` has its whole closure there.
2. The missing objects are copied bottom-up: chunks first (in parallel), then trees by increasing
   height, then commits by increasing height, each one level at a time. So at every moment
   (including after a crash, kill -9 or network loss) every object in `dst` has its closure in
   `dst`, and running the transfer again re-walks, prunes what arrived and copies the rest.
3. Each object is verified against its name on the way (chunks by hash, trees and commits by
   decoding) and its stored bytes are copied unchanged: corruption in `src` never spreads.
4. `dst` is flushed, then its refs move by compare-and-swap: a branch only fast-forwards and a
   tag never moves unless `force`; a name that is a branch on one side and a tag on the other is
   refused; refs that exist only in `dst` are left alone. Every ref is tried; the refused ones
   are listed together in the result (`raise_if_refused`).

The whole transfer holds a writer lock on `dst`, so gc's sweep never runs meanwhile.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from threading import Lock
from typing import Literal
from urllib.parse import unquote, urlparse

from cachefs.dataset.locks import RepositoryLock
from cachefs.dataset.objects import Kind, Tree, decode_commit, decode_tree
from cachefs.dataset.reach import ObjectWalker, Prune, Reached, by_height, heights
from cachefs.dataset.refs import KINDS, RefKind
from cachefs.dataset.repo import FORMAT_KEY, Repository
from cachefs.errors import (
    AlreadyExists,
    CorruptObject,
    DatasetNotFound,
    ObjectNotFound,
    RefConflict,
    UsageError,
)
from cachefs.progress import NoProgress, Progress

log = logging.getLogger("cachefs.transfer")

RefAction = Literal["created", "fast-forward", "forced", "unchanged", "refused"]


@dataclass(frozen=True)
class RefUpdate:
    """What happened to one branch or tag of the destination."""

    kind: RefKind
    name: str
    old: str | None  # the destination's commit before (None: it had no such ref)
    new: str  # the source's commit
    action: RefAction
    reason: str = ""  # why it was refused

    @property
    def noun(self) -> str:
        return "branch" if self.kind == "heads" else "tag"


@dataclass
class TransferResult:
    dataset: str
    source: str  # URLs
    destination: str
    created_dataset: bool = False
    chunks: int = 0  # objects copied, by kind
    trees: int = 0
    commits: int = 0
    chunk_bytes: int = 0
    meta_bytes: int = 0
    refs: list[RefUpdate] = field(default_factory=list)

    @property
    def objects(self) -> int:
        return self.chunks + self.trees + self.commits

    @property
    def bytes(self) -> int:
        return self.chunk_bytes + self.meta_bytes

    def _with(self, *actions: str) -> list[RefUpdate]:
        return [r for r in self.refs if r.action in actions]

    @property
    def updated(self) -> list[RefUpdate]:
        return self._with("created", "fast-forward", "forced")

    @property
    def unchanged(self) -> list[RefUpdate]:
        return self._with("unchanged")

    @property
    def refused(self) -> list[RefUpdate]:
        return self._with("refused")

    def raise_if_refused(self) -> None:
        """RefConflict listing every refused ref (the other refs were updated all the same)."""
        refused = self.refused
        if not refused:
            return
        others = len(self.refs) - len(refused)
        raise RefConflict(
            f"{len(refused)} of {len(self.refs)} refs of {self.dataset!r} refused in "
            f"{self.destination}: " + "; ".join(r.reason for r in refused)
            + (f" (the other {others} refs were updated or already up to date)"
               if others else ""))

    def to_json(self) -> dict[str, object]:
        return {
            "dataset": self.dataset, "source": self.source, "destination": self.destination,
            "created_dataset": self.created_dataset,
            "copied": {"objects": self.objects, "chunks": self.chunks, "trees": self.trees,
                       "commits": self.commits, "bytes": self.bytes,
                       "chunk_bytes": self.chunk_bytes, "meta_bytes": self.meta_bytes},
            "refs": [{"kind": r.noun, "name": r.name, "old": r.old, "new": r.new,
                      "action": r.action, **({"reason": r.reason} if r.reason else {})}
                     for r in self.refs],
            "updated": len(self.updated), "unchanged": len(self.unchanged),
            "refused": len(self.refused),
        }


def _location(url: str) -> tuple[str, ...]:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return ("file", os.path.realpath(unquote(parsed.path)))
    return (parsed.scheme, parsed.netloc, parsed.path.rstrip("/"))


def _same_repository(src: Repository, dst: Repository) -> bool:
    """Same place and the same repository identity (its `format` object, written once at
    creation): a mirror copied at the same bucket/prefix of another endpoint is not the same."""
    if _location(src.remote.url) != _location(dst.remote.url):
        return False
    return src.remote.get(FORMAT_KEY) == dst.remote.get(FORMAT_KEY)


class _SizingWalker(ObjectWalker):
    """The shared walker, also noting each chunk's length from the extents that reach it (a
    chunk ends where its last extent does), for the progress bar's total."""

    def __init__(self, repo: Repository, workers: int, prune: Prune) -> None:
        super().__init__(repo, workers=workers, prune=prune)
        self.chunk_sizes: dict[str, int] = {}

    def _children_of_tree(self, tree: Tree) -> Iterable[str]:  # type: ignore[override]
        sizes = self.chunk_sizes
        for entry in tree.entries:
            if entry.kind is Kind.FILE:
                for x in entry.extents:
                    end = x.offset + x.length
                    if end > sizes.get(x.chunk, 0):
                        sizes[x.chunk] = end
        return ObjectWalker._children_of_tree(tree)


def _run_bounded(pool: ThreadPoolExecutor, fn: Callable[[str], None], items: Iterable[str],
                 limit: int) -> None:
    """Run fn over items with at most `limit` in flight; the first error cancels the rest."""
    pending: set[Future[None]] = set()
    try:
        for item in items:
            if len(pending) >= limit:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
            pending.add(pool.submit(fn, item))
        done, pending = wait(pending)
        for f in done:
            f.result()
    except BaseException:
        for f in pending:
            f.cancel()
        wait(pending)  # the ones already running finish before the error goes up
        raise


class _Copier:
    """Copies objects from src to dst, each verified, counting what it copied."""

    def __init__(self, src: Repository, dst: Repository, workers: int,
                 progress: Progress) -> None:
        self.src = src
        self.dst = dst
        self.workers = workers
        self.progress = progress
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="cachefs-transfer")
        self._lock = Lock()
        self.counts = {"chunks": 0, "trees": 0, "commits": 0}
        self.chunk_bytes = 0
        self.meta_bytes = 0

    def _corrupt(self, e: CorruptObject) -> CorruptObject:
        return CorruptObject(f"{e} (in {self.src.remote.url}); nothing corrupt was copied to "
                             f"{self.dst.remote.url}: repair the source first", e.object_name)

    def _copy_chunk(self, key: str) -> None:
        name = key.rsplit("/", 1)[1]
        try:
            data = self.src.get_chunk(name)  # verified against its name
        except CorruptObject as e:
            raise self._corrupt(e) from e
        except ObjectNotFound:
            raise ObjectNotFound(f"chunk {name} is missing from {self.src.remote.url}") from None
        self.dst.remote.put(key, data)
        with self._lock:
            self.counts["chunks"] += 1
            self.chunk_bytes += len(data)
        self.progress.update(len(data))

    def _copy_meta(self, key: str) -> None:
        kind, _, name = key.split("/")
        try:
            data = self.src.remote.get(key)
            (decode_tree if kind == "trees" else decode_commit)(name, data)
        except CorruptObject as e:
            raise self._corrupt(e) from e
        except ObjectNotFound:
            raise ObjectNotFound(f"{kind[:-1]} {name} is missing from "
                                 f"{self.src.remote.url}") from None
        self.dst.remote.put(key, data)
        with self._lock:
            self.counts[kind] += 1
            self.meta_bytes += len(data)

    def chunks(self, keys: list[str]) -> None:
        _run_bounded(self.pool, self._copy_chunk, keys, 2 * self.workers)

    def levels(self, groups: list[list[str]]) -> None:
        """Each group only refers to earlier ones: finish a group before starting the next."""
        for group in groups:
            _run_bounded(self.pool, self._copy_meta, group, 2 * self.workers)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _is_ancestor(repo: Repository, ancestor: str, descendant: str,
                 pool: ThreadPoolExecutor) -> bool:
    """Whether `ancestor` is in the history (every parent, not only the first) of
    `descendant`; breadth first, each level's commits read in parallel."""
    if ancestor == descendant:
        return True
    seen = {descendant}
    frontier = [descendant]
    while frontier:
        next_frontier = []
        for commit in pool.map(repo.get_commit, frontier):
            for parent in commit.parents:
                if parent == ancestor:
                    return True
                if parent not in seen:
                    seen.add(parent)
                    next_frontier.append(parent)
        frontier = next_frontier
    return False


def _ensure_dataset(src: Repository, dst: Repository, dataset: str, create: bool) -> bool:
    """Check (and with `create`, make) the dataset's settings in dst; True if created here."""
    chunk_size = src.dataset(dataset).chunk_size
    created = False
    try:
        theirs = dst.dataset(dataset).chunk_size
    except DatasetNotFound:
        if not create:
            return False
        raw = src.remote.get(f"datasets/{dataset}")  # as-is: keeps its creation time
        created = dst.remote.put_if_absent(f"datasets/{dataset}", raw)
        theirs = dst.dataset(dataset).chunk_size
    if theirs != chunk_size:
        raise UsageError(
            f"dataset {dataset!r} has chunk size {theirs} in {dst.remote.url} but {chunk_size} "
            f"in {src.remote.url}: their objects cannot be shared; copy it under another "
            "dataset name or remove it from the destination first")
    return created


def _update_ref(src: Repository, dst: Repository, dataset: str, kind: RefKind, name: str,
                new: str, force: bool, pool: ThreadPoolExecutor) -> RefUpdate:
    noun = "branch" if kind == "heads" else "tag"
    other: RefKind = "tags" if kind == "heads" else "heads"
    reason = f"copied from {src.remote.url}"

    def refused(old: str | None, why: str) -> RefUpdate:
        return RefUpdate(kind, name, old, new, "refused", why)

    clash = dst.refs.read(dataset, other, name)
    if clash.commit is not None:
        other_noun = "tag" if kind == "heads" else "branch"
        return refused(clash.commit, (
            f"{name!r} is a {noun} in {src.remote.url} but a {other_noun} in {dst.remote.url}: "
            "a name is never both, and --force does not change that; rename or delete one"))
    current = dst.refs.read(dataset, kind, name)
    old = current.commit
    if old == new:
        return RefUpdate(kind, name, old, new, "unchanged")
    try:
        if old is None:
            dst.set_ref(dataset, kind, name, new, reason)
            return RefUpdate(kind, name, old, new, "created")
        if kind == "heads" and _is_ancestor(dst, old, new, pool):
            dst.refs.compare_and_swap(dataset, kind, name, current, new, reason)
            return RefUpdate(kind, name, old, new, "fast-forward")
        if not force:
            if kind == "tags":
                why = (f"tag {name!r} is {old[:12]} in {dst.remote.url} but {new[:12]} in "
                       f"{src.remote.url}; tags never move: use --force to overwrite it")
            elif _is_ancestor(dst, new, old, pool):
                why = (f"branch {name!r} is ahead in {dst.remote.url} ({old[:12]}, which "
                       f"contains {new[:12]} of {src.remote.url}): not a fast-forward; use "
                       "--force to move it back")
            else:
                why = (f"branch {name!r} has diverged: {old[:12]} in {dst.remote.url}, "
                       f"{new[:12]} in {src.remote.url}, neither contains the other; use "
                       "--force to overwrite it")
            return refused(old, why)
        dst.refs.compare_and_swap(dataset, kind, name, current, new, reason + " (forced)")
        return RefUpdate(kind, name, old, new, "forced")
    except (RefConflict, AlreadyExists) as e:  # lost a race with another writer
        return refused(old, f"{noun} {name!r}: {e}")


def transfer_dataset(src: Repository, dst: Repository, dataset: str, force: bool = False,
                     progress: Progress | None = None, workers: int | None = None,
                     label: str = "copy") -> TransferResult:
    """Copy every branch and tag of `dataset` from `src` to `dst` (see the module docstring).

    `progress` is told the chunk bytes to copy (under `label`: the CLI says push or pull) and
    each chunk's bytes as it lands; `workers` bounds the parallel copies (default: the larger
    `parallelism` of the two remotes). Refused refs do not raise: they are listed in the
    result; call `raise_if_refused()` on it."""
    progress = progress or NoProgress()
    src.dataset(dataset)  # DatasetNotFound names the source
    if _same_repository(src, dst):
        raise UsageError(f"source and destination are the same repository "
                         f"({src.remote.url}): name another remote")
    _ensure_dataset(src, dst, dataset, create=False)  # a chunk-size mismatch copies nothing
    tips = {(kind, name): commit for kind in KINDS
            for name, commit in src.refs.list(dataset, kind).items()}
    workers = workers or max(getattr(src.remote, "parallelism", 4),
                             getattr(dst.remote, "parallelism", 4))
    result = TransferResult(dataset, src.remote.url, dst.remote.url)
    with RepositoryLock(dst.remote, "writer"):
        walker, reached = _what_to_copy(src, dst, dataset, tips, workers)
        _copy_objects(src, dst, walker, reached, workers, progress, label, result)
        dst.remote.flush()  # every object durable before any ref points at it
        result.created_dataset = _ensure_dataset(src, dst, dataset, create=True)
        _update_refs(src, dst, dataset, tips, force, result)
    return result


def _what_to_copy(src: Repository, dst: Repository, dataset: str,
                  tips: dict[tuple[RefKind, str], str],
                  workers: int) -> tuple[_SizingWalker, Reached]:
    """The objects the refs reach in `src` that `dst` lacks; raises when `src` is damaged."""
    walker = _SizingWalker(src, workers=max(workers, 8),
                           prune=lambda batch: dst.remote.has(batch))
    try:
        reached = walker.walk(sorted(set(tips.values())))
    except CorruptObject as e:  # a tree or commit of src, found while walking
        raise CorruptObject(f"{e} (in {src.remote.url}); nothing was copied to "
                            f"{dst.remote.url}: repair the source first",
                            e.object_name) from e
    if reached.missing:
        raise ObjectNotFound(
            f"{len(reached.missing)} objects that the refs of {dataset!r} reach are missing "
            f"from {src.remote.url} (first: {reached.missing[0]}); nothing was copied: "
            f"run `cachefs verify {dataset}` there")
    log.info("%d chunks, %d trees, %d commits to copy", len(reached.chunks),
             len(reached.trees), len(reached.commits))
    return walker, reached


def _copy_objects(src: Repository, dst: Repository, walker: _SizingWalker, reached: Reached,
                  workers: int, progress: Progress, label: str,
                  result: TransferResult) -> None:
    """Copy chunks, then trees and commits bottom-up (an object only after its children);
    the counts go into `result`."""
    copier = _Copier(src, dst, workers, progress)
    try:
        if reached.chunks:
            total = sum(walker.chunk_sizes.get(k.rsplit("/", 1)[1], 0)
                        for k in reached.chunks)
            progress.start(total, "B", label)
            try:
                copier.chunks(sorted(reached.chunks))
            finally:
                progress.close()
        copier.levels(by_height(heights(reached.children, reached.trees)))
        copier.levels(by_height(heights(reached.children, reached.commits)))
    finally:
        copier.close()
        result.chunks, result.trees = copier.counts["chunks"], copier.counts["trees"]
        result.commits = copier.counts["commits"]
        result.chunk_bytes, result.meta_bytes = copier.chunk_bytes, copier.meta_bytes


def _update_refs(src: Repository, dst: Repository, dataset: str,
                 tips: dict[tuple[RefKind, str], str], force: bool,
                 result: TransferResult) -> None:
    """Move each ref of `dst` to its tip in `src` where allowed; each outcome into `result`."""
    with ThreadPoolExecutor(8, thread_name_prefix="cachefs-ancestry") as pool:
        for (kind, name), commit in sorted(tips.items()):
            update = _update_ref(src, dst, dataset, kind, name, commit, force, pool)
            if update.action == "refused":
                log.info("%s", update.reason)
            result.refs.append(update)
