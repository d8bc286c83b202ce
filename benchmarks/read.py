"""Read throughput of cachefs mounts (file:// and S3 origins) against local disk, rclone and s3fs.

What it measures, in one run, on one machine, everything bound to 127.0.0.1:

1. Extent lookup, first (while the machine is quietest: ~150 ns calls are sensitive to anything
   else running): `benchmarks.lookup.run`, compiled `FileLayout.pieces` against the pure-Python
   reference; its `cython_vs_python` ratio.
2. Data. A synthetic ImageNet-like dataset is written with `cachefs.sample.make_sample`
   (full: 20,000 incompressible files of ~110 KB in 100 class directories, 2.1 GiB, plus four
   256 MiB shards; `--quick`: 500 files in 5 classes plus two 32 MiB shards). It is committed
   once to the built-in `local` remote (a `file://` repository under the private XDG_DATA_HOME)
   and once to an S3 bucket of a moto server started for the run (`tests.servers.MotoServer`, a
   real `python -m moto.server` on a loopback port). For rclone and s3fs the *raw files* (not
   cachefs chunks) are uploaded as plain objects (key = relative path) to a second bucket of the
   same server, so every system reads the same dataset through the same S3 endpoint.
3. Readers, one code path for every system. Large files: one thread reads each shard whole, one
   after the other, in 1 MiB `readinto` calls (MB/s). Small files: the small files in one shuffled
   order (fixed seed, the same list for everyone), `--readers` threads (default 8, like a PyTorch
   DataLoader's workers) each taking the next file: open + read whole (1 MiB `readinto`) + close
   (files/s). Every pass checks that it read exactly the dataset's bytes.
4. Baseline "local disk": the source files on the work dir's disk with a warm page cache (read
   once first): PAGE_CACHE_PASSES passes of each kind at the start, plus one local pass before
   each of cachefs's page-cache passes (epoch 2, small warm), interleaved so that drift in the
   machine's memory bandwidth hits both alike. The baseline is the best of all local passes.
   Cold local disk (`large_cold`, `small_cold`; WARM_PASSES passes, see below): the same files,
   in the same order, by the same readers, each file dropped from the page cache first with
   `posix_fadvise(DONTNEED)` (no root needed); and the disk's sequential read speed
   (`disk_sequential_read`: the large files in 4 MiB O_DIRECT reads), the disk the cache dir
   is on. `*_vs_local_cold` ratios compare cold passes with it. The SSD-tier passes have their
   own baseline, a pass read just before each of them (`vs_local_cold`, `vs_disk` in raw: each
   pair's ratio, their median, and the best pass against the best baseline): this VM's disk
   drifts by up to 2x over a run as the host's cache warms and cools, so
   `warm_ssd_small_vs_local_cold` and `warm_ssd_large_vs_disk` are the median of the pairs'
   ratios, each pass against the disk as it was beside it (`*_best`: best against best, which
   favours the side that varies more, the disk); the `_at_start` ratios keep the comparison
   with the run's first baseline.
5. cachefs (`cachefs mount` through the CLI with its defaults except `--cache-dir` and
   `--memory-cache`), once from the file:// remote and once from S3:
   - large, cold: fresh cache dir, fresh mount, first read (the file:// repository dropped from
     the page cache first, as before every cold pass: the origin is read from the disk, whatever
     the page cache kept of the commit; `cold_large_file_vs_s3` compares it with loopback S3);
   - large, epoch 2: the next passes on the same mount (the kernel page cache: keep_cache);
   - large, memory tier: the same mount after dropping the mount's pages of those files with
     `posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)` on each file, which works on FUSE and needs
     no root (/proc/sys/vm/drop_caches would also drop the baseline's pages). Checked with the
     mount's counters: every byte is read through FUSE again, with no SSD or origin access
     (`all_through_fuse`, `memory_only` in raw);
   - large, SSD tier: unmount, mount again on the same cache dir (memory and page cache of the
     mount empty; every file under the cache dir's `objects` dropped from the page cache, so the
     SSD tier is read from the disk like the cold baseline), first read;
   - small, cold: fresh cache dir, fresh mount, first shuffled pass;
   - small, warm: the next passes on the same mount (page cache; open, flush and release still
     reach the daemon);
   - small, SSD tier: remount on the same cache dir, the mount's directories listed (as a
     loader lists its data set before an epoch: ImageFolder's scan; `names_listed_seconds`),
     then its objects dropped from the page cache, first shuffled pass. The remount is how the
     run empties the memory tier and the mount's pages; in training, epoch 2 finds the names
     known to the kernel from epoch 1, and the cold local baseline does too (DONTNEED drops a
     file's data, not its name and inode), so the pass starts with data cold and names known
     on both sides. NAMES_COLD_PASSES more pairs keep the remount alone, every name a LOOKUP
     the local side does not pay (`small_ssd_names_cold`, `warm_ssd_small_names_cold_vs_
     local_cold`). Then, on the same mount, the mount's pages dropped and the pass again with
     the SSD tier's files left in the page cache by the first (`small_ssd_page_cached`): the
     same requests reach the daemon and the tier, without the disk.
   `--memory-cache` (default 1536 MiB) holds the full run's 1 GiB of shards, so that the memory
   tier can be measured at all; the 2.1 GiB of small files do not fit, so their cold and SSD
   passes also show what a memory tier smaller than the working set costs (the `ssd_hits`
   counter). The kernel read request sizes the daemon saw during each cold large read come from
   its `read_request_sizes` counter (`cachefs stats MOUNT --json`); every cachefs pass records
   the daemon's counters over the pass (`counters` in raw).
6. The other tools, from Debian: `rclone mount --vfs-cache-mode full` and `s3fs` (`use_cache`,
   path-style, passwd file), each on the raw-object bucket with a fresh cache dir and its default
   tuning: small cold (first pass), small warm (the next passes), large cold, large warm.

Warm figures are the best of several passes: PAGE_CACHE_PASSES (5) for page-cache states (local
disk, epoch 2, cachefs small warm), WARM_PASSES (2) for the memory tier (each pass after its own
page drop) and the other tools' warm passes, SSD_PASSES (4) for the SSD tier (each pass on its
own fresh mount, after its own baseline pass; see 4.) (`--quick`: QUICK_WARM_PASSES, one pass
each, also for the cold local disk: a smoke run).
Ratios are throughputs divided by the baseline's (higher is better): `*_vs_local` against local
disk, `*_vs_rclone` / `*_vs_s3fs` cachefs *from S3* against the other tool in the same state; `s3_*`
keys are the S3-origin variants of the file:// ones. `sync` runs before every cold or remounted
phase so that write-back of an earlier phase is not charged to it. Each pass records how busy the
machine's CPUs were (`cpu_percent`, for passes of at least 0.5 s), including `others`: busy time
not spent by this run's processes (other tenants, and kernel threads such as write-back), so a
disturbed figure can be recognised. A machine whose kernel pages out idle memory (a DAMON
`pageout` scheme, reported as `damon_pageout`) re-reads cache files and the file:// repository
from disk once they sit idle that long.

Isolation and cleanup: XDG_CONFIG_HOME, XDG_DATA_HOME, XDG_STATE_HOME, XDG_CACHE_HOME and TMPDIR
point into the work dir; AWS_* come from `tests.servers` (test credentials; machine settings such
as AWS_CA_BUNDLE removed, which rclone needs for a plain-HTTP endpoint). Every mount and process
the run starts is undone in a `finally`: mounts still there are lazily unmounted
(`fusermount3 -u -z`), mount daemons and rclone/s3fs processes still alive are killed, moto is
stopped, and the work dir is removed unless `--keep`.

Reproduce (from the repository root; as root the daemon raises the mount's kernel readahead and
the run can install rclone and s3fs itself; --quick takes ~2 minutes, the full run ~20, most of it
rclone's and s3fs's small-file passes):

    apt-get install -y rclone s3fs                       # or let the run install them as root
    .venv/bin/python -m benchmarks.read --quick          # smoke run
    .venv/bin/python -m benchmarks.read --json > out.json
    .venv/bin/python -m benchmarks.read --skip-other-tools   # without rclone and s3fs

Options: `--dir PATH` puts the work dir under PATH (default /var/tmp), `--keep` keeps it,
`--readers N` small-file reader threads, `--memory-cache SIZE` of every cachefs mount.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchmarks import lookup as lookup_bench
from benchmarks.common import (
    FULL_DATASET,
    benchmark_parser,
    describe_spec,
    emit,
    fmt_bytes,
    log,
    meets,
    print_table,
    private_environment,
    sync,
    timed,
    warm_read,
    work_dir,
)
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.repo import Repository
from cachefs.fuse.daemon import unescape_mount_path
from cachefs.fuse.mount import mount_stats
from cachefs.names import parse_size
from cachefs.remotes.registry import open_remote_url
from cachefs.sample import SampleSpec, make_sample
from tests.servers import AWS_TEST_ENV, MotoServer

DATASET = "bench"
AUTHOR = "benchmark@localhost"
BLOCK = 1 << 20  # every read() asks for 1 MiB
SHUFFLE_SEED = 7
WARM_PASSES = 2  # memory tier, other tools' warm passes
# SSD-tier passes, each right after its own baseline pass (see `paired`): the disk of a VM
# drifts within minutes, and four pairs give a median that two did not (runs G-I: the same
# pass 0.4-0.8 of the disk, between runs and between the two systems of one run)
SSD_PASSES = 4
# ... and pairs of the small-file SSD pass with every name cold (remount alone; see 5.)
NAMES_COLD_PASSES = 2
QUICK_WARM_PASSES = 1  # --quick: each of those once (every SSD pass is a mount and an unmount)
PAGE_CACHE_PASSES = 5  # local disk, epoch 2, cachefs warm small: short passes, noisier
DEFAULT_READERS = 8
DEFAULT_MEMORY_CACHE = "1536MiB"
CACHEFS_BUCKET = "cachefs-bench"
RAW_BUCKET = "raw-bench"
OTHER_TOOLS = ("rclone", "s3fs")
# cachefs's two systems: (ratio key prefix, results key, name in the table)
CACHEFS_SYSTEMS = (("", "cachefs_local", "cachefs file://"), ("s3_", "cachefs_s3", "cachefs S3"))
MOUNT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

QUICK_SPEC = SampleSpec(small_files=500, small_mean=110 * 1024, classes=5,
                        large_files=2, large_size=32 << 20, seed=1)

TARGETS = {
    "epoch2_large_vs_local": ">= 0.8",
    "warm_small_vs_local": ">= 0.25",
    "cold_small_vs_rclone": ">= 2",
    "cold_small_vs_s3fs": ">= 2",
    "cold_large_vs_rclone": ">= 1",
    "warm_small_vs_rclone": ">= 1",
    "warm_small_vs_s3fs": ">= 1",
    "cython_vs_python": ">= 10",
    "cold_large_file_vs_s3": ">= 1",
    "warm_ssd_small_vs_local_cold": ">= 0.7",
    "s3_cold_small_origin_efficiency": ">= 0.6",
    "warm_ssd_large_vs_disk": ">= 0.8",
}


# -- readers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pass:
    """One timed read of a file list, with how busy the machine's CPUs were meanwhile."""

    files: int
    bytes: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


DISTURBED_PERCENT = 10.0  # others' CPU share from which a pass is listed as disturbed
MIN_CPU_TICKS = 100  # a pass shorter than this (in 10 ms ticks, all CPUs) gets no CPU split
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


# Processes of this run besides this one (mount daemons, moto, rclone, s3fs), whose CPU time
# counts as ours when telling how much of the machine other tenants used during a pass.
OWN_PIDS: set[int] = set()


def cpu_ticks() -> tuple[list[int], dict[int, int]]:
    """The machine's CPU time counters (/proc/stat, all CPUs) and the run's own processes'
    ticks, by pid."""
    with open("/proc/stat") as f:
        machine = [int(v) for v in f.readline().split()[1:1 + len(CPU_FIELDS)]]
    own: dict[int, int] = {}
    for pid in (os.getpid(), *OWN_PIDS):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            own[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return machine, own


def cpu_split(before: tuple[list[int], dict[int, int]],
              after: tuple[list[int], dict[int, int]]) -> dict[str, float]:
    """Percent of all CPUs' time in each state between two `cpu_ticks`; `others`: busy time
    not spent by this run's processes (other tenants of the machine, and kernel threads). A
    process of the run that started or ended during the pass (a daemon unmounted just before)
    counts what it spent within it as well as /proc shows: only pids seen at both ends count, so
    that the lifetime total of one that vanished is not taken for other tenants' time."""
    diff = [b - a for a, b in zip(before[0], after[0])]
    total = sum(diff) or 1
    split = dict(zip(CPU_FIELDS, diff))
    busy = total - split["idle"] - split["iowait"]
    if total < MIN_CPU_TICKS:  # too short for 10 ms ticks to say anything
        return {}
    own = sum(after[1][pid] - ticks for pid, ticks in before[1].items() if pid in after[1])
    return {"user": round(100 * (split["user"] + split["nice"]) / total, 1),
            "system": round(100 * (split["system"] + split["irq"] + split["softirq"]) / total, 1),
            "iowait": round(100 * split["iowait"] / total, 1),
            "idle": round(100 * split["idle"] / total, 1),
            "others": round(100 * max(0, busy - own) / total, 1)}


def _read_whole(path: str, buf: bytearray) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def read_sequential(paths: list[str]) -> Pass:
    """Read each file whole, one after the other, in 1 MiB reads, on this thread."""
    buf = bytearray(BLOCK)
    ticks = cpu_ticks()
    start = time.perf_counter()
    total = sum(_read_whole(p, buf) for p in paths)
    seconds = time.perf_counter() - start
    return Pass(len(paths), total, seconds, cpu_split(ticks, cpu_ticks()))


def read_parallel(paths: list[str], threads: int) -> Pass:
    """Read every file whole with `threads` threads, each taking the next file of `paths`."""
    counter = itertools.count()  # next() on it is atomic: the threads share one position
    n = len(paths)

    def worker() -> int:
        buf = bytearray(BLOCK)
        total = 0
        while (i := next(counter)) < n:
            total += _read_whole(paths[i], buf)
        return total

    with ThreadPoolExecutor(threads, thread_name_prefix="reader") as pool:
        ticks = cpu_ticks()
        start = time.perf_counter()
        futures = [pool.submit(worker) for _ in range(threads)]
        total = sum(f.result() for f in futures)
        seconds = time.perf_counter() - start
    return Pass(n, total, seconds, cpu_split(ticks, cpu_ticks()))


def drop_pages(paths: list[str]) -> None:
    """Drop the page cache of these files only (POSIX_FADV_DONTNEED; FUSE files included)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(root: Path, within: str | None = None) -> list[str]:
    """Every regular file under `root` (only those below a directory named `within`, if given)."""
    found = []
    for dirpath, _dirnames, filenames in os.walk(root):
        if within is not None and within not in Path(dirpath).relative_to(root).parts:
            continue
        found += [os.path.join(dirpath, name) for name in filenames]
    return found


def evict_tree(root: Path, within: str | None = None) -> int:
    """Write back, then drop from the page cache, every file under `root` (see `files_under`),
    so that the next read of them comes from the disk; the number of files. Dirty pages are not
    dropped by DONTNEED, hence the sync first."""
    sync()
    paths = files_under(root, within)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # a cache entry evicted meanwhile
            drop_pages([path])
    return len(paths)


def disk_sequential_read(paths: list[str]) -> Pass:
    """The disk's sequential read speed: `paths` read whole, one after the other, in 4 MiB
    O_DIRECT reads (no page cache on either side); after POSIX_FADV_DONTNEED through the page
    cache where the file system refuses O_DIRECT."""
    import mmap

    size = 4 << 20
    buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
    total = 0
    ticks = cpu_ticks()
    start = time.perf_counter()
    with memoryview(buf) as view:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:  # EINVAL: no O_DIRECT here (tmpfs)
                drop_pages([path])
                fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while n := os.preadv(fd, [view], offset):
                    offset += n
                total += offset
            finally:
                os.close(fd)
    seconds = time.perf_counter() - start
    buf.close()
    return Pass(len(paths), total, seconds, cpu_split(ticks, cpu_ticks()))


# -- the run's environment and processes --------------------------------------------------------


def mounted_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {unescape_mount_path(line.split()[4]) for line in f}


def _alive(pid: int, marker: str) -> bool:
    """True while `pid` runs a command line containing `marker` (not a recycled pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return marker in cmdline and state != "Z"


def _wait_gone(pid: int, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Processes:
    """Every mount and process the run starts, so that `close` can undo all of them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.mountpoints: list[Path] = []
        self.daemons: set[int] = set()  # cachefs mount daemons (not our children)
        self.children: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def cli(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "cachefs.cli.main", *args],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"cachefs {' '.join(args)} exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-2000:]}")
        return proc.stdout

    def mount_cachefs(self, remote: str, mountpoint: Path, cache_dir: Path,
                      memory_cache: int, *options: str) -> dict[str, Any]:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoints.append(mountpoint)
        info = json.loads(self.cli("mount", f"{DATASET}@main", str(mountpoint), "--remote", remote,
                                   "--cache-dir", str(cache_dir), "--memory-cache",
                                   str(memory_cache), "--json", *options))
        self.daemons.add(int(info["pid"]))
        OWN_PIDS.add(int(info["pid"]))
        return info

    def unmount_cachefs(self, mountpoint: Path) -> None:
        self.cli("umount", str(mountpoint))  # waits for the daemon to exit

    def start_tool(self, name: str, argv: list[str], mountpoint: Path,
                   log_path: Path) -> subprocess.Popen[bytes]:
        """Start rclone or s3fs in the foreground (our child) and wait until it is mounted."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self._logs.append(log_file)
        self.mountpoints.append(mountpoint)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.children.append(proc)
        OWN_PIDS.add(proc.pid)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while str(mountpoint) not in mounted_points():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not mount {mountpoint} "
                                   f"(status {proc.poll()}):\n{tail}")
            time.sleep(0.05)
        os.listdir(mountpoint)  # serves
        return proc

    def stop_tool(self, mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
        """Unmount (retrying while busy) and wait for the tool to exit."""
        for _ in range(50):
            done = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                                  timeout=60, check=False)
            if done.returncode == 0 or str(mountpoint) not in mounted_points():
                break
            time.sleep(0.1)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S * 3)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        """Lazily unmount everything still mounted; kill what did not exit. Never raises."""
        points = mounted_points()
        for mountpoint in self.mountpoints:
            if str(mountpoint) in points:
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                                   capture_output=True, timeout=30, check=False)
        for pid in sorted(self.daemons):
            if not _wait_gone(pid, "cachefs.fuse.daemon", STOP_TIMEOUT_S):
                log(f"killing mount daemon {pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.children:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log(f"killing {proc.args[0]} {proc.pid}")
                    proc.kill()
                    proc.wait(timeout=STOP_TIMEOUT_S)
        for log_file in self._logs:
            log_file.close()


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Data:
    src: Path
    small: list[str]  # relative paths, shuffled (the order every small-file pass uses)
    large: list[str]  # relative paths, sorted
    small_bytes: int
    large_bytes: int

    def paths(self, root: Path, kind: str) -> list[str]:
        return [os.path.join(root, rel) for rel in (self.small if kind == "small" else self.large)]


def generate(src: Path, spec: SampleSpec) -> Data:
    make_sample(src, spec)
    small = sorted(p.relative_to(src).as_posix() for p in (src / "train").rglob("*.jpg"))
    large = sorted(p.relative_to(src).as_posix() for p in (src / "shards").glob("*"))
    random.Random(SHUFFLE_SEED).shuffle(small)
    size = lambda rel: (src / rel).stat().st_size  # noqa: E731
    return Data(src, small, large, sum(map(size, small)), sum(map(size, large)))


def commit_to(remote_url: str, src: Path) -> float:
    """Create the dataset in the remote and commit `src` as its first version; seconds."""
    repo = Repository(open_remote_url(remote_url))
    try:
        repo.create_dataset(DATASET)
        result, seconds = timed(lambda: commit_directory(repo, DATASET, "main", src, "v1",
                                                         author=AUTHOR))
        log(f"committed {result.files:,} files, {fmt_bytes(result.bytes)} in {seconds:.1f}s "
            f"to {remote_url.split('?')[0]}")
        return seconds
    finally:
        repo.remote.close()


def upload_raw(server: MotoServer, data: Data) -> float:
    """The dataset's files as plain objects (key = relative path) in RAW_BUCKET; seconds."""
    import boto3
    from botocore.config import Config

    server.create_bucket(RAW_BUCKET)
    client = boto3.session.Session(
        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_TEST_ENV["AWS_DEFAULT_REGION"],
    ).client("s3", endpoint_url=server.endpoint, verify=False,
             config=Config(max_pool_connections=32))

    def put(rel: str) -> None:
        path = data.src / rel
        if path.stat().st_size > 64 << 20:
            client.upload_file(str(path), RAW_BUCKET, rel)  # multipart
        else:
            client.put_object(Bucket=RAW_BUCKET, Key=rel, Body=path.read_bytes())

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, [*data.large, *sorted(data.small)]))
    finally:
        client.close()
    return time.perf_counter() - start


# -- measurements -------------------------------------------------------------------------------
def pass_doc(result: Pass, passes: list[float] | None = None,
             **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "files": result.files, "bytes": result.bytes, "seconds": round(result.seconds, 4),
        "files_per_s": round(result.files_per_s, 1), "mb_per_s": round(result.bytes_per_s / 1e6, 1),
        "cpu_percent": result.cpu,
    }
    if passes is not None:
        doc["pass_seconds"] = [round(s, 4) for s in passes]
    doc.update(extra)
    return doc


def checked(result: Pass, expected_bytes: int, what: str) -> Pass:
    if result.bytes != expected_bytes:
        raise RuntimeError(f"{what}: read {result.bytes} bytes, expected {expected_bytes}")
    return result


def best_of(passes: int, one: Callable[[], Pass]) -> tuple[Pass, list[float]]:
    results = [one() for _ in range(passes)]
    return min(results, key=lambda r: r.seconds), [r.seconds for r in results]


COUNTERS = ("read_requests", "read_bytes", "memory_hits", "ssd_hits", "origin_requests",
            "origin_bytes", "ssd_direct_reads", "ssd_pack_prefetches",
            "ssd_pack_prefetches_skipped", "compiled_reads_answered", "compiled_reads_inline",
            "compiled_reads_handed_back", "compiled_reads_left_to_memory")


def counters(mountpoint: Path) -> dict[str, Any]:
    return mount_stats(str(mountpoint))


def delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    out = {k: int(after[k]) - int(before[k]) for k in COUNTERS}
    sizes: dict[str, int] = {}
    for size, count in after["read_request_sizes"].items():
        diff = count - before["read_request_sizes"].get(size, 0)
        if diff:
            sizes[size] = diff
    out["read_request_sizes"] = sizes  # type: ignore[assignment]
    return out


class LocalBaseline:
    """Local-disk passes (warm page cache): PAGE_CACHE_PASSES at the start, then one before each
    of cachefs's page-cache passes (interleaved, so that drift in the machine's memory bandwidth
    hits both alike). The baseline is the best of all of them.

    Cold local disk, for the cold and SSD-tier passes: the same files in the same order by the
    same readers after dropping them from the page cache (POSIX_FADV_DONTNEED per file, no root
    needed), `warm_passes` times (WARM_PASSES; --quick: QUICK_WARM_PASSES); and the disk's
    sequential read speed (the large files with O_DIRECT), since the cache dir is on the same
    disk."""

    def __init__(self, data: Data, readers: int, warm_passes: int = WARM_PASSES) -> None:
        self.data = data
        self.readers = readers
        self.warm_passes = warm_passes
        self.large_paths = data.paths(data.src, "large")
        self.small_paths = data.paths(data.src, "small")
        self.large: list[Pass] = []
        self.small: list[Pass] = []
        self.large_cold: list[Pass] = []
        self.small_cold: list[Pass] = []
        self.disk_seq: list[Pass] = []
        self.tmpfs_large: list[Pass] = []

    def large_pass(self) -> Pass:
        result = checked(read_sequential(self.large_paths), self.data.large_bytes, "local large")
        self.large.append(result)
        return result

    def small_pass(self) -> Pass:
        result = checked(read_parallel(self.small_paths, self.readers), self.data.small_bytes,
                         "local small")
        self.small.append(result)
        return result

    def measure(self) -> None:
        warm_read(self.data.src)  # the page cache holds everything
        sync()
        log("local disk, large files (warm page cache)")
        for _ in range(PAGE_CACHE_PASSES):
            self.large_pass()
        log(f"  {best(self.large).bytes_per_s / 1e6:,.0f} MB/s")
        self.measure_tmpfs()
        log(f"local disk, small files, {self.readers} threads (warm page cache)")
        for _ in range(PAGE_CACHE_PASSES):
            self.small_pass()
        log(f"  {best(self.small).files_per_s:,.0f} files/s")
        self.measure_cold()

    def disk_sequential_pass(self) -> Pass:
        """The disk's sequential read (not kept: the caller keeps it where it belongs)."""
        sync()
        return checked(disk_sequential_read(self.large_paths), self.data.large_bytes,
                       "disk sequential")

    def small_cold_pass(self) -> Pass:
        """The small files from the disk (not kept, like `disk_sequential_pass`)."""
        sync()
        drop_pages(self.small_paths)
        return checked(read_parallel(self.small_paths, self.readers), self.data.small_bytes,
                       "local small cold")

    def measure_tmpfs(self) -> None:
        """The large files from tmpfs: a page cache of 4 KiB pages, like FUSE's on kernels
        whose FUSE has no large folios, where ext4 reads folios of up to 2 MiB. What a
        page-cache read costs per page, beside which epoch 2 through FUSE is measured."""
        shm = Path("/dev/shm")
        if not shm.is_dir() or shutil.disk_usage(shm).free < 2 * self.data.large_bytes:
            log("  no tmpfs with room for the large files: tmpfs reference skipped")
            return
        copy = Path(tempfile.mkdtemp(prefix="cachefs-read-", dir=shm))
        try:
            paths = []
            for path in self.large_paths:
                target = copy / f"{len(paths)}"
                shutil.copyfile(path, target)
                paths.append(str(target))
            log("tmpfs, large files (4 KiB pages)")
            for _ in range(PAGE_CACHE_PASSES):
                self.tmpfs_large.append(checked(read_sequential(paths), self.data.large_bytes,
                                                "tmpfs large"))
            log(f"  {best(self.tmpfs_large).bytes_per_s / 1e6:,.0f} MB/s")
        finally:
            shutil.rmtree(copy, ignore_errors=True)

    def measure_cold(self) -> None:
        log("local disk, cold (each file dropped from the page cache with POSIX_FADV_DONTNEED)")
        for _ in range(self.warm_passes):
            self.disk_seq.append(self.disk_sequential_pass())
            sync()
            drop_pages(self.large_paths)
            self.large_cold.append(checked(read_sequential(self.large_paths),
                                           self.data.large_bytes, "local large cold"))
            self.small_cold.append(self.small_cold_pass())
        log(f"  disk sequential (O_DIRECT, 4 MiB) {best(self.disk_seq).bytes_per_s / 1e6:,.0f} "
            f"MB/s; large {best(self.large_cold).bytes_per_s / 1e6:,.0f} MB/s; small, "
            f"{self.readers} threads, {best(self.small_cold).files_per_s:,.0f} files/s")
        warm_read(self.data.src)  # the warm passes that follow find the page cache as before

    def doc(self) -> dict[str, Any]:
        def of(passes: list[Pass]) -> dict[str, Any]:
            return pass_doc(best(passes), [p.seconds for p in passes])

        return {"large_warm": of(self.large), "small_warm": of(self.small),
                "large_cold": of(self.large_cold), "small_cold": of(self.small_cold),
                "disk_sequential_read": of(self.disk_seq),
                **({"tmpfs_large": of(self.tmpfs_large)} if self.tmpfs_large else {})}


def list_names(root: Path) -> float:
    """List every directory under `root` (names and attributes, as a loader's scan does:
    READDIRPLUS through FUSE, so the kernel then knows every name); the seconds it took."""
    start = time.perf_counter()
    for _ in os.walk(root):
        pass
    return time.perf_counter() - start


def best(passes: list[Pass]) -> Pass:
    return min(passes, key=lambda p: p.seconds)


def paired(ours: list[Pass], baseline: list[Pass], files: bool) -> dict[str, Any]:
    """Our passes against the baseline pass read just before each: every pair's ratio
    (files/s, or bytes/s), and their median, the figure the targets use. A median of pairs
    follows the disk as it was beside each pass; comparing the best of each side instead
    favours whichever side varies more (here the disk, whose bursts come from the host's
    cache), and is kept as `best_ratio`."""
    def rate(p: Pass) -> float:
        return p.files_per_s if files else p.bytes_per_s

    ratios = [ratio(rate(a), rate(b)) for a, b in zip(ours, baseline, strict=True)]
    return {"pair_ratios": [round(r, 3) for r in ratios],
            "median_ratio": round(statistics.median(ratios), 3),
            "best_ratio": round(ratio(rate(best(ours)), rate(best(baseline))), 3)}


def interleaved(passes: int, baseline: Callable[[], Pass],
                ours: Callable[[], Pass]) -> tuple[Pass, list[float], Pass]:
    """`passes` times: a baseline pass, then one of ours. Returns (our best, our seconds, the
    best of the baseline passes in between)."""
    mine: list[Pass] = []
    theirs: list[Pass] = []
    for _ in range(passes):
        theirs.append(baseline())
        mine.append(ours())
    return best(mine), [p.seconds for p in mine], best(theirs)


def measure_cachefs(procs: Processes, work: Path, label: str, remote: str, data: Data,
                    readers: int, memory_cache: int, local: LocalBaseline,
                    origin_dir: Path | None = None, tier_passes: int = WARM_PASSES,
                    ssd_passes: int = SSD_PASSES,
                    names_cold_passes: int = NAMES_COLD_PASSES) -> dict[str, Any]:
    """Cold / epoch 2 / memory / SSD for large files; cold / warm / SSD for small files.

    `origin_dir`: a file:// repository, dropped from the page cache before each cold pass so
    that the origin is read from the disk (not from whatever the page cache kept of the commit:
    a DAMON pageout, if any, would drop it at random). Before every SSD-tier pass the cache
    dir's objects are dropped the same way, so the SSD tier is read from the disk, like the
    cold local-disk baseline."""
    out: dict[str, Any] = {}
    cache = work / "caches" / label
    mnt = work / "mnt" / label
    large, small = data.paths(mnt, "large"), data.paths(mnt, "small")

    def mount() -> None:
        procs.mount_cachefs(remote, mnt, cache, memory_cache)

    def evict_origin() -> None:
        if origin_dir is not None:
            evict_tree(origin_dir)

    def baseline_then_mount(baseline: Callable[[], Pass]) -> Pass:
        """One pair's start: the baseline pass, then a fresh mount whose SSD tier will be
        read from the disk (its objects dropped from the page cache first)."""
        evict_tree(cache, within="objects")
        beside = baseline()
        sync()
        mount()
        return beside

    # -- large files --------------------------------------------------------------------------
    evict_origin()
    sync()
    log(f"{label}: large files, cold (fresh cache dir, fresh mount)")
    mount()
    before = counters(mnt)
    cold = checked(read_sequential(large), data.large_bytes, f"{label} cold large")
    out["large_cold"] = pass_doc(cold, counters=delta(before, counters(mnt)))
    log(f"  {cold.bytes_per_s / 1e6:,.0f} MB/s; kernel read sizes "
        f"{out['large_cold']['counters']['read_request_sizes']}")

    sync()  # the cold read's SSD writes must not be written back during the next passes
    log(f"{label}: large files, epoch 2 (kernel page cache)")
    before = counters(mnt)
    ep2, ep2_passes, beside = interleaved(PAGE_CACHE_PASSES, local.large_pass, lambda: checked(
        read_sequential(large), data.large_bytes, f"{label} epoch 2"))
    out["large_epoch2"] = pass_doc(ep2, ep2_passes, counters=delta(before, counters(mnt)),
                                   local_mb_per_s_interleaved=round(beside.bytes_per_s / 1e6, 1))
    log(f"  {ep2.bytes_per_s / 1e6:,.0f} MB/s (local disk in between: "
        f"{beside.bytes_per_s / 1e6:,.0f} MB/s)")

    log(f"{label}: large files, memory tier (page cache dropped with POSIX_FADV_DONTNEED)")
    mem_passes: list[Pass] = []
    mem_counters: list[dict[str, Any]] = []
    for _ in range(tier_passes):
        drop_pages(large)
        sync()
        before = counters(mnt)
        mem_passes.append(checked(read_sequential(large), data.large_bytes, f"{label} memory"))
        mem_counters.append(delta(before, counters(mnt)))
    pick = min(range(tier_passes), key=lambda i: mem_passes[i].seconds)
    c = mem_counters[pick]
    out["large_memory"] = pass_doc(mem_passes[pick], [p.seconds for p in mem_passes], counters=c,
                                   all_through_fuse=c["read_bytes"] >= data.large_bytes,
                                   memory_only=c["ssd_hits"] == 0 and c["origin_requests"] == 0)
    log(f"  {mem_passes[pick].bytes_per_s / 1e6:,.0f} MB/s; through FUSE "
        f"{fmt_bytes(c['read_bytes'])}, memory hits {c['memory_hits']}, "
        f"SSD hits {c['ssd_hits']}, origin {c['origin_requests']}")
    procs.unmount_cachefs(mnt)

    log(f"{label}: large files, SSD tier (remount, same cache dir)")
    tier: list[Pass] = []
    ssd_counters: list[dict[str, Any]] = []
    disk_beside: list[Pass] = []
    for _ in range(ssd_passes):
        disk_beside.append(baseline_then_mount(local.disk_sequential_pass))
        before = counters(mnt)
        tier.append(checked(read_sequential(large), data.large_bytes, f"{label} ssd"))
        ssd_counters.append(delta(before, counters(mnt)))
        procs.unmount_cachefs(mnt)
    pick = min(range(ssd_passes), key=lambda i: tier[i].seconds)
    disk = best(disk_beside)
    vs_disk = paired(tier, disk_beside, files=False)
    out["large_ssd"] = pass_doc(tier[pick], [p.seconds for p in tier],
                                counters=ssd_counters[pick],
                                disk_mb_per_s_interleaved=round(disk.bytes_per_s / 1e6, 1),
                                disk_pass_seconds=[round(p.seconds, 4) for p in disk_beside],
                                vs_disk=vs_disk)
    log(f"  {tier[pick].bytes_per_s / 1e6:,.0f} MB/s (the disk's sequential read in "
        f"between: {disk.bytes_per_s / 1e6:,.0f} MB/s); pass by pass "
        f"{vs_disk['pair_ratios']} of the disk, median {vs_disk['median_ratio']}")
    shutil.rmtree(cache)

    # -- small files --------------------------------------------------------------------------
    evict_origin()
    sync()
    log(f"{label}: small files, cold, {readers} threads (fresh cache dir, fresh mount)")
    mount()
    before = counters(mnt)
    cold = checked(read_parallel(small, readers), data.small_bytes, f"{label} cold small")
    out["small_cold"] = pass_doc(cold, counters=delta(before, counters(mnt)))
    log(f"  {cold.files_per_s:,.0f} files/s")

    sync()
    log(f"{label}: small files, warm (next passes on the same mount)")
    before = counters(mnt)
    warm, warm_passes, beside = interleaved(PAGE_CACHE_PASSES, local.small_pass, lambda: checked(
        read_parallel(small, readers), data.small_bytes, f"{label} warm small"))
    out["small_warm"] = pass_doc(warm, warm_passes, counters=delta(before, counters(mnt)),
                                 local_files_per_s_interleaved=round(beside.files_per_s, 1))
    log(f"  {warm.files_per_s:,.0f} files/s (local disk in between: "
        f"{beside.files_per_s:,.0f} files/s)")
    procs.unmount_cachefs(mnt)

    log(f"{label}: small files, SSD tier (remount, same cache dir, names listed)")
    tier = []
    ssd_counters = []
    cached_passes: list[Pass] = []
    cached_counters: list[dict[str, Any]] = []
    cold_beside: list[Pass] = []
    listings: list[float] = []
    for _ in range(ssd_passes):
        cold_beside.append(baseline_then_mount(local.small_cold_pass))
        listings.append(list_names(mnt))
        evict_tree(cache, within="objects")  # the trees the listing read: the disk's again
        before = counters(mnt)
        tier.append(checked(read_parallel(small, readers), data.small_bytes,
                            f"{label} ssd small"))
        ssd_counters.append(delta(before, counters(mnt)))
        # The same reads with the SSD tier's files in the page cache (the pass above left
        # them there) and the mount's own pages dropped: every file reaches the daemon and
        # its SSD tier again, but no disk. What bounds the SSD tier besides the disk.
        drop_pages(small)
        before = counters(mnt)
        cached_passes.append(checked(read_parallel(small, readers), data.small_bytes,
                                     f"{label} ssd small, page-cached"))
        cached_counters.append(delta(before, counters(mnt)))
        procs.unmount_cachefs(mnt)
    pick = min(range(ssd_passes), key=lambda i: tier[i].seconds)
    cold_local = best(cold_beside)
    vs_cold = paired(tier, cold_beside, files=True)
    out["small_ssd"] = pass_doc(tier[pick], [p.seconds for p in tier],
                                counters=ssd_counters[pick],
                                local_cold_files_per_s_interleaved=round(cold_local.files_per_s,
                                                                         1),
                                local_cold_pass_seconds=[round(p.seconds, 4)
                                                         for p in cold_beside],
                                names_listed_seconds=[round(t, 4) for t in listings],
                                vs_local_cold=vs_cold)
    pick = min(range(ssd_passes), key=lambda i: cached_passes[i].seconds)
    out["small_ssd_page_cached"] = pass_doc(cached_passes[pick],
                                            [p.seconds for p in cached_passes],
                                            counters=cached_counters[pick])
    log(f"  {out['small_ssd']['files_per_s']:,.0f} files/s (local disk cold in between: "
        f"{cold_local.files_per_s:,.0f} files/s; pass by pass {vs_cold['pair_ratios']} of it, "
        f"median {vs_cold['median_ratio']}); with the SSD tier's files in the page cache "
        f"{out['small_ssd_page_cached']['files_per_s']:,.0f} files/s")

    log(f"{label}: small files, SSD tier, every name cold (remount alone)")
    names_cold: list[Pass] = []
    names_cold_beside: list[Pass] = []
    for _ in range(names_cold_passes):
        names_cold_beside.append(baseline_then_mount(local.small_cold_pass))
        names_cold.append(checked(read_parallel(small, readers), data.small_bytes,
                                  f"{label} ssd small, names cold"))
        procs.unmount_cachefs(mnt)
    vs_cold = paired(names_cold, names_cold_beside, files=True)
    out["small_ssd_names_cold"] = pass_doc(best(names_cold), [p.seconds for p in names_cold],
                                           local_cold_pass_seconds=[
                                               round(p.seconds, 4) for p in names_cold_beside],
                                           vs_local_cold=vs_cold)
    log(f"  {out['small_ssd_names_cold']['files_per_s']:,.0f} files/s; pass by pass "
        f"{vs_cold['pair_ratios']} of the local disk cold, median {vs_cold['median_ratio']}")
    shutil.rmtree(cache)
    return out


def tool_argv(name: str, server: MotoServer, work: Path, mountpoint: Path,
              cache: Path) -> list[str]:
    tools_dir = work / "other-tools"
    tools_dir.mkdir(exist_ok=True)
    if name == "rclone":
        conf = tools_dir / "rclone.conf"
        conf.write_text(
            "[moto]\ntype = s3\nprovider = Other\nenv_auth = false\n"
            f"access_key_id = {AWS_TEST_ENV['AWS_ACCESS_KEY_ID']}\n"
            f"secret_access_key = {AWS_TEST_ENV['AWS_SECRET_ACCESS_KEY']}\n"
            f"region = {AWS_TEST_ENV['AWS_DEFAULT_REGION']}\nendpoint = {server.endpoint}\n")
        return ["rclone", "mount", f"moto:{RAW_BUCKET}", str(mountpoint), "--config", str(conf),
                "--vfs-cache-mode", "full", "--cache-dir", str(cache), "--log-level", "NOTICE"]
    passwd = tools_dir / "s3fs.passwd"
    passwd.write_text(f"{AWS_TEST_ENV['AWS_ACCESS_KEY_ID']}:"
                      f"{AWS_TEST_ENV['AWS_SECRET_ACCESS_KEY']}\n")
    passwd.chmod(0o600)
    return ["s3fs", RAW_BUCKET, str(mountpoint), "-f", "-o", f"url={server.endpoint}",
            "-o", "use_path_request_style", "-o", f"passwd_file={passwd}",
            "-o", f"use_cache={cache}", "-o", f"endpoint={AWS_TEST_ENV['AWS_DEFAULT_REGION']}"]


def measure_other_tool(procs: Processes, work: Path, name: str, server: MotoServer, data: Data,
                       readers: int, warm_passes: int = WARM_PASSES) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cache = work / "caches" / name
    cache.mkdir(parents=True, exist_ok=True)
    mnt = work / "mnt" / name
    large, small = data.paths(mnt, "large"), data.paths(mnt, "small")
    sync()
    proc = procs.start_tool(name, tool_argv(name, server, work, mnt, cache), mnt,
                            work / "logs" / f"{name}.log")
    try:
        log(f"{name}: small files, cold, {readers} threads")
        cold = checked(read_parallel(small, readers), data.small_bytes, f"{name} cold small")
        out["small_cold"] = pass_doc(cold)
        log(f"  {cold.files_per_s:,.0f} files/s")
        sync()
        log(f"{name}: small files, warm (next passes)")
        warm, passes = best_of(warm_passes, lambda: checked(
            read_parallel(small, readers), data.small_bytes, f"{name} warm small"))
        out["small_warm"] = pass_doc(warm, passes)
        log(f"  {warm.files_per_s:,.0f} files/s")
        sync()
        log(f"{name}: large files, cold")
        cold = checked(read_sequential(large), data.large_bytes, f"{name} cold large")
        out["large_cold"] = pass_doc(cold)
        log(f"  {cold.bytes_per_s / 1e6:,.0f} MB/s")
        sync()
        log(f"{name}: large files, warm (next passes)")
        warm, passes = best_of(warm_passes, lambda: checked(
            read_sequential(large), data.large_bytes, f"{name} warm large"))
        out["large_warm"] = pass_doc(warm, passes)
        log(f"  {warm.bytes_per_s / 1e6:,.0f} MB/s")
    finally:
        procs.stop_tool(mnt, proc)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def damon_pageout() -> str | None:
    """A running DAMON scheme that pages out idle memory (page cache included), described; such a
    machine drops files not read for about that long, so 'SSD' and file:// reads hit the disk."""
    root = Path("/sys/kernel/mm/damon/admin/kdamonds")
    found = []
    with contextlib.suppress(OSError, ValueError):
        for kdamond in root.glob("[0-9]*"):
            if (kdamond / "state").read_text().strip() != "on":
                continue
            for ctx in kdamond.glob("contexts/[0-9]*"):
                aggr_us = int((ctx / "monitoring_attrs/intervals/aggr_us").read_text())
                for scheme in ctx.glob("schemes/[0-9]*"):
                    if (scheme / "action").read_text().strip() != "pageout":
                        continue
                    age = int((scheme / "access_pattern/age/min").read_text())
                    found.append(f"DAMON pageout of memory idle for >= {age * aggr_us / 1e6:g} s")
    return "; ".join(found) or None


def install_missing(tools: tuple[str, ...]) -> list[str]:
    """The Debian tools (package = command) still missing after installing them with apt-get
    (as root, where apt-get is there)."""
    missing = [p for p in tools if shutil.which(p) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        subprocess.run(["apt-get", "install", "-y", *missing], stdout=sys.stderr,
                       stderr=sys.stderr, timeout=600, check=False,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        missing = [p for p in tools if shutil.which(p) is None]
    return missing


def ensure_other_tools() -> str | None:
    """None when rclone and s3fs are installed (installing them as root); else why not."""
    missing = install_missing(OTHER_TOOLS)
    if not missing:
        return None
    return (f"{' and '.join(missing)} missing: install with `apt-get install -y rclone s3fs` "
            "(as root), or run with --skip-other-tools")


def measure_lookup(quick: bool) -> dict[str, Any]:
    args = argparse.Namespace(quick=quick, seed=1, queries=50_000, repeat=5)
    return lookup_bench.run(args)


# -- the run ------------------------------------------------------------------------------------
def ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def compute_ratios(results: dict[str, Any]) -> dict[str, float]:
    local = results["local_disk"]
    local_mb = local["large_warm"]["mb_per_s"]
    local_fps = local["small_warm"]["files_per_s"]
    ratios: dict[str, float] = {}
    for prefix, system, _ in CACHEFS_SYSTEMS:
        r = results[system]
        ratios[f"{prefix}cold_large_vs_local"] = ratio(r["large_cold"]["mb_per_s"], local_mb)
        ratios[f"{prefix}warm_ssd_large_vs_local"] = ratio(r["large_ssd"]["mb_per_s"], local_mb)
        ratios[f"{prefix}warm_memory_large_vs_local"] = ratio(r["large_memory"]["mb_per_s"],
                                                              local_mb)
        ratios[f"{prefix}epoch2_large_vs_local"] = ratio(r["large_epoch2"]["mb_per_s"], local_mb)
        ratios[f"{prefix}cold_small_vs_local"] = ratio(r["small_cold"]["files_per_s"], local_fps)
        ratios[f"{prefix}warm_small_vs_local"] = ratio(r["small_warm"]["files_per_s"], local_fps)
        ratios[f"{prefix}warm_ssd_small_vs_local"] = ratio(r["small_ssd"]["files_per_s"],
                                                           local_fps)
    # Against the cold local disk (the same files dropped from the page cache): what a cold or
    # SSD-tier pass could reach on this disk.
    cold_mb = local["large_cold"]["mb_per_s"]
    cold_fps = local["small_cold"]["files_per_s"]
    for prefix, system, _ in CACHEFS_SYSTEMS:
        r = results[system]
        ratios[f"{prefix}cold_large_vs_local_cold"] = ratio(r["large_cold"]["mb_per_s"], cold_mb)
        ratios[f"{prefix}warm_ssd_large_vs_local_cold"] = ratio(r["large_ssd"]["mb_per_s"],
                                                                cold_mb)
        ratios[f"{prefix}cold_small_vs_local_cold"] = ratio(r["small_cold"]["files_per_s"],
                                                            cold_fps)
        # The SSD tier against the cold local disk read just before each of its passes (the
        # median of those pairs; see `paired`): the disk of a VM drifts by 2x over a run as
        # the host's cache warms and cools, and a baseline from the run's start would compare
        # two different disks.
        ratios[f"{prefix}warm_ssd_small_vs_local_cold"] = \
            r["small_ssd"]["vs_local_cold"]["median_ratio"]
        ratios[f"{prefix}warm_ssd_small_vs_local_cold_best"] = \
            r["small_ssd"]["vs_local_cold"]["best_ratio"]
        ratios[f"{prefix}warm_ssd_small_vs_local_cold_at_start"] = ratio(
            r["small_ssd"]["files_per_s"], cold_fps)
        # The same with every name cold (remount alone): a LOOKUP per file that the local
        # baseline, whose names stay in the kernel's caches, does not pay.
        ratios[f"{prefix}warm_ssd_small_names_cold_vs_local_cold"] = \
            r["small_ssd_names_cold"]["vs_local_cold"]["median_ratio"]
        # The SSD tier's large-file pass against the cache disk's own sequential read, read
        # before each of its passes (and, for reference, at the run's start).
        ratios[f"{prefix}warm_ssd_large_vs_disk"] = r["large_ssd"]["vs_disk"]["median_ratio"]
        ratios[f"{prefix}warm_ssd_large_vs_disk_best"] = r["large_ssd"]["vs_disk"]["best_ratio"]
        ratios[f"{prefix}warm_ssd_large_vs_disk_at_start"] = ratio(
            r["large_ssd"]["mb_per_s"], local["disk_sequential_read"]["mb_per_s"])
    s3 = results["cachefs_s3"]
    # A shuffled first epoch of small files against large files from the same origin: how much
    # of the origin's throughput the small files get (packed chunks fetched once each).
    ratios["s3_cold_small_origin_efficiency"] = ratio(s3["small_cold"]["mb_per_s"],
                                                      s3["large_cold"]["mb_per_s"])
    # The SSD tier's small-file pass from the disk against the same pass with its files in
    # the page cache: near 1, the disk is not what bounds it.
    ratios["warm_ssd_small_vs_page_cached"] = ratio(
        results["cachefs_local"]["small_ssd"]["files_per_s"],
        results["cachefs_local"]["small_ssd_page_cached"]["files_per_s"])
    if "tmpfs_large" in local:
        # Epoch 2 through FUSE against a page cache of 4 KiB pages read without FUSE: near or
        # above 1, what separates epoch 2 from ext4 is the size of the page cache's folios.
        ratios["epoch2_large_vs_tmpfs"] = ratio(
            results["cachefs_local"]["large_epoch2"]["mb_per_s"],
            local["tmpfs_large"]["mb_per_s"])
    # The file:// origin (read from the disk: evicted first) against loopback S3, both cold.
    ratios["cold_large_file_vs_s3"] = ratio(results["cachefs_local"]["large_cold"]["mb_per_s"],
                                            s3["large_cold"]["mb_per_s"])
    for tool in OTHER_TOOLS:
        if tool not in results:
            continue
        p = results[tool]
        ratios[f"cold_small_vs_{tool}"] = ratio(s3["small_cold"]["files_per_s"],
                                                p["small_cold"]["files_per_s"])
        ratios[f"warm_small_vs_{tool}"] = ratio(s3["small_warm"]["files_per_s"],
                                                p["small_warm"]["files_per_s"])
        ratios[f"cold_large_vs_{tool}"] = ratio(s3["large_cold"]["mb_per_s"],
                                                p["large_cold"]["mb_per_s"])
        ratios[f"warm_large_vs_{tool}"] = ratio(s3["large_epoch2"]["mb_per_s"],
                                                p["large_warm"]["mb_per_s"])
    return ratios


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = QUICK_SPEC if args.quick else FULL_DATASET
    warm_passes = QUICK_WARM_PASSES if args.quick else WARM_PASSES
    ssd_passes = QUICK_WARM_PASSES if args.quick else SSD_PASSES
    names_cold_passes = QUICK_WARM_PASSES if args.quick else NAMES_COLD_PASSES
    OWN_PIDS.clear()
    memory_cache = parse_size(args.memory_cache)
    tools_problem = "--skip-other-tools" if args.skip_other_tools else ensure_other_tools()
    if tools_problem and not args.skip_other_tools:
        raise SystemExit(f"benchmarks.read: {tools_problem}")
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        raise SystemExit("benchmarks.read: needs FUSE (/dev/fuse and fusermount3, Debian fuse3)")
    raw: dict[str, Any] = {
        "dataset": describe_spec(spec), "cpus": os.cpu_count(), "readers": args.readers,
        "read_block": BLOCK, "warm_passes": warm_passes, "ssd_passes": ssd_passes,
        "names_cold_passes": names_cold_passes,
        "page_cache_passes": PAGE_CACHE_PASSES, "memory_cache": memory_cache,
        "root": os.geteuid() == 0, "damon_pageout": damon_pageout(),
        "kernel": os.uname().release,
        "loadavg_start": [round(v, 2) for v in os.getloadavg()],
        "other_tools": None if args.skip_other_tools else {
            "rclone": _version(["rclone", "version"]), "s3fs": _version(["s3fs", "--version"])},
    }
    # First, while the machine is quietest (no servers, no data, a small heap): the lookup's
    # ~150 ns calls are sensitive to anything else running.
    log("extent lookup: compiled against the Python reference")
    lookup = measure_lookup(args.quick)
    results: dict[str, Any] = {}
    with work_dir(args.dir, args.keep, prefix="cachefs-read-") as work, \
            private_environment(work):
        (work / "logs").mkdir()
        procs = Processes(work)
        server = MotoServer()
        try:
            log(f"generating the dataset: {describe_spec(spec)}")
            data, raw["generate_s"] = timed(lambda: generate(work / "src", spec))
            raw.update(small_files=len(data.small), small_bytes=data.small_bytes,
                       large_files=len(data.large), large_bytes=data.large_bytes)
            sync()
            local_repo = Path(os.environ["XDG_DATA_HOME"]) / "cachefs" / "repo"
            raw["commit_local_s"] = commit_to("file://" + str(local_repo), data.src)
            server.start()
            if server._proc is not None:  # its CPU time is the run's own
                OWN_PIDS.add(server._proc.pid)
            log(f"moto S3 server at {server.endpoint}")
            server.create_bucket(CACHEFS_BUCKET)
            s3_url = (f"s3://{CACHEFS_BUCKET}/repo?endpoint_url={server.endpoint}"
                      f"&region={AWS_TEST_ENV['AWS_DEFAULT_REGION']}")
            procs.cli("remote", "add", "s3", s3_url)
            raw["commit_s3_s"] = commit_to(s3_url, data.src)
            if not args.skip_other_tools:
                log("uploading the raw files for rclone and s3fs")
                raw["upload_raw_s"] = upload_raw(server, data)
                log(f"uploaded in {raw['upload_raw_s']:.1f}s")

            local = LocalBaseline(data, args.readers, warm_passes)
            local.measure()
            results["cachefs_local"] = measure_cachefs(procs, work, "cachefs_local", "local",
                                                       data, args.readers, memory_cache, local,
                                                       origin_dir=local_repo,
                                                       tier_passes=warm_passes,
                                                       ssd_passes=ssd_passes,
                                                       names_cold_passes=names_cold_passes)
            results["cachefs_s3"] = measure_cachefs(procs, work, "cachefs_s3", "s3", data,
                                                    args.readers, memory_cache, local,
                                                    tier_passes=warm_passes,
                                                    ssd_passes=ssd_passes,
                                                    names_cold_passes=names_cold_passes)
            results["local_disk"] = local.doc()
            if not args.skip_other_tools:
                for tool in OTHER_TOOLS:
                    results[tool] = measure_other_tool(procs, work, tool, server, data,
                                                       args.readers, warm_passes)
        finally:
            procs.close()
            server.stop()
    raw["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    raw["results"] = results
    raw["disturbed_passes"] = {  # others >= 10% of the machine during the pass
        f"{system}.{case}": doc["cpu_percent"]["others"]
        for system, cases in results.items() for case, doc in cases.items()
        if doc["cpu_percent"].get("others", 0.0) >= DISTURBED_PERCENT}
    raw["lookup"] = lookup["raw"]
    raw["read_request_sizes"] = {
        label: results[label]["large_cold"]["counters"]["read_request_sizes"]
        for label in ("cachefs_local", "cachefs_s3")}
    if args.skip_other_tools:
        raw["other_tools_skipped"] = tools_problem
    ratios = compute_ratios(results)
    ratios["cython_vs_python"] = lookup["ratios"]["cython_vs_python"]
    return {"ratios": ratios, "raw": raw, "targets": dict(TARGETS), "quick": bool(args.quick)}


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


# -- report -------------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]
    res = raw["results"]

    def verdict(key: str) -> str:
        if key not in TARGETS:
            return ""
        if key not in r:
            return f"{TARGETS[key]} skipped"
        return f"{TARGETS[key]} {'ok' if meets(r[key], TARGETS[key]) else 'MISSED'}"

    def others(doc: dict[str, Any]) -> str:
        share = doc["cpu_percent"].get("others")
        return "-" if share is None else f"{share:.0f}%"

    def mbs(doc: dict[str, Any]) -> str:
        return f"{doc['mb_per_s']:,.0f} MB/s\t{others(doc)}"

    def fps(doc: dict[str, Any]) -> str:
        return f"{doc['files_per_s']:,.0f} files/s\t{others(doc)}"

    def row(system: str, case: str, value: str, key: str | None) -> list[str]:
        value, _, busy = value.partition("\t")
        if key is None:
            return [system, case, value, busy, "", "", ""]
        shown = f"{r[key]:.2f}" if key in r else "-"
        return [system, case, value, busy, key, shown, verdict(key)]

    rows = [row("local disk", "large, warm page cache", mbs(res["local_disk"]["large_warm"]),
                None),
            row("local disk", "small, warm page cache", fps(res["local_disk"]["small_warm"]),
                None),
            row("local disk", "large, cold (DONTNEED)", mbs(res["local_disk"]["large_cold"]),
                None),
            row("local disk", "small, cold (DONTNEED)", fps(res["local_disk"]["small_cold"]),
                None),
            row("local disk", "sequential, O_DIRECT",
                mbs(res["local_disk"]["disk_sequential_read"]), None)]
    for prefix, system, name in CACHEFS_SYSTEMS:
        x = res[system]
        rows += [
            row(name, "large, cold", mbs(x["large_cold"]), f"{prefix}cold_large_vs_local"),
            row(name, "large, cold", mbs(x["large_cold"]), f"{prefix}cold_large_vs_local_cold"),
            row(name, "large, SSD tier", mbs(x["large_ssd"]), f"{prefix}warm_ssd_large_vs_local"),
            row(name, "large, SSD tier", mbs(x["large_ssd"]),
                f"{prefix}warm_ssd_large_vs_local_cold"),
            row(name, "large, memory tier", mbs(x["large_memory"]),
                f"{prefix}warm_memory_large_vs_local"),
            row(name, "large, epoch 2 (page cache)", mbs(x["large_epoch2"]),
                f"{prefix}epoch2_large_vs_local"),
            row(name, "small, cold", fps(x["small_cold"]), f"{prefix}cold_small_vs_local"),
            row(name, "small, cold", fps(x["small_cold"]), f"{prefix}cold_small_vs_local_cold"),
            row(name, "small, warm", fps(x["small_warm"]), f"{prefix}warm_small_vs_local"),
            row(name, "small, SSD tier", fps(x["small_ssd"]), f"{prefix}warm_ssd_small_vs_local"),
            row(name, "small, SSD tier", fps(x["small_ssd"]),
                f"{prefix}warm_ssd_small_vs_local_cold"),
        ]
    rows.append(row("cachefs file:// vs S3", "large, cold", "", "cold_large_file_vs_s3"))
    rows.append(row("cachefs S3: small / large", "cold", "", "s3_cold_small_origin_efficiency"))
    for prefix, system, name in CACHEFS_SYSTEMS:
        rows.append(row(f"{name} vs the disk (median of pairs)", "large, SSD tier", "",
                        f"{prefix}warm_ssd_large_vs_disk"))
        rows.append(row(f"{name} vs the disk (best against best)", "large, SSD tier", "",
                        f"{prefix}warm_ssd_large_vs_disk_best"))
        rows.append(row(f"{name} vs local cold (best against best)", "small, SSD tier", "",
                        f"{prefix}warm_ssd_small_vs_local_cold_best"))
        rows.append(row(name, "small, SSD tier, every name cold",
                        fps(res[system]["small_ssd_names_cold"]),
                        f"{prefix}warm_ssd_small_names_cold_vs_local_cold"))
    if "tmpfs_large" in res["local_disk"]:
        rows.append(row("cachefs file:// vs tmpfs (4 KiB pages)", "large, epoch 2",
                        mbs(res["local_disk"]["tmpfs_large"]), "epoch2_large_vs_tmpfs"))
    rows.append(row("cachefs file:// vs the disk at the run's start", "large, SSD tier", "",
                    "warm_ssd_large_vs_disk_at_start"))
    rows.append(row("cachefs file:// vs local cold at the run's start", "small, SSD tier", "",
                    "warm_ssd_small_vs_local_cold_at_start"))
    rows.append(row("cachefs file://", "small, SSD tier's files in the page cache",
                    fps(res["cachefs_local"]["small_ssd_page_cached"]),
                    "warm_ssd_small_vs_page_cached"))
    for tool in OTHER_TOOLS:
        if tool not in res:
            rows.append(row(tool, "skipped", "", None))
            continue
        p = res[tool]
        rows += [
            row(tool, "small, cold", fps(p["small_cold"]), f"cold_small_vs_{tool}"),
            row(tool, "small, warm", fps(p["small_warm"]), f"warm_small_vs_{tool}"),
            row(tool, "large, cold", mbs(p["large_cold"]), f"cold_large_vs_{tool}"),
            row(tool, "large, warm", mbs(p["large_warm"]), f"warm_large_vs_{tool}"),
        ]
    lk = raw["lookup"]["chunked"]
    rows.append(row("extent lookup", f"{lk['python_ns_per_query']:,.0f} -> "
                    f"{lk['cython_ns_per_query']:,.0f} ns/read", "", "cython_vs_python"))
    title = (f"cachefs read benchmark{' (quick)' if report['quick'] else ''}: "
             f"{raw['small_files']:,} small files ({fmt_bytes(raw['small_bytes'])}) + "
             f"{raw['large_files']} large ({fmt_bytes(raw['large_bytes'])})")
    sizes = "; ".join(
        f"{label}: " + ", ".join(f"{fmt_bytes(int(k))} x {v}" for k, v in s.items())
        for label, s in raw["read_request_sizes"].items())
    notes = [
        *(["--quick: a smoke run; its page-cache passes last milliseconds, so its ratios are not "
           "figures to compare with the targets."] if report["quick"] else []),
        f"Small files: {raw['readers']} reader threads (open + read whole + close, one shuffled "
        f"order, seed {SHUFFLE_SEED}) for every system; large files: one thread, whole files "
        f"in 1 MiB reads.",
        "Ratios: throughput / local disk's (warm page cache); *_vs_local_cold: / local disk's "
        "with each file dropped from the page cache first (the cache dir's objects are dropped "
        "the same way before every SSD-tier pass, and the file:// repository before every "
        "cold pass); *_vs_rclone / *_vs_s3fs: cachefs "
        "from S3 / the other tool in the same state (moto on 127.0.0.1 for all three).",
        f"Warm figures: best of {raw['page_cache_passes']} passes for page-cache states (local "
        f"disk, epoch 2, cachefs small warm), of {raw['warm_passes']} for the memory tier and the "
        f"other tools' warm passes. SSD tier: {raw['ssd_passes']} passes, each right after a "
        "baseline pass (local cold small files; the disk's O_DIRECT read for large ones); "
        "*_vs_local_cold and *_vs_disk of the SSD tier are the median of those pairs' ratios, "
        "*_best the best pass against the best baseline. Small files' SSD passes start with "
        "the mount's directories listed, names known as the local baseline's are (DONTNEED "
        f"drops data, not names); {raw['names_cold_passes']} more "
        "pairs with the remount alone (*_names_cold_*). Memory tier: mount pages dropped "
        "with posix_fadvise(DONTNEED), every byte re-read through FUSE "
        f"({'verified' if _memory_verified(res) else 'NOT verified: see raw'}). "
        f"--memory-cache {fmt_bytes(raw['memory_cache'])}.",
        f"Kernel read sizes during the cold large reads: {sizes}.",
        *([f"This machine runs a {raw['damon_pageout']}: cache files and the file:// "
            "repository are re-read from disk when idle that long."] if raw["damon_pageout"]
          else []),
        "others: share of the machine's CPU time that other processes (other tenants, kernel "
        "threads) used during the pass ('-': too short to tell); a high one marks a disturbed "
        "figure.",
        f"{raw['cpus']} CPUs; root: {raw['root']}; other tools: {raw['other_tools'] or 'skipped'}.",
    ]
    print_table(title, ["system", "case", "throughput", "others", "ratio", "value", "target"],
                rows, notes)


def _memory_verified(res: dict[str, Any]) -> bool:
    return all(res[s]["large_memory"]["all_through_fuse"]
               and res[s]["large_memory"]["memory_only"] for s in ("cachefs_local", "cachefs_s3"))


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "read", "cachefs mount read throughput against local disk, rclone and s3fs")
    parser.add_argument("--skip-other-tools", action="store_true",
                        help="do not measure rclone and s3fs (e.g. when they are not installed)")
    parser.add_argument("--readers", type=int, default=DEFAULT_READERS,
                        help=f"small-file reader threads (default {DEFAULT_READERS})")
    parser.add_argument("--memory-cache", default=DEFAULT_MEMORY_CACHE,
                        help=f"--memory-cache of every cachefs mount (default "
                             f"{DEFAULT_MEMORY_CACHE})")
    args = parser.parse_args(argv)
    # A plain `kill` must unwind through the cleanup (mounts, daemons, moto, rclone, s3fs) too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
