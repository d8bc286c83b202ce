"""Crash durability on file:// and of checkout, with real faults: a disk that fails under a
mounted ext4 (a loop device whose backing file is cut short: the kernel answers EIO), writers
killed with SIGKILL, and object files emptied or cut on disk the way a power loss leaves files
that were put in place but never synced.

- a sync failure fails the flush and the commit (no ref moves), and a checkout (no DEST);
- a writer killed before its flush leaves objects that the next commit does not reuse, so after
  they are torn on disk the new commit uploads them again and passes `cachefs verify`;
- a healthy repository reuses everything and keeps no marker; a put costs no fsync of its own,
  except over an existing object (which may be durable and reachable): synced before it lands;
- a live writer's marker is left alone by other processes (and its objects trusted);
- a checkout's files are written back (no dirty pages) before the rename, and the parent is
  fsynced after it.

The one test double: two tests stand for a C library without syncfs by removing the module's
handle on it; the fsyncs they then check are real.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.dataset.checkout import checkout
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.objects import MIN_CHUNK_SIZE
from cachefs.dataset.repo import Repository
from cachefs.directio import cachestat
from cachefs.errors import LocalIOError, RemoteError
from cachefs.remotes import local
from cachefs.remotes.local import LocalRemote
from tests.helpers import cli_json, local_repo, run_cli

TIMEOUT_S = 60
KEY = "chunks/ab/" + "ab" * 32


# -- a disk that fails for real ------------------------------------------------------------------

class FailingDisk:
    """A small ext4 file system on a loop device; `fail()` cuts the backing file short, so every
    later write-back to the device fails with EIO (the kernel's own error path)."""

    SIZE = 64 << 20

    def __init__(self, workdir: Path) -> None:
        self.image = workdir / "disk.img"
        self.mnt = workdir / "disk"
        self.device = ""

    def _run(self, *argv: str) -> str:
        return subprocess.run(argv, check=True, capture_output=True, text=True,
                              timeout=TIMEOUT_S).stdout.strip()

    def start(self) -> None:
        with open(self.image, "wb") as f:
            f.truncate(self.SIZE)
        self._run("mkfs.ext4", "-q", "-F", str(self.image))
        self.device = self._run("losetup", "--find", "--show", str(self.image))
        self.mnt.mkdir()
        self._run("mount", "-o", "errors=continue", self.device, str(self.mnt))

    def fail(self) -> None:
        os.truncate(self.image, 1 << 20)
        self._run("losetup", "--set-capacity", self.device)

    def stop(self) -> None:
        if self.mnt.is_mount() and subprocess.run(
                ["umount", str(self.mnt)], capture_output=True, timeout=TIMEOUT_S).returncode:
            subprocess.run(["umount", "-l", str(self.mnt)], timeout=TIMEOUT_S)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], timeout=TIMEOUT_S)
        self.image.unlink(missing_ok=True)


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[FailingDisk]:
    if os.geteuid() != 0:
        pytest.skip("a failing disk needs root (loop device and mount)")
    missing = [t for t in ("mkfs.ext4", "losetup", "mount", "umount") if not shutil.which(t)]
    if missing or not Path("/dev/loop-control").exists():
        pytest.skip(f"a failing disk needs loop devices and {', '.join(missing) or 'them'}")
    disk = FailingDisk(tmp_path)
    try:
        try:
            disk.start()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot set up a loop-device file system: {e.stderr}")
        yield disk
    finally:
        disk.stop()


# -- writer processes ----------------------------------------------------------------------------

# A real commit that stops where it would flush: everything is written, nothing synced.
COMMIT_UNTIL_FLUSH = """
import sys
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.repo import Repository
from cachefs.remotes.local import LocalRemote
remote = LocalRemote(sys.argv[1])
def stop_before_syncing():
    print("flushing", flush=True)
    sys.stdin.read()  # killed here
remote.flush = stop_before_syncing
commit_directory(Repository(remote), "ds", "main", sys.argv[2], "killed before its flush")
"""

PUT_AND_WAIT = """
import sys
from cachefs.remotes.local import LocalRemote
remote = LocalRemote(sys.argv[1])  # kept: closing it would flush
remote.put(sys.argv[2], b"written by a writer that has not flushed yet")
print("put", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def writer(script: str, *args: str, until: str) -> Iterator[subprocess.Popen[str]]:
    """A Python process running `script`, once it printed `until`; killed at the end."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)  # type: ignore[arg-type]
            if not selector.select(TIMEOUT_S):
                raise AssertionError(f"writer printed nothing in {TIMEOUT_S} s")
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line != until:
            proc.kill()
            raise AssertionError(f"writer said {line!r}: {proc.communicate(timeout=TIMEOUT_S)}")
        yield proc
    finally:
        kill_9(proc)


def kill_9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL and reap (a zombie would still look alive in /proc); harmless twice."""
    if proc.returncode is not None:
        return
    proc.kill()
    proc.communicate(timeout=TIMEOUT_S)


def markers(repo_dir: Path, kind: str) -> list[str]:
    """Names of the writer markers ("live") or dead writers' records ("dead")."""
    dirty = repo_dir / ".dirty"
    return sorted(n for n in os.listdir(dirty) if n.startswith(kind + "-")) \
        if dirty.is_dir() else []


def tear_like_a_power_loss(repo_dir: Path) -> int:
    """Empty or halve every object file, keeping its mtime (what a power loss leaves of a file
    put in place whose data never reached the disk); returns how many."""
    paths = sorted(p for top in ("chunks", "trees", "commits") for p in (repo_dir / top).rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    for i, path in enumerate(paths):
        st = path.stat()
        data = path.read_bytes()
        path.write_bytes(b"" if i % 2 == 0 else data[: len(data) // 2])
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return len(paths)


def make_source(root: Path) -> int:
    """Files with fresh random bytes (nothing to share with any other test); total bytes."""
    (root / "sub").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(5 * MIN_CHUNK_SIZE + 1234))
    (root / "sub" / "mid.bin").write_bytes(os.urandom(MIN_CHUNK_SIZE + 7))
    for i in range(5):
        (root / f"small{i}.txt").write_bytes(os.urandom(3000 + i))
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# -- item 1: sync errors -------------------------------------------------------------------------

def test_a_failed_sync_fails_the_flush_and_every_later_one(failing_disk: FailingDisk) -> None:
    remote = LocalRemote(failing_disk.mnt / "repo")
    try:
        for i in range(20):
            remote.put(f"chunks/{i:02x}/{i:064x}", os.urandom(100_000))
        failing_disk.fail()
        with pytest.raises(RemoteError) as first:
            remote.flush()
        assert str(failing_disk.mnt / "repo") in str(first.value)
        assert "EIO" in str(first.value)
        # The kernel reports a write-back error once: a retry must not pass over lost data.
        with pytest.raises(RemoteError, match="EIO"):
            remote.flush()
        assert markers(failing_disk.mnt / "repo", "live"), "the marker must outlive a failure"
    finally:
        remote.close()


def test_a_commit_is_not_acknowledged_over_a_failed_sync(
        failing_disk: FailingDisk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_source(tmp_path / "src")
    remote = LocalRemote(failing_disk.mnt / "repo")
    repo = Repository(remote)
    try:
        repo.create_dataset("ds", chunk_size=MIN_CHUNK_SIZE)
        ref_writes: list[str] = []
        real_put_if_absent, real_flush = remote.put_if_absent, remote.flush

        def recording_put_if_absent(key: str, data: bytes) -> bool:
            ref_writes.append(key)
            return real_put_if_absent(key, data)

        def flush_on_a_failing_disk() -> None:
            failing_disk.fail()  # everything is written, nothing synced yet
            real_flush()

        monkeypatch.setattr(remote, "put_if_absent", recording_put_if_absent)
        monkeypatch.setattr(remote, "flush", flush_on_a_failing_disk)
        with pytest.raises(RemoteError, match="EIO") as failure:
            commit_directory(repo, "ds", "main", tmp_path / "src", "never acknowledged")
        assert str(failing_disk.mnt / "repo") in str(failure.value)
        assert not [k for k in ref_writes if k.startswith("refs/")], "the branch moved"
    finally:
        repo.close()


def test_without_syncfs_flush_fsyncs_what_was_written_and_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A C library without syncfs cannot be had on this machine: the module's handle on it is
    # removed (the test double sits at the libc boundary); every fsync below is real.
    monkeypatch.setattr(local, "_libc_syncfs", None)
    repo_dir = tmp_path / "repo"
    older = LocalRemote(repo_dir)
    older.put("chunks/cd/" + "cd" * 32, b"reused")
    older.flush()
    older.close()
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    remote = LocalRemote(repo_dir)
    try:
        remote.put(KEY, b"new")
        assert remote.has(["chunks/cd/" + "cd" * 32]) == {"chunks/cd/" + "cd" * 32}
        monkeypatch.setattr(os, "fsync", recording_fsync)
        remote.flush()
    finally:
        remote.close()
    for path in (repo_dir / KEY, repo_dir / "chunks/cd" / ("cd" * 32), repo_dir / "chunks/ab",
                 repo_dir / "chunks/cd"):
        assert str(path) in synced, f"{path} was not fsynced: {synced}"


# -- item 1: objects a dead writer left unsynced -------------------------------------------------

def test_objects_of_a_writer_killed_before_its_flush_are_uploaded_again(tmp_path: Path) -> None:
    repo_dir, src = tmp_path / "repo", tmp_path / "src"
    url = f"file://{repo_dir}"
    total = make_source(src)
    run_cli("init", "ds", "--chunk-size", "64KiB", "--remote", url)
    with writer(COMMIT_UNTIL_FLUSH, str(repo_dir), str(src), until="flushing") as proc:
        left_behind = markers(repo_dir, "live")
        kill_9(proc)
    assert tear_like_a_power_loss(repo_dir) > 5

    result = cli_json("commit", "ds", str(src), "-m", "after the crash", "--remote", url)
    proc = run_cli("verify", "ds", "--remote", url, check=False)
    assert proc.returncode == 0, f"the new commit reuses torn objects:\n{proc.stderr}"
    assert result["new_bytes"] == result["bytes"] == total
    assert left_behind, "a writer with unsynced puts must leave a marker"
    assert markers(repo_dir, "dead") and not markers(repo_dir, "live")

    # The objects were put again, so they are trusted again: the next writer reuses them.
    (tmp_path / "copy").mkdir()
    shutil.copytree(src, tmp_path / "copy" / "src")
    run_cli("init", "other", "--chunk-size", "64KiB", "--remote", url)
    again = cli_json("commit", "other", str(tmp_path / "copy" / "src"), "-m", "same data",
                     "--remote", url)
    assert again["new_bytes"] == 0


def test_a_healthy_repository_reuses_everything_and_keeps_no_marker(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    url = f"file://{repo_dir}"
    make_source(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for dataset in ("ds", "other"):
        run_cli("init", dataset, "--chunk-size", "64KiB", "--remote", url)
    first = cli_json("commit", "ds", str(tmp_path / "a"), "-m", "v1", "--remote", url)
    second = cli_json("commit", "other", str(tmp_path / "b"), "-m", "v1", "--remote", url)
    assert first["new_bytes"] == first["bytes"] > 0
    assert second["new_bytes"] == 0  # every chunk found by has(), nothing hashed or re-put
    assert markers(repo_dir, "live") == markers(repo_dir, "dead") == []


def test_puts_pay_no_fsync_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_dir = tmp_path / "repo"
    remote = LocalRemote(repo_dir)
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    try:
        for cycle in range(2):
            calls.clear()
            for i in range(100):
                remote.put(f"chunks/{i:02x}/{cycle}{i:063x}", b"x" * 100)
            assert markers(repo_dir, "live")
            remote.flush()
            assert not markers(repo_dir, "live")
            # The marker and its directory (and, the first time, the new .dirty in the root).
            assert len(calls) <= (3 if cycle == 0 else 2), calls
    finally:
        remote.close()


def test_a_put_over_an_existing_object_is_synced_before_it_lands(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo_dir = tmp_path / "repo"
    remote = LocalRemote(repo_dir)
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (
        synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    try:
        remote.put(KEY, b"same bytes")
        temporaries = str(repo_dir / "chunks" / "ab" / ".tmp.")
        assert not [p for p in synced if p.startswith(temporaries)], "a new name costs no fsync"
        remote.flush()
        remote.put(KEY, b"same bytes")  # may replace an object a ref already reaches
        assert [p for p in synced if p.startswith(temporaries)], synced
        assert (repo_dir / KEY).read_bytes() == b"same bytes"
        assert not list((repo_dir / "chunks" / "ab").glob(".tmp.*"))
    finally:
        remote.close()


def test_a_live_writers_marker_is_left_alone(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    with writer(PUT_AND_WAIT, str(repo_dir), KEY, until="put") as proc:
        theirs = markers(repo_dir, "live")
        assert len(theirs) == 1
        other = LocalRemote(repo_dir)
        try:
            assert other.has([KEY]) == {KEY}  # its writer is alive: it will flush it
            other.put("chunks/cd/" + "cd" * 32, b"ours")
            other.flush()  # removes our marker only
        finally:
            other.close()
        assert markers(repo_dir, "live") == theirs and not markers(repo_dir, "dead")
        kill_9(proc)

    after = LocalRemote(repo_dir)
    try:
        assert after.has([KEY]) == set()  # put while its writer, now dead, was unsynced
        assert markers(repo_dir, "dead") and not markers(repo_dir, "live")
        after.put(KEY, b"written by a writer that has not flushed yet")
        assert after.has([KEY]) == {KEY}
        after.flush()
    finally:
        after.close()


def _boot_time_ns() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) * 10**9
    raise AssertionError("no btime in /proc/stat")


def _plant_marker(repo_dir: Path, name: str, created_ns: int, **fields: object) -> None:
    """A marker as another writer would have left it (fields override this process's)."""
    me = local._Writer.me()
    doc = {"host": me.host, "boot": me.boot, "pidns": me.pidns, "pid": me.pid,
           "start": me.start, "created_ns": created_ns, **fields}
    path = repo_dir / ".dirty" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    os.utime(path, ns=(created_ns, created_ns))


@pytest.mark.parametrize(("fields", "gone"), [
    ({"boot": "a-boot-before-this-one"}, True),  # power loss: the machine started again
    ({"start": "1"}, True),  # our pid, but another process's: the writer died, its pid reused
    ({"host": "another-host", "boot": "another-boot"}, False),  # judged by its own host only
    ({"pidns": "pid:[1]", "start": "1"}, False),  # another container: its pids mean nothing here
    ({}, False),  # this very process: alive
])
def test_who_is_judged_gone(tmp_path: Path, fields: dict[str, object], gone: bool) -> None:
    repo_dir = tmp_path / "repo"
    LocalRemote(repo_dir).close()
    # Dated as a previous boot would have left them: before this machine started.
    before_boot = _boot_time_ns() - 3600 * 10**9
    _plant_marker(repo_dir, f"live-{socket.gethostname()}-1-0000", before_boot, **fields)
    (repo_dir / "chunks" / "ab").mkdir(parents=True)
    (repo_dir / KEY).write_bytes(b"")  # torn
    os.utime(repo_dir / KEY, ns=(before_boot + 10**9, before_boot + 10**9))
    remote = LocalRemote(repo_dir)
    try:
        assert remote.has([KEY]) == (set() if gone else {KEY})
        assert bool(markers(repo_dir, "dead")) == gone
        assert bool(markers(repo_dir, "live")) != gone
    finally:
        remote.close()


# -- item 2: checkout ----------------------------------------------------------------------------

def test_checkout_writes_back_before_the_rename_and_fsyncs_the_parent(tmp_path: Path) -> None:
    if not shutil.which("strace"):
        pytest.skip("needs strace")
    repo_dir = tmp_path / "repo"
    url = f"file://{repo_dir}"
    make_source(tmp_path / "src")
    run_cli("init", "ds", "--chunk-size", "64KiB", "--remote", url)
    run_cli("commit", "ds", str(tmp_path / "src"), "-m", "v1", "--remote", url)
    dest, trace = tmp_path / "out", tmp_path / "trace"
    subprocess.run(
        ["strace", "-f", "-qq", "-y", "-o", str(trace),
         "-e", "trace=syncfs,fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-m", "cachefs.cli.main", "checkout", "ds", str(dest), "--remote", url],
        check=True, timeout=TIMEOUT_S, capture_output=True)
    lines = trace.read_text().splitlines()
    parent = re.escape(str(tmp_path))
    rename = next(i for i, line in enumerate(lines)
                  if re.search(rf'rename\w*\(.*"{parent}/\.out\.cachefs-checkout-\w+", '
                               rf'.*"{parent}/out"', line))
    assert any(re.search(rf"syncfs\(\d+<{parent}>\) = 0", line) for line in lines[:rename]), \
        lines
    assert any(re.search(rf"fsync\(\d+<{parent}>\) = 0", line) for line in lines[rename:]), \
        lines
    for path in dest.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                pages = cachestat(fd, 0, max(1, path.stat().st_size))
            finally:
                os.close(fd)
            if pages is None:
                pytest.skip("no cachestat(2) on this kernel")
            assert pages.nr_dirty == pages.nr_writeback == 0, path


class _FailAfterLastFile:
    """A progress that fails the disk once every byte is written (before any sync)."""

    def __init__(self, disk: FailingDisk) -> None:
        self.disk, self.left = disk, -1

    def start(self, total: int, unit: str, description: str) -> None:
        self.left = total

    def update(self, amount: int) -> None:
        self.left -= amount
        if self.left == 0:
            self.disk.fail()

    def close(self) -> None:
        pass


def test_a_failed_sync_leaves_no_checkout(failing_disk: FailingDisk, tmp_path: Path) -> None:
    make_source(tmp_path / "src")
    repo = local_repo(tmp_path / "repo")
    try:
        repo.create_dataset("ds", chunk_size=MIN_CHUNK_SIZE)
        commit = commit_directory(repo, "ds", "main", tmp_path / "src", "v1").commit
        dest = failing_disk.mnt / "out"
        with pytest.raises(LocalIOError, match="EIO") as failure:
            checkout(repo, commit, "", dest, progress=_FailAfterLastFile(failing_disk))
        assert str(dest) in str(failure.value)
        assert not dest.exists()
    finally:
        repo.close()


def test_coarse_clock_passes_a_span_end_quickly() -> None:
    end = time.time_ns()
    started = time.monotonic()
    local._after(end)
    assert time.clock_gettime_ns(local._CLOCK_REALTIME_COARSE) > end
    assert time.monotonic() - started < 0.5


def test_checkout_without_syncfs_fsyncs_every_file_and_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As above: the libc handle is removed to stand for a C library without syncfs.
    make_source(tmp_path / "src")
    repo = local_repo(tmp_path / "repo")
    try:
        repo.create_dataset("ds", chunk_size=MIN_CHUNK_SIZE)
        commit = commit_directory(repo, "ds", "main", tmp_path / "src", "v1").commit
        monkeypatch.setattr(local, "_libc_syncfs", None)
        synced: list[str] = []
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (
            synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
        checkout(repo, commit, "", tmp_path / "out")
    finally:
        repo.close()
    staged = {re.sub(r"/\.out\.cachefs-checkout-\w+", "/out", p) for p in synced}
    expected = {str(p) for p in (tmp_path / "out").rglob("*")} | {str(tmp_path / "out")}
    assert expected <= staged, expected - staged
    assert synced[-1] == str(tmp_path), "the parent is fsynced last, after the rename"
