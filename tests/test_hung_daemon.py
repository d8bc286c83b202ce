"""A mount daemon that hangs (SIGSTOP) must not hang the CLI commands that talk to it.

Real mounts, real daemons, stopped with SIGSTOP. The test process itself never makes a syscall
on a stopped mount (that would block it in the kernel): it looks at /proc only and runs the CLI
as a child with a timeout, so a regression fails instead of hanging. Every stopped daemon is
killed at the end, whatever happened, and every mount is lazily unmounted (the `mounts`
fixture). The mounter's side is in test_csi_mounter.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import run_cli
from tests.mounting import MountSet, alive, daemon_pids, is_mounted, stopped, wait_for

ANSWER_TIMEOUT_S = 1.0  # what the tests give a daemon to answer
BOUND_S = 10.0  # what a command may take when a daemon hangs (answer timeout + start-up)
HANG_LIMIT_S = 30.0  # a command still running after this counts as hung (and is killed)


def cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`cachefs ARGS` as a child killed after HANG_LIMIT_S; returns it and its wall time."""
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "cachefs.cli.main", *args],
                              capture_output=True, text=True, timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"cachefs {' '.join(args)} hung (still running after {HANG_LIMIT_S:g} s)")
    return proc, time.monotonic() - start


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "hello.txt").write_text("hello\n")
    (src / "sub" / "data.bin").write_bytes(os.urandom(100_000))
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    return src


def test_cli_commands_on_a_stopped_daemon_answer_in_bounded_time(
        small_dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mount("ds", mounts.mountpoint())
    healthy = mounts.mount("ds", mounts.mountpoint("healthy"))
    pid = daemon_pids(mnt)[0]
    timeout = ["--timeout", str(ANSWER_TIMEOUT_S)]
    with stopped(pid):
        proc, took = cli("mounts", "--json", *timeout)
        assert proc.returncode == 0, proc.stderr
        assert took < BOUND_S
        rows = {r["mountpoint"]: r for r in json.loads(proc.stdout)}
        assert (rows[str(mnt)]["state"], rows[str(mnt)]["pid"]) == ("hung", pid)
        assert rows[str(healthy)]["state"] == "serving"  # one hung mount spoils no other

        proc, took = cli("mounts", *timeout)
        assert proc.returncode == 0 and took < BOUND_S
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{mnt} "))
        assert "HUNG" in line and f"pid {pid}" in line and "umount --force" in line

        proc, took = cli("stats", str(mnt), *timeout)
        assert took < BOUND_S
        assert proc.returncode == 11, proc.stderr
        assert "does not answer" in proc.stderr and "umount --force" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1

        proc, took = cli("warmup", str(mnt / "sub"), *timeout)
        assert took < BOUND_S
        assert proc.returncode == 11 and "umount --force" in proc.stderr, proc.stderr

        proc, took = cli("umount", str(mnt), *timeout)
        assert took < BOUND_S
        assert proc.returncode == 11, proc.stderr
        assert "--force" in proc.stderr
        assert is_mounted(mnt) and alive(pid)  # refused: nothing changed

        proc, took = cli("umount", "--force", str(mnt))
        assert proc.returncode == 0, proc.stderr
        assert took < BOUND_S
        assert not is_mounted(mnt)
        wait_for(lambda: not alive(pid), timeout=10, what="the stopped daemon to be gone")
        assert not [p for p in daemon_pids(mnt) if alive(p)]
        assert os.listdir(mnt) == []  # the directory is usable again
    mounts.mount("ds", mnt)  # and can be mounted again
    assert (mnt / "hello.txt").read_text() == "hello\n"
    assert (healthy / "hello.txt").read_text() == "hello\n"


def test_force_unmount_of_a_healthy_and_of_a_dead_mount(
        small_dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mount("ds", mounts.mountpoint())
    pid = daemon_pids(mnt)[0]
    proc, _ = cli("umount", "--force", str(mnt), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["unmounted"], result["forced"], result["pid"]) == (str(mnt), True, pid)
    assert not is_mounted(mnt)
    wait_for(lambda: not alive(pid), timeout=10, what="the daemon to be gone")

    mnt = mounts.mount("ds", mnt)
    pid = daemon_pids(mnt)[0]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), timeout=10, what="the daemon to die")
    proc, _ = cli("mounts", "--json")
    assert [r["state"] for r in json.loads(proc.stdout) if r["mountpoint"] == str(mnt)] == [
        "dead"]
    proc, _ = cli("umount", "--force", str(mnt))
    assert proc.returncode == 0, proc.stderr
    assert not is_mounted(mnt)
    proc, _ = cli("umount", "--force", str(mnt))
    assert proc.returncode == 3 and "not a cachefs mount" in proc.stderr
