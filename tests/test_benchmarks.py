"""Benchmarks stay runnable: each one's --quick --json run prints the figures its issue asks for.

These check the shape of the output only; the figures themselves are for the README, not tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run_quick(tmp_path: Path, module: str, timeout: int, *extra: str) -> dict:
    """Run `python -m benchmarks.MODULE --quick --json` in a fresh work dir; return its JSON
    document, after checking it exited 0 and removed its work dir."""
    work = tmp_path / "bench"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", *extra, "--json",
         "--dir", str(work)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(work.iterdir())  # the work dir was removed
    return json.loads(proc.stdout)


def test_commit_benchmark_quick_json(tmp_path: Path) -> None:
    result = run_quick(tmp_path, "commit", 240)
    assert set(result["ratios"]) >= {"commit_vs_cp", "recommit_vs_commit",
                                     "new_bytes_vs_changed", "checkout_vs_cp"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    assert result["quick"] is True


def test_scale_benchmark_quick_json(tmp_path: Path) -> None:
    result = run_quick(tmp_path, "scale", 600)
    assert set(result["ratios"]) >= {"mount_1m_vs_10", "ls_l_100k_vs_local"}
    assert result["raw"]["per_inode_bytes"] > 0


def test_read_benchmark_quick_json(tmp_path: Path) -> None:
    """The mount read benchmark end to end on a small dataset (rclone and s3fs skipped: no Debian
    rclone/s3fs needed in CI; the full run installs and measures them)."""
    result = run_quick(tmp_path, "read", 600, "--skip-other-tools")
    assert set(result["ratios"]) >= {"epoch2_large_vs_local", "warm_small_vs_local",
                                     "cython_vs_python", "cold_large_file_vs_s3",
                                     "cold_small_vs_local_cold", "warm_ssd_small_vs_local_cold",
                                     "s3_cold_small_origin_efficiency", "warm_ssd_large_vs_disk"}
    assert result["raw"]["results"]["local_disk"]["disk_sequential_read"]["mb_per_s"] > 0
    assert all(v > 0 for v in result["ratios"].values())
    # the SSD-tier figures are medians of pairs (a pass, and its baseline just before it)
    tier = result["raw"]["results"]["cachefs_local"]
    for case, key in (("small_ssd", "vs_local_cold"), ("large_ssd", "vs_disk")):
        pairs = tier[case][key]
        assert len(pairs["pair_ratios"]) == result["raw"]["ssd_passes"]
        assert pairs["median_ratio"] == result["ratios"][
            "warm_ssd_small_vs_local_cold" if case == "small_ssd" else "warm_ssd_large_vs_disk"]
    # small files' SSD passes start with the mount's names listed; more pairs without
    assert len(tier["small_ssd"]["names_listed_seconds"]) == result["raw"]["ssd_passes"]
    names_cold = tier["small_ssd_names_cold"]["vs_local_cold"]
    assert len(names_cold["pair_ratios"]) == result["raw"]["names_cold_passes"]
    assert names_cold["median_ratio"] == result["ratios"][
        "warm_ssd_small_names_cold_vs_local_cold"]


def test_remotes_benchmark_quick_json(tmp_path: Path) -> None:
    """Push, import and gc against a moto S3 server started by the benchmark itself."""
    result = run_quick(tmp_path, "remotes", 300)
    assert set(result["ratios"]) >= {"push_vs_upload", "repush_vs_push",
                                     "incremental_push_vs_push", "import_vs_download",
                                     "reimport_vs_import", "gc_vs_list"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    assert result["raw"]["gc_objects_s"] > 0
    assert result["quick"] is True


def test_haystack_benchmark_quick_json(tmp_path: Path) -> None:
    result = run_quick(tmp_path, "haystack", 300)
    assert set(result["ratios"]) == {"small_write_vs_files", "small_read_cold_vs_files",
                                     "small_read_warm_vs_files", "grpc_small_write_vs_files"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    assert result["preads_per_read"] == 1.0  # one index lookup and one pread per read
    assert result["grpc_large_mb_s"] > 0 and result["quick"] is True
    # the storage server's memory cache: 32 cold readers of the same needles, one disk read each
    cache = result["server_cache"]
    assert result["server_cache_disk_read_ratio"] <= 1.05, cache
    assert cache["with"]["stat"]["misses"] == cache["needles"]
    assert cache["without"]["stat"] == {"capacity_bytes": 0}
    if "unavailable" in cache["throttle"]:  # no cgroup here: said why, no speedup figure
        assert cache["throttle"]["unavailable"] and result["server_cache_speedup"] is None
    else:
        assert result["server_cache_speedup"] > 1, cache


def test_cluster_benchmark_quick_json(tmp_path: Path) -> None:
    result = run_quick(tmp_path, "cluster", 300)
    assert set(result["ratios"]) == {"commit_vs_file", "checkout_vs_file"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    assert result["cas_ops_s"] > 0
    assert 0 < result["failover_s_median"] < 60
    assert len(result["raw"]["failover_s"]) == 3 and result["quick"] is True


def test_p2p_benchmark_quick_json(tmp_path: Path) -> None:
    """N = 1, 2, 4 nodes (own cache dir, peer server and mount each) reading one dataset from a
    throttled moto origin, with and without the peer tier."""
    result = run_quick(tmp_path, "p2p", 400)
    assert set(result["ratios"]) >= {"origin_ratio_n4", "epoch_time_ratio_n4",
                                     "alone_throttle_use_n4", "peer_overhead_n1",
                                     "origin_ratio_n2", "epoch_time_ratio_n2",
                                     "epoch_time_ratio_owner_killed_n4"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    assert isinstance(result["valid_n4"], bool) and result["all_bytes_right"] is True
    assert result["raw"]["runs"]["n4_owner_killed"]["killed_at_s"] > 0
    assert result["quick"] is True


def test_gateway_benchmark_quick_json(tmp_path: Path) -> None:
    """The gateway against nginx, http.server (driven by wrk) and moto (boto3), end to end."""
    result = run_quick(tmp_path, "gateway", 300)
    assert set(result["ratios"]) == {"gateway_small_vs_nginx", "gateway_large_vs_nginx",
                                     "gateway_small_vs_httpserver", "gateway_s3_warm_vs_moto",
                                     "gateway_cpu_per_gib_vs_moto"}
    assert all(v > 0 for v in result["ratios"].values())
    for server in ("cachefs gateway", "nginx", "http.server"):
        assert result["raw"]["results"][server]["small"]["best"]["requests"] > 0
