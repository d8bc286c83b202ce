"""Commit, re-commit, diff and checkout throughput of a local repository, against `cp -r` + `sync`.

What it measures, in one run, on one disk (the work dir's):

1. A synthetic ImageNet-like dataset is written with `cachefs.sample.make_sample` (full: 20,000
   files of ~110 KB in 100 class directories plus four 256 MiB shards, ~3.3 GB; `--quick`: 2,000
   files plus two 16 MiB shards), synced, and read once so that it sits in the page cache.
2. Baseline: `cp -r SRC DST` followed by `sync`, timed together (bytes / seconds).
3. First commit of the dataset into a fresh `file://` repository (`LocalRemote` in the work dir,
   with `XDG_STATE_HOME` pointed into the work dir so the commit scan index starts empty), through
   the Python API (`Repository`, `create_dataset`, `commit_directory`). A commit is durable when it
   returns (the local remote syncs the file system before the branch moves), so no extra sync is
   timed. Ratio `commit_vs_cp` = commit throughput / cp+sync throughput (higher is better).
4. 1% of the small files get new random content of the same size (in place), more than a second
   after the first commit's scan started (so the "racily clean" rule does not force re-reads),
   and the directory is committed again: `recommit_vs_commit` = re-commit time / first commit
   time (lower is better), and `new_bytes_vs_changed` = chunk bytes uploaded by the re-commit /
   bytes of the changed files (1.0 is ideal).
5. `diff_commits` of the two versions, on a fresh `Repository` (no cached trees): seconds, and
   the number of changes, which must equal the number of changed files (asserted).
6. Checkout of the second version into a fresh directory on a fresh `Repository`, followed by
   `os.sync()` (checkout itself does not fsync), timed together: `checkout_vs_cp` = checkout
   throughput / cp+sync throughput (higher is better).

Page cache: nothing is dropped (that needs root and is not portable). Instead every phase runs
with a warm cache: the source is read once before the baseline and the commits, and the
repository's chunks are still cached from the commit when checkout reads them; `sync` runs before
every timed phase, so dirty data of an earlier phase is never charged to the next one. The
figures are therefore CPU + write-back bound, for cp exactly as for cachefs.

Reproduce (from the repository root, with the project's virtualenv):

    .venv/bin/python -m benchmarks.commit --quick          # smoke run, well under a minute
    .venv/bin/python -m benchmarks.commit --json > out.json # full run, writes ~13 GB, minutes

Options: `--dir PATH` puts the work dir under PATH (default /var/tmp; use the disk you want to
measure), `--keep` keeps it afterwards. The dataset bytes are fixed by their seed, so runs differ
only by the machine's speed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    benchmark_parser,
    dataset_spec,
    describe_spec,
    emit,
    fmt_bytes,
    fmt_rate,
    log,
    meets,
    print_table,
    rate,
    sync,
    timed,
    wait_until_ns,
    warm_read,
    work_dir,
)
from cachefs.dataset.checkout import CheckoutResult, checkout
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.diff import diff_commits
from cachefs.dataset.repo import Repository
from cachefs.remotes.local import LocalRemote
from cachefs.sample import SampleSpec, make_sample

DATASET = "bench"
BRANCH = "main"
AUTHOR = "benchmark@localhost"
CHANGED_FRACTION = 0.01
RACY_MARGIN_NS = 1_100_000_000  # > the scan index's 1 s racily-clean window

TARGETS = {
    "commit_vs_cp": ">= 0.7",
    "recommit_vs_commit": "<= 0.1",
    "new_bytes_vs_changed": "<= 1.1",
    "checkout_vs_cp": ">= 0.7",
}


def open_repo(path: Path) -> Repository:
    return Repository(LocalRemote(path))


def small_files(src: Path) -> list[Path]:
    """The sample's small files (train/CLASS/img_*.jpg), in path order."""
    return sorted(p for p in (src / "train").rglob("*") if p.is_file())


def modify_files(src: Path, fraction: float, seed: int) -> tuple[list[str], int]:
    """Give `fraction` of the small files new random content of the same size, in place.

    Returns (their paths relative to `src`, '/'-separated and sorted; their total bytes).
    """
    candidates = small_files(src)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, max(1, round(len(candidates) * fraction))))
    total = 0
    for path in chosen:
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.write(rng.randbytes(size))
        total += size
    return [p.relative_to(src).as_posix() for p in chosen], total


def cp_and_sync(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True, stdout=sys.stderr)
    sync()


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec: SampleSpec = dataset_spec(args.quick)
    raw: dict[str, Any] = {"dataset": describe_spec(spec), "page_cache": "warm (nothing dropped)",
                           "cpus": os.cpu_count()}
    with work_dir(args.dir, args.keep) as work:
        # The commit scan index lives under XDG_STATE_HOME: isolate it so the first commit
        # reads everything and the re-commit uses only the index the first one wrote.
        os.environ["XDG_STATE_HOME"] = str(work / "state")
        src = work / "src"

        log(f"generating the dataset: {describe_spec(spec)}")
        (files, total), raw["generate_s"] = timed(lambda: make_sample(src, spec))
        sync()
        log(f"wrote {files:,} files, {fmt_bytes(total)} in {raw['generate_s']:.1f}s; warming")
        stats, raw["warm_read_s"] = timed(lambda: warm_read(src))
        assert (stats.files, stats.bytes) == (files, total), (stats, files, total)
        raw.update(files=files, bytes=total)

        # -- baseline: cp -r + sync --------------------------------------------------------------
        sync()
        log("baseline: cp -r + sync")
        _, cp_s = timed(lambda: cp_and_sync(src, work / "cp"))
        raw.update(cp_sync_s=cp_s, cp_throughput=rate(total, cp_s))
        log(f"cp -r + sync: {cp_s:.2f}s, {fmt_rate(raw['cp_throughput'])}")
        subprocess.run(["rm", "-rf", str(work / "cp")], check=True)
        stats = warm_read(src)  # re-warm (cheap when still cached)

        # -- first commit --------------------------------------------------------------------------
        repo_path = work / "repo"
        repo = open_repo(repo_path)
        repo.create_dataset(DATASET)
        # Files changed within 1 s of a scan are re-read by the next commit (racily clean):
        # make sure the freshly generated files are older than that (a bounded wait).
        wait_until_ns(stats.newest_change_ns + RACY_MARGIN_NS)
        sync()
        log("first commit")
        scan_start_ns = time.time_ns()
        cpu0 = time.process_time()
        first, commit_s = timed(
            lambda: commit_directory(repo, DATASET, BRANCH, src, "v1", author=AUTHOR))
        raw.update(commit_s=commit_s, commit_cpu_s=time.process_time() - cpu0,
                   commit_throughput=rate(total, commit_s), commit_read_bytes=first.read_bytes,
                   commit_new_bytes=first.new_bytes, commit_new_meta_bytes=first.new_meta_bytes)
        log(f"first commit: {commit_s:.2f}s, {fmt_rate(raw['commit_throughput'])}, "
            f"cpu {raw['commit_cpu_s']:.2f}s")
        assert first.files == files and first.bytes == total, first

        # -- 1% change and re-commit ---------------------------------------------------------------
        raw["racy_wait_s"] = wait_until_ns(scan_start_ns + RACY_MARGIN_NS)
        changed, changed_bytes = modify_files(src, CHANGED_FRACTION, spec.seed + 1)
        raw.update(changed_files=len(changed), changed_bytes=changed_bytes)
        sync()
        log(f"re-commit after changing {len(changed)} files ({fmt_bytes(changed_bytes)})")
        cpu0 = time.process_time()
        second, recommit_s = timed(
            lambda: commit_directory(repo, DATASET, BRANCH, src, "v2", author=AUTHOR))
        raw.update(recommit_s=recommit_s, recommit_cpu_s=time.process_time() - cpu0,
                   recommit_read_bytes=second.read_bytes,
                   recommit_reused_files=second.reused_files,
                   recommit_new_bytes=second.new_bytes,
                   recommit_new_meta_bytes=second.new_meta_bytes)
        log(f"re-commit: {recommit_s:.3f}s, read {fmt_bytes(second.read_bytes)}, "
            f"new {fmt_bytes(second.new_bytes)} + {fmt_bytes(second.new_meta_bytes)} metadata")
        assert second.parent == first.commit and not second.unchanged, second
        if second.read_bytes != changed_bytes:
            log(f"warning: the re-commit read {second.read_bytes} bytes, "
                f"the changed files hold {changed_bytes}")
        repo.close()

        # -- diff ----------------------------------------------------------------------------------
        repo = open_repo(repo_path)  # no trees cached in-process, like a fresh `cachefs diff`
        log("diff")
        changes, diff_s = timed(lambda: list(diff_commits(repo, first.commit, second.commit)))
        raw.update(diff_s=diff_s, diff_changes=len(changes))
        log(f"diff: {diff_s:.3f}s, {len(changes)} changes")
        assert len(changes) == len(changed), (len(changes), len(changed))
        assert sorted(c.path for c in changes) == changed
        assert all(c.change == "modified" for c in changes)
        repo.close()

        # -- checkout ------------------------------------------------------------------------------
        repo = open_repo(repo_path)
        dest = work / "checkout"
        sync()
        log("checkout + sync")

        def checkout_and_sync() -> CheckoutResult:
            result = checkout(repo, second.commit, "", dest)
            sync()
            return result

        cpu0 = time.process_time()
        out, checkout_s = timed(checkout_and_sync)
        raw.update(checkout_s=checkout_s, checkout_cpu_s=time.process_time() - cpu0,
                   checkout_files=out.files, checkout_bytes=out.bytes,
                   checkout_throughput=rate(out.bytes, checkout_s))
        log(f"checkout + sync: {checkout_s:.2f}s, {fmt_rate(raw['checkout_throughput'])}")
        assert (out.files, out.bytes) == (files, total), out
        repo.close()

    ratios = {
        "commit_vs_cp": raw["commit_throughput"] / raw["cp_throughput"],
        "recommit_vs_commit": recommit_s / commit_s,
        "new_bytes_vs_changed": second.new_bytes / changed_bytes,
        "checkout_vs_cp": raw["checkout_throughput"] / raw["cp_throughput"],
    }
    return {"ratios": ratios, "raw": raw, "targets": dict(TARGETS), "quick": bool(args.quick)}


def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]

    def verdict(key: str) -> str:
        return f"{TARGETS[key]:<7} {'ok' if meets(r[key], TARGETS[key]) else 'MISSED'}"

    rows = [
        ["cp -r + sync (baseline)", f"{raw['cp_sync_s']:.2f}", fmt_rate(raw["cp_throughput"]),
         "", "1.00", ""],
        ["first commit", f"{raw['commit_s']:.2f}", fmt_rate(raw["commit_throughput"]),
         "commit_vs_cp", f"{r['commit_vs_cp']:.2f}", verdict("commit_vs_cp")],
        [f"re-commit ({raw['changed_files']} files changed)", f"{raw['recommit_s']:.3f}", "",
         "recommit_vs_commit", f"{r['recommit_vs_commit']:.3f}", verdict("recommit_vs_commit")],
        [f"  new bytes {fmt_bytes(raw['recommit_new_bytes'])} / changed "
         f"{fmt_bytes(raw['changed_bytes'])}", "", "", "new_bytes_vs_changed",
         f"{r['new_bytes_vs_changed']:.3f}", verdict("new_bytes_vs_changed")],
        [f"diff ({raw['diff_changes']} changes)", f"{raw['diff_s']:.3f}", "", "", "", ""],
        ["checkout + sync", f"{raw['checkout_s']:.2f}", fmt_rate(raw["checkout_throughput"]),
         "checkout_vs_cp", f"{r['checkout_vs_cp']:.2f}", verdict("checkout_vs_cp")],
    ]
    title = (f"cachefs commit benchmark{' (quick)' if report['quick'] else ''}: "
             f"{raw['files']:,} files, {fmt_bytes(raw['bytes'])} ({raw['dataset']})")
    notes = [
        "All phases run with a warm page cache (the source is read once before the baseline "
        "and the commits; nothing is dropped), and sync runs before each timed phase.",
        f"CPU seconds (all threads): commit {raw['commit_cpu_s']:.2f}, re-commit "
        f"{raw['recommit_cpu_s']:.2f}, checkout {raw['checkout_cpu_s']:.2f}; "
        f"{raw['cpus']} CPUs.",
    ]
    print_table(title, ["phase", "seconds", "throughput", "ratio", "value", "target"], rows,
                notes)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "commit", "cachefs commit / re-commit / diff / checkout against cp -r + sync")
    args = parser.parse_args(argv)
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
