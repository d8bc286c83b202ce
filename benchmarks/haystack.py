"""Haystack volume store benchmark: durable writes and random reads against one file per object.

One run, one disk (the work dir), three ways of storing the same objects:

- **store**: `storage_server.store.VolumeStore` in this process (needles appended to segment
  files, an LMDB index, group commit: concurrent writers share fsyncs);
- **grpc**: the same store behind `cachefs storage serve` on 127.0.0.1, through
  `storage_server.client.StorageClient` (one needle per Put call, as a client writing one object
  at a time would);
- **files**: the layout Haystack replaced: one file per object in a two-level fan-out tree
  (`objects/ab/cd/KEY`), each written with open/write/fsync/close (the directory is not fsynced:
  that favours the baseline). Its directories exist before the writes: all 65,536 (`--quick`:
  only those of its objects' keys).

Objects: 50,000 of ~110 KB (uniform 60-160 KB, like photos or JPEG training images) and 200 of
4 MiB (cachefs chunks); `--quick`: 500 and 10. Content is random (slices of one random
buffer), keys are the BLAKE3 of the content. Every phase uses 16 threads.

Phases, for each way: durable small writes, durable large writes, then `sync` and
`echo 1 > /proc/sys/vm/drop_caches` (root; without it the "cold" reads are warm and the JSON
says `"cold": false`), small reads in one random order (cold), the same again (warm), large
reads, and last the batched writes below (for the store and gRPC ways only, so they come after
the reads: every way has written the same bytes when its reads are measured). Figures:
writes/s, reads/s, MB/s; for the store, data `pread` calls per read from its own counter (a
read must be one index lookup and one pread); for files, a read is open+read+close.

Ratios (higher is better): `small_write_vs_files`, `small_read_cold_vs_files`,
`small_read_warm_vs_files`, `grpc_small_write_vs_files` (one object per Put, against one object
per file: the targets' figures); also `preads_per_read` (target exactly 1) and `grpc_large_mb_s`
(4 MiB Get calls through gRPC, a second pass: from the disk, see `measure`; target >= 500
MB/s). `batched_ratios` adds the same durable small writes sent 32 objects per Put (as a client
with many objects to store does, and as a file-per-object layout cannot: each file needs its
own fsync), under fresh keys.

Reproduce (root, from the repository root; the full run writes ~19 GB and takes minutes):

The **server memory cache** (`cachefs storage serve --memory-cache`, storage_server/
needle_cache.py) is measured last, on two fresh servers holding the same 4 MiB needles (16;
`--quick`: 4), one with the cache and one without: 32 concurrent readers (a client each) read
every needle, each in its own random order, cold (the volume files' pages dropped first).
`server_cache_disk_read_ratio` = the bytes the cached server read from the disk (`read_bytes`
of its /proc/PID/io) / the unique bytes (target <= 1.05: each needle read once, the other 31
readers served from memory or by the single flight). `server_cache_speedup` = the readers'
throughput with / without the cache, both servers in a blkio cgroup (v1
`blkio.throttle.read_bps_device`, or v2 `io.max`) limiting the disk's reads to
`THROTTLE_BPS` (200 MB/s, an HDD array or network disk; this VM's disk is faster than a Python
gRPC server, so unthrottled the cache would show little): target >= 2. Where no cgroup can be
set, `server_cache_speedup` is null and `server_cache.throttle` says why.

Reproduce (root, from the repository root; the full run writes ~19 GB and takes minutes):

    .venv/bin/python -m benchmarks.haystack --quick      # smoke run
    .venv/bin/python -m benchmarks.haystack --json > out.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import (
    benchmark_parser,
    emit,
    fmt_rate,
    log,
    meets,
    print_table,
    private_environment,
    rate,
    sync,
    timed,
    work_dir,
)
from benchmarks.read import evict_tree
from cachefs.dataset.objects import hash_bytes
from tests.servers import free_port

THREADS = 16
CHUNK = 16  # items a thread takes from the work list at a time
BATCH = 32  # objects per Put in the batched write phase
SMALL_MIN, SMALL_MAX = 60 * 1024, 160 * 1024
LARGE = 4 << 20
FULL = (50_000, 200)
QUICK = (500, 10)
TARGETS = {
    "small_write_vs_files": ">= 3",
    "small_read_cold_vs_files": ">= 1.5",
    "small_read_warm_vs_files": ">= 1",
    "grpc_small_write_vs_files": ">= 1",
    "preads_per_read": "<= 1",
    "grpc_large_mb_s": ">= 500",
    "server_cache_disk_read_ratio": "<= 1.05",
    "server_cache_speedup": ">= 2",
}
CACHE_READERS = 32
CACHE_NEEDLES = (16, 4)  # 4 MiB needles of the memory-cache phase: full, --quick
CACHE_SIZE = "256MiB"
THROTTLE_BPS = 200_000_000


class Objects:
    """The benchmark's objects: (key, offset, size) slices of one random buffer."""

    def __init__(self, small: int, large: int, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.buffer = memoryview(rng.randbytes(16 << 20))
        limit = len(self.buffer)

        def make(size: int) -> tuple[bytes, int, int]:
            offset = rng.randrange(0, limit - size)
            key = bytes.fromhex(hash_bytes(self.buffer[offset:offset + size]))
            return key, offset, size

        self.small = [make(rng.randint(SMALL_MIN, SMALL_MAX)) for _ in range(small)]
        self.large = [make(LARGE) for _ in range(large)]
        self.read_order = list(self.small)
        rng.shuffle(self.read_order)

    def data(self, item: tuple[bytes, int, int]) -> bytes:
        _, offset, size = item
        return bytes(self.buffer[offset:offset + size])

    @staticmethod
    def nbytes(items: Sequence[tuple[bytes, int, int]]) -> int:
        return sum(size for _, _, size in items)


def parallel(fn: Callable[[Any], None], items: Sequence[Any]) -> float:
    """Run fn over items on THREADS threads, each taking CHUNK items at a time; return wall
    seconds. (A future per item would cost more than a warm read: ThreadPoolExecutor.map ignores
    `chunksize`, and measured here one future per item held 16 threads to 5,000-12,000 reads/s
    of either layout, which read 40,000-50,000/s on one thread.)"""
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]

    def run_chunk(chunk: Sequence[Any]) -> None:
        for item in chunk:
            fn(item)

    def run() -> None:
        with ThreadPoolExecutor(THREADS) as pool:
            for _ in pool.map(run_chunk, chunks):
                pass
    return timed(run)[1]


def batches(items: Sequence[tuple[bytes, int, int]]) -> list[Sequence[tuple[bytes, int, int]]]:
    return [items[i:i + BATCH] for i in range(0, len(items), BATCH)]


def drop_caches() -> bool:
    sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError as e:
        log(f"cannot drop the page cache ({e}): 'cold' reads will be warm")
        return False


# -- the three ways --------------------------------------------------------------------------
class FilesWay:
    name = "files"

    def __init__(self, root: Path, objects: Objects, all_dirs: bool = True) -> None:
        self.root = root / "objects"
        self.objects = objects
        self.all_dirs = all_dirs

    def _path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.root, h[:2], h[2:4], h)

    def prepare(self) -> None:
        """Create the fan-out directories before the timed writes: all 65,536 of them, or
        (`all_dirs` False, --quick) only those the objects' keys need: the same paths, without
        making and removing some 65,000 empty directories (~20 s on a 2-vCPU VM's disk)."""
        if self.all_dirs:
            for a in range(256):
                for b in range(256):
                    os.makedirs(os.path.join(self.root, f"{a:02x}", f"{b:02x}"), exist_ok=True)
        else:
            for key, _, _ in [*self.objects.small, *self.objects.large]:
                os.makedirs(os.path.dirname(self._path(key)), exist_ok=True)
        sync()

    def write(self, item: tuple[bytes, int, int]) -> None:
        fd = os.open(self._path(item[0]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self.objects.data(item))
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, item: tuple[bytes, int, int]) -> None:
        fd = os.open(self._path(item[0]), os.O_RDONLY)
        try:
            data = os.read(fd, item[2] + 1)
        finally:
            os.close(fd)
        assert len(data) == item[2]

    def syscalls_per_read(self) -> float:
        return 3.0  # open, read, close: by construction


class StoreWay:
    name = "store"

    def __init__(self, root: Path, objects: Objects) -> None:
        from storage_server.store import VolumeStore

        self.store = VolumeStore(root / "store")
        self.objects = objects

    def prepare(self) -> None:
        pass

    def write(self, item: tuple[bytes, int, int]) -> None:
        self.store.put_many([(item[0], self.objects.data(item))])

    def write_batch(self, items: Sequence[tuple[bytes, int, int]]) -> None:
        self.store.put_many([(item[0], self.objects.data(item)) for item in items])

    def read(self, item: tuple[bytes, int, int]) -> None:
        data = self.store.get(item[0])
        assert len(data) == item[2]

    def preads(self) -> int:
        return int(self.store.stat()["preads"])

    def close(self) -> None:
        self.store.close()


class GrpcWay:
    name = "grpc"

    def __init__(self, root: Path, objects: Objects) -> None:
        from storage_server.client import StorageClient

        self.objects = objects
        self.address = f"127.0.0.1:{free_port()}"  # subclasses may set `extra` serve options
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cachefs.cli.main", "storage", "serve",
             "--data-dir", str(root / "grpc-store"), "--listen", self.address,
             *getattr(self, "extra", ())],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.client = StorageClient(self.address)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.stat()
                break
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the storage server did not start: "
                                       + (self.process.stderr.read() if self.process.stderr
                                          else "")) from None
                time.sleep(0.1)  # a subprocess's socket has no event to await

    def prepare(self) -> None:
        pass

    def write(self, item: tuple[bytes, int, int]) -> None:
        self.client.put_many([(item[0], self.objects.data(item))])

    def write_batch(self, items: Sequence[tuple[bytes, int, int]]) -> None:
        self.client.put_many([(item[0], self.objects.data(item)) for item in items])

    def read(self, item: tuple[bytes, int, int]) -> None:
        data = self.client.get(item[0])
        assert len(data) == item[2]

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


# -- the server's memory cache ---------------------------------------------------------------
def disk_read_bytes(pid: int) -> int:
    """Bytes the process made the block layer read (/proc/PID/io; page-cache hits do not
    count)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"no read_bytes in /proc/{pid}/io")


def whole_disk(path: Path) -> str:
    """MAJ:MIN of the block device (the whole disk, not a partition) holding `path`."""
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sys_dev.exists():
        raise OSError(f"{path} is on device {os.major(dev)}:{os.minor(dev)}, not a block device")
    if (sys_dev / "partition").exists():
        return (sys_dev.resolve().parent / "dev").read_text().strip()
    return (sys_dev / "dev").read_text().strip()


class ReadThrottle:
    """A cgroup whose processes read the disk under `path` at most `bps` bytes/s: v1 blkio
    (`blkio.throttle.read_bps_device`) or v2 (`io.max`). `open` returns None and `reason` says
    why where neither can be set."""

    def __init__(self, directory: Path, device: str, v2: bool) -> None:
        self.directory, self.device, self.v2 = directory, device, v2

    reason = ""

    @classmethod
    def open(cls, path: Path, bps: int) -> ReadThrottle | None:
        name = f"cachefs-bench-{os.getpid()}"
        try:
            device = whole_disk(path)
        except OSError as e:
            cls.reason = str(e)
            return None
        v1 = Path("/sys/fs/cgroup/blkio")
        v2 = Path("/sys/fs/cgroup")
        tried = []
        if (v1 / "blkio.throttle.read_bps_device").exists():
            directory = v1 / name
            try:
                directory.mkdir()
                (directory / "blkio.throttle.read_bps_device").write_text(f"{device} {bps}\n")
                return cls(directory, device, v2=False)
            except OSError as e:
                tried.append(f"cgroup v1 blkio: {e}")
                with contextlib.suppress(OSError):
                    directory.rmdir()
        controllers = v2 / "cgroup.controllers"
        if controllers.exists() and "io" in controllers.read_text().split():
            directory = v2 / name
            try:
                with contextlib.suppress(OSError):
                    (v2 / "cgroup.subtree_control").write_text("+io\n")
                directory.mkdir()
                (directory / "io.max").write_text(f"{device} rbps={bps}\n")
                return cls(directory, device, v2=True)
            except OSError as e:
                tried.append(f"cgroup v2 io.max: {e}")
                with contextlib.suppress(OSError):
                    directory.rmdir()
        elif not tried:
            tried.append("neither cgroup v1 blkio throttling nor a cgroup v2 io controller "
                         "is offered here")
        cls.reason = "; ".join(tried)
        return None

    def add(self, pid: int) -> None:
        (self.directory / "cgroup.procs").write_text(f"{pid}\n")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.directory.rmdir()


class CachedServer(GrpcWay):
    """A storage server for the memory-cache phase: `--memory-cache SIZE` (0: off)."""

    name = "cache"

    def __init__(self, root: Path, objects: Objects, memory_cache: str) -> None:
        self.extra = ("--memory-cache", memory_cache)
        super().__init__(root, objects)


def concurrent_reads(address: str, items: Sequence[tuple[bytes, int, int]]) -> float:
    """CACHE_READERS clients, each reading every item in its own random order, all starting
    together; wall seconds."""
    import threading

    from storage_server.client import StorageClient

    clients = [StorageClient(address) for _ in range(CACHE_READERS)]
    barrier = threading.Barrier(CACHE_READERS + 1)

    def reader(i: int) -> None:
        order = list(items)
        random.Random(i).shuffle(order)
        barrier.wait()
        for key, _, size in order:
            assert len(clients[i].get(key)) == size

    try:
        with ThreadPoolExecutor(CACHE_READERS) as pool:
            futures = [pool.submit(reader, i) for i in range(CACHE_READERS)]
            barrier.wait()
            start = time.perf_counter()
            for future in futures:
                future.result()
            return time.perf_counter() - start
    finally:
        for client in clients:
            client.close()


def measure_server_cache(work: Path, objects: Objects, needles: int) -> dict[str, Any]:
    """The memory-cache phase (module docstring): disk-read ratio and speedup."""
    items = objects.large[:needles]
    unique = Objects.nbytes(items)
    throttle = ReadThrottle.open(work, THROTTLE_BPS)
    result: dict[str, Any] = {
        "readers": CACHE_READERS, "needles": len(items), "unique_bytes": unique,
        "memory_cache": CACHE_SIZE,
        "throttle": ({"device": throttle.device, "read_bps": THROTTLE_BPS,
                      "cgroup": "v2 io.max" if throttle.v2 else "v1 blkio"}
                     if throttle else {"unavailable": ReadThrottle.reason})}
    try:
        for label, size in (("with", CACHE_SIZE), ("without", "0")):
            root = work / f"cache-{label}"
            root.mkdir()
            server = CachedServer(root, objects, size)
            try:
                for item in items:
                    server.write(item)
                if throttle:
                    throttle.add(server.process.pid)
                evict_tree(root)
                log(f"server cache: {CACHE_READERS} readers of {len(items)} needles of 4 MiB, "
                    f"cold, {label} the cache{' (disk reads throttled)' if throttle else ''}")
                before = disk_read_bytes(server.process.pid)
                seconds = concurrent_reads(server.address, items)
                disk = disk_read_bytes(server.process.pid) - before
                result[label] = {"seconds": seconds, "disk_read_bytes": disk,
                                 "mb_s": rate(unique * CACHE_READERS, seconds) / 1e6,
                                 "stat": server.client.stat().get("memory_cache")}
            finally:
                server.close()
    finally:
        if throttle:
            throttle.close()
    result["disk_read_ratio"] = result["with"]["disk_read_bytes"] / unique
    speedup = result["with"]["mb_s"] / result["without"]["mb_s"]
    result["speedup"] = speedup if throttle else None
    result["speedup_unthrottled"] = None if throttle else speedup
    return result


def measure(way: Any, objects: Objects) -> dict[str, Any]:
    log(f"{way.name}: preparing")
    way.prepare()
    small_bytes = Objects.nbytes(objects.small)
    large_bytes = Objects.nbytes(objects.large)
    log(f"{way.name}: {len(objects.small):,} durable small writes")
    small_write_s = parallel(way.write, objects.small)
    log(f"{way.name}: {len(objects.large)} durable large writes")
    large_write_s = parallel(way.write, objects.large)
    cold = drop_caches()
    preads_before = way.preads() if hasattr(way, "preads") else 0
    log(f"{way.name}: small reads, random order, cold")
    cold_s = parallel(way.read, objects.read_order)
    preads = (way.preads() - preads_before) if hasattr(way, "preads") else None
    log(f"{way.name}: small reads, warm")
    warm_s = parallel(way.read, objects.read_order)
    log(f"{way.name}: large reads")
    # a first pass warms the page cache for files; the store reads a large needle that is not
    # in it with O_DIRECT, leaving it uncached, so its (and gRPC's) figure stays the disk's
    parallel(way.read, objects.large)
    large_read_s = parallel(way.read, objects.large)
    batched_s = None
    if hasattr(way, "write_batch"):
        # the same objects again, as a client with many objects sends them: BATCH per Put
        # (already stored: the store skips them, so rewrite under fresh keys). Last, so that
        # every way has written the same bytes when its reads are measured (this disk slows
        # down as gigabytes go by).
        log(f"{way.name}: {len(objects.small):,} durable small writes, {BATCH} per call")
        fresh = [(bytes([k[0] ^ 0xFF]) + k[1:], off, size) for k, off, size in objects.small]
        batched_s = parallel(way.write_batch, batches(fresh))
    n = len(objects.small)
    result = {
        "small_writes_s": n / small_write_s,
        "small_write_mb_s": rate(small_bytes, small_write_s) / 1e6,
        "large_write_mb_s": rate(large_bytes, large_write_s) / 1e6,
        "small_reads_cold_s": n / cold_s,
        "small_reads_warm_s": n / warm_s,
        "small_read_cold_mb_s": rate(small_bytes, cold_s) / 1e6,
        "large_read_mb_s": rate(large_bytes, large_read_s) / 1e6,
        "cold": cold,
        "seconds": {"small_write": small_write_s, "large_write": large_write_s,
                    "small_read_cold": cold_s, "small_read_warm": warm_s,
                    "large_read": large_read_s},
    }
    if batched_s is not None:
        result["small_writes_batched_s"] = n / batched_s
        result["seconds"]["small_write_batched"] = batched_s
    if preads is not None:
        result["preads_per_read"] = preads / n
    elif hasattr(way, "syscalls_per_read"):
        result["syscalls_per_read"] = way.syscalls_per_read()
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    small, large = QUICK if args.quick else FULL
    objects = Objects(small, large)
    log(f"{small:,} objects of 60-160 KB and {large} of 4 MiB, {THREADS} threads")
    raw: dict[str, Any] = {}
    with work_dir(args.dir, args.keep, prefix="cachefs-haystack-") as work, \
            private_environment(work):
        for cls in (FilesWay, StoreWay, GrpcWay):
            way = (FilesWay(work, objects, all_dirs=not args.quick) if cls is FilesWay
                   else cls(work, objects))
            try:
                raw[way.name] = measure(way, objects)
            finally:
                if hasattr(way, "close"):
                    way.close()
            sync()
        server_cache = measure_server_cache(work, objects, CACHE_NEEDLES[bool(args.quick)])
    files, store, grpc = raw["files"], raw["store"], raw["grpc"]
    ratios = {
        "small_write_vs_files": store["small_writes_s"] / files["small_writes_s"],
        "small_read_cold_vs_files": store["small_reads_cold_s"] / files["small_reads_cold_s"],
        "small_read_warm_vs_files": store["small_reads_warm_s"] / files["small_reads_warm_s"],
        "grpc_small_write_vs_files": grpc["small_writes_s"] / files["small_writes_s"],
    }
    batched = {
        "small_write_batched_vs_files":
            store["small_writes_batched_s"] / files["small_writes_s"],
        "grpc_small_write_batched_vs_files":
            grpc["small_writes_batched_s"] / files["small_writes_s"],
    }
    figures = {**ratios, "preads_per_read": store["preads_per_read"],
               "grpc_large_mb_s": grpc["large_read_mb_s"],
               "server_cache_disk_read_ratio": server_cache["disk_read_ratio"]}
    if server_cache["speedup"] is not None:
        figures["server_cache_speedup"] = server_cache["speedup"]
    return {
        "quick": bool(args.quick),
        "objects": {"small": small, "large": large, "threads": THREADS},
        "ratios": ratios,
        "batched_ratios": batched,
        "preads_per_read": store["preads_per_read"],
        "grpc_large_mb_s": grpc["large_read_mb_s"],
        "server_cache_disk_read_ratio": server_cache["disk_read_ratio"],
        "server_cache_speedup": server_cache["speedup"],
        "server_cache": server_cache,
        "targets": TARGETS,
        "met": {k: meets(v, TARGETS[k]) for k, v in figures.items()},
        "raw": raw,
    }


def print_report(report: dict[str, Any]) -> None:
    raw = report["raw"]
    rows = []
    for name in ("files", "store", "grpc"):
        r = raw[name]
        rows.append([name, f"{r['small_writes_s']:,.0f}", f"{r['small_write_mb_s']:,.0f}",
                     f"{r['large_write_mb_s']:,.0f}", f"{r['small_reads_cold_s']:,.0f}",
                     f"{r['small_reads_warm_s']:,.0f}", f"{r['large_read_mb_s']:,.0f}"])
    print_table("Durable writes and random reads (per second; MB/s)",
                ["way", "small w/s", "small MB/s", "large w MB/s", "cold r/s", "warm r/s",
                 "large r MB/s"], rows,
                notes=[f"cold reads after dropping the page cache: {raw['store']['cold']}"])
    figures = {**report["ratios"], "preads_per_read": report["preads_per_read"],
               "grpc_large_mb_s": report["grpc_large_mb_s"],
               "server_cache_disk_read_ratio": report["server_cache_disk_read_ratio"]}
    if report["server_cache_speedup"] is not None:
        figures["server_cache_speedup"] = report["server_cache_speedup"]
    cache = report["server_cache"]
    throttle = cache["throttle"]
    print_table("\nFigures", ["figure", "value", "target", "met"],
                [[k, f"{v:.2f}", TARGETS[k], "yes" if report["met"][k] else "NO"]
                 for k, v in figures.items()],
                notes=[f"large transfer through gRPC: {fmt_rate(report['grpc_large_mb_s'] * 1e6)}",
                       *(f"{k}: {v:.2f} ({BATCH} objects per Put, 16 writers)"
                         for k, v in report["batched_ratios"].items()),
                       f"server memory cache: {cache['readers']} readers x {cache['needles']} "
                       f"needles of 4 MiB, cold: {cache['with']['mb_s']:,.0f} MB/s with, "
                       f"{cache['without']['mb_s']:,.0f} MB/s without; disk reads "
                       + (f"throttled to {throttle['read_bps'] / 1e6:.0f} MB/s "
                          f"({throttle['cgroup']}, device {throttle['device']})"
                          if "read_bps" in throttle else
                          f"NOT throttled ({throttle['unavailable']}): no speedup figure")])


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "haystack", "the Haystack volume store against one file per object: durable writes, "
                    "cold and warm random reads, gRPC transfer")
    args = parser.parse_args(argv)
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main(sys.argv[1:])
