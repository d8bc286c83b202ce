"""A repository: datasets, their objects and refs, in one remote.

Keys in the remote (format version 1):

| key | content |
| --- | --- |
| `format` | JSON `{"cachefs_repository": 1}`, written on first use |
| `datasets/NAME` | JSON dataset settings (`chunk_size`, creation time) |
| `chunks/ab/abcd...` | raw chunk bytes, named by their BLAKE3 hash |
| `trees/ab/abcd...`, `commits/ab/abcd...` | encoded trees and commits (see objects.py) |
| `refs/NAME/heads/BRANCH/GEN`, `refs/NAME/tags/TAG/GEN` | ref generations (see refs.py) |

Chunks are shared by all datasets of a repository. Trees and commits are cached in-process
(they are immutable, so a cached object is never stale).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from cachefs.dataset.objects import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Commit,
    Kind,
    Tree,
    TreeEntry,
    decode_commit,
    decode_tree,
    encode,
    verify_chunk,
)
from cachefs.dataset.refs import KINDS, GenerationRefStore, RefKind, RefStore, RefValue
from cachefs.errors import (
    AlreadyExists,
    CorruptObject,
    DatasetNotFound,
    InvalidName,
    ObjectNotFound,
    PathNotFound,
    RefNotFound,
    RemoteError,
    UsageError,
)
from cachefs.names import check_name, is_hash_prefix, split_path
from cachefs.remotes.base import Remote

log = logging.getLogger("cachefs.repo")

FORMAT_KEY = "format"
FORMAT_VERSION = 1


def chunk_key(name: str) -> str:
    return f"chunks/{name[:2]}/{name}"


def tree_key(name: str) -> str:
    return f"trees/{name[:2]}/{name}"


def commit_key(name: str) -> str:
    return f"commits/{name[:2]}/{name}"


@dataclass(frozen=True)
class DatasetSettings:
    name: str
    chunk_size: int = DEFAULT_CHUNK_SIZE
    created_ns: int = 0


@dataclass(frozen=True)
class ResolvedRef:
    """What a user's REF named: the commit, and the branch or tag it came from (if any)."""

    commit: str
    kind: RefKind | None
    name: str | None
    value: RefValue | None


class Repository:
    """Datasets, objects and refs stored in one remote."""

    def __init__(self, remote: Remote, refs: RefStore | None = None) -> None:
        self.remote = remote
        self.refs: RefStore = refs or GenerationRefStore(remote)
        self._meta_cache: OrderedDict[str, Tree | Commit] = OrderedDict()
        self._meta_cache_limit = 4096
        self._lock = threading.Lock()
        self._check_format()

    # -- format -------------------------------------------------------------------------------
    def _check_format(self) -> None:
        try:
            raw = self.remote.get(FORMAT_KEY)
        except ObjectNotFound:
            doc = {"cachefs_repository": FORMAT_VERSION, "created_ns": time.time_ns()}
            self.remote.put_if_absent(FORMAT_KEY, json.dumps(doc).encode())
            raw = self.remote.get(FORMAT_KEY)
        try:
            version = json.loads(raw)["cachefs_repository"]
        except (ValueError, KeyError, TypeError) as e:
            raise RemoteError(f"{self.remote.url} is not a cachefs repository ({e})") from e
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise RemoteError(
                f"{self.remote.url} has repository format {version!r}; this cachefs supports up "
                f"to {FORMAT_VERSION}: upgrade cachefs"
            )

    # -- datasets -----------------------------------------------------------------------------
    def create_dataset(self, name: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> DatasetSettings:
        check_name(name, "dataset name")
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise UsageError(
                f"chunk size {chunk_size} out of range [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )
        settings = DatasetSettings(name, chunk_size, time.time_ns())
        doc = {"chunk_size": chunk_size, "created_ns": settings.created_ns}
        if not self.remote.put_if_absent(f"datasets/{name}", json.dumps(doc).encode()):
            raise AlreadyExists(f"dataset {name!r} already exists in {self.remote.url}")
        return settings

    def dataset(self, name: str) -> DatasetSettings:
        check_name(name, "dataset name", existing=True)
        try:
            doc = json.loads(self.remote.get(f"datasets/{name}"))
        except ObjectNotFound:
            raise DatasetNotFound(
                f"dataset {name!r} does not exist in {self.remote.url} "
                f"(create it with: cachefs init {name})"
            ) from None
        except ValueError as e:
            raise CorruptObject(f"settings of dataset {name!r} are corrupt: {e}") from e
        return DatasetSettings(name, int(doc["chunk_size"]), int(doc.get("created_ns", 0)))

    def delete_dataset(self, name: str) -> dict[str, str]:
        """Delete every branch and tag of a dataset, then the dataset; return {ref: commit}.

        Only refs go: the data stays until `gc` finds nothing reaches it, and the reflog keeps
        the deleted refs' commits reachable for gc's grace period."""
        self.dataset(name)
        removed: dict[str, str] = {}
        for kind in KINDS:
            for ref in self.refs.list(name, kind):
                removed[f"{kind}/{ref}"] = self.delete_ref(name, kind, ref)
        self.remote.delete(f"datasets/{name}")
        return removed

    def datasets(self) -> list[str]:
        return [key.split("/", 1)[1] for key in self.remote.list("datasets/")]

    # -- objects ------------------------------------------------------------------------------
    def get_chunk(self, name: str, start: int = 0, length: int | None = None) -> bytes:
        """Return a chunk (verified against its name), or a range of it (verified by callers
        that need to: a range cannot be checked against the whole chunk's hash)."""
        data = self.remote.get(chunk_key(name), start, length)
        if start == 0 and length is None:
            verify_chunk(name, data)
        return data

    def put_chunk(self, name: str, data: bytes | memoryview) -> None:
        self.remote.put(chunk_key(name), data)

    def _cached(self, name: str) -> Tree | Commit | None:
        with self._lock:
            obj = self._meta_cache.get(name)
            if obj is not None:
                self._meta_cache.move_to_end(name)
            return obj

    def _remember(self, name: str, obj: Tree | Commit) -> None:
        with self._lock:
            self._meta_cache[name] = obj
            if len(self._meta_cache) > self._meta_cache_limit:
                self._meta_cache.popitem(last=False)

    def get_tree(self, name: str) -> Tree:
        obj = self._cached(name)
        if isinstance(obj, Tree):
            return obj
        try:
            tree = decode_tree(name, self.remote.get(tree_key(name)))
        except ObjectNotFound:
            raise ObjectNotFound(f"tree {name} is missing from {self.remote.url}") from None
        self._remember(name, tree)
        return tree

    def get_commit(self, name: str) -> Commit:
        obj = self._cached(name)
        if isinstance(obj, Commit):
            return obj
        try:
            commit = decode_commit(name, self.remote.get(commit_key(name)))
        except ObjectNotFound:
            raise ObjectNotFound(f"commit {name} is missing from {self.remote.url}") from None
        self._remember(name, commit)
        return commit

    def put_meta(self, obj: Tree | Commit, skip_if_present: bool = True) -> tuple[str, int]:
        """Store a tree or commit; return (name, bytes newly written: 0 if already stored)."""
        name, stored = encode(obj)
        key = tree_key(name) if isinstance(obj, Tree) else commit_key(name)
        self._remember(name, obj)
        if skip_if_present and self.remote.has([key]):
            return name, 0
        self.remote.put(key, stored)
        return name, len(stored)

    # -- refs ---------------------------------------------------------------------------------
    def resolve(self, dataset: str, ref: str | None) -> ResolvedRef:
        """Resolve a branch, tag or commit-hash prefix of `dataset` (default branch: main)."""
        self.dataset(dataset)
        ref = ref if ref is not None else "main"
        for kind in KINDS:
            try:
                value = self.refs.read(dataset, kind, ref)
            except InvalidName:
                break  # a hash prefix that is not a valid ref name
            if value.commit is not None:
                return ResolvedRef(value.commit, kind, ref, value)
        if is_hash_prefix(ref):
            matches = [
                key.rsplit("/", 1)[1]
                for key in self.remote.list(f"commits/{ref[:2]}/{ref}")
            ]
            matches = [m for m in matches if self.get_commit(m).dataset == dataset]
            if len(matches) == 1:
                return ResolvedRef(matches[0], None, None, None)
            if len(matches) > 1:
                raise RefNotFound(f"commit prefix {ref!r} is ambiguous in dataset {dataset!r}")
        if not self.refs.list(dataset, "heads"):
            raise RefNotFound(f"dataset {dataset!r} has no versions yet "
                              f"(make one with: cachefs commit {dataset} DIR -m MESSAGE)")
        raise RefNotFound(f"no branch, tag or commit {ref!r} in dataset {dataset!r}")

    def branch_or_tag(self, dataset: str, name: str) -> tuple[RefKind, RefValue] | None:
        for kind in KINDS:
            value = self.refs.read(dataset, kind, name)
            if value.commit is not None:
                return kind, value
        return None

    def set_ref(self, dataset: str, kind: RefKind, name: str, commit: str, reason: str) -> None:
        """Create branch or tag `name` at `commit` (it must not exist as either)."""
        check_name(name, "branch name" if kind == "heads" else "tag name")
        self.dataset(dataset)
        existing = self.branch_or_tag(dataset, name)
        if existing is not None:
            what = "branch" if existing[0] == "heads" else "tag"
            raise AlreadyExists(f"{what} {name!r} already exists in dataset {dataset!r}")
        self.get_commit(commit)
        expected = self.refs.read(dataset, kind, name)
        self.refs.compare_and_swap(dataset, kind, name, expected, commit, reason)
        other: RefKind = "tags" if kind == "heads" else "heads"
        clash = self.refs.read(dataset, other, name)
        if clash.commit is not None:
            # Created concurrently as the other kind: back ours out, a name is never both.
            ours = RefValue(commit, expected.generation + 1)
            self.refs.compare_and_swap(dataset, kind, name, ours, None, "name clash")
            raise AlreadyExists(f"{name!r} was created concurrently in dataset {dataset!r}")

    def delete_ref(self, dataset: str, kind: RefKind, name: str) -> str:
        value = self.refs.read(dataset, kind, name)
        if value.commit is None:
            what = "branch" if kind == "heads" else "tag"
            raise RefNotFound(f"no {what} {name!r} in dataset {dataset!r}")
        self.refs.compare_and_swap(dataset, kind, name, value, None, "deleted")
        return value.commit

    # -- walking ------------------------------------------------------------------------------
    def root_entry(self, commit_name: str) -> TreeEntry:
        commit = self.get_commit(commit_name)
        return TreeEntry("/", Kind.DIR, 0o755, 0, commit.time_ns, commit.tree)

    def find(self, commit_name: str, path: str) -> TreeEntry:
        """The entry at `path` in a commit ('' is the root directory)."""
        entry = self.root_entry(commit_name)
        walked: list[str] = []
        for part in split_path(path):
            if not entry.is_dir:
                raise PathNotFound(f"{'/'.join(walked)} is not a directory")
            child = self.get_tree(entry.hash).get(part)
            walked.append(part)
            if child is None:
                raise PathNotFound(f"no such file or directory: {'/'.join(walked)}")
            entry = child
        return entry

    def walk(self, tree_name: str, prefix: str = "") -> Iterator[tuple[str, TreeEntry]]:
        """Yield (path, entry) for everything below a tree, depth-first in name order."""
        for entry in self.get_tree(tree_name).entries:
            path = f"{prefix}{entry.name}"
            yield path, entry
            if entry.is_dir:
                yield from self.walk(entry.hash, path + "/")

    def log(self, commit_name: str) -> Iterator[tuple[str, Commit]]:
        """Yield the first-parent history from `commit_name`, newest first."""
        name: str | None = commit_name
        while name is not None:
            commit = self.get_commit(name)
            yield name, commit
            name = commit.parents[0] if commit.parents else None

    def close(self) -> None:
        self.remote.close()
