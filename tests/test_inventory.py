"""The node inventory: this machine's /proc and /sys, fake device trees, cached datasets through
real mounts, the HTTP endpoint, and publication on a Node through a fake Kubernetes API server
driven by the real `kubernetes` client."""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cachefs.cache.disk import DiskCache
from cachefs.cache.tiered import object_is_intact
from cachefs.cache.versions import read_versions, record_path, record_version
from cachefs.dataset.objects import Commit, Extent, Kind, Tree, TreeEntry, encode, hash_bytes
from cachefs.dataset.repo import chunk_key, commit_key, tree_key
from csi import inventory as inv
from csi import labels
from csi.kube import core_api
from csi.publish import InventoryServer, NodePublisher, inventory_json, node_labels, node_patch
from tests.helpers import cli_json, run_cli
from tests.kube_api import FakeKubeAPI
from tests.mounting import MountSet
from tests.peers import PeerSet
from tests.servers import free_port, wait_until

CHUNK = 64 << 10
STRATEGIC_MERGE = "application/strategic-merge-patch+json"  # what patch_node sends for a dict

INFORMATION = """Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 511
GPU UUID: \t GPU-6a5c2f3e-1111-2222-3333-444455556666
Video BIOS: \t 96.00.74.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
DMA Mask: \t 0xfffffffffffff
Bus Location: \t 0000:01:00.0
Device Minor: \t 0
GPU Excluded:\t No
"""


# -- this machine -------------------------------------------------------------------------------

def test_real_machine_matches_proc_and_sys() -> None:
    found = inv.collect_inventory(None)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    processors = len(re.findall(r"^processor\s*:", cpuinfo, re.M))
    assert found["cpu"]["cores"] == processors == os.cpu_count()
    models = re.findall(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    if models:
        assert found["cpu"]["model"] == models[0].strip()
    pairs = set(re.findall(r"^physical id\s*:\s*(\d+)\s*$.*?^core id\s*:\s*(\d+)\s*$",
                           cpuinfo, re.M | re.S))
    if pairs:
        assert found["cpu"]["physical_cores"] == len(pairs)

    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert found["memory"]["total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert 0 < found["memory"]["available_bytes"] <= found["memory"]["total_bytes"]

    node_dirs = sorted(int(p.rsplit("node", 1)[1])
                       for p in glob.glob("/sys/devices/system/node/node[0-9]*"))
    assert [n["id"] for n in found["numa"]["nodes"]] == node_dirs
    for n in found["numa"]["nodes"]:
        cpus = Path(f"/sys/devices/system/node/node{n['id']}/cpulist").read_text().strip()
        assert n["cpus"] == cpus
        assert n["memory_bytes"] > 0
    if node_dirs:
        assert sum(n["cpu_count"] for n in found["numa"]["nodes"]) == processors

    names = sorted(set(os.listdir("/sys/class/net")) - {"lo"})
    assert sorted(n["name"] for n in found["network"]) == names
    for nic in found["network"]:
        try:
            speed: int | None = int(Path(f"/sys/class/net/{nic['name']}/speed").read_text())
        except (OSError, ValueError):
            speed = None
        assert nic["speed_mbps"] == (speed if speed and speed > 0 else None)
        assert nic["mtu"] == int(Path(f"/sys/class/net/{nic['name']}/mtu").read_text())
        assert nic["state"] == Path(f"/sys/class/net/{nic['name']}/operstate").read_text().strip()

    rdma = sorted(os.listdir("/sys/class/infiniband")) if os.path.isdir(
        "/sys/class/infiniband") else []
    assert [d["name"] for d in found["rdma"]["devices"]] == rdma

    gpus = found["gpus"]
    has_smi = shutil.which("nvidia-smi") is not None
    proc_gpus = glob.glob("/proc/driver/nvidia/gpus/*")
    if not has_smi and not proc_gpus:
        assert gpus == {"count": 0, "models": [], "devices": [], "source": "none"}
    if has_smi:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=60, check=False)
        if listed.returncode == 0:
            assert gpus["source"] == "nvidia-smi"
            assert gpus["count"] == len(re.findall(r"^GPU \d+:", listed.stdout, re.M))
            for device in gpus["devices"]:
                assert device["model"] in listed.stdout
                assert device["memory_bytes"] > 1 << 30
                assert device["uuid"] in listed.stdout
    if proc_gpus:
        assert gpus["count"] >= 1
    assert found["cache"] is None and found["datasets"] == []
    assert found["node"] == os.uname().nodename
    json.dumps(found)  # serialisable as is


def test_cli_prints_summary_and_json(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    text = run_cli("csi", "inventory", "--cache-dir", str(cache)).stdout
    for label in ("cpu", "memory", "numa", "gpus", "rdma", "network", "cache", "datasets"):
        assert re.search(rf"^{label}\s", text, re.M), text
    assert str(cache) in text
    doc = cli_json("csi", "inventory", "--cache-dir", str(cache))
    assert doc["cpu"]["cores"] == os.cpu_count()
    assert doc["cache"]["dir"] == str(cache)
    assert doc["cache"]["used_bytes"] == 0 and doc["cache"]["capacity_bytes"] > 0
    assert not cache.exists()  # read-only inspection: nothing created


# -- fake device trees --------------------------------------------------------------------------

def write(root: Path, path: str, text: str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)


def fake_root(tmp_path: Path, gpus: int = 1, rdma: bool = True) -> Path:
    root = tmp_path / "root"
    write(root, "/proc/sys/kernel/hostname", "gpu-node-7\n")
    write(root, "/proc/cpuinfo", "".join(
        f"processor\t: {i}\nmodel name\t: Fake CPU 9000\nphysical id\t: {i // 4}\n"
        f"core id\t\t: {i % 4 // 2}\n\n" for i in range(8)))
    write(root, "/proc/meminfo", "MemTotal:       16384 kB\nMemFree:  1024 kB\n"
                                 "MemAvailable:    8192 kB\n")
    for node in range(2):
        write(root, f"/sys/devices/system/node/node{node}/cpulist", f"{node * 4}-{node * 4 + 3}\n")
        write(root, f"/sys/devices/system/node/node{node}/meminfo",
              f"Node {node} MemTotal:       8192 kB\nNode {node} MemFree: 512 kB\n")
    write(root, "/sys/class/net/eth0/speed", "100000\n")
    write(root, "/sys/class/net/eth0/operstate", "up\n")
    write(root, "/sys/class/net/eth0/mtu", "9000\n")
    (root / "sys/class/net/eth0/device").mkdir()
    write(root, "/sys/class/net/veth1/speed", "-1\n")
    write(root, "/sys/class/net/veth1/operstate", "down\n")
    write(root, "/sys/class/net/veth1/mtu", "1500\n")
    write(root, "/sys/class/net/lo/mtu", "65536\n")
    for i in range(gpus):
        bus = f"0000:{i + 1:02x}:00.0"
        write(root, f"/proc/driver/nvidia/gpus/{bus}/information",
              INFORMATION.replace("Device Minor: \t 0", f"Device Minor: \t {i}"))
        write(root, f"/dev/nvidia{i}", "")
    if gpus:
        write(root, "/dev/nvidiactl", "")
        write(root, "/dev/nvidia-uvm", "")
    if rdma:
        for port, (layer, rate, state) in {
            "1": ("InfiniBand", "400 Gb/sec (4X NDR)", "4: ACTIVE"),
            "2": ("Ethernet", "100 Gb/sec (4X EDR)", "1: DOWN"),
        }.items():
            base = f"/sys/class/infiniband/mlx5_0/ports/{port}"
            write(root, f"{base}/link_layer", layer + "\n")
            write(root, f"{base}/rate", rate + "\n")
            write(root, f"{base}/state", state + "\n")
    return root


def test_fake_tree_gpus_rdma_and_the_rest(tmp_path: Path) -> None:
    root = fake_root(tmp_path, gpus=2)
    found = inv.collect_inventory(None, root=str(root))
    assert found["node"] == "gpu-node-7"
    assert found["cpu"] == {"cores": 8, "physical_cores": 4, "model": "Fake CPU 9000"}
    assert found["memory"] == {"total_bytes": 16384 * 1024, "available_bytes": 8192 * 1024}
    assert found["numa"]["nodes"] == [
        {"id": 0, "cpus": "0-3", "cpu_count": 4, "memory_bytes": 8192 * 1024},
        {"id": 1, "cpus": "4-7", "cpu_count": 4, "memory_bytes": 8192 * 1024}]
    gpus = found["gpus"]
    assert gpus["source"] == "procfs" and gpus["count"] == 2
    assert gpus["models"] == ["NVIDIA H100 80GB HBM3"]
    assert [d["index"] for d in gpus["devices"]] == [0, 1]
    assert gpus["devices"][0]["uuid"] == "GPU-6a5c2f3e-1111-2222-3333-444455556666"
    assert gpus["devices"][0]["memory_bytes"] is None  # procfs does not say
    assert found["rdma"] == {"devices": [{"name": "mlx5_0", "ports": [
        {"port": 1, "link_layer": "InfiniBand", "rate": "400 Gb/sec (4X NDR)",
         "rate_gbps": 400.0, "state": "ACTIVE"},
        {"port": 2, "link_layer": "Ethernet", "rate": "100 Gb/sec (4X EDR)",
         "rate_gbps": 100.0, "state": "DOWN"}]}]}
    assert found["network"] == [
        {"name": "eth0", "speed_mbps": 100000, "state": "up", "mtu": 9000, "virtual": False},
        {"name": "veth1", "speed_mbps": None, "state": "down", "mtu": 1500, "virtual": True}]
    assert node_labels(found) == {labels.GPU_COUNT: "2",
                                  labels.GPU_MODEL: "NVIDIA-H100-80GB-HBM3", labels.RDMA: "true"}


def test_gpus_visible_in_dev_only_are_counted(tmp_path: Path) -> None:
    root = fake_root(tmp_path, gpus=1, rdma=False)
    write(root, "/dev/nvidia3", "")  # a device file without a procfs entry: same model assumed
    gpus = inv.gpu_info(str(root))
    assert gpus["count"] == 2 and [d["index"] for d in gpus["devices"]] == [0, 3]
    assert gpus["devices"][1]["model"] == "NVIDIA H100 80GB HBM3"
    assert inv.rdma_info(str(root)) == {"devices": []}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert inv.gpu_info(str(empty)) == {"count": 0, "models": [], "devices": [],
                                        "source": "none"}
    assert node_labels(inv.collect_inventory(None, str(empty))) == {
        labels.GPU_COUNT: "0", labels.GPU_MODEL: None, labels.RDMA: "false"}


def fake_nvidia_smi(directory: Path, output: str, code: int = 0) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho \"$@\" > {directory}/args\ncat <<'EOF'\n{output}EOF\n"
                      f"exit {code}\n")
    script.chmod(0o755)


def test_nvidia_smi_output_is_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    fake_nvidia_smi(bin_dir, "".join(
        f"{i}, NVIDIA H100 80GB HBM3, 81559, GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd\n"
        for i in range(8)))
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    gpus = inv.gpu_info("/")
    assert (bin_dir / "args").read_text().split() == inv.NVIDIA_SMI_QUERY
    assert gpus["source"] == "nvidia-smi" and gpus["count"] == 8
    assert gpus["models"] == ["NVIDIA H100 80GB HBM3"]
    assert gpus["devices"][7] == {"index": 7, "model": "NVIDIA H100 80GB HBM3",
                                  "memory_bytes": 81559 << 20,
                                  "uuid": "GPU-00000007-aaaa-bbbb-cccc-dddddddddddd"}
    # A failing nvidia-smi (no driver) falls back to procfs: a fake root with one GPU.
    fake_nvidia_smi(bin_dir, "NVIDIA-SMI has failed because it couldn't communicate\n", code=9)
    root = fake_root(tmp_path, gpus=1, rdma=False)
    gpus = inv.gpu_info(str(root), use_nvidia_smi=True)
    assert gpus["source"] == "procfs" and gpus["count"] == 1


# -- cached datasets ----------------------------------------------------------------------------

def make_dataset(src: Path) -> None:
    (src / "a" / "same").mkdir(parents=True)
    (src / "b" / "same").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(CHUNK * 5 + 777))
    (src / "zeros.bin").write_bytes(bytes(CHUNK * 3))  # whole zero chunks: never fetched
    for i in range(30):
        (src / "a" / f"{i}.jpg").write_bytes(os.urandom(500 + 37 * i))
    for d in ("a", "b"):  # identical subtrees: one tree object, two places
        (src / d / "same" / "x.txt").write_text("shared content\n")
    (src / "empty").touch()


def ds_entry(cache: Path, dataset: str = "ds") -> dict[str, Any]:
    found = [d for d in inv.collect_inventory(str(cache))["datasets"] if d["dataset"] == dataset]
    assert len(found) == 1, found
    return found[0]


def test_datasets_cached_through_real_mounts(tmp_path: Path, mounts: MountSet) -> None:
    src = tmp_path / "src"
    make_dataset(src)
    run_cli("init", "ds", "--chunk-size", "64KiB")
    run_cli("commit", "ds", str(src), "-m", "v1")
    run_cli("tag", "ds", "v1")
    commit = cli_json("log", "ds")[0]["commit"]
    cache = tmp_path / "cache"
    mnt = mounts.mount("ds", mounts.mountpoint(), "--cache-dir", str(cache),
                       "--memory-cache", "0")
    record = json.loads(record_path(cache, "ds", commit).read_text())
    assert record["dataset"] == "ds" and record["commit"] == commit
    assert record["refs"] == ["main"] and record["remote"].startswith("file://")

    for _ in os.walk(mnt):  # every tree fetched, no file data yet
        pass
    (mnt / "a" / "3.jpg").read_bytes()  # one pack chunk; big.bin's chunks not yet
    part = ds_entry(cache)
    assert (part["commit"], part["refs"], part["complete"]) == (commit, ["main"], True)
    assert 0 < part["bytes_cached"] < part["bytes_total"]
    assert 0 < part["fraction_cached"] < 1

    for path in mnt.rglob("*"):
        if path.is_file():
            path.read_bytes()
    full = ds_entry(cache)
    chunk_files = [p for p in (cache / "objects" / "chunks").rglob("*") if p.is_file()]
    assert full["bytes_cached"] == full["bytes_total"] == sum(p.stat().st_size
                                                              for p in chunk_files)
    assert full["fraction_cached"] == 1.0 and full["complete"] is True
    assert full["bytes_total"] >= CHUNK * 5 + 777 + 500 * 30

    # The same commit mounted under another ref lists both; by hash adds none.
    mounts.mount("ds@v1", mounts.mountpoint("v1"), "--cache-dir", str(cache))
    mounts.mount(f"ds@{commit[:12]}", mounts.mountpoint("byhash"), "--cache-dir", str(cache))
    assert ds_entry(cache)["refs"] == ["main", "v1"]

    # An evicted tree: a new walk (a restarted plugin) is partial and says so.
    trees = sorted((p for p in (cache / "objects" / "trees").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    trees[0].unlink()
    [partial] = inv.CachedDatasets(cache).scan()
    assert partial["complete"] is False and partial["fraction_cached"] < 1.0
    assert ds_entry(cache)["complete"] is True  # a walk once complete is kept

    text = run_cli("csi", "inventory", "--cache-dir", str(cache)).stdout
    assert re.search(rf"^\s+ds\s+{commit[:12]}\s+main,v1\s", text, re.M), text


def put_meta(disk: DiskCache, obj: Tree | Commit) -> str:
    name, stored = encode(obj)
    disk.put((commit_key if isinstance(obj, Commit) else tree_key)(name), stored)
    return name


def test_dataset_walk_is_cached_until_the_cache_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    disk = DiskCache(cache, capacity_bytes=1 << 30, verify=object_is_intact)
    chunks = [os.urandom(1000), os.urandom(3000)]
    names = [hash_bytes(c) for c in chunks]
    sub = Tree.from_entries([TreeEntry("f", Kind.FILE, 0o644, 3000, 0, names[1],
                                       (Extent(names[1], 0, 3000),))])
    sub_name = put_meta(disk, sub)
    root = Tree.from_entries([
        TreeEntry("p1", Kind.FILE, 0o644, 600, 0, "0" * 64, (Extent(names[0], 0, 600),)),
        TreeEntry("p2", Kind.FILE, 0o644, 400, 0, "1" * 64, (Extent(names[0], 600, 400),)),
        TreeEntry("d", Kind.DIR, 0o755, 0, 0, sub_name)])
    commit = put_meta(disk, Commit(put_meta(disk, root), (), "ds", "me", "m", 0, 3, 4000))
    record_version(cache, "ds", commit, "file:///repo", "main")

    walks = []
    real_walk = inv.CachedDatasets._walk
    monkeypatch.setattr(inv.CachedDatasets, "_walk",
                        lambda self, c: walks.append(c) or real_walk(self, c))
    scanner = inv.CachedDatasets(cache)
    [entry] = scanner.scan()
    assert (entry["bytes_total"], entry["bytes_cached"], entry["complete"]) == (4000, 0, True)
    disk.put(chunk_key(names[0]), chunks[0])
    [entry] = scanner.scan()
    assert (entry["bytes_cached"], entry["fraction_cached"]) == (1000, 0.25)
    assert walks == [commit]  # a complete walk is kept
    disk.put(chunk_key(names[1]), chunks[1])
    assert scanner.scan()[0]["fraction_cached"] == 1.0
    assert walks == [commit]

    # A subtree evicted: the walk already made still holds (a commit never changes) ...
    os.unlink(cache / "objects" / tree_key(sub_name))
    os.utime(cache / "state")
    assert scanner.scan()[0]["complete"] is True
    # ... but a new one is partial: the missing files' bytes count as not cached, and it is
    # walked again on the next change of the cache.
    fresh = inv.CachedDatasets(cache)
    [entry] = fresh.scan()
    assert entry["complete"] is False
    assert (entry["bytes_total"], entry["bytes_cached"]) == (4000, 1000)
    assert fresh.scan() == [entry] and walks == [commit] * 2  # nothing changed: no new walk
    disk.put(tree_key(sub_name), encode(sub)[1])
    assert fresh.scan()[0]["complete"] is True
    assert walks == [commit] * 3
    disk.close()

    # Merged refs, atomic records; unreadable records are skipped.
    record_version(cache, "ds", commit, "file:///repo", "v1")
    record_version(cache, "ds", commit, "file:///repo", "main")
    (cache / "versions" / "junk.json").write_text("{not json")
    assert [r["refs"] for r in read_versions(cache)] == [["main", "v1"]]
    assert not [p for p in (cache / "versions").iterdir() if p.name.startswith(".tmp")]


def test_empty_dataset_is_fully_cached(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    disk = DiskCache(cache, capacity_bytes=1 << 20, verify=object_is_intact)
    commit = put_meta(disk, Commit(put_meta(disk, Tree.from_entries([])), (), "e", "me", "m",
                                   0, 0, 0))
    disk.close()
    record_version(cache, "e", commit, "file:///repo", "main")
    entry = ds_entry(cache, "e")
    assert (entry["bytes_total"], entry["fraction_cached"], entry["complete"]) == (0, 1.0, True)
    record_version(cache, "gone", "f" * 64, "file:///repo", "main")  # commit not cached
    gone = ds_entry(cache, "gone")
    assert (gone["fraction_cached"], gone["complete"]) == (0.0, False)


def test_recording_failure_is_only_logged(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING):
        assert record_version(blocker, "ds", "a" * 64, "file:///r", "main") is False
    assert "could not record" in caplog.text


def test_annotation_stays_under_the_limit(tmp_path: Path) -> None:
    doc = inv.collect_inventory(None, str(fake_root(tmp_path)))
    doc["datasets"] = [{"dataset": f"d{i}", "commit": f"{i:064x}", "refs": ["main"],
                        "bytes_cached": i, "fraction_cached": 0.5} for i in range(400)]
    assert json.loads(inventory_json(doc)) == doc  # fits as it is
    small = json.loads(inventory_json(doc, limit=10_000))
    assert len(json.dumps(small)) <= 10_000 and small["datasets_truncated"] is True
    kept = [d["bytes_cached"] for d in small["datasets"]]
    assert kept and kept == sorted(kept, reverse=True) and kept[0] == 399  # most cached kept


# -- the HTTP endpoint --------------------------------------------------------------------------

def request(port: int, method: str, path: str, body: bytes | None = None
            ) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def test_http_endpoint(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    record_version(cache, "ds", "c" * 64, "file:///repo", "main")
    server = InventoryServer("127.0.0.1:0", lambda: inv.collect_inventory(str(cache))).start()
    try:
        status, content_type, body = request(server.port, "GET", "/inventory")
        assert (status, content_type) == (200, "application/json")
        doc = json.loads(body)
        assert doc["cpu"]["cores"] == os.cpu_count()
        assert [(d["dataset"], d["refs"]) for d in doc["datasets"]] == [("ds", ["main"])]
        assert request(server.port, "GET", "/healthz")[::2] == (200, b"ok\n")
        assert request(server.port, "GET", "/nothing")[0] == 404
        assert request(server.port, "POST", "/inventory", b"{}")[0] == 405
        assert request(server.port, "DELETE", "/healthz")[0] == 405
    finally:
        server.stop()
    with pytest.raises(OSError):
        request(server.port, "GET", "/healthz")


# -- publishing on the Node ---------------------------------------------------------------------

@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as api:
        api.add_node("node-1", labels={labels.GPU_MODEL: "stale"})
        yield api


def token_file(tmp_path: Path, token: str) -> str:
    path = tmp_path / f"token-{len(list(tmp_path.glob('token-*')))}"
    path.write_text(token + "\n")
    return str(path)


class Recorder:
    """collect_inventory that remembers what it returned."""

    def __init__(self, cache: Path, root: Path) -> None:
        self.cache, self.root = cache, root
        self.results: list[dict[str, Any]] = []

    def __call__(self) -> dict[str, Any]:
        self.results.append(inv.collect_inventory(str(self.cache), root=str(self.root)))
        return self.results[-1]


def published(api: FakeKubeAPI) -> dict[str, Any]:
    return json.loads(api.node("node-1")["metadata"]["annotations"][labels.INVENTORY])


def test_publisher_patches_the_node(tmp_path: Path, kube: FakeKubeAPI) -> None:
    cache = tmp_path / "cache"
    record_version(cache, "ds", "c" * 64, "file:///repo", "main")
    collect = Recorder(cache, fake_root(tmp_path))
    publisher = NodePublisher(core_api(kube.url, token_file(tmp_path, kube.token)), "node-1",
                              collect, interval=60, check_interval=0.05, min_gap=0,
                              watch_dir=str(cache)).start()
    try:
        wait_until(lambda: publisher.published >= 1, 30, "the first publish")
        [patch] = kube.patches("node-1")
        assert patch.method == "PATCH" and patch.path == "/api/v1/nodes/node-1"
        assert patch.content_type == STRATEGIC_MERGE
        assert patch.body["metadata"]["labels"] == {
            labels.GPU_COUNT: "1", labels.GPU_MODEL: "NVIDIA-H100-80GB-HBM3",
            labels.RDMA: "true"}
        assert set(patch.body["metadata"]["annotations"]) == {labels.INVENTORY}
        sent = json.loads(patch.body["metadata"]["annotations"][labels.INVENTORY])
        assert sent == collect.results[-1]
        assert patch.body == node_patch(collect.results[-1])
        node = kube.node("node-1")
        assert node["metadata"]["labels"][labels.GPU_COUNT] == "1"
        assert node["metadata"]["labels"][labels.GPU_MODEL] == "NVIDIA-H100-80GB-HBM3"
        assert published(kube)["datasets"][0]["commit"] == "c" * 64

        # Nothing changed: nothing sent before the interval.
        time.sleep(0.5)
        assert len(kube.patches()) == 1
        # A new version mounted: published at once, long before the interval.
        record_version(cache, "other", "d" * 64, "file:///repo", "v2")
        wait_until(lambda: len(kube.patches()) >= 2, 10, "a publish on change")
        assert {d["dataset"] for d in published(kube)["datasets"]} == {"ds", "other"}
        assert publisher.failures == 0
    finally:
        publisher.stop()


def test_publisher_removes_gpu_model_and_refreshes(tmp_path: Path, kube: FakeKubeAPI) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    collect = Recorder(tmp_path / "cache", empty)
    publisher = NodePublisher(core_api(kube.url, token_file(tmp_path, kube.token)), "node-1",
                              collect, interval=0.3, check_interval=0.05).start()
    try:
        wait_until(lambda: len(kube.patches()) >= 3, 20, "periodic publishes")
    finally:
        publisher.stop()
    body = kube.patches()[0].body
    assert body["metadata"]["labels"] == {labels.GPU_COUNT: "0", labels.GPU_MODEL: None,
                                          labels.RDMA: "false"}
    node_labels_now = kube.node("node-1")["metadata"]["labels"]
    assert labels.GPU_MODEL not in node_labels_now  # null deleted the stale label
    assert node_labels_now[labels.RDMA] == "false"


def test_publisher_recovers_when_the_api_comes_back(tmp_path: Path, kube: FakeKubeAPI,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    kube.stop()
    collect = Recorder(tmp_path / "cache", fake_root(tmp_path))
    publisher = NodePublisher(core_api(kube.url, token_file(tmp_path, kube.token)), "node-1",
                              collect, interval=30, check_interval=0.05, backoff=0.05)
    with caplog.at_level(logging.WARNING, logger="cachefs.csi.publish"):
        publisher.start()
        try:
            wait_until(lambda: publisher.failures >= 2, 30, "failed attempts while down")
            assert publisher.published == 0
            kube.fail_status = 503
            kube.start()  # same port, same store
            wait_until(lambda: publisher.failures >= 4, 30, "503 answers")
            kube.fail_status = None
            wait_until(lambda: publisher.published == 1, 30, "a publish once the API is back")
            assert publisher.failures == 0
            assert kube.node("node-1")["metadata"]["labels"][labels.GPU_COUNT] == "1"
        finally:
            publisher.stop()
    assert "publishing the inventory on node node-1 failed" in caplog.text
    assert "503" in caplog.text


def test_publisher_with_a_wrong_token_keeps_running(tmp_path: Path, kube: FakeKubeAPI,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    collect = Recorder(tmp_path / "cache", fake_root(tmp_path))
    publisher = NodePublisher(core_api(kube.url, token_file(tmp_path, "wrong")), "node-1",
                              collect, interval=30, check_interval=0.05, backoff=0.05)
    with caplog.at_level(logging.WARNING, logger="cachefs.csi.publish"):
        publisher.start()
        try:
            wait_until(lambda: publisher.failures >= 2, 30, "refused attempts")
            assert publisher._thread is not None and publisher._thread.is_alive()
        finally:
            publisher.stop()
    assert "401" in caplog.text and "patch on nodes" in caplog.text
    assert publisher.published == 0
    assert kube.node("node-1")["metadata"]["labels"] == {
        "kubernetes.io/hostname": "node-1", labels.GPU_MODEL: "stale"}


# -- the plugin process -------------------------------------------------------------------------

def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def plugin_process(*args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    root = Path(tempfile.mkdtemp(prefix="csi-inv-", dir="/tmp"))
    log_path = root / "plugin.log"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cachefs.cli.main", "csi", "--mode", "node", "--endpoint",
             f"unix://{root}/csi.sock", "--node-id", "node-1", "--state-dir",
             str(root / "state"), "--cache-dir", str(root / "cache"), *args],
            stdout=log_file, stderr=log_file, start_new_session=True)
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pid in processes_mentioning(str(root)):  # its mounter
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def test_plugin_serves_and_publishes(tmp_path: Path, kube: FakeKubeAPI) -> None:
    port = free_port()
    with plugin_process("--inventory-listen", f"127.0.0.1:{port}", "--publish-inventory",
                        "--inventory-interval", "30", "--kube-api", kube.url,
                        "--kube-token-file", token_file(tmp_path, kube.token)) as (proc, log):
        def serving() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return request(port, "GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(serving, 60, "the inventory endpoint")
        doc = json.loads(request(port, "GET", "/inventory")[2])
        assert doc["cpu"]["cores"] == os.cpu_count() and doc["datasets"] == []
        wait_until(lambda: kube.patches("node-1"), 30, "the Node patch")
        patch = kube.patches("node-1")[0]
        assert patch.content_type == STRATEGIC_MERGE
        assert published(kube)["cache"]["dir"].endswith("/cache")
        assert kube.node("node-1")["metadata"]["labels"][labels.RDMA] in ("true", "false")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()


def test_plugin_keeps_running_with_a_wrong_token(tmp_path: Path, kube: FakeKubeAPI) -> None:
    port = free_port()
    with plugin_process("--inventory-listen", f"127.0.0.1:{port}", "--publish-inventory",
                        "--kube-api", kube.url,
                        "--kube-token-file", token_file(tmp_path, "wrong")) as (proc, log):
        wait_until(lambda: "401" in log.read_text() or proc.poll() is not None, 60,
                   "a refused publish")
        assert proc.poll() is None, log.read_text()
        assert request(port, "GET", "/healthz")[0] == 200
        assert "patch on nodes" in log.read_text()
        assert kube.node("node-1")["metadata"]["labels"].get(labels.GPU_COUNT) is None


def test_plugin_refuses_bad_inventory_flags(tmp_path: Path) -> None:
    out = run_cli("csi", "--mode", "controller", "--endpoint", f"unix://{tmp_path}/c.sock",
                  "--state-dir", str(tmp_path / "s"), "--publish-inventory", check=False)
    assert out.returncode != 0 and "--publish-inventory needs the node service" in out.stderr
    out = run_cli("csi", "--endpoint", f"unix://{tmp_path}/c.sock", "--node-id", "n",
                  "--state-dir", str(tmp_path / "s"), "--inventory-listen", "nonsense",
                  check=False)
    assert out.returncode != 0 and "--inventory-listen" in out.stderr
    # Outside a pod, without --kube-api: a clear error, not a traceback.
    env = {"KUBERNETES_SERVICE_HOST": "", "KUBERNETES_SERVICE_PORT": ""}
    out = run_cli("csi", "--endpoint", f"unix://{tmp_path}/c.sock", "--node-id", "n",
                  "--state-dir", str(tmp_path / "s"), "--publish-inventory", check=False,
                  env=env)
    assert out.returncode != 0 and "--kube-api" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_kubernetes_node_name_wins_over_the_host_name() -> None:
    """In a pod the host name is the pod's; the plugin passes its --node-id."""
    assert inv.collect_inventory(None, node_name="gpu-node-12")["node"] == "gpu-node-12"
    assert inv.collect_inventory(None)["node"] == os.uname().nodename


# -- the node's peer server -----------------------------------------------------------------------

def test_inventory_shows_the_nodes_peer_server(tmp_path: Path, peer_servers: PeerSet) -> None:
    """The peer section comes from a real `cachefs peer serve`'s Status, with the token; the
    CLI and the published annotation carry it, and a server that does not answer says why."""
    token = "inventory-peer-token"
    server = peer_servers.start("node", token=token)
    found = inv.collect_inventory(str(server.cache_dir), peer_address=server.address,
                                  peer_token=token)
    peer = found["peer"]
    assert (peer["address"], peer["live"]) == (server.address, True)
    status = peer["server"]
    assert status["address"] == server.address
    assert status["cache"]["dir"] == str(server.cache_dir)
    for counter in ("get_requests", "served_from_cache", "served_from_origin", "served_bytes",
                    "origin_bytes"):
        assert status[counter] == 0, counter
    assert re.search(rf"^peer\s+{re.escape(server.address)} live: 0 chunks served",
                     inv.describe(found), re.M), inv.describe(found)
    assert json.loads(inventory_json(found))["peer"] == peer  # what the Node carries

    doc = json.loads(run_cli("csi", "inventory", "--cache-dir", str(server.cache_dir),
                             "--peer-address", server.address, "--json",
                             env={"CACHEFS_TOKEN": token}).stdout)
    assert doc["peer"]["live"] is True and doc["peer"]["server"]["address"] == server.address

    refused = inv.peer_info(server.address, "not-the-token")
    assert refused["live"] is False and "UNAUTHENTICATED" in refused["error"]
    server.kill()
    gone = inv.collect_inventory(None, peer_address=server.address, peer_token=token)["peer"]
    assert gone["live"] is False and "UNAVAILABLE" in gone["error"]
    assert "not answering" in inv.describe_peer(gone)
    assert inv.collect_inventory(None)["peer"] is None  # no peer server configured
