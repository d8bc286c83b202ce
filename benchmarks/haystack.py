"""Haystack volume store benchmark: durable writes and random reads against one file per object.

One run, one disk (the work dir), three ways of storing the same objects:

- **store**: `storage_server.store.VolumeStore` in this process (needles appended to segment
  files, an LMDB index, group commit: concurrent writers share fsyncs);
- **grpc**: the same store behind `cachefs storage serve` on 127.0.0.1, through
  `storage_server.client.StorageClient` (one needle per Put call, as a client writing one object
  at a time would);
- **files**: the layout Haystack replaced: one file per object in a two-level fan-out tree
  (`objects/ab/cd/KEY`), each written with open/write/fsync/close (the directory is not fsynced:
  that favours the baseline).

Objects: 50,000 of ~110 KB (uniform 60-160 KB, like photos or JPEG training images) and 200 of
4 MiB (cachefs chunks); `--quick`: 2,000 and 10. Content is random (slices of one random
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

    .venv/bin/python -m benchmarks.haystack --quick      # smoke run
    .venv/bin/python -m benchmarks.haystack --json > out.json
"""

from __future__ import annotations

import argparse
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
from cachefs.dataset.objects import hash_bytes
from tests.servers import free_port

THREADS = 16
CHUNK = 16  # items a thread takes from the work list at a time
BATCH = 32  # objects per Put in the batched write phase
SMALL_MIN, SMALL_MAX = 60 * 1024, 160 * 1024
LARGE = 4 << 20
FULL = (50_000, 200)
QUICK = (2_000, 10)
TARGETS = {
    "small_write_vs_files": ">= 3",
    "small_read_cold_vs_files": ">= 1.5",
    "small_read_warm_vs_files": ">= 1",
    "grpc_small_write_vs_files": ">= 1",
    "preads_per_read": "<= 1",
    "grpc_large_mb_s": ">= 500",
}


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

    def __init__(self, root: Path, objects: Objects) -> None:
        self.root = root / "objects"
        self.objects = objects

    def _path(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self.root, h[:2], h[2:4], h)

    def prepare(self) -> None:
        for a in range(256):
            for b in range(256):
                os.makedirs(os.path.join(self.root, f"{a:02x}", f"{b:02x}"), exist_ok=True)
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
        self.address = f"127.0.0.1:{free_port()}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cachefs.cli.main", "storage", "serve",
             "--data-dir", str(root / "grpc-store"), "--listen", self.address],
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
            way = cls(work, objects)
            try:
                raw[way.name] = measure(way, objects)
            finally:
                if hasattr(way, "close"):
                    way.close()
            sync()
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
               "grpc_large_mb_s": grpc["large_read_mb_s"]}
    return {
        "quick": bool(args.quick),
        "objects": {"small": small, "large": large, "threads": THREADS},
        "ratios": ratios,
        "batched_ratios": batched,
        "preads_per_read": store["preads_per_read"],
        "grpc_large_mb_s": grpc["large_read_mb_s"],
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
               "grpc_large_mb_s": report["grpc_large_mb_s"]}
    print_table("\nFigures", ["figure", "value", "target", "met"],
                [[k, f"{v:.2f}", TARGETS[k], "yes" if report["met"][k] else "NO"]
                 for k, v in figures.items()],
                notes=[f"large transfer through gRPC: {fmt_rate(report['grpc_large_mb_s'] * 1e6)}",
                       *(f"{k}: {v:.2f} ({BATCH} objects per Put, 16 writers)"
                         for k, v in report["batched_ratios"].items())])


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "haystack", "the Haystack volume store against one file per object: durable writes, "
                    "cold and warm random reads, gRPC transfer")
    args = parser.parse_args(argv)
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main(sys.argv[1:])
