"""The FUSE-floor benchmark stays runnable: its --quick --json run prints its figures.

Like tests/test_benchmarks.py, this checks the output's shape, not the figures: a real bindfs
mount (Debian, installed by scripts/setup.sh) and real cachefs mounts, each pass checked for
the bytes it read by the benchmark itself.
"""

from __future__ import annotations

from pathlib import Path

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
    assert result["quick"] is True
