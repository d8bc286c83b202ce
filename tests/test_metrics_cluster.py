"""Prometheus metrics of the raft master and the storage server, scraped from real daemons.

Real `cachefs master serve` and `cachefs storage serve` processes with --metrics-listen on
127.0.0.1, driven through the real clients; each /metrics is read with urllib and parsed with
prometheus_client's own parser. Checked: a 3-master group has exactly one leader, one term and
one leader id; RPCs are counted by method and code (a wrong or missing token as
UNAUTHENTICATED), directory compare-and-swaps by result; a storage server's needles, bytes and
garbage follow writes and deletes, a durable write is in the fsync histogram, repeated reads are
memory-cache hits; a repair between two storage servers of a cluster shows in the repairing
server's counters. Every family has help text; other paths answer 404; an address that is
malformed or taken stops the daemon with a usage error.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachefs.errors import ObjectNotFound, PermissionDenied, UsageError
from master.client import DirEntry, MasterClient
from storage_server.client import StorageClient
from storage_server.needle import needle_size
from tests.helpers import run_cli
from tests.masters import MasterProcess, start_group, wait_leader
from tests.servers import free_port, wait_until
from tests.storage_servers import StorageServer, needles

TOKEN = "metrics-cluster-token"
SCRAPE_TIMEOUT_S = 10.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scrape:
    """One /metrics answer: its samples by (name, labels), and its families' help and type."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        self.samples: Samples = {}
        self.families: dict[str, tuple[str, str]] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = (family.type, family.documentation)
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        """A sample's value (0 when absent: a labelled counter not incremented yet)."""
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def labelled(self, name: str, label: str) -> dict[str, float]:
        """label value -> value of every sample of `name`."""
        return {dict(labels)[label]: value for (n, labels), value in self.samples.items()
                if n == name}


def scrape(url: str | None) -> Scrape:
    assert url is not None
    return Scrape(url)


def check_endpoint(url: str | None, prefix: str) -> None:
    """Every family is ours and has help text; another path answers 404."""
    got = scrape(url)
    assert got.families
    for name, (kind, documentation) in got.families.items():
        assert name.startswith(prefix), name
        # real sentences, not StatsCollector's fallback (the name in words)
        assert documentation.strip(), name
        assert documentation != name.removeprefix(prefix).replace("_", " "), name
        assert kind in ("counter", "gauge", "histogram"), (name, kind)
    assert url is not None
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url.removesuffix("/metrics") + "/other",
                               timeout=SCRAPE_TIMEOUT_S)
    assert caught.value.code == 404
    caught.value.close()


def delta(before: Scrape, after: Scrape) -> Callable[..., float]:
    return lambda name, **labels: after(name, **labels) - before(name, **labels)


# -- the master group -----------------------------------------------------------------------


def test_master_group_raft_directory_and_rpcs(tmp_path: Path,
                                             masters: list[MasterProcess]) -> None:
    members = start_group(tmp_path, 3, masters, token=TOKEN, metrics=True)
    leader = wait_leader(members)

    def one_leader_everywhere() -> bool:
        scrapes = [scrape(m.metrics_url) for m in members]
        return (sum(s("cachefs_master_raft_is_leader") for s in scrapes) == 1
                and all(s.labelled("cachefs_master_raft_leader_info", "leader_id")
                        == {leader.id: 1} for s in scrapes)
                and all(s("cachefs_master_raft_members_connected") == 3
                        and s("cachefs_master_volumes") == 64  # the first leader's --volumes
                        for s in scrapes))

    wait_until(one_leader_everywhere, 20, "every member to know the one leader", interval=0.1)
    scrapes = {m.id: scrape(m.metrics_url) for m in members}
    assert scrapes[leader.id]("cachefs_master_raft_is_leader") == 1
    terms = {s("cachefs_master_raft_term") for s in scrapes.values()}
    assert len(terms) == 1 and terms.pop() >= 1
    for s in scrapes.values():
        assert s("cachefs_master_raft_members") == 3
        assert s("cachefs_master_raft_has_quorum") == 1
        assert s("cachefs_master_raft_commit_index") >= 1
        assert s("cachefs_master_raft_log_entries") >= 1
        assert s("cachefs_master_raft_journal_bytes") > 0

    # compare-and-swaps and a plain put through a follower (raft forwards the writes)
    follower = next(m for m in members if m.id != leader.id)
    before = scrape(follower.metrics_url)
    with follower.client() as client:
        assert client.dir_put(DirEntry("refs/main", inline=b"v1"), if_absent=True)
        assert not client.dir_put(DirEntry("refs/main", inline=b"v2"), if_absent=True)
        assert client.dir_put(DirEntry("data/chunk", inline=b"x"))
        entry = client.dir_get("refs/main")
        assert entry is not None and entry.inline == b"v1"
    for token in ("wrong", None):
        with MasterClient([follower.address], token, timeout=10) as stranger, \
                pytest.raises(PermissionDenied):
            stranger.dir_get("refs/main")
    after = scrape(follower.metrics_url)
    moved = delta(before, after)
    assert moved("cachefs_master_rpcs_total", method="DirPut", code="OK") == 3
    assert moved("cachefs_master_rpcs_total", method="DirGet", code="OK") == 1
    assert moved("cachefs_master_rpcs_total", method="DirGet", code="UNAUTHENTICATED") == 2
    assert moved("cachefs_master_rpc_seconds_count", method="DirPut", code="OK") == 3
    assert moved("cachefs_master_rpc_seconds_count", method="DirGet",
                 code="UNAUTHENTICATED") == 2
    assert moved("cachefs_master_directory_conditional_puts_total", result="created") == 1
    assert moved("cachefs_master_directory_conditional_puts_total", result="refused") == 1
    assert moved("cachefs_master_raft_commit_index") >= 1
    assert after("cachefs_master_directory_entries") == 2
    # the others apply the same log
    wait_until(lambda: all(scrape(m.metrics_url)("cachefs_master_directory_entries") == 2
                           for m in members), 10, "every member to apply the puts",
               interval=0.1)
    for m in members:
        check_endpoint(m.metrics_url, "cachefs_master_")


# -- one storage server ---------------------------------------------------------------------


def test_storage_needles_bytes_fsyncs_cache_and_rpcs(
        tmp_path: Path, storage_servers: list[StorageServer]) -> None:
    server = StorageServer(tmp_path / "data", token=TOKEN, metrics=True,
                           extra=("--memory-cache", "4MiB"))
    storage_servers.append(server)
    server.start()
    before = scrape(server.metrics_url)
    stored = needles(20, size=2000)
    total = sum(len(d) for d in stored.values())
    with server.client() as client:
        assert client.put_many(list(stored.items())) == total
        for _ in range(2):
            for key, data in stored.items():
                assert client.get(key) == data
        assert client.has_many(list(stored)) == [True] * len(stored)
        with pytest.raises(ObjectNotFound):
            client.get(b"\1" * 32)
        with pytest.raises(UsageError):
            client.get(b"short key")
    for token in ("wrong", None):
        with server.client(token=token) as stranger, pytest.raises(PermissionDenied):
            stranger.stat()
    after = scrape(server.metrics_url)
    moved = delta(before, after)
    assert moved("cachefs_storage_rpcs_total", method="Put", code="OK") == 1
    assert moved("cachefs_storage_rpcs_total", method="Get", code="OK") == 2 * len(stored)
    assert moved("cachefs_storage_rpcs_total", method="Get", code="NOT_FOUND") == 1
    assert moved("cachefs_storage_rpcs_total", method="Get", code="INVALID_ARGUMENT") == 1
    assert moved("cachefs_storage_rpcs_total", method="Has", code="OK") == 1
    assert moved("cachefs_storage_rpcs_total", method="Stat", code="UNAUTHENTICATED") == 2
    assert moved("cachefs_storage_rpc_seconds_count", method="Get", code="OK") == 2 * len(stored)
    assert moved("cachefs_storage_rpc_seconds_count", method="Get", code="NOT_FOUND") == 1
    # what was stored, in total and per volume
    assert after("cachefs_storage_needles") == len(stored)
    on_disk = sum(needle_size(len(d)) for d in stored.values())
    assert after("cachefs_storage_live_bytes") == on_disk
    assert after("cachefs_storage_segment_bytes") == on_disk
    assert after("cachefs_storage_garbage_bytes") == 0
    assert sum(after.labelled("cachefs_storage_volume_needles", "volume").values()) \
        == len(stored)
    assert sum(after.labelled("cachefs_storage_volume_segment_bytes", "volume").values()) \
        == after("cachefs_storage_segment_bytes")
    assert len(after.labelled("cachefs_storage_volume_needles", "volume")) == server.volumes
    assert after("cachefs_storage_volumes") == server.volumes
    assert moved("cachefs_storage_written_bytes_total") == total
    assert moved("cachefs_storage_read_bytes_total") == 2 * total
    # the write was made durable by at least one group-commit fdatasync, timed
    assert moved("cachefs_storage_fsync_seconds_count") >= 1
    assert moved("cachefs_storage_group_commits_total") >= 1
    assert moved("cachefs_storage_committed_needles_total") == len(stored)
    # first reads from disk, admitted (the cache has room); second reads from memory
    assert moved("cachefs_storage_memory_cache_misses_total") == len(stored)
    assert moved("cachefs_storage_memory_cache_hits_total") == len(stored)
    assert moved("cachefs_storage_memory_cache_hit_bytes_total") == total
    assert after("cachefs_storage_memory_cache_entries") == len(stored)
    assert after("cachefs_storage_memory_cache_capacity_bytes") == 4 << 20
    assert 0 < after("cachefs_storage_memory_cache_used_bytes") <= 4 << 20
    assert moved("cachefs_storage_disk_reads_total") == len(stored)

    # a delete: one needle fewer, a tombstone; the needle and the tombstone are garbage
    gone, data = next(iter(stored.items()))
    with server.client() as client:
        assert client.delete(gone)
    deleted = scrape(server.metrics_url)
    assert deleted("cachefs_storage_needles") == len(stored) - 1
    assert deleted("cachefs_storage_deleted_needles") == 1
    assert deleted("cachefs_storage_live_bytes") == on_disk - needle_size(len(data))
    assert deleted("cachefs_storage_garbage_bytes") == needle_size(len(data)) + needle_size(0)
    check_endpoint(server.metrics_url, "cachefs_storage_")


# -- a cluster: repair ----------------------------------------------------------------------


def test_repair_progress_of_a_lagging_replica(tmp_path: Path, masters: list[MasterProcess],
                                              storage_servers: list[StorageServer]) -> None:
    (master,) = start_group(tmp_path, 1, masters, token=TOKEN, metrics=True,
                            extra=("--volumes", "2", "--replicas", "2"))
    servers = []
    for sid in ("s1", "s2"):
        server = StorageServer(tmp_path / sid, token=TOKEN, volumes=2, metrics=True, extra=(
            "--master", master.address, "--server-id", sid, "--heartbeat-interval", "0.2"))
        storage_servers.append(server)
        servers.append(server.start())
    source, target = servers

    def placed() -> bool:  # the master's metrics say when: both volumes on both servers
        got = scrape(master.metrics_url)
        return (got("cachefs_master_volumes") == 2
                and got("cachefs_master_storage_servers", state="up") == 2
                and got("cachefs_master_volumes_under_replicated") == 0)

    wait_until(placed, 20, "both volumes placed on both servers", interval=0.1)
    stored = needles(30, size=1500)
    with StorageClient(source.address, TOKEN) as client:  # one replica only: the other lags
        client.put_many(list(stored.items()))

    def repaired() -> bool:
        got = scrape(target.metrics_url)
        return (got("cachefs_storage_needles") == len(stored)
                and got("cachefs_storage_repairs_running") == 0
                and got("cachefs_storage_repairs_succeeded_total") >= 1)

    wait_until(repaired, 20, "the lagging replica to be repaired", interval=0.1)
    got = scrape(target.metrics_url)
    assert got("cachefs_storage_repair_copied_needles_total") == len(stored)
    assert got("cachefs_storage_repair_copied_bytes_total") \
        == sum(len(d) for d in stored.values())
    assert got("cachefs_storage_repairs_failed_total") == 0
    assert got("cachefs_storage_registered") == 1
    assert got("cachefs_storage_heartbeats_total") >= 1
    assert got("cachefs_storage_rpcs_total", method="Put", code="OK") >= 1  # its own writes
    # the source answered the repair's reads: one Get per missing needle
    assert scrape(source.metrics_url)("cachefs_storage_rpcs_total", method="Get",
                                      code="OK") == len(stored)
    assert scrape(source.metrics_url)("cachefs_storage_repair_copied_needles_total") == 0

    wait_until(lambda: scrape(master.metrics_url)("cachefs_master_volumes_lagging") == 0, 10,
               "the master to see the lag cleared", interval=0.1)
    seen = scrape(master.metrics_url)
    assert seen.labelled("cachefs_master_storage_servers", "state") == {
        "up": 2, "down": 0, "dead": 0, "unknown": 0}
    assert seen("cachefs_master_volumes") == 2
    assert seen("cachefs_master_volumes_under_replicated") == 0
    assert seen("cachefs_master_rpcs_total", method="RegisterStorage", code="OK") == 2
    assert seen("cachefs_master_rpcs_total", method="Heartbeat", code="OK") >= 2
    check_endpoint(target.metrics_url, "cachefs_storage_")


# -- refused addresses ----------------------------------------------------------------------


def test_a_bad_or_busy_metrics_address_is_refused(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        for address, why in (("nowhere", "expected HOST:PORT"), (taken, "cannot listen there")):
            for daemon in (["storage", "serve", "--data-dir", str(tmp_path / "data"),
                            "--listen", f"127.0.0.1:{free_port()}"],
                           ["master", "serve", "--id", "1", "--listen",
                            f"127.0.0.1:{free_port()}", "--raft", f"127.0.0.1:{free_port()}",
                            "--data-dir", str(tmp_path / "master")]):
                result = run_cli(*daemon, "--metrics-listen", address, check=False)
                assert result.returncode == UsageError.exit_code, result.stderr
                assert "--metrics-listen" in result.stderr and why in result.stderr
                assert "Traceback" not in result.stderr
