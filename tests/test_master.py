"""The raft master: placement (pure), liveness and lag (pure), and real `cachefs master serve`
groups on 127.0.0.1 with real storage servers.

- kill -9 of the leader during a stream of directory writes: a new leader within 15 s, every
  acknowledged write readable, the client carries on;
- a full-cluster kill -9 and restart keeps the directory, registrations and placement;
- with 2 of 3 masters stopped, writes are refused within a bounded time, naming the problem,
  and `master status` says there is no leader (exit 7);
- storage servers register and heartbeat; a killed one goes down, its lag shows, repair
  catches it up when it returns; declared dead, it is replaced and repair fills the new replica;
- tokens (gRPC and raft) and malformed requests.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest

from cachefs.errors import PermissionDenied, RemoteError, UsageError
from master.batching import CommandBatcher
from master.client import DirEntry, MasterClient, parse_masters
from master.liveness import Done, Liveness
from master.placement import place, replace
from master.proto import master_pb2 as pb
from master.proto import master_pb2_grpc as pb_grpc
from master.state import MasterState
from tests.helpers import run_cli
from tests.masters import MasterProcess, group_status, start_group, wait_leader
from tests.servers import wait_until
from tests.storage_servers import StorageServer, needles

TOKEN = "master-test-token"
STORAGE_VOLUMES = 4


# -- placement (pure) ------------------------------------------------------------------------


def _loads(sets: list[list[str]]) -> dict[str, int]:
    loads: dict[str, int] = {}
    for members in sets:
        for sid in members:
            loads[sid] = loads.get(sid, 0) + 1
    return loads


def test_placement_distinct_servers_and_balanced() -> None:
    servers = {f"s{i}": "z" for i in range(5)}
    sets = place(64, 2, servers)
    assert len(sets) == 64
    assert all(len(s) == 2 and len(set(s)) == 2 for s in sets)
    loads = _loads(sets)
    assert set(loads) == set(servers)
    assert max(loads.values()) - min(loads.values()) <= 1
    # deterministic, whatever the mapping's order
    assert place(64, 2, dict(reversed(list(servers.items())))) == sets


def test_placement_spreads_zones_where_possible() -> None:
    servers = {"a1": "a", "a2": "a", "b1": "b", "b2": "b", "c1": "c", "c2": "c"}
    sets = place(30, 3, servers)
    assert all(len({servers[sid] for sid in s}) == 3 for s in sets)
    assert max(_loads(sets).values()) - min(_loads(sets).values()) <= 1
    # fewer zones than replicas: every zone used, servers still distinct
    two_zones = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
    for s in place(16, 3, two_zones):
        assert len(set(s)) == 3 and {two_zones[sid] for sid in s} == {"a", "b"}


def test_placement_waits_for_r_servers_then_fills_as_they_register() -> None:
    assert place(8, 3, {"s1": "z", "s2": "z"}) == [[] for _ in range(8)]
    sets = place(8, 3, {"s1": "z", "s2": "z", "s3": "z"})
    assert all(sorted(s) == ["s1", "s2", "s3"] for s in sets)
    # a set left short (too few servers after a loss) is filled when a server registers
    short = replace(sets, "s3", 3, {"s1": "z", "s2": "z", "s3": "z"})
    assert all(sorted(s) == ["s1", "s2"] for s in short)
    filled = place(8, 3, {"s1": "z", "s2": "z", "s4": "z"}, short)
    assert all(s[:2] == old and s[2] == "s4" for s, old in zip(filled, short))


def test_replacement_keeps_surviving_replicas() -> None:
    servers = {f"s{i}": f"z{i % 3}" for i in range(6)}
    sets = place(48, 2, servers)
    after = replace(sets, "s2", 2, servers)
    for old, new in zip(sets, after):
        assert "s2" not in new and len(new) == 2 and len(set(new)) == 2
        if "s2" in old:
            survivors = [sid for sid in old if sid != "s2"]
            assert new[:len(survivors)] == survivors  # kept, in order
        else:
            assert new == old  # untouched
    loads = _loads(after)
    assert max(loads.values()) - min(loads.values()) <= 2


# -- liveness and lag (pure) -----------------------------------------------------------------


def test_liveness_lag_and_repair_tasks() -> None:
    now = [100.0]
    live = Liveness(down_after=2, dead_after=5, clock=lambda: now[0])
    live.reset(["a", "b", "c"])
    sets = [["a", "b"], ["b", "c"]]
    live.beat("a", 0, {0: 10}, [])
    live.beat("b", 0, {0: 7, 1: 3}, [])
    live.beat("c", 0, {1: 3}, [])
    assert live.vid_lags(0, sets[0]) == {"a": 0, "b": 3}
    assert live.vid_lags(1, sets[1]) == {"b": 0, "c": 0}
    assert live.repairs("a", sets) == []
    tasks = live.repairs("b", sets)
    assert [(t.vid, t.source_id) for t in tasks] == [(0, "a")]
    assert live.repairs("b", sets) == []  # in flight: not given twice
    live.beat("b", 0, {0: 10}, [Done(0, "a", True)])
    assert live.inflight("b", 0) is None and live.vid_lags(0, sets[0])["b"] == 0
    # a down replica is no repair source, and shows its lag from its last count
    now[0] += 3
    live.beat("b", 0, {0: 12, 1: 3}, [])
    assert live.state("a") == "down" and live.state("b") == "up"
    assert live.vid_lags(0, sets[0]) == {"a": 2, "b": 0}
    live.beat("a", 0, {0: 10}, [])  # back: it lags behind b now
    assert [(t.vid, t.source_id) for t in live.repairs("a", sets)] == [(0, "b")]
    now[0] += 3
    live.beat("b", 0, {}, [])
    assert live.due_dead(["a", "b", "c"]) == []
    now[0] += 5
    assert live.due_dead(["a", "b", "c"]) == ["a", "c"]  # silent for down + dead seconds


def test_parse_masters() -> None:
    assert parse_masters("haystack://a:1,b:2") == ["a:1", "b:2"]
    assert parse_masters(["a:1", "haystack://b:2,a:1"]) == ["a:1", "b:2"]
    with pytest.raises(UsageError):
        parse_masters("nohost")


def test_batcher_sends_concurrent_operations_as_one_command() -> None:
    """Operations that arrive while a command is in flight go out together in the next one,
    and each caller gets its own operation's result."""
    first_in_flight, release = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def submit(ops: Sequence[int], timeout: float) -> list[int]:
        batches.append(list(ops))
        first_in_flight.set()
        release.wait(10)
        return [op * 10 for op in ops]

    batcher: CommandBatcher[int] = CommandBatcher(submit)
    results: dict[int, int] = {}

    def call(op: int) -> None:
        results[op] = batcher.call(op, timeout=10)

    try:
        first = threading.Thread(target=call, args=(0,))
        first.start()
        assert first_in_flight.wait(10)
        others = [threading.Thread(target=call, args=(op,)) for op in range(1, 9)]
        for t in others:
            t.start()
        wait_until(lambda: len(batcher._pending) == 8, 10, "eight operations queued")
        release.set()
        for t in [first, *others]:
            t.join(10)
        assert batches == [[0], sorted(batches[1])] and sorted(batches[1]) == list(range(1, 9))
        assert results == {op: op * 10 for op in range(9)}
    finally:
        release.set()
        batcher.close()


def test_batcher_failures_reach_every_caller_and_nothing_else() -> None:
    outcomes: list[Any] = [RemoteError("no raft leader"), [1, 2], [True]]

    def submit(ops: Sequence[str], timeout: float) -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    batcher: CommandBatcher[str] = CommandBatcher(submit)
    try:
        with pytest.raises(RemoteError, match="no raft leader"):
            batcher.call("a", timeout=5)
        # a batch answered with the wrong number of results fails; it does not misdeliver
        with pytest.raises(RemoteError, match="applied 2 of a batch of 1"):
            batcher.call("b", timeout=5)
        assert batcher.call("c", timeout=5) is True  # the batcher survived both
    finally:
        batcher.close()
    with pytest.raises(RemoteError, match="shutting down"):
        batcher.call("d", timeout=5)


def test_batcher_caller_times_out_when_nothing_commits() -> None:
    """A caller waits at most its timeout; an operation whose caller gave up while it was
    still queued is never submitted."""
    stuck = threading.Event()
    submitted: list[list[str]] = []

    def submit(ops: Sequence[str], timeout: float) -> list[bool]:
        submitted.append(list(ops))
        if ops == ["x"]:
            stuck.wait(30)
        return [True] * len(ops)

    batcher: CommandBatcher[str] = CommandBatcher(submit)
    try:
        with pytest.raises(RemoteError, match=r"not committed within 0\.2 s"):
            batcher.call("x", timeout=0.2)  # its batch is stuck in raft
        with pytest.raises(RemoteError, match=r"not committed within 0\.2 s"):
            batcher.call("queued", timeout=0.2)  # behind the stuck batch
        stuck.set()
        assert batcher.call("later", timeout=5) is True
        assert submitted == [["x"], ["later"]]
    finally:
        stuck.set()
        batcher.close()


def test_dir_apply_answers_each_operation_and_isolates_a_failing_one() -> None:
    state = MasterState()
    put = ("put", "refs/a/00000000000000000001", b"1", None, 1, 5, True, "req-1", "refs/a/")
    results = state.dir_apply([
        put,
        ("put", "refs/a/00000000000000000001", b"x", None, 1, 6, True, "req-2", "refs/a/"),
        put,  # a retry of the applied request: still reported created
        ("put", "refs/a/00000000000000000000", b"0", None, 1, 7, True, "req-3", "refs/a/"),
        ("bogus",),
        ("delete", "refs/a/00000000000000000001"),
        ("delete", "absent"),
        ("barrier",),
        ("put", "plain", b"p", None, 1, 8, False, "", ""),
    ], _doApply=True)
    assert results == [True, False, True, False, None, True, False, True, True]
    assert state.entry("plain") is not None and state.entry("refs/a/00000000000000000001") is None


# -- raft groups -----------------------------------------------------------------------------


def client_of(members: list[MasterProcess], timeout: float = 30.0,
              token: str | None = TOKEN) -> MasterClient:
    return MasterClient([m.address for m in members], token, timeout)


def test_leader_killed_during_writes(tmp_path: Path, masters: list[MasterProcess]) -> None:
    group = start_group(tmp_path, 3, masters, token=TOKEN)
    leader = wait_leader(group)
    # A client that reached a follower is told where the leader is and goes there next.
    follower = next(m for m in group if m is not leader)
    with MasterClient([follower.address, leader.address], TOKEN) as hinted:
        hinted.dir_put(DirEntry("hint", inline=b"x"))
        assert hinted.current == leader.address
    acked: dict[str, bytes] = {}
    failed: list[str] = []
    stop = threading.Event()

    def write(client: MasterClient) -> None:
        i = 0
        while not stop.is_set():
            name, value = f"w/{i:06d}", b"value-%d" % i
            try:
                if i % 2:
                    assert client.dir_put(DirEntry(name, inline=value), if_absent=True)
                else:
                    client.dir_put(DirEntry(name, inline=value))
                acked[name] = value
            except RemoteError as e:  # not acknowledged: may or may not be there
                failed.append(f"{name}: {e}")
            i += 1

    with client_of(group) as client:
        writer = threading.Thread(target=write, args=(client,))
        writer.start()
        try:
            wait_until(lambda: len(acked) >= 40, 30, "writes before the kill")
            before = len(acked)
            killed_at = time.monotonic()
            leader.kill()
            survivors = [m for m in group if m is not leader]
            new_leader = wait_leader(survivors, timeout=15, other_than=leader.id)
            elected_after = time.monotonic() - killed_at
            wait_until(lambda: len(acked) >= before + 40, 30, "writes after the failover")
        finally:
            stop.set()
            writer.join(60)
        assert new_leader is not leader
        assert elected_after < 15
        assert client.current != leader.address  # it carried on with a live master
        # every acknowledged write is there, with its value, read through the log
        for name, value in acked.items():
            entry = client.dir_get(name)
            assert entry is not None and entry.inline == value, name
        listed = {e.name: e.inline for e in client.dir_list("w/", page=37)}
        assert all(listed.get(name) == value for name, value in acked.items())
        assert len(failed) < 10, failed
    # the killed member comes back and catches up
    leader.start()
    with leader.client(timeout=30) as alone:
        last = max(acked)
        wait_until(lambda: (e := alone.dir_get(last)) is not None and e.inline == acked[last],
                   30, "the restarted member to read the last write")


def test_full_cluster_restart_keeps_state(tmp_path: Path, masters: list[MasterProcess]) -> None:
    group = start_group(tmp_path, 3, masters, token=TOKEN,
                        extra=("--volumes", "8", "--replicas", "2"))
    wait_leader(group)
    with client_of(group) as client:
        for i, zone in enumerate(("za", "zb", "zc"), 1):
            client.register_storage(f"s{i}", f"127.0.0.1:{9000 + i}", zone, 1 << 30, 8)
        client.register_node("node-1", "127.0.0.1:9100", 1 << 20, json.dumps({"gpus": 2}))
        for i in range(30):
            client.dir_put(DirEntry(f"d/{i:03d}", inline=b"x" * i))
        client.dir_put(DirEntry("d/needle", needle=b"k" * 32, size=12345))
        client.dir_delete("d/000")
        wait_until(lambda: len(client.placement().vids) == 8, 30, "the first placement",
                   interval=0.2)
        placement = client.placement()
        entries = list(client.dir_list())
    assert all(len(s) == 2 for s in placement.vids) and len(placement.vids) == 8
    loads = _loads([[r.id for r in s] for s in placement.vids])
    assert sorted(loads.values()) == [5, 5, 6]  # spread over all three (registered at once)
    for m in group:
        m.kill()
    for m in group:
        m.start(wait=False)
    for m in group:
        m.wait_serving()
    leader = wait_leader(group)
    with leader.client() as direct:
        expected = direct.placement().vids
    for member in group:  # a follower forwards heartbeats (and placement) to the leader
        with member.client() as alone:
            answer = alone.heartbeat("s1", 123, {0: 5})
            assert answer.registered and answer.epoch == placement.epoch
            assert list(answer.vids) == [v for v, s in enumerate(placement.vids)
                                         if "s1" in [r.id for r in s]]
            assert alone.placement().vids == expected
            assert not alone.heartbeat("nobody").registered
    with client_of(group) as client:
        assert list(client.dir_list()) == entries
        assert client.dir_get("d/000") is None
        assert client.dir_get("d/needle") == DirEntry("d/needle", needle=b"k" * 32, size=12345,
                                                      mtime_ns=entries[-1].mtime_ns)
        after = client.placement()
        assert (after.epoch, [[r.id for r in s] for s in after.vids]) == (
            placement.epoch, [[r.id for r in s] for s in placement.vids])
        docs: list[dict[str, Any]] = []

        def heard() -> bool:  # soft state: a re-election after the restart starts it over
            client.heartbeat("s1", 123, {0: 5})
            docs[:] = [client.status()]
            first = docs[0]["storage"][0]
            return first["free_bytes"] == 123 and first["last_heartbeat_age_s"] is not None

        wait_until(heard, 30, "the leader to report s1's heartbeat", interval=0.2)
        doc = docs[0]
    assert [s["id"] for s in doc["storage"]] == ["s1", "s2", "s3"]
    assert doc["storage"][0]["state"] == "up"
    assert [s["zone"] for s in doc["storage"]] == ["za", "zb", "zc"]
    assert [n["name"] for n in doc["nodes"]] == ["node-1"]
    assert doc["volume_count"] == 8 and doc["replicas"] == 2


def test_minority_refuses_writes_and_status_says_no_leader(
        tmp_path: Path, masters: list[MasterProcess]) -> None:
    # A 1 s commit timeout (default 5): the survivor says "no raft leader" after 1 s, and its
    # status's read barrier (min(3 s, the commit timeout)) gives up as soon.
    group = start_group(tmp_path, 3, masters, token=TOKEN, extra=["--commit-timeout", "1"])
    leader = wait_leader(group)
    with client_of(group) as client:
        client.dir_put(DirEntry("kept", inline=b"1"))
    followers = [m for m in group if m is not leader]
    stopped = [leader, followers[0]]
    for m in stopped:
        assert m.stop() == 0  # SIGTERM stops a master cleanly
        assert "stopped" in m.output(since_start=True)
    survivor = followers[1]
    started = time.monotonic()
    with client_of(group, timeout=4) as client, pytest.raises(RemoteError) as refused:
        client.dir_put(DirEntry("lost", inline=b"2"))
    elapsed = time.monotonic() - started
    assert elapsed < 25
    assert "no raft leader" in str(refused.value) or "no raft quorum" in str(refused.value)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    result = run_cli("master", "status", survivor.address, "--token-file", str(token_file),
                     check=False)
    assert result.returncode == RemoteError.exit_code, result.stderr
    assert "leader: NONE" in result.stdout
    doc = json.loads(run_cli("master", "status", survivor.address, "--token-file",
                             str(token_file), "--json", check=False).stdout)
    assert doc["leader"] is None and doc["self"] == survivor.id and doc["stale"]
    assert {m["id"]: m["role"] for m in doc["members"] if not m["self"]} == {
        leader.id: "unreachable", followers[0].id: "unreachable"}
    # a majority again: the write goes through, the earlier one is still there
    followers[0].start()
    wait_leader([survivor, followers[0]])
    with client_of([survivor, followers[0]]) as client:
        assert client.dir_put(DirEntry("after", inline=b"3"))
        assert client.dir_get("kept") is not None


def test_tokens_for_grpc_and_raft(tmp_path: Path, masters: list[MasterProcess]) -> None:
    group = start_group(tmp_path, 3, masters, tokens=[TOKEN, TOKEN, "another-token"])
    good, outsider = group[:2], group[2]
    wait_leader(good)
    with client_of(good) as client:
        assert client.dir_put(DirEntry("secret", inline=b"s"))
    for token in ("wrong-token", None):
        with good[0].client(token=token) as bad, pytest.raises(PermissionDenied):
            bad.dir_get("secret")
        with good[0].client(token=token) as bad, pytest.raises(PermissionDenied):
            bad.status()
    # the member with another token cannot take part in the raft group: it never learns of
    # a leader, holds none of the state, and the others see it as unreachable
    doc = group_status([outsider])
    assert doc is not None and doc["leader"] is None and doc["directory_entries"] == 0
    doc = group_status(good)
    assert doc is not None
    assert {m["id"]: m["role"] for m in doc["members"]}[outsider.id] == "unreachable"


def test_malformed_requests_change_nothing(tmp_path: Path,
                                           masters: list[MasterProcess]) -> None:
    (member,) = start_group(tmp_path, 1, masters, extra=("--volumes", "4"))
    wait_leader([member])
    with member.client() as client:
        client.dir_put(DirEntry("good", inline=b"ok"))
    channel = grpc.insecure_channel(member.address)
    stub = pb_grpc.MasterStub(channel)
    bad: list[tuple[str, Any]] = [
        ("DirPut", pb.DirPutRequest(entry=pb.DirEntry(name="", inline=b"x", has_inline=True))),
        ("DirPut", pb.DirPutRequest(entry=pb.DirEntry(name="a" * 1025, inline=b"x",
                                                      has_inline=True))),
        ("DirPut", pb.DirPutRequest(entry=pb.DirEntry(name="nul\0", inline=b"x",
                                                      has_inline=True))),
        ("DirPut", pb.DirPutRequest(entry=pb.DirEntry(name="caf\u00e9", inline=b"x",
                                                      has_inline=True))),
        ("DirPut", pb.DirPutRequest(entry=pb.DirEntry(name="big", inline=b"x" * 4097,
                                                      has_inline=True))),
        ("DirPut", pb.DirPutRequest(entry=pb.DirEntry(name="key", needle=b"k" * 31))),
        ("DirPut", pb.DirPutRequest(entry=pb.DirEntry(name="both", inline=b"x", has_inline=True,
                                                      needle=b"k" * 32))),
        ("DirGet", pb.DirGetRequest(name="")),
        ("DirDelete", pb.DirDeleteRequest(name="good\0")),
        ("DirList", pb.DirListRequest(prefix="x\0")),
        ("DirList", pb.DirListRequest(limit=10_001)),
        ("RegisterStorage", pb.RegisterStorageRequest(id="bad id", address="127.0.0.1:1",
                                                      volumes=4)),
        ("RegisterStorage", pb.RegisterStorageRequest(id="s1", address="nowhere", volumes=4)),
        ("RegisterStorage", pb.RegisterStorageRequest(id="s1", address="127.0.0.1:0",
                                                      volumes=4)),
        ("RegisterStorage", pb.RegisterStorageRequest(id="s1", address="127.0.0.1:1",
                                                      volumes=8)),  # the cluster has 4
        ("Heartbeat", pb.HeartbeatRequest(id="s1", counts=[pb.VolumeCount(vid=4)])),
        ("DeclareDead", pb.DeclareDeadRequest(id="")),
        ("RegisterNode", pb.RegisterNodeRequest(name="n", inventory_json="{not json")),
        ("RegisterNode", pb.RegisterNodeRequest(name="n/1")),
    ]
    try:
        for method, request in bad:
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request, timeout=20)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, request)
            assert refused.value.details()
    finally:
        channel.close()
    with member.client() as client:
        assert [e.name for e in client.dir_list()] == ["good"]
        doc = client.status()
        assert doc["storage"] == [] and doc["nodes"] == []
        with pytest.raises(UsageError):
            client.dir_put(DirEntry("x" * 2000, inline=b"1"))


# -- storage servers -------------------------------------------------------------------------


def storage_state(client: MasterClient) -> dict[str, Any]:
    doc = client.status()
    return {s["id"]: s for s in doc["storage"]} | {"_doc": doc}


def test_storage_membership_lag_repair_and_death(
        tmp_path: Path, masters: list[MasterProcess],
        storage_servers: list[StorageServer]) -> None:
    (member,) = start_group(tmp_path, 1, masters, token=TOKEN, extra=(
        "--volumes", str(STORAGE_VOLUMES), "--replicas", "2", "--down-after", "2",
        "--dead-after", "0"))
    servers: dict[str, StorageServer] = {}
    for i, zone in enumerate(("z1", "z2", "z3"), 1):
        sid = f"s{i}"
        server = StorageServer(tmp_path / sid, token=TOKEN, volumes=STORAGE_VOLUMES, extra=(
            "--master", f"haystack://{member.address}", "--server-id", sid, "--zone", zone,
            "--heartbeat-interval", "0.3"))
        storage_servers.append(server)
        servers[sid] = server.start()
    client = member.client(timeout=30)
    try:
        def all_up() -> bool:
            state = storage_state(client)
            return all(state.get(sid, {}).get("state") == "up"
                       and state[sid]["last_heartbeat_age_s"] is not None for sid in servers)

        wait_until(all_up, 30, "3 storage servers up")
        wait_until(lambda: len(client.placement().vids) == STORAGE_VOLUMES, 30,
                   "the first placement", interval=0.2)
        placement = client.placement()
        assert len(placement.vids) == STORAGE_VOLUMES
        for members in placement.vids:
            assert len(members) == 2 and len({r.id for r in members}) == 2
            assert all(r.address == servers[r.id].address for r in members)
        # a volume, the replica that will be killed and the one that takes the writes
        vid = 0
        victim_id, other_id = (r.id for r in placement.vids[vid])
        victim, other = servers[victim_id], servers[other_id]
        third_id = next(sid for sid in servers if sid not in (victim_id, other_id))

        victim.kill()
        killed_at = time.monotonic()
        wait_until(lambda: storage_state(client)[victim_id]["state"] == "down", 15,
                   "the killed server to be down")
        assert time.monotonic() - killed_at < 10
        stored = {k: d for k, d in needles(60, size=500).items()
                  if int.from_bytes(k, "big") % STORAGE_VOLUMES == vid}
        assert stored
        with other.client() as c:
            c.put_many(list(stored.items()))

        def lagging() -> bool:
            volume = storage_state(client)["_doc"]["volumes"][vid]
            lags = {r["id"]: r["lag"] for r in volume["replicas"]}
            return volume["lagging"] and lags[victim_id] == len(stored)

        wait_until(lagging, 15, f"volume {vid} lagging on {victim_id}")
        assert vid in storage_state(client)["_doc"]["under_replicated"]

        victim.start()  # repair catches it up
        with victim.client() as c:
            wait_until(lambda: all(c.has_many(list(stored))), 30,
                       "repair to bring the needles to the restarted server")
        wait_until(lambda: not storage_state(client)["_doc"]["volumes"][vid]["lagging"], 15,
                   "the lag to clear")
        assert storage_state(client)[victim_id]["state"] == "up"

        # declared dead: replaced everywhere; the new replica is filled by repair
        victim.kill()
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        result = run_cli("master", "declare-dead", member.address, victim_id, "--token-file",
                         str(token_file))
        assert f"storage server {victim_id} declared dead" in result.stdout
        after = client.placement()
        assert after.epoch > placement.epoch
        for before_set, after_set in zip(placement.vids, after.vids):
            ids = [r.id for r in after_set]
            assert victim_id not in ids and len(set(ids)) == 2
            if victim_id not in [r.id for r in before_set]:
                assert ids == [r.id for r in before_set]
        assert {r.id for r in after.vids[vid]} == {other_id, third_id}
        with servers[third_id].client() as c:
            wait_until(lambda: all(c.has_many(list(stored))), 30,
                       f"repair to fill the new replica {third_id}")
        assert storage_state(client)[victim_id]["state"] == "dead"
    finally:
        client.close()
