"""Garbage collection: remove objects no ref, pin, recent reflog entry or recent object reaches.

What is kept (the "live" set) is everything reachable from:
- the current commit of every branch and tag of every dataset;
- the commit of every live pin (pins.py: what mounts and CSI volumes use, even once no ref
  reaches it any more);
- every commit a ref pointed to within the grace period (the reflog: a deleted branch or a
  forced push can be undone for that long);
- every tree and commit stored within the grace period (an interrupted commit or push keeps its
  work for a resume, and whatever such a tree refers to stays with it).
Chunks stored within the grace period are kept too. Everything else under `chunks/`, `trees/`
and `commits/` is garbage.

gc marks in two passes. The first walks the repository without any lock (the long part), so
commits go on meanwhile. It then takes the gc lock, which waits for running writers to finish
and holds new ones back (locks.py), and walks again from refs, pins and objects that appeared
in the meantime: only new objects, so this is short. It then deletes, and releases the lock. An
object a writer stored or reused during gc is therefore either reached by a ref that writer
moved, or stored within the grace period, and is never removed. Pins are created holding a
writer lock too, so a pin is either read by that second pass or created after the sweep
(pins.py says why that is safe).

Deletion goes from the top down (commits and trees by decreasing height, chunks last), so an
interrupted gc never leaves a stored tree whose children are gone: every stored object's closure
stays complete, which is what commit and push rely on when they skip objects already stored.
Last, reflog generations older than the grace period are dropped (each ref keeps its newest),
and so are pins expired for longer than the grace period (a crashed node's mounts).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cachefs.dataset.locks import RepositoryLock
from cachefs.dataset.pins import PinStore
from cachefs.dataset.reach import ObjectWalker, by_height, heights
from cachefs.dataset.refs import GenerationRefStore, RefAddress
from cachefs.dataset.repo import Repository
from cachefs.errors import CorruptObject, RemoteUnsupported
from cachefs.progress import NoProgress, Progress
from cachefs.remotes.base import ObjectInfo

log = logging.getLogger("cachefs.gc")

OBJECT_PREFIXES = ("commits/", "trees/", "chunks/")
DEFAULT_GRACE_S = 3600.0


@dataclass
class KindTotals:
    objects: int = 0
    bytes: int = 0

    def add(self, info: ObjectInfo) -> None:
        self.objects += 1
        self.bytes += info.size


@dataclass
class GcResult:
    dry_run: bool
    grace_s: float
    live: dict[str, KindTotals] = field(default_factory=dict)
    garbage: dict[str, KindTotals] = field(default_factory=dict)
    kept_recent: int = 0
    missing: list[str] = field(default_factory=list)
    ref_generations_pruned: int = 0
    pins: list[str] = field(default_factory=list)  # the live pins honoured
    pins_pruned: list[str] = field(default_factory=list)

    @property
    def garbage_objects(self) -> int:
        return sum(t.objects for t in self.garbage.values())

    @property
    def garbage_bytes(self) -> int:
        return sum(t.bytes for t in self.garbage.values())

    def to_json(self) -> dict[str, object]:
        return {
            "dry_run": self.dry_run,
            "grace_s": self.grace_s,
            "live": {k: vars(v) for k, v in self.live.items()},
            "garbage": {k: vars(v) for k, v in self.garbage.items()},
            "garbage_objects": self.garbage_objects,
            "garbage_bytes": self.garbage_bytes,
            "kept_recent": self.kept_recent,
            "missing": self.missing,
            "ref_generations_pruned": self.ref_generations_pruned,
            "pins": self.pins,
            "pins_pruned": self.pins_pruned,
        }


def _kind(key: str) -> str:
    return key.split("/", 1)[0]


class GarbageCollector:
    """One gc run over one repository; use `collect_garbage`."""

    def __init__(self, repo: Repository, grace_s: float, progress: Progress,
                 workers: int) -> None:
        if not isinstance(repo.refs, GenerationRefStore):
            raise RemoteUnsupported(f"gc is not available for {repo.remote.url}")
        self.repo = repo
        self.refs: GenerationRefStore = repo.refs
        self.grace_s = grace_s
        self.progress = progress
        self.workers = workers
        self.started_ns = time.time_ns()
        self.cutoff_ns = self.started_ns - int(grace_s * 1e9)
        self.listing: dict[str, ObjectInfo] = {}
        self.from_refs: set[str] = set()  # reached from refs, pins and the reflog (not recency)
        self.pin_store = PinStore(repo.remote)
        self.pins: set[str] = set()  # names of the live pins seen by any pass
        self.walker = ObjectWalker(repo, workers, on_object=progress.update)

    def _recent(self, info: ObjectInfo) -> bool:
        return info.mtime_ns >= self.cutoff_ns

    def root_commits(self) -> tuple[set[str], dict[RefAddress, list[tuple[int, ObjectInfo]]]]:
        """Commits the refs and the recent reflog point to; and every ref's generations."""
        generations: dict[RefAddress, list[tuple[int, ObjectInfo]]] = {}
        for address, gen, info in self.refs.all_generations():
            generations.setdefault(address, []).append((gen, info))
        roots: set[str] = set()
        for address, gens in generations.items():
            gens.sort()
            newest = gens[-1][0]
            for gen, info in gens:
                if gen != newest and not self._recent(info):
                    continue
                entry = self.refs.load(address, gen)
                roots.update(c for c in (entry.commit, entry.previous if gen != newest else None)
                             if c is not None)
        return roots, generations

    def pinned_commits(self) -> set[str]:
        """Commits the live pins keep (read anew by each pass: pins come and go)."""
        pins = self.pin_store.live()
        self.pins.update(pin.name for pin in pins)
        return {pin.commit for pin in pins}

    def list_objects(self, prefixes: tuple[str, ...]) -> dict[str, ObjectInfo]:
        return {info.key: info for prefix in prefixes
                for info in self.repo.remote.list_info(prefix)}

    def mark(self, listing: dict[str, ObjectInfo]) -> None:
        """Walk from the refs, the pins and every recent commit and tree not yet seen."""
        roots, _ = self.root_commits()
        roots |= self.pinned_commits()
        recent_commits = [k.rsplit("/", 1)[1] for k, i in listing.items()
                          if k.startswith("commits/") and self._recent(i)]
        recent_trees = [k.rsplit("/", 1)[1] for k, i in listing.items()
                        if k.startswith("trees/") and self._recent(i)]
        reached = self.walker.reached
        lists = (reached.commits, reached.trees, reached.chunks)
        before = [len(x) for x in lists]
        self.walker.walk(sorted(roots))
        for found, start in zip(lists, before):
            self.from_refs.update(found[start:])
        self.walker.walk(recent_commits, recent_trees)

    def garbage(self) -> list[str]:
        seen = self.walker.reached.seen
        return [k for k, info in self.listing.items()
                if k not in seen and not self._recent(info)]

    def delete(self, keys: list[str]) -> None:
        """Delete from the top down: commits and trees by decreasing height, then chunks."""
        meta = [k for k in keys if not k.startswith("chunks/")]
        chunks = [k for k in keys if k.startswith("chunks/")]
        groups = by_height(heights(self.walker.children_of(meta), meta))
        remote = self.repo.remote
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cachefs-gc") as pool:
            for group in [*reversed(groups), chunks]:
                for _ in pool.map(remote.delete, group):
                    self.progress.update(1)

    def prune_reflog(self, generations: dict[RefAddress, list[tuple[int, ObjectInfo]]]) -> int:
        pruned = 0
        for address, gens in generations.items():
            for gen, info in gens[:-1]:
                if not self._recent(info):
                    self.refs.delete_generation(address, gen)
                    pruned += 1
        return pruned


def collect_garbage(
    repo: Repository,
    grace_s: float = DEFAULT_GRACE_S,
    dry_run: bool = False,
    progress: Progress | None = None,
    workers: int = 16,
    lock_factory: Callable[[], RepositoryLock] | None = None,
) -> GcResult:
    """Remove (or with `dry_run`, only count) the objects nothing live reaches."""
    progress = progress or NoProgress()
    gc = GarbageCollector(repo, grace_s, progress, workers)
    result = GcResult(dry_run, grace_s)
    try:
        gc.listing = gc.list_objects(OBJECT_PREFIXES)
        progress.start(0, "obj", "gc: marking")
        gc.mark(gc.listing)
        lock = None
        if not dry_run:
            lock = (lock_factory or (lambda: RepositoryLock(repo.remote, "gc")))()
            lock.acquire()
        try:
            if lock is not None:
                # Writers that finished before the lock moved refs or stored objects: mark
                # from those too (only what is new is walked).
                gc.mark(gc.list_objects(("commits/", "trees/")))
            garbage = gc.garbage()
            doomed = set(garbage)
            for key, info in gc.listing.items():
                totals = result.garbage if key in doomed else result.live
                totals.setdefault(_kind(key), KindTotals()).add(info)
            result.kept_recent = sum(1 for k in gc.listing
                                     if k not in doomed and k not in gc.from_refs)
            result.missing = sorted(gc.walker.reached.missing)
            if result.missing:
                log.warning("%d referenced objects are missing (run `cachefs verify`)",
                            len(result.missing))
            if not dry_run:
                progress.start(len(garbage), "obj", "gc: deleting")
                gc.delete(garbage)
                _, generations = gc.root_commits()
                result.ref_generations_pruned = gc.prune_reflog(generations)
                result.pins_pruned = gc.pin_store.prune_expired(grace_s)
            result.pins = sorted(gc.pins)
        finally:
            if lock is not None:
                lock.release()
    except CorruptObject as e:
        raise CorruptObject(f"gc stopped, nothing more deleted: a live object is corrupt, so "
                            f"what it refers to cannot be known ({e})") from e
    finally:
        progress.close()
    for kind in ("commits", "trees", "chunks"):
        result.live.setdefault(kind, KindTotals())
        result.garbage.setdefault(kind, KindTotals())
    return result
