"""Programs that read files the way real training code does, through a real mount: SQLite, zip
archives, memory maps (what numpy.memmap does), and git. Each reads with seeks, re-opens and
random access, which a file system answering opens without OPEN (patched pyfuse3) must serve
as well as one that sees every open."""

from __future__ import annotations

import mmap
import os
import random
import sqlite3
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.mounting import MountSet

GIT_TIMEOUT_S = 60


@pytest.fixture
def mounted(tmp_path: Path, mounts: MountSet) -> tuple[Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    db = sqlite3.connect(src / "labels.db")
    db.execute("create table labels (id integer primary key, path text, label integer)")
    db.executemany("insert into labels values (?, ?, ?)",
                   [(i, f"img_{i:06d}.jpg", rng.randrange(1000)) for i in range(20_000)])
    db.execute("create index by_label on labels (label)")
    db.commit()
    db.close()
    with zipfile.ZipFile(src / "shard.zip", "w", zipfile.ZIP_STORED) as z:
        for i in range(300):
            z.writestr(f"part/{i:04d}.bin", rng.randbytes(rng.randrange(100, 50_000)))
    floats = [rng.random() for _ in range(600_000)]
    (src / "features.f64").write_bytes(struct.pack(f"<{len(floats)}d", *floats))
    repo = src / "code"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for i in range(3):
        (repo / "train.py").write_text(f"print({i})\n" * (i + 1))
        subprocess.run(["git", "init", "-q"] if i == 0 else ["true"], cwd=repo, check=True)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=env)
        subprocess.run(["git", "commit", "-q", "-m", f"step {i}"], cwd=repo, check=True, env=env)
    run_cli("init", "clients", "--chunk-size", "256KiB")
    run_cli("commit", "clients", str(src), "-m", "v1")
    return src, mounts.mount("clients", mounts.mountpoint())


def test_sqlite_queries_an_immutable_database(mounted: tuple[Path, Path]) -> None:
    src, mnt = mounted
    query = "select count(*), sum(label) from labels where label between 100 and 199"
    want = sqlite3.connect(src / "labels.db").execute(query).fetchone()
    db = sqlite3.connect(f"file:{mnt / 'labels.db'}?mode=ro&immutable=1", uri=True)
    try:
        assert db.execute(query).fetchone() == want
        assert db.execute("select path from labels where id = 12345").fetchone() == (
            "img_012345.jpg",)
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


def test_zip_members_read_in_random_order(mounted: tuple[Path, Path]) -> None:
    src, mnt = mounted
    with zipfile.ZipFile(src / "shard.zip") as z_src, zipfile.ZipFile(mnt / "shard.zip") as z:
        names = z.namelist()
        assert names == z_src.namelist()
        random.Random(1).shuffle(names)
        for name in names:
            assert z.read(name) == z_src.read(name)
        assert z.testzip() is None


def test_a_memory_map_reads_what_the_file_holds(mounted: tuple[Path, Path]) -> None:
    src, mnt = mounted
    data = (src / "features.f64").read_bytes()
    with open(mnt / "features.f64", "rb") as f, mmap.mmap(f.fileno(), 0,
                                                          access=mmap.ACCESS_READ) as m:
        assert len(m) == len(data)
        rng = random.Random(2)
        for _ in range(500):
            i = rng.randrange(len(data) // 8)
            assert m[i * 8 : i * 8 + 8] == data[i * 8 : i * 8 + 8]
        assert m[:] == data


def test_git_reads_a_repository(mounted: tuple[Path, Path]) -> None:
    src, mnt = mounted

    def git(root: Path, *args: str) -> str:
        return subprocess.run(["git", "-c", f"safe.directory={root / 'code'}", "-C",
                               str(root / "code"), *args], capture_output=True, text=True,
                              check=True, timeout=GIT_TIMEOUT_S).stdout

    assert git(mnt, "log", "--format=%H %s") == git(src, "log", "--format=%H %s")
    assert git(mnt, "show", "HEAD~1:train.py") == "print(1)\n" * 2
    git(mnt, "fsck", "--no-dangling", "--connectivity-only")  # exits non-zero if anything is off
