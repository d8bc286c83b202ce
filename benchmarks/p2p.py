"""The peer tier (issue 20): N nodes reading one dataset from a throttled origin, with and
without peers.

What it measures, in one run, on one machine, everything bound to 127.0.0.1:

1. Data and origin. A synthetic dataset (`cachefs.sample.make_sample`; full: 3,000
   incompressible files of ~110 KB in 30 class directories plus two 64 MiB shards, ~460 MB;
   `--quick`: 100 files plus two 2 MiB shards, ~15 MB) is committed to an S3 bucket of a moto
   server started for the run (`tests.servers.MotoServer`), *directly* to moto's endpoint, so
   that the commit neither waits on the throttle nor counts as origin traffic. Reading goes
   through a `tests.fault_proxy.FaultProxy` in front of moto with `rate` (`--rate`; full 50 MB/s,
   quick 40 MB/s): every GET answer of every client shares one link of that speed, like an object
   store's egress, and the proxy counts the bytes it relays (`proxy.get_bytes`): the *origin
   bytes* of every figure below. The remote `origin` is configured (`cachefs remote add`) with the
   proxy's endpoint, so the mounts and the peer servers all read through it.
   Dataset size (the denominator of the origin ratios) = the bytes of the repository's stored
   chunks (a listing of `chunks/` on moto's own endpoint): what one full read from the origin
   costs (trees and commits, a few KB, come on top). The N=1 runs without peers read it from the
   proxy once each; their origin bytes are in raw (`n1_alone_origin_bytes`) for comparison.
2. Nodes. A node = its own fresh cache dir + its own `cachefs peer serve --cache-dir DIR --listen
   127.0.0.1:PORT --drain-seconds 0` (`tests.peers.PeerServer`; only in runs with peers; no
   drain: a server is stopped only after its run's mounts are gone) + its own
   `cachefs mount bench@main MNT --remote origin --cache-dir DIR --memory-cache 256MiB`, with
   `--cache-peers` listing every node's server in runs with peers. Every run starts from fresh
   cache dirs (removed afterwards), fresh servers and fresh mounts.
3. An epoch. Each node has its own reader process (the nodes share no Python process; the
   readers only use the standard library): every small file read whole, in an order shuffled
   with the node's seed, by 8 threads (`--readers`) each taking the next file; then the shards,
   one after the other, in 4 MiB reads. Every file is compared with the source's bytes; a
   mismatch or an error is counted (`wrong`, `errors`) and fails the run (exit status 1, after
   the report). The readers start together (each signals it is ready, then all are released at
   once); epoch time = from the release until the last node finishes. After the epoch each
   mount's counters (`cachefs stats MNT --json`: origin_requests, origin_bytes, peer_hits,
   peer_bytes, peer_errors, peer_timeouts, hedged_requests, quarantined_peers, live_peers, ...)
   and each peer server's `Status` counters are recorded in raw.
4. Runs, in this order:
   - N=1 overhead, ABBA: tier on, off, off, on, on, off (`--quick`: on, off only; with N=1 the
     ring's only member is the node's own server, so every chunk goes mount -> own server ->
     origin);
     `peer_overhead_n1` = median over the on/off pairs of (throughput on / throughput
     off) = epoch off / epoch on (target >= 0.95);
   - N=2 with peers, N=2 alone; N=4 alone, N=4 with peers;
   - N=4 with peers, node 1's peer server killed with SIGKILL a third of the way into the
     epoch (a third of the previous run's epoch time); node 1's mount keeps reading (its chunks'
     owner is gone: they go to their next-ranked member, or to the origin).
5. Ratios:
   - `origin_ratio_nN` = origin bytes of the run with peers / dataset size (target <= 1.1;
     alone it is about N: `origin_ratio_alone_n4`);
   - `epoch_time_ratio_nN` = epoch with peers / epoch alone (target at N=4 <= 0.4; the ideal is
     1/N);
   - `alone_throttle_use_n4` = origin bytes of the N=4 run alone / (its epoch x rate): how much
     of the link the alone run used. The N=4 comparison is valid only if it is >= 0.9
     (`valid_n4` in the JSON document, next to `ratios`): an alone run that cannot fill the link
     (CPU-bound) flatters the peers' ratio;
   - `epoch_time_ratio_owner_killed_n4` = epoch of the killed run / epoch of N=4 alone
     (`origin_ratio_owner_killed_n4` too).
   The N=2 and owner-killed figures have no target of their own in the issue; TARGETS gives the
   N=2 origin ratio the N=4 one's.

Isolation and cleanup: XDG_CONFIG_HOME, XDG_DATA_HOME, XDG_STATE_HOME, XDG_CACHE_HOME and TMPDIR
point into the work dir (`private_environment`); AWS_* are the test credentials. Every mount,
peer server and reader the run starts is undone in a `finally` (mounts lazily unmounted, daemons
and processes still alive killed), the proxy and moto are stopped, and the work dir is removed
unless `--keep`.

Reproduce (from the repository root, with the project's virtualenv; needs FUSE):

    .venv/bin/python -m benchmarks.p2p --quick           # smoke run, ~45 s
    .venv/bin/python -m benchmarks.p2p --json > out.json # full run, ~4-5 minutes

Options: `--dir PATH` puts the work dir under PATH (default /var/tmp), `--keep` keeps it,
`--rate BYTES_PER_S` of the origin's link, `--readers N` small-file threads per node,
`--memory-cache SIZE` of every mount.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import benchmarks.read as read_bench
from benchmarks.common import (
    benchmark_parser,
    describe_spec,
    emit,
    fmt_bytes,
    fmt_rate,
    log,
    meets,
    print_table,
    private_environment,
    sync,
    timed,
    work_dir,
)
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.repo import Repository
from cachefs.fuse.mount import mount_stats
from cachefs.peer.client import PeerCallError
from cachefs.remotes.registry import open_remote_url
from cachefs.sample import SampleSpec, make_sample
from tests.fault_proxy import FaultProxy
from tests.peers import PeerServer
from tests.servers import AWS_TEST_ENV, MotoServer

DATASET = "bench"
AUTHOR = "benchmark@localhost"
BUCKET = "cachefs-p2p-bench"
REMOTE = "origin"
REGION = AWS_TEST_ENV["AWS_DEFAULT_REGION"]
DEFAULT_READERS = 8
DEFAULT_MEMORY_CACHE = "256MiB"
KILL_FRACTION = 1 / 3  # of the epoch, when the owner is killed
KILLED_NODE = 1
VALID_THROTTLE_USE = 0.9

FULL_SPEC = SampleSpec(small_files=3_000, small_mean=110 * 1024, classes=30,
                       large_files=2, large_size=64 << 20, seed=1)
QUICK_SPEC = SampleSpec(small_files=100, small_mean=110 * 1024, classes=10,
                        large_files=2, large_size=2 << 20, seed=1)
FULL_RATE = 50e6
QUICK_RATE = 40e6
N1_ORDER = (True, False, False, True, True, False)  # tier on/off for N=1: three ABBA pairs
QUICK_N1_ORDER = (True, False)  # --quick: one pair (a smoke run, not a figure to compare)

TARGETS = {
    "origin_ratio_n4": "<= 1.1",
    "epoch_time_ratio_n4": "<= 0.4",
    "peer_overhead_n1": ">= 0.95",
    "origin_ratio_n2": "<= 1.1",
}

# Mount counters kept in raw, per node.
MOUNT_KEYS = ("origin_requests", "origin_bytes", "peer_hits", "peer_bytes", "peer_errors",
              "peer_timeouts", "hedged_requests", "peer_corrupt", "peer_misses",
              "quarantined_peers", "live_peers", "ssd_hits", "memory_hits")

# One node's reader: standard library only (starts fast, shares nothing with this process).
# argv[1]: JSON {mnt, src, small, large, seed, threads, out}. Prints "ready", waits for a line on
# stdin, reads the epoch, writes its result as JSON to `out`.
READER = r"""
import itertools, json, os, random, sys, time
from concurrent.futures import ThreadPoolExecutor
cfg = json.loads(sys.argv[1])
mnt, src = cfg["mnt"], cfg["src"]
order = list(cfg["small"])
random.Random(cfg["seed"]).shuffle(order)
wrong, errors = [], []
def small(rel):
    try:
        with open(os.path.join(mnt, rel), "rb", buffering=0) as f:
            got = f.read()
        with open(os.path.join(src, rel), "rb") as f:
            if got != f.read():
                wrong.append(rel)
        return len(got)
    except OSError as e:
        errors.append(f"{rel}: {e}")
        return 0
def large(rel):
    total = 0
    try:
        with open(os.path.join(mnt, rel), "rb", buffering=0) as f, \
                open(os.path.join(src, rel), "rb") as g:
            while True:
                got = f.read(4 << 20)
                if got != g.read(len(got) or 1):
                    wrong.append(rel)
                    break
                if not got:
                    break
                total += len(got)
    except OSError as e:
        errors.append(f"{rel}: {e}")
    return total
os.listdir(mnt)
print("ready", flush=True)
sys.stdin.readline()
start = time.monotonic()
counter = itertools.count()
def worker():
    n = 0
    while (i := next(counter)) < len(order):
        n += small(order[i])
    return n
with ThreadPoolExecutor(cfg["threads"]) as pool:
    small_bytes = sum(f.result() for f in [pool.submit(worker) for _ in range(cfg["threads"])])
small_end = time.monotonic()
large_bytes = sum(large(rel) for rel in cfg["large"])
end = time.monotonic()
with open(cfg["out"], "w") as f:
    json.dump({"start": start, "small_end": small_end, "end": end, "files":
               len(order) + len(cfg["large"]), "bytes": small_bytes + large_bytes,
               "wrong": wrong, "errors": errors[:20], "error_count": len(errors)}, f)
"""


class Processes(read_bench.Processes):
    """benchmarks.read's record of mounts, mount daemons and child processes (all undone by
    `close`), plus the peer servers and the nodes' readers of this run."""

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.servers: list[PeerServer] = []

    def peer_server(self, cache_dir: Path) -> PeerServer:
        # No drain on SIGTERM: a server is stopped only after its run's mounts are unmounted
        # and its figures taken, so the default 2 s drain would only add to every run.
        server = PeerServer(cache_dir, extra=("--drain-seconds", "0"))
        self.servers.append(server)
        return server.start()

    def mount(self, mountpoint: Path, cache_dir: Path, memory_cache: str,
              peers: str | None) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mountpoints.append(mountpoint)
        args = ["mount", f"{DATASET}@main", str(mountpoint), "--remote", REMOTE,
                "--cache-dir", str(cache_dir), "--memory-cache", memory_cache, "--json"]
        if peers is not None:
            args += ["--cache-peers", peers]
        self.daemons.add(int(json.loads(self.cli(*args))["pid"]))

    def unmount(self, mountpoint: Path) -> None:
        self.unmount_cachefs(mountpoint)

    def reader(self, config: dict[str, Any], log_path: Path) -> subprocess.Popen[bytes]:
        log_file = open(log_path, "ab")  # noqa: SIM115 (closed in close())
        self._logs.append(log_file)
        proc = subprocess.Popen([sys.executable, "-c", READER, json.dumps(config)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file)
        self.children.append(proc)
        return proc

    def close(self) -> None:
        """Kill the readers and peer servers still running, then undo the mounts (never
        raises)."""
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
        for server in self.servers:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                server.kill()
        super().close()


# -- data ---------------------------------------------------------------------------------------
def generate(src: Path, spec: SampleSpec) -> tuple[list[str], list[str], int]:
    """Write the dataset; (small files, shards, total bytes), relative paths, sorted."""
    make_sample(src, spec)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    large = [rel for rel in files if rel.startswith("shards/")]
    small = [rel for rel in files if rel not in set(large)]
    return small, large, sum((src / rel).stat().st_size for rel in files)


def commit_and_measure(url: str, src: Path) -> tuple[float, int, int]:
    """Commit `src` as the dataset's first version; (seconds, stored chunks, their bytes)."""
    repo = Repository(open_remote_url(url))
    try:
        repo.create_dataset(DATASET)
        result, seconds = timed(lambda: commit_directory(repo, DATASET, "main", src, "v1",
                                                         author=AUTHOR))
        log(f"committed {result.files:,} files, {fmt_bytes(result.bytes)} in {seconds:.1f}s")
        sizes = [info.size for info in repo.remote.list_info("chunks/")]
        return seconds, len(sizes), sum(sizes)
    finally:
        repo.remote.close()


# -- one epoch ----------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, proxy: FaultProxy,
                 work: Path, src: Path, small: list[str], large: list[str],
                 dataset_bytes: int) -> None:
        self.args = args
        self.procs = procs
        self.proxy = proxy
        self.work = work
        self.src = src
        self.small = small
        self.large = large
        self.dataset_bytes = dataset_bytes
        self.runs: dict[str, dict[str, Any]] = {}

    def epoch(self, label: str, nodes: int, peers: bool,
              kill_after_s: float | None = None) -> dict[str, Any]:
        """One run: `nodes` fresh nodes read the dataset once, together; its figures."""
        root = self.work / "runs" / label
        caches = [root / f"node{i}" / "cache" for i in range(nodes)]
        points = [root / f"node{i}" / "mnt" for i in range(nodes)]
        for cache in caches:
            cache.mkdir(parents=True)
        sync()
        # Nodes start (and stop) in parallel: each is a few processes of its own, and starting
        # them one by one cost more than the quick run's reading.
        with ThreadPoolExecutor(nodes) as pool:
            servers = list(pool.map(self.procs.peer_server, caches)) if peers else []
        ring = ",".join(s.address for s in servers) if peers else None
        before = self.proxy.get_bytes
        with ThreadPoolExecutor(nodes) as pool:
            list(pool.map(lambda pc: self.procs.mount(pc[0], pc[1], self.args.memory_cache,
                                                      ring), zip(points, caches)))
        if peers:
            live = [mount_stats(str(p)).get("live_peers") for p in points]
            if live != [nodes] * nodes:
                raise RuntimeError(f"{label}: live peers {live}, expected {nodes} each")
        readers = []
        for i, point in enumerate(points):
            config = {"mnt": str(point), "src": str(self.src), "small": self.small,
                      "large": self.large, "seed": 1000 + i, "threads": self.args.readers,
                      "out": str(root / f"node{i}" / "result.json")}
            readers.append(self.procs.reader(config, root / f"node{i}" / "reader.log"))
        for i, proc in enumerate(readers):
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{label}: node {i}'s reader did not start: "
                                   f"{(root / f'node{i}' / 'reader.log').read_text()[-2000:]}")
        released = time.monotonic()
        for proc in readers:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        killed_at = None
        budget = max(120.0, 10 * nodes * self.dataset_bytes / self.args.rate)
        if kill_after_s is not None:
            while (time.monotonic() - released < kill_after_s
                   and any(p.poll() is None for p in readers)):
                time.sleep(0.01)
            servers[KILLED_NODE].kill()  # SIGKILL
            killed_at = time.monotonic() - released
            log(f"{label}: killed node {KILLED_NODE}'s peer server at {killed_at:.1f}s")
        for i, proc in enumerate(readers):
            left = budget - (time.monotonic() - released)
            try:
                proc.wait(max(1.0, left))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{label}: node {i} did not finish in {budget:.0f}s") from None
            if proc.returncode != 0:
                raise RuntimeError(f"{label}: node {i}'s reader exited {proc.returncode}: "
                                   f"{(root / f'node{i}' / 'reader.log').read_text()[-2000:]}")
        results = [json.loads((root / f"node{i}" / "result.json").read_text())
                   for i in range(nodes)]
        epoch_s = max(r["end"] for r in results) - released
        origin_bytes = self.proxy.get_bytes - before
        node_docs = []
        for i, (point, r) in enumerate(zip(points, results)):
            stats = mount_stats(str(point))
            doc: dict[str, Any] = {
                "epoch_s": round(r["end"] - released, 3),
                "small_s": round(r["small_end"] - released, 3),
                "files": r["files"], "bytes": r["bytes"], "wrong": len(r["wrong"]),
                "errors": r["error_count"],
                "mount": {k: stats[k] for k in MOUNT_KEYS if k in stats},
            }
            if r["wrong"] or r["errors"]:
                doc["problems"] = (r["wrong"][:10] + r["errors"])[:20]
            if peers and servers[i].alive():
                try:
                    status = servers[i].status()
                    doc["peer_server"] = {k: v for k, v in status.items()
                                          if isinstance(v, int | float)}
                except PeerCallError as e:
                    doc["peer_server"] = {"error": str(e)[:200]}
            node_docs.append(doc)
        with ThreadPoolExecutor(nodes) as pool:
            list(pool.map(self.procs.unmount, points))
            list(pool.map(lambda server: server.stop() if server.alive() else None, servers))
        if not self.args.keep:
            shutil.rmtree(root, ignore_errors=True)
        run = {"nodes": nodes, "peers": peers, "epoch_s": round(epoch_s, 3),
               "origin_bytes": origin_bytes,
               "origin_ratio": round(origin_bytes / self.dataset_bytes, 4),
               "throttle_use": round(origin_bytes / (epoch_s * self.args.rate), 4),
               "wrong": sum(d["wrong"] for d in node_docs),
               "errors": sum(d["errors"] for d in node_docs),
               "per_node": node_docs}
        if killed_at is not None:
            run["killed_node"] = KILLED_NODE
            run["killed_at_s"] = round(killed_at, 3)
        self.runs[label] = run
        log(f"{label}: epoch {epoch_s:.1f}s, origin {fmt_bytes(origin_bytes)} "
            f"({run['origin_ratio']:.2f}x the dataset), link use {run['throttle_use']:.0%}"
            + (f", {run['wrong']} WRONG, {run['errors']} ERRORS"
               if run["wrong"] or run["errors"] else ""))
        return run


def compute_ratios(runs: dict[str, dict[str, Any]], dataset_bytes: int
                   ) -> tuple[dict[str, float], dict[str, Any]]:
    def r4(x: float) -> float:
        return round(x, 4)

    ratios: dict[str, float] = {}
    count = sum(1 for name in runs if name.startswith("n1_off_"))
    pairs = [runs[f"n1_off_{i}"]["epoch_s"] / runs[f"n1_on_{i}"]["epoch_s"]
             for i in range(count)]
    ratios["peer_overhead_n1"] = r4(statistics.median(pairs))
    for n in (2, 4):
        on, off = runs[f"n{n}_peers"], runs[f"n{n}_alone"]
        ratios[f"origin_ratio_n{n}"] = r4(on["origin_bytes"] / dataset_bytes)
        ratios[f"epoch_time_ratio_n{n}"] = r4(on["epoch_s"] / off["epoch_s"])
        ratios[f"origin_ratio_alone_n{n}"] = r4(off["origin_bytes"] / dataset_bytes)
        ratios[f"alone_throttle_use_n{n}"] = r4(off["throttle_use"])
    killed = runs["n4_owner_killed"]
    ratios["epoch_time_ratio_owner_killed_n4"] = r4(killed["epoch_s"] / runs["n4_alone"]["epoch_s"])
    ratios["origin_ratio_owner_killed_n4"] = r4(killed["origin_bytes"] / dataset_bytes)
    extra = {"peer_overhead_n1_pairs": [r4(p) for p in pairs]}
    return ratios, extra


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = QUICK_SPEC if args.quick else FULL_SPEC
    if args.rate is None:
        args.rate = QUICK_RATE if args.quick else FULL_RATE
    if shutil.which("fusermount3") is None or not os.path.exists("/dev/fuse"):
        raise SystemExit("benchmarks.p2p: needs FUSE (/dev/fuse and fusermount3, Debian fuse3)")
    raw: dict[str, Any] = {"dataset": describe_spec(spec), "cpus": os.cpu_count(),
                           "rate": args.rate, "readers": args.readers,
                           "memory_cache": args.memory_cache,
                           "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    with work_dir(args.dir, args.keep, prefix="cachefs-p2p-") as work, \
            private_environment(work):
        procs = Processes(work)
        server = MotoServer()
        proxy: FaultProxy | None = None
        try:
            log(f"generating the dataset: {describe_spec(spec)}")
            src = work / "src"
            (small, large, total), raw["generate_s"] = timed(lambda: generate(src, spec))
            raw.update(files=len(small) + len(large), bytes=total)
            server.start()
            log(f"moto S3 server at {server.endpoint}")
            server.create_bucket(BUCKET)
            direct = f"s3://{BUCKET}/repo?endpoint_url={server.endpoint}&region={REGION}"
            raw["commit_s"], raw["chunks"], dataset_bytes = commit_and_measure(direct, src)
            raw["dataset_bytes"] = dataset_bytes
            proxy = FaultProxy(server.endpoint, rate=args.rate).start()
            log(f"throttling proxy at {proxy.endpoint}: {fmt_rate(args.rate)}; dataset "
                f"{raw['chunks']:,} chunks, {fmt_bytes(dataset_bytes)}")
            procs.cli("remote", "add", REMOTE,
                      f"s3://{BUCKET}/repo?endpoint_url={proxy.endpoint}&region={REGION}")
            bench = Bench(args, procs, proxy, work, src, small, large, dataset_bytes)
            order = QUICK_N1_ORDER if args.quick else N1_ORDER
            for i, peers in enumerate(order):  # ABBA
                bench.epoch(f"n1_{'on' if peers else 'off'}_{i // 2}", 1, peers)
            bench.epoch("n2_peers", 2, True)
            bench.epoch("n2_alone", 2, False)
            bench.epoch("n4_alone", 4, False)
            peers_n4 = bench.epoch("n4_peers", 4, True)
            bench.epoch("n4_owner_killed", 4, True,
                        kill_after_s=KILL_FRACTION * peers_n4["epoch_s"])
        finally:
            procs.close()
            if proxy is not None:
                proxy.stop()
            server.stop()
    runs = bench.runs
    ratios, extra = compute_ratios(runs, dataset_bytes)
    raw.update(extra)
    raw["n1_alone_origin_bytes"] = [run["origin_bytes"] for name, run in runs.items()
                                    if name.startswith("n1_off_")]
    raw["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    raw["runs"] = runs
    wrong = sum(r["wrong"] + r["errors"] for r in runs.values())
    return {"ratios": ratios, "raw": raw, "targets": dict(TARGETS), "quick": bool(args.quick),
            "valid_n4": ratios["alone_throttle_use_n4"] >= VALID_THROTTLE_USE,
            "all_bytes_right": wrong == 0}


# -- report -------------------------------------------------------------------------------------
def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]
    runs = raw["runs"]

    def verdict(key: str) -> str:
        if key not in TARGETS:
            return ""
        return f"{TARGETS[key]} {'ok' if meets(r[key], TARGETS[key]) else 'MISSED'}"

    rows = [[key, f"{r[key]:.3f}", verdict(key)] for key in (
        "origin_ratio_n4", "epoch_time_ratio_n4", "alone_throttle_use_n4", "peer_overhead_n1",
        "origin_ratio_n2", "epoch_time_ratio_n2", "alone_throttle_use_n2",
        "epoch_time_ratio_owner_killed_n4", "origin_ratio_owner_killed_n4",
        "origin_ratio_alone_n4")]
    print_table(f"cachefs peer tier benchmark{' (quick)' if report['quick'] else ''}: "
                f"{raw['files']:,} files, {fmt_bytes(raw['dataset_bytes'])} of chunks, origin "
                f"link {fmt_rate(raw['rate'])}", ["ratio", "value", "target"], rows)
    print()
    run_rows = []
    for label, x in runs.items():
        mounts = [d["mount"] for d in x["per_node"]]
        run_rows.append([label, str(x["nodes"]), "on" if x["peers"] else "off",
                         f"{x['epoch_s']:.1f} s", fmt_bytes(x["origin_bytes"]),
                         f"{x['origin_ratio']:.2f}", f"{x['throttle_use']:.0%}",
                         str(sum(m.get("peer_hits", 0) for m in mounts)),
                         str(sum(m.get("hedged_requests", 0) for m in mounts)),
                         str(x["wrong"] + x["errors"])])
    notes = [
        f"valid_n4 (alone N=4 used >= {VALID_THROTTLE_USE:.0%} of the link): "
        f"{report['valid_n4']}; every byte right: {report['all_bytes_right']}.",
        f"peer_overhead_n1 pairs (throughput on / off): {raw['peer_overhead_n1_pairs']}.",
        f"Each node: {raw['readers']} threads, shuffled small files, then the shards; "
        f"--memory-cache {raw['memory_cache']}; {raw['cpus']} CPUs.",
        *(["--quick: a smoke run; its figures are not to compare with the targets."]
          if report["quick"] else []),
    ]
    print_table("runs", ["run", "N", "peers", "epoch", "origin", "x dataset", "link use",
                         "peer hits", "hedged", "bad"], run_rows, notes)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "p2p", "N nodes reading one dataset from a throttled origin, with and without the "
               "peer tier")
    parser.add_argument("--rate", type=float, default=None,
                        help=f"origin link, bytes/s (default {FULL_RATE:.0f}; quick "
                             f"{QUICK_RATE:.0f})")
    parser.add_argument("--readers", type=int, default=DEFAULT_READERS,
                        help=f"small-file reader threads per node (default {DEFAULT_READERS})")
    parser.add_argument("--memory-cache", default=DEFAULT_MEMORY_CACHE,
                        help=f"--memory-cache of every mount (default {DEFAULT_MEMORY_CACHE})")
    args = parser.parse_args(argv)
    # A plain `kill` must unwind through the cleanup (mounts, servers, moto) too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = run(args)
    emit(args, report, print_report)
    if not report["all_bytes_right"]:
        log("some reads returned wrong bytes or errors: see raw.runs[*].per_node[*].problems")
        sys.exit(1)


if __name__ == "__main__":
    main()
