"""Prometheus metrics of the CSI plugin and the CSI mounter (`--metrics-listen`), scraped over HTTP
from real processes driven through their real sockets: CSI RPCs by method and code, the volumes
and mounts gauges up then down, the mounter's requests, and a repair after a mount daemon is
killed. Every family must carry help text. Processes and mounts are cleaned up even on failure
(test_csi's Plugin.cleanup: every process naming the test root, every mount below it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi.mounter import request_raw, spawn_mounter
from csi.proto import csi_pb2
from tests.mounting import wait_for
from tests.servers import free_port
from tests.test_csi import (
    Plugin,
    capability,
    code_of,
    commit_two_versions,
    create,
    daemons_of,
    mounts_below,
)

needs_root = pytest.mark.skipif(os.getuid() != 0, reason="bind mounts need root (CI is root)")

REPAIR_TIMEOUT_S = 20.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample at `url`, by (name, sorted labels); every family must have help text."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation.strip(), f"{family.name} has no help text"
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series not exported yet (a counter nothing has moved)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def rpcs(samples: Samples, method: str, code: str = "OK") -> float:
    return value(samples, "cachefs_csi_rpcs_total", method=method, code=code)


class Node:
    """A mounter and a plugin using it (`--mounter-socket`), each with its metrics endpoint."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounter_url = f"http://127.0.0.1:{free_port()}/metrics"
        self.mounter_socket = str(root / "mounter.sock")
        self.mounter: subprocess.Popen[bytes] | None = None
        self.plugin_port = free_port()
        self.plugin = Plugin(root, ["--mounter-socket", self.mounter_socket,
                                    "--metrics-listen", f"127.0.0.1:{self.plugin_port}"])

    def start(self) -> Node:
        self.mounter = spawn_mounter(self.mounter_socket, str(self.root / "mounter-state"),
                                     health_interval=0.5, hang_timeout=2.0,
                                     metrics_listen=self.mounter_url.split("/")[2])
        self.plugin.start()
        return self

    def plugin_metrics(self) -> Samples:
        return scrape(f"http://127.0.0.1:{self.plugin_port}/metrics")

    def mounter_metrics(self) -> Samples:
        return scrape(self.mounter_url)

    def cleanup(self) -> None:
        if self.mounter is not None and self.mounter.poll() is None:
            self.mounter.kill()
            self.mounter.wait(timeout=10)
        self.plugin.cleanup()  # the plugin, the mount daemons, every mount below root


@pytest.fixture
def node() -> Iterator[Node]:
    root = Path(tempfile.mkdtemp(prefix="csim-", dir="/tmp"))  # short: a unix socket path
    node = Node(root)
    try:
        yield node.start()
    finally:
        node.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@needs_root
def test_rpcs_volumes_mounts_and_a_repair_are_counted(node: Node, tmp_path: Path) -> None:
    commit_two_versions(tmp_path)
    plugin = node.plugin
    before = node.plugin_metrics()
    assert plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=10).ready.value
    volume = create(plugin)
    staging = plugin.root / "staging"
    staging.mkdir()
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging),
        volume_capability=capability(), volume_context=volume.volume_context)
    no_id = csi_pb2.NodeStageVolumeRequest(staging_target_path=str(staging),
                                           volume_capability=capability())
    assert code_of(lambda: plugin.node.NodeStageVolume(no_id, timeout=10)) == INVALID
    plugin.node.NodeStageVolume(stage, timeout=60)
    targets = [plugin.root / "pods" / name / "vol" for name in ("a", "b")]
    for target in targets:
        plugin.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging),
            target_path=str(target), volume_capability=capability(),
            volume_context=volume.volume_context), timeout=60)

    got = node.plugin_metrics()
    assert rpcs(got, "Probe") - rpcs(before, "Probe") == 1
    assert rpcs(got, "CreateVolume") == 1
    assert rpcs(got, "NodeStageVolume") == 1
    assert rpcs(got, "NodeStageVolume", "INVALID_ARGUMENT") == 1
    assert rpcs(got, "NodePublishVolume") == 2
    assert value(got, "cachefs_csi_rpc_seconds_count", method="NodeStageVolume",
                 code="OK") == 1
    assert value(got, "cachefs_csi_rpc_seconds_count", method="NodeStageVolume",
                 code="INVALID_ARGUMENT") == 1
    assert value(got, "cachefs_csi_volumes_staged") == 1
    assert value(got, "cachefs_csi_volumes_published") == 1
    assert value(got, "cachefs_csi_published_targets") == 2
    assert value(got, "cachefs_csi_controller_volumes") == 1
    mounter = node.mounter_metrics()
    assert value(mounter, "cachefs_csi_mounter_mounts") == 1
    assert value(mounter, "cachefs_csi_mounter_binds") == 2
    assert value(mounter, "cachefs_csi_mounter_mounts_started_total") == 1
    assert value(mounter, "cachefs_csi_mounter_requests_total", op="mount", result="ok") == 1
    assert value(mounter, "cachefs_csi_mounter_requests_total", op="bind", result="ok") == 2
    assert value(mounter, "cachefs_csi_mounter_requests_total", op="ping", result="ok") >= 1
    assert value(mounter, "cachefs_csi_mounter_request_seconds_count", op="mount") == 1
    assert value(mounter, "cachefs_csi_mounter_health_rounds_total") >= 1

    # a request that is no JSON, straight to the mounter: refused, counted as invalid
    assert b'"UsageError"' in request_raw(node.mounter_socket, b"not json\n", timeout=10)
    assert value(node.mounter_metrics(), "cachefs_csi_mounter_requests_total",
                 op="invalid", result="UsageError") == 1

    [daemon] = daemons_of(plugin)
    os.kill(daemon, signal.SIGKILL)

    def served_again() -> bool:
        try:
            return all((t / "labels.csv").read_text() == "v1\n" for t in targets)
        except OSError:
            return False

    wait_for(served_again, timeout=REPAIR_TIMEOUT_S, what="the targets to be served again")
    # counted just after each step takes effect: awaited, not assumed
    wait_for(lambda: value(node.mounter_metrics(), "cachefs_csi_mounter_rebinds_total") == 2,
             timeout=REPAIR_TIMEOUT_S, what="both re-binds to be counted")
    mounter = node.mounter_metrics()
    repairs = "cachefs_csi_mounter_repairs_total"
    assert value(mounter, repairs, state="dead") == 1
    assert value(mounter, repairs, state="hung") == value(mounter, repairs, state="absent") == 0
    assert value(mounter, "cachefs_csi_mounter_health_check_failures_total", state="dead") >= 1
    assert value(mounter, "cachefs_csi_mounter_mounts_started_total") == 2
    assert value(mounter, "cachefs_csi_mounter_repair_failures_total", state="dead") == 0
    assert value(mounter, "cachefs_csi_mounter_rebind_failures_total") == 0
    assert value(mounter, "cachefs_csi_mounter_mounts") == 1

    for target in targets:
        plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume.volume_id, target_path=str(target)), timeout=60)
    plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging)), timeout=60)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id),
                                   timeout=60)
    assert mounts_below(plugin.root) == []

    got = node.plugin_metrics()
    for gauge in ("volumes_staged", "volumes_published", "published_targets",
                  "controller_volumes"):
        assert value(got, f"cachefs_csi_{gauge}") == 0, gauge
    assert rpcs(got, "NodeUnpublishVolume") == 2 and rpcs(got, "NodeUnstageVolume") == 1
    assert rpcs(got, "DeleteVolume") == 1
    mounter = node.mounter_metrics()
    assert value(mounter, "cachefs_csi_mounter_mounts") == 0
    assert value(mounter, "cachefs_csi_mounter_binds") == 0
    assert value(mounter, "cachefs_csi_mounter_requests_total", op="unbind", result="ok") == 2
    assert value(mounter, "cachefs_csi_mounter_requests_total", op="unmount", result="ok") == 1


def test_a_controller_serves_its_metrics_and_bad_addresses_stop_a_start() -> None:
    root = Path(tempfile.mkdtemp(prefix="csim-", dir="/tmp"))  # short: a unix socket path
    port = free_port()
    controller = Plugin(root, ["--mode", "controller", "--metrics-listen", f"127.0.0.1:{port}"])
    try:
        controller.start()  # answers Probe
        assert code_of(lambda: controller.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(), timeout=10)) == INVALID
        got = scrape(f"http://127.0.0.1:{port}/metrics")
        assert rpcs(got, "Probe") >= 1
        assert rpcs(got, "DeleteVolume", "INVALID_ARGUMENT") == 1
        assert value(got, "cachefs_csi_controller_volumes") == 0
        assert ("cachefs_csi_volumes_staged", ()) not in got  # no node service here

        # the port the controller holds: a second plugin, and a mounter, stop with a clear
        # error before serving anything; so does a malformed address
        busy = f"127.0.0.1:{port}"
        plugin = ["csi", "--mode", "controller", "--endpoint", f"unix://{root}/other.sock",
                  "--state-dir", str(root / "other")]
        mounter = ["csi", "mounter", "--socket", str(root / "m.sock"), "--state-dir",
                   str(root / "m")]
        for argv, address, message in ((plugin, busy, "cannot listen there"),
                                       (mounter, busy, "cannot listen there"),
                                       (mounter, "nonsense", "HOST:PORT")):
            proc = subprocess.run(
                [sys.executable, "-m", "cachefs.cli.main", *argv, "--metrics-listen", address],
                capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 2, proc.stderr
            assert "--metrics-listen" in proc.stderr and message in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
        assert not (root / "other.sock").exists() and not (root / "m.sock").exists()
    finally:
        controller.cleanup()
        shutil.rmtree(root, ignore_errors=True)
