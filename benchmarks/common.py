"""Small helpers shared by the benchmarks: datasets, work dirs, timing, cache warming, reporting.

Every benchmark measures a baseline (an ordinary tool such as `cp`) in the same run, on the same
disk and under the same page-cache conditions as cachefs, and reports cachefs as ratios against
it, so figures from different machines can be compared. Progress goes to stderr; stdout carries
only the result (a table, or exactly one JSON object with `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cachefs.memory import tune_malloc
from cachefs.sample import SampleSpec
from tests.servers import AWS_TEST_ENV, AWS_UNSET_ENV

T = TypeVar("T")

_START = time.perf_counter()
tune_malloc()  # a benchmark process runs with the settings of the `cachefs` command

# The benchmark datasets. Full: ImageNet-like (20,000 JPEG-sized files of ~110 KB in 100 class
# directories) plus four 256 MiB shards (~3.3 GB in all). Quick: a small one that runs in seconds.
FULL_DATASET = SampleSpec(small_files=20_000, small_mean=110 * 1024, classes=100,
                          large_files=4, large_size=256 << 20, seed=1)
QUICK_DATASET = SampleSpec(small_files=2_000, small_mean=110 * 1024, classes=20,
                           large_files=2, large_size=16 << 20, seed=1)


def dataset_spec(quick: bool) -> SampleSpec:
    return QUICK_DATASET if quick else FULL_DATASET


def describe_spec(spec: SampleSpec) -> str:
    large = f" + {spec.large_files} x {fmt_bytes(spec.large_size)}" if spec.large_files else ""
    return (f"{spec.small_files:,} files of ~{fmt_bytes(spec.small_mean)} in "
            f"{spec.classes} class dirs{large}")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small dataset: a smoke run in well under a minute")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object on stdout (progress stays on stderr)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="parent of the work dir, on the disk to measure (default /var/tmp)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (dataset, repository, copies) afterwards")


def benchmark_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `python -m benchmarks.NAME`, with the common options."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=description)
    add_common_args(parser)
    return parser


def emit(args: argparse.Namespace, report: dict[str, Any],
         print_report: Callable[[dict[str, Any]], None]) -> None:
    """Print a benchmark's result: exactly one JSON object with --json, else its tables."""
    if args.json:
        print_json(report)
    else:
        print_report(report)


def log(message: str) -> None:
    """Progress line on stderr, stamped with seconds since start."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


@contextmanager
def work_dir(parent: Path | None, keep: bool, prefix: str = "cachefs-bench-") -> Iterator[Path]:
    """A fresh directory under `parent` (default /var/tmp), removed afterwards unless `keep`.

    Only the directory created here is ever removed, never `parent` itself.
    """
    base = parent if parent is not None else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base)).absolute()
    log(f"work dir {path}")
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            log(f"removing {path}")
            shutil.rmtree(path, ignore_errors=True)


def sync() -> None:
    """Write back every dirty page (all file systems), so it is not charged to the next phase."""
    os.sync()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run `fn` and return (its result, wall seconds)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def wait_until_ns(deadline_ns: int) -> float:
    """Sleep until time.time_ns() >= deadline_ns (bounded by the deadline); return seconds slept."""
    slept = 0.0
    while (left := deadline_ns - time.time_ns()) > 0:
        pause = min(left / 1e9, 0.5)
        time.sleep(pause)
        slept += pause
    return slept


@dataclass(frozen=True)
class TreeStats:
    files: int
    bytes: int
    newest_change_ns: int  # max(mtime, ctime) over every file


def warm_read(root: Path, block: int = 1 << 20) -> TreeStats:
    """Read every regular file under `root` once (fills the page cache); return its totals."""
    files = total = newest = 0
    buf = bytearray(block)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
            files += 1
            newest = max(newest, st.st_mtime_ns, st.st_ctime_ns)
    return TreeStats(files, total, newest)


def rate(nbytes: int, seconds: float) -> float:
    """Bytes per second (0 for a zero duration)."""
    return nbytes / seconds if seconds > 0 else 0.0


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def fmt_rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e6:,.0f} MB/s"


def meets(value: float, target: str) -> bool:
    """Whether `value` meets a target written as '>= X' or '<= X'."""
    op, _, limit = target.partition(" ")
    if op == ">=":
        return value >= float(limit)
    if op == "<=":
        return value <= float(limit)
    raise ValueError(f"bad target {target!r}")


def print_json(doc: dict[str, Any]) -> None:
    """The one JSON object a benchmark prints on stdout with --json."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def print_table(title: str, header: list[str], rows: list[list[str]],
                notes: Sequence[str] = ()) -> None:
    """A plain aligned text table on stdout."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = [title, "", "  ".join(h.ljust(w) for h, w in zip(header, widths)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out += ["", *notes] if notes else []
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()


@contextmanager
def private_environment(work: Path) -> Iterator[None]:
    """XDG dirs and TMPDIR inside the work dir, test AWS credentials; restored afterwards."""
    saved = dict(os.environ)
    try:
        for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                         ("XDG_STATE_HOME", "state"), ("XDG_CACHE_HOME", "cache")):
            path = work / "xdg" / sub
            path.mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(path)
        tmp = work / "tmp"
        tmp.mkdir(exist_ok=True)
        os.environ["TMPDIR"] = str(tmp)  # moto spools large objects there
        for name in AWS_UNSET_ENV:
            os.environ.pop(name, None)
        os.environ.update(AWS_TEST_ENV)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
