"""The CSI mounter: the process that owns a node's cachefs FUSE mounts and read-only bind mounts.

The gRPC plugin (csi/node.py) never mounts anything itself: it asks the mounter, over a local
unix socket, to mount a dataset version at a staging path, to bind that path read-only into pod
target paths, and to undo both. Keeping the mounts in a separate process (its own container in
the node DaemonSet) means a plugin restart or upgrade never touches them. The mount daemons run
in their own sessions (`cachefs.fuse.mount.start`), so they survive a restart of the mounter
too: the mounter only records what it made and keeps it healthy.

Run it as ``python -m csi.mounter --socket PATH --state-dir DIR [--health-interval 2]
[--cache-dir DIR] [--cache-peers SPEC] [--token-file FILE] [--metrics-listen HOST:PORT]`` (or
``cachefs csi mounter ...``); talk to it with `MounterClient`. With ``--metrics-listen`` it
serves Prometheus metrics at http://HOST:PORT/metrics (csi/metrics.py): requests by op and
result, the mounts and binds it owns, daemons started, repairs, failed repairs, health checks
that found a mount down, stale binds bound again.

Wire protocol (AF_UNIX, SOCK_STREAM, socket mode 0600): one request per connection. The client
sends one JSON object on one line (at most `MAX_REQUEST_BYTES`, newline-terminated), the mounter
answers one JSON line and closes:

    -> {"op": "mount", "path": "/abs/staging", "remote": "team", "dataset": "ds",
        "ref": "main", "commit": "<64 hex>", "cache_dir": null, "inline": false}
    <- {"ok": true, "result": null}
    <- {"ok": false, "error": {"type": "MountError", "message": "..."}}

Ops and their fields: ``ping`` (none); ``mount`` (path, remote, dataset, ref, commit; optional
cache_dir, and inline: a boolean, true when absent); ``unmount`` (path); ``bind`` (source, target);
``unbind`` (target); ``status`` (none; result ``{"mounts": {path: {...MountConfig fields, "state",
"pid"}}, "binds": {target: source}}``, state ``serving``, ``dead`` or ``hung``). Every path must be
absolute; an unknown op, a missing, unknown or mistyped field, bad JSON or an oversized request is
answered with a ``UsageError``. ``type`` names a class of `cachefs.errors`; the client raises that
class (so the plugin maps it to a gRPC code through its ``grpc_status``); a failure that is not a
cachefs error is reported as ``CachefsError`` (gRPC INTERNAL).

Trust rule. A mount carries this node's credentials (CACHEFS_TOKEN, S3/OSS keys) to its remote,
and the remote comes from a volume, which whoever may create pods writes. So ``mount`` reaches
only what `Config.remote_for_volume` allows (the node's config.toml, read at each request): a
configured remote's name, or a URL equal to a configured remote's URL; any other URL only when
the mounter runs with ``--allow-remote-urls`` and the request is not ``inline`` (an inline
ephemeral volume, written in a pod spec). Anything else is a ``ConfigError`` (gRPC
INVALID_ARGUMENT) before any connection is made. This is checked here, not only in the plugin,
because every path arrives here: stage, inline publish, and every remount of a recorded mount
(repair re-checks the recorded URL by the same rule, with the inline flag recorded for the mount;
a mount recorded before the flag existed counts as inline).

The peer tier. With ``--cache-peers SPEC`` (default: the ``CACHEFS_CACHE_PEERS`` environment
variable, which the node DaemonSet fills from the ``cache-peers`` key of the cachefs-config
ConfigMap) every mount the mounter starts joins that peer ring, exactly as ``cachefs mount
--remote NAME --cache-peers SPEC [--token-file FILE]`` would: SPEC is parsed as the mount CLI
parses it (`peer_members`), and the cluster token is ``--token-file`` or else the
``CACHEFS_TOKEN`` the mount daemons inherit. The membership is the operator's, never a volume's:
no request field can name peers or addresses (a ``mount`` request with any field beyond those
listed is refused). Peers are asked for chunks of a remote by its configured name, so a mount of
a URL that no configured remote has (``--allow-remote-urls``) runs without the peer tier (logged).
A mount started again (a repair, a mounter restart that found it dead) takes the mounter's
current peer settings, not the recorded ones: they are the node's, like its credentials.

State: ``STATE_DIR/mounter.json`` records every mount (path -> its MountConfig fields), which of
them are inline volumes, and every bind (target -> source); it is rewritten atomically (temp
file, fsync, rename) on each change.

Repair design. A mount daemon can die (OOM kill, crash, kill -9); its kernel mount then stays in
the mount table but every request on it fails with ENOTCONN ("transport endpoint is not
connected"), and so do the bind mounts made from it, which keep pointing at the dead FUSE
connection. A daemon can also hang (stopped, deadlocked): then every request on its mount, and
on the binds made from it, waits for ever. A health loop (a thread, every ``--health-interval``
seconds and once at start) asks every recorded mount at once, each question bounded by
``--hang-timeout`` (`cachefs.fuse.mount.mount_info`) and asked without holding any lock: a mount
that is absent from /proc/self/mountinfo, or whose root answers getxattr with ENOTCONN,
ECONNABORTED or EIO, is repaired by lazily unmounting the dead mount (``fusermount3 -u -z``) and
starting a new daemon with the same MountConfig at the same path; a hung one is first forced off
(`cachefs.fuse.mount.force_unmount`: its FUSE connection aborted, which fails every request
waiting on it, the daemon killed, the mount detached), then started again the same way. A repair
acts only if the path still has the mount (same device) it asked. Then it walks the recorded
binds: a bind is stale when its target is not a mount point, or when the device (major:minor,
one per FUSE connection) of the target's top mount differs from the device of its source's top
mount; a stale bind is lazily unmounted (``umount -l``) and bound again (``mount --bind`` then
``mount -o remount,bind,ro``). So pods see their data again once the repaired mount is re-bound
(with HostToContainer propagation). A repair that fails is logged and retried on the next round;
entries whose path no longer exists are dropped. Healthy mounts are never touched, so restarting
the mounter (or the plugin) leaves running mounts alone. Requests meet hung mounts the same way:
``unmount`` forces a hung mount off, ``mount`` and ``bind`` replace it; each waits at most the
hang timeout for an answer.

Concurrency: each connection is served in its own thread. Operations lock the paths they touch
(a mount path; a bind's source and target; always acquired in sorted order, so no deadlock), so
a slow mount of one volume does not block the others, and the health loop takes the same locks;
the recorded state itself is guarded by one lock. SIGTERM stops serving (waiting for requests in
flight) and exits, leaving every mount in place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from cachefs import errors as cachefs_errors
from cachefs.config import Config
from cachefs.errors import CachefsError, LocalIOError, MountError, MountHung, UsageError
from cachefs.fuse import mount as fuse_mount
from cachefs.fuse.config import MountConfig, default_cache_dir
from cachefs.fuse.mount import mount_table, top_mount
from cachefs.grpc_auth import load_token
from cachefs.metrics import new_registry, serve_metrics
from cachefs.names import check_hash, check_name
from cachefs.peer.sources import build_sources, parse_specs
from csi.metrics import INVALID_OP, MounterMetrics

log = logging.getLogger("cachefs.csi.mounter")

PROTOCOL_VERSION = 1
STATE_FILE = "mounter.json"
MAX_REQUEST_BYTES = 64 << 10
MAX_RESPONSE_BYTES = 64 << 20
READ_TIMEOUT_S = 10.0  # a client must send its request line within this
SPAWN_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 60.0
MAX_UNMOUNT_LAYERS = 8  # bounded loops when several mounts are stacked on one path
SUN_PATH_MAX = 107
# Longer than the CLI's: a daemon busy with many slow origin reads still answers in this, and
# calling a healthy daemon hung would cut off every pod reading it.
HANG_TIMEOUT_S = 10.0
PROBE_PARALLELISM = 16
PEERS_ENV = "CACHEFS_CACHE_PEERS"  # the default of --cache-peers (the DaemonSet sets it)

_STR = (str,)
_OPT_STR = (str, type(None))
_BOOL = (bool,)
# op -> {field: (allowed types, required)}
OPS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {},
    "status": {},
    "mount": {"path": (_STR, True), "remote": (_STR, True), "dataset": (_STR, True),
              "ref": (_STR, True), "commit": (_STR, True), "cache_dir": (_OPT_STR, False),
              "inline": (_BOOL, False)},
    "unmount": {"path": (_STR, True)},
    "bind": {"source": (_STR, True), "target": (_STR, True)},
    "unbind": {"target": (_STR, True)},
}
PATH_FIELDS = ("path", "source", "target", "cache_dir")


# --------------------------------------------------------------------------------------------
# client


class MounterClient:
    """Talks to a running mounter; every method raises the cachefs error the mounter reported."""

    def __init__(self, socket_path: str, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def ping(self) -> None:
        self._call("ping")

    def mount(self, path: str, *, remote: str, dataset: str, ref: str, commit: str,
              cache_dir: str | None = None, inline: bool = True) -> None:
        """`inline`: the volume comes from a pod spec (never a URL); False for a PV's."""
        self._call("mount", path=path, remote=remote, dataset=dataset, ref=ref, commit=commit,
                   cache_dir=cache_dir, inline=inline)

    def unmount(self, path: str) -> None:
        self._call("unmount", path=path)

    def bind(self, source: str, target: str) -> None:
        self._call("bind", source=source, target=target)

    def unbind(self, target: str) -> None:
        self._call("unbind", target=target)

    def status(self) -> dict[str, Any]:
        result = self._call("status")
        assert isinstance(result, dict)
        return result

    def _call(self, op: str, **args: Any) -> Any:
        line = json.dumps({"op": op, **args}).encode() + b"\n"
        reply = request_raw(self.socket_path, line, self.timeout)
        try:
            response = json.loads(reply)
        except ValueError as e:
            raise MountError(f"the mounter at {self.socket_path} sent a malformed reply") from e
        if response.get("ok"):
            return response.get("result")
        error = response.get("error") or {}
        raise error_from_wire(str(error.get("type")), str(error.get("message")))


def request_raw(socket_path: str, payload: bytes, timeout: float = 120.0) -> bytes:
    """Send raw bytes as one request and return the raw reply line (no newline)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(socket_path)
            sock.sendall(payload)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            data = b""
            while b"\n" not in data:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
                if len(data) > MAX_RESPONSE_BYTES:
                    raise MountError(f"the mounter at {socket_path} sent an oversized reply")
    except TimeoutError as e:
        raise MountError(f"the mounter at {socket_path} did not answer within "
                         f"{timeout:g} s") from e
    except OSError as e:
        raise MountError(f"cannot reach the mounter at {socket_path}: "
                         f"{e.strerror or e}") from e
    if not data:
        raise MountError(f"the mounter at {socket_path} closed the connection without answer")
    return data.split(b"\n", 1)[0]


def error_from_wire(type_name: str, message: str) -> CachefsError:
    cls = getattr(cachefs_errors, type_name, None)
    if isinstance(cls, type) and issubclass(cls, CachefsError):
        try:
            return cls(message)
        except TypeError:
            pass
    return CachefsError(f"{type_name}: {message}")


def spawn_mounter(socket_path: str, state_dir: str, health_interval: float = 2.0,
                  hang_timeout: float = HANG_TIMEOUT_S,
                  allow_remote_urls: bool = False, cache_peers: str | None = None,
                  token_file: str | None = None,
                  metrics_listen: str | None = None) -> subprocess.Popen[bytes]:
    """Start a mounter process (in its own session) and return once it answers ping.
    `cache_peers`, `token_file`, `metrics_listen`: its --cache-peers, --token-file and
    --metrics-listen (without the first it still reads CACHEFS_CACHE_PEERS from the environment
    it inherits).

    Its log goes to STATE_DIR/mounter.log. Raises MountError (and kills it) if it exits or does
    not answer within SPAWN_TIMEOUT_S.
    """
    socket_path, state_dir = os.path.abspath(socket_path), os.path.abspath(state_dir)
    os.makedirs(state_dir, exist_ok=True)
    log_path = os.path.join(state_dir, "mounter.log")
    argv = [sys.executable, "-m", "csi.mounter", "--socket", socket_path,
            "--state-dir", state_dir, "--health-interval", str(health_interval),
            "--hang-timeout", str(hang_timeout)]
    if allow_remote_urls:
        argv.append("--allow-remote-urls")
    if cache_peers is not None:
        argv += ["--cache-peers", cache_peers]
    if token_file is not None:
        argv += ["--token-file", token_file]
    if metrics_listen is not None:
        argv += ["--metrics-listen", metrics_listen]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            start_new_session=True, close_fds=True,
        )
    client = MounterClient(socket_path, timeout=5.0)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise MountError(f"the mounter exited with status {proc.returncode} "
                             f"(log: {log_path}): {_tail(log_path)}")
        try:
            client.ping()
            return proc
        except MountError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(timeout=10)
                raise MountError(f"the mounter did not answer within {SPAWN_TIMEOUT_S:g} s "
                                 f"(log: {log_path})") from None
            time.sleep(0.02)


def _tail(path: str, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# the kernel's mount table and the commands that change it


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MountError(f"{' '.join(args)} failed: {e}") from e


def lazy_unmount_fuse(path: str) -> None:
    """`fusermount3 -u -z` every cachefs mount stacked at `path`."""
    for _ in range(MAX_UNMOUNT_LAYERS):
        if path not in fuse_mount.cachefs_mounts():
            return
        proc = _run([fuse_mount.fusermount_path(), "-u", "-z", path])
        if proc.returncode != 0:
            raise MountError(f"fusermount3 -u -z {path} failed: {proc.stderr.strip()}")
    raise MountError(f"{path} is still mounted after {MAX_UNMOUNT_LAYERS} unmounts")


def unmount_all(path: str, lazy: bool) -> bool:
    """Unmount every mount stacked at `path` (plain umount first unless `lazy`, then -l).

    Returns whether anything was mounted there. `path` is canonical already: umount -c then
    skips its own canonicalization, which statfs()es the target and so waits on a hung mount.
    """
    for layer in range(MAX_UNMOUNT_LAYERS):
        if top_mount(mount_table(), path) is None:
            return layer > 0
        proc = _run(["umount", "-c", path]) if not lazy else None
        if proc is None or proc.returncode != 0:
            proc = _run(["umount", "-c", "-l", path])
            if proc.returncode != 0:
                raise MountError(f"umount -l {path} failed: {proc.stderr.strip()}")
    raise MountError(f"{path} is still mounted after {MAX_UNMOUNT_LAYERS} unmounts")


def bind_readonly(source: str, target: str) -> None:
    proc = _run(["mount", "--bind", source, target])
    if proc.returncode != 0:
        raise MountError(f"mount --bind {source} {target} failed: {proc.stderr.strip()}")
    proc = _run(["mount", "-o", "remount,bind,ro", target])
    if proc.returncode != 0:
        detail = proc.stderr.strip()
        with contextlib.suppress(MountError):
            _run(["umount", "-c", "-l", target])
        raise MountError(f"remounting the bind at {target} read-only failed: {detail}")


@dataclass(frozen=True)
class Probe:
    """What asking the mount at a path found."""

    state: str  # "serving", "dead" (daemon gone), "hung" (no answer in time), "absent"
    device: str | None  # the top mount's major:minor when asked: a repair checks it is the same
    info: dict[str, Any]  # what the daemon says (serving); its pid from /proc (hung)


def probe(path: str, timeout: float) -> Probe:
    """Ask the cachefs mount at `path` what it is, waiting at most `timeout` s for an answer."""
    device = cachefs_device(path)
    if device is None:
        return Probe("absent", None, {})
    try:
        info = fuse_mount.mount_info(path, timeout)
    except CachefsError as e:
        log.warning("mount %s answers with an unexpected error (left alone): %s", path, e)
        return Probe("serving", device, {})
    return Probe(str(info["state"]), device, info)


def probe_all(paths: list[str], timeout: float) -> dict[str, Probe]:
    """`probe` every path at once: hung mounts cost one timeout in all, not one each."""
    if not paths:
        return {}
    with ThreadPoolExecutor(min(PROBE_PARALLELISM, len(paths))) as pool:
        return dict(zip(paths, pool.map(lambda p: probe(p, timeout), paths), strict=True))


def cachefs_device(path: str) -> str | None:
    """major:minor of the cachefs mount on top at `path`; None if the top one is no cachefs."""
    entry = top_mount(mount_table(), path)
    return entry.device if entry is not None and entry.fstype == fuse_mount.FSTYPE else None


def path_exists(path: str) -> bool:
    """Whether something is at `path` (a dead FUSE mount counts: lstat fails with ENOTCONN)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    except OSError:
        return True
    return True


def ensure_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise LocalIOError(f"cannot create directory {path}: {e.strerror or e}") from e
    if not os.path.isdir(path):
        raise UsageError(f"{path} exists and is not a directory")


# --------------------------------------------------------------------------------------------
# state


class KeyedLocks:
    """One reentrant lock per key (a path); `hold` takes several in sorted order."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.RLock, int]] = {}

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        ordered = sorted(set(keys))
        taken: list[str] = []
        try:
            for key in ordered:
                with self._guard:
                    lock, users = self._locks.get(key, (threading.RLock(), 0))
                    self._locks[key] = (lock, users + 1)
                lock.acquire()
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                with self._guard:
                    lock, users = self._locks[key]
                    if users == 1:
                        del self._locks[key]
                    else:
                        self._locks[key] = (lock, users - 1)
                lock.release()


_CONFIG_FIELDS = {f.name for f in fields(MountConfig)}


class StateStore:
    """The recorded mounts and binds, saved to STATE_DIR/mounter.json atomically."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, STATE_FILE)
        self.lock = threading.Lock()
        self.mounts: dict[str, MountConfig] = {}
        self.binds: dict[str, str] = {}
        self.inline: set[str] = set()  # mount paths of inline ephemeral volumes

    def load(self) -> None:
        try:
            with open(self.path) as f:
                data = json.load(f)
            mounts = {str(p): MountConfig(**{k: v for k, v in c.items() if k in _CONFIG_FIELDS})
                      for p, c in data.get("mounts", {}).items()}
            binds = {str(t): str(s) for t, s in data.get("binds", {}).items()}
            # A state written before inline volumes were recorded: every mount counts as
            # inline, the stricter rule (a PV's URL then needs to be a configured one).
            inline = ({str(p) for p in data["inline"]} if "inline" in data
                      else set(mounts))
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, AttributeError, CachefsError) as e:
            raise LocalIOError(f"the mounter state {self.path} is unreadable ({e}); move it "
                               "away to start with no recorded mounts") from e
        self.mounts, self.binds, self.inline = mounts, binds, inline & set(mounts)

    def save(self) -> None:
        """Write the state (caller holds `lock`): temp file, fsync, rename, fsync the dir."""
        data = {"version": PROTOCOL_VERSION,
                "mounts": {p: asdict(c) for p, c in sorted(self.mounts.items())},
                "binds": dict(sorted(self.binds.items())),
                "inline": sorted(self.inline & set(self.mounts))}
        directory = os.path.dirname(self.path)
        fd, tmp = tempfile.mkstemp(prefix=".mounter.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise LocalIOError(f"cannot write the mounter state {self.path}: {e}") from e


# --------------------------------------------------------------------------------------------
# the peer ring of the node's mounts


def peer_members(spec: str | None) -> list[str] | None:
    """The sources `--cache-peers SPEC` names (HOST:PORT, dns:NAME:PORT, file:PATH,
    master:REMOTE), checked and canonical as `cachefs mount --cache-peers` makes them, and
    their configuration checked (a master: remote must be a configured haystack remote)
    without resolving anything: the mount daemons resolve them. None for no peer tier (no SPEC,
    or only blanks). UsageError or ConfigError for a bad SPEC."""
    if spec is None or not spec.strip():
        return None
    members = parse_specs(spec)
    if not members:
        raise UsageError(f"--cache-peers {spec!r}: no member given")
    for source in build_sources(members):
        source.close()
    return members


@dataclass(frozen=True)
class PeerSettings:
    """The peer ring every mount of the node joins (module doc, "The peer tier"): the
    operator's flags, never a volume's attributes."""

    members: tuple[str, ...] = ()  # empty: no peer tier
    token_file: str | None = None  # None: the CACHEFS_TOKEN the mount daemons inherit

    @classmethod
    def parse(cls, spec: str | None, token_file: str | None) -> PeerSettings:
        """From the flags; a token file must be readable and hold a token (UsageError)."""
        members = peer_members(spec) or []
        if token_file:
            token_file = os.path.abspath(token_file)
            load_token(token_file)
        return cls(tuple(members), token_file or None)

    def for_mount(self, remote_name: str | None, path: str) -> dict[str, Any]:
        """The MountConfig fields of a mount of the remote configured as `remote_name` (None: a
        URL no configured remote has, which peers cannot be asked for)."""
        settings: dict[str, Any] = {"remote_name": remote_name, "cache_peers": None,
                                    "token_file": None}
        if not self.members:
            return settings
        if remote_name is None:
            log.warning("mount %s: its remote is a URL no configured remote has, and peers are "
                        "asked for a remote by its configured name: no peer tier", path)
            return settings
        return {**settings, "cache_peers": list(self.members), "token_file": self.token_file}

    def describe(self) -> str:
        if not self.members:
            return "no peer tier"
        token = f"token {self.token_file}" if self.token_file else "token from CACHEFS_TOKEN"
        return f"peers {','.join(self.members)} ({token})"


# --------------------------------------------------------------------------------------------
# the mounter


class Mounter:
    """Mount, bind, unmount and unbind, record all of it, and keep recorded mounts healthy."""

    def __init__(self, state_dir: str, cache_dir: str | None = None,
                 hang_timeout: float = HANG_TIMEOUT_S, allow_remote_urls: bool = False,
                 peers: PeerSettings | None = None) -> None:
        self.state = StateStore(state_dir)
        self.locks = KeyedLocks()
        self.cache_dir = os.path.abspath(cache_dir) if cache_dir else None
        self.hang_timeout = hang_timeout
        self.allow_remote_urls = allow_remote_urls
        self.peers = peers or PeerSettings()
        # Counted whether or not they are served: a process-local registry costs nothing.
        self.metrics = MounterMetrics(new_registry(), sorted(OPS), self.figures)

    def figures(self) -> dict[str, int]:
        """The mounter's gauges: what it owns now."""
        with self.state.lock:
            return {"mounts": len(self.state.mounts), "binds": len(self.state.binds)}

    def remote(self, remote: str, inline: bool) -> tuple[str | None, str]:
        """(configured name or None, URL) a mount may reach for `remote`, or ConfigError: the
        trust rule (module doc). Read from config.toml each time, so a remote the admin removes
        is refused from then on."""
        allow = self.allow_remote_urls and not inline
        return Config.load().remote_for_volume(remote, allow_urls=allow)

    # ---- requests

    def handle(self, request: dict[str, Any]) -> Any:
        args = validate(request)
        op = args.pop("op")
        if op == "ping":
            return {"pid": os.getpid(), "version": PROTOCOL_VERSION}
        if op == "status":
            return self.status()
        if op == "mount":
            return self.mount(**args)
        if op == "unmount":
            return self.unmount(args["path"])
        if op == "bind":
            return self.bind(args["source"], args["target"])
        return self.unbind(args["target"])

    def mount(self, path: str, remote: str, dataset: str, ref: str, commit: str,
              cache_dir: str | None = None, inline: bool = True) -> None:
        check_name(dataset, "dataset name")
        check_hash(commit, "commit")
        remote_name, remote_url = self.remote(remote, inline)  # before anything connects
        cache = cache_dir or self.cache_dir or os.path.abspath(default_cache_dir())
        config = MountConfig(remote_url=remote_url, dataset=dataset, ref=ref, commit=commit,
                             mountpoint=path, cache_dir=cache, uid=0, gid=0,
                             allow_other=os.getuid() == 0,
                             **self.peers.for_mount(remote_name, path))
        with self.locks.hold(path):
            with self.state.lock:
                recorded = self.state.mounts.get(path)
                bound_here = path in self.state.binds
            if bound_here:
                raise MountError(f"{path} is a bind target, not a mount path")
            if recorded is not None:
                if (recorded.dataset, recorded.commit) != (dataset, commit):
                    raise MountError(
                        f"{path} already mounts {recorded.dataset}@{recorded.commit[:12]}, not "
                        f"{dataset}@{commit[:12]}; unmount it first")
                self._ensure_serving(path, recorded)
                return
            found = probe(path, self.hang_timeout)
            if found.state == "serving":
                info = found.info
                if (info.get("dataset"), info.get("commit")) != (dataset, commit):
                    raise MountError(f"{path} is already a cachefs mount of "
                                     f"{info.get('dataset')}@{str(info.get('commit'))[:12]}")
                log.info("adopting the running mount at %s (%s@%s)", path, dataset, commit[:12])
            else:
                config = self._replace(path, config, found.state, inline)
            with self.state.lock:
                self.state.mounts[path] = config
                if inline:
                    self.state.inline.add(path)
                else:
                    self.state.inline.discard(path)
                self.state.save()

    def unmount(self, path: str) -> None:
        with self.locks.hold(path):
            with self.state.lock:
                if path in self.state.binds:
                    raise UsageError(f"{path} is a bind target: unbind it, not unmount")
                bound = sorted(t for t, s in self.state.binds.items() if s == path)
            if bound:
                raise MountError(f"{path} is still bound at {', '.join(bound)}; unbind first")
            for _ in range(MAX_UNMOUNT_LAYERS + 1):
                state = probe(path, self.hang_timeout).state
                if state == "absent":
                    break
                if state == "serving":
                    try:
                        fuse_mount.unmount(path, answer_timeout=self.hang_timeout)  # waits
                    except MountHung:  # it stopped answering since the probe
                        state = "hung"
                if state == "hung":
                    self._force_off(path)
                elif state == "dead":
                    lazy_unmount_fuse(path)
                log.info("unmounted %s (it was %s)", path, state)
            else:
                raise MountError(f"{path} is still mounted after {MAX_UNMOUNT_LAYERS} unmounts")
            with self.state.lock:
                self.state.inline.discard(path)
                if self.state.mounts.pop(path, None) is not None:
                    self.state.save()

    def bind(self, source: str, target: str) -> None:
        if source == target:
            raise UsageError("bind source and target are the same path")
        with self.locks.hold(source, target):
            with self.state.lock:
                recorded = self.state.binds.get(target)
                source_config = self.state.mounts.get(source)
                target_is_mount = target in self.state.mounts
            if target_is_mount:
                raise MountError(f"{target} is a cachefs mount path, not a bind target")
            if recorded is not None and recorded != source:
                raise MountError(f"{target} is already bound to {recorded}; unbind it first")
            if source_config is not None:
                self._ensure_serving(source, source_config)
            elif not os.path.isdir(source):
                raise UsageError(f"bind source {source} does not exist or is not a directory")
            if not self._bind_is_current(source, target):
                if recorded is not None:  # ours, and stale: bound again, as a repair does
                    self._rebind(source, target)
                else:
                    if top_mount(mount_table(), target) is not None:
                        raise MountError(f"{target} already has something else mounted")
                    ensure_dir(target)
                    bind_readonly(source, target)
                log.info("bound %s at %s (read-only)", source, target)
            with self.state.lock:
                if self.state.binds.get(target) != source:
                    self.state.binds[target] = source
                    self.state.save()

    def unbind(self, target: str) -> None:
        while True:
            with self.state.lock:
                source = self.state.binds.get(target)
                if target in self.state.mounts:
                    raise UsageError(f"{target} is a cachefs mount: unmount it, not unbind")
            with self.locks.hold(target, *([source] if source else [])):
                with self.state.lock:
                    if self.state.binds.get(target) != source:
                        continue  # changed while we waited for the locks
                if unmount_all(target, lazy=False):
                    log.info("unbound %s", target)
                with self.state.lock:
                    if self.state.binds.pop(target, None) is not None:
                        self.state.save()
                return

    def status(self) -> dict[str, Any]:
        with self.state.lock:
            mounts = dict(self.state.mounts)
            binds = dict(self.state.binds)
        found = probe_all(sorted(mounts), self.hang_timeout)
        result: dict[str, Any] = {}
        for path, config in sorted(mounts.items()):
            state = found[path].state
            pid = found[path].info.get("pid") if state in ("serving", "hung") else None
            result[path] = {**asdict(config), "state": "dead" if state == "absent" else state,
                            "pid": pid if isinstance(pid, int) else None}
        return {"mounts": result, "binds": binds}

    # ---- mounts and repair

    def _start(self, path: str, config: MountConfig) -> None:
        """Start a daemon at `path`, lazily unmounting a dead mount there first."""
        lazy_unmount_fuse(path)
        ensure_dir(path)
        try:
            info = fuse_mount.start(config, foreground=False)
        except BaseException:
            with contextlib.suppress(CachefsError, OSError):
                lazy_unmount_fuse(path)
            raise
        self.metrics.mounts_started.inc()
        log.info("mounted %s@%s (%s) at %s, daemon pid %s", config.dataset, config.ref,
                 config.commit[:12], path, info.get("pid"))

    def _force_off(self, path: str) -> None:
        log.warning("mount %s does not answer within %g s: aborting its connection and "
                    "killing its daemon", path, self.hang_timeout)
        fuse_mount.force_unmount(path)

    def _is_inline(self, path: str) -> bool:
        with self.state.lock:
            return path in self.state.inline

    def _replace(self, path: str, config: MountConfig, state: str,
                 inline: bool) -> MountConfig:
        """Start a daemon at `path` in place of a dead, hung or absent mount (lock held), and
        return the configuration it runs with: `config` with the node's current peer settings.

        The URL is checked again, by the rule a new mount meets: a recorded mount may predate
        the rule, or the admin may have removed its remote since."""
        remote_name, _ = self.remote(config.remote_url, inline)
        config = replace(config, **self.peers.for_mount(remote_name, path))
        if state == "hung":
            self._force_off(path)
        log.warning("mount %s is %s: restarting its daemon", path, state)
        self._start(path, config)
        return config

    def _record_restarted(self, path: str, old: MountConfig, new: MountConfig) -> None:
        """Record the configuration a repaired mount runs with (unless its entry changed)."""
        if new == old:
            return
        with self.state.lock:
            if self.state.mounts.get(path) == old:
                self.state.mounts[path] = new
                self.state.save()

    def _ensure_serving(self, path: str, config: MountConfig) -> None:
        """Repair the mount at `path` if it is dead, hung or gone (caller holds its lock)."""
        state = probe(path, self.hang_timeout).state
        if state != "serving":
            self._repair(path, config, state)

    def _repair(self, path: str, config: MountConfig, state: str) -> None:
        """Start the recorded mount at `path` again, found `state` (lock held), counted."""
        try:
            started = self._replace(path, config, state, self._is_inline(path))
        except BaseException:
            self.metrics.repair_failures.labels(state).inc()
            raise
        self.metrics.repairs.labels(state).inc()
        self._record_restarted(path, config, started)

    def _rebind(self, source: str, target: str) -> None:
        """Bind `source` at the recorded, stale bind target `target` again (locks held)."""
        try:
            unmount_all(target, lazy=True)
            ensure_dir(target)
            bind_readonly(source, target)
        except BaseException:
            self.metrics.rebind_failures.inc()
            raise
        self.metrics.rebinds.inc()

    def _bind_is_current(self, source: str, target: str) -> bool:
        table = mount_table()
        at_target = top_mount(table, target)
        if at_target is None:
            return False
        at_source = top_mount(table, source)
        if at_source is None:  # a plain directory source: a mounted target is taken as good
            return True
        return at_target.device == at_source.device

    def check_once(self) -> None:
        """One health round: repair dead and hung mounts, drop vanished entries, re-bind stale
        binds. Mounts are asked all at once and without locks (each question bounded), so a
        hung mount delays neither the requests for other paths nor their repair."""
        with self.state.lock:
            mounts = dict(self.state.mounts)
        found = probe_all(list(mounts), self.hang_timeout)
        for state in (f.state for f in found.values() if f.state != "serving"):
            self.metrics.health_check_failures.labels(state).inc()
        for path, config in mounts.items():
            try:
                self._check_mount(path, config, found[path])
            except Exception as e:  # one bad mount must not stop the round
                log.error("repair of %s failed (retried next round): %s", path, e)
        with self.state.lock:
            binds = dict(self.state.binds)
        for target, source in binds.items():
            try:
                self._check_bind(target, source)
            except Exception as e:
                log.error("re-binding %s at %s failed (retried next round): %s", source,
                          target, e)
        self.metrics.health_rounds.inc()

    def _check_mount(self, path: str, config: MountConfig, found: Probe) -> None:
        if found.state == "serving":
            return
        with self.locks.hold(path):
            with self.state.lock:
                if self.state.mounts.get(path) != config:
                    return  # unmounted or changed meanwhile
            if cachefs_device(path) != found.device:
                return  # remounted meanwhile (a request repaired it): asked next round
            if found.state == "absent" and not path_exists(path):
                log.warning("mount path %s no longer exists: forgetting its mount", path)
                with self.state.lock:
                    self.state.mounts.pop(path, None)
                    self.state.save()
                return
            self._repair(path, config, found.state)

    def _check_bind(self, target: str, source: str) -> None:
        with self.locks.hold(source, target):
            with self.state.lock:
                if self.state.binds.get(target) != source:
                    return
                source_config = self.state.mounts.get(source)
            if top_mount(mount_table(), target) is None and not path_exists(target):
                log.warning("bind target %s no longer exists: forgetting it", target)
                with self.state.lock:
                    self.state.binds.pop(target, None)
                    self.state.save()
                return
            if source_config is not None and probe(source, self.hang_timeout).state != "serving":
                return  # the mount pass repairs it first
            if source_config is None and not os.path.isdir(source):
                return
            if self._bind_is_current(source, target):
                return
            log.warning("bind of %s at %s is stale: binding again", source, target)
            self._rebind(source, target)
            log.info("re-bound %s at %s", source, target)


def validate(request: object) -> dict[str, Any]:
    """The request's fields, checked: known op, required fields, types, absolute paths."""
    if not isinstance(request, dict):
        raise UsageError("a request must be a JSON object")
    op = request.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise UsageError(f"unknown op {op!r} (expected one of: {', '.join(sorted(OPS))})")
    spec = OPS[op]
    unknown = sorted(set(request) - set(spec) - {"op"})
    if unknown:
        raise UsageError(f"{op}: unknown field(s): {', '.join(unknown)}")
    args: dict[str, Any] = {"op": op}
    for name, (types, required) in spec.items():
        if name not in request:
            if required:
                raise UsageError(f"{op}: missing field {name!r}")
            continue
        value = request[name]
        if not isinstance(value, types):
            kind = "a boolean" if types == _BOOL else "a string"
            raise UsageError(f"{op}: field {name!r} must be {kind}")
        if isinstance(value, str) and not value:
            raise UsageError(f"{op}: field {name!r} must not be empty")
        if name in PATH_FIELDS and value is not None:
            value = _check_path(op, name, value)
        args[name] = value
    return args


def _check_path(op: str, name: str, value: str) -> str:
    if "\0" in value:
        raise UsageError(f"{op}: {name} contains a NUL byte")
    if not os.path.isabs(value):
        raise UsageError(f"{op}: {name} must be an absolute path, not {value!r}")
    resolved = fuse_mount.resolve_mountpoint(value)  # realpath would stat a hung mount
    if resolved == "/":
        raise UsageError(f"{op}: {name} must not be the root directory")
    return resolved


# --------------------------------------------------------------------------------------------
# the server


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(READ_TIMEOUT_S)
        op = INVALID_OP
        started = time.perf_counter()
        try:
            request = self._read(sock)
            started = time.perf_counter()  # the answer's time, not the client's to send
            if isinstance(request, dict) and request.get("op") in OPS:
                op = str(request["op"])  # only known ops: the label's values stay few
            response = {"ok": True, "result": self.server.mounter.handle(request)}
        except CachefsError as e:
            response = {"ok": False, "error": {"type": type(e).__name__, "message": str(e)}}
        except Exception as e:  # reported to the client, never kills the server
            log.exception("request failed")
            response = {"ok": False, "error": {"type": "CachefsError",
                                               "message": f"internal error: {e!r}"}}
        if not response["ok"]:
            log.info("request refused: %s: %s", response["error"]["type"],
                     response["error"]["message"])
        self.server.mounter.metrics.request(
            op, "ok" if response["ok"] else response["error"]["type"],
            time.perf_counter() - started)
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps(response).encode() + b"\n")

    def _read(self, sock: socket.socket) -> object:
        data = b""
        try:
            while b"\n" not in data:
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
                if len(data) > MAX_REQUEST_BYTES:
                    raise UsageError(f"request larger than {MAX_REQUEST_BYTES} bytes")
        except TimeoutError as e:
            raise UsageError(f"no complete request within {READ_TIMEOUT_S:g} s") from e
        line = data.split(b"\n", 1)[0]
        if len(line) > MAX_REQUEST_BYTES:
            raise UsageError(f"request larger than {MAX_REQUEST_BYTES} bytes")
        if not line.strip():
            raise UsageError("empty request")
        try:
            return json.loads(line)
        except ValueError as e:
            raise UsageError(f"request is not valid JSON: {e}") from e


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False
    block_on_close = True  # SIGTERM waits for requests in flight
    allow_reuse_address = False

    def __init__(self, socket_path: str, mounter: Mounter) -> None:
        self.mounter = mounter
        super().__init__(socket_path, _Handler, bind_and_activate=False)

    def server_bind(self) -> None:
        old = os.umask(0o177)  # the socket is born 0600
        try:
            super().server_bind()
        finally:
            os.umask(old)
        os.chmod(self.server_address, 0o600)  # type: ignore[arg-type]


def _claim_socket(socket_path: str) -> None:
    """Remove a stale socket file; refuse if another mounter answers on it."""
    if not os.path.lexists(socket_path):
        return
    try:
        MounterClient(socket_path, timeout=5.0).ping()
    except MountError:
        os.unlink(socket_path)
        return
    raise MountError(f"another mounter already serves {socket_path}")


def serve(socket_path: str, state_dir: str, health_interval: float,
          cache_dir: str | None, stop: threading.Event,
          hang_timeout: float = HANG_TIMEOUT_S, allow_remote_urls: bool = False,
          peers: PeerSettings | None = None, metrics_listen: str | None = None) -> None:
    """Serve until `stop` is set; mounts are left in place. `metrics_listen`: HOST:PORT of the
    Prometheus endpoint (None: none)."""
    if len(os.fsencode(socket_path)) > SUN_PATH_MAX:
        raise UsageError(f"socket path too long ({len(os.fsencode(socket_path))} > "
                         f"{SUN_PATH_MAX} bytes): {socket_path}")
    os.makedirs(state_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(socket_path)), exist_ok=True)
    mounter = Mounter(state_dir, cache_dir, hang_timeout, allow_remote_urls, peers)
    mounter.state.load()
    with mounter.state.lock:
        log.info("state %s: %d mount(s), %d bind(s)", mounter.state.path,
                 len(mounter.state.mounts), len(mounter.state.binds))
    # Before the socket: a metrics address that cannot be used stops the start, before the
    # plugin can reach a mounter nobody can watch.
    endpoint = serve_metrics(metrics_listen, mounter.metrics.registry)
    try:
        _serve_socket(socket_path, mounter, health_interval, stop)
    finally:
        if endpoint is not None:
            endpoint.stop()


def _serve_socket(socket_path: str, mounter: Mounter, health_interval: float,
                  stop: threading.Event) -> None:
    _claim_socket(socket_path)
    server = _Server(socket_path, mounter)
    try:
        server.server_bind()
        server.server_activate()
    except OSError as e:
        server.server_close()
        raise LocalIOError(f"cannot listen on {socket_path}: {e.strerror or e}") from e
    inode = os.stat(socket_path).st_ino

    def health() -> None:
        while not stop.is_set():
            try:
                mounter.check_once()
            except Exception:
                log.exception("health round failed")
            stop.wait(health_interval)

    health_thread = threading.Thread(target=health, name="mounter-health", daemon=True)
    serve_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                    name="mounter-serve", daemon=True)
    health_thread.start()
    serve_thread.start()
    log.info("mounter serving on %s (pid %d, health every %g s, hung after %g s, remote URLs "
             "%s, %s)", socket_path, os.getpid(), health_interval, mounter.hang_timeout,
             "allowed for PVs" if mounter.allow_remote_urls else "only configured ones",
             mounter.peers.describe())
    try:
        stop.wait()
    finally:
        log.info("stopping; every mount is left in place")
        server.shutdown()
        server.server_close()  # joins the requests in flight
        with contextlib.suppress(OSError):
            if os.stat(socket_path).st_ino == inode:
                os.unlink(socket_path)
        health_thread.join(timeout=COMMAND_TIMEOUT_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cachefs csi mounter",
        description="Own this node's cachefs FUSE mounts and bind mounts for the CSI plugin, "
                    "and keep them healthy.")
    parser.add_argument("--socket", required=True, help="unix socket to serve (mode 0600)")
    parser.add_argument("--state-dir", required=True,
                        help=f"directory of the state file ({STATE_FILE})")
    parser.add_argument("--health-interval", type=float, default=2.0,
                        help="seconds between health checks (default 2)")
    parser.add_argument("--hang-timeout", type=float, default=HANG_TIMEOUT_S,
                        help="seconds a mount daemon may take to answer before it counts as "
                             f"hung and is replaced (default {HANG_TIMEOUT_S:g})")
    parser.add_argument("--cache-dir",
                        help="SSD cache directory of mounts that name none "
                             "(default $XDG_CACHE_HOME/cachefs)")
    parser.add_argument("--allow-remote-urls", action="store_true",
                        help="mount a PersistentVolume's remote URL even if no configured "
                             "remote has it (never an inline volume's): the node's credentials "
                             "go to whatever it names (default: configured remotes only)")
    parser.add_argument("--cache-peers", metavar="SPEC", default=os.environ.get(PEERS_ENV),
                        help="the peer ring every mount joins, as `cachefs mount "
                             f"--cache-peers` takes it (default: ${PEERS_ENV}; empty: no "
                             "peer tier)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="the cluster token file the mounts' peer calls use (default: "
                             "the CACHEFS_TOKEN they inherit)")
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (default: "
                             "off)")
    args = parser.parse_args(argv)
    if not args.health_interval > 0:
        parser.error("--health-interval must be positive")
    if not args.hang_timeout > 0:
        parser.error("--hang-timeout must be positive")
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d received", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        peers = PeerSettings.parse(args.cache_peers, args.token_file)
        serve(os.path.abspath(args.socket), os.path.abspath(args.state_dir),
              args.health_interval, args.cache_dir, stop, args.hang_timeout,
              args.allow_remote_urls, peers, args.metrics_listen)
    except CachefsError as e:
        print(f"cachefs csi mounter: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
