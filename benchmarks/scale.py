"""Scaling of the FUSE mount: mount time, daemon memory per inode, and `ls -l` of a huge directory.

What it measures, in one run, with a private XDG environment (config, data, state and cache all
under the work dir) and a `file://` repository in the work dir:

1. Three synthetic datasets are built directly through the library API (no files on disk):
   `scale` with 1,000,000 files in 1,000 directories of 1,000 (`--quick`: 50,000 in 50),
   `tiny` with 10 files, and `wide` with one directory of 100,000 files (`--quick`: 10,000).
   Every file is an extent (its own offset and size, 1 B .. 4 KiB) into one shared 64 KiB
   chunk, with a correct content hash; names are globally unique, so every directory is its own
   tree. Trees are stored bottom-up with `Repository.put_meta`, then a `Commit`, then `main` is
   moved by compare-and-swap, as `commit_directory` does.
2. Mount time: wall time of `cachefs mount` (the CLI process: resolve the ref, start the daemon,
   return once the mount serves) of `scale` and of `tiny`, alternated, `MOUNT_RUNS` times each
   (`--quick`: once each) with a fresh cache dir every time; the medians are compared:
   `mount_1m_vs_10` = scale / tiny (target <= 2: trees load lazily, one directory at a time, so
   it should be about 1).
3. Memory: `scale` is mounted with `--memory-cache 64MiB` and a fresh cache dir. The daemon's
   VmRSS (/proc/PID/status; the pid comes from `cachefs mounts --json`) and the `inodes` and
   `trees_cached` figures of `cachefs stats --json` are sampled right after mounting; after a
   full walk (os.walk + lstat of every entry, timed); after `sync; echo 2 >
   /proc/sys/vm/drop_caches` (root only: the kernel evicts the unused dentries and inodes and
   sends FORGET for them; the daemon's inode count is polled until it settles); and after a
   second walk. `per_inode_bytes` = (RSS after walk - RSS after mount) / (inodes after walk -
   inodes after mount). That delta also holds the decoded-tree cache (`TieredStore` keeps
   decoded trees bounded by their number of entries, 2,000,000 by default, independently of
   `--memory-cache`), so the decoded size of a tree entry is measured here too (tracemalloc,
   one stored tree decoded in this process) and `per_inode_bytes_excl_trees` subtracts it.
   The design's model is then checked: RSS after walk <= memory tier + fixed overhead (RSS after
   mount) + per-inode cost x inodes held, with and without the tree cache term.
4. `ls -l` (the real command, LC_ALL=C, output to /dev/null) of the `wide` directory on a fresh
   mount (fresh cache dir: "cold"), then again on the same mount ("warm", the best of
   `LS_RUNS`), against `ls -l` of an identical local directory of empty files (created with
   os.open; warmed once, then the best of `LS_RUNS`): `ls_l_100k_vs_local` (cold) and
   `ls_l_100k_warm_vs_local` (target <= 3). Unless strace is missing, two untimed extra runs
   say where the time goes: `strace -c` of `ls -l` on the mount (syscalls of ls: getdents64,
   statx, lgetxattr per file), and, on another fresh mount, an strace of the daemon's reads of
   /dev/fuse that counts the FUSE requests (LOOKUP, GETATTR, GETXATTR, READDIRPLUS, ...) that
   reached Python during a cold and a warm `ls -l`. Also measured in this process: the time to
   decode (and validate) the `wide` directory's stored tree, and to verify it by hash alone,
   since a cold listing pays for decoding it (the daemon decodes a fetched tree twice).

Every mount is unmounted at the end (`cachefs umount`, and in any case `fusermount3 -u -z` plus
SIGKILL of a daemon still serving a benchmark mount point), also when a phase fails.

Reproduce (from the repository root, with the project's virtualenv; needs /dev/fuse, and root
for the drop_caches phase):

    .venv/bin/python -m benchmarks.scale --quick          # 50k files, 10k-entry dir: ~20 s
    .venv/bin/python -m benchmarks.scale --json > out.json # 1M files, 100k-entry dir: ~8 min

The full run needs about 1.2 GB for the mount daemon and as much for the kernel's inodes. On a
machine shared with other work the timings (not the memory figures) vary by tens of percent:
compare several runs.

Options: `--dir PATH` puts the work dir under PATH (default /var/tmp), `--keep` keeps it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from benchmarks.common import (
    benchmark_parser,
    emit,
    fmt_bytes,
    log,
    meets,
    print_table,
    timed,
    work_dir,
)
from cachefs.cache.tiered import TieredStore
from cachefs.dataset.objects import (
    Commit,
    Extent,
    Kind,
    Tree,
    TreeEntry,
    decode_tree,
    hash_bytes,
)
from cachefs.dataset.repo import Repository, tree_key
from cachefs.remotes.local import LocalRemote

BIG, TINY, WIDE = "scale", "tiny", "wide"
WIDE_DIR = "big"
TINY_FILES = 10
FILES_PER_DIR = 1_000
MEMORY_CACHE = 64 << 20
MOUNT_RUNS = 3
QUICK_MOUNT_RUNS = 1  # --quick: a smoke run, each mount timed once
LS_RUNS = 3
CHUNK_BYTES = 64 << 10
MAX_FILE = 4096
MTIME_NS = 1_700_000_000 * 10**9
AUTHOR = "benchmark@localhost"
CLI_TIMEOUT_S = 600
LS_TIMEOUT_S = 3600

TARGETS = {"mount_1m_vs_10": "<= 2", "ls_l_100k_vs_local": "<= 3"}
WARM_TARGET = "<= 3"  # the same goal, shown for the warm run (not one of the JSON targets)

# FUSE opcodes (linux/fuse.h) of the requests an `ls -l` or a walk can send.
FUSE_OPCODES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 5: "READLINK", 14: "OPEN", 15: "READ",
    17: "STATFS", 18: "RELEASE", 22: "GETXATTR", 23: "LISTXATTR", 25: "FLUSH", 27: "OPENDIR",
    28: "READDIR", 29: "RELEASEDIR", 34: "ACCESS", 42: "BATCH_FORGET", 44: "READDIRPLUS",
    52: "STATX",
}


@dataclass(frozen=True)
class Sizes:
    files: int  # files of the big dataset
    dirs: int  # its directories (FILES_PER_DIR files each)
    wide: int  # entries of the wide directory

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        files = 50_000 if quick else 1_000_000
        return cls(files, files // FILES_PER_DIR, 10_000 if quick else 100_000)


# -- synthetic datasets, built through the library API ---------------------------------------

class SyntheticFiles:
    """File entries that all point into one small stored chunk, each with its own extent."""

    def __init__(self, repo: Repository, seed: int = 1) -> None:
        self.data = random.Random(seed).randbytes(CHUNK_BYTES)
        self.chunk = hash_bytes(self.data)
        repo.put_chunk(self.chunk, self.data)
        self._hashes: dict[int, str] = {}
        self.files = 0
        self.bytes = 0

    def entry(self, name: str, index: int) -> TreeEntry:
        size = 1 + (index * 7919) % MAX_FILE
        offset = (size * 31) % (CHUNK_BYTES - MAX_FILE)  # one extent (and hash) per size
        content = self._hashes.get(size)
        if content is None:
            content = self._hashes[size] = hash_bytes(self.data[offset : offset + size])
        self.files += 1
        self.bytes += size
        return TreeEntry(name, Kind.FILE, 0o644, size, MTIME_NS, content,
                         (Extent(self.chunk, offset, size),))


def store_dir(repo: Repository, name: str, entries: list[TreeEntry]) -> TreeEntry:
    """Store a directory's tree; return the entry that names it in its parent."""
    tree_name, _ = repo.put_meta(Tree.from_entries(entries))
    return TreeEntry(name, Kind.DIR, 0o755, 0, MTIME_NS, tree_name)


def store_commit(repo: Repository, dataset: str, root: list[TreeEntry],
                 files: SyntheticFiles) -> str:
    """Store the root tree and a commit; move the dataset's main branch to it (CAS)."""
    tree_name, _ = repo.put_meta(Tree.from_entries(root))
    head = repo.refs.read(dataset, "heads", "main")
    commit = Commit(tree=tree_name, parents=(head.commit,) if head.commit else (),
                    dataset=dataset, author=AUTHOR, message=f"synthetic {dataset}",
                    time_ns=time.time_ns(), files=files.files, bytes=files.bytes)
    commit_name, _ = repo.put_meta(commit)
    repo.remote.flush()  # every object durable before the ref can point at it
    repo.refs.compare_and_swap(dataset, "heads", "main", head, commit_name, "benchmark")
    return commit_name


def build_big(repo: Repository, sizes: Sizes) -> tuple[str, str]:
    """`scale`: sizes.dirs directories of FILES_PER_DIR files. Returns (commit, a leaf tree)."""
    repo.create_dataset(BIG)
    files = SyntheticFiles(repo)
    root = []
    for d in range(sizes.dirs):
        first = d * FILES_PER_DIR
        entries = [files.entry(f"f{i:07d}.bin", i) for i in range(first, first + FILES_PER_DIR)]
        root.append(store_dir(repo, f"d{d:04d}", entries))
    return store_commit(repo, BIG, root, files), root[0].hash


def build_tiny(repo: Repository) -> str:
    repo.create_dataset(TINY)
    files = SyntheticFiles(repo)
    return store_commit(repo, TINY, [files.entry(f"f{i:02d}.bin", i) for i in range(TINY_FILES)],
                        files)


def wide_names(count: int) -> list[str]:
    return [f"img_{i:07d}.jpg" for i in range(count)]


def build_wide(repo: Repository, count: int) -> tuple[str, str]:
    """`wide`: one directory of `count` files. Returns (commit, that directory's tree)."""
    repo.create_dataset(WIDE)
    files = SyntheticFiles(repo)
    entries = [files.entry(name, i) for i, name in enumerate(wide_names(count))]
    directory = store_dir(repo, WIDE_DIR, entries)
    return store_commit(repo, WIDE, [directory], files), directory.hash


def build_all(repo_path: Path, sizes: Sizes, raw: dict[str, Any]) -> tuple[str, str]:
    """Build the three datasets in a fresh repository; return (a leaf tree of the big one, the
    wide directory's tree)."""
    repo = Repository(LocalRemote(repo_path))
    try:
        log(f"building {BIG}: {sizes.files:,} files in {sizes.dirs:,} directories")
        (_, leaf), raw["build_big_s"] = timed(lambda: build_big(repo, sizes))
        build_tiny(repo)
        log(f"building {WIDE}: one directory of {sizes.wide:,} files")
        (_, wide), raw["build_wide_s"] = timed(lambda: build_wide(repo, sizes.wide))
        log(f"built in {raw['build_big_s']:.1f}s + {raw['build_wide_s']:.1f}s")
    finally:
        repo.close()
    return leaf, wide


def tree_entry_bytes(repo_path: Path, tree: str) -> float:
    """Python heap bytes per entry of one decoded tree (what the daemon's tree cache holds)."""
    stored = LocalRemote(repo_path).get(tree_key(tree))
    gc.collect()
    tracemalloc.start()
    try:
        decoded = decode_tree(tree, stored)
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return used / len(decoded.entries)


def tree_load_costs(repo_path: Path, tree: str) -> tuple[float, float]:
    """Seconds to decode (and validate) a stored tree, and to verify it by hash alone.

    The daemon decodes a tree it fetches twice (once to verify it, in `object_is_intact`, and
    once in `TieredStore.tree`); the hash-only figure is what verification alone needs.
    """
    stored = LocalRemote(repo_path).get(tree_key(tree))
    decode_s = min(timed(lambda: decode_tree(tree, stored))[1] for _ in range(2))

    def verify() -> None:
        body = zstandard.ZstdDecompressor().decompress(stored[4:], max_output_size=1 << 30)
        if hash_bytes(stored[:4] + body) != tree:
            raise RuntimeError(f"tree {tree} does not match its name")

    return decode_s, min(timed(verify)[1] for _ in range(2))


def make_local_dir(path: Path, names: list[str]) -> None:
    """The `ls -l` baseline: the same names as empty files on the local disk."""
    path.mkdir(parents=True)
    for name in names:
        os.close(os.open(path / name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))


# -- mounts ----------------------------------------------------------------------------------

def cli(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run the real `cachefs` CLI (a fresh process, as a user would)."""
    proc = subprocess.run([sys.executable, "-m", "cachefs.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cachefs {' '.join(args)} exited {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    return proc


def daemon_pids(mountpoint: Path) -> list[int]:
    """Live mount daemons started for `mountpoint` (found in /proc, without a FUSE request)."""
    wanted = f'"mountpoint": {json.dumps(str(mountpoint))}'
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if "cachefs.fuse.daemon" in cmdline and wanted in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def is_mounted(mountpoint: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mountpoint) for line in f)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or another /proc/PID/status memory field, e.g. VmHWM) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


class Mounts:
    """The benchmark's mounts, all under one directory, each with its own cache dir."""

    def __init__(self, root: Path, remote_url: str) -> None:
        self.root = root
        self.remote_url = remote_url
        self.points: list[Path] = []
        self._caches = 0

    def mount(self, dataset: str, name: str) -> tuple[Path, float]:
        """Mount `dataset` at ROOT/mnt/NAME with a fresh cache dir; return (point, seconds)."""
        point = (self.root / "mnt" / name).resolve()
        point.mkdir(parents=True, exist_ok=True)
        self._caches += 1
        cache = self.root / "caches" / f"{self._caches:03d}"
        self.points.append(point)
        _, seconds = timed(lambda: cli(
            "mount", dataset, str(point), "--remote", self.remote_url, "--cache-dir", str(cache),
            "--memory-cache", str(MEMORY_CACHE)))
        return point, seconds

    def pid(self, point: Path) -> int:
        for row in json.loads(cli("mounts", "--json").stdout):
            if row.get("mountpoint") == str(point) and isinstance(row.get("pid"), int):
                return int(row["pid"])
        raise RuntimeError(f"no serving cachefs mount at {point}")

    @staticmethod
    def stats(point: Path) -> dict[str, Any]:
        return json.loads(cli("stats", str(point), "--json").stdout)

    def unmount(self, point: Path) -> None:
        cli("umount", str(point))
        self.points.remove(point)

    def cleanup(self) -> None:
        """Detach every mount still there and kill any daemon still serving one."""
        for point in self.points:
            if is_mounted(point):
                subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True,
                               timeout=60, check=False)
            deadline = time.monotonic() + 10
            while (pids := daemon_pids(point)) and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in pids:
                log(f"killing leftover mount daemon {pid} of {point}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.points.clear()


@contextlib.contextmanager
def private_xdg(work: Path) -> Iterator[None]:
    """XDG_{CONFIG,DATA,STATE,CACHE}_HOME under the work dir, for us and every child process."""
    names = ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME")
    saved = {name: os.environ.get(name) for name in names}
    for name in names:
        path = work / "xdg" / name.split("_")[1].lower()
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- measurements ----------------------------------------------------------------------------

def walk(root: Path) -> tuple[int, int]:
    """os.walk + lstat of every entry below `root`; returns (files, directories)."""
    files = dirs = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.lstat(os.path.join(dirpath, name))
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
        files += len(filenames)
        dirs += len(dirnames)
    return files, dirs


def drop_kernel_caches() -> str | None:
    """Make the kernel evict unused dentries and inodes (FORGET to FUSE); None, or why not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
    except OSError as e:
        return f"echo 2 > /proc/sys/vm/drop_caches failed: {e.strerror} (needs root)"
    return None


def settled_inodes(point: Path, limit_s: float = 60.0) -> int:
    """The daemon's inode count once it stops falling (FORGETs arrive asynchronously)."""
    last = Mounts.stats(point)["inodes"]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = Mounts.stats(point)["inodes"]
        if now == last:
            return int(now)
        last = now
    return int(last)


def ls_l(path: Path) -> float:
    """Wall seconds of `ls -l PATH > /dev/null` (LC_ALL=C)."""
    env = {**os.environ, "LC_ALL": "C"}
    _, seconds = timed(lambda: subprocess.run(
        ["ls", "-l", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
        check=True, timeout=LS_TIMEOUT_S))
    return seconds


def strace_ls(path: Path, out: Path) -> dict[str, int]:
    """Syscall counts of one `ls -l PATH` (strace -c), e.g. {"statx": 100000, ...}."""
    env = {**os.environ, "LC_ALL": "C"}
    subprocess.run(["strace", "-c", "-o", str(out), "ls", "-l", str(path)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=True,
                   timeout=LS_TIMEOUT_S)
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) in (5, 6) and fields[0][0].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def _traced(pid: int) -> bool:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        return all(
            any(line.startswith("TracerPid:") and line.split()[1] != "0"
                for line in (task / "status").read_text().splitlines())
            for task in tasks)
    except OSError:
        return False


_READ_LINE = re.compile(r'(?:read\(\d+, |read resumed>)"((?:\\x[0-9a-f]{2}){8})"?.*= (\d+)$')


class FuseRequestCounter:
    """Counts the FUSE requests a daemon reads from /dev/fuse, by strace of its read(2) calls.

    A request starts with its total length and opcode (two little-endian u32): a read whose
    first u32 equals its return value is a FUSE request. strace slows the daemon down, so
    nothing timed runs while it is attached.
    """

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ["strace", "-f", "-p", str(pid), "-e", "trace=read", "-e", "signal=none", "-xx",
             "-s", "8", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _traced(pid):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("strace could not attach to the mount daemon")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # detaches; the daemon runs on
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def counts(self) -> dict[str, int]:
        """Requests by opcode name, most frequent first (call after `stop`)."""
        found: Counter[str] = Counter()
        for line in self.out.read_text(errors="replace").splitlines():
            match = _READ_LINE.search(line)
            if match is None:
                continue
            head = bytes.fromhex(match.group(1).replace("\\x", ""))
            length = int.from_bytes(head[:4], "little")
            opcode = int.from_bytes(head[4:8], "little")
            if length == int(match.group(2)):
                found[FUSE_OPCODES.get(opcode, f"op{opcode}")] += 1
        return dict(found.most_common())


def count_requests(pid: int, out: Path, path: Path) -> tuple[dict[str, int], float]:
    """FUSE requests that one `ls -l PATH` sends to daemon `pid`, and its (traced) seconds."""
    counter = FuseRequestCounter(pid, out)
    try:
        seconds = ls_l(path)
    finally:
        counter.stop()
    return counter.counts(), seconds


def memory_phase(mounts: Mounts, sizes: Sizes, raw: dict[str, Any]) -> None:
    point, _ = mounts.mount(BIG, "memory")
    pid = mounts.pid(point)
    raw["daemon_pid"] = pid

    def sample(label: str) -> dict[str, Any]:
        stats = mounts.stats(point)
        row = {"rss": rss_bytes(pid), "inodes": stats["inodes"],
               "trees_cached": stats["trees_cached"],
               "memory_tier_bytes": stats["memory_bytes_used"]}
        raw[f"rss_after_{label}"] = row["rss"]
        raw[f"inodes_after_{label}"] = row["inodes"]
        raw[f"trees_cached_after_{label}"] = row["trees_cached"]
        raw[f"memory_tier_bytes_after_{label}"] = row["memory_tier_bytes"]
        log(f"{label}: RSS {fmt_bytes(row['rss'])}, {row['inodes']:,} inodes, "
            f"{row['trees_cached']:,} trees cached")
        return row

    mounted = sample("mount")
    log(f"walking {sizes.files:,} files (os.walk + lstat)")
    (files, dirs), raw["walk_s"] = timed(lambda: walk(point))
    if (files, dirs) != (sizes.files, sizes.dirs):
        raise RuntimeError(f"walk found {files} files in {dirs} dirs, expected "
                           f"{sizes.files} in {sizes.dirs}")
    raw["walk_entries_per_s"] = (files + dirs) / raw["walk_s"]
    log(f"walk: {raw['walk_s']:.1f}s, {raw['walk_entries_per_s']:,.0f} entries/s")
    walked = sample("walk")

    raw["drop_caches"] = drop_kernel_caches() or "ok"
    if raw["drop_caches"] == "ok":
        settled_inodes(point)
        sample("forget")
    else:
        log(f"cannot make the kernel forget inodes: {raw['drop_caches']}")

    log("walking again")
    _, raw["rewalk_s"] = timed(lambda: walk(point))
    log(f"second walk: {raw['rewalk_s']:.1f}s")
    sample("rewalk")
    raw["rss_peak"] = rss_bytes(pid, "VmHWM")
    mounts.unmount(point)

    held = walked["inodes"] - mounted["inodes"]
    grown = walked["rss"] - mounted["rss"]
    raw["per_inode_bytes"] = grown / held if held > 0 else None
    # The tree cache holds every walked entry (each belongs to exactly one cached tree) when
    # no tree was evicted, i.e. when every directory's tree is still cached.
    tree_entries = files + dirs if walked["trees_cached"] == dirs + 1 else None
    raw["tree_entries_cached"] = tree_entries
    if tree_entries is not None and held > 0:
        trees = tree_entries * raw["tree_entry_bytes"]
        raw["tree_cache_bytes_est"] = trees
        raw["per_inode_bytes_excl_trees"] = (
            grown - trees - (walked["memory_tier_bytes"] - mounted["memory_tier_bytes"])) / held


def design_check(raw: dict[str, Any]) -> dict[str, Any]:
    """RSS after the walk against the design's bound, with the measured per-inode costs."""
    per_inode = raw.get("per_inode_bytes_excl_trees")
    if per_inode is None:
        return {}
    fixed, inodes = raw["rss_after_mount"], raw["inodes_after_walk"]
    without_trees = MEMORY_CACHE + fixed + per_inode * inodes
    with_trees = without_trees + raw["tree_cache_bytes_est"]
    tree_bound = raw["tree_cache_limit_entries"] * raw["tree_entry_bytes"]
    return {
        "rss_bound_without_tree_cache": without_trees,
        "rss_within_bound_without_tree_cache": raw["rss_after_walk"] <= without_trees,
        "rss_bound_with_tree_cache": with_trees,
        "rss_within_bound_with_tree_cache": raw["rss_after_walk"] <= with_trees,
        "tree_cache_bound_bytes_est": tree_bound,
    }


def ls_phase(mounts: Mounts, work: Path, sizes: Sizes, raw: dict[str, Any]) -> None:
    names = wide_names(sizes.wide)
    local = work / "local" / WIDE_DIR
    log(f"creating {sizes.wide:,} empty files on local disk")
    _, raw["local_create_s"] = timed(lambda: make_local_dir(local, names))
    ls_l(local)  # warm its dentries and inodes
    raw["ls_local_runs_s"] = [ls_l(local) for _ in range(LS_RUNS)]
    raw["ls_local_s"] = min(raw["ls_local_runs_s"])
    log(f"ls -l local: {raw['ls_local_s']:.3f}s")

    point, _ = mounts.mount(WIDE, "ls")
    target = point / WIDE_DIR
    raw["ls_mount_cold_s"] = ls_l(target)
    log(f"ls -l mount, cold: {raw['ls_mount_cold_s']:.3f}s")
    raw["ls_mount_warm_runs_s"] = [ls_l(target) for _ in range(LS_RUNS)]
    raw["ls_mount_warm_s"] = min(raw["ls_mount_warm_runs_s"])
    log(f"ls -l mount, warm: {raw['ls_mount_warm_s']:.3f}s")
    raw["ls_mount_inodes"] = mounts.stats(point)["inodes"]

    if shutil.which("strace") is None:
        raw["strace"] = "strace is not installed: no syscall or request counts"
        mounts.unmount(point)
        return
    try:
        log("strace -c of ls -l (untimed): mount (warm), local")
        raw["ls_syscalls_mount"] = strace_ls(target, work / "strace-ls-mount.txt")
        raw["ls_syscalls_local"] = strace_ls(local, work / "strace-ls-local.txt")
    except (OSError, subprocess.SubprocessError) as e:
        raw["strace"] = f"strace -c ls -l failed: {e}"
    mounts.unmount(point)
    if "strace" in raw:
        log(raw["strace"])
        return

    point, _ = mounts.mount(WIDE, "ls-requests")
    pid = mounts.pid(point)
    log("counting the FUSE requests of a cold and a warm ls -l (strace on the daemon, untimed)")
    try:
        raw["ls_requests_cold"], raw["ls_requests_cold_traced_s"] = count_requests(
            pid, work / "strace-daemon-cold.txt", point / WIDE_DIR)
        raw["ls_requests_warm"], raw["ls_requests_warm_traced_s"] = count_requests(
            pid, work / "strace-daemon-warm.txt", point / WIDE_DIR)
        log(f"requests: cold {_requests(raw['ls_requests_cold'])}; "
            f"warm {_requests(raw['ls_requests_warm'])}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        raw["strace"] = f"counting FUSE requests with strace failed: {e}"
        log(raw["strace"])
    mounts.unmount(point)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = Sizes.of(args.quick)
    raw: dict[str, Any] = {
        "files": sizes.files, "dirs": sizes.dirs, "files_per_dir": FILES_PER_DIR,
        "tiny_files": TINY_FILES, "wide_entries": sizes.wide, "memory_cache": MEMORY_CACHE,
        "tree_cache_limit_entries":
            inspect.signature(TieredStore).parameters["tree_cache_entries"].default,
        "cpus": os.cpu_count(), "root": os.geteuid() == 0,
    }
    with work_dir(args.dir, args.keep, prefix="cachefs-scale-") as work, private_xdg(work):
        repo_path = work / "repo"
        remote_url = "file://" + str(repo_path)
        leaf, wide = build_all(repo_path, sizes, raw)
        gc.collect()  # the builder's object cache held every tree: free it before measuring
        raw["tree_entry_bytes"] = tree_entry_bytes(repo_path, leaf)
        raw["wide_tree_decode_s"], raw["wide_tree_hash_verify_s"] = tree_load_costs(
            repo_path, wide)

        mounts = Mounts(work, remote_url)
        try:
            mount_runs = QUICK_MOUNT_RUNS if args.quick else MOUNT_RUNS
            log(f"mount time: {BIG} vs {TINY}, {mount_runs} runs each")
            big_runs, tiny_runs = [], []
            for i in range(mount_runs):
                for dataset, runs in ((TINY, tiny_runs), (BIG, big_runs)):
                    point, seconds = mounts.mount(dataset, f"time-{dataset}-{i}")
                    runs.append(seconds)
                    mounts.unmount(point)
            raw.update(mount_big_runs_s=big_runs, mount_tiny_runs_s=tiny_runs,
                       mount_big_s=statistics.median(big_runs),
                       mount_tiny_s=statistics.median(tiny_runs))
            log(f"mount: {raw['mount_big_s']:.3f}s vs {raw['mount_tiny_s']:.3f}s")

            memory_phase(mounts, sizes, raw)
            raw.update(design_check(raw))
            ls_phase(mounts, work, sizes, raw)
        finally:
            mounts.cleanup()

    ratios = {
        "mount_1m_vs_10": raw["mount_big_s"] / raw["mount_tiny_s"],
        "ls_l_100k_vs_local": raw["ls_mount_cold_s"] / raw["ls_local_s"],
        "ls_l_100k_warm_vs_local": raw["ls_mount_warm_s"] / raw["ls_local_s"],
    }
    return {"ratios": ratios, "raw": raw, "targets": dict(TARGETS), "quick": bool(args.quick)}


# -- report ----------------------------------------------------------------------------------

def _requests(counts: dict[str, int] | None) -> str:
    if not counts:
        return "n/a"
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]

    def verdict(value: float, target: str) -> str:
        return f"{target:<5} {'ok' if meets(value, target) else 'MISSED'}"

    def mem(label: str) -> str:
        rss = raw.get(f"rss_after_{label}")
        if rss is None:
            return "n/a"
        return f"{fmt_bytes(rss)}, {raw[f'inodes_after_{label}']:,} inodes"

    per_inode = raw.get("per_inode_bytes")
    excl = raw.get("per_inode_bytes_excl_trees")
    rows = [
        [f"mount {TINY} ({TINY_FILES} files, baseline)", f"{raw['mount_tiny_s']:.3f}", "", "1.00",
         ""],
        [f"mount {BIG} ({raw['files']:,} files)", f"{raw['mount_big_s']:.3f}", "mount_1m_vs_10",
         f"{r['mount_1m_vs_10']:.2f}", verdict(r["mount_1m_vs_10"], TARGETS["mount_1m_vs_10"])],
        [f"walk {raw['files'] + raw['dirs']:,} entries (os.walk + lstat)",
         f"{raw['walk_s']:.2f}", f"{raw['walk_entries_per_s']:,.0f} entries/s", "", ""],
        ["  same after the kernel forgot them", f"{raw['rewalk_s']:.2f}", "", "", ""],
        ["  daemon RSS after mount", "", mem("mount"), "", ""],
        ["  daemon RSS after walk", "", mem("walk"), "", ""],
        ["  daemon RSS after drop_caches", "", mem("forget"), "", ""],
        ["  daemon RSS after second walk", "", mem("rewalk"), "", ""],
        ["  RSS growth per inode held", "", "per_inode_bytes",
         f"{per_inode:,.0f} B" if per_inode is not None else "n/a", ""],
        ["  ... less the decoded-tree cache", "", "per_inode_bytes_excl_trees",
         f"{excl:,.0f} B" if excl is not None else "n/a", ""],
        [f"ls -l local dir of {raw['wide_entries']:,} (baseline)", f"{raw['ls_local_s']:.3f}",
         "", "1.00", ""],
        ["ls -l on the mount, cold", f"{raw['ls_mount_cold_s']:.3f}", "ls_l_100k_vs_local",
         f"{r['ls_l_100k_vs_local']:.2f}",
         verdict(r["ls_l_100k_vs_local"], TARGETS["ls_l_100k_vs_local"])],
        ["ls -l on the mount, warm", f"{raw['ls_mount_warm_s']:.3f}", "ls_l_100k_warm_vs_local",
         f"{r['ls_l_100k_warm_vs_local']:.2f}",
         verdict(r["ls_l_100k_warm_vs_local"], WARM_TARGET)],
    ]
    title = (f"cachefs scale benchmark{' (quick)' if report['quick'] else ''}: "
             f"{raw['files']:,} files in {raw['dirs']:,} dirs, one dir of "
             f"{raw['wide_entries']:,}; --memory-cache {fmt_bytes(raw['memory_cache'])}")
    notes = [
        f"Mount: median of {len(raw['mount_big_runs_s'])} `cachefs mount` runs each (CLI "
        "process until the mount serves), fresh cache dir each time.",
        f"Decoded tree entry: {raw['tree_entry_bytes']:,.0f} B (tracemalloc); trees cached after "
        f"the walk: {raw.get('trees_cached_after_walk', 'n/a')}, est. "
        f"{fmt_bytes(raw.get('tree_cache_bytes_est') or 0)}; tree cache bound "
        f"{raw['tree_cache_limit_entries']:,} entries ~ "
        f"{fmt_bytes(raw.get('tree_cache_bound_bytes_est') or 0)}, independent of "
        "--memory-cache.",
        f"Design bound (memory tier + RSS after mount + per-inode x inodes): "
        f"{fmt_bytes(raw.get('rss_bound_without_tree_cache') or 0)} -> within: "
        f"{raw.get('rss_within_bound_without_tree_cache', 'n/a')}; adding the tree cache: "
        f"{fmt_bytes(raw.get('rss_bound_with_tree_cache') or 0)} -> within: "
        f"{raw.get('rss_within_bound_with_tree_cache', 'n/a')}.",
        f"Tree load: decoding the {raw['wide_entries']:,}-entry tree takes "
        f"{raw['wide_tree_decode_s']:.2f}s (the daemon decodes a fetched tree twice: to verify "
        f"it, then to use it); verifying it by hash alone takes "
        f"{raw['wide_tree_hash_verify_s']:.3f}s.",
        f"drop_caches: {raw['drop_caches']}.",
        f"ls -l syscalls on the mount: {_requests(raw.get('ls_syscalls_mount'))}.",
        f"FUSE requests reaching the daemon, cold ls -l: {_requests(raw.get('ls_requests_cold'))}"
        f"; warm: {_requests(raw.get('ls_requests_warm'))}.",
        *([raw["strace"]] if "strace" in raw else []),
        f"{raw['cpus']} CPUs.",
    ]
    print_table(title, ["phase", "seconds", "figure", "value", "target"], rows, notes)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "scale", "cachefs mount scaling: mount time, daemon RSS per inode, ls -l of a "
                 "huge directory against a local one")
    args = parser.parse_args(argv)
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
