"""Differences between two versions, walking both trees and skipping identical subtrees.

Two directories with the same tree name are identical (content addressing), so the walk never
descends into them: the cost of a diff follows the size of the change, not of the dataset.
Changes are reported per file or symlink (directories only through their contents).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from cachefs.dataset.objects import Kind, TreeEntry
from cachefs.dataset.repo import Repository

Change = Literal["added", "removed", "modified"]


@dataclass(frozen=True)
class DiffEntry:
    path: str
    change: Change
    old: TreeEntry | None
    new: TreeEntry | None

    @property
    def size_delta(self) -> int:
        return (self.new.size if self.new else 0) - (self.old.size if self.old else 0)


def _all(repo: Repository, entry: TreeEntry, path: str, change: Change) -> Iterator[DiffEntry]:
    if entry.kind is Kind.DIR:
        for sub_path, sub in repo.walk(entry.hash, path + "/"):
            if sub.kind is not Kind.DIR:
                yield DiffEntry(sub_path, change, sub if change == "removed" else None,
                                sub if change == "added" else None)
    else:
        yield DiffEntry(path, change, entry if change == "removed" else None,
                        entry if change == "added" else None)


def diff_trees(repo: Repository, old_tree: str, new_tree: str,
               prefix: str = "") -> Iterator[DiffEntry]:
    """Yield the changes from `old_tree` to `new_tree`, in path order."""
    if old_tree == new_tree:
        return
    old = {os.fsencode(e.name): e for e in repo.get_tree(old_tree).entries}
    new = {os.fsencode(e.name): e for e in repo.get_tree(new_tree).entries}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        path = prefix + (a or b).name  # type: ignore[union-attr]
        if a is None:
            yield from _all(repo, b, path, "added")  # type: ignore[arg-type]
        elif b is None:
            yield from _all(repo, a, path, "removed")
        elif a.kind is Kind.DIR and b.kind is Kind.DIR:
            yield from diff_trees(repo, a.hash, b.hash, path + "/")
        elif a.kind is Kind.DIR or b.kind is Kind.DIR:
            yield from _all(repo, a, path, "removed")
            yield from _all(repo, b, path, "added")
        elif (a.kind, a.hash, a.mode) != (b.kind, b.hash, b.mode):
            yield DiffEntry(path, "modified", a, b)


def diff_commits(repo: Repository, old_commit: str, new_commit: str) -> Iterator[DiffEntry]:
    return diff_trees(repo, repo.get_commit(old_commit).tree, repo.get_commit(new_commit).tree)
