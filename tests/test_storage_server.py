"""The storage server over real gRPC: real `cachefs storage serve` processes on 127.0.0.1.

Put/get/has/delete/list/stat through `StorageClient`; kill -9 during a stream of writes and a
restart (every acknowledged needle intact); the token (refused, accepted; no token means
loopback only); malformed and oversized requests refused with nothing stored; repair between
two servers; the admin commands (stat, compact, verify --json; verify exits 6 on a flipped
byte).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from cachefs.errors import ObjectNotFound, PermissionDenied, RemoteError, UsageError
from storage_server.proto import storage_pb2 as pb
from storage_server.proto import storage_pb2_grpc as pb_grpc
from storage_server.repair import repair_volume
from tests.helpers import run_cli
from tests.servers import free_port
from tests.storage_servers import (
    MIB,
    VOLUMES,
    StorageServer,
    flip_a_byte_of_the_segment,
    key_of,
    needles,
)


@pytest.fixture
def server(tmp_path: Path, storage_servers: list[StorageServer]) -> StorageServer:
    started = StorageServer(tmp_path / "data").start()
    storage_servers.append(started)
    return started


def raw_stub(server: StorageServer) -> tuple[grpc.Channel, pb_grpc.StorageStub]:
    """A bare stub without client-side limits, to send what StorageClient would not."""
    channel = grpc.insecure_channel(server.address, options=[
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    return channel, pb_grpc.StorageStub(channel)


# -- the API over real gRPC ----------------------------------------------------------------


def test_put_get_has_delete(server: StorageServer) -> None:
    stored = needles(40, size=3000)
    with server.client() as client:
        written = client.put_many(list(stored.items()))
        assert written >= sum(len(d) for d in stored.values())
        assert client.put_many(list(stored.items())) == 0  # idempotent: nothing new
        for key, data in stored.items():
            assert client.get(key) == data
        key, data = next(iter(stored.items()))
        assert client.get(key, 10, 100) == data[10:110]
        assert client.get(key, 100) == data[100:]
        assert client.get(key, 5, 0) == b""
        assert client.get(key, 0, len(data) + 1000) == data  # a length past the end is cut

        absent = key_of(b"never stored")
        assert client.has_many([*stored, absent]) == [True] * len(stored) + [False]
        with pytest.raises(ObjectNotFound):
            client.get(absent)

        assert client.delete(key) is True
        assert client.delete(key) is False
        assert client.has_many([key]) == [False]
        with pytest.raises(ObjectNotFound):
            client.get(key)
        others = [k for k in stored if k != key]
        assert all(client.has_many(others))


def test_big_needle_and_batch_split(server: StorageServer) -> None:
    big = os.urandom(20 * MIB)
    small = needles(5, size=100_000, tag=b"s")
    items = [(key_of(big), big), *small.items(), (key_of(big[::-1]), big[::-1]),
             (key_of(big[:MIB * 19]), big[:MIB * 19]), (key_of(big[1:]), big[1:])]
    with server.client() as client:
        client.put_many(items)  # ~80 MiB: goes as more than one call
        for key, data in items:
            assert client.get(key) == data
        assert client.get(key_of(big), 7 * MIB, MIB) == big[7 * MIB:8 * MIB]


def test_list_keys_pages_cover_every_volume_once(server: StorageServer) -> None:
    stored = needles(250, size=200)
    with server.client() as client:
        client.put_many(list(stored.items()))
        seen: list[bytes] = []
        for vid in range(VOLUMES):
            pages = list(client.iter_keys(vid, page=7))
            assert all(len(p) <= 7 for p in pages)
            seen += [k for p in pages for k in p]
        assert sorted(seen) == sorted(stored)  # every key exactly once

        keys, more = client.list_keys(0, limit=3)
        assert len(keys) == 3 and more
        rest, _ = client.list_keys(0, start_after=keys[-1], limit=10_000)
        assert not set(keys) & set(rest)
        with pytest.raises(UsageError, match="vid"):
            client.list_keys(VOLUMES)
        with pytest.raises(UsageError, match="limit"):
            client.list_keys(0, limit=10_001)
        with pytest.raises(UsageError, match="start_after"):
            client.list_keys(0, start_after=b"short")


def test_stat_and_admin_commands(server: StorageServer) -> None:
    stored = needles(30, size=5000)
    with server.client() as client:
        client.put_many(list(stored.items()))
        client.delete(next(iter(stored)))
        doc = client.stat()
    assert doc["volumes"] == VOLUMES
    assert doc["totals"]["live"] == len(stored) - 1
    assert doc["totals"]["deleted"] == 1
    assert len(doc["per_volume"]) == VOLUMES
    assert doc["free_bytes"] > 0
    assert doc["corrupt_reads"] == 0
    assert doc["recovered"]["bytes_truncated"] == 0

    # The typed fields of StatResponse agree with the document.
    channel, stub = raw_stub(server)
    with channel:
        typed = stub.Stat(pb.StatRequest(), timeout=30)
    assert (typed.volumes, typed.needles, typed.corrupt_reads) == (VOLUMES, len(stored) - 1, 0)
    assert typed.bytes == doc["totals"]["bytes"] > 0 and typed.free_bytes > 0

    stat = json.loads(run_cli("storage", "stat", server.address, "--json").stdout)
    assert stat["volumes"] == VOLUMES and stat["totals"]["live"] == len(stored) - 1
    text = run_cli("storage", "stat", server.address).stdout
    assert f"{VOLUMES} volumes" in text and f"{len(stored) - 1} needles" in text

    compacted = json.loads(run_cli("storage", "compact", server.address, "--json").stdout)
    assert len(compacted["volumes"]) == VOLUMES and compacted["corrupt"] == []
    assert compacted["reclaimed"] > 0  # the deleted needle's space
    one = json.loads(run_cli("storage", "compact", server.address, "--vid", "1",
                             "--json").stdout)
    assert [v["vid"] for v in one["volumes"]] == [1]
    assert "reclaimed" in run_cli("storage", "compact", server.address).stdout

    verified = json.loads(run_cli("storage", "verify", server.address, "--json").stdout)
    assert verified["checked"] == len(stored) - 1 and verified["corrupt"] == []
    assert "0 corrupt" in run_cli("storage", "verify", server.address).stdout
    with server.client() as client:
        for key, data in list(stored.items())[1:]:
            assert client.get(key) == data  # compaction kept every live needle

    bad = run_cli("storage", "compact", server.address, "--vid", str(VOLUMES), check=False)
    assert bad.returncode == 2 and "vid" in bad.stderr


def test_verify_exits_6_after_a_flipped_byte(server: StorageServer) -> None:
    data = os.urandom(256 * 1024)
    with server.client() as client:
        client.put_many([(key_of(data), data)])
    flip_a_byte_of_the_segment(server, len(data))
    result = run_cli("storage", "verify", server.address, "--json", check=False)
    assert result.returncode == 6, result.stderr
    assert json.loads(result.stdout)["corrupt"] == [key_of(data).hex()]
    with server.client() as client, pytest.raises(Exception) as err:
        client.get(key_of(data))
    assert type(err.value).__name__ == "CorruptObject"


# -- crash safety ----------------------------------------------------------------------------


def test_kill_9_during_writes_keeps_every_acknowledged_needle(
        tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    first = StorageServer(tmp_path / "data").start()
    storage_servers.append(first)
    acked: dict[bytes, bytes] = {}
    in_flight: dict[bytes, bytes] = {}
    done = threading.Condition()
    failure: list[BaseException] = []

    def writer() -> None:
        with first.client(timeout=10) as client:
            for batch_no in range(100_000):
                batch = needles(8, size=20_000, tag=b"b%d-" % batch_no)
                in_flight.clear()
                in_flight.update(batch)
                try:
                    client.put_many(list(batch.items()))
                except RemoteError as e:  # the server died under this call
                    failure.append(e)
                    break
                with done:
                    acked.update(batch)
                    in_flight.clear()
                    done.notify_all()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    with done:
        assert done.wait_for(lambda: len(acked) >= 40 * 8, timeout=60), "no writes acked"
    first.proc.send_signal(signal.SIGKILL)  # mid-stream: the writer keeps putting
    first.proc.wait(10)
    thread.join(30)
    assert not thread.is_alive() and failure, "the writer did not see the server die"

    # A torn tail for certain, whatever the kill cut: half a needle's worth of garbage at the
    # end of volume 0's last segment.
    last = sorted((tmp_path / "data" / "volumes" / "0000").glob("*.seg"))[-1]
    with open(last, "ab") as f:
        f.write(os.urandom(333))

    second = StorageServer(tmp_path / "data").start()
    storage_servers.append(second)
    with second.client() as client:
        for key, data in acked.items():
            assert client.get(key) == data
        for key, data in in_flight.items():  # unacknowledged: absent or whole, never torn
            with contextlib.suppress(ObjectNotFound):
                assert client.get(key) == data
        stat = client.stat()
        assert stat["totals"]["live"] >= len(acked)
        recovered = stat["recovered"]
        assert recovered["bytes_truncated"] >= 333, recovered
        assert any(cut["vid"] == 0 and cut["segment"] == int(last.stem, 16)
                   for cut in recovered["truncated"]), recovered
        assert client.verify()["corrupt"] == []
    output = second.output()
    assert "truncated a torn tail" in output and "serving on" in output


def test_sigterm_stops_cleanly(server: StorageServer) -> None:
    stored = needles(5)
    with server.client() as client:
        client.put_many(list(stored.items()))
    assert server.stop() == 0
    assert "stopped" in server.output()


# -- security ----------------------------------------------------------------------------------


def test_token_refused_and_accepted(tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    server = StorageServer(tmp_path / "data", token="s3cret-token").start()
    storage_servers.append(server)
    stored = needles(3)
    for token in (None, "wrong"):
        with server.client(token=token) as client:
            with pytest.raises(PermissionDenied, match="UNAUTHENTICATED"):
                client.put_many(list(stored.items()))
            with pytest.raises(PermissionDenied, match="token"):
                client.stat()
    with server.client() as client:
        assert client.has_many(list(stored)) == [False] * 3  # nothing the refused put sent
        client.put_many(list(stored.items()))
        assert client.has_many(list(stored)) == [True] * 3

    refused = run_cli("storage", "stat", server.address, check=False,
                      env={"CACHEFS_TOKEN": "wrong"})
    assert refused.returncode == 9 and "token" in refused.stderr
    accepted = run_cli("storage", "stat", server.address, "--json",
                       env={"CACHEFS_TOKEN": "s3cret-token"})
    assert json.loads(accepted.stdout)["totals"]["live"] == 3


def test_no_token_means_loopback_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "open"
    env = {k: v for k, v in os.environ.items() if k != "CACHEFS_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "cachefs.cli.main", "storage", "serve", "--data-dir",
         str(data_dir), "--listen", f"0.0.0.0:{free_port()}"],
        capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert "loopback" in result.stderr and "token" in result.stderr
    assert not data_dir.exists()  # refused before anything was created


def test_server_without_token_says_so(server: StorageServer) -> None:
    assert "without authentication" in server.output()


def test_index_cache_option(tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    started = StorageServer(tmp_path / "nocache", extra=("--index-cache", "0")).start()
    storage_servers.append(started)
    items = needles(5)
    with started.client() as client:
        client.put_many(list(items.items()))
        for key, data in items.items():
            assert client.get(key) == data
        assert client.stat()["index_cache"] == {"entries": 0, "capacity": 0}
    result = subprocess.run(
        [sys.executable, "-m", "cachefs.cli.main", "storage", "serve", "--data-dir",
         str(tmp_path / "bad"), "--listen", f"127.0.0.1:{free_port()}", "--index-cache", "-1"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--index-cache -1" in result.stderr


# -- malformed requests ------------------------------------------------------------------------


def test_malformed_requests_change_nothing(server: StorageServer) -> None:
    good = needles(2)
    (k1, d1), (k2, d2) = good.items()
    channel, stub = raw_stub(server)
    with channel:
        def refused(method: str, request: object, code: grpc.StatusCode, field: str) -> None:
            with pytest.raises(grpc.RpcError) as err:
                getattr(stub, method)(request, timeout=60)
            assert err.value.code() == code, err.value.details()
            assert field in (err.value.details() or ""), err.value.details()

        bad_key = pb.PutRequest(needles=[pb.Needle(key=k1, data=d1),
                                         pb.Needle(key=k2[:31], data=d2)])
        refused("Put", bad_key, grpc.StatusCode.INVALID_ARGUMENT, "needles[1].key")
        huge = bytes(64 * MIB + 1)
        oversized = pb.PutRequest(needles=[pb.Needle(key=k1, data=d1),
                                           pb.Needle(key=key_of(huge), data=huge)])
        refused("Put", oversized, grpc.StatusCode.INVALID_ARGUMENT, "needles[1].data")
        over_limit = pb.PutRequest(needles=[pb.Needle(key=k1, data=d1)] + [
            pb.Needle(key=key_of(b"%d" % i), data=bytes(41 * MIB)) for i in range(2)])
        refused("Put", over_limit, grpc.StatusCode.RESOURCE_EXHAUSTED, "")
        put_bytes = channel.unary_unary("/cachefs.storage.v1.Storage/Put",
                                        request_serializer=None,
                                        response_deserializer=pb.PutResponse.FromString)
        torn = pb.PutRequest(needles=[pb.Needle(key=k1, data=d1)]).SerializeToString()[:-7]
        for garbage in (torn, b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x0b"):
            with pytest.raises(grpc.RpcError) as err:
                put_bytes(garbage, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert "malformed PutRequest" in (err.value.details() or "")
        refused("Get", pb.GetRequest(key=k1, offset=-1), grpc.StatusCode.INVALID_ARGUMENT,
                "offset")
        refused("Get", pb.GetRequest(key=k1, length=-5, has_length=True),
                grpc.StatusCode.INVALID_ARGUMENT, "length")
        refused("Get", pb.GetRequest(key=b"x" * 33), grpc.StatusCode.INVALID_ARGUMENT, "key")
        refused("Has", pb.HasRequest(keys=[k1, b""]), grpc.StatusCode.INVALID_ARGUMENT,
                "keys[1]")
        refused("Delete", pb.DeleteRequest(key=k1[:5]), grpc.StatusCode.INVALID_ARGUMENT, "key")
        refused("Verify", pb.VerifyRequest(vid=VOLUMES, has_vid=True),
                grpc.StatusCode.INVALID_ARGUMENT, "vid")
    with server.client() as client:
        assert client.has_many([k1, k2]) == [False, False]  # no refused call stored anything
        assert client.stat()["totals"]["needles"] == 0
        with pytest.raises(UsageError, match="key"):
            client.get(b"short")


# -- repair ------------------------------------------------------------------------------------


def test_repair_copies_only_the_missing(tmp_path: Path,
                                        storage_servers: list[StorageServer]) -> None:
    a = StorageServer(tmp_path / "a").start()
    b = StorageServer(tmp_path / "b").start()
    storage_servers += [a, b]
    both = needles(40, size=2000, tag=b"both")
    only_a = needles(60, size=3000, tag=b"a")
    with a.client() as ca, b.client() as cb:
        ca.put_many([*both.items(), *only_a.items()])
        cb.put_many(list(both.items()))
        reports = [repair_volume(ca, cb, vid, page=9) for vid in range(VOLUMES)]
        assert sum(r.checked for r in reports) == 100
        assert sum(r.missing for r in reports) == 60
        assert sum(r.copied for r in reports) == 60
        assert sum(r.bytes_copied for r in reports) == sum(len(d) for d in only_a.values())
        assert all(cb.has_many([*both, *only_a]))
        for key, data in only_a.items():
            assert cb.get(key) == data
        again = [repair_volume(ca, cb, vid) for vid in range(VOLUMES)]
        assert sum(r.copied for r in again) == 0
        assert cb.stat()["totals"]["live"] == 100
