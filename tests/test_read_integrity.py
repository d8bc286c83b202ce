"""A mount never returns wrong bytes and never stalls on its own bookkeeping.

- A tree whose extents do not fit their chunks (a lying tree: the chunk's hash vouches for the
  chunk, not for the tree's offsets) is refused: EIO, counted in stats, never a short or shifted
  reply; an extent past the largest chunk size is refused when the tree is decoded.
- The decoded-tree cache counts each tree once under concurrent lookups, and decodes large trees
  off the trio thread, so other FUSE requests go on meanwhile.
- `checkout` of such a tree fails with CorruptObject and leaves no destination.
- A reader waiting on a shared fetch whose leader was cancelled fetches again instead of failing.

Each runs `DatasetFS` / `TieredStore` over a real local repository.
"""

from __future__ import annotations

import errno
import gc
import os
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.cache.memory import MemoryCache
from cachefs.cache.tiered import TieredStore
from cachefs.dataset.checkout import checkout
from cachefs.dataset.objects import (
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Commit,
    Extent,
    Kind,
    Tree,
    TreeEntry,
    decode_tree,
    encode,
    hash_bytes,
)
from cachefs.dataset.repo import Repository, chunk_key, commit_key, tree_key
from cachefs.errors import CorruptObject
from cachefs.fs import ROOT_INODE, DatasetFS, FsError, MountOptions
from cachefs.remotes.local import LocalRemote
from tests.recording_remote import RecordingRemote

CHUNK = MIN_CHUNK_SIZE


def store_chunk(repo: Repository, data: bytes) -> str:
    name = hash_bytes(data)
    repo.remote.put(chunk_key(name), data)
    return name


def store_tree(repo: Repository, entries: list[TreeEntry]) -> str:
    name, stored = encode(Tree.from_entries(entries))
    repo.remote.put(tree_key(name), stored)
    return name


def file_entry(name: str, extents: list[Extent]) -> TreeEntry:
    size = sum(x.length for x in extents)
    return TreeEntry(name, Kind.FILE, 0o644, size, 0, "0" * 64, tuple(extents))


def make_fs(repo: Repository, tree: str, memory: int = 64 << 20) -> DatasetFS:
    store = TieredStore(repo, MemoryCache(memory), None)
    return DatasetFS(store, "c" * 64, tree, 0, CHUNK,
                     MountOptions(uid=os.getuid(), gid=os.getgid()), {"dataset": "ds"})


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(RecordingRemote(LocalRemote(tmp_path / "repo")))


# -- extents that do not fit their chunk ------------------------------------------------------


def test_an_extent_past_its_chunk_is_eio_never_shifted_bytes(repo: Repository) -> None:
    first = os.urandom(1000)
    second = os.urandom(1000)
    a, b = store_chunk(repo, first), store_chunk(repo, second)
    # "lying" claims 100 bytes at offset 950 of a 1000-byte chunk: only 50 exist.
    tree = store_tree(repo, [
        file_entry("lying", [Extent(a, 0, 100), Extent(b, 950, 100), Extent(a, 100, 100)]),
        file_entry("honest", [Extent(a, 0, 100), Extent(b, 900, 100)]),
    ])

    async def main() -> None:
        fs = make_fs(repo, tree)
        honest = fs.open((await fs.lookup(ROOT_INODE, "honest")).ino, os.O_RDONLY)
        assert bytes(await fs.read(honest, 0, 200)) == first[:100] + second[900:]
        lying = fs.open((await fs.lookup(ROOT_INODE, "lying")).ino, os.O_RDONLY)
        for offset, size in ((0, 300), (100, 100), (150, 10)):  # multi-piece and single-piece
            with pytest.raises(FsError) as info:
                await fs.read(lying, offset, size)
            assert info.value.errno == errno.EIO
        # The pieces that fit are still served.
        assert bytes(await fs.read(lying, 0, 100)) == first[:100]
        assert bytes(await fs.read(lying, 200, 100)) == first[100:200]
        assert fs.stats()["bad_extents"] == 3

    trio.run(main)


def test_a_tree_with_an_extent_past_the_largest_chunk_is_refused_when_decoded(
        repo: Repository) -> None:
    a = store_chunk(repo, b"x" * 10)
    for extents in ([Extent(a, MAX_CHUNK_SIZE - 5, 10)],
                    [Extent(a, 0, 5), Extent(a, MAX_CHUNK_SIZE, 5)]):
        name, stored = encode(Tree.from_entries([file_entry("f", extents)]))
        with pytest.raises(CorruptObject, match="past the largest chunk size"):
            decode_tree(name, stored)
    # At the limit exactly is a valid extent.
    name, stored = encode(Tree.from_entries([file_entry("f", [Extent(a, MAX_CHUNK_SIZE - 5, 5)])]))
    assert decode_tree(name, stored).entries[0].extents[0].offset == MAX_CHUNK_SIZE - 5


# -- the decoded-tree cache -----------------------------------------------------------------------


def test_concurrent_lookups_of_one_tree_count_it_once(repo: Repository) -> None:
    a = store_chunk(repo, b"data")
    entries = [file_entry(f"f{i:03d}", [Extent(a, 0, 4)]) for i in range(100)]
    sub = store_tree(repo, entries)
    root = store_tree(repo, [TreeEntry("d", Kind.DIR, 0o755, 0, 0, sub)])

    async def main() -> None:
        fs = make_fs(repo, root)
        store = fs.store
        await store.tree(root)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(store.tree, sub)
        stats = store.stats()
        assert stats["trees_cached"] == 2
        assert stats["tree_entries_cached"] == 101  # root's 1 + sub's 100, each once
        assert repo.remote.count("get", tree_key(sub)) == 1  # type: ignore[attr-defined]

    trio.run(main)


def test_a_large_tree_is_decoded_off_the_trio_thread(repo: Repository) -> None:
    a = store_chunk(repo, b"data")
    entries = [file_entry(f"file-{i:06d}.jpg", [Extent(a, 0, 4)]) for i in range(100_000)]
    name, stored = encode(Tree.from_entries(entries))
    repo.remote.put(tree_key(name), stored)
    gc.disable()
    try:
        started = time.perf_counter()
        decode_tree(name, stored)
        decode_s = time.perf_counter() - started
    finally:
        gc.enable()

    async def main() -> float:
        store = TieredStore(repo, MemoryCache(64 << 20), None)
        longest_gap = 0.0
        loading = True

        async def ticker() -> None:
            nonlocal longest_gap
            last = time.perf_counter()
            while loading:
                await trio.sleep(0)
                now = time.perf_counter()
                longest_gap = max(longest_gap, now - last)
                last = now

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0)
            tree = await store.tree(name)
            loading = False
        assert len(tree.entries) == 100_000
        return longest_gap

    # The cyclic garbage collector, run by whichever thread allocates, holds the GIL for up to
    # a few hundred milliseconds over 100,000 fresh tuples: keep it out of the window.
    gc.disable()
    try:
        longest_gap = trio.run(main)
    finally:
        gc.enable()
    # Decoding on the trio thread stops every other task for the whole decode; off it, the
    # loop keeps turning (the GIL is handed over every few milliseconds).
    assert decode_s > 0.1, "the tree is too small to tell"
    assert longest_gap < decode_s / 4, (longest_gap, decode_s)


# -- single flight: a cancelled leader ------------------------------------------------------------


class StallingRemote(RecordingRemote):
    """Chunk gets wait until `release` is set (the first one tells `first_get_started`)."""

    def __init__(self, inner: LocalRemote) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.first_get_started = threading.Event()

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if key.startswith("chunks/"):
            self.first_get_started.set()
            if not self.release.wait(30):
                raise TimeoutError("the test never released the get")
        return super().get(key, start, length)


def test_waiters_refetch_when_the_leading_reader_is_cancelled(tmp_path: Path) -> None:
    remote = StallingRemote(LocalRemote(tmp_path / "repo"))
    repo = Repository(remote)
    data = os.urandom(5000)
    name = store_chunk(repo, data)

    async def main() -> None:
        store = TieredStore(repo, MemoryCache(64 << 20), None)
        results: list[bytes] = []
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await store.chunk(name)

        async def waiter() -> None:
            results.append(await store.chunk(name))

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(leader)
                await trio.to_thread.run_sync(remote.first_get_started.wait, 10)
                nursery.start_soon(waiter)
                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                # The leader gives up (as when a sibling piece of its read failed) while two
                # readers wait on its fetch: they must fetch again, not fail.
                leader_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                remote.release.set()
        assert results == [data, data]
        assert len(store._flights) == 0

    trio.run(main)


def test_checkout_of_a_lying_tree_fails_and_leaves_nothing(repo: Repository,
                                                           tmp_path: Path) -> None:
    a = store_chunk(repo, os.urandom(1000))
    tree = store_tree(repo, [file_entry("lying", [Extent(a, 950, 100)])])
    name, stored = encode(Commit(tree, (), "ds", "t", "lying", 0, 1, 100))
    repo.remote.put(commit_key(name), stored)
    dest = tmp_path / "out"
    with pytest.raises(CorruptObject, match="does not fit chunk"):
        checkout(repo, name, "", dest)
    assert not dest.exists()
    assert not [p for p in tmp_path.iterdir() if "cachefs-checkout" in p.name]
