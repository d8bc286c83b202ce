"""The SSD tier when the page cache is smaller than the data set: small files in a memory cgroup.

Why. The SSD tier exists for data sets larger than memory (ImageNet-scale training), and that is
where the page cache cannot keep a whole 4 MiB pack of small files until the pack's other files
are read. `benchmarks.read` cannot show it on a machine whose memory holds its data set; this
benchmark makes the page cache small instead: the readers and the mount daemon run in a memory
cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`) whose limit leaves `--page-cache` bytes
(default a third of the small files' bytes) above what the processes themselves use.

What it measures, in one run:

1. Data: the small files of `benchmarks.read`'s data set (full: 20,000 files of ~110 KB in 100
   class directories; `--quick`: 500 files in 5), committed to the built-in `local` remote; one
   cachefs mount (outside the cgroup) reads them once, which fills its SSD tier.
2. PASSES rounds (2; `--quick`: 1), each inside the cgroup, the limit set just before the
   pass (usage then + the page-cache budget) and lifted after it:
   - local disk cold: the source files, each dropped from the page cache first
     (POSIX_FADV_DONTNEED), read by 8 threads in one shuffled order
     (`benchmarks.read.read_parallel`);
   - cachefs SSD tier: the cache dir's objects dropped from the page cache, a fresh mount on it
     (`--memory-cache 512MiB`, the default; its chunks stay empty, since ranges do not enter
     it), the same files and order; the daemon's disk reads come from its
     `/proc/PID/io` `read_bytes`, its decisions from the mount's counters
     (`ssd_pack_prefetches`: whole packs asked for, `ssd_pack_prefetches_skipped`: ranges only).
3. Ratios: `ssd_small_vs_local_cold_limited` (files/s), `ssd_read_amplification_limited` (bytes
   the daemon read from the disk / the files' bytes; the local pass's own figure is in raw).

Needs root and a memory cgroup controller; exits saying so otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import secrets
import signal
import sys
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
    checked,
    commit_to,
    drop_pages,
    evict_tree,
    generate,
    pass_doc,
    read_parallel,
)
from cachefs.fuse.mount import mount_stats
from cachefs.names import parse_size

PASSES = 2
QUICK_PASSES = 1
# The mount default: decoded trees get a quarter of it (a smaller one thrashes them here).
MEMORY_CACHE = "512MiB"
TARGETS = {"ssd_read_amplification_limited": "<= 3"}
_COUNTERS = ("ssd_hits", "origin_requests", "ssd_pack_prefetches", "ssd_pack_prefetches_skipped")


def memory_controller() -> tuple[Path, str] | None:
    """(the hierarchy new memory cgroups go in, their limit file): cgroup v1's memory controller
    or v2's; None where there is neither."""
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    if (v1 / "memory.limit_in_bytes").exists():
        return v1, "memory.limit_in_bytes"
    controllers = v2 / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return v2, "memory.max"
    return None


class MemoryLimit:
    """A memory cgroup of our own, with a limit set per pass. The benchmark joins it itself (its
    children, the mount daemon among them, follow); tests put a child process in it."""

    def __init__(self, directory: Path, limit_file: str) -> None:
        self.directory, self.limit_file = directory, limit_file
        self._home: Path | None = None  # where this process was before `join`

    @staticmethod
    def unavailable() -> str | None:
        """Why no memory cgroup can be created here (None: one can)."""
        found = memory_controller()
        if found is None:
            return "no memory cgroup controller (cgroup v1 memory or v2 memory.max)"
        if not os.access(found[0], os.W_OK):
            return f"{found[0]} is not writable: run as root"
        return None

    @classmethod
    def create(cls) -> MemoryLimit:
        """A new group without a limit (OSError where it cannot be made: see `unavailable`)."""
        found = memory_controller()
        if found is None:
            raise OSError(errno.ENOENT, "no memory cgroup controller")
        root, limit_file = found
        if limit_file == "memory.max":  # v2: children get the controller only when asked
            with contextlib.suppress(OSError):
                (root / "cgroup.subtree_control").write_text("+memory\n")
        directory = root / f"cachefs-bench-{os.getpid()}-{secrets.token_hex(4)}"
        directory.mkdir()
        return cls(directory, limit_file)

    @property
    def procs(self) -> Path:
        """The group's cgroup.procs: write a pid to it to move that process in."""
        return self.directory / "cgroup.procs"

    def join(self) -> None:
        """Move this process in (its children to come follow it)."""
        v1 = self.limit_file == "memory.limit_in_bytes"
        self._home = self.directory.parent / _own_cgroup("memory" if v1 else "")
        self.procs.write_text(f"{os.getpid()}\n")

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.limit_file == "memory.limit_in_bytes" \
            else "memory.current"
        return int((self.directory / name).read_text())

    def limit(self, size: int | None) -> None:
        """Limit the group to `size` bytes (None: no limit)."""
        if size is None:
            value = "-1" if self.limit_file == "memory.limit_in_bytes" else "max"
        else:
            value = str(size)
        (self.directory / self.limit_file).write_text(value)

    def leave(self) -> None:
        """Move this process back where it was before `join`; never raises."""
        if self._home is not None:
            with contextlib.suppress(OSError):
                (self._home / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def remove(self) -> None:
        """Remove the group, which no process may be in any more; never raises."""
        with contextlib.suppress(OSError):
            self.limit(None)
        with contextlib.suppress(OSError):
            self.directory.rmdir()


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path (relative) for a v1 controller, or the v2 one ('')."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(",") or (not controller and not controllers):
            return path.lstrip("/")
    return ""


def _read_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = dataclasses.replace(QUICK_SPEC if args.quick else FULL_DATASET, large_files=0)
    rounds = QUICK_PASSES if args.quick else PASSES
    readers = args.readers
    memory_cache = parse_size(MEMORY_CACHE)
    raw: dict[str, Any] = {"dataset": describe_spec(spec), "cpus": os.cpu_count(),
                           "readers": readers, "passes": rounds, "memory_cache": memory_cache}
    local_passes: list[Pass] = []
    ssd_passes: list[Pass] = []
    local_amp: list[float] = []
    ssd_amp: list[float] = []
    ssd_counters: list[dict[str, int]] = []
    with work_dir(args.dir, args.keep, prefix="cachefs-pressure-") as work, \
            private_environment(work):
        (work / "logs").mkdir()
        procs = Processes(work)
        group: MemoryLimit | None = None
        try:
            log(f"generating the dataset: {describe_spec(spec)}")
            data = generate(work / "src", spec)
            budget = (parse_size(args.page_cache) if args.page_cache
                      else data.small_bytes // 3)
            raw.update(small_files=len(data.small), small_bytes=data.small_bytes,
                       page_cache_budget=budget)
            sync()
            repo = Path(os.environ["XDG_DATA_HOME"]) / "cachefs" / "repo"
            commit_to("file://" + str(repo), data.src)
            cache, mnt = work / "cache", work / "mnt"
            log("filling the SSD tier (one cachefs mount reads every file once)")
            procs.mount_cachefs("local", mnt, cache, memory_cache)
            checked(read_parallel(data.paths(mnt, "small"), readers), data.small_bytes, "fill")
            procs.unmount_cachefs(mnt)

            reason = MemoryLimit.unavailable()
            try:
                group = None if reason else MemoryLimit.create()
            except OSError as e:
                reason = f"cannot create one: {e}"
            if group is None:
                raise SystemExit(f"benchmarks.ssd_pressure: needs a memory cgroup: {reason}")
            group.join()
            src = data.paths(data.src, "small")
            for i in range(rounds):
                log(f"round {i + 1} of {rounds}: local disk cold, page cache "
                    f"{fmt_bytes(budget)}")
                drop_pages(src)
                group.limit(group.usage() + budget)
                before = _read_bytes(os.getpid())
                local_passes.append(checked(read_parallel(src, readers), data.small_bytes,
                                            "local"))
                local_amp.append((_read_bytes(os.getpid()) - before) / data.small_bytes)
                group.limit(None)

                log(f"round {i + 1} of {rounds}: cachefs SSD tier")
                evict_tree(cache, within="objects")
                sync()
                info = procs.mount_cachefs("local", mnt, cache, memory_cache)
                try:
                    pid = int(info["pid"])
                    group.limit(group.usage() + budget)
                    stats, before = mount_stats(str(mnt)), _read_bytes(pid)
                    ssd_passes.append(checked(read_parallel(data.paths(mnt, "small"), readers),
                                              data.small_bytes, "ssd"))
                    ssd_amp.append((_read_bytes(pid) - before) / data.small_bytes)
                    after = mount_stats(str(mnt))
                    ssd_counters.append({k: int(after.get(k, 0)) - int(stats.get(k, 0))  # type: ignore[call-overload]
                                         for k in _COUNTERS})
                    group.limit(None)
                finally:
                    procs.unmount_cachefs(mnt)
                log(f"  local {local_passes[-1].files_per_s:,.0f} files/s, read "
                    f"{local_amp[-1]:.2f}x; SSD tier {ssd_passes[-1].files_per_s:,.0f} files/s, "
                    f"read {ssd_amp[-1]:.2f}x; {ssd_counters[-1]}")
        finally:
            if group is not None:
                group.leave()
                group.remove()
            procs.close()
    best_local = min(range(rounds), key=lambda i: local_passes[i].seconds)
    best_ssd = min(range(rounds), key=lambda i: ssd_passes[i].seconds)
    raw["results"] = {
        "local_small_cold_limited": pass_doc(
            local_passes[best_local], [p.seconds for p in local_passes],
            read_amplification=round(local_amp[best_local], 3)),
        "ssd_small_limited": pass_doc(
            ssd_passes[best_ssd], [p.seconds for p in ssd_passes],
            read_amplification=round(ssd_amp[best_ssd], 3), counters=ssd_counters[best_ssd]),
    }
    ratios = {
        "ssd_small_vs_local_cold_limited": round(
            ssd_passes[best_ssd].files_per_s / local_passes[best_local].files_per_s, 3),
        "ssd_read_amplification_limited": round(ssd_amp[best_ssd], 3),
    }
    return {"ratios": ratios, "raw": raw, "targets": dict(TARGETS), "quick": bool(args.quick)}


def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]
    local = raw["results"]["local_small_cold_limited"]
    ssd = raw["results"]["ssd_small_limited"]
    rows = [
        ["local disk, cold", f"{local['files_per_s']:,.0f} files/s",
         f"{local['read_amplification']:.2f}x", "", ""],
        ["cachefs SSD tier", f"{ssd['files_per_s']:,.0f} files/s",
         f"{ssd['read_amplification']:.2f}x", "ssd_small_vs_local_cold_limited",
         f"{r['ssd_small_vs_local_cold_limited']:.2f}"],
        ["", "", "", "ssd_read_amplification_limited",
         f"{r['ssd_read_amplification_limited']:.2f} (target "
         f"{TARGETS['ssd_read_amplification_limited']})"],
    ]
    title = (f"SSD tier under memory pressure: {raw['small_files']:,} small files "
             f"({fmt_bytes(raw['small_bytes'])}), page cache {fmt_bytes(raw['page_cache_budget'])}")
    counters = ssd["counters"]
    notes = [
        *(["--quick: a smoke run; its passes are too short to compare."] if report["quick"]
          else []),
        f"Best of {raw['passes']} pass(es); {raw['readers']} reader threads, one shuffled order; "
        "read: bytes read from the disk / the files' bytes (/proc/PID/io).",
        f"The SSD tier asked for {counters['ssd_pack_prefetches']} whole packs and read "
        f"{counters['ssd_pack_prefetches_skipped']} ranges alone.",
    ]
    print_table(title, ["system", "throughput", "read", "ratio", "value"], rows, notes)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "ssd_pressure", "small files from the SSD tier with a page cache smaller than the "
                        "data set (a memory cgroup), against the local disk read cold the same way")
    parser.add_argument("--readers", type=int, default=DEFAULT_READERS,
                        help=f"small-file reader threads (default {DEFAULT_READERS})")
    parser.add_argument("--page-cache", default=None,
                        help="page cache left to the readers and the daemon (default: a third "
                             "of the small files' bytes)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
