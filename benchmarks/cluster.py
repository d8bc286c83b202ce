"""Haystack cluster benchmark: ref compare-and-swap rate, leader failover, commit and checkout
through haystack:// against file://.

One run, one machine, a local cluster (`master.cluster.cluster_up`: 3 raft masters, 3 storage
servers, R=2, every process on 127.0.0.1 with the generated token):

1. **Ref compare-and-swap**: 16 threads, each with its own `HaystackRemote` and its own branch,
   advance their branch by compare-and-swap (`GenerationRefStore.compare_and_swap`: a
   create-if-absent through the raft log plus the check for a newer generation) as fast as they
   can for 10 s (`--quick`: 1 s): `cas_ops_s` = successful updates per second (target >= 1,000).
2. **Failover**: kill -9 the leader while a client keeps writing; the time from the kill to
   the first write acknowledged by the new leader, 5 times (the killed master restarts
   between trials): `failover_s_median` (target <= 5 s).
3. **Commit and checkout** of the commit benchmark's dataset (`benchmarks.commit`'s sample;
   full: 20,000 x ~110 KB + 4 x 256 MiB, `--quick`: 500 + 2 x 16 MiB) through the Python
   API into a `file://` repository and into the cluster, then checked out of each into a fresh
   directory (with `sync`): `commit_vs_file`, `checkout_vs_file` = haystack throughput / file://
   throughput (targets >= 0.5), over two runs each in the order file, haystack, haystack, file
   (ABBA: this VM's disk slows down as gigabytes are written, by up to 2x between the first and
   the second of two back-to-back commits, so a fixed order favours whichever goes first; the
   second haystack run goes to a second cluster, as the first would deduplicate every chunk).

Reproduce (from the repository root):

    .venv/bin/python -m benchmarks.cluster --quick      # smoke run
    .venv/bin/python -m benchmarks.cluster --json > out.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import (
    benchmark_parser,
    dataset_spec,
    describe_spec,
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
from cachefs.dataset.checkout import checkout
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.refs import GenerationRefStore
from cachefs.dataset.repo import Repository
from cachefs.errors import CachefsError
from cachefs.remotes.haystack import HaystackRemote
from cachefs.remotes.local import LocalRemote
from cachefs.sample import make_sample
from master.client import MasterClient
from master.cluster import cluster_down, cluster_up, start_member

CAS_THREADS = 16
FAILOVER_TRIALS = 5
TARGETS = {
    "cas_ops_s": ">= 1000",
    "failover_s_median": "<= 5",
    "commit_vs_file": ">= 0.5",
    "checkout_vs_file": ">= 0.5",
}
DATASET = "bench"
# --quick: the commit benchmark's quick dataset with a quarter of its small files.
QUICK_SPEC = replace(dataset_spec(True), small_files=500, classes=5)
AUTHOR = "bench <bench@localhost>"


def cas_rate(url: str, token: str, seconds: float) -> dict[str, Any]:
    """Successful compare-and-swaps per second from CAS_THREADS clients on distinct refs."""
    stop = threading.Event()
    done = [0] * CAS_THREADS
    errors: list[str] = []
    commits = [f"{i:064x}" for i in range(1, 10_000)]

    def client(n: int) -> None:
        with HaystackRemote(url, token, namespace="cas") as remote:
            refs = GenerationRefStore(remote)
            branch = f"b{n}"
            current = refs.read(DATASET, "heads", branch)
            i = 0
            while not stop.is_set():
                try:
                    current = refs.compare_and_swap(DATASET, "heads", branch, current,
                                                    commits[i % len(commits)], "bench")
                except CachefsError as e:
                    errors.append(str(e))
                    return
                i += 1
                done[n] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CAS_THREADS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)  # the measurement window itself
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"compare-and-swap failed: {errors[0]}")
    return {"cas_ops": sum(done), "cas_seconds": elapsed, "cas_ops_s": sum(done) / elapsed}


def failover_times(root: Path, state: dict[str, Any], token: str, trials: int) -> list[float]:
    """Kill -9 the leader `trials` times; seconds from each kill to the next acknowledged
    write. The killed master is started again (same data) before the next trial."""
    times: list[float] = []
    members = {m["addr"]: m for m in state["masters"]}
    with MasterClient(state["url"], token, timeout=60.0) as client, \
            HaystackRemote(state["url"], token, namespace="failover") as remote:
        for trial in range(trials):
            victim = members[client.status()["leader"]]
            remote.put(f"before-{trial}", b"x")
            os.kill(victim["pid"], signal.SIGKILL)
            killed = time.perf_counter()
            remote.put(f"after-{trial}", b"y")  # retried across masters until a leader acks
            times.append(time.perf_counter() - killed)
            log(f"failover {trial + 1}: {times[-1]:.2f}s")
            if trial + 1 == trials:
                break  # no next kill to restart it for: cluster_down follows
            start_member(root, state, "masters", victim)
            with MasterClient([victim["addr"]], token, timeout=60.0) as restarted:
                restarted.status()  # serving again before the next kill
    return times


def commit_checkout(repo: Repository, src: Path, dest: Path) -> tuple[float, float, int]:
    repo.create_dataset(DATASET)
    sync()
    result, commit_s = timed(
        lambda: commit_directory(repo, DATASET, "main", src, "v1", author=AUTHOR))
    sync()

    def checkout_and_sync() -> None:
        checkout(repo, result.commit, "", dest)
        sync()

    _, checkout_s = timed(checkout_and_sync)
    return commit_s, checkout_s, result.bytes


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = QUICK_SPEC if args.quick else dataset_spec(False)
    raw: dict[str, Any] = {"dataset": describe_spec(spec), "cpus": os.cpu_count(),
                           "masters": 3, "storage": 3, "replicas": 2}
    with work_dir(args.dir, args.keep, prefix="cachefs-cluster-") as work, \
            private_environment(work):
        root = work / "cluster"
        log("starting the cluster: 3 masters, 3 storage servers, R=2")
        state, raw["cluster_up_s"] = timed(lambda: cluster_up(root, 3, 3, 2, volumes=16))
        token = Path(state["token_file"]).read_text().strip()
        try:
            log(f"ref compare-and-swap, {CAS_THREADS} clients")
            raw.update(cas_rate(state["url"], token, 1.0 if args.quick else 10.0))
            log(f"cas: {raw['cas_ops_s']:.0f}/s")

            src = work / "src"
            log(f"generating the dataset: {describe_spec(spec)}")
            make_sample(src, spec)
            sync()
            raw.update(bytes=0, runs=[])

            def measured(where: str, remote_of: Callable[[], Any], n: int) -> tuple[float, float]:
                log(f"commit + checkout through {where} ({n})")
                dest = work / f"out-{where.removesuffix('://')}-{n}"
                repo = Repository(remote_of())
                try:
                    commit_s, checkout_s, raw["bytes"] = commit_checkout(repo, src, dest)
                finally:
                    repo.close()
                shutil.rmtree(dest)
                raw["runs"].append({"remote": where, "commit_s": commit_s,
                                    "checkout_s": checkout_s})
                return commit_s, checkout_s

            # ABBA: the disk of a VM slows down as gigabytes go by, so whichever goes second is
            # handicapped; file, haystack, haystack, file cancels that drift. The second
            # haystack run needs a second cluster: chunks are content-addressed, so the first
            # cluster would deduplicate every one of them.
            f1 = measured("file://", lambda: LocalRemote(work / "repo-1"), 1)
            h1 = measured("haystack://", lambda: HaystackRemote(
                state["url"], token, namespace="bench"), 1)
            shutil.rmtree(work / "repo-1")
            try:
                second = cluster_up(work / "cluster-2", 3, 3, 2, volumes=16)
                h2 = measured("haystack://", lambda: HaystackRemote(
                    second["url"], Path(second["token_file"]).read_text().strip(),
                    namespace="bench"), 2)
            finally:
                cluster_down(work / "cluster-2")
            f2 = measured("file://", lambda: LocalRemote(work / "repo-2"), 2)
            nbytes = raw["bytes"]
            f_commit, f_checkout = f1[0] + f2[0], f1[1] + f2[1]
            h_commit, h_checkout = h1[0] + h2[0], h1[1] + h2[1]
            raw.update(file_commit_s=f_commit, file_checkout_s=f_checkout,
                       haystack_commit_s=h_commit, haystack_checkout_s=h_checkout,
                       file_commit_mb_s=rate(2 * nbytes, f_commit) / 1e6,
                       haystack_commit_mb_s=rate(2 * nbytes, h_commit) / 1e6,
                       file_checkout_mb_s=rate(2 * nbytes, f_checkout) / 1e6,
                       haystack_checkout_mb_s=rate(2 * nbytes, h_checkout) / 1e6)

            trials = 3 if args.quick else FAILOVER_TRIALS
            log(f"leader failover, {trials} kills")
            times = failover_times(root, state, token, trials)
            raw["failover_s"] = times
        finally:
            cluster_down(root)
    return {"cas_ops_s": raw["cas_ops_s"], "failover_s_median": statistics.median(times),
            "ratios": {"commit_vs_file": f_commit / h_commit,
                       "checkout_vs_file": f_checkout / h_checkout},
            "raw": raw, "targets": dict(TARGETS), "quick": bool(args.quick)}


def print_report(report: dict[str, Any]) -> None:
    raw = report["raw"]
    print_table("Through the cluster (3 masters, 3 storage servers, R=2) vs file://",
                ["what", "file://", "haystack://"], [
                    ["commit", fmt_rate(raw["file_commit_mb_s"] * 1e6),
                     fmt_rate(raw["haystack_commit_mb_s"] * 1e6)],
                    ["checkout", fmt_rate(raw["file_checkout_mb_s"] * 1e6),
                     fmt_rate(raw["haystack_checkout_mb_s"] * 1e6)]],
                [f"dataset: {raw['dataset']}"])
    print()
    figures = {"cas_ops_s": report["cas_ops_s"],
               "failover_s_median": report["failover_s_median"], **report["ratios"]}
    print_table("Figures", ["figure", "value", "target", "met"],
                [[name, f"{value:.2f}", TARGETS[name],
                  "yes" if meets(value, TARGETS[name]) else "NO"]
                 for name, value in figures.items()],
                [f"failover times: {', '.join(f'{t:.2f}s' for t in raw['failover_s'])}"])


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser("cluster", __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
