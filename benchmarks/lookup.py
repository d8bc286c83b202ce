"""Read-path extent lookup benchmark: compiled `FileLayout.pieces` against the Python reference.

What it measures, in one process, on the same queries for both implementations:

- layout `chunked` (the headline): a 4 GiB file as commit stores it, 1,000 extents of whole
  4 MiB chunks (chunk offset 0);
- layout `mixed`: 1,000 extents of random lengths (4 KiB .. 256 KiB) at random offsets inside
  their chunks, so a read often spans two or three extents;
- queries: reads of 128 KiB at uniformly random byte offsets in the file (those near the end are
  clipped to EOF), the same list for both implementations. Their answers are compared first.

Timing: each implementation is called once per query in a plain loop (compiled: the bound
`FileLayout.pieces`, i.e. `cachefs._lookup.Layout.pieces`; reference: the module function
`cachefs.lookup.pieces_reference` on the same arrays), the results dropped; the loop is repeated
and the fastest repeat kept, the two implementations alternating so drift hits both alike.
Garbage collection is off while timing. `cython_vs_python` = reference seconds per query /
compiled seconds per query on the `chunked` layout (higher is better; target >= 10).

Reproduce (from the repository root, with the project's virtualenv; a few seconds):

    .venv/bin/python -m benchmarks.lookup            # table
    .venv/bin/python -m benchmarks.lookup --json     # one JSON object on stdout
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import sys
import time
from typing import Any

from benchmarks.common import emit, log, meets, print_table
from cachefs.dataset.objects import Extent
from cachefs.lookup import COMPILED, FileLayout, pieces_reference

EXTENTS = 1_000
READ_SIZE = 128 << 10
CHUNK_SIZE = 4 << 20
TARGETS = {"cython_vs_python": ">= 10"}


def chunked_layout(rng: random.Random) -> FileLayout:
    """A large file as commit cuts it: EXTENTS whole chunks of CHUNK_SIZE."""
    return FileLayout(Extent(f"{rng.getrandbits(256):064x}", 0, CHUNK_SIZE)
                      for _ in range(EXTENTS))


def mixed_layout(rng: random.Random) -> FileLayout:
    """EXTENTS extents of 4 KiB .. 256 KiB at random offsets in a few shared chunks."""
    names = [f"{rng.getrandbits(256):064x}" for _ in range(EXTENTS // 16)]
    extents = []
    for _ in range(EXTENTS):
        length = rng.randrange(4 << 10, 256 << 10)
        extents.append(Extent(rng.choice(names), rng.randrange(CHUNK_SIZE - length), length))
    return FileLayout(extents)


def time_compiled(layout: FileLayout, queries: list[tuple[int, int]]) -> float:
    """Seconds for one `layout.pieces` call per query, results dropped."""
    fn = layout.pieces
    start = time.perf_counter()
    for offset, size in queries:
        fn(offset, size)
    return time.perf_counter() - start


def time_reference(layout: FileLayout, queries: list[tuple[int, int]]) -> float:
    """Seconds for one `pieces_reference` call per query on the same arrays, results dropped."""
    fn = pieces_reference
    starts, chunk_offsets, lengths = layout.starts, layout.chunk_offsets, layout.lengths
    start = time.perf_counter()
    for offset, size in queries:
        fn(starts, chunk_offsets, lengths, offset, size)
    return time.perf_counter() - start


def measure(layout: FileLayout, queries: list[tuple[int, int]], repeat: int) -> dict[str, Any]:
    """Check both implementations agree on `queries`, then time them (best of `repeat`)."""
    npieces = 0
    for offset, size in queries:
        got = layout.pieces(offset, size)
        assert got == layout.pieces_reference(offset, size), (offset, size)
        npieces += len(got)

    best_ref = best_comp = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            best_ref = min(best_ref, time_reference(layout, queries))
            best_comp = min(best_comp, time_compiled(layout, queries))
    finally:
        if enabled:
            gc.enable()
    n = len(queries)
    return {
        "extents": len(layout), "file_bytes": layout.size, "queries": n,
        "pieces_per_query": npieces / n,
        "python_ns_per_query": best_ref / n * 1e9,
        "cython_ns_per_query": best_comp / n * 1e9,
        "cython_vs_python": best_ref / best_comp,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not COMPILED:
        raise SystemExit("cachefs._lookup is not built: reinstall with `pip install -e .`")
    rng = random.Random(args.seed)
    nqueries = 5_000 if args.quick else args.queries
    repeat = 3 if args.quick else args.repeat
    layouts = {"chunked": chunked_layout(rng), "mixed": mixed_layout(rng)}
    raw: dict[str, Any] = {"read_size": READ_SIZE, "repeat": repeat, "seed": args.seed,
                           "python": platform.python_version(), "cpus": os.cpu_count()}
    for name, layout in layouts.items():
        queries = [(rng.randrange(layout.size), READ_SIZE) for _ in range(nqueries)]
        log(f"layout {name}: {len(layout)} extents, {nqueries:,} reads of {READ_SIZE >> 10} KiB")
        raw[name] = measure(layout, queries, repeat)
        log(f"layout {name}: python {raw[name]['python_ns_per_query']:.0f} ns, cython "
            f"{raw[name]['cython_ns_per_query']:.0f} ns per read: "
            f"{raw[name]['cython_vs_python']:.1f}x")
    ratios = {"cython_vs_python": raw["chunked"]["cython_vs_python"],
              "cython_vs_python_mixed": raw["mixed"]["cython_vs_python"]}
    return {"ratios": ratios, "raw": raw, "targets": dict(TARGETS), "quick": bool(args.quick)}


def print_report(report: dict[str, Any]) -> None:
    raw = report["raw"]
    rows = []
    for name in ("chunked", "mixed"):
        m = raw[name]
        ok = meets(m["cython_vs_python"], TARGETS["cython_vs_python"])
        rows.append([name, f"{m['extents']:,}", f"{m['pieces_per_query']:.2f}",
                     f"{m['python_ns_per_query']:,.0f}", f"{m['cython_ns_per_query']:,.0f}",
                     f"{m['cython_vs_python']:.1f}",
                     f"{TARGETS['cython_vs_python']} {'ok' if ok else 'MISSED'}"
                     if name == "chunked" else ""])
    title = (f"cachefs extent lookup benchmark{' (quick)' if report['quick'] else ''}: "
             f"{raw['chunked']['queries']:,} reads of {raw['read_size'] >> 10} KiB at random "
             f"offsets per layout")
    notes = [f"cython_vs_python = python ns / cython ns per read (chunked layout); best of "
             f"{raw['repeat']} runs; Python {raw['python']}, {raw['cpus']} CPUs."]
    print_table(title, ["layout", "extents", "pieces/read", "python ns", "cython ns",
                        "cython_vs_python", "target"], rows, notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lookup",
        description="compiled extent lookup (FileLayout.pieces) against the pure-Python reference")
    parser.add_argument("--quick", action="store_true", help="fewer reads: a smoke run")
    parser.add_argument("--json", action="store_true",
                        help="print exactly one JSON object on stdout (progress stays on stderr)")
    parser.add_argument("--queries", type=int, default=50_000, help="reads per layout")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (the best is kept)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    emit(args, run(args), print_report)


if __name__ == "__main__":
    main(sys.argv[1:])
