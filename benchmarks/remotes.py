"""Push, import and gc against a real S3 server, each against a plain boto3 baseline.

What it measures, in one run, with a moto S3 server started for the run on 127.0.0.1
(`tests.servers.MotoServer`, a real `python -m moto.server` on a loopback port: every request is
real HTTP, so request counts matter as they do against a real store) and `file://` repositories
in the work dir (same disk):

1. Data. The commit benchmark's dataset (`cachefs.sample.make_sample` with
   `benchmarks.common.dataset_spec`: full, 20,000 files of ~110 KB in 100 class directories plus
   four 256 MiB shards, ~3.3 GB; `--quick`: a smaller one than the commit benchmark's quick
   dataset, 400 files in 4 class directories plus two 16 MiB shards, ~75 MB, since every S3 part
   costs about one moto request per small file) is written, synced, read once (page cache warm)
   and committed to a `file://` repository (not a figure).
   Every S3 part uses the whole dataset: moto answers ~250-300 small requests/s on the 2-vCPU VM
   the README's figures come from, so the full run stays within ~10 minutes.
2. `push_vs_upload`. Baseline: every source file uploaded with boto3 `put_object` (key = its
   relative path under the bucket prefix `raw/`) from a `ThreadPoolExecutor` with as many threads
   as the S3 remote's `parallelism` (16; the client's connection pool is as large as the
   remote's). cachefs: `transfer_dataset(file:// repository, S3 repository, dataset)` (what
   `cachefs push` runs) into the same bucket under `repo/`. Ratio = baseline seconds / push
   seconds (higher is better; above 1 when packing small files into 4 MiB chunks saves more
   requests than the push's existence probes and tree objects cost).
3. `repush_vs_push`: a second push with nothing new / the first push (lower is better: the walk
   stops at the branch tip the destination already has).
4. `incremental_push_vs_push`: 1% of the small files get new random content of the same size,
   the directory is committed again (not timed), and the push of that commit / the first push
   (lower is better; it copies the new pack chunks and the changed trees only).
5. `import_vs_download`. Baseline ("copy then commit"): list `raw/`, download every object with
   boto3 `get_object` from a thread pool of the same size into a local directory, then
   `commit_directory` it into a fresh `file://` repository; timed together. cachefs:
   `import_prefix` of `raw/` (opened as an `s3://` remote) into another fresh `file://`
   repository (what `cachefs commit DATASET s3://...` runs). Ratio = baseline / import (higher
   is better). A commit to `file://` is durable when it returns, for both.
   moto artifact: the importer fetches objects of at least the chunk size (the shards) in
   chunk-sized ranges, and moto reads the *whole* object for every ranged GET (256 MiB for each
   4 MiB range of a full-run shard; real S3 serves a range at the cost of the range), while the
   baseline fetches each shard whole. The same run therefore times GETs of the large objects
   whole and in chunk-sized ranges (same client and threads) and reports, in raw,
   `import_range_overhead_s` (ranged - whole) and `import_vs_download_without_range_overhead`
   (the ratio with that overhead taken off the import: an estimate of what a store without the
   artifact gives). The ratio itself is left as measured.
6. `reimport_vs_import`: the same import again with nothing changed / the first import (lower
   is better: the scan index's sizes and ETags let it reuse every object unread; what is left
   is mostly listing the prefix, which moto serves slowly: `download_list_s` in raw is the
   baseline's own listing of the same prefix).
7. `gc_vs_list` and `gc_objects_s`. A second, unrelated dataset (a tenth of the small files and
   one shard, another seed) is committed straight into the S3 repository, then removed with
   `delete_dataset`; `collect_garbage(repo, grace_s=0)` then walks everything live and deletes
   that dataset's objects. Baseline: listing the objects gc lists (`list_info` of `commits/`,
   `trees/` and `chunks/`) just before. `gc_vs_list` = gc seconds / listing seconds (lower is
   better; gc lists, walks every live tree and deletes, so a few times the listing is
   expected); `gc_objects_s` (in raw) = objects gc examined (its listing) per second.

Every timed phase starts after `sync` (no earlier write-back charged to it) and with fresh
`Repository` objects (no cached trees), like a new CLI process; opening them (one GET of
`format`, creating the boto3 client) is not timed. Seconds, requests, objects and bytes of every
measurement are in `raw`.

Isolation and cleanup: XDG_* and TMPDIR (where moto spools large objects) point into the work
dir (so the commit and import scan indexes start empty); AWS_* are the test credentials of
`tests.servers`. Remotes are closed and moto is stopped in a `finally`; the work dir is removed
unless `--keep`.

Reproduce (from the repository root, with the project's virtualenv):

    .venv/bin/python -m benchmarks.remotes --quick           # smoke run, ~15 s
    .venv/bin/python -m benchmarks.remotes --json > out.json # full run, ~8 minutes, ~17 GB

Options: `--dir PATH` puts the work dir under PATH (default /var/tmp), `--keep` keeps it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.commit import RACY_MARGIN_NS, modify_files
from benchmarks.common import (
    benchmark_parser,
    dataset_spec,
    describe_spec,
    emit,
    fmt_bytes,
    fmt_rate,
    log,
    print_table,
    private_environment,
    rate,
    sync,
    timed,
    wait_until_ns,
    warm_read,
    work_dir,
)
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.gc import OBJECT_PREFIXES, collect_garbage
from cachefs.dataset.importer import import_prefix
from cachefs.dataset.repo import Repository
from cachefs.dataset.transfer import TransferResult, transfer_dataset
from cachefs.remotes.base import Remote
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.registry import open_remote_url
from cachefs.sample import make_sample
from tests.servers import AWS_TEST_ENV, MotoServer

DATASET = "bench"
GC_DATASET = "scratch"  # the second dataset, deleted before gc
BRANCH = "main"
AUTHOR = "benchmark@localhost"
CHANGED_FRACTION = 0.01
BUCKET = "cachefs-remotes-bench"
REPO_PREFIX = "repo"  # the S3 repository
RAW_PREFIX = "raw"  # the source files as plain objects (baseline upload, import source)
REGION = AWS_TEST_ENV["AWS_DEFAULT_REGION"]

# --quick: the commit benchmark's quick dataset with a fifth of its small files (every S3 part
# costs about one moto request per small file, ~250-300/s).
QUICK_SPEC = replace(dataset_spec(True), small_files=400, classes=4)

# direction of each ratio, for the table
BETTER = {
    "push_vs_upload": "higher",
    "repush_vs_push": "lower",
    "incremental_push_vs_push": "lower",
    "import_vs_download": "higher",
    "reimport_vs_import": "lower",
    "gc_vs_list": "lower",
}




def s3_url(server: MotoServer, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_url={server.endpoint}&region={REGION}"


def boto_client(server: MotoServer, connections: int) -> Any:
    """A plain boto3 client for the baselines, with a pool as large as the S3 remote's."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=AWS_TEST_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    ).client("s3", endpoint_url=server.endpoint, verify=False,
             config=Config(max_pool_connections=connections))


def source_files(src: Path) -> list[str]:
    """Every regular file under `src`, relative and '/'-separated, sorted."""
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())


def upload(client: Any, src: Path, files: list[str], threads: int) -> int:
    """put_object every file under RAW_PREFIX/ from `threads` threads; return the bytes sent."""

    def put(rel: str) -> int:
        body = (src / rel).read_bytes()
        client.put_object(Bucket=BUCKET, Key=f"{RAW_PREFIX}/{rel}", Body=body)
        return len(body)

    with ThreadPoolExecutor(threads, thread_name_prefix="bench-upload") as pool:
        return sum(pool.map(put, files))


def download(client: Any, dest: Path, threads: int) -> tuple[int, int, float]:
    """List RAW_PREFIX/ and get_object every object into `dest` from `threads` threads;
    return (objects, bytes, seconds of the listing)."""
    keys: list[str] = []
    start = time.perf_counter()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                 Prefix=f"{RAW_PREFIX}/"):
        keys += [item["Key"] for item in page.get("Contents", [])]
    list_s = time.perf_counter() - start

    def get(key: str) -> int:
        path = dest / key.removeprefix(f"{RAW_PREFIX}/")
        path.parent.mkdir(parents=True, exist_ok=True)
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
        with open(path, "wb") as f:
            shutil.copyfileobj(body, f, 1 << 20)
            return f.tell()

    with ThreadPoolExecutor(threads, thread_name_prefix="bench-download") as pool:
        return len(keys), sum(pool.map(get, keys)), list_s


def get_large(client: Any, keys: dict[str, int], piece: int | None, threads: int) -> int:
    """get_object each of `keys` (key -> size) whole (`piece` None) or in `piece`-sized ranges,
    as the importer fetches large objects, from `threads` threads; return the bytes read."""
    plan = [(key, None) if piece is None else
            (key, f"bytes={start}-{min(start + piece, size) - 1}")
            for key, size in keys.items()
            for start in ([0] if piece is None else range(0, size, piece))]

    def get(item: tuple[str, str | None]) -> int:
        key, byte_range = item
        extra = {"Range": byte_range} if byte_range else {}
        return len(client.get_object(Bucket=BUCKET, Key=key, **extra)["Body"].read())

    with ThreadPoolExecutor(threads, thread_name_prefix="bench-get") as pool:
        return sum(pool.map(get, plan))


def record_push(raw: dict[str, Any], name: str, result: TransferResult, seconds: float) -> None:
    raw.update({f"{name}_s": seconds, f"{name}_objects": result.objects,
                f"{name}_chunks": result.chunks, f"{name}_trees": result.trees,
                f"{name}_commits": result.commits, f"{name}_bytes": result.bytes})
    log(f"{name}: {seconds:.3f}s, {result.objects:,} objects ({result.chunks:,} chunks), "
        f"{fmt_bytes(result.bytes)}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = QUICK_SPEC if args.quick else dataset_spec(False)
    # The second dataset (deleted before gc): a tenth of the small files, one shard, new bytes.
    gc_spec = replace(spec, small_files=spec.small_files // 10,
                      classes=max(1, spec.classes // 10), large_files=1, seed=spec.seed + 100)
    raw: dict[str, Any] = {"dataset": describe_spec(spec), "gc_dataset": describe_spec(gc_spec),
                           "page_cache": "warm (nothing dropped)", "cpus": os.cpu_count(),
                           "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    with work_dir(args.dir, args.keep, prefix="cachefs-remotes-") as work, \
            private_environment(work), contextlib.ExitStack() as stack:
        server = MotoServer()
        stack.callback(server.stop)  # runs last: after every remote below is closed

        def open_s3(prefix: str) -> Repository:
            repo = Repository(open_remote_url(s3_url(server, prefix)))
            stack.callback(repo.close)
            return repo

        def open_source() -> Remote:
            """RAW_PREFIX/ as a plain remote (a Repository would write `format` there)."""
            remote = open_remote_url(s3_url(server, RAW_PREFIX))
            stack.callback(remote.close)
            return remote

        def open_local(path: Path) -> Repository:
            return Repository(LocalRemote(path))

        src = work / "src"
        log(f"generating the dataset: {describe_spec(spec)}")
        (files, total), raw["generate_s"] = timed(lambda: make_sample(src, spec))
        sync()
        stats = warm_read(src)
        assert (stats.files, stats.bytes) == (files, total), (stats, files, total)
        raw.update(files=files, bytes=total)

        # -- the source: a file:// repository --------------------------------------------------
        local_path = work / "repo"
        local = open_local(local_path)
        local.create_dataset(DATASET)
        wait_until_ns(stats.newest_change_ns + RACY_MARGIN_NS)  # so the re-commit reads 1%
        log("commit to the file:// repository")
        scan_start_ns = time.time_ns()
        first, raw["commit_s"] = timed(
            lambda: commit_directory(local, DATASET, BRANCH, src, "v1", author=AUTHOR))
        assert first.files == files and first.bytes == total, first
        log(f"committed in {raw['commit_s']:.1f}s")

        server.start()
        server.create_bucket(BUCKET)
        log(f"moto S3 server at {server.endpoint}, bucket {BUCKET}")
        s3 = open_s3(REPO_PREFIX)
        threads = int(getattr(s3.remote, "parallelism", 16))
        raw["threads"] = threads
        client = boto_client(server, 2 * threads)  # S3Remote: max_connections = 2 x parallelism
        stack.callback(client.close)

        # -- 1. baseline upload, then push ---------------------------------------------------
        rels = source_files(src)
        sync()
        log(f"baseline: put_object of {len(rels):,} files, {threads} threads")
        sent, upload_s = timed(lambda: upload(client, src, rels, threads))
        assert sent == total, (sent, total)
        raw.update(upload_s=upload_s, upload_requests=len(rels), upload_bytes=sent,
                   upload_throughput=rate(sent, upload_s))
        log(f"upload: {upload_s:.2f}s, {fmt_rate(raw['upload_throughput'])}")

        src_repo, dst_repo = open_local(local_path), open_s3(REPO_PREFIX)
        sync()
        log("push (file:// -> s3://)")
        pushed, push_s = timed(lambda: transfer_dataset(src_repo, dst_repo, DATASET))
        pushed.raise_if_refused()
        record_push(raw, "push", pushed, push_s)
        raw["push_throughput"] = rate(total, push_s)

        # -- 2. push again, nothing new --------------------------------------------------------
        src_repo, dst_repo = open_local(local_path), open_s3(REPO_PREFIX)
        sync()
        again, repush_s = timed(lambda: transfer_dataset(src_repo, dst_repo, DATASET))
        assert again.objects == 0 and [r.action for r in again.refs] == ["unchanged"], again
        record_push(raw, "repush", again, repush_s)

        # -- 3. change 1%, commit, push ----------------------------------------------------------
        raw["racy_wait_s"] = wait_until_ns(scan_start_ns + RACY_MARGIN_NS)
        changed, changed_bytes = modify_files(src, CHANGED_FRACTION, spec.seed + 1)
        raw.update(changed_files=len(changed), changed_bytes=changed_bytes)
        second, raw["recommit_s"] = timed(
            lambda: commit_directory(open_local(local_path), DATASET, BRANCH, src, "v2",
                                     author=AUTHOR))
        assert second.parent == first.commit and not second.unchanged, second
        log(f"changed {len(changed)} files ({fmt_bytes(changed_bytes)}), re-committed")
        src_repo, dst_repo = open_local(local_path), open_s3(REPO_PREFIX)
        sync()
        incremental, incr_s = timed(lambda: transfer_dataset(src_repo, dst_repo, DATASET))
        incremental.raise_if_refused()
        assert [r.action for r in incremental.refs] == ["fast-forward"], incremental
        record_push(raw, "incremental_push", incremental, incr_s)

        # -- 4. baseline download + commit, then import ----------------------------------------
        downloaded = work / "download"
        dl_repo = open_local(work / "download-repo")
        dl_repo.create_dataset(DATASET)
        sync()
        log(f"baseline: get_object into a directory, {threads} threads, then commit")

        def download_and_commit() -> tuple[int, int, float, float]:
            (objects, nbytes, list_s), seconds = timed(
                lambda: download(client, downloaded, threads))
            result = commit_directory(dl_repo, DATASET, BRANCH, downloaded, "copy",
                                      author=AUTHOR)
            assert (result.files, result.bytes) == (files, total), result
            return objects, nbytes, list_s, seconds

        (objects, got, raw_list_s, get_s), download_commit_s = timed(download_and_commit)
        assert (objects, got) == (files, total), (objects, got)
        raw.update(download_commit_s=download_commit_s, download_s=get_s,
                   download_list_s=raw_list_s,
                   download_requests=objects, download_bytes=got,
                   download_commit_throughput=rate(total, download_commit_s))
        log(f"download {get_s:.2f}s + commit {download_commit_s - get_s:.2f}s = "
            f"{download_commit_s:.2f}s")
        shutil.rmtree(downloaded)  # not timed: only frees the disk
        shutil.rmtree(work / "download-repo")

        import_path = work / "import-repo"
        open_local(import_path).create_dataset(DATASET)
        source = open_source()
        dest = open_local(import_path)
        sync()
        log("import (s3:// prefix -> file://)")
        (imported, skipped), import_s = timed(
            lambda: import_prefix(dest, DATASET, BRANCH, source, "import", author=AUTHOR))
        assert not skipped and (imported.files, imported.bytes) == (files, total), imported
        raw.update(import_s=import_s, import_read_bytes=imported.read_bytes,
                   import_new_bytes=imported.new_bytes,
                   import_new_meta_bytes=imported.new_meta_bytes,
                   import_throughput=rate(total, import_s))
        log(f"import: {import_s:.2f}s, {fmt_rate(raw['import_throughput'])}")

        # -- 5. re-import, nothing changed -----------------------------------------------------
        source, dest = open_source(), open_local(import_path)
        sync()
        (reimported, _), reimport_s = timed(
            lambda: import_prefix(dest, DATASET, BRANCH, source, "again", author=AUTHOR))
        assert reimported.unchanged and reimported.read_bytes == 0, reimported
        raw.update(reimport_s=reimport_s, reimport_read_bytes=reimported.read_bytes,
                   reimport_reused_files=reimported.reused_files)
        log(f"re-import: {reimport_s:.3f}s, {reimported.reused_files:,} objects reused unread")

        # -- moto's cost of ranged GETs (real S3 has none): large objects, whole vs ranged ----
        chunk_size = local.dataset(DATASET).chunk_size
        sizes = {f"{RAW_PREFIX}/{rel}": (src / rel).stat().st_size for rel in rels}
        large = {key: size for key, size in sizes.items() if size >= chunk_size}
        whole_n, whole_s = timed(lambda: get_large(client, large, None, threads))
        ranged_n, ranged_s = timed(lambda: get_large(client, large, chunk_size, threads))
        assert whole_n == ranged_n == sum(large.values()), (whole_n, ranged_n)
        overhead = max(0.0, ranged_s - whole_s)
        raw.update(chunk_size=chunk_size, large_objects=len(large), large_bytes=whole_n,
                   large_whole_get_s=whole_s,
                   large_ranged_get_s=ranged_s, import_range_overhead_s=overhead,
                   import_vs_download_without_range_overhead=(
                       download_commit_s / max(import_s - overhead, 1e-9)))
        log(f"{len(large)} large objects: whole GETs {whole_s:.2f}s, {fmt_bytes(chunk_size)} "
            f"ranges {ranged_s:.2f}s (moto reads the whole object for every range)")

        # -- 6. gc after deleting a second dataset ---------------------------------------------
        gc_src = work / "gc-src"
        make_sample(gc_src, gc_spec)
        s3 = open_s3(REPO_PREFIX)
        s3.create_dataset(GC_DATASET)
        log(f"second dataset into the S3 repository: {describe_spec(gc_spec)}")
        scratch, raw["gc_dataset_commit_s"] = timed(
            lambda: commit_directory(s3, GC_DATASET, BRANCH, gc_src, "scratch", author=AUTHOR))
        raw.update(gc_dataset_files=scratch.files, gc_dataset_bytes=scratch.bytes)
        s3.delete_dataset(GC_DATASET)
        listing_remote = open_s3(REPO_PREFIX).remote
        listed, list_s = timed(lambda: sum(1 for prefix in OBJECT_PREFIXES
                                           for _ in listing_remote.list_info(prefix)))
        raw.update(list_s=list_s, list_objects=listed)
        log(f"list_info of {listed:,} objects: {list_s:.3f}s; gc")
        gc_repo = open_s3(REPO_PREFIX)
        gc, gc_s = timed(lambda: collect_garbage(gc_repo, grace_s=0))
        examined = (sum(t.objects for t in gc.live.values())
                    + sum(t.objects for t in gc.garbage.values()))
        assert gc.garbage_objects > 0 and not gc.missing, gc.to_json()
        assert GC_DATASET not in gc_repo.datasets()
        raw.update(gc_s=gc_s, gc_objects=examined, gc_deleted_objects=gc.garbage_objects,
                   gc_deleted_bytes=gc.garbage_bytes, gc_live_objects=examined - gc.garbage_objects,
                   gc_objects_s=rate(examined, gc_s))
        log(f"gc: {gc_s:.3f}s, {examined:,} objects examined, {gc.garbage_objects:,} deleted")
        # what gc kept is still the whole first dataset
        assert open_s3(REPO_PREFIX).resolve(DATASET, BRANCH).commit == second.commit
    raw["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    ratios = {
        "push_vs_upload": upload_s / push_s,
        "repush_vs_push": repush_s / push_s,
        "incremental_push_vs_push": incr_s / push_s,
        "import_vs_download": download_commit_s / import_s,
        "reimport_vs_import": reimport_s / import_s,
        "gc_vs_list": gc_s / list_s,
    }
    return {"quick": bool(args.quick), "dataset": raw["dataset"], "ratios": ratios, "raw": raw}


def print_report(report: dict[str, Any]) -> None:
    r, raw = report["ratios"], report["raw"]

    def ratio(key: str) -> list[str]:
        return [key, f"{r[key]:.3f}" if r[key] < 0.1 else f"{r[key]:.2f}", BETTER[key]]

    rows = [
        [f"baseline: put_object x {raw['upload_requests']:,}", f"{raw['upload_s']:.2f}",
         fmt_bytes(raw["upload_bytes"]), "", "", ""],
        [f"push ({raw['push_objects']:,} objects)", f"{raw['push_s']:.2f}",
         fmt_bytes(raw["push_bytes"]), *ratio("push_vs_upload")],
        ["push again, nothing new", f"{raw['repush_s']:.3f}", fmt_bytes(raw["repush_bytes"]),
         *ratio("repush_vs_push")],
        [f"push after changing {raw['changed_files']:,} files "
         f"({raw['incremental_push_objects']:,} objects)", f"{raw['incremental_push_s']:.3f}",
         fmt_bytes(raw["incremental_push_bytes"]), *ratio("incremental_push_vs_push")],
        [f"baseline: get_object x {raw['download_requests']:,} + commit",
         f"{raw['download_commit_s']:.2f}", fmt_bytes(raw["download_bytes"]), "", "", ""],
        ["import from the S3 prefix", f"{raw['import_s']:.2f}",
         fmt_bytes(raw["import_read_bytes"]), *ratio("import_vs_download")],
        ["re-import, nothing changed", f"{raw['reimport_s']:.3f}",
         fmt_bytes(raw["reimport_read_bytes"]), *ratio("reimport_vs_import")],
        [f"baseline: list_info of {raw['list_objects']:,} objects", f"{raw['list_s']:.3f}", "",
         "", "", ""],
        [f"gc ({raw['gc_deleted_objects']:,} of {raw['gc_objects']:,} objects deleted)",
         f"{raw['gc_s']:.3f}", fmt_bytes(raw["gc_deleted_bytes"]), *ratio("gc_vs_list")],
    ]
    title = (f"cachefs remotes benchmark{' (quick)' if report['quick'] else ''}: "
             f"{raw['files']:,} files, {fmt_bytes(raw['bytes'])} ({raw['dataset']}); "
             f"moto S3 on 127.0.0.1")
    notes = [
        f"Baselines use boto3 with {raw['threads']} threads, the S3 remote's parallelism; "
        "the whole dataset goes through S3 (no subset).",
        f"gc: {raw['gc_objects_s']:,.0f} objects examined per second "
        f"(second dataset: {raw['gc_dataset']}).",
        f"moto reads a whole object for each ranged GET: the import's "
        f"{fmt_bytes(raw['chunk_size'])} ranges of {raw['large_objects']} large objects cost "
        f"{raw['large_ranged_get_s']:.2f}s vs {raw['large_whole_get_s']:.2f}s whole; without "
        f"that overhead import_vs_download would be "
        f"{raw['import_vs_download_without_range_overhead']:.2f}.",
        f"Re-import lists {raw['files']:,} objects; the baseline's listing of them took "
        f"{raw['download_list_s']:.2f}s.",
        f"Throughput: upload {fmt_rate(raw['upload_throughput'])}, push "
        f"{fmt_rate(raw['push_throughput'])}, download + commit "
        f"{fmt_rate(raw['download_commit_throughput'])}, import "
        f"{fmt_rate(raw['import_throughput'])}; {raw['cpus']} CPUs.",
    ]
    print_table(title, ["phase", "seconds", "bytes", "ratio", "value", "better"], rows, notes)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(
        "remotes", "cachefs push / import / gc against a moto S3 server, vs plain boto3")
    args = parser.parse_args(argv)
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main()
