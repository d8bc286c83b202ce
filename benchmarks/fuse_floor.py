"""What FUSE itself allows on this machine: cold reads through a C passthrough, beside the SSD tier.

Why. `benchmarks.read` compares the SSD tier with the local disk read cold
(`warm_ssd_small_vs_local_cold`, `warm_ssd_large_vs_disk`). Part of any gap is FUSE's own
cost: every file a LOOKUP and a READ through /dev/fuse, every byte copied into the mount's page
cache, on the same CPUs as the readers. This benchmark measures that part with a FUSE file system
that does nothing but pass reads through, written in C and multi-threaded: `bindfs`
(Debian, installed by the run as root when missing) over the dataset's source directory,
mounted read-only with the kernel caching entries, attributes and pages like a cachefs mount
(`-o ro,kernel_cache,entry_timeout=86400,attr_timeout=86400 --multithreaded`). Its ratio to
the local disk is what any FUSE daemon can hope for here; the SSD tier's ratio to it is what is
left to cachefs's own daemon.

What it measures, in one run (everything on 127.0.0.1 and the work dir's disk):

1. Data: `cachefs.sample.make_sample` (full: 20,000 files of ~110 KB in 100 class directories
   plus four 256 MiB shards, as `benchmarks.read`; `--quick`: 500 files and two 32 MiB shards),
   committed to the built-in `local` remote (a file:// repository in the run's private
   XDG_DATA_HOME). One cachefs mount (`--memory-cache 256MiB`, smaller than the data) reads
   everything once, which fills its SSD tier; it is unmounted.
2. PASSES rounds (2; `--quick`: 1), each in this order, so that drift hits every system alike:
   - small files, 8 reader threads, one shuffled order (`benchmarks.read.read_parallel`):
     local disk cold (each file dropped from the page cache with POSIX_FADV_DONTNEED first),
     bindfs cold (the source's and the mount's pages dropped), and the cachefs SSD tier (the
     cache dir's objects dropped, a fresh mount on it, first pass);
   - large files, one thread, 1 MiB reads: the disk's sequential read (4 MiB O_DIRECT reads,
     `benchmarks.read.disk_sequential_read`), bindfs cold, the cachefs SSD tier (as above).
   Figures are the best pass of each; every pass checks the bytes it read, and each SSD-tier
   pass records the mount's counters over it (`counters`: SSD hits, origin requests, ...).
3. Ratios: `bindfs_small_vs_local_cold`, `bindfs_large_vs_disk` (the FUSE floor),
   `ssd_small_vs_bindfs`, `ssd_large_vs_bindfs` (cachefs against it), and this run's
   `warm_ssd_small_vs_local_cold`, `warm_ssd_large_vs_disk` (the same figures as
   `benchmarks.read`'s, from this run's passes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FULL_DATASET,
    benchmark_parser,
    describe_spec,
    emit,
    fmt_bytes,
    log,
    print_table,
    private_environment,
    sync,
    work_dir,
)
from benchmarks.read import (
    DEFAULT_READERS,
    QUICK_SPEC,
    Pass,
    Processes,
    best,
    checked,
    commit_to,
    counters,
    delta,
    disk_sequential_read,
    drop_pages,
    evict_tree,
    generate,
    install_missing,
    pass_doc,
    read_parallel,
    read_sequential,
)
from cachefs.names import parse_size

PASSES = 2
QUICK_PASSES = 1
MEMORY_CACHE = "256MiB"
BINDFS_OPTIONS = ["--multithreaded", "-f", "-o",
                  "ro,kernel_cache,entry_timeout=86400,attr_timeout=86400"]
TARGETS: dict[str, str] = {}  # figures that explain others (benchmarks.read's), not goals


def ensure_bindfs() -> None:
    """Install bindfs with apt-get when missing (as root), or exit saying how."""
    if install_missing(("bindfs",)):
        raise SystemExit("benchmarks.fuse_floor: needs bindfs: `apt-get install -y bindfs` "
                         "(as root)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = QUICK_SPEC if args.quick else FULL_DATASET
    rounds = QUICK_PASSES if args.quick else PASSES
    ensure_bindfs()
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        raise SystemExit("benchmarks.fuse_floor: needs FUSE (/dev/fuse and fusermount3)")
    readers = args.readers
    memory_cache = parse_size(MEMORY_CACHE)
    raw: dict[str, Any] = {"dataset": describe_spec(spec), "cpus": os.cpu_count(),
                           "readers": readers, "passes": rounds, "memory_cache": memory_cache,
                           "bindfs_options": " ".join(BINDFS_OPTIONS)}
    tier_counters: dict[str, list[dict[str, int]]] = {"ssd_small": [], "ssd_large": []}
    passes: dict[str, list[Pass]] = {name: [] for name in (
        "local_small_cold", "bindfs_small_cold", "ssd_small",
        "disk_sequential_read", "bindfs_large_cold", "ssd_large")}
    with work_dir(args.dir, args.keep, prefix="cachefs-floor-") as work, \
            private_environment(work):
        (work / "logs").mkdir()
        procs = Processes(work)
        try:
            log(f"generating the dataset: {describe_spec(spec)}")
            data = generate(work / "src", spec)
            raw.update(small_files=len(data.small), small_bytes=data.small_bytes,
                       large_files=len(data.large), large_bytes=data.large_bytes)
            sync()
            repo = Path(os.environ["XDG_DATA_HOME"]) / "cachefs" / "repo"
            commit_to("file://" + str(repo), data.src)
            cache, mnt, floor = work / "cache", work / "mnt" / "cachefs", work / "mnt" / "bindfs"

            log("filling the SSD tier (one cachefs mount reads everything once)")
            procs.mount_cachefs("local", mnt, cache, memory_cache)
            checked(read_parallel(data.paths(mnt, "small"), readers), data.small_bytes, "fill")
            checked(read_sequential(data.paths(mnt, "large")), data.large_bytes, "fill")
            procs.unmount_cachefs(mnt)

            log(f"bindfs {' '.join(BINDFS_OPTIONS)} {data.src} {floor}")
            bindfs = procs.start_tool("bindfs", ["bindfs", *BINDFS_OPTIONS, str(data.src),
                                                 str(floor)], floor, work / "logs" / "bindfs")
            src_small, src_large = data.paths(data.src, "small"), data.paths(data.src, "large")
            fuse_small, fuse_large = data.paths(floor, "small"), data.paths(floor, "large")

            def ssd_pass(kind: str, read: Callable[[list[str]], Pass], expected: int) -> Pass:
                evict_tree(cache, within="objects")
                sync()
                procs.mount_cachefs("local", mnt, cache, memory_cache)
                try:
                    before = counters(mnt)
                    result = checked(read(data.paths(mnt, kind)), expected, f"ssd {kind}")
                    tier_counters[f"ssd_{kind}"].append(delta(before, counters(mnt)))
                    return result
                finally:
                    procs.unmount_cachefs(mnt)

            small = lambda paths: read_parallel(paths, readers)  # noqa: E731
            for i in range(rounds):
                log(f"round {i + 1} of {rounds}: small files")
                drop_pages(src_small)
                passes["local_small_cold"].append(
                    checked(small(src_small), data.small_bytes, "local small"))
                drop_pages(src_small)
                drop_pages(fuse_small)
                passes["bindfs_small_cold"].append(
                    checked(small(fuse_small), data.small_bytes, "bindfs small"))
                passes["ssd_small"].append(ssd_pass("small", small, data.small_bytes))
                log(f"round {i + 1} of {rounds}: large files")
                passes["disk_sequential_read"].append(
                    checked(disk_sequential_read(src_large), data.large_bytes, "disk"))
                drop_pages(src_large)
                drop_pages(fuse_large)
                passes["bindfs_large_cold"].append(
                    checked(read_sequential(fuse_large), data.large_bytes, "bindfs large"))
                passes["ssd_large"].append(ssd_pass("large", read_sequential, data.large_bytes))
            procs.stop_tool(floor, bindfs)
        finally:
            procs.close()
    results = {name: pass_doc(best(got), [p.seconds for p in got])
               for name, got in passes.items()}
    for name, seen in tier_counters.items():  # the daemon's counters over the best pass
        results[name]["counters"] = seen[passes[name].index(best(passes[name]))]
    raw["results"] = results
    fps = {name: best(got).files_per_s for name, got in passes.items()}
    bps = {name: best(got).bytes_per_s for name, got in passes.items()}
    ratios = {
        "bindfs_small_vs_local_cold": fps["bindfs_small_cold"] / fps["local_small_cold"],
        "ssd_small_vs_bindfs": fps["ssd_small"] / fps["bindfs_small_cold"],
        "warm_ssd_small_vs_local_cold": fps["ssd_small"] / fps["local_small_cold"],
        "bindfs_large_vs_disk": bps["bindfs_large_cold"] / bps["disk_sequential_read"],
        "ssd_large_vs_bindfs": bps["ssd_large"] / bps["bindfs_large_cold"],
        "warm_ssd_large_vs_disk": bps["ssd_large"] / bps["disk_sequential_read"],
    }
    return {"ratios": {k: round(v, 3) for k, v in ratios.items()}, "raw": raw,
            "targets": dict(TARGETS), "quick": bool(args.quick)}


def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]
    res = raw["results"]

    def fps(name: str) -> str:
        return f"{res[name]['files_per_s']:,.0f} files/s"

    def mbs(name: str) -> str:
        return f"{res[name]['mb_per_s']:,.0f} MB/s"

    rows = [
        ["small, cold", "local disk", fps("local_small_cold"), "", ""],
        ["", "bindfs (C FUSE passthrough)", fps("bindfs_small_cold"),
         "bindfs_small_vs_local_cold", f"{r['bindfs_small_vs_local_cold']:.2f}"],
        ["", "cachefs SSD tier", fps("ssd_small"), "ssd_small_vs_bindfs",
         f"{r['ssd_small_vs_bindfs']:.2f}"],
        ["", "", "", "warm_ssd_small_vs_local_cold", f"{r['warm_ssd_small_vs_local_cold']:.2f}"],
        ["large, cold", "disk, O_DIRECT 4 MiB", mbs("disk_sequential_read"), "", ""],
        ["", "bindfs (C FUSE passthrough)", mbs("bindfs_large_cold"), "bindfs_large_vs_disk",
         f"{r['bindfs_large_vs_disk']:.2f}"],
        ["", "cachefs SSD tier", mbs("ssd_large"), "ssd_large_vs_bindfs",
         f"{r['ssd_large_vs_bindfs']:.2f}"],
        ["", "", "", "warm_ssd_large_vs_disk", f"{r['warm_ssd_large_vs_disk']:.2f}"],
    ]
    title = (f"FUSE floor: {raw['small_files']:,} small files "
             f"({fmt_bytes(raw['small_bytes'])}), {raw['large_files']} large "
             f"({fmt_bytes(raw['large_bytes'])})")
    notes = [
        *(["--quick: a smoke run; its passes are too short to compare."] if report["quick"]
          else []),
        f"Best of {raw['passes']} pass(es) each, interleaved; {raw['readers']} reader threads "
        f"for small files, one for large; bindfs {raw['bindfs_options']}; cachefs "
        f"--memory-cache {fmt_bytes(raw['memory_cache'])}, its cache dir's objects dropped from "
        "the page cache before each SSD-tier pass.",
    ]
    print_table(title, ["files", "system", "throughput", "ratio", "value"], rows, notes)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "fuse_floor", "cold reads through a C FUSE passthrough (bindfs) beside cachefs's SSD "
                      "tier and the local disk: what FUSE itself allows on this machine")
    parser.add_argument("--readers", type=int, default=DEFAULT_READERS,
                        help=f"small-file reader threads (default {DEFAULT_READERS})")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
