"""Starting, finding, inspecting and stopping mount daemons (the client side of `cachefs mount`).

A mount is found through the kernel's own table (/proc/self/mountinfo, type `fuse.cachefs`) and
asked what it is through extended attributes of its root (`user.cachefs.info`,
`user.cachefs.stats`): no pid files or sockets to go stale.

Every question to a daemon is bounded (`ask`). A request on a FUSE mount whose daemon is stopped
or stuck blocks the caller in the kernel until the daemon answers: no thread can be cancelled
there, so the question is asked by a short-lived child process, which is killed (a request not
yet read by the daemon ends on a fatal signal) or, if even that waits, left behind without
waiting for it. A mount whose daemon does not answer in time is `hung`; `force_unmount` then
aborts its FUSE connection (the control file system's `abort`), kills the daemon and detaches
the mount, all without a single request to it: it is found in mountinfo and its daemon in
/proc. Paths are resolved without touching the mount at the end (`resolve_mountpoint`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from cachefs.errors import LocalIOError, MountError, MountHung, NotFound, UsageError
from cachefs.fs import XATTR_INFO, XATTR_STATS
from cachefs.fuse.config import MountConfig
from cachefs.fuse.daemon import unescape_mount_path

log = logging.getLogger("cachefs.mount")

FSTYPE = "fuse.cachefs"
READY_TIMEOUT_S = 120.0
# A daemon answers an xattr of its root from memory, in milliseconds; the bound also covers
# starting the child that asks (about 10 ms, more on a loaded machine).
ANSWER_TIMEOUT_S = 2.0
KILL_WAIT_S = 1.0  # how long to wait for a killed asking child before leaving it behind
COMMAND_TIMEOUT_S = 30.0  # fusermount3, mount: they ask no daemon, so they return promptly
FUSECTL_DIR = "/sys/fs/fuse/connections"
DEAD_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED, errno.EIO})
MAX_SYMLINKS = 40  # as many as the kernel follows in one path

# The asking child: isolated (-I) and without site (-S) it starts in about 10 ms. It writes
# "value " + the attribute, or "errno N".
_ASK_PROGRAM = """\
import os, sys
try:
    value = os.getxattr(sys.argv[1], sys.argv[2])
except OSError as e:
    sys.stdout.write("errno %d" % e.errno)
else:
    sys.stdout.buffer.write(b"value " + value)
"""


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    device: str  # major:minor; for FUSE, the minor is the connection number
    fstype: str


def mount_table() -> list[MountEntry]:
    """Every mount of this namespace, in mount order (a later entry on one path is on top).

    Read from /proc/self/mountinfo, which asks no FUSE daemon.
    """
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            left_fields = left.split()
            entries.append(MountEntry(unescape_mount_path(left_fields[4]), left_fields[2],
                                      right.split()[0]))
    return entries


def top_mount(table: list[MountEntry], path: str) -> MountEntry | None:
    found = None
    for entry in table:
        if entry.mountpoint == path:
            found = entry
    return found


def cachefs_mounts() -> list[str]:
    """Mount points of every cachefs mount on this machine (from the kernel's table)."""
    return [entry.mountpoint for entry in mount_table() if entry.fstype == FSTYPE]


def resolve_mountpoint(path: str) -> str:
    """`path`, absolute with its symlinks resolved, never touching a cachefs mount on the way.

    os.path.realpath lstat()s every component, and an lstat of a mount whose daemon hangs
    hangs too: so a component that is a mount point (in mountinfo) is taken as it is, and so is
    everything inside a cachefs mount (its symlinks are left unresolved).
    """
    table = mount_table()
    mounted = {entry.mountpoint for entry in table}
    cachefs = [entry.mountpoint for entry in table if entry.fstype == FSTYPE]
    return _resolve(os.path.abspath(path), mounted, cachefs)


def _resolve(path: str, mounted: set[str], cachefs: list[str]) -> str:
    current = path
    for _ in range(MAX_SYMLINKS):
        parent, name = os.path.split(current)
        if parent != current and parent not in mounted:
            parent = _resolve(parent, mounted, cachefs)
        candidate = os.path.join(parent, name)
        if candidate in mounted or _inside(parent, cachefs) or not os.path.islink(candidate):
            return candidate
        current = os.path.normpath(os.path.join(parent, os.readlink(candidate)))
    raise UsageError(f"{path}: too many levels of symbolic links")


def _inside(path: str, points: list[str]) -> str | None:
    """The deepest of `points` that `path` is, or lies below."""
    best = None
    for point in points:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (
                best is None or len(point) > len(best)):
            best = point
    return best


def mount_containing(path: str) -> str | None:
    """The cachefs mount point that `path` lies in, if any (resolved without touching it)."""
    return _inside(resolve_mountpoint(path), cachefs_mounts())


def is_mounted(mountpoint: str) -> bool:
    return resolve_mountpoint(mountpoint) in cachefs_mounts()


def ask(path: str, name: bytes, timeout: float = ANSWER_TIMEOUT_S) -> bytes:
    """The extended attribute `name` of `path` (inside a mount), asked within `timeout` s.

    Raises MountHung if no answer came in time, OSError (with the errno) if the call failed.
    """
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _ASK_PROGRAM, path, name],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, close_fds=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _abandon(proc)
        raise MountHung(f"the daemon of the mount at {path} did not answer within "
                        f"{timeout:g} s") from None
    kind, _, rest = out.partition(b" ")
    if kind == b"value":
        return rest
    if kind == b"errno" and rest.isdigit():
        code = int(rest)
        raise OSError(code, os.strerror(code), path)
    raise MountError(f"asking the mount at {path} failed (the asking process exited with "
                     f"status {proc.returncode})")


def _abandon(proc: subprocess.Popen[bytes]) -> None:
    """Kill an asking child; if it does not die at once, leave it without waiting.

    A request the daemon has already read ends only when answered or aborted: its caller cannot
    even be killed until then. Waiting for it would hang us just the same; it ends by itself
    once the connection is aborted (`force_unmount`), and Popen reaps it later.
    """
    proc.kill()
    try:
        proc.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning("the process asking a hung mount (pid %d) is stuck until its connection "
                    "is aborted", proc.pid)
    if proc.stdout is not None:
        proc.stdout.close()


def mount_info(mountpoint: str, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, object]:
    """What a mount shows, with its "state": "serving", "dead" (daemon gone) or "hung".

    A hung mount shows its mount point and the daemon's pid if /proc names one.
    """
    try:
        info = json.loads(ask(mountpoint, XATTR_INFO, timeout))
    except MountHung:
        return {"mountpoint": mountpoint, "state": "hung", "pid": daemon_pid(mountpoint)}
    except OSError as e:
        if e.errno in DEAD_ERRNOS:
            return {"mountpoint": mountpoint, "state": "dead"}
        raise LocalIOError(f"cannot query mount {mountpoint}: {e.strerror}") from e
    except ValueError as e:
        raise MountError(f"mount {mountpoint} sent malformed information") from e
    return {**info, "state": "serving"}


def hung_error(mountpoint: str, timeout: float) -> MountHung:
    pid = daemon_pid(resolve_mountpoint(mountpoint))
    daemon = f"its daemon (pid {pid})" if pid else "its daemon"
    return MountHung(f"mount {mountpoint} does not answer: {daemon} sent nothing within "
                     f"{timeout:g} s (stopped or stuck); to unmount it anyway, abort it with: "
                     f"cachefs umount --force {mountpoint}")


def mount_stats(mountpoint: str, timeout: float = ANSWER_TIMEOUT_S) -> dict[str, object]:
    path = resolve_mountpoint(mountpoint)
    if path not in cachefs_mounts():
        raise NotFound(f"{mountpoint} is not a cachefs mount")
    try:
        return json.loads(ask(path, XATTR_STATS, timeout))
    except MountHung:
        raise hung_error(mountpoint, timeout) from None
    except OSError as e:
        raise MountError(f"mount {mountpoint} does not answer: {e.strerror}") from e
    except ValueError as e:
        raise MountError(f"mount {mountpoint} sent malformed statistics") from e


def check_mountpoint(mountpoint: str) -> str:
    path = resolve_mountpoint(mountpoint)
    if path in cachefs_mounts():  # before isdir: a hung mount would block the stat
        raise MountError(f"{mountpoint} is already a cachefs mount (cachefs umount it first)")
    if not os.path.isdir(path):
        raise UsageError(f"mount point {mountpoint} does not exist or is not a directory")
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
            ask(mountpoint, XATTR_INFO, max(0.1, deadline - time.monotonic()))
            return
        except (OSError, MountError) as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MountError(f"mount at {mountpoint} does not serve: {e}") from e
            time.sleep(0.01)


def fusermount_path() -> str:
    found = shutil.which("fusermount3") or shutil.which("fusermount")
    if found is None:
        raise MountError("fusermount3 is not installed (Debian package fuse3)")
    return found


def unmount(mountpoint: str, lazy: bool = False, timeout: float = 30.0,
            answer_timeout: float = ANSWER_TIMEOUT_S) -> None:
    """Unmount and wait for the daemon to exit; a busy mount is an error unless `lazy`.

    A hung daemon is an error (MountHung) too: it would never exit; `force_unmount` it.
    """
    path = resolve_mountpoint(mountpoint)
    if path not in cachefs_mounts():
        raise NotFound(f"{mountpoint} is not a cachefs mount")
    info = mount_info(path, answer_timeout)
    if info["state"] == "hung":
        raise hung_error(mountpoint, answer_timeout)
    proc = subprocess.run([fusermount_path(), "-u", *(["-z"] if lazy else []), path],
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
        try:  # our own child (foreground tests): reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        if _process_state(pid) in (None, "Z"):  # a zombie has exited: its parent reaps it
            return
        time.sleep(0.02)
    raise MountError(f"mount daemon {pid} did not exit within {timeout:g} s")


def _process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, T, Z, ...), None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def daemon_pid(mountpoint: str) -> int | None:
    """The pid of the background daemon serving `mountpoint`, found in /proc (asks no daemon).

    A daemon's command line carries its MountConfig, mount point included. Only processes
    holding /dev/fuse are read: reading another process's command line waits for its memory
    map lock, which a process faulting on a hung mount may hold. Several daemons name one path
    only after a lazy unmount left an old one serving open files: the newest is the one on top,
    the mount found at that path.
    """
    newest: tuple[int, int] | None = None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if _process_state(pid) in (None, "Z") or not _holds_dev_fuse(pid):
            continue
        if _daemon_mountpoint(pid) != mountpoint:
            continue
        started = _start_time(pid)
        if newest is None or started > newest[0]:
            newest = (started, pid)
    return newest[1] if newest else None


def _holds_dev_fuse(pid: int) -> bool:
    try:
        with os.scandir(f"/proc/{pid}/fd") as fds:
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == "/dev/fuse":
                        return True
    except OSError:  # gone, or another user's
        pass
    return False


def _daemon_mountpoint(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if b"cachefs.fuse.daemon" not in argv[:4] or len(argv) < 4:
        return None
    index = argv.index(b"cachefs.fuse.daemon") + 1
    try:
        mountpoint = json.loads(argv[index]).get("mountpoint")
    except (IndexError, ValueError, AttributeError):
        return None
    return mountpoint if isinstance(mountpoint, str) else None


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    except (OSError, IndexError, ValueError):
        return 0


def force_unmount(mountpoint: str, timeout: float = 30.0) -> dict[str, object]:
    """Unmount without asking the daemon: abort its FUSE connection, kill it, detach the mount.

    Works whatever the daemon does (serving, hung, gone). Processes using the mount get
    ENOTCONN from then on. Returns the mount point, the daemon's pid (None if /proc names none:
    a foreground mount, or one already gone) and whether the connection was aborted.
    """
    path = resolve_mountpoint(mountpoint)
    entry = top_mount(mount_table(), path)
    if entry is None or entry.fstype != FSTYPE:
        raise NotFound(f"{mountpoint} is not a cachefs mount")
    pid = daemon_pid(path)
    # Abort first: every request waiting on the daemon fails at once, including the daemon's
    # own threads blocked on its mount, so nothing below waits for it.
    aborted = abort_connection(entry.device)
    if pid is not None:
        _kill(pid)
    proc = subprocess.run([fusermount_path(), "-u", "-z", path], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 and top_mount(mount_table(), path) == entry:
        raise MountError(f"detaching {mountpoint} failed: {proc.stderr.strip()}")
    if pid is not None:
        _wait_exit(pid, timeout)
    log.info("forced %s off (daemon pid %s, connection %s)", path, pid,
             "aborted" if aborted else "not aborted")
    return {"mountpoint": path, "pid": pid, "aborted": aborted}


def _kill(pid: int) -> None:
    """SIGKILL the daemon; SIGCONT too, so that a stopped one runs to its death at once."""
    for signum in (signal.SIGKILL, signal.SIGCONT):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        except PermissionError as e:
            raise MountError(f"not allowed to stop mount daemon {pid} (it runs as another "
                             "user)") from e


def abort_connection(device: str) -> bool:
    """Abort the FUSE connection of the mount `device` (major:minor); False if it cannot be.

    Through the FUSE control file system, which is mounted here first if it is not (root
    only). Killing the daemon aborts the connection too (the kernel does once /dev/fuse is
    closed), so failing here is logged, not fatal.
    """
    _ensure_fusectl()
    abort = os.path.join(FUSECTL_DIR, device.split(":")[1], "abort")
    try:
        with open(abort, "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("cannot abort the FUSE connection %s (%s): %s", device, abort,
                    e.strerror or e)
        return False
    return True


def _ensure_fusectl() -> None:
    if any(e.mountpoint == FUSECTL_DIR and e.fstype == "fusectl" for e in mount_table()):
        return
    if os.geteuid() != 0:
        return
    try:
        proc = subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL_DIR],
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot mount the FUSE control file system: %s", e)
        return
    if proc.returncode != 0:
        log.warning("cannot mount the FUSE control file system at %s: %s", FUSECTL_DIR,
                    proc.stderr.strip())

