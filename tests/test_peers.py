"""The peer tier (issue 20) with real processes: several "nodes" on 127.0.0.1, each its own cache
dir, `cachefs peer serve` process and `cachefs mount` daemon, all sharing one origin.

- 4 nodes read one version in parallel, shuffled: every byte right, and the origin (counted at
  a proxy in front of the S3 server) sends about the dataset once, not four times;
- the server owning about a quarter of the chunks is killed -9 mid-read: every reader finishes
  with the right bytes and no EIO; restarted, it rejoins the ring;
- a peer that answers with corrupted chunks is quarantined and no reader sees a bad byte;
- a peer that accepts connections and never answers: the readers finish within the deadline
  bound (it leaves the ring after three misses);
- a wrong token is refused, a request naming a remote the node does not serve (or a URL) is
  refused; a peers-file change is picked up;
- the server on its own: malformed requests, HasChunks, Status, cached_only.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cachefs.cache.disk import DiskCache
from cachefs.cache.tiered import object_is_intact
from cachefs.dataset.objects import hash_bytes
from cachefs.dataset.repo import Repository, chunk_key
from cachefs.fuse.mount import mount_stats
from cachefs.peer.client import PeerCallError, PeerClient
from cachefs.peer.proto import peer_pb2 as pb
from cachefs.peer.proto import peer_pb2_grpc as pb_grpc
from cachefs.peer.ring import owner
from cachefs.peer.server import PeerService, build_server
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.registry import open_remote_url
from tests.fault_proxy import FaultProxy
from tests.helpers import run_cli
from tests.mounting import MountSet, wait_for
from tests.peers import PeerSet
from tests.servers import MotoServer

pytestmark = pytest.mark.timeout(180)

DATASET = "imgs"
CHUNK = "256KiB"
READERS = 4


def make_files(root: Path, seed: int = 7) -> dict[str, bytes]:
    """60 small files (packed several to a chunk) and two of 1.5 MB (several chunks each)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(60):
        files[f"train/c{i % 6}/img{i:03d}.jpg"] = rng.randbytes(rng.randrange(20_000, 90_000))
    for i in range(2):
        files[f"shards/s{i}.tar"] = rng.randbytes(1_500_000 + i)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def commit_dataset(remote: str, tmp_path: Path) -> dict[str, bytes]:
    src = tmp_path / "src"
    files = make_files(src)
    run_cli("init", DATASET, "--chunk-size", CHUNK, "--remote", remote)
    run_cli("commit", DATASET, str(src), "-m", "v1", "--remote", remote)
    return files


def chunk_names(url: str) -> list[str]:
    """The chunks of the dataset's main version (the zero chunk, never fetched, left out)."""
    repo = Repository(open_remote_url(url))
    commit = repo.get_commit(repo.resolve(DATASET, "main").commit)
    names = {x.chunk for _, entry in repo.walk(commit.tree) if not entry.is_dir
             for x in entry.extents}
    present = repo.remote.has(chunk_key(n) for n in names)
    return sorted(n for n in names if chunk_key(n) in present)


def read_all(mountpoint: Path, files: dict[str, bytes], seed: int) -> list[str]:
    """Read every file in a shuffled order with READERS threads; the wrong ones' names."""
    order = sorted(files)
    random.Random(seed).shuffle(order)

    def check(rel: str) -> str | None:
        return None if (mountpoint / rel).read_bytes() == files[rel] else rel

    with ThreadPoolExecutor(READERS) as pool:
        return [rel for rel in pool.map(check, order) if rel is not None]


def mount_node(mounts: MountSet, node: str, cache_dir: Path, peers: str | None,
               *extra: str) -> Path:
    args = ["--remote", "origin", "--cache-dir", str(cache_dir), "--memory-cache", "16MiB"]
    if peers is not None:
        args += ["--cache-peers", peers]
    return mounts.mount(f"{DATASET}@main", mounts.mountpoint(f"mnt-{node}"), *args, *extra)


@pytest.fixture
def origin_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server.endpoint) as proxy:
        yield proxy


# --- many nodes ------------------------------------------------------------------------------


def test_four_nodes_read_one_version_from_the_origin_about_once(
        tmp_path: Path, moto_server: MotoServer, origin_proxy: FaultProxy,
        peer_servers: PeerSet, mounts: MountSet) -> None:
    bucket = f"peers-{os.getpid()}-{random.randrange(1 << 30)}"
    moto_server.create_bucket(bucket)
    url = f"s3://{bucket}/repo?endpoint_url={origin_proxy.endpoint}&region=us-east-1"
    run_cli("remote", "add", "origin", url)
    files = commit_dataset("origin", tmp_path)
    names = chunk_names(url)
    stored = sum(len(Repository(open_remote_url(url)).remote.get(chunk_key(n))) for n in names)
    servers = [peer_servers.start(f"node{i}") for i in range(4)]
    peers = ",".join(s.address for s in servers)
    points = [mount_node(mounts, f"node{i}", s.cache_dir, peers)
              for i, s in enumerate(servers)]
    before = origin_proxy.get_bytes
    with ThreadPoolExecutor(4) as pool:
        wrong = list(pool.map(lambda i: read_all(points[i], files, seed=i), range(4)))
    assert wrong == [[], [], [], []]
    chunk_bytes = origin_proxy.get_bytes - before
    stats = [mount_stats(str(p)) for p in points]
    statuses = [s.status() for s in servers]
    summary = [{k: m[k] for k in ("origin_requests", "origin_bytes", "peer_hits", "peer_errors",
                                  "peer_timeouts", "hedged_requests", "live_peers")}
               for m in stats] + [{k: st[k] for k in ("origin_fetches", "origin_bytes",
                                                       "served_from_cache", "served_from_origin")}
                                  for st in statuses]
    assert chunk_bytes <= 1.1 * stored, f"{chunk_bytes} of {stored}: {summary}"
    assert sum(s["peer_hits"] for s in stats) >= len(names)  # every node got chunks from peers
    assert all(s["peer_errors"] == 0 for s in stats)
    fetched = sum(s["origin_fetches"] for s in statuses)
    assert fetched + sum(s["origin_requests"] for s in stats) >= len(names)


def test_an_owner_killed_mid_read_costs_no_reader_an_error_and_rejoins(
        tmp_path: Path, peer_servers: PeerSet, mounts: MountSet) -> None:
    url = "file://" + str(tmp_path / "repo")
    run_cli("remote", "add", "origin", url)
    files = commit_dataset("origin", tmp_path)
    names = chunk_names(url)
    servers = [peer_servers.start(f"node{i}") for i in range(4)]
    members = [s.address for s in servers]
    peers = ",".join(members)
    points = [mount_node(mounts, f"node{i}", s.cache_dir, peers)
              for i, s in enumerate(servers)]
    victim = servers[1]
    owned = [n for n in names if owner(members, n) == victim.address]
    assert owned, "the victim owns some chunks"
    errors: list[BaseException] = []
    wrong: list[list[str]] = []
    started = threading.Event()

    def reader(i: int) -> None:
        try:
            started.set()
            wrong.append(read_all(points[i], files, seed=10 + i))
        except BaseException as e:  # an EIO would show here
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in (0, 2, 3)]
    for t in threads:
        t.start()
    started.wait(10)
    victim.kill()  # kill -9 while the others read
    for t in threads:
        t.join(120)
    assert not errors and wrong == [[], [], []]
    # restarted on its port, it answers its probes and is back in every mount's ring
    victim.start()
    for p in (points[0], points[2], points[3]):
        wait_for(lambda p=p: mount_stats(str(p))["live_peers"] == 4, timeout=15,
                 what=f"{victim.address} back in the ring of {p}")
    assert read_all(points[1], files, seed=99) == []  # its own node reads fine too


# --- lying and silent peers ------------------------------------------------------------------


class LyingPeer(pb_grpc.PeerServicer):
    """A member that answers every GetChunk with the right length of wrong bytes."""

    def __init__(self) -> None:
        self.calls = 0

    def GetChunk(self, request: pb.GetChunkRequest,
                 context: grpc.ServicerContext) -> pb.GetChunkResponse:
        self.calls += 1
        return pb.GetChunkResponse(data=b"\0" * 1000, from_origin=False)

    def Status(self, request: pb.StatusRequest,
               context: grpc.ServicerContext) -> pb.StatusResponse:
        return pb.StatusResponse(json="{}")


def test_a_lying_peer_is_quarantined_and_no_reader_sees_a_bad_byte(
        tmp_path: Path, peer_servers: PeerSet, mounts: MountSet) -> None:
    url = "file://" + str(tmp_path / "repo")
    run_cli("remote", "add", "origin", url)
    files = commit_dataset("origin", tmp_path)
    honest = peer_servers.start("honest")
    liar = LyingPeer()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_PeerServicer_to_server(liar, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        point = mount_node(mounts, "reader", tmp_path / "reader-cache",
                           f"127.0.0.1:{port},{honest.address}")
        assert read_all(point, files, seed=1) == []
        stats = mount_stats(str(point))
        assert liar.calls >= 1
        assert stats["peer_corrupt"] >= 1 and stats["quarantined_peers"] == 1
        assert stats["live_peers"] == 1
        assert stats["peer_ring"]["quarantined"].keys() == {f"127.0.0.1:{port}"}
        doc = json.loads(run_cli("peer", "status", "--cache-peers",
                                 f"127.0.0.1:{port},{honest.address}", "--json").stdout)
        assert doc["quarantined"] == [f"127.0.0.1:{port}"]
        by_address = {m["address"]: m for m in doc["members"]}  # members are listed sorted
        assert by_address[f"127.0.0.1:{port}"]["quarantined_by"] == [str(point)]
        assert by_address[honest.address]["quarantined_by"] == []
        calls = liar.calls
        # quarantined: not asked again, even for chunks it owns
        run_cli("umount", str(point))
        point = mount_node(mounts, "reader2", tmp_path / "reader2-cache",
                           f"127.0.0.1:{port},{honest.address}")
        assert read_all(point, files, seed=2) == []
        assert liar.calls > calls  # a new mount trusts it once, then quarantines it too
    finally:
        server.stop(grace=None)


def test_a_peer_that_never_answers_costs_at_most_the_deadlines(
        tmp_path: Path, mounts: MountSet) -> None:
    url = "file://" + str(tmp_path / "repo")
    run_cli("remote", "add", "origin", url)
    files = commit_dataset("origin", tmp_path)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts connections (the kernel does), never answers a byte
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        point = mount_node(mounts, "reader", tmp_path / "reader-cache", address)
        started = time.monotonic()
        assert read_all(point, files, seed=3) == []
        elapsed = time.monotonic() - started
        stats = mount_stats(str(point))
        # at most three missed deadlines of the first call (2 s + transfer time each) before
        # it leaves the ring; concurrent readers wait out the same ones
        assert stats["peer_timeouts"] >= 1 and stats["hedged_requests"] >= 1
        assert stats["live_peers"] == 0
        assert elapsed < 20, elapsed
    finally:
        silent.close()


# --- the trust boundary ----------------------------------------------------------------------


def test_wrong_tokens_and_unserved_remotes_are_refused(
        tmp_path: Path, peer_servers: PeerSet, mounts: MountSet) -> None:
    url = "file://" + str(tmp_path / "repo")
    run_cli("remote", "add", "origin", url)
    run_cli("remote", "add", "other", "file://" + str(tmp_path / "other"))
    files = commit_dataset("origin", tmp_path)
    name = chunk_names(url)[0]
    server = peer_servers.start("node", token="s3cret", extra=("--remotes", "origin"))
    for token in (None, "wrong"):
        client = server.client(token=token)
        with pytest.raises(PeerCallError) as refused:
            client.get_chunk("origin", DATASET, name, timeout=5)
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        client.close()
    client = server.client()
    data, fetched = client.get_chunk("origin", DATASET, name, timeout=5)
    assert hash_bytes(data) == name and fetched
    for remote, code in (("other", grpc.StatusCode.PERMISSION_DENIED),
                         ("nope", grpc.StatusCode.PERMISSION_DENIED),
                         (url, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(PeerCallError) as refused:
            client.get_chunk(remote, DATASET, name, timeout=5)
        assert refused.value.code == code, remote
        assert "s3cret" not in str(refused.value)
    client.close()
    assert "s3cret" not in server.output()
    # a mount with the wrong token reads everything right, from the origin
    token_file = tmp_path / "wrong.token"
    token_file.write_text("wrong\n")
    point = mount_node(mounts, "reader", tmp_path / "reader-cache", server.address,
                       "--token-file", str(token_file))
    assert read_all(point, files, seed=4) == []
    stats = mount_stats(str(point))
    assert stats["peer_errors"] >= 1 and stats["peer_hits"] == 0


def test_a_peers_file_change_is_picked_up(tmp_path: Path, peer_servers: PeerSet,
                                          mounts: MountSet) -> None:
    url = "file://" + str(tmp_path / "repo")
    run_cli("remote", "add", "origin", url)
    files = commit_dataset("origin", tmp_path)
    first, second = peer_servers.start("a"), peer_servers.start("b")
    peers_file = tmp_path / "peers"
    peers_file.write_text(f"# the ring\n{first.address}\n")
    point = mounts.mount(f"{DATASET}@main", mounts.mountpoint("mnt"), "--remote", "origin",
                         "--cache-dir", str(tmp_path / "reader-cache"),
                         "--cache-peers-file", str(peers_file))
    assert mount_stats(str(point))["live_peers"] == 1
    peers_file.write_text(f"{first.address}, {second.address}\n")
    wait_for(lambda: mount_stats(str(point))["live_peers"] == 2, timeout=10,
             what="the second peer in the ring")
    assert read_all(point, files, seed=5) == []
    assert second.status()["get_requests"] >= 1  # it owns some chunks now


def test_mounting_with_peers_needs_a_remote_name(tmp_path: Path, mounts: MountSet) -> None:
    url = "file://" + str(tmp_path / "repo")
    commit_dataset(url, tmp_path)  # a URL no remote of this node is named for
    proc = run_cli("mount", f"{DATASET}@main", str(mounts.mountpoint("m")), "--remote", url,
                   "--cache-peers", "127.0.0.1:1", check=False)
    assert proc.returncode == 2 and "--remote NAME" in proc.stderr
    run_cli("remote", "add", "origin", url)
    proc = run_cli("mount", f"{DATASET}@main", str(mounts.mountpoint("m")), "--remote",
                   "origin", "--cache-peers", "nohost", check=False)
    assert proc.returncode == 2 and "HOST:PORT" in proc.stderr


# --- the server alone ------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[PeerClient, LocalRemote, PeerService]]:
    remote = LocalRemote(tmp_path / "repo")
    cache = DiskCache(tmp_path / "cache", 64 << 20, verify=object_is_intact,
                      free_space_floor=0)
    service = PeerService(cache, {"origin": "file://" + str(tmp_path / "repo")},
                          datasets=["imgs", "team-*"])
    server, address = build_server(service, "127.0.0.1:0", None)
    server.start()
    client = PeerClient(address, None)
    try:
        yield client, remote, service
    finally:
        client.close()
        server.stop(grace=None)
        cache.close()


def test_the_server_checks_every_request(
        served: tuple[PeerClient, LocalRemote, PeerService]) -> None:
    client, remote, _ = served
    data = os.urandom(300_000)
    name = hash_bytes(data)
    remote.put(chunk_key(name), data)
    for bad in ("", "ABC", name.upper(), name[:-1], name + "0", "../" + name[3:]):
        with pytest.raises(PeerCallError) as refused:
            client.get_chunk("origin", "imgs", bad, timeout=5)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(PeerCallError) as refused:
        client.get_chunk("origin", "secret", name, timeout=5)  # not a served dataset
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PeerCallError) as refused:
        client.get_chunk("origin", "imgs", name, timeout=5, cached_only=True)
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    assert client.has_chunks([name], timeout=5) == [False]
    got, fetched = client.get_chunk("origin", "team-a", name, timeout=5)
    assert got == data and fetched
    got, fetched = client.get_chunk("origin", "imgs", name, timeout=5, cached_only=True)
    assert got == data and not fetched
    assert client.has_chunks([name, "0" * 64], timeout=5) == [True, False]
    with pytest.raises(PeerCallError) as refused:
        client.has_chunks(["0" * 64] * 10_001, timeout=5)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    missing = hash_bytes(b"nowhere")
    with pytest.raises(PeerCallError) as refused:
        client.get_chunk("origin", "imgs", missing, timeout=5)
    assert refused.value.code == grpc.StatusCode.NOT_FOUND
    doc = client.status(timeout=5)
    assert doc["origin_fetches"] == 1 and doc["served_from_cache"] == 1
    assert doc["remotes"] == ["origin"] and json.dumps(doc)


def test_concurrent_askers_of_one_chunk_share_one_origin_fetch(
        served: tuple[PeerClient, LocalRemote, PeerService]) -> None:
    client, remote, service = served
    data = os.urandom(2_000_000)
    name = hash_bytes(data)
    remote.put(chunk_key(name), data)
    gate = threading.Event()
    real_get = remote.get
    opened = service._remote("origin")
    original = opened.get

    def slow_get(key: str) -> bytes:
        gate.wait(10)  # every asker arrives while the first fetch is in flight
        return original(key)

    opened.get = slow_get  # type: ignore[method-assign]
    with ThreadPoolExecutor(8) as pool:
        replies = [pool.submit(client.get_chunk, "origin", "imgs", name, 30) for _ in range(8)]
        wait_for(lambda: service.counters["get_requests"] == 8, timeout=10,
                 what="every request in the server")
        gate.set()
        results = [r.result() for r in replies]
    assert all(data_ == data for data_, _ in results)
    assert service.counters["origin_fetches"] == 1
    assert sum(fetched for _, fetched in results) == 1
    assert real_get(chunk_key(name)) == data


def test_a_corrupt_origin_answer_is_refused_not_stored(
        served: tuple[PeerClient, LocalRemote, PeerService]) -> None:
    client, remote, _ = served
    data = os.urandom(100_000)
    name = hash_bytes(data)
    remote.put(chunk_key(name), data[:-1] + bytes([data[-1] ^ 1]))  # the origin lies
    with pytest.raises(PeerCallError) as refused:
        client.get_chunk("origin", "imgs", name, timeout=5)
    assert refused.value.code == grpc.StatusCode.DATA_LOSS
    assert client.has_chunks([name], timeout=5) == [False]


def test_peer_status_shows_the_ring(tmp_path: Path, peer_servers: PeerSet) -> None:
    first, second = peer_servers.start("a"), peer_servers.start("b")
    second.kill()
    members = f"{first.address},{second.address}"
    doc = json.loads(run_cli("peer", "status", "--cache-peers", members, "--json").stdout)
    assert doc["live"] == [first.address] and doc["down"] == [second.address]
    by_address = {m["address"]: m for m in doc["members"]}
    assert by_address[first.address]["share"] == 1.0
    assert by_address[first.address]["server"]["address"] == first.address
    assert "UNAVAILABLE" in by_address[second.address]["error"]
    text = run_cli("peer", "status", "--cache-peers", members).stdout
    assert first.address in text and "live" in text and "down" in text
    first.kill()
    proc = run_cli("peer", "status", "--cache-peers", members, check=False)
    assert proc.returncode == 1


# --- draining ----------------------------------------------------------------------------------


def test_a_drained_peer_leaves_the_rings_without_a_reader_waiting(
        tmp_path: Path, peer_servers: PeerSet, mounts: MountSet) -> None:
    """`cachefs peer drain` takes a member out of every ring while it stays up: its chunk
    requests are refused at once (no reader waits a deadline for it, none sees an error),
    probes keep it out, `peer status` shows it draining (a readiness probe fails); `--resume`
    brings it back within a probe interval. SIGTERM drains the same way before the server
    stops."""
    url = "file://" + str(tmp_path / "repo")
    run_cli("remote", "add", "origin", url)
    files = commit_dataset("origin", tmp_path)
    names = chunk_names(url)
    servers = [peer_servers.start(f"node{i}") for i in range(3)]
    members = [s.address for s in servers]
    drained, stopped = servers[0], servers[1]
    assert [n for n in names if owner(members, n) == drained.address], "it owns chunks"
    point = mount_node(mounts, "reader", tmp_path / "reader-cache", ",".join(members))

    out = run_cli("peer", "drain", drained.address, "--json").stdout
    assert json.loads(out) == {"address": drained.address, "draining": True}
    assert drained.status()["draining"] is True
    status = run_cli("peer", "status", "--cache-peers", drained.address, check=False)
    assert status.returncode == 1 and "draining" in status.stdout  # not ready
    assert read_all(point, files, seed=3) == []
    stats = mount_stats(str(point))
    assert stats["peer_timeouts"] == 0 and stats["hedged_requests"] == 0
    assert drained.address not in stats["peer_ring"]["live"]
    assert drained.status()["refused_draining"] >= 1  # asked once, then out of the ring
    until = time.monotonic() + 2.5  # the mount probes down members every second: still out
    while time.monotonic() < until:
        assert mount_stats(str(point))["peer_ring"]["live"] == sorted(members[1:])
        time.sleep(0.25)

    run_cli("peer", "drain", drained.address, "--resume")
    wait_for(lambda: drained.address in mount_stats(str(point))["peer_ring"]["live"],
             timeout=10, what="the resumed member back in the ring")

    assert stopped.proc is not None
    stopped.proc.terminate()  # SIGTERM: drains for --drain-seconds, then stops
    wait_for(lambda: stopped.proc.poll() is not None or stopped.status()["draining"],
             timeout=5, what="the terminated server draining")
    run_cli("umount", str(point))
    point = mount_node(mounts, "reader", tmp_path / "reader-cache-2", ",".join(members))
    assert read_all(point, files, seed=4) == []
    stats = mount_stats(str(point))
    assert stats["peer_timeouts"] == 0 and stats["hedged_requests"] == 0
    assert stopped.proc.wait(timeout=30) == 0
