"""The CSI mounter with real processes and real mounts: protocol, idempotency, repair, restarts.

Every test runs its own mounter (csi.mounter.spawn_mounter) on a short socket path under /tmp
and a state directory under the test's tmp_path; at the end (even on failure) every mounter is
killed, every bind and FUSE mount the test made or the state file recorded is lazily unmounted,
and every mount daemon still running for them is killed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cachefs.config import local_repo_url
from cachefs.errors import InvalidName, MountError, UsageError
from cachefs.fuse.mount import mount_stats
from csi.mounter import (
    MAX_REQUEST_BYTES,
    PEERS_ENV,
    STATE_FILE,
    MounterClient,
    PeerSettings,
    request_raw,
    spawn_mounter,
)
from tests.helpers import cli_json, run_cli, snapshot
from tests.mounting import (
    alive,
    daemon_pids,
    device_at,
    is_mounted,
    requests_waiting,
    stopped,
    wait_for,
)
from tests.peers import PeerSet

HEALTH_INTERVAL_S = 0.5
REPAIR_TIMEOUT_S = 20.0
HANG_TIMEOUT_S = 1.0  # what the mounter gives a daemon to answer before calling it hung
BOUND_S = 10.0  # what a request may take when a daemon hangs


class Node:
    """One test's mounter(s), and everything they may have mounted, cleaned up at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket_dir = tempfile.mkdtemp(prefix="cfsm-", dir="/tmp")
        self.socket = os.path.join(self.socket_dir, "mounter.sock")
        self.state_dir = str(root / "state")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.paths: list[Path] = []

    def spawn(self, health_interval: float = HEALTH_INTERVAL_S,
              **options: Any) -> MounterClient:
        """A mounter on this node's socket and state; `options`: spawn_mounter's."""
        self.procs.append(spawn_mounter(self.socket, self.state_dir, health_interval,
                                        hang_timeout=HANG_TIMEOUT_S, **options))
        return MounterClient(self.socket, timeout=60)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.procs[-1]

    def path(self, name: str) -> Path:
        path = self.root / name
        self.paths.append(path)
        return path

    def state(self) -> dict:
        return json.loads((Path(self.state_dir) / STATE_FILE).read_text())

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        binds, mounts = [], list(self.paths)
        with contextlib.suppress(OSError, ValueError):
            state = self.state()
            binds = [Path(t) for t in state["binds"]]
            mounts += [Path(p) for p in state["mounts"]]
        for point in binds + mounts:  # binds first: they hold the FUSE superblocks
            for _ in range(8):
                if not is_mounted(point):
                    break
                done = point not in binds and subprocess.run(
                    ["fusermount3", "-u", "-z", str(point)], capture_output=True, timeout=30,
                    check=False).returncode == 0
                if not done:
                    subprocess.run(["umount", "-l", str(point)], capture_output=True,
                                   timeout=30, check=False)
        for point in mounts:
            for pid in daemon_pids(point):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path.resolve())
    try:
        yield node
    finally:
        node.cleanup()


class Dataset:
    def __init__(self, src: Path, v1: str, v2: str) -> None:
        self.src, self.v1, self.v2 = src, v1, v2
        self.url = local_repo_url()
        self.expected = snapshot(src)


@pytest.fixture
def dataset(tmp_path: Path) -> Dataset:
    """`ds` in the local remote: v1 (checked against `expected`), then v2 (one file more)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "hello.txt").write_text("hello from v1\n")
    (src / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    v1 = cli_json("log", "ds")[0]["commit"]
    data = Dataset(src, v1, "")
    v2_src = tmp_path / "src2"
    shutil.copytree(src, v2_src, symlinks=True)
    (v2_src / "new.txt").write_text("only in v2\n")
    run_cli("commit", "ds", str(v2_src), "-m", "v2")
    data.v2 = cli_json("log", "ds")[0]["commit"]
    assert data.v2 != data.v1
    return data


def mount_v1(client: MounterClient, path: Path, data: Dataset) -> None:
    client.mount(str(path), remote=data.url, dataset="ds", ref="main", commit=data.v1)


def shows(path: Path, data: Dataset) -> bool:
    """Whether `path` shows v1 exactly (False while its mount is dead)."""
    try:
        return snapshot(path) == data.expected
    except OSError:
        return False


def one_daemon(path: Path) -> int:
    pids = daemon_pids(path)
    assert len(pids) == 1, pids
    return pids[0]


def raw(node: Node, payload: bytes) -> dict:
    return json.loads(request_raw(node.socket, payload, timeout=30))


def test_mount_bind_unbind_unmount_are_idempotent(node: Node, dataset: Dataset) -> None:
    client = node.spawn()
    client.ping()
    assert os.stat(node.socket).st_mode & 0o777 == 0o600
    staging = node.path("staging")  # created by the mounter
    with ThreadPoolExecutor(3) as pool:  # concurrent identical requests: one mount
        list(pool.map(lambda _: mount_v1(client, staging, dataset), range(3)))
    assert shows(staging, dataset)
    pid = one_daemon(staging)
    mount_v1(client, staging, dataset)  # same commit again: nothing changes
    assert one_daemon(staging) == pid
    with pytest.raises(MountError, match="already mounts"):
        client.mount(str(staging), remote=dataset.url, dataset="ds", ref="main",
                     commit=dataset.v2)

    targets = [node.path("pods/a/volume"), node.path("pods/b/volume")]
    with ThreadPoolExecutor(4) as pool:  # concurrent, and each twice: idempotent
        list(pool.map(lambda t: client.bind(str(staging), str(t)), targets * 2))
    for target in targets:
        client.bind(str(staging), str(target))
        assert shows(target, dataset)
        assert sum(line.split()[4] == str(target)
                   for line in Path("/proc/self/mountinfo").read_text().splitlines()) == 1
        with pytest.raises(OSError) as raised:
            (target / "new_file").write_text("x")
        assert raised.value.errno == errno.EROFS
    with pytest.raises(MountError, match="already bound"):
        client.bind(str(dataset.src), str(targets[0]))

    status = client.status()
    assert status["binds"] == {str(t): str(staging) for t in targets}
    entry = status["mounts"][str(staging)]
    assert (entry["state"], entry["pid"], entry["commit"], entry["dataset"]) == (
        "serving", pid, dataset.v1, "ds")
    assert (entry["uid"], entry["gid"], entry["allow_other"]) == (0, 0, os.getuid() == 0)
    recorded = node.state()
    assert recorded["binds"] == status["binds"]
    assert recorded["mounts"][str(staging)]["commit"] == dataset.v1

    with pytest.raises(MountError, match="still bound"):
        client.unmount(str(staging))
    for target in targets:
        client.unbind(str(target))
        client.unbind(str(target))
        assert not is_mounted(target) and target.is_dir()  # the directory is the plugin's
    client.unmount(str(staging))
    client.unmount(str(staging))
    assert not is_mounted(staging)
    wait_for(lambda: not daemon_pids(staging), timeout=10, what="the daemon to exit")
    assert client.status() == {"mounts": {}, "binds": {}}
    assert node.state()["mounts"] == {} and node.state()["binds"] == {}


def test_a_killed_daemon_is_remounted_and_rebound(node: Node, dataset: Dataset) -> None:
    client = node.spawn()
    staging = node.path("staging")
    mount_v1(client, staging, dataset)
    targets = [node.path("pod1/vol"), node.path("pod2/vol")]
    for target in targets:
        client.bind(str(staging), str(target))
    old = one_daemon(staging)

    os.kill(old, signal.SIGKILL)
    wait_for(lambda: all(shows(t, dataset) for t in targets), timeout=REPAIR_TIMEOUT_S,
             what="both bind targets to serve again")
    new = one_daemon(staging)
    assert new != old
    assert shows(staging, dataset)
    status = client.status()
    assert status["mounts"][str(staging)]["state"] == "serving"
    assert status["mounts"][str(staging)]["pid"] == new
    assert status["binds"] == {str(t): str(staging) for t in targets}
    log = (Path(node.state_dir) / "mounter.log").read_text()
    assert "restarting its daemon" in log and "re-bound" in log


def test_a_mounter_restart_leaves_mounts_alone(node: Node, dataset: Dataset) -> None:
    client = node.spawn()
    staging = node.path("staging")
    target = node.path("pod/vol")
    mount_v1(client, staging, dataset)
    client.bind(str(staging), str(target))
    pid = one_daemon(staging)

    node.proc.kill()  # kill -9: no chance to clean anything up
    node.proc.wait(timeout=10)
    client = node.spawn()  # same socket (stale file), same state
    status = client.status()
    assert status["mounts"][str(staging)]["state"] == "serving"
    assert status["mounts"][str(staging)]["pid"] == pid
    assert status["binds"] == {str(target): str(staging)}
    time.sleep(3 * HEALTH_INTERVAL_S)  # several health rounds: still the same daemon
    assert daemon_pids(staging) == [pid]
    assert shows(target, dataset)

    # SIGTERM: the mounter exits cleanly, the mount stays
    node.proc.terminate()
    assert node.proc.wait(timeout=15) == 0
    assert not os.path.exists(node.socket)
    assert daemon_pids(staging) == [pid] and shows(target, dataset)

    # the daemon dies while no mounter runs, and a recorded path vanished: the start repairs
    # the first and forgets the second
    state = node.state()
    gone = str(node.root / "gone")
    state["mounts"][gone] = {**state["mounts"][str(staging)], "mountpoint": gone}
    (Path(node.state_dir) / STATE_FILE).write_text(json.dumps(state))
    os.kill(pid, signal.SIGKILL)
    client = node.spawn()
    wait_for(lambda: shows(target, dataset), timeout=REPAIR_TIMEOUT_S,
             what="the bind target to serve again")
    assert one_daemon(staging) != pid
    wait_for(lambda: gone not in client.status()["mounts"], timeout=REPAIR_TIMEOUT_S,
             what="the vanished mount path to be forgotten")
    assert list(client.status()["mounts"]) == [str(staging)]


def test_malformed_requests_are_refused_and_the_mounter_keeps_serving(
        node: Node, dataset: Dataset) -> None:
    client = node.spawn()
    cases = {
        b"this is not json\n": "not valid JSON",
        b"[1, 2]\n": "must be a JSON object",
        b"\n": "empty request",
        b"": "empty request",
        b'{"op": "frobnicate"}\n': "unknown op 'frobnicate'",
        b'{"path": "/x"}\n': "unknown op None",
        b'{"op": "ping", "extra": 1}\n': "unknown field",
        b'{"op": "unmount", "path": "relative/dir"}\n': "must be an absolute path",
        b'{"op": "unmount", "path": 7}\n': "must be a string",
        b'{"op": "bind", "source": "/a"}\n': "missing field 'target'",
        b'{"op": "ping", "pad": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}\n':
            "request larger than",
    }
    for payload, message in cases.items():
        reply = raw(node, payload)
        assert reply["ok"] is False, payload[:60]
        assert reply["error"]["type"] == "UsageError", reply
        assert message in reply["error"]["message"], reply
    assert raw(node, b'{"op": "ping"}\n')["ok"] is True

    with pytest.raises(UsageError, match="absolute"):
        client.mount("relative", remote=dataset.url, dataset="ds", ref="main",
                     commit=dataset.v1)
    with pytest.raises(UsageError, match="absolute"):
        client.bind("/tmp", "relative")
    with pytest.raises(InvalidName, match="commit"):
        client.mount(str(node.path("m")), remote=dataset.url, dataset="ds", ref="main",
                     commit="abc")
    with pytest.raises(MountError):  # a commit that is not in the remote: the daemon fails
        client.mount(str(node.path("m")), remote=dataset.url, dataset="ds", ref="main",
                     commit="0" * 64)
    assert not is_mounted(node.root / "m")
    client.unbind(str(node.path("never-bound")))  # nothing there: fine
    client.unmount(str(node.path("never-mounted")))
    client.ping()
    assert client.status() == {"mounts": {}, "binds": {}}
    assert node.proc.poll() is None


def timed(call, *args: str) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    call(*args)
    return time.monotonic() - start


def test_a_stopped_daemon_is_remounted_and_other_volumes_are_not_held_up(
        node: Node, dataset: Dataset) -> None:
    client = node.spawn()
    staging, other, killed = node.path("staging"), node.path("other"), node.path("killed")
    for path in (staging, other, killed):
        mount_v1(client, path, dataset)
    targets = [node.path("pod1/vol"), node.path("pod2/vol")]
    for target in targets:
        client.bind(str(staging), str(target))
    old, old_device = one_daemon(staging), device_at(staging)
    killed_pid = one_daemon(killed)

    with stopped(old):  # /proc and mountinfo only, until the targets show a new connection
        wait_for(lambda: requests_waiting(staging) > 0, timeout=REPAIR_TIMEOUT_S,
                 what="a health check to meet the stopped daemon")
        os.kill(killed_pid, signal.SIGKILL)  # a dead daemon elsewhere is still repaired
        assert timed(client.unmount, str(other)) < BOUND_S  # another volume's unstage
        assert not is_mounted(other)
        wait_for(lambda: shows(killed, dataset), timeout=REPAIR_TIMEOUT_S,  # dead: no wait
                 what="the killed daemon's mount to serve again")
        wait_for(lambda: any(p != old and alive(p) for p in daemon_pids(staging)),
                 timeout=REPAIR_TIMEOUT_S, what="a new daemon for the hung mount")
        wait_for(lambda: all(device_at(t) == device_at(staging) != old_device
                             for t in targets),
                 timeout=REPAIR_TIMEOUT_S, what="both targets re-bound to the new mount")
        wait_for(lambda: all(shows(t, dataset) for t in targets), timeout=REPAIR_TIMEOUT_S,
                 what="both bind targets to serve again")
        wait_for(lambda: not alive(old), timeout=10, what="the stopped daemon to be killed")
    assert killed_pid not in daemon_pids(killed)
    status = client.status()
    assert status["mounts"][str(staging)]["state"] == "serving"
    assert status["mounts"][str(staging)]["pid"] == one_daemon(staging)
    assert status["binds"] == {str(t): str(staging) for t in targets}
    log = (Path(node.state_dir) / "mounter.log").read_text()
    assert "does not answer" in log and "re-bound" in log


def test_requests_meeting_a_stopped_daemon_finish_in_bounded_time(
        node: Node, dataset: Dataset) -> None:
    client = node.spawn(health_interval=3600)  # one round at start, then none: no repair
    client.ping()
    staging, other = node.path("staging"), node.path("other")
    mount_v1(client, staging, dataset)
    mount_v1(client, other, dataset)
    target = node.path("pod/vol")
    client.bind(str(staging), str(target))
    pid = one_daemon(staging)

    with stopped(pid):
        with ThreadPoolExecutor(2) as pool:  # at once: neither waits for the other
            status = pool.submit(client.status)
            unstage_other = pool.submit(timed, client.unmount, str(other))
            assert unstage_other.result(timeout=60) < BOUND_S
            entry = status.result(timeout=60)["mounts"][str(staging)]
        assert (entry["state"], entry["pid"]) == ("hung", pid)
        assert timed(client.unbind, str(target)) < BOUND_S  # NodeUnpublish
        assert timed(client.unmount, str(staging)) < BOUND_S  # NodeUnstage
        assert not is_mounted(staging) and not is_mounted(target) and not is_mounted(other)
        wait_for(lambda: not alive(pid), timeout=10, what="the stopped daemon to be killed")
    assert not [p for p in daemon_pids(staging) if alive(p)]
    assert client.status() == {"mounts": {}, "binds": {}}


# -- the peer tier ------------------------------------------------------------------------------


def test_every_mount_joins_the_mounters_peer_ring(node: Node, dataset: Dataset,
                                                  peer_servers: PeerSet,
                                                  tmp_path: Path) -> None:
    """The operator's --cache-peers and --token-file reach every mount, as `cachefs mount
    --remote NAME --cache-peers SPEC --token-file T` would; a request cannot name peers; a
    remount takes the mounter's current settings."""
    token = "cluster-token-for-peers"
    server = peer_servers.start("other-node", token=token)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    client = node.spawn(cache_peers=server.address, token_file=str(token_file))
    staging = node.path("staging")
    mount_v1(client, staging, dataset)  # the volume names the remote by its URL
    assert shows(staging, dataset)
    entry = client.status()["mounts"][str(staging)]
    assert (entry["remote_name"], entry["cache_peers"], entry["token_file"]) == (
        "local", [server.address], str(token_file))
    assert node.state()["mounts"][str(staging)]["cache_peers"] == [server.address]
    # the chunks came through the ring's one member, which read them from the origin
    stats = mount_stats(str(staging))
    assert stats["peer_hits"] >= 1 and stats["peer_errors"] == 0, stats
    served = server.status()
    assert served["served_from_origin"] >= 1 and served["origin_bytes"] > 0, served

    # a volume (a request) never names peers or addresses
    request = {"op": "mount", "path": str(node.path("other")), "remote": "local",
               "dataset": "ds", "ref": "main", "commit": dataset.v1,
               "cache_peers": "10.9.9.9:7470"}
    reply = raw(node, json.dumps(request).encode() + b"\n")
    assert reply["ok"] is False and "unknown field(s): cache_peers" in reply["error"]["message"]
    assert not is_mounted(node.root / "other")

    # the operator turns the peer tier off: a mount started again runs without it
    node.proc.kill()
    node.proc.wait(timeout=10)
    client = node.spawn(cache_peers="")
    old = one_daemon(staging)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: shows(staging, dataset) and daemon_pids(staging) not in ([], [old]),
             timeout=REPAIR_TIMEOUT_S, what="the killed mount to serve again")
    # recorded once the repair returns (just after the new daemon serves)
    wait_for(lambda: client.status()["mounts"][str(staging)]["cache_peers"] is None,
             timeout=REPAIR_TIMEOUT_S, what="the remount without peers to be recorded")
    entry = client.status()["mounts"][str(staging)]
    assert (entry["remote_name"], entry["token_file"]) == ("local", None)
    assert node.state()["mounts"][str(staging)]["cache_peers"] is None


def test_the_peer_ring_comes_from_the_environment_and_bad_settings_stop_the_mounter(
        node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PEERS_ENV, "127.0.0.1:7470, 127.0.0.2:7470")
    node.spawn()
    log = Path(node.state_dir) / "mounter.log"
    wait_for(lambda: "peers 127.0.0.1:7470,127.0.0.2:7470 (token from CACHEFS_TOKEN)"
             in log.read_text(), timeout=10, what="the mounter to log its peer ring")
    node.proc.terminate()
    node.proc.wait(timeout=15)
    with pytest.raises(MountError, match="expected HOST:PORT"):
        node.spawn(cache_peers="not-a-peer")
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(MountError, match="the file is empty"):
        node.spawn(cache_peers="127.0.0.1:7470", token_file=str(empty))


def test_peer_settings_of_a_mount() -> None:
    settings = PeerSettings.parse(" 10.0.0.1:7470,10.0.0.2:7470 10.0.0.1:7470 ", None)
    assert settings.members == ("10.0.0.1:7470", "10.0.0.2:7470")
    assert settings.for_mount("team", "/m") == {
        "remote_name": "team", "cache_peers": ["10.0.0.1:7470", "10.0.0.2:7470"],
        "token_file": None}
    # a URL no configured remote has cannot be asked of peers: no peer tier for it
    assert settings.for_mount(None, "/m") == {
        "remote_name": None, "cache_peers": None, "token_file": None}
    for off in (None, "", "  "):
        assert PeerSettings.parse(off, None).for_mount("team", "/m")["cache_peers"] is None
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        PeerSettings.parse("10.0.0.1", None)
    with pytest.raises(UsageError, match="cannot read it"):
        PeerSettings.parse("10.0.0.1:7470", "/nonexistent/token")


def test_a_dns_ring_reaches_the_mounts_as_written(node: Node, dataset: Dataset,
                                                  peer_servers: PeerSet) -> None:
    """What the DaemonSet passes, dns:NAME:PORT (here localhost, the system's resolver), goes
    to every mount unchanged, and the mount's ring is what the name resolves to."""
    server = peer_servers.start("other-node")  # no token: loopback, as the mounts are here
    port = server.address.rsplit(":", 1)[1]
    client = node.spawn(cache_peers=f"dns:localhost:{port}")
    staging = node.path("staging")
    mount_v1(client, staging, dataset)
    assert shows(staging, dataset)
    assert client.status()["mounts"][str(staging)]["cache_peers"] == [f"dns:localhost:{port}"]
    ring = mount_stats(str(staging))["peer_ring"]
    (source,) = ring["sources"]
    assert source["source"] == f"dns:localhost:{port}"
    assert server.address in source["members"] and server.address in ring["members"]
    assert server.status()["served_from_origin"] >= 1
