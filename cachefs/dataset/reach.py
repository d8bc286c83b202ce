"""Walking the objects a set of commits reaches: their history, trees and chunks.

gc marks with it and push/pull finds what to copy with it. The walk goes breadth first, one
level at a time, and fetches each level's trees and commits in parallel (on an object store a
walk is latency-bound, one request per tree). `prune` lets a caller stop the walk at objects whose
whole closure it already knows about (push: objects the destination already has, because every
writer stores an object only after everything it refers to).

It also records the graph among the objects it visited (`children`), from which `heights` derives
a bottom-up order: storing by increasing height (a copy) keeps every stored object's closure
complete at every moment, and deleting by decreasing height (gc) does too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cachefs.dataset.objects import Commit, Kind, Tree
from cachefs.dataset.repo import Repository, chunk_key, commit_key, tree_key
from cachefs.errors import CorruptObject, NotFound

log = logging.getLogger("cachefs.reach")

# Given a batch of keys, return those whose closure needs no walking.
Prune = Callable[[list[str]], set[str]]


@dataclass
class Reached:
    """What a walk found: keys by kind, the graph among them, and what was missing."""

    commits: list[str] = field(default_factory=list)  # keys, newest first
    trees: list[str] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    children: dict[str, tuple[str, ...]] = field(default_factory=dict)  # commit/tree -> keys
    missing: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def keys(self) -> set[str]:
        return set(self.commits) | set(self.trees) | set(self.chunks)


def heights(children: dict[str, tuple[str, ...]], keys: Iterable[str]) -> dict[str, int]:
    """Height of each key in the graph restricted to `keys`: 0 for a key none of whose
    children is among them, else one more than its tallest such child."""
    wanted = set(keys)
    result: dict[str, int] = {}
    for root in wanted:
        if root in result:
            continue
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:  # iterative post-order: histories can be very long
            key, expanded = stack.pop()
            if key in result:
                continue
            kids = [k for k in children.get(key, ()) if k in wanted]
            if expanded:
                result[key] = 1 + max((result[k] for k in kids), default=-1)
                continue
            stack.append((key, True))
            stack.extend((k, False) for k in kids if k not in result)
    return result


def by_height(heights_of: dict[str, int]) -> list[list[str]]:
    """Keys grouped by height, lowest first: each group only refers to earlier groups."""
    groups: dict[int, list[str]] = {}
    for key, h in heights_of.items():
        groups.setdefault(h, []).append(key)
    return [sorted(groups[h]) for h in sorted(groups)]


class ObjectWalker:
    """Walks from commits to everything they reach, in one repository."""

    def __init__(self, repo: Repository, workers: int = 16, prune: Prune | None = None,
                 seen: set[str] | None = None, on_object: Callable[[int], None] | None = None,
                 ) -> None:
        self.repo = repo
        self.workers = workers
        self.prune = prune
        self.on_object = on_object or (lambda n: None)
        self.reached = Reached(seen=seen if seen is not None else set())

    def _admit(self, keys: Iterable[str]) -> list[str]:
        """Keys not seen before, minus the pruned ones; all of them become seen."""
        fresh = []
        for key in keys:
            if key not in self.reached.seen:
                self.reached.seen.add(key)
                fresh.append(key)
        if fresh and self.prune is not None:
            pruned = self.prune(fresh)
            fresh = [k for k in fresh if k not in pruned]
        return fresh

    def _load(self, key: str) -> Commit | Tree | None:
        name = key.rsplit("/", 1)[1]
        try:
            return self.repo.get_commit(name) if key.startswith("commits/") \
                else self.repo.get_tree(name)
        except NotFound:
            return None

    def walk(self, commits: Iterable[str], trees: Iterable[str] = ()) -> Reached:
        """Walk from commit names (and tree names); a second call goes on from where the first
        stopped, skipping everything already seen."""
        reached = self.reached
        frontier = self._admit([*(commit_key(c) for c in commits), *(tree_key(t) for t in trees)])
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cachefs-walk") as pool:
            while frontier:
                next_frontier: list[str] = []
                for key, obj in zip(frontier, pool.map(self._load, frontier)):
                    if obj is None:
                        reached.missing.append(key)
                        log.warning("%s is referenced but missing from %s", key,
                                    self.repo.remote.url)
                        continue
                    if isinstance(obj, Commit):
                        reached.commits.append(key)
                        kids = (tree_key(obj.tree), *(commit_key(p) for p in obj.parents))
                    else:
                        reached.trees.append(key)
                        kids = tuple(self._children_of_tree(obj))
                    reached.children[key] = kids
                    chunks = [k for k in kids if k.startswith("chunks/")]
                    reached.chunks.extend(self._admit(chunks))
                    next_frontier.extend(k for k in kids if not k.startswith("chunks/"))
                self.on_object(len(frontier))
                frontier = self._admit(next_frontier)
        return reached

    def children_of(self, keys: list[str]) -> dict[str, tuple[str, ...]]:
        """The children of stored commits and trees (an unreadable or corrupt one has none)."""
        def load(key: str) -> Commit | Tree | None:
            try:
                return self._load(key)
            except CorruptObject:
                return None

        result: dict[str, tuple[str, ...]] = {}
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cachefs-walk") as pool:
            for key, obj in zip(keys, pool.map(load, keys)):
                if isinstance(obj, Commit):
                    result[key] = (tree_key(obj.tree), *(commit_key(p) for p in obj.parents))
                elif isinstance(obj, Tree):
                    result[key] = tuple(self._children_of_tree(obj))
                else:
                    result[key] = ()
        return result

    @staticmethod
    def _children_of_tree(tree: Tree) -> Iterable[str]:
        chunks: set[str] = set()
        for entry in tree.entries:
            if entry.kind is Kind.DIR:
                yield tree_key(entry.hash)
            elif entry.kind is Kind.FILE:
                chunks.update(x.chunk for x in entry.extents)
        yield from (chunk_key(c) for c in sorted(chunks))
