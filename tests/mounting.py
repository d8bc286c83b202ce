"""Test helper: real cachefs mounts that are always unmounted, and their daemons stopped.

Every mount made through `MountSet.mount` is lazily unmounted (fusermount3 -u -z) at the end
of the test, and any daemon still serving it is killed, even when the test failed or a daemon
hung, so no test leaves a mount or a process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import run_cli


def daemon_pids(mountpoint: Path) -> list[int]:
    """Pids of mount daemons started for `mountpoint` (from /proc, no FUSE request)."""
    wanted = f'"mountpoint": {json.dumps(str(mountpoint))}'
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "cachefs.fuse.daemon" in cmdline and wanted in cmdline:
            pids.append(int(entry.name))
    return pids


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited; its parent just did not reap it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def device_at(path: Path) -> str | None:
    """major:minor of the top mount at `path` (from mountinfo: asks no FUSE daemon)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                found = fields[2]
    return found


def requests_waiting(path: Path) -> int:
    """FUSE requests sent to the daemon of the mount at `path` and not answered yet.

    Read from the FUSE control file system (mounted here if it is not; needs root), which asks
    no daemon: how a test sees that something is blocked on a stopped one.
    """
    connections = Path("/sys/fs/fuse/connections")
    with open("/proc/self/mountinfo") as f:
        mounted = any(line.split()[4] == str(connections) for line in f)
    if not mounted:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)],
                       capture_output=True, timeout=30, check=False)
    device = device_at(path)
    assert device is not None, f"nothing is mounted at {path}"
    return int((connections / device.split(":")[1] / "waiting").read_text())


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[int]:
    """SIGSTOP a daemon; at the end it is killed whatever happened (SIGCONT lets it die).

    While it is stopped, any syscall on its mount blocks the caller in the kernel: a test then
    looks at /proc only, or runs what would touch the mount as a child with a timeout.
    """
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
             timeout=10, what=f"daemon {pid} to stop")
    try:
        yield pid
    finally:
        for signum in (signal.SIGKILL, signal.SIGCONT):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def wait_for(condition, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class MountSet:
    """The mounts of one test."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.points: list[Path] = []

    def mountpoint(self, name: str = "mnt") -> Path:
        path = (self.root / name).resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def mount(self, target: str, mountpoint: Path, *args: str) -> Path:
        mountpoint = mountpoint.resolve()
        self.points.append(mountpoint)
        run_cli("mount", target, str(mountpoint), *args)
        return mountpoint

    def cleanup(self) -> None:
        for point in self.points:
            if is_mounted(point):
                subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True,
                               timeout=30, check=False)
            pids = daemon_pids(point)
            deadline = time.monotonic() + 5
            while pids and time.monotonic() < deadline:
                time.sleep(0.05)
                pids = [p for p in pids if Path(f"/proc/{p}").exists()
                        and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
