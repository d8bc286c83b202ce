"""`cachefs cluster up|down`: a whole haystack cluster on loopback, for trying cachefs out,
for tests and for benchmarks.

`up` generates a token (DIR/token, mode 0600), starts M masters and S storage servers as
detached processes (their logs in DIR/logs/, their data in DIR/masters/ID and
DIR/storage/ID), waits until the masters have a leader, every storage server has registered
and every volume has its R replicas, and writes DIR/cluster.json: the `haystack://` URL, the
token file and each process's gRPC address and pid. `down` stops those processes (SIGTERM,
then SIGKILL after a grace period) and keeps the data, so `up` on the same DIR brings the same
cluster back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cachefs.errors import CachefsError, RemoteError, UsageError
from master.client import MasterClient

log = logging.getLogger("cachefs.cluster")

STATE_FILE = "cluster.json"
LOOPBACK = "127.0.0.1"
STOP_GRACE_S = 15.0
FRESH_ATTEMPTS = 3  # starts of a new cluster, each on fresh ports
# Members started by this process: kept so that they are reaped (not left as zombies, and
# not reported by Popen.__del__ as still running) when this process stops them again.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_EXITED: dict[int, int] = {}  # how reaped members ended (return codes), for error messages


@dataclass
class Member:
    id: str
    addr: str  # gRPC address, as `cachefs master status` reports it
    pid: int
    raft: str = ""  # masters only
    log: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """Whether `pid` is a live cachefs process (not a pid reused by something else since)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True  # ours and not reaped yet, so its pid cannot have been reused
        _EXITED[pid] = child.returncode
        del _CHILDREN[pid]
        return False
    # Started by an earlier command (cluster.json): make sure the pid was not reused. An
    # empty cmdline is a process in the middle of exec (or a zombie): not proof of reuse.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if cmdline and b"cachefs" not in cmdline:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_status(pid: int) -> str:
    """How a member this process started ended, for error messages."""
    code = _EXITED.get(pid)
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def load_state(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError(f"{root / STATE_FILE}: unreadable: {e}") from e


def cluster_up(root: Path, masters: int = 3, storage: int = 3, replicas: int = 2,
               volumes: int = 16, min_replicas: int = 0, timeout: float = 120.0,
               extra_master_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Start the cluster in `root` (or restart it with the same members and ports); return
    the state written to DIR/cluster.json once it serves."""
    if masters < 1 or storage < 1:
        raise UsageError("a cluster needs at least 1 master and 1 storage server")
    if not 1 <= replicas <= storage:
        raise UsageError(f"--replicas {replicas}: between 1 and the number of storage "
                         f"servers ({storage})")
    root = root.resolve()
    previous = load_state(root)
    if previous is not None:
        _refuse_if_running(root, previous)
        masters, storage = len(previous["masters"]), len(previous["storage"])
        volumes, replicas = previous["volumes"], previous["replicas"]
        min_replicas = previous.get("min_replicas", 0)
    token_file = _prepare_dir(root)
    if previous is not None:
        m_addrs = [(m["id"], m["addr"], m["raft"]) for m in previous["masters"]]
        s_addrs = [(s["id"], s["addr"]) for s in previous["storage"]]
        return _start(root, token_file, m_addrs, s_addrs, volumes, replicas, min_replicas,
                      timeout, extra_master_args)
    return _start_fresh(root, token_file, masters, storage, volumes, replicas, min_replicas,
                        timeout, extra_master_args)


def _refuse_if_running(root: Path, previous: dict[str, Any]) -> None:
    running = [m["pid"] for m in previous["masters"] + previous["storage"]
               if _alive(m["pid"])]
    if running:
        raise UsageError(f"{root}: a cluster is already running there (pids "
                         f"{', '.join(map(str, running))}); `cachefs cluster down --dir "
                         f"{root}` first")


def _prepare_dir(root: Path) -> Path:
    """Create the cluster directory's folders and its token (kept across restarts); returns
    the token file."""
    for sub in ("logs", "masters", "storage"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    token_file = root / "token"
    if not token_file.exists():
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return token_file


def _start_fresh(root: Path, token_file: Path, masters: int, storage: int, volumes: int,
                 replicas: int, min_replicas: int, timeout: float,
                 extra_master_args: tuple[str, ...]) -> dict[str, Any]:
    """Start a new cluster on free loopback ports; starts over on fresh ports when one was
    taken before its member bound it."""
    def start_fresh() -> dict[str, Any]:
        m_addrs = [(str(i + 1), f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}")
                   for i in range(masters)]
        s_addrs = [(f"s{i + 1}", f"{LOOPBACK}:{free_port()}") for i in range(storage)]
        return _start(root, token_file, m_addrs, s_addrs, volumes, replicas, min_replicas,
                      timeout, extra_master_args)

    for _ in range(FRESH_ATTEMPTS - 1):
        try:
            return start_fresh()
        except RemoteError as e:
            # A port picked as free was taken before the member bound it (another process
            # got it meanwhile): nothing was ever served, so start over on fresh ports.
            if "cannot listen there" not in str(e):
                raise
            log.warning("a port was taken before it could be bound; retrying: %s", e)
            for sub in ("masters", "storage"):
                shutil.rmtree(root / sub, ignore_errors=True)
                (root / sub).mkdir()
            (root / STATE_FILE).unlink(missing_ok=True)
    return start_fresh()


def _start(root: Path, token_file: Path, m_addrs: list[tuple[str, str, str]],
           s_addrs: list[tuple[str, str]], volumes: int, replicas: int, min_replicas: int,
           timeout: float, extra_master_args: tuple[str, ...]) -> dict[str, Any]:
    """Start every member on the given addresses and wait until the cluster serves."""
    url = "haystack://" + ",".join(g for _, g, _ in m_addrs)
    state: dict[str, Any] = {
        "url": url, "token_file": str(token_file), "volumes": volumes, "replicas": replicas,
        "min_replicas": min_replicas,
        "masters": [asdict(Member(i, g, 0, r)) for i, g, r in m_addrs],
        "storage": [asdict(Member(i, g, 0)) for i, g in s_addrs]}
    started: list[Member] = []
    try:
        for role in ("masters", "storage"):
            for member in state[role]:
                started.append(start_member(root, state, role, member, extra_master_args))
        _wait_serving(url, token_file.read_text().strip(), len(s_addrs), replicas, started,
                      timeout)
    except BaseException:
        _stop(started)
        raise
    return state


def member_args(root: Path, state: dict[str, Any], role: str,
                member: dict[str, Any]) -> list[str]:
    """The `cachefs` command line of one member of the cluster described by `state`."""
    token_file = state["token_file"]
    if role == "masters":
        peers = ",".join(f"{m['id']}={m['addr']}/{m['raft']}" for m in state["masters"])
        return ["master", "serve", "--id", member["id"], "--listen", member["addr"],
                "--raft", member["raft"], "--peers", peers,
                "--data-dir", str(root / "masters" / member["id"]),
                "--token-file", token_file, "--volumes", str(state["volumes"]),
                "--replicas", str(state["replicas"]),
                "--min-replicas", str(state["min_replicas"])]
    return ["storage", "serve", "--data-dir", str(root / "storage" / member["id"]),
            "--listen", member["addr"], "--token-file", token_file,
            "--volumes", str(state["volumes"]), "--master", state["url"],
            "--server-id", member["id"], "--zone", f"zone-{member['id']}"]


def start_member(root: Path, state: dict[str, Any], role: str, member: dict[str, Any],
                 extra_args: tuple[str, ...] = ()) -> Member:
    """Start one member (again, after it stopped) and record its new pid in `state`."""
    _reap()
    args = member_args(root, state, role, member)
    if role == "masters":
        args += extra_args
    started = _spawn(root, role[:-1] if role == "masters" else role, member["id"],
                     member["addr"], args, raft=member.get("raft", ""))
    member["pid"] = started.pid
    member["log"] = started.log
    save_state(root, state)  # before anything can fail: `down` must find every pid
    return started


def save_state(root: Path, state: dict[str, Any]) -> None:
    tmp = root / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, root / STATE_FILE)


def _spawn(root: Path, role: str, member_id: str, addr: str, args: list[str],
           raft: str = "") -> Member:
    log_path = root / "logs" / f"{role}-{member_id}.log"
    env = {k: v for k, v in os.environ.items() if k != "CACHEFS_TOKEN"}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cachefs.cli.main", *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    log.info("started %s %s at %s (pid %d)", role, member_id, addr, proc.pid)
    return Member(member_id, addr, proc.pid, raft, str(log_path))


def _wait_serving(url: str, token: str, storage: int, replicas: int, started: list[Member],
                  timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no master answered"
    with MasterClient(url, token, timeout=5.0, attempt_timeout=2.0) as client:
        while time.monotonic() < deadline:
            dead = [m for m in started if not _alive(m.pid)]
            if dead:
                tail = Path(dead[0].log).read_text(errors="replace")[-2000:]
                raise RemoteError(f"{dead[0].log}: the process exited while starting "
                                  f"({_exit_status(dead[0].pid)}):\n{tail}")
            try:
                placement = client.placement()
                up = {r.id for rs in placement.vids for r in rs if r.state == "up"}
                if placement.vids and len(up) >= storage and all(
                        len([r for r in rs if r.state == "up"]) >= replicas
                        for rs in placement.vids):
                    return
                last = (f"{len(up)} of {storage} storage servers up, "
                        f"{'a' if placement.vids else 'no'} placement")
            except CachefsError as e:
                last = str(e)
            time.sleep(0.2)
    raise RemoteError(f"the cluster did not come up within {timeout:g} s: {last}")


def _stop(members: list[Member]) -> list[int]:
    for m in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(_alive(m.pid) for m in members):
        time.sleep(0.05)
    killed = []
    for m in members:
        if _alive(m.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(m.pid, signal.SIGKILL)
            killed.append(m.pid)
            if m.pid in _CHILDREN:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    _CHILDREN[m.pid].wait(10)
    _reap()
    return killed


def _reap() -> None:
    """Collect every member this process started that has exited (killed ones included)."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            del _CHILDREN[pid]


def cluster_down(root: Path) -> dict[str, Any]:
    """Stop the processes of the cluster in `root`; its data stays."""
    state = load_state(root.resolve())
    if state is None:
        raise UsageError(f"{root}: no cluster here ({STATE_FILE} missing)")
    members = [Member(**m) for m in state["masters"] + state["storage"]]
    running = [m for m in members if _alive(m.pid)]
    killed = _stop(running)
    return {"stopped": [m.pid for m in running], "killed_after_grace": killed}
