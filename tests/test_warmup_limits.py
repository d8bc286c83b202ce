"""Warmups (the `user.cachefs.warmup` xattr) keep the file's read permission; K at most at once.

A warmup makes the daemon fetch a whole file from the origin, so it is a read: a caller who may
not read the file must not be able to make the mount fetch it (EACCES, and no origin request),
and no caller may queue an unbounded number of origin fetches (at most K warmups of one mount
run at once; the others wait for a slot).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.cache.disk import DiskCache
from cachefs.cache.memory import MemoryCache
from cachefs.cache.tiered import TieredStore, object_is_intact
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.objects import MIN_CHUNK_SIZE
from cachefs.dataset.repo import Repository
from cachefs.fs import ROOT_INODE, XATTR_WARMUP, Caller, DatasetFS, FsError, MountOptions
from cachefs.remotes.local import LocalRemote
from tests.helpers import cli_json, run_cli
from tests.mounting import MountSet
from tests.recording_remote import RecordingRemote

CHUNK = 64 << 10
NOBODY = 65534


def _getxattr_as(uid: int, gid: int, path: Path, name: bytes) -> subprocess.CompletedProcess:
    """os.getxattr(path, name) in a child running as uid:gid with no extra groups; it prints
    the value, or the errno name and exits 1."""
    code = (
        "import errno, os, sys\n"
        "try:\n"
        f"    print(os.getxattr({str(path)!r}, {name.decode()!r}).decode())\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno]); sys.exit(1)\n"
    )
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30, check=False)


def _origin_requests(mnt: Path) -> int:
    return int(cli_json("stats", str(mnt))["origin_requests"])


def test_warmup_needs_read_permission_on_a_real_mount(tmp_path: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to mount for other users")  # CI and this machine run as root
    src = tmp_path / "src"
    src.mkdir()
    (src / "secret.bin").write_bytes(os.urandom(3 * CHUNK))
    (src / "secret.bin").chmod(0o600)
    (src / "public.bin").write_bytes(os.urandom(2 * CHUNK))
    (src / "public.bin").chmod(0o644)
    run_cli("init", "ds", "--chunk-size", "64KiB")
    run_cli("commit", "ds", str(src), "-m", "modes")
    # Under /tmp with 0755 so that nobody can reach the mount point (tmp_path is root's 0700).
    public = Path(tempfile.mkdtemp(prefix="cachefs-warm-", dir="/tmp"))
    public.chmod(0o755)
    mount_set = MountSet(public)
    try:
        mnt = mount_set.mount("ds", mount_set.mountpoint(), "--cache-dir", str(public / "cache"))
        assert (mnt / "secret.bin").stat().st_mode & 0o777 == 0o600
        before = _origin_requests(mnt)
        denied = _getxattr_as(NOBODY, NOBODY, mnt / "secret.bin", XATTR_WARMUP)
        assert denied.returncode == 1 and denied.stdout.strip() == "EACCES", denied
        assert _origin_requests(mnt) == before  # nothing was fetched for the refused warmup
        allowed = _getxattr_as(NOBODY, NOBODY, mnt / "public.bin", XATTR_WARMUP)
        assert allowed.returncode == 0, allowed
        assert int(allowed.stdout) > 0
        assert _origin_requests(mnt) > before
        # root may warm anything (as it may read anything)
        assert int(os.getxattr(mnt / "secret.bin", XATTR_WARMUP.decode())) == 3 * CHUNK
    finally:
        mount_set.cleanup()
        shutil.rmtree(public, ignore_errors=True)


# -- the file-system core ----------------------------------------------------------------------

CORE_CHUNK = MIN_CHUNK_SIZE
OWNER, GROUP = 1000, 1000
K = 3
WAIT_S = 30  # bound on every wait below (a hang fails the test instead of stalling it)


class BlockingRemote(RecordingRemote):
    """Chunk gets block until `release` is set; counts the gets running now and the most at
    once."""

    def __init__(self, inner: LocalRemote) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.cond = threading.Condition()
        self.running = 0
        self.most = 0

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if not key.startswith("chunks/"):
            return super().get(key, start, length)
        with self.cond:
            self.running += 1
            self.most = max(self.most, self.running)
            self.cond.notify_all()
        try:
            assert self.release.wait(WAIT_S), "never released"
            return super().get(key, start, length)
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    def wait_running(self, count: int, timeout: float) -> bool:
        """Whether `count` or more gets run at once within `timeout` seconds."""
        with self.cond:
            return self.cond.wait_for(lambda: self.running >= count, timeout)


def _build(tmp_path: Path, files: dict[str, tuple[int, int]]) -> tuple[Repository, str]:
    """A dataset of `files` (name -> (size, mode)); returns the repository and the commit."""
    src = tmp_path / "src"
    src.mkdir()
    for name, (size, mode) in files.items():
        (src / name).write_bytes(os.urandom(size))
        (src / name).chmod(mode)
    repo = Repository(BlockingRemote(LocalRemote(tmp_path / "repo")))
    repo.create_dataset("ds", chunk_size=CORE_CHUNK)
    return repo, commit_directory(repo, "ds", "main", src, "v1").commit


def _fs(repo: Repository, commit: str, tmp_path: Path, **options: int) -> DatasetFS:
    store = TieredStore(repo, MemoryCache(64 << 20),
                        DiskCache(tmp_path / "cache", 256 << 20, verify=object_is_intact),
                        origin_parallelism=32)
    c = repo.get_commit(commit)
    return DatasetFS(store, commit, c.tree, c.time_ns, CORE_CHUNK,
                     MountOptions(uid=OWNER, gid=GROUP, **options), {"dataset": "ds"})


@pytest.mark.parametrize(("mode", "umask", "caller", "allowed"), [
    (0o600, 0, Caller(OWNER, 5), True),
    (0o600, 0, Caller(2000, GROUP), False),
    (0o640, 0, Caller(2000, GROUP), True),
    (0o640, 0o040, Caller(2000, GROUP), False),  # the mount's umask applies
    (0o640, 0, Caller(2000, 2000), False),
    (0o644, 0, Caller(2000, 2000), True),
    (0o644, 0o004, Caller(2000, 2000), False),
    (0o604, 0, Caller(2000, GROUP), False),  # in the group: the group's bits decide
    (0o044, 0, Caller(OWNER, GROUP), False),  # the owner: the owner's bits decide
    (0o000, 0, Caller(0, 0), True),  # root reads everything
])
def test_warmup_needs_read_permission(tmp_path: Path, mode: int, umask: int, caller: Caller,
                                      allowed: bool) -> None:
    repo, commit = _build(tmp_path, {"f.bin": (2 * CORE_CHUNK, mode)})
    remote = repo.remote
    assert isinstance(remote, BlockingRemote)
    remote.release.set()

    async def main() -> None:
        fs = _fs(repo, commit, tmp_path, umask=umask)
        node = await fs.lookup(ROOT_INODE, "f.bin")
        remote.calls.clear()
        if allowed:
            assert int(await fs.getxattr(node.ino, XATTR_WARMUP, caller)) == 2 * CORE_CHUNK
            assert remote.count("get", "chunks/") == 2
        else:
            with pytest.raises(FsError) as caught:
                await fs.getxattr(node.ino, XATTR_WARMUP, caller)
            assert caught.value.errno == errno.EACCES
            assert remote.count("get", "chunks/") == 0  # refused before any fetch
        # the other attributes stay readable by anyone who can reach the file
        assert await fs.getxattr(node.ino, b"user.cachefs.commit", caller) == commit.encode()

    trio.run(main)


def test_a_supplementary_group_counts(tmp_path: Path) -> None:
    """FUSE sends only the primary gid: the caller's other groups come from /proc/PID."""
    repo, commit = _build(tmp_path, {"f.bin": (CORE_CHUNK, 0o640)})
    assert isinstance(repo.remote, BlockingRemote)
    repo.remote.release.set()
    me = os.getpid()
    groups = set(os.getgroups())

    async def main() -> None:
        fs = _fs(repo, commit, tmp_path)
        node = await fs.lookup(ROOT_INODE, "f.bin")
        outsider = Caller(2000, 2000, me)
        # this process's groups decide whether the mount's group (GROUP) is among them
        assert fs.may_read(node, outsider) == (GROUP in groups)
        assert not fs.may_read(node, Caller(2000, 2000, 0))  # no pid: the primary gid only

    trio.run(main)


def test_at_most_k_warmups_fetch_at_once_and_all_finish(tmp_path: Path) -> None:
    count = 3 * K + 1
    # One chunk per file (each exactly a chunk: not packed with others), so each warmup is
    # exactly one origin fetch.
    repo, commit = _build(tmp_path, {f"f{i:02d}.bin": (CORE_CHUNK, 0o644) for i in range(count)})
    remote = repo.remote
    assert isinstance(remote, BlockingRemote)
    results: dict[int, int] = {}

    async def main() -> None:
        fs = _fs(repo, commit, tmp_path, max_warmups=K)
        nodes = [await fs.lookup(ROOT_INODE, f"f{i:02d}.bin") for i in range(count)]
        assert all(len({x.chunk for x in n.entry.extents}) == 1 for n in nodes)

        async def warm(i: int) -> None:
            value = await fs.getxattr(nodes[i].ino, XATTR_WARMUP, Caller(2000, 2000))
            results[i] = int(value)

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(warm, i)
                assert await trio.to_thread.run_sync(remote.wait_running, K, WAIT_S)
                # Every task is now blocked: on a fetch, or waiting for a slot. Had a (K+1)th
                # fetch been started, its thread would show within this bounded window.
                await trio.testing.wait_all_tasks_blocked()
                assert not await trio.to_thread.run_sync(remote.wait_running, K + 1, 0.5)
                assert remote.running == K
                remote.release.set()

    trio.run(main)
    assert remote.most == K
    assert results == {i: CORE_CHUNK for i in range(count)}
