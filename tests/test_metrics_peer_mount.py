"""Prometheus metrics of the mount daemon and the peer server, scraped from real processes.

- a mount with --metrics: its figures as `cachefs_mount_*` counters and gauges that move as
  files are read, the old `cachefs_<key>` names still served as deprecated aliases with the same
  values, help text on every family, and every numeric figure of `cachefs stats` classified;
- a peer server with --metrics-listen serving two mounts (the first node's reads fetched from
  the origin on their behalf, the second's served from its cache): chunks and bytes served,
  origin fetches, refusals (a wrong token counted as UNAUTHENTICATED, an unserved remote, a
  drain), RPCs by method and code; the mounts export the quarantine figures.
"""

from __future__ import annotations

import os
import random
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachefs.dataset.repo import Repository
from cachefs.fuse.daemon import MOUNT_METRICS
from cachefs.fuse.mount import mount_stats
from cachefs.peer.client import PeerCallError
from cachefs.remotes.registry import open_remote_url
from tests.helpers import run_cli
from tests.mounting import MountSet
from tests.peers import PeerSet
from tests.servers import free_port

pytestmark = pytest.mark.timeout(120)

DATASET = "ds"
TOKEN = "s3cret"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Scrape:
    """One scrape of http://ADDR/metrics, parsed by prometheus_client's own parser."""

    def __init__(self, address: str) -> None:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
            assert response.status == 200
            text = response.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: Samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in self.families.values() for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        """The sample `name` with these labels (of those it has: every one must match)."""
        found = [v for (n, ls), v in self.samples.items()
                 if n == name and labels.items() <= dict(ls).items()]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
        return found[0]

    def has(self, name: str, **labels: str) -> bool:
        return any(n == name and labels.items() <= dict(ls).items() for n, ls in self.samples)


def make_files(root: Path) -> dict[str, bytes]:
    """30 small files (several to a chunk) and one of 600 KB (several chunks)."""
    rng = random.Random(11)
    files = {f"small/f{i:02d}.bin": rng.randbytes(rng.randrange(2_000, 30_000))
             for i in range(30)}
    files["big.bin"] = rng.randbytes(600_000)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def commit(tmp_path: Path, *remote: str) -> dict[str, bytes]:
    files = make_files(tmp_path / "src")
    run_cli("init", DATASET, "--chunk-size", "64KiB", *remote)
    run_cli("commit", DATASET, str(tmp_path / "src"), "-m", "v1", *remote)
    return files


def read_all(mountpoint: Path, files: dict[str, bytes]) -> None:
    for rel, data in sorted(files.items()):
        assert (mountpoint / rel).read_bytes() == data, rel


def new_name(key: str) -> str:
    for figure, name, counter, _ in MOUNT_METRICS:
        if figure == key:
            return f"cachefs_mount_{name}{'_total' if counter else ''}"
    raise KeyError(key)


def test_mount_metrics_new_names_and_deprecated_aliases(tmp_path: Path,
                                                        mounts: MountSet) -> None:
    files = commit(tmp_path)
    address = f"127.0.0.1:{free_port()}"
    point = mounts.mount(DATASET, mounts.mountpoint(), "--metrics", address,
                         "--cache-dir", str(tmp_path / "cache"), "--memory-cache", "64MiB")
    before = Scrape(address)
    read_all(point, files)
    after = Scrape(address)
    figures = mount_stats(str(point))

    size = sum(len(data) for data in files.values())
    labels = {"dataset": DATASET}
    reads = after.value("cachefs_mount_read_requests_total", **labels)
    assert reads > before.value("cachefs_mount_read_requests_total", **labels)
    assert after.value("cachefs_mount_read_bytes_total", **labels) >= size
    assert after.value("cachefs_mount_origin_requests_total", **labels) > \
        before.value("cachefs_mount_origin_requests_total", **labels)
    assert after.value("cachefs_mount_origin_bytes_total", **labels) > 0
    assert after.value("cachefs_mount_memory_bytes_used", **labels) > 0
    assert after.value("cachefs_mount_memory_capacity_bytes", **labels) > 0
    assert after.value("cachefs_mount_uptime_seconds", **labels) > 0
    commit_id = dict(next(ls for n, ls in after.samples
                          if n == "cachefs_mount_read_bytes_total"))["commit"]
    assert len(commit_id) == 64

    # Every numeric figure of `cachefs stats` has a new name, of the right type.
    numeric = {k for k, v in figures.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    classified = {key for key, _, _, _ in MOUNT_METRICS}
    assert numeric - classified == set(), "figures missing from MOUNT_METRICS"
    for key, name, counter, _ in MOUNT_METRICS:
        family = after.families.get(f"cachefs_mount_{name}")
        assert (family is not None) == (key in figures), name
        if family is None:
            continue
        assert family.type == ("counter" if counter else "gauge"), name

    # The old names, for one release: every numeric figure, a gauge with the same value
    # (in the same scrape) as its new name, labelled as before.
    for key in numeric:
        alias = after.families[f"cachefs_{key}"]
        assert alias.type == "gauge"
        assert "deprecated alias of " + new_name(key) in alias.documentation
        (sample,) = alias.samples
        assert set(sample.labels) == {"dataset", "commit"}
        assert sample.value == after.value(new_name(key), **sample.labels), key
    old_names = {name for name in after.families
                 if name.startswith("cachefs_") and not name.startswith("cachefs_mount_")}
    assert old_names == {f"cachefs_{key}" for key in numeric}

    for family in after.families.values():
        assert family.documentation.strip(), f"{family.name} has no help text"
        assert family.documentation != family.name.replace("_", " ")


def chunk_names(url: str) -> list[str]:
    """The chunks of the dataset's main version that the origin holds."""
    repo = Repository(open_remote_url(url))
    tree = repo.get_commit(repo.resolve(DATASET, "main").commit).tree
    return sorted({x.chunk for _, entry in repo.walk(tree) if not entry.is_dir
                   for x in entry.extents})


def test_peer_server_metrics_with_mounts_reading_through_it(
        tmp_path: Path, peer_servers: PeerSet, mounts: MountSet) -> None:
    url = "file://" + str(tmp_path / "repo")
    run_cli("remote", "add", "origin", url)
    files = commit(tmp_path, "--remote", "origin")
    metrics = f"127.0.0.1:{free_port()}"
    server = peer_servers.start("node", token=TOKEN,
                                extra=("--remotes", "origin", "--metrics-listen", metrics))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    start = Scrape(metrics)
    assert start.value("cachefs_peer_draining") == 0
    assert start.value("cachefs_peer_origin_fetches_total") == 0

    mount_metrics = []
    for node in ("a", "b"):  # b reads what a's reads brought into the server's cache
        mount_metrics.append(f"127.0.0.1:{free_port()}")
        point = mounts.mount(DATASET, mounts.mountpoint(f"mnt-{node}"), "--remote", "origin",
                             "--cache-dir", str(tmp_path / f"cache-{node}"),
                             "--cache-peers", server.address, "--token-file", str(token_file),
                             "--metrics", mount_metrics[-1])
        read_all(point, files)
        assert mount_stats(str(point))["peer_hits"] > 0

    got = Scrape(metrics)
    size = sum(len(data) for data in files.values())
    fetches = got.value("cachefs_peer_origin_fetches_total")
    assert fetches > 0
    assert got.value("cachefs_peer_chunks_served_from_origin_total") >= fetches
    assert got.value("cachefs_peer_chunks_served_from_cache_total") > 0
    assert got.value("cachefs_peer_origin_bytes_total") > 0
    assert got.value("cachefs_peer_served_bytes_total") >= size  # each node got it all
    served = (got.value("cachefs_peer_chunks_served_from_origin_total")
              + got.value("cachefs_peer_chunks_served_from_cache_total"))
    # A mount asks a member for a chunk from its cache only first: one not cached yet is
    # NOT_FOUND there, then asked again, to be fetched from the origin.
    not_found = got.value("cachefs_peer_chunks_not_found_total")
    assert not_found >= fetches
    assert got.value("cachefs_peer_get_chunk_requests_total") == served + not_found
    assert got.value("cachefs_peer_rpcs_total", method="GetChunk", code="OK") == served
    assert got.value("cachefs_peer_rpcs_total", method="GetChunk", code="NOT_FOUND") == \
        not_found
    assert got.value("cachefs_peer_rpc_seconds_count", method="GetChunk", code="OK") == served
    assert got.value("cachefs_peer_rpc_seconds_count", method="GetChunk",
                     code="NOT_FOUND") == not_found
    assert got.value("cachefs_peer_rpcs_total", method="Status", code="OK") >= 1
    assert got.value("cachefs_peer_cache_used_bytes") > 0
    assert not got.has("cachefs_peer_rpcs_total", code="UNAUTHENTICATED")
    assert server.status()["origin_fetches"] == fetches  # the Status counters, exported

    # Quarantines are the mounts' decision: exported by them (none here).
    for address in mount_metrics:
        mount = Scrape(address)
        assert mount.value("cachefs_mount_quarantined_peers") == 0
        assert mount.value("cachefs_mount_live_peers") == 1
        assert mount.value("cachefs_mount_peer_hits_total") > 0

    # Refusals: a wrong token, a remote this node does not serve, a drain.
    name = chunk_names(url)[0]
    wrong = server.client(token="wrong")
    with pytest.raises(PeerCallError) as refused:
        wrong.get_chunk("origin", DATASET, name, timeout=5)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
    wrong.close()
    client = server.client()
    with pytest.raises(PeerCallError) as refused:
        client.get_chunk("elsewhere", DATASET, name, timeout=5)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert client.drain(resume=False, timeout=5)
    assert Scrape(metrics).value("cachefs_peer_draining") == 1
    with pytest.raises(PeerCallError) as refused:
        client.get_chunk("origin", DATASET, name, timeout=5)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert not client.drain(resume=True, timeout=5)
    client.close()

    last = Scrape(metrics)
    assert last.value("cachefs_peer_rpcs_total", method="GetChunk", code="UNAUTHENTICATED") == 1
    assert last.value("cachefs_peer_rpcs_total", method="GetChunk",
                      code="PERMISSION_DENIED") == 1
    assert last.value("cachefs_peer_rpcs_total", method="GetChunk", code="UNAVAILABLE") == 1
    assert last.value("cachefs_peer_rpcs_total", method="Drain", code="OK") == 2
    assert last.value("cachefs_peer_refused_total") == 1
    assert last.value("cachefs_peer_refused_draining_total") == 1
    assert last.value("cachefs_peer_draining") == 0
    assert last.value("cachefs_peer_origin_fetches_total") == fetches
    for family in last.families.values():
        assert family.name.startswith("cachefs_peer_"), family.name
        assert family.documentation.strip(), f"{family.name} has no help text"
        assert family.documentation != family.name.replace("_", " ")
