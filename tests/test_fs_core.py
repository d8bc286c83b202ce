"""The file-system core without /dev/fuse: single flight, readahead, sparse reads, inodes.

`DatasetFS` over a `TieredStore` over a real local repository wrapped to count what reaches it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.cache.disk import DiskCache
from cachefs.cache.memory import MemoryCache
from cachefs.cache.tiered import TieredStore, object_is_intact
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.objects import MIN_CHUNK_SIZE
from cachefs.dataset.repo import Repository, chunk_key
from cachefs.errors import CorruptObject
from cachefs.fs import ROOT_INODE, DatasetFS, FsError, MountOptions
from cachefs.remotes.local import LocalRemote
from tests.recording_remote import RecordingRemote

CHUNK = MIN_CHUNK_SIZE


@pytest.fixture
def built(tmp_path: Path) -> tuple[Repository, RecordingRemote, str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(CHUNK * 20))
    with open(src / "sparse.img", "wb") as f:
        f.truncate(CHUNK * 8)
        f.seek(CHUNK * 3)
        f.write(b"island")
    for i in range(30):
        (src / f"small{i:02d}").write_bytes(os.urandom(500))
    remote = RecordingRemote(LocalRemote(tmp_path / "repo"))
    repo = Repository(remote)
    repo.create_dataset("ds", chunk_size=CHUNK)
    commit = commit_directory(repo, "ds", "main", src, "v1").commit
    return repo, remote, commit, src


def make_fs(repo: Repository, commit: str, tmp_path: Path, memory: int = 64 << 20) -> DatasetFS:
    store = TieredStore(repo, MemoryCache(memory),
                        DiskCache(tmp_path / "cache", 256 << 20, verify=object_is_intact))
    c = repo.get_commit(commit)
    return DatasetFS(store, commit, c.tree, c.time_ns, CHUNK,
                     MountOptions(uid=os.getuid(), gid=os.getgid()), {"dataset": "ds"})


def chunk_gets(remote: RecordingRemote) -> int:
    return remote.count("get", "chunks/")


def test_concurrent_reads_of_one_chunk_share_one_fetch(built, tmp_path: Path) -> None:
    repo, remote, commit, src = built

    async def main() -> list[bytes]:
        fs = make_fs(repo, commit, tmp_path)
        node = await fs.lookup(ROOT_INODE, "small07")
        results: list[bytes] = []

        async def reader() -> None:
            fh = fs.open(node.ino, os.O_RDONLY)
            results.append(bytes(await fs.read(fh, 0, 4096)))

        remote.calls.clear()
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(reader)
        return results

    results = trio.run(main)
    assert results == [(src / "small07").read_bytes()] * 50
    assert chunk_gets(remote) == 1


def test_sequential_reading_prefetches_following_chunks(built, tmp_path: Path) -> None:
    repo, remote, commit, src = built
    expected = (src / "big.bin").read_bytes()

    async def main() -> None:
        fs = make_fs(repo, commit, tmp_path)
        async with trio.open_nursery() as nursery:
            fs.nursery = nursery
            node = await fs.lookup(ROOT_INODE, "big.bin")
            fh = fs.open(node.ino, os.O_RDONLY)
            remote.calls.clear()
            for i in range(3):  # three sequential chunk-sized reads
                assert bytes(await fs.read(fh, i * CHUNK, CHUNK)) == expected[
                    i * CHUNK : (i + 1) * CHUNK]
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(10):
                while chunk_gets(remote) < 3 + 4:
                    await trio.sleep(0.01)
            fetched_ahead = chunk_gets(remote) - 3
            assert fetched_ahead >= 4  # the window grew: 1, 2, 4 chunks ahead
            remote.calls.clear()
            assert bytes(await fs.read(fh, 3 * CHUNK, CHUNK)) == expected[3 * CHUNK : 4 * CHUNK]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_sparse_regions_are_never_fetched(built, tmp_path: Path) -> None:
    repo, remote, commit, _ = built

    async def main() -> bytes:
        fs = make_fs(repo, commit, tmp_path)
        node = await fs.lookup(ROOT_INODE, "sparse.img")
        fh = fs.open(node.ino, os.O_RDONLY)
        remote.calls.clear()
        zeros = await fs.read(fh, 0, 2 * CHUNK)
        assert bytes(zeros) == bytes(2 * CHUNK)
        assert chunk_gets(remote) == 0
        return bytes(await fs.read(fh, 3 * CHUNK, 6))

    assert trio.run(main) == b"island"


def test_inodes_follow_lookups_and_forgets(built, tmp_path: Path) -> None:
    repo, _, commit, _ = built

    async def main() -> None:
        fs = make_fs(repo, commit, tmp_path)
        first = await fs.lookup(ROOT_INODE, "small01")
        again = await fs.lookup(ROOT_INODE, "small01")
        assert first is again and first.lookups == 2  # the same entry keeps its inode
        assert fs.inode_count == 2
        fs.forget(first.ino, 2)
        assert fs.inode_count == 1
        with pytest.raises(FsError) as info:
            fs.inode(first.ino)
        assert info.value.errno == errno.ENOENT
        with pytest.raises(FsError) as info:
            await fs.lookup(ROOT_INODE, "missing")
        assert info.value.errno == errno.ENOENT
        node = await fs.lookup(ROOT_INODE, "small02")
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(FsError) as info:
                fs.open(node.ino, flags)
            assert info.value.errno == errno.EROFS

    trio.run(main)


def test_corrupt_object_from_the_origin_is_refused_and_not_cached(built, tmp_path: Path) -> None:
    repo, _, commit, _ = built
    name = repo.find(commit, "small03").extents[0].chunk
    path = tmp_path / "repo" / chunk_key(name)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))

    async def main() -> None:
        fs = make_fs(repo, commit, tmp_path)
        with pytest.raises(CorruptObject):
            await fs.store.chunk(name)
        assert fs.store.stats()["corrupt_chunks"] == 1
        assert not fs.store.memory.contains(chunk_key(name))
        assert not fs.store.disk.contains(chunk_key(name))  # type: ignore[union-attr]
        node = await fs.lookup(ROOT_INODE, "small03")
        fh = fs.open(node.ino, os.O_RDONLY)
        with pytest.raises(FsError) as info:
            await fs.read(fh, 0, 100)
        assert info.value.errno == errno.EIO
        path.write_bytes(good)  # repaired at the origin: the next read succeeds
        assert len(await fs.read(fh, 0, 100)) == 100

    trio.run(main)
