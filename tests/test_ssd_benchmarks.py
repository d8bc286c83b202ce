"""The SSD-tier benchmarks stay runnable: their --quick --json runs print their figures.

Like tests/test_benchmarks.py, these check the output's shape, not the figures, from real runs:
`benchmarks.fuse_floor` mounts a real bindfs (Debian, installed by scripts/setup.sh) beside real
cachefs mounts; `benchmarks.ssd_pressure` runs a real mount daemon and readers in a memory
cgroup (root). Each pass checks the bytes it read inside the benchmark itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.ssd_pressure import MemoryLimit, memory_controller
from tests.test_benchmarks import run_quick


def test_fuse_floor_benchmark_quick_json(tmp_path: Path) -> None:
    result = run_quick(tmp_path, "fuse_floor", 300)
    assert set(result["ratios"]) == {
        "bindfs_small_vs_local_cold", "ssd_small_vs_bindfs", "warm_ssd_small_vs_local_cold",
        "bindfs_large_vs_disk", "ssd_large_vs_bindfs", "warm_ssd_large_vs_disk"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    results = result["raw"]["results"]
    assert results["bindfs_small_cold"]["files"] == result["raw"]["small_files"]
    assert results["ssd_large"]["bytes"] == result["raw"]["large_bytes"]
    assert results["ssd_small"]["counters"]["origin_requests"] == 0  # all from the SSD tier
    assert result["quick"] is True


@pytest.mark.skipif(MemoryLimit.unavailable() is not None,
                    reason=f"the benchmark needs a memory cgroup: {MemoryLimit.unavailable()}")
def test_ssd_pressure_benchmark_quick_json(tmp_path: Path) -> None:
    result = run_quick(tmp_path, "ssd_pressure", 300)
    assert set(result["ratios"]) == {"ssd_small_vs_local_cold_limited",
                                     "ssd_read_amplification_limited"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    ssd = result["raw"]["results"]["ssd_small_limited"]
    assert ssd["files"] == result["raw"]["small_files"]
    assert ssd["counters"]["origin_requests"] == 0
    # the page cache was smaller than the data: the tier stopped asking for whole packs
    assert ssd["counters"]["ssd_pack_prefetches_skipped"] > 0
    controller = memory_controller()
    assert controller is not None
    assert not list(controller[0].glob("cachefs-bench-*"))  # removed
