"""The node's resource inventory: what a scheduler needs to know about this node, as one JSON.

`collect_inventory(cache_dir)` reads everything from /proc, /sys and /dev (relative to `root`,
so tests can feed a fake tree) and from the SSD cache directory, without writing anything:

    {"node": "gpu-7",
     "cpu": {"cores": 64, "physical_cores": 32, "model": "AMD EPYC 7763 64-Core Processor"},
     "memory": {"total_bytes": ..., "available_bytes": ...},
     "numa": {"nodes": [{"id": 0, "cpus": "0-31", "cpu_count": 32, "memory_bytes": ...}]},
     "gpus": {"count": 8, "models": ["NVIDIA H100 80GB HBM3"], "source": "nvidia-smi",
              "devices": [{"index": 0, "model": "...", "memory_bytes": ..., "uuid": "GPU-..."}]},
     "rdma": {"devices": [{"name": "mlx5_0", "ports": [{"port": 1, "link_layer": "InfiniBand",
                                                       "rate": "400 Gb/sec (4X NDR)",
                                                       "rate_gbps": 400.0, "state": "ACTIVE"}]}]},
     "network": [{"name": "eth0", "speed_mbps": 100000, "state": "up", "mtu": 9000,
                  "virtual": false}],
     "cache": {"dir": "/var/cache/cachefs", "capacity_bytes": ..., "used_bytes": ...,
               "free_bytes": ..., "filesystem_bytes": ...},
     "datasets": [{"dataset": "imagenet", "commit": "<64 hex>", "refs": ["main", "v1"],
                   "remote": "s3://bucket/prefix", "bytes_total": ..., "bytes_cached": ...,
                   "fraction_cached": 0.42, "complete": true}],
     "peer": {"address": "127.0.0.1:7470", "live": true,
              "server": {"address": "10.0.0.7:7470", "served_from_cache": ..., ...}},
     "collected_at": "2026-01-01T00:00:00Z"}

GPUs come from ``nvidia-smi`` when it is on PATH (and answers within a timeout), else from
/proc/driver/nvidia/gpus/*/information and the /dev/nvidiaN device files (no memory size
there); `source` says which ("none" without GPUs). RDMA devices are those of
/sys/class/infiniband (InfiniBand and RoCE alike: `link_layer` tells them apart). `speed_mbps`
is null where the kernel does not know it (virtual interfaces, links down).

The node's peer server (`cachefs peer serve`, the peer tier's member on this node), when one is
configured (`peer_address`): asked for its `Status` (`cachefs.peer.client.PeerClient`, with the
cluster token, at most `PEER_STATUS_TIMEOUT_S`), its answer is `server`, the document `cachefs
peer status --json` shows per member (the address the ring knows it by, the remotes and
datasets it serves, its cache, and its counters: chunks served from its cache and from the
origin, bytes served, origin bytes fetched on behalf of others); a server that does not answer
is `"live": false` with the `error`. `peer` is null without one. The peer server serves the
node's cache directory, the one the `datasets` are counted in: the chunks it holds are the
node's cached bytes.

Cached datasets: every mount daemon records the version it serves under CACHE_DIR/versions/
(`cachefs.cache.versions`). For each, the commit's trees are walked as stored in the SSD tier
(read and verified through `cachefs.cache.disk`, the only module that knows the directory's
layout) to find the distinct chunks its files reference; `bytes_total` is their total length,
`bytes_cached` that of the ones the SSD tier holds.
A tree missing from the cache (evicted, never fetched) leaves `complete` false and its files'
bytes count as not cached. Full-size chunks of zeros are never fetched by a mount (sparse
regions) and are not counted. The walk of a complete commit is kept (a commit never changes);
which chunks are present is recomputed only when the cache's usage counter changed
(`cachefs.cache.disk.change_marker`: every put and eviction rewrites it) or a minute passed, so
a periodic refresh is cheap when nothing changed.
"""

from __future__ import annotations

import copy
import csv
import glob
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cachefs.cache.disk import (
    DEFAULT_CAPACITY_FRACTION,
    DiskCache,
    cached_sizes,
    change_marker,
    read_cached,
    stored_bytes,
)
from cachefs.cache.versions import read_versions
from cachefs.dataset.objects import (
    Commit,
    Kind,
    Tree,
    decode_commit,
    decode_tree,
    zero_chunk_hash,
)
from cachefs.dataset.repo import chunk_key, commit_key, tree_key
from cachefs.names import format_size
from cachefs.peer.client import PeerCallError, PeerClient

log = logging.getLogger("cachefs.csi.inventory")

NVIDIA_SMI_TIMEOUT_S = 10.0
NVIDIA_SMI_QUERY = ["--query-gpu=index,name,memory.total,uuid", "--format=csv,noheader,nounits"]
PRESENCE_TTL_S = 60.0  # which chunks are cached is rechecked at least this often
GPU_TTL_S = 30.0  # collect_inventory runs nvidia-smi at most this often
PEER_STATUS_TIMEOUT_S = 2.0
_RATE_RE = re.compile(r"([0-9.]+)\s*Gb/sec")


def _path(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _read(root: str, path: str) -> str | None:
    try:
        with open(_path(root, path), errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _read_int(root: str, path: str) -> int | None:
    text = _read(root, path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _natural(name: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _cpulist_count(text: str) -> int:
    count = 0
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        count += int(high) - int(low) + 1 if high else 1
    return count


# -- hardware ---------------------------------------------------------------------------------

def hostname(root: str = "/") -> str:
    text = _read(root, "/proc/sys/kernel/hostname")
    return text.strip() if text else socket.gethostname()


def cpu_info(root: str = "/") -> dict[str, Any]:
    """Logical cores (processors in /proc/cpuinfo), physical cores (distinct (physical id,
    core id) pairs, when listed) and the model name."""
    text = _read(root, "/proc/cpuinfo") or ""
    logical = 0
    model: str | None = None
    physical: set[tuple[str, str]] = set()
    package = core = None
    for line in [*text.splitlines(), ""]:
        key, _, value = (s.strip() for s in line.partition(":"))
        if not key:  # the blank line after each processor
            if package is not None and core is not None:
                physical.add((package, core))
            package = core = None
        elif key == "processor":
            logical += 1
        elif key == "physical id":
            package = value
        elif key == "core id":
            core = value
        elif model is None and key in ("model name", "cpu model", "Model", "Hardware"):
            model = value or None
    if logical == 0 and root == "/":
        logical = os.cpu_count() or 0
    return {"cores": logical, "physical_cores": len(physical) or None, "model": model}


def memory_info(root: str = "/") -> dict[str, Any]:
    values: dict[str, int] = {}
    for line in (_read(root, "/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return {"total_bytes": values.get("MemTotal"),
            "available_bytes": values.get("MemAvailable", values.get("MemFree"))}


def numa_info(root: str = "/") -> dict[str, Any]:
    nodes = []
    base = _path(root, "/sys/devices/system/node")
    for path in sorted(glob.glob(os.path.join(base, "node[0-9]*")), key=_natural):
        name = os.path.basename(path)
        if not name[4:].isdigit():
            continue
        rel = f"/sys/devices/system/node/{name}"
        cpus = (_read(root, f"{rel}/cpulist") or "").strip()
        memory = None
        for line in (_read(root, f"{rel}/meminfo") or "").splitlines():
            fields = line.split()
            if "MemTotal:" in fields:
                i = fields.index("MemTotal:")
                memory = int(fields[i + 1]) * 1024 if fields[i + 1:i + 2] else None
        nodes.append({"id": int(name[4:]), "cpus": cpus, "cpu_count": _cpulist_count(cpus),
                      "memory_bytes": memory})
    return {"nodes": nodes}


def _gpus_from_nvidia_smi(timeout: float) -> list[dict[str, Any]] | None:
    """The GPUs nvidia-smi lists, or None when it is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, *NVIDIA_SMI_QUERY], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("nvidia-smi failed: %s", e)
        return None
    if done.returncode != 0:
        log.warning("nvidia-smi exited with %d: %s", done.returncode,
                    (done.stderr or done.stdout).strip()[:500])
        return None
    devices = []
    for row in csv.reader(done.stdout.splitlines(), skipinitialspace=True):
        if len(row) < 3:
            continue
        index, name, memory = (c.strip() for c in row[:3])
        try:
            memory_bytes: int | None = int(float(memory) * (1 << 20))
        except ValueError:
            memory_bytes = None  # "[N/A]"
        device: dict[str, Any] = {"index": int(index) if index.isdigit() else len(devices),
                                  "model": name, "memory_bytes": memory_bytes}
        if len(row) > 3 and row[3].strip().startswith("GPU-"):
            device["uuid"] = row[3].strip()
        devices.append(device)
    return devices


def _gpus_from_procfs(root: str) -> list[dict[str, Any]]:
    """GPUs from the driver's /proc entries, restricted to the /dev/nvidiaN files present (in a
    container, those are the GPUs it may use)."""
    infos = []
    base = _path(root, "/proc/driver/nvidia/gpus")
    for path in sorted(glob.glob(os.path.join(base, "*", "information"))):
        fields: dict[str, str] = {}
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        minor = fields.get("Device Minor", "")
        info: dict[str, Any] = {"index": int(minor) if minor.isdigit() else len(infos),
                                "model": fields.get("Model") or None, "memory_bytes": None}
        if fields.get("GPU UUID", "").startswith("GPU-"):
            info["uuid"] = fields["GPU UUID"]
        infos.append(info)
    minors = sorted(int(os.path.basename(p)[6:]) for p in
                    glob.glob(_path(root, "/dev/nvidia[0-9]*"))
                    if os.path.basename(p)[6:].isdigit())
    if not minors:
        return sorted(infos, key=lambda d: d["index"])
    by_minor = {d["index"]: d for d in infos}
    default_model = infos[0]["model"] if infos else None
    return [by_minor.get(m) or {"index": m, "model": default_model, "memory_bytes": None}
            for m in minors]


def gpu_info(root: str = "/", use_nvidia_smi: bool | None = None,
             timeout: float = NVIDIA_SMI_TIMEOUT_S) -> dict[str, Any]:
    """GPUs by nvidia-smi (only when `root` is the real one, unless told) or procfs."""
    devices = None
    source = "none"
    if use_nvidia_smi if use_nvidia_smi is not None else root == "/":
        devices = _gpus_from_nvidia_smi(timeout)
        if devices:
            source = "nvidia-smi"
    if not devices:
        devices = _gpus_from_procfs(root)
        source = "procfs" if devices else "none"
    models = list(dict.fromkeys(d["model"] for d in devices if d["model"]))
    return {"count": len(devices), "models": models, "devices": devices, "source": source}


def rdma_info(root: str = "/") -> dict[str, Any]:
    devices = []
    base = _path(root, "/sys/class/infiniband")
    for path in sorted(glob.glob(os.path.join(base, "*")), key=_natural):
        name = os.path.basename(path)
        ports = []
        for port_path in sorted(glob.glob(os.path.join(path, "ports", "*")),
                                key=_natural):
            port = os.path.basename(port_path)
            rel = f"/sys/class/infiniband/{name}/ports/{port}"
            rate = (_read(root, f"{rel}/rate") or "").strip() or None
            match = _RATE_RE.search(rate or "")
            state = (_read(root, f"{rel}/state") or "").strip()
            ports.append({
                "port": int(port) if port.isdigit() else port,
                "link_layer": (_read(root, f"{rel}/link_layer") or "").strip() or None,
                "rate": rate,
                "rate_gbps": float(match.group(1)) if match else None,
                "state": state.partition(":")[2].strip() or state or None,  # "4: ACTIVE"
            })
        devices.append({"name": name, "ports": ports})
    return {"devices": devices}


def network_info(root: str = "/") -> list[dict[str, Any]]:
    interfaces = []
    base = _path(root, "/sys/class/net")
    try:
        names = sorted(os.listdir(base), key=_natural)
    except OSError:
        names = []
    for name in names:
        if name == "lo" or not os.path.isdir(os.path.join(base, name)):
            continue
        rel = f"/sys/class/net/{name}"
        speed = _read_int(root, f"{rel}/speed")  # EINVAL when unknown: None
        interfaces.append({
            "name": name,
            "speed_mbps": speed if speed is not None and speed > 0 else None,
            "state": (_read(root, f"{rel}/operstate") or "").strip() or None,
            "mtu": _read_int(root, f"{rel}/mtu"),
            "virtual": not os.path.exists(os.path.join(base, name, "device")),
        })
    return interfaces


# -- the cache --------------------------------------------------------------------------------

def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cache_info(cache_dir: str) -> dict[str, Any]:
    """Capacity and use of the SSD cache directory, read-only (nothing is created).

    `capacity_bytes` is the bound mounts get by default (`DiskCache.default_capacity`, computed
    from the stored usage counter instead of a scan); `free_bytes` and `filesystem_bytes` are
    those of the file system holding it."""
    directory = Path(cache_dir)
    used = stored_bytes(directory)
    try:
        st = os.statvfs(_existing(directory))
    except OSError:
        return {"dir": str(directory), "capacity_bytes": None, "used_bytes": used,
                "free_bytes": None, "filesystem_bytes": None}
    free = st.f_bavail * st.f_frsize
    floor = DiskCache.default_free_space_floor(directory)
    capacity = max(0, min(int((free + used) * DEFAULT_CAPACITY_FRACTION), free + used - floor))
    return {"dir": str(directory), "capacity_bytes": capacity, "used_bytes": used,
            "free_bytes": free, "filesystem_bytes": st.f_blocks * st.f_frsize}


@dataclass
class _Walk:
    """What a commit's files reference, as far as its trees are cached."""

    chunks: dict[str, int]  # chunk name -> length (the furthest end any extent reaches)
    complete: bool  # every tree (and the commit) was in the cache
    unknown_bytes: int  # file bytes below trees that were missing


@dataclass
class _Presence:
    state_mtime_ns: int
    checked: float  # time.monotonic()
    bytes_total: int
    bytes_cached: int


def _scan_tree(tree: Tree, chunks: dict[str, int]) -> tuple[int, list[str]]:
    """One tree's own file bytes and its subdirectories; records in `chunks` the furthest
    end of each chunk its files reference."""
    own = 0
    subdirs = []
    for entry in tree.entries:
        if entry.kind is Kind.DIR:
            subdirs.append(entry.hash)
        elif entry.kind is Kind.FILE:
            own += entry.size
            for x in entry.extents:
                end = x.offset + x.length
                if chunks.get(x.chunk, -1) < end:
                    chunks[x.chunk] = end
    return own, subdirs


def _drop_zero_chunk(chunks: dict[str, int]) -> None:
    """Whole chunks of zeros (sparse regions) are never fetched: the chunk size is the
    longest chunk, as files of at least that size are cut into whole chunks."""
    if chunks:
        longest = max(chunks.values())
        zero = zero_chunk_hash(longest)
        if chunks.get(zero) == longest:
            del chunks[zero]


class CachedDatasets:
    """The dataset versions cached in one cache directory, with their cached fractions; keeps
    the walk of each commit between calls (see the module doc). Thread-safe."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self._lock = threading.Lock()
        self._walks: dict[str, _Walk] = {}
        self._presence: dict[str, _Presence] = {}

    def _walk(self, commit_name: str) -> _Walk:
        commit = self._cached_commit(commit_name)
        if commit is None:
            return _Walk({}, complete=False, unknown_bytes=0)
        file_bytes, chunks, complete = self._walk_trees(commit.tree)
        _drop_zero_chunk(chunks)
        unknown = max(0, commit.bytes - file_bytes.get(commit.tree, 0)) if not complete else 0
        return _Walk(chunks, complete, unknown)

    def _cached_commit(self, name: str) -> Commit | None:
        """The commit from the cache, verified; None when it is absent or does not decode."""
        return read_cached(self.cache_dir, commit_key(name),
                           lambda stored: decode_commit(name, stored))

    def _cached_tree(self, name: str) -> Tree | None:
        """The tree from the cache, verified; None when it is absent or does not decode."""
        return read_cached(self.cache_dir, tree_key(name),
                           lambda stored: decode_tree(name, stored))

    def _walk_trees(self, root: str) -> tuple[dict[str, int], dict[str, int], bool]:
        """(file bytes below each tree, chunk name -> furthest end referenced, whether every
        tree was cached) for the cached trees under `root`."""
        chunks: dict[str, int] = {}
        complete = True
        # Post-order over the tree DAG: each tree is read once, and the file bytes below it
        # are counted with multiplicity (an identical subtree can appear in two places).
        file_bytes: dict[str, int] = {}
        pending: dict[str, tuple[int, list[str]]] = {}
        stack: list[tuple[str, bool]] = [(root, False)]
        while stack:
            name, finished = stack.pop()
            if finished:
                own, subdirs = pending.pop(name)
                file_bytes[name] = own + sum(file_bytes.get(d, 0) for d in subdirs)
                continue
            if name in file_bytes or name in pending:
                continue
            tree = self._cached_tree(name)
            if tree is None:
                complete = False
                file_bytes[name] = 0
                continue
            own, subdirs = _scan_tree(tree, chunks)
            pending[name] = (own, subdirs)
            stack.append((name, True))
            stack.extend((d, False) for d in subdirs if d not in file_bytes)
        return file_bytes, chunks, complete

    def _state_mtime_ns(self) -> int:
        return change_marker(self.cache_dir)

    def _measure(self, commit: str, state_mtime_ns: int) -> tuple[_Walk, _Presence]:
        walk = self._walks.get(commit)
        presence = self._presence.get(commit)
        now = time.monotonic()
        if (walk is not None and presence is not None
                and presence.state_mtime_ns == state_mtime_ns
                and now - presence.checked < PRESENCE_TTL_S):
            return walk, presence
        if walk is None or not walk.complete:  # a partial walk is redone when the cache changed
            walk = self._walks[commit] = self._walk(commit)
        keys = {chunk_key(chunk): length for chunk, length in walk.chunks.items()}
        cached = 0
        for key, size in cached_sizes(self.cache_dir, keys):
            cached += size
            keys[key] = size  # a cached chunk counts at its real size
        total = walk.unknown_bytes + sum(keys.values())
        presence = _Presence(state_mtime_ns, now, total, cached)
        self._presence[commit] = presence
        return walk, presence

    def scan(self) -> list[dict[str, Any]]:
        """One entry per version record (see the module doc)."""
        with self._lock:
            state_mtime = self._state_mtime_ns()
            result = []
            seen = set()
            for record in read_versions(self.cache_dir):
                commit = record["commit"]
                seen.add(commit)
                walk, presence = self._measure(commit, state_mtime)
                total, cached = presence.bytes_total, presence.bytes_cached
                result.append({
                    "dataset": record["dataset"], "commit": commit, "refs": record["refs"],
                    "remote": record.get("remote"), "bytes_total": total,
                    "bytes_cached": cached,
                    "fraction_cached": round(cached / total, 6) if total else
                    (1.0 if walk.complete else 0.0),
                    "complete": walk.complete,
                })
            for stale in set(self._walks) - seen:
                del self._walks[stale]
            for stale in set(self._presence) - seen:
                del self._presence[stale]
            return result


_scanners: dict[str, CachedDatasets] = {}
_scanners_lock = threading.Lock()


def cached_datasets(cache_dir: str) -> list[dict[str, Any]]:
    """The dataset versions cached in `cache_dir` (one `CachedDatasets` per directory is kept
    for the process, so repeated calls reuse the walks)."""
    key = os.path.abspath(cache_dir)
    with _scanners_lock:
        scanner = _scanners.get(key)
        if scanner is None:
            scanner = _scanners[key] = CachedDatasets(key)
    return scanner.scan()


# -- the peer server ---------------------------------------------------------------------------

def peer_info(address: str, token: str | None,
              timeout: float = PEER_STATUS_TIMEOUT_S) -> dict[str, Any]:
    """The node's peer server at `address` as the inventory shows it (see the module doc)."""
    client = PeerClient(address, token)
    try:
        return {"address": address, "live": True, "server": client.status(timeout)}
    except (PeerCallError, ValueError) as e:  # ValueError: a Status that is not JSON
        return {"address": address, "live": False, "error": str(e)}
    finally:
        client.close()


# -- all of it --------------------------------------------------------------------------------

_gpus_seen: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
_gpus_lock = threading.Lock()


def _gpus(root: str) -> dict[str, Any]:
    """`gpu_info(root)`, reused for `GPU_TTL_S` (nvidia-smi can take a second on a big node)."""
    key = (root, os.environ.get("PATH", ""))
    with _gpus_lock:
        seen = _gpus_seen.get(key)
        if seen is not None and time.monotonic() - seen[0] < GPU_TTL_S:
            return copy.deepcopy(seen[1])
    found = gpu_info(root)
    with _gpus_lock:
        _gpus_seen[key] = (time.monotonic(), found)
    return copy.deepcopy(found)


def collect_inventory(cache_dir: str | None, root: str = "/",
                      node_name: str | None = None, peer_address: str | None = None,
                      peer_token: str | None = None) -> dict[str, Any]:
    """The node's inventory (shape: see the module doc). `cache_dir` None: no cache section
    and no datasets. `node_name` (the Kubernetes node name) wins over the host name, which in
    a pod is the pod's. `peer_address`: the node's peer server (asked with `peer_token`)."""
    return {
        "node": node_name or hostname(root),
        "cpu": cpu_info(root),
        "memory": memory_info(root),
        "numa": numa_info(root),
        "gpus": _gpus(root),
        "rdma": rdma_info(root),
        "network": network_info(root),
        "cache": cache_info(cache_dir) if cache_dir else None,
        "datasets": cached_datasets(cache_dir) if cache_dir else [],
        "peer": peer_info(peer_address, peer_token) if peer_address else None,
        "collected_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def _size(n: int | None) -> str:
    return "?" if n is None else format_size(n)


def describe(inventory: dict[str, Any]) -> str:
    """A compact human summary of an inventory (what `cachefs csi inventory` prints)."""
    lines = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<9} {text}")

    row("node", f"{inventory['node']}  (collected {inventory['collected_at']})")
    cpu = inventory["cpu"]
    physical = f", {cpu['physical_cores']} physical" if cpu.get("physical_cores") else ""
    row("cpu", f"{cpu['cores']} cores{physical}, {cpu.get('model') or 'unknown model'}")
    memory = inventory["memory"]
    row("memory", f"{_size(memory['total_bytes'])} total, "
                  f"{_size(memory['available_bytes'])} available")
    nodes = inventory["numa"]["nodes"]
    row("numa", "; ".join(f"node{n['id']} cpus {n['cpus'] or '-'} {_size(n['memory_bytes'])}"
                          for n in nodes) or "no NUMA information")
    gpus = inventory["gpus"]
    if gpus["count"]:
        memory_sizes = {d["memory_bytes"] for d in gpus["devices"] if d["memory_bytes"]}
        each = f", {_size(max(memory_sizes))} each" if len(memory_sizes) == 1 else ""
        row("gpus", f"{gpus['count']} x {', '.join(gpus['models']) or 'unknown model'}{each}"
                    f"  (from {gpus['source']})")
    else:
        row("gpus", "none")
    rdma = inventory["rdma"]["devices"]
    row("rdma", "; ".join(
        f"{d['name']} " + ", ".join(
            f"port {p['port']} {p['link_layer'] or '?'} {p['rate'] or '?'} {p['state'] or '?'}"
            for p in d["ports"]) for d in rdma) or "none")
    row("network", "; ".join(
        f"{n['name']} {n['state'] or '?'} "
        f"{str(n['speed_mbps']) + ' Mb/s' if n['speed_mbps'] else 'speed unknown'} "
        f"mtu {n['mtu']}" for n in inventory["network"]) or "none")
    cache = inventory.get("cache")
    if cache:
        row("cache", f"{cache['dir']}: {_size(cache['used_bytes'])} used of "
                     f"{_size(cache['capacity_bytes'])} (disk: {_size(cache['free_bytes'])} "
                     f"free of {_size(cache['filesystem_bytes'])})")
    peer = inventory.get("peer")
    if peer:
        row("peer", describe_peer(peer))
    datasets = inventory["datasets"]
    if not datasets:
        row("datasets", "none cached" if cache else "no cache directory given")
        return "\n".join(lines)
    row("datasets", f"{len(datasets)} version(s) cached:")
    table = [("DATASET", "COMMIT", "REFS", "CACHED", "TOTAL", "FRACTION")]
    for d in datasets:
        fraction = f"{d['fraction_cached'] * 100:.1f}%" + ("" if d["complete"] else " (partial)")
        table.append((d["dataset"], d["commit"][:12], ",".join(d["refs"]) or "-",
                      _size(d["bytes_cached"]), _size(d["bytes_total"]), fraction))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     .rstrip())
    return "\n".join(lines)


def describe_peer(peer: dict[str, Any]) -> str:
    """One line for the inventory's `peer` section."""
    if not peer.get("live"):
        return f"{peer.get('address')} not answering: {peer.get('error')}"
    server = peer.get("server") or {}
    advertised = server.get("address")
    name = peer.get("address") if advertised in (None, "", peer.get("address")) else (
        f"{advertised} (asked at {peer.get('address')})")
    return (f"{name} live: {server.get('served_from_cache', 0)} chunks served from its cache, "
            f"{server.get('served_from_origin', 0)} from the origin, "
            f"{_size(server.get('origin_bytes'))} read from the origin for its peers")
