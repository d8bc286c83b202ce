"""Starting, finding, inspecting and stopping mount daemons (the client side of `cachefs mount`).

A mount is found through the kernel's own table (/proc/self/mountinfo, type `fuse.cachefs`) and
asked what it is through extended attributes of its root (`user.cachefs.info`,
`user.cachefs.stats`): no pid files or sockets to go stale.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

from cachefs.errors import LocalIOError, MountError, NotFound, UsageError
from cachefs.fs import XATTR_INFO, XATTR_STATS
from cachefs.fuse.config import MountConfig
from cachefs.fuse.daemon import unescape_mount_path

FSTYPE = "fuse.cachefs"
READY_TIMEOUT_S = 120.0


def cachefs_mounts() -> list[str]:
    """Mount points of every cachefs mount on this machine (from the kernel's table)."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == FSTYPE:
                found.append(unescape_mount_path(left.split()[4]))
    return found


def is_mounted(mountpoint: str) -> bool:
    return os.path.realpath(mountpoint) in cachefs_mounts()


def mount_info(mountpoint: str) -> dict[str, object]:
    """What a live mount shows; {"state": "dead"} if its daemon is gone."""
    try:
        info = json.loads(os.getxattr(mountpoint, XATTR_INFO.decode()))
        return {**info, "state": "serving"}
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return {"mountpoint": mountpoint, "state": "dead"}
        raise LocalIOError(f"cannot query mount {mountpoint}: {e.strerror}") from e


def mount_stats(mountpoint: str) -> dict[str, object]:
    path = os.path.realpath(mountpoint)
    if path not in cachefs_mounts():
        raise NotFound(f"{mountpoint} is not a cachefs mount")
    try:
        return json.loads(os.getxattr(path, XATTR_STATS.decode()))
    except OSError as e:
        raise MountError(f"mount {mountpoint} does not answer: {e.strerror}") from e


def check_mountpoint(mountpoint: str) -> str:
    path = os.path.realpath(mountpoint)
    if not os.path.isdir(path):
        raise UsageError(f"mount point {mountpoint} does not exist or is not a directory")
    if is_mounted(path):
        raise MountError(f"{mountpoint} is already a cachefs mount (cachefs umount it first)")
    return path


def start(config: MountConfig, foreground: bool) -> dict[str, object]:
    """Mount; in the background unless `foreground`. Returns the mount's info once it serves."""
    if foreground:
        from cachefs.fuse import daemon

        code = daemon.run(config, None)
        if code:
            raise MountError(f"mount of {config.mountpoint} failed (see the messages above)")
        return {"mountpoint": config.mountpoint, "state": "unmounted"}
    log_path = config.log_path
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachefs.fuse.daemon", config.to_json(), str(write_fd)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            pass_fds=(write_fd,), start_new_session=True, close_fds=True,
        )
    os.close(write_fd)
    try:
        message = _read_ready(read_fd, proc)
    finally:
        os.close(read_fd)
    if message != "ok":
        proc.wait(timeout=30)
        raise MountError(message.removeprefix("error: ") + f" (log: {log_path})")
    _wait_serving(config.mountpoint, proc)
    return mount_info(config.mountpoint)


def _read_ready(fd: int, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    data = b""
    os.set_blocking(fd, False)
    while b"\n" not in data:
        try:
            piece = os.read(fd, 4096)
            if not piece:
                return "error: the mount daemon exited before mounting"
            data += piece
            continue
        except BlockingIOError:
            pass
        if proc.poll() is not None and not data:
            return f"error: the mount daemon exited with status {proc.returncode}"
        if time.monotonic() > deadline:
            proc.kill()
            return "error: the mount daemon did not become ready in time"
        time.sleep(0.01)
    return data.decode(errors="replace").strip()


def _wait_serving(mountpoint: str, proc: subprocess.Popen[bytes]) -> None:
    """Return once the daemon answers a request (its main loop runs)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            os.getxattr(mountpoint, XATTR_INFO.decode())
            return
        except OSError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MountError(f"mount at {mountpoint} does not serve: {e.strerror}") from e
            time.sleep(0.01)


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 30.0) -> None:
    """Unmount and wait for the daemon to exit; a busy mount is an error unless `lazy`."""
    path = os.path.realpath(mountpoint)
    if path not in cachefs_mounts():
        raise NotFound(f"{mountpoint} is not a cachefs mount")
    info = mount_info(path)
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise MountError("fusermount3 is not installed (Debian package fuse3)")
    proc = subprocess.run([fusermount, "-u", *(["-z"] if lazy else []), path],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        if "busy" in detail.lower():
            raise MountError(f"{mountpoint} is busy (files are open or a process is inside it); "
                             "close them, or use --lazy to detach now and finish when they "
                             "close")
        raise MountError(f"unmounting {mountpoint} failed: {detail}")
    pid = info.get("pid")
    if isinstance(pid, int) and not lazy:
        _wait_exit(pid, timeout)


def _wait_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # our own child (foreground tests): reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.02)
    raise MountError(f"mount daemon {pid} did not exit within {timeout:g} s")

