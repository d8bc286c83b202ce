"""Commit -> checkout round trips: every byte, mode, mtime, symlink and empty thing comes back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachefs.dataset.checkout import checkout
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.objects import MIN_CHUNK_SIZE
from cachefs.dataset.repo import Repository
from cachefs.dataset.verify import verify
from cachefs.errors import AlreadyExists
from cachefs.remotes.registry import open_remote_url
from tests.helpers import local_repo, snapshot

CHUNK = MIN_CHUNK_SIZE  # small chunks: many chunks from little data


@pytest.fixture(params=["file", "s3"])
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Repository:
    if request.param == "file":
        r = local_repo(tmp_path / "repo")
    else:
        r = Repository(open_remote_url(request.getfixturevalue("s3_url")))
    r.create_dataset("ds", chunk_size=CHUNK)
    yield r
    r.close()


def build_tree(root: Path) -> None:
    (root / "empty_dir").mkdir(parents=True)
    (root / "deep" / "a" / "b" / "c" / "d").mkdir(parents=True)
    (root / "deep" / "a" / "b" / "c" / "d" / "leaf.txt").write_text("leaf")
    (root / "empty_file").touch()
    (root / "exactly_one_chunk").write_bytes(os.urandom(CHUNK))
    (root / "many_chunks.bin").write_bytes(os.urandom(CHUNK * 7 + 123))
    small = root / "small"
    small.mkdir()
    for i in range(50):
        (small / f"{i:03d}.jpg").write_bytes(os.urandom(1000 + i * 37))
    (root / "dup_a").write_bytes(b"same content" * 100)
    (root / "dup_b").write_bytes(b"same content" * 100)
    exe = root / "run.sh"
    exe.write_text("#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    ro = root / "readonly.txt"
    ro.write_text("do not touch")
    ro.chmod(0o444)
    (root / "private").write_text("secret")
    (root / "private").chmod(0o600)
    os.symlink("small/000.jpg", root / "rel_link")
    os.symlink("/etc/hostname", root / "abs_link")
    os.symlink("does/not/exist", root / "dangling_link")
    os.symlink("deep", root / "dir_link")
    (root / "name with spaces & ünïcödé").write_text("x")
    locked = root / "locked_dir"
    locked.mkdir()
    (locked / "inside").write_text("in a read-only directory")
    locked.chmod(0o555)
    os.utime(root / "private", ns=(1_000_000_000, 1_234_567_890_123_456_789))


def test_round_trip_is_exact(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    result = commit_directory(repo, "ds", "main", src, "everything")
    assert result.files == sum(1 for v in snapshot(src).values() if v[0] == "file")
    dest = tmp_path / "out"
    checkout(repo, result.commit, "", dest)
    assert snapshot(dest) == snapshot(src)
    assert verify(repo, result.commit).ok


def test_checkout_of_a_subtree_and_of_a_file(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    build_tree(src)
    commit = commit_directory(repo, "ds", "main", src, "m").commit
    checkout(repo, commit, "deep/a", tmp_path / "sub")
    assert (tmp_path / "sub" / "b" / "c" / "d" / "leaf.txt").read_text() == "leaf"
    checkout(repo, commit, "many_chunks.bin", tmp_path / "one.bin")
    assert (tmp_path / "one.bin").read_bytes() == (src / "many_chunks.bin").read_bytes()


def test_checkout_refuses_a_non_empty_destination_and_leaves_it(repo: Repository,
                                                                tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("new")
    commit = commit_directory(repo, "ds", "main", src, "m").commit
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine").write_text("keep me")
    with pytest.raises(AlreadyExists):
        checkout(repo, commit, "", dest)
    assert [p.name for p in dest.iterdir()] == ["mine"]
    empty = tmp_path / "empty"
    empty.mkdir()
    checkout(repo, commit, "", empty)  # an existing empty directory is fine
    assert (empty / "f").read_text() == "new"
    assert not [p for p in tmp_path.iterdir() if "cachefs-checkout" in p.name]


def test_sparse_1gib_file_round_trips_sparse(tmp_path: Path) -> None:
    repo = local_repo(tmp_path / "repo")
    repo.create_dataset("ds")
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse.img", "wb") as f:
        f.truncate(1 << 30)
        f.seek((1 << 29) + 5)
        f.write(b"data in the middle")
    result = commit_directory(repo, "ds", "main", src, "sparse")
    assert result.bytes == 1 << 30
    assert result.new_bytes <= 2 * (4 << 20)  # the zero chunk once, plus the one with data
    dest = tmp_path / "out"
    checkout(repo, result.commit, "", dest)
    out = dest / "sparse.img"
    assert out.stat().st_size == 1 << 30
    assert out.stat().st_blocks * 512 < 64 << 20  # holes stayed holes
    with open(out, "rb") as f:
        f.seek((1 << 29) + 5)
        assert f.read(18) == b"data in the middle"
        f.seek(0)
        assert f.read(1 << 20) == bytes(1 << 20)
