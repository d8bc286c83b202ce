"""Tests of `storage_server.client.ReplicatedStorage` over real storage servers.

Three `cachefs storage serve` processes on 127.0.0.1 with a placement built by hand (4 vids, two
replicas each on distinct servers, no master): round trip, where needles land, kill -9 of one
server (reads fall back; writes succeed or fail by `min_replicas`; restart), a corrupt replica
(flipped byte on disk, wrong bytes under a key), placement refresh, replica states, the token.
The pure parts (read order, write targets, placement checks) are tested without servers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from cachefs.contracts import Placement, ReplicaInfo, write_targets
from cachefs.errors import (
    CorruptObject,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    UsageError,
)
from storage_server import client as replicated
from storage_server.client import ReplicatedStorage, read_order
from tests.servers import free_port, wait_until
from tests.storage_servers import MIB, VOLUMES, StorageServer, key_of, needles

pytestmark = pytest.mark.timeout(90)

TOKEN = "replicated-test-token"
# vid -> the indexes of its two servers
LAYOUT: tuple[tuple[int, ...], ...] = ((0, 1), (1, 2), (2, 0), (0, 1))
NEEDLE_HEADER = 56  # storage_server/FORMAT.md: the data starts after the 56-byte header


def start_cluster(tmp_path: Path, storage_servers: list[StorageServer],
                  token: str | None = TOKEN) -> list[StorageServer]:
    """Three servers started in parallel (the fixture kills them at the end)."""
    servers = [StorageServer(tmp_path / f"s{i}", token=token) for i in range(3)]
    storage_servers.extend(servers)
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(StorageServer.start, servers))
    return servers


def replica(servers: Sequence[StorageServer], i: int, state: str = "up") -> ReplicaInfo:
    return ReplicaInfo(f"s{i}", servers[i].address, state)


def placement_of(servers: Sequence[StorageServer], min_replicas: int = 2, epoch: int = 1,
                 states: dict[int, str] | None = None,
                 layout: tuple[tuple[int, ...], ...] = LAYOUT) -> Placement:
    """LAYOUT's placement; `states` gives some servers another state than "up"."""
    states = states or {}
    return Placement(epoch=epoch, volumes=VOLUMES, replicas=2, min_replicas=min_replicas,
                     vids=tuple(tuple(replica(servers, i, states.get(i, "up")) for i in vid)
                                for vid in layout))


def vid_of(key: bytes) -> int:
    return int.from_bytes(key, "big") % VOLUMES


def server_at(servers: Sequence[StorageServer], address: str) -> StorageServer:
    return next(s for s in servers if s.address == address)


def keys_on(server: StorageServer, vid: int) -> list[bytes]:
    with server.client() as client:
        return [key for page in client.iter_keys(vid) for key in page]


def random_needles(count: int, size: int) -> dict[bytes, bytes]:
    out = {}
    for _ in range(count):
        data = os.urandom(size)
        out[key_of(data)] = data
    return out


def per_vid(stored: dict[bytes, bytes]) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {vid: [] for vid in range(VOLUMES)}
    for key in stored:
        out[vid_of(key)].append(key)
    return out


# -- pure parts --------------------------------------------------------------------------------


def test_read_order_prefers_up_spreads_and_never_reads_dead() -> None:
    up1, up2 = ReplicaInfo("a", "h:1", "up"), ReplicaInfo("b", "h:2", "up")
    lagging, down, dead = (ReplicaInfo("c", "h:3", "lagging"), ReplicaInfo("d", "h:4", "down"),
                           ReplicaInfo("e", "h:5", "dead"))
    keys = [key_of(b"%d" % i) for i in range(400)]
    firsts = [read_order([dead, down, lagging, up1, up2], key)[0] for key in keys]
    assert 120 < firsts.count(up1) < 280 and firsts.count(up1) + firsts.count(up2) == 400
    order = read_order([dead, down, lagging, up1, up2], keys[0])
    assert order[2:] == [lagging, down] and dead not in order
    assert read_order([down, up1], keys[0]) == [up1, down]
    assert read_order([dead], keys[0]) == []
    assert read_order([up1, up2], keys[0]) == read_order([up1, up2], keys[0])  # stable
    assert write_targets([up1, lagging, down, dead]) == [up1, lagging]


def test_placement_checks_and_required_acks() -> None:
    a, b = ReplicaInfo("a", "h:1", "up"), ReplicaInfo("b", "h:2", "down")
    with pytest.raises(UsageError, match="state"):
        ReplicaInfo("x", "h:1", "gone")
    with pytest.raises(UsageError, match="2 replica sets for 3 volumes"):
        Placement(1, 3, 2, 1, ((a, b), (a, b)))
    with pytest.raises(UsageError, match="twice"):
        Placement(1, 1, 2, 1, ((a, a),))
    assert Placement(1, 1, 2, 0, ((a, b),)).required_acks(0) == 1  # all writable: only a
    assert Placement(1, 1, 2, 0, ((b,),)).required_acks(0) == 1  # never fewer than 1
    assert Placement(1, 1, 2, 2, ((a, b),)).required_acks(0) == 2
    assert Placement(1, 4, 2, 1, ()).vids == ()  # no placement yet is representable
    message = SimpleNamespace(epoch=7, volumes=2, replicas=1, min_replicas=1, placement=[
        SimpleNamespace(vid=1, replicas=[SimpleNamespace(id="b", address="h:2", state="up")]),
        SimpleNamespace(vid=0, replicas=[SimpleNamespace(id="a", address="h:1", state="up")]),
    ])
    parsed = Placement.from_message(message)
    assert parsed.epoch == 7 and [r[0].id for r in parsed.vids] == ["a", "b"]


# -- against real servers ------------------------------------------------------------------


def test_round_trip_and_every_needle_on_exactly_its_two_replicas(
        tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    servers = start_cluster(tmp_path, storage_servers)
    placement = placement_of(servers)
    stored = needles(200, size=2000) | random_needles(3, 3 * MIB)
    with ReplicatedStorage(lambda: placement, token=TOKEN, timeout=20, workers=8) as store:
        store.put_many(list(stored.items()))
        store.put_many(list(stored.items()))  # idempotent
        for key, data in stored.items():
            assert store.get(key) == data
        big_key = next(k for k, d in stored.items() if len(d) == 3 * MIB)
        assert store.get(big_key, 1000, 5000) == stored[big_key][1000:6000]
        assert store.get(big_key, 3 * MIB + 10) == b""
        absent = key_of(b"never stored")
        assert store.has_many([*stored, absent]) == [True] * len(stored) + [False]
        assert list(store.iter_keys()) == sorted(stored)
        reads = store.counters()["reads"]
        assert set(reads) == {s.address for s in servers}  # reads spread over every server
        assert sum(reads.values()) == len(stored) + 2

        # Each needle is on exactly the two replicas of its vid, as each server itself says.
        expected = per_vid(stored)
        for i, server in enumerate(servers):
            for vid in range(VOLUMES):
                want = sorted(expected[vid]) if i in LAYOUT[vid] else []
                assert keys_on(server, vid) == want, (i, vid)

        with pytest.raises(ObjectNotFound):
            store.get(absent)
        with pytest.raises(UsageError, match="key"):
            store.get(b"short")

        key = next(iter(stored))
        assert store.delete(key) is True
        assert store.delete(key) is False
        with pytest.raises(ObjectNotFound):
            store.get(key)
        assert store.has_many([key]) == [False]
        assert key not in set(store.iter_keys())
        for i in LAYOUT[vid_of(key)]:
            with servers[i].client() as client, pytest.raises(ObjectNotFound):
                client.get(key)
        stat = store.stat()
        assert stat["epoch"] == 1 and set(stat["servers"]) == {s.address for s in servers}
    store.close()  # a second close is harmless
    with pytest.raises(RemoteError, match="closed"):
        store.get(big_key)

    # A wrong or missing token is refused on every operation.
    for token in ("wrong-token", None):
        with ReplicatedStorage(lambda: placement, token=token, timeout=10) as bad:
            with pytest.raises(PermissionDenied):
                bad.get(big_key)
            with pytest.raises(PermissionDenied):
                bad.put_many([(key_of(b"x"), b"x")])
            with pytest.raises(PermissionDenied):
                bad.has_many(list(stored))
            with pytest.raises(PermissionDenied):
                list(bad.iter_keys())
            with pytest.raises(PermissionDenied):
                bad.delete(big_key)
    with servers[0].client() as client:
        assert not client.has_many([key_of(b"x")])[0]


def test_kill_9_one_server_reads_fall_back_and_writes_follow_min_replicas(
        tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    servers = start_cluster(tmp_path, storage_servers)
    victim = servers[1]  # replica of vids 0, 1 and 3; vid 2 lives on servers 2 and 0
    stored = needles(120, size=1500, tag=b"before")
    quorum = placement_of(servers, min_replicas=2)
    one = placement_of(servers, min_replicas=1)
    with (ReplicatedStorage(lambda: quorum, token=TOKEN, timeout=10) as store,
          ReplicatedStorage(lambda: one, token=TOKEN, timeout=10) as store_one):
        store.put_many(list(stored.items()))
        victim.kill()

        for key, data in stored.items():
            assert store.get(key) == data
        assert store.counters()["fallbacks"] > 0
        assert victim.address not in store.counters()["reads"]
        assert set(store.has_many(list(stored))) == {True}
        assert list(store.iter_keys()) == sorted(stored)

        during = needles(60, size=800, tag=b"during")
        store_one.put_many(list(during.items()))  # one replica per vid is enough
        for key, data in during.items():
            assert store_one.get(key) == data

        refused = needles(60, size=800, tag=b"refused")
        with pytest.raises(RemoteError) as err:
            store.put_many(list(refused.items()))
        message = str(err.value)
        for vid in (0, 1, 3):
            assert f"volume {vid} " in message
        assert "1 of 2 required replicas acknowledged" in message
        assert victim.address in message and "volume 2 " not in message
        vid2 = [k for k in refused if vid_of(k) == 2]
        with servers[2].client() as c2, servers[0].client() as c0:
            assert c2.has_many(vid2) == c0.has_many(vid2) == [True] * len(vid2)

        victim.start()  # same port, same data
        first_on_victim = [k for k in stored if vid_of(k) != 2
                           and read_order(quorum.replicas_of(vid_of(k)), k)[0].address
                           == victim.address]
        assert first_on_victim

        def victim_serves() -> bool:
            store.get(first_on_victim[0])
            return store.counters()["reads"].get(victim.address, 0) > 0

        wait_until(victim_serves, 30, "reads from the restarted server")
        for key in first_on_victim:
            assert store.get(key) == stored[key]
        # What it missed while down is still read (it answers not found; the other has it).
        missed = [k for k in during if vid_of(k) != 2
                  and read_order(quorum.replicas_of(vid_of(k)), k)[0].address
                  == victim.address]
        for key in missed:
            assert store.get(key) == during[key]
        store.put_many(list(refused.items()))  # both replicas take writes again


def test_corrupt_replica_is_skipped_and_counted(
        tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    servers = start_cluster(tmp_path, storage_servers)
    placement = placement_of(servers)
    data = os.urandom(256 * 1024)
    key = key_of(data)
    vid = vid_of(key)
    first, second = read_order(placement.replicas_of(vid), key)
    with ReplicatedStorage(lambda: placement, token=TOKEN, timeout=10) as store:
        store.put_many([(key, data)])
        volume_dir = server_at(servers, first.address).data_dir / "volumes" / f"{vid:04x}"
        segments = [p for p in volume_dir.glob("*.seg") if p.stat().st_size >= len(data)]
        assert len(segments) == 1, segments
        with open(segments[0], "r+b") as f:  # the volume holds this needle only
            f.seek(NEEDLE_HEADER + len(data) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))

        assert store.get(key) == data
        counters = store.counters()
        assert (counters["corrupt"], counters["fallbacks"]) == (1, 1)
        assert counters["reads"] == {second.address: 1}
        assert store.get(key, 10, 100) == data[10:110]  # ranged reads fall back too

        # Bytes that pass the server's checksum but not their name are caught here.
        good = os.urandom(4096)
        good_key = key_of(good)
        good_first, good_second = read_order(placement.replicas_of(vid_of(good_key)), good_key)
        with server_at(servers, good_first.address).client() as client:
            client.put_many([(good_key, b"not the right bytes")])
        with server_at(servers, good_second.address).client() as client:
            client.put_many([(good_key, good)])
        before = store.counters()["corrupt"]
        assert store.get(good_key) == good
        assert store.counters()["corrupt"] == before + 1

        # Only corrupt copies: CorruptObject, naming the object.
        bad_key = key_of(b"what the name promises")
        for i in LAYOUT[vid_of(bad_key)]:
            with servers[i].client() as client:
                client.put_many([(bad_key, b"something else")])
        with pytest.raises(CorruptObject) as err:
            store.get(bad_key)
        assert err.value.object_name == bad_key.hex()


def test_placement_refresh_picks_up_a_replaced_replica_set(
        tmp_path: Path, storage_servers: list[StorageServer],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replicated, "REFRESH_INTERVAL", 2.0)  # wide enough for a busy machine
    servers = start_cluster(tmp_path, storage_servers)
    right = placement_of(servers, epoch=2)
    stored = needles(40, size=500, tag=b"refresh")
    with ReplicatedStorage(lambda: right, token=TOKEN, timeout=10) as store:
        store.put_many(list(stored.items()))
    key = next(iter(stored))
    vid = vid_of(key)
    outsider = next(i for i in range(3) if i not in LAYOUT[vid])  # holds nothing of vid
    nowhere = ReplicaInfo("gone", f"127.0.0.1:{free_port()}", "up")
    wrong_vids = list(right.vids)
    wrong_vids[vid] = (replica(servers, outsider), nowhere)
    wrong = Placement(1, VOLUMES, 2, 2, tuple(wrong_vids))

    calls: list[int] = []

    def source(answers: Sequence[Placement]) -> Placement:
        calls.append(1)
        return answers[min(len(calls), len(answers)) - 1]

    # A read: not found on the outsider, nothing at the unused port; one refresh fixes it.
    with ReplicatedStorage(lambda: source([wrong, right]), token=TOKEN, timeout=10) as store:
        assert store.get(key) == stored[key]
        assert len(calls) == 2 and store.counters()["refreshes"] == 1
        assert store.get(key) == stored[key] and len(calls) == 2  # cached from now on

    # A write: only the outsider acknowledges (1 of 2); after the refresh the right replicas do.
    calls.clear()
    fresh = next((k, d) for k, d in needles(40, size=300, tag=b"w").items() if vid_of(k) == vid)
    with ReplicatedStorage(lambda: source([wrong, right]), token=TOKEN, timeout=10) as store:
        store.put_many([fresh])
        assert len(calls) == 2
    for i in LAYOUT[vid]:
        with servers[i].client() as client:
            assert client.get(fresh[0]) == fresh[1]

    # A source that keeps answering wrong: one refresh per failure, at most every interval.
    calls.clear()
    with ReplicatedStorage(lambda: source([wrong]), token=TOKEN, timeout=10) as store:
        with pytest.raises(ObjectNotFound, match="not stored"):
            store.get(key)
        assert len(calls) == 2
        with pytest.raises(ObjectNotFound):
            store.get(key)
        assert len(calls) == 2  # throttled

        def refreshed_again() -> bool:
            with pytest.raises(ObjectNotFound):
                store.get(key)
            return len(calls) == 3

        wait_until(refreshed_again, 10, "a second refresh")
        assert store.has_many([key]) == [False]  # the outsider answered: absent

    # No placement yet (fewer than N servers registered).
    empty = Placement(0, VOLUMES, 2, 2, ())
    with ReplicatedStorage(lambda: empty, token=TOKEN) as store, \
            pytest.raises(RemoteError, match="no placement yet"):
        store.get(key)


def test_replica_states_down_skipped_dead_ignored(
        tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    servers = start_cluster(tmp_path, storage_servers)
    # Server 1 is "down" (still running: the skip is by state), server 2 "dead".
    placement = placement_of(servers, min_replicas=0, states={1: "down", 2: "dead"})
    stored = needles(80, size=700, tag=b"states")
    with ReplicatedStorage(lambda: placement, token=TOKEN, timeout=10) as store:
        expected = per_vid(stored)
        writable = [(k, d) for k, d in stored.items() if vid_of(k) != 1]
        store.put_many(writable)  # min 0: every writable replica, here server 0
        for vid in range(VOLUMES):
            assert keys_on(servers[0], vid) == (sorted(expected[vid]) if vid != 1 else [])
            assert keys_on(servers[1], vid) == []
            assert keys_on(servers[2], vid) == []
        # vid 1 (servers 1 and 2) has no writable replica at all.
        assert expected[1]
        with pytest.raises(RemoteError, match=r"volume 1 .*skipped: down"):
            store.put_many([(k, stored[k]) for k in expected[1]])
        for vid in (0, 2, 3):
            for key in expected[vid]:
                assert store.get(key) == stored[key]  # down server 1 says not found: fallback
        # A down replica is still read, last; a dead one never.
        with servers[1].client() as client:
            client.put_many([(k, stored[k]) for k in expected[1]])
        for key in expected[1]:
            assert store.get(key) == stored[key]
        assert servers[2].address not in store.counters()["reads"]
        assert store.delete(expected[0][0]) is True
        with servers[0].client() as client, pytest.raises(ObjectNotFound):
            client.get(expected[0][0])
