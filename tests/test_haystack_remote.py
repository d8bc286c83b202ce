"""The haystack:// remote over a real local cluster (`cachefs cluster up`: raft masters and
storage servers as processes on 127.0.0.1).

- the shared remote conformance suite (objects and ref compare-and-swap), each test in its own
  namespace of one cluster;
- commit -> checkout round trip through the CLI, byte-identical, a FUSE mount reading through
  the cluster, and a push from file://;
- chunks land on R storage servers as needles; names in the master's directory;
- `cluster up --json` has the documented shape, `cluster down` stops every process, and `up`
  again brings back the same cluster with its data;
- a URL with a wrong token is refused;
- faults on a cluster of their own: kill -9 of the leader during a stream of ref updates and
  chunk writes (no acknowledged update lost, the writer carries on), kill -9 of a storage
  server (every chunk readable, writes continue once it is marked down, repair catches it up
  when it returns).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from cachefs.dataset.refs import GenerationRefStore, RefValue
from cachefs.errors import CachefsError, ConfigError, PermissionDenied, RemoteError
from cachefs.remotes.base import Remote
from cachefs.remotes.haystack import HaystackRemote, chunk_hash
from cachefs.remotes.registry import open_remote_url
from master.client import MasterClient
from master.cluster import cluster_down, cluster_up, start_member
from storage_server.client import StorageClient
from tests.contract.remote_suite import RefContract, RemoteContract
from tests.helpers import cli_json, run_cli, snapshot
from tests.mounting import MountSet
from tests.servers import wait_until

UP_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One cluster for the module: 3 masters, 2 storage servers, R=2; always stopped."""
    root = tmp_path_factory.mktemp("hay")
    try:
        yield cluster_up(root, masters=3, storage=2, replicas=2, volumes=8,
                         timeout=UP_TIMEOUT_S)
    finally:
        cluster_down(root)


@pytest.fixture
def token(cluster: dict) -> str:
    return Path(cluster["token_file"]).read_text().strip()


@pytest.fixture
def hay_url(cluster: dict, monkeypatch: pytest.MonkeyPatch, token: str) -> str:
    """A fresh namespace of the cluster, with the token in the environment (as users do)."""
    monkeypatch.setenv("CACHEFS_TOKEN", token)
    return f"{cluster['url']}/t-{uuid.uuid4().hex[:12]}"


class TestHaystackRemote(RemoteContract, RefContract):
    @pytest.fixture
    def remote(self, hay_url: str) -> Iterator[Remote]:
        remote = open_remote_url(hay_url)
        assert isinstance(remote, HaystackRemote)
        try:
            yield remote
        finally:
            remote.close()


def test_commit_checkout_round_trip(hay_url: str, cluster: dict, token: str,
                                    tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    for i in range(30):
        (src / "train" / f"img{i:03d}.jpg").write_bytes(os.urandom(20_000 + i * 517))
    (src / "big.bin").write_bytes(os.urandom(9 << 20))  # several whole chunks
    (src / "link").symlink_to("big.bin")
    run_cli("init", "ds", "--remote", hay_url)
    committed = cli_json("commit", "ds", str(src), "--remote", hay_url, "-m", "v1")
    out = tmp_path / "out"
    run_cli("checkout", "ds@main", str(out), "--remote", hay_url)
    assert snapshot(out) == snapshot(src)
    log = cli_json("log", "ds", "--remote", hay_url)
    assert log[0]["commit"] == committed["commit"]

    # Chunks are needles on both replicas of their volume; refs are names in the directory.
    with HaystackRemote(cluster["url"], token, namespace=hay_url.rsplit("/", 1)[1]) as remote:
        chunks = [k for k in remote.list("chunks/")]
        assert chunks and all(chunk_hash(k) for k in chunks)
        refs = list(remote.list("refs/ds/"))
        assert refs and all(k.startswith("refs/ds/heads/main/") for k in refs)
    placement = MasterClient(cluster["url"], token).placement()
    for key in chunks[:10]:
        needle = chunk_hash(key)
        assert needle is not None
        holders = 0
        for replica in placement.replicas_of(placement.vid_of(needle)):
            with StorageClient(replica.address, token) as storage:
                holders += storage.has_many([needle])[0]
        assert holders == 2, key


def test_mount_reads_through_the_cluster(hay_url: str, mounts: MountSet,
                                          tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.txt").write_bytes(b"hello from the cluster\n")
    (src / "big.bin").write_bytes(os.urandom(6 << 20))
    run_cli("init", "ds", "--remote", hay_url)
    run_cli("commit", "ds", str(src), "--remote", hay_url, "-m", "v1")
    mnt = mounts.mount("ds", mounts.mountpoint(), "--remote", hay_url)
    assert (mnt / "a" / "x.txt").read_bytes() == b"hello from the cluster\n"
    assert (mnt / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    run_cli("umount", str(mnt))


def test_push_from_file_remote(hay_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}").write_bytes(os.urandom(5000 + i))
    local_url = f"file://{tmp_path / 'repo'}"
    run_cli("init", "ds", "--remote", local_url)
    cli_json("commit", "ds", str(src), "--remote", local_url, "-m", "v1")
    run_cli("push", "ds", "--remote", local_url, "--to", hay_url)
    out = tmp_path / "out"
    run_cli("checkout", "ds@main", str(out), "--remote", hay_url)
    assert snapshot(out, with_mtime=False) == snapshot(src, with_mtime=False)


def test_wrong_token_is_refused(cluster: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CACHEFS_TOKEN", "not-the-token")
    remote = open_remote_url(cluster["url"] + "/wrong")
    try:
        with pytest.raises(PermissionDenied):
            remote.put("x", b"y")
        with pytest.raises(PermissionDenied):
            remote.get("x")
    finally:
        remote.close()
    result = run_cli("ls", "ds", "--remote", cluster["url"] + "/wrong", check=False)
    assert result.returncode != 0
    assert "token" in result.stderr.lower() or "denied" in result.stderr.lower()


def test_bad_urls_are_config_errors() -> None:
    for url in ("haystack://", "haystack://a:1?bogus=1", "haystack://a:1/bad name",
                "haystack://a:1?timeout=soon"):
        with pytest.raises(ConfigError):
            open_remote_url(url)


def test_cluster_up_down_and_restart(tmp_path: Path) -> None:
    root = tmp_path / "c"
    try:
        state = json.loads(run_cli("cluster", "up", "--dir", str(root), "--masters", "1",
                                   "--storage", "1", "--replicas", "1", "--volumes", "4",
                                   "--json").stdout)
        assert state["url"].startswith("haystack://")
        assert Path(state["token_file"]).stat().st_mode & 0o077 == 0
        assert [set(m) >= {"addr", "pid"} for m in state["masters"] + state["storage"]] \
            == [True, True]
        token = Path(state["token_file"]).read_text().strip()
        with HaystackRemote(state["url"], token) as remote:
            remote.put("kept", b"across a restart")
        status = MasterClient(state["url"], token).status()
        assert status["leader"] == state["masters"][0]["addr"]

        # A second `up` on a running cluster is refused; `down` stops every process.
        again = run_cli("cluster", "up", "--dir", str(root), check=False)
        assert again.returncode != 0 and "already running" in again.stderr
        down = json.loads(run_cli("cluster", "down", "--dir", str(root), "--json").stdout)
        pids = [m["pid"] for m in state["masters"] + state["storage"]]
        assert sorted(down["stopped"]) == sorted(pids)
        for pid in pids:
            assert not Path(f"/proc/{pid}/cmdline").exists() or \
                b"cachefs" not in Path(f"/proc/{pid}/cmdline").read_bytes()

        restarted = json.loads(run_cli("cluster", "up", "--dir", str(root), "--json").stdout)
        assert restarted["url"] == state["url"]
        with HaystackRemote(restarted["url"], token) as remote:
            assert remote.get("kept") == b"across a restart"
    finally:
        if (root / "cluster.json").exists():
            cluster_down(root)


# -- faults, through the remote, on a cluster of their own ---------------------------------------

FAULT_DOWN_AFTER_S = 7  # storage servers heartbeat every 3 s


@pytest.fixture
def fault_cluster(tmp_path: Path) -> Iterator[dict]:
    """3 masters, 3 storage servers, R=2; a silent storage server is marked down after 7 s."""
    root = tmp_path / "faults"
    try:
        yield cluster_up(root, masters=3, storage=3, replicas=2, volumes=8,
                         timeout=UP_TIMEOUT_S,
                         extra_master_args=("--down-after", str(FAULT_DOWN_AFTER_S)))
    finally:
        cluster_down(root)


def chunk_of(data: bytes) -> tuple[str, bytes]:
    needle = blake3.blake3(data).digest()
    return f"chunks/{needle.hex()[:2]}/{needle.hex()}", needle


def put_random_chunks(remote: HaystackRemote, count: int, size: int) -> dict[str, bytes]:
    """Store `count` random chunks of `size` bytes; their key -> data."""
    stored = {}
    for _ in range(count):
        data = os.urandom(size)
        key, _ = chunk_of(data)
        remote.put(key, data)
        stored[key] = data
    return stored


def test_leader_killed_during_ref_updates_and_chunk_writes(fault_cluster: dict,
                                                           tmp_path: Path) -> None:
    state = fault_cluster
    token = Path(state["token_file"]).read_text().strip()
    acked_refs: list[RefValue] = []
    acked_chunks: dict[str, bytes] = {}
    failures: list[BaseException] = []
    stop = threading.Event()
    enough_before = threading.Event()

    def writer() -> None:
        with HaystackRemote(state["url"], token, timeout=60.0, namespace="faults") as remote:
            refs = GenerationRefStore(remote)
            current = refs.read("ds", "heads", "main")
            i = 0
            while not stop.is_set():
                data = os.urandom(3000) + i.to_bytes(4, "big")
                key, _ = chunk_of(data)
                try:
                    remote.put(key, data)
                    acked_chunks[key] = data
                    current = refs.compare_and_swap("ds", "heads", "main", current,
                                                    f"{i + 1:064x}", "stream")
                    acked_refs.append(current)
                except CachefsError as e:  # every write must get through, leader or not
                    failures.append(e)
                    return
                i += 1
                if i == 20:
                    enough_before.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert enough_before.wait(60), failures
        with MasterClient(state["url"], token) as client:
            leader = client.status()["leader"]
            victim = next(m for m in state["masters"] if m["addr"] == leader)
            before = len(acked_refs)
            os.kill(victim["pid"], signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: len(acked_refs) > before + 20 or failures, 60,
                       "writes acknowledged after the leader was killed")
            new_leader = client.status()["leader"]
            assert new_leader not in (None, leader)
        assert time.monotonic() - killed < 30
    finally:
        stop.set()
        thread.join(90)
    assert not failures, failures

    with HaystackRemote(state["url"], token, namespace="faults") as remote:
        refs = GenerationRefStore(remote)
        assert refs.read("ds", "heads", "main") == acked_refs[-1]
        history = {(e.commit, e.generation) for e in refs.history("ds", "heads", "main")}
        assert {(v.commit, v.generation) for v in acked_refs} <= history
        for key, data in acked_chunks.items():
            assert remote.get(key) == data


def test_storage_server_killed_then_back(fault_cluster: dict) -> None:
    state = fault_cluster
    token = Path(state["token_file"]).read_text().strip()
    root = Path(state["token_file"]).parent
    with HaystackRemote(state["url"], token, namespace="kill") as remote, \
            MasterClient(state["url"], token) as client:
        datas = put_random_chunks(remote, 60, 5000)
        victim = state["storage"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        # Every chunk stays readable (from the other replica).
        for key, data in datas.items():
            assert remote.get(key) == data
        wait_until(lambda: any(s["id"] == victim["id"] and s["state"] == "down"
                               for s in client.status()["storage"]), 30, "the server marked down")
        # Writes continue on the live replicas.
        later = put_random_chunks(remote, 60, 5000)
        for key, data in later.items():
            assert remote.get(key) == data

        # Its volumes show under-replicated while it is down.
        status = client.status()
        its_vids = {v["vid"] for v in status["volumes"]
                    if victim["id"] in {r["id"] for r in v["replicas"]}}
        assert its_vids and all(v["under_replicated"] for v in status["volumes"]
                                if v["vid"] in its_vids)

        start_member(root, state, "storage", victim)
        # Back: repair copies what it missed from the surviving replicas.
        placement = client.placement()
        missed = [n for n in (chunk_hash(k) for k in later)
                  if n is not None and victim["id"] in
                  {r.id for r in placement.replicas_of(placement.vid_of(n))}]
        assert missed
        with StorageClient(victim["addr"], token) as storage:
            def repaired() -> bool:
                try:
                    return all(storage.has_many(missed))
                except RemoteError:  # still starting
                    return False

            wait_until(repaired, 120, "repair copied the needles the server missed")
        wait_until(lambda: not client.status()["volumes"][min(its_vids)]["lagging"], 60,
                   "the volume no longer lagging")


def test_put_if_latest_refuses_a_stale_generation(hay_url: str) -> None:
    """The one-command compare-and-swap: a generation is created only as the newest one."""
    remote = open_remote_url(hay_url)
    assert isinstance(remote, HaystackRemote)
    try:
        prefix = "refs/ds/heads/main/"
        assert remote.put_if_latest(prefix + "00000000000000000001", b"1", prefix)
        assert remote.put_if_latest(prefix + "00000000000000000003", b"3", prefix)
        assert not remote.put_if_latest(prefix + "00000000000000000002", b"2", prefix)
        assert not remote.put_if_latest(prefix + "00000000000000000003", b"x", prefix)
        assert remote.put_if_latest(prefix + "00000000000000000004", b"4", prefix)
        assert remote.put_if_latest("refs/ds/heads/other/00000000000000000001", b"o",
                                    "refs/ds/heads/other/")
        assert list(remote.list(prefix)) == [prefix + f"{g:020d}" for g in (1, 3, 4)]
    finally:
        remote.close()


def test_silent_storage_server_is_declared_dead_and_replaced(tmp_path: Path) -> None:
    """--dead-after: a server silent for down-after + dead-after seconds is replaced in every
    replica set by the leader on its own, and repair fills the new replicas."""
    root = tmp_path / "dead"
    try:
        state = cluster_up(root, masters=3, storage=3, replicas=2, volumes=8,
                           timeout=UP_TIMEOUT_S,
                           extra_master_args=("--down-after", str(FAULT_DOWN_AFTER_S),
                                              "--dead-after", "3"))
        token = Path(state["token_file"]).read_text().strip()
        victim = state["storage"][0]
        with HaystackRemote(state["url"], token, namespace="dead") as remote, \
                MasterClient(state["url"], token) as client:
            stored = put_random_chunks(remote, 40, 4000)
            os.kill(victim["pid"], signal.SIGKILL)

            def replaced() -> bool:
                placement = client.placement()
                return all(len(rs) == 2 and victim["id"] not in {r.id for r in rs}
                           and all(r.state == "up" for r in rs) for rs in placement.vids)

            wait_until(replaced, 90, "the silent server replaced in every replica set")
            status = client.status()
            assert [s["state"] for s in status["storage"] if s["id"] == victim["id"]] == ["dead"]
            # Repair fills each new replica: every chunk is on both replicas of its volume.
            placement = client.placement()
            survivors = {s["addr"]: StorageClient(s["addr"], token)
                         for s in state["storage"][1:]}
            try:
                def filled() -> bool:
                    for key in stored:
                        needle = chunk_hash(key)
                        assert needle is not None
                        for replica in placement.replicas_of(placement.vid_of(needle)):
                            if not survivors[replica.address].has_many([needle])[0]:
                                return False
                    return True

                wait_until(filled, 90, "repair filled the new replicas")
            finally:
                for storage in survivors.values():
                    storage.close()
            for key, data in stored.items():
                assert remote.get(key) == data
    finally:
        if (root / "cluster.json").exists():
            cluster_down(root)


def test_cluster_up_retries_on_a_port_taken_meanwhile(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A port picked as free but taken before the member binds it: a new cluster starts over
    on fresh ports instead of failing."""
    import master.cluster as cluster_module

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    picks = iter([busy])
    real = cluster_module.free_port
    monkeypatch.setattr(cluster_module, "free_port", lambda: next(picks, None) or real())
    root = tmp_path / "retry"
    try:
        state = cluster_up(root, masters=1, storage=1, replicas=1, volumes=4,
                           timeout=UP_TIMEOUT_S)
        assert state["masters"][0]["addr"] != f"127.0.0.1:{busy}"
        token = Path(state["token_file"]).read_text().strip()
        with HaystackRemote(state["url"], token) as remote:
            remote.put("k", b"v")
            assert remote.get("k") == b"v"
        assert "cannot listen there" in (root / "logs" / "master-1.log").read_text()
    finally:
        taken.close()
        if (root / "cluster.json").exists():
            cluster_down(root)
