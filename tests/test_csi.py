"""The CSI plugin over its real unix socket, with real FUSE mounts, bind mounts and processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.proto import csi_pb2, csi_pb2_grpc
from tests.helpers import cli_json, run_cli
from tests.mounting import wait_for

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="bind mounts need root (CI is root)")

MODE = csi_pb2.VolumeCapability.AccessMode


def capability(mode: int = MODE.MULTI_NODE_READER_ONLY, block: bool = False
               ) -> csi_pb2.VolumeCapability:
    if block:
        return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                        access_mode=MODE(mode=mode))
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                    access_mode=MODE(mode=mode))


def processes_mentioning(*texts: str) -> list[int]:
    """Live processes whose command line contains every one of `texts`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().split()[2]
            except (OSError, IndexError):
                continue
            if all(t in cmdline for t in texts) and state != "Z":
                pids.append(int(entry.name))
    return pids


def daemons_of(plugin: Plugin) -> list[int]:
    """Mount daemons serving paths of this plugin's test root."""
    return processes_mentioning("cachefs.fuse.daemon", str(plugin.root))


def mounts_below(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(root))]


class Plugin:
    """A `cachefs csi` process on a socket under `root`, and a client for it."""

    def __init__(self, root: Path, flags: list[str] | None = None) -> None:
        self.root = root
        self.flags = flags or []  # extra command-line flags of the plugin
        self.socket = root / "csi.sock"
        self.state = root / "state"
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> Plugin:
        with open(self.root / "plugin.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cachefs.cli.main", "csi", "--endpoint",
                 f"unix://{self.socket}", "--node-id", "node-1", "--state-dir",
                 str(self.state), "--cache-dir", str(self.root / "cache"), *self.flags],
                stdout=log, stderr=log, start_new_session=True)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2)
                return self
            except grpc.RpcError:
                assert self.proc.poll() is None, (self.root / "plugin.log").read_text()
                assert time.monotonic() < deadline, "plugin did not start"
                time.sleep(0.05)

    def kill(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.kill()
        for point in reversed(mounts_below(self.root)):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for pid in processes_mentioning(str(self.root)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def plugin() -> Iterator[Plugin]:
    root = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
    p = Plugin(root)
    try:
        yield p.start()
    finally:
        p.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, str]:
    return commit_two_versions(tmp_path)


def commit_two_versions(tmp_path: Path) -> dict[str, str]:
    """`ds` in the local remote: tag v1 (labels.csv "v1"), then main (labels.csv "v2")."""
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    for i in range(20):
        (src / "train" / f"{i}.jpg").write_bytes(os.urandom(3000 + i))
    (src / "labels.csv").write_text("v1\n")
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "v1")
    run_cli("tag", "ds", "v1")
    (src / "labels.csv").write_text("v2\n")
    run_cli("commit", "ds", str(src), "-m", "v2")
    return {"v1": cli_json("log", "ds@v1")[0]["commit"],
            "main": cli_json("log", "ds")[0]["commit"]}


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def create(plugin: Plugin, name: str = "pvc-1", ref: str = "v1", required: int = 0
           ) -> csi_pb2.Volume:
    return plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name=name, volume_capabilities=[capability()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=required),
        parameters={"dataset": "ds", "ref": ref}), timeout=60).volume


def test_identity(plugin: Plugin) -> None:
    info = plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "csi.cachefs.io" and info.vendor_version
    caps = plugin.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    kinds = {c.service.type for c in caps.capabilities}
    service = csi_pb2.PluginCapability.Service
    assert kinds == {service.CONTROLLER_SERVICE, service.VOLUME_ACCESSIBILITY_CONSTRAINTS}
    assert plugin.identity.Probe(csi_pb2.ProbeRequest()).ready.value
    node = plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert node.node_id == "node-1"
    assert node.accessible_topology.segments["topology.csi.cachefs.io/node"] == "node-1"


def test_full_lifecycle_two_targets(plugin: Plugin, dataset: dict[str, str]) -> None:
    volume = create(plugin)
    assert volume.volume_context["commit"] == dataset["v1"]
    assert create(plugin).volume_id == volume.volume_id  # idempotent by name
    staging = plugin.root / "staging"
    staging.mkdir()
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging),
        volume_capability=capability(), volume_context=volume.volume_context)
    plugin.node.NodeStageVolume(stage, timeout=60)
    plugin.node.NodeStageVolume(stage, timeout=60)  # idempotent
    targets = [plugin.root / "pods" / name / "vol" for name in ("a", "b")]
    for target in targets:
        request = csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging),
            target_path=str(target), volume_capability=capability(MODE.SINGLE_NODE_WRITER),
            readonly=False, volume_context=volume.volume_context)
        plugin.node.NodePublishVolume(request, timeout=60)
        plugin.node.NodePublishVolume(request, timeout=60)
    for target in targets:
        assert (target / "labels.csv").read_text() == "v1\n"  # the tag's version, not main's
        assert len(os.listdir(target / "train")) == 20
        with pytest.raises(OSError):
            (target / "new").write_text("x")  # read-only although a writer mode was asked
    stats = plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=str(targets[0])))
    by_unit = {u.unit: u.total for u in stats.usage}
    assert by_unit[csi_pb2.VolumeUsage.INODES] == 21
    assert by_unit[csi_pb2.VolumeUsage.BYTES] == sum(3000 + i for i in range(20)) + 3
    for target in targets:
        request = csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume.volume_id,
                                                     target_path=str(target))
        plugin.node.NodeUnpublishVolume(request, timeout=60)
        plugin.node.NodeUnpublishVolume(request, timeout=60)
        assert not target.exists()
    unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume.volume_id,
                                               staging_target_path=str(staging))
    plugin.node.NodeUnstageVolume(unstage, timeout=60)
    plugin.node.NodeUnstageVolume(unstage, timeout=60)
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert mounts_below(plugin.root) == []
    assert not daemons_of(plugin)  # no mount daemon left
    listed = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert list(listed.entries) == []


def test_argument_and_state_errors(plugin: Plugin, dataset: dict[str, str]) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    ctrl, node = plugin.controller, plugin.node
    assert code_of(lambda: ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
        volume_capabilities=[capability()], parameters={"dataset": "ds"}))) == invalid
    assert code_of(lambda: ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="x", parameters={"dataset": "ds"}))) == invalid
    assert code_of(lambda: ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="x", volume_capabilities=[capability(block=True)],
        parameters={"dataset": "ds"}))) == invalid
    assert code_of(lambda: ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="x", volume_capabilities=[capability()], parameters={}))) == invalid
    assert code_of(lambda: ctrl.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="x", volume_capabilities=[capability()],
        parameters={"dataset": "ds", "ref": "nosuch"}))) == grpc.StatusCode.NOT_FOUND
    create(plugin, "sized", required=1 << 20)
    assert code_of(lambda: create(plugin, "sized", required=2 << 20)) == (
        grpc.StatusCode.ALREADY_EXISTS)
    assert code_of(lambda: ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest())) == invalid
    ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id="never-existed"))
    assert code_of(lambda: ctrl.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id="nope", volume_capabilities=[capability()]))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        staging_target_path="/tmp/x", volume_capability=capability()))) == invalid
    assert code_of(lambda: node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="v", volume_capability=capability()))) == invalid
    assert code_of(lambda: node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id="v", staging_target_path="/tmp/x"))) == invalid
    assert code_of(lambda: node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="v", staging_target_path="/tmp/x", volume_capability=capability()))) == invalid
    assert code_of(lambda: node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id="v", target_path="/tmp/t", staging_target_path="/tmp/x"))) == invalid
    assert code_of(lambda: node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="v"))) == invalid
    assert code_of(lambda: node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        staging_target_path="/tmp/x"))) == invalid
    node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="gone", target_path=str(plugin.root / "never")))
    node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id="gone", staging_target_path=str(plugin.root / "never")))
    assert code_of(lambda: node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id="gone", volume_path="/tmp"))) == grpc.StatusCode.NOT_FOUND


def test_capabilities_validation_and_paging(plugin: Plugin, dataset: dict[str, str]) -> None:
    volumes = [create(plugin, f"pvc-{i}") for i in range(5)]
    for mode in (MODE.MULTI_NODE_READER_ONLY, MODE.SINGLE_NODE_READER_ONLY,
                 MODE.SINGLE_NODE_WRITER):
        answer = plugin.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volumes[0].volume_id,
                                                      volume_capabilities=[capability(mode)]))
        assert answer.HasField("confirmed")
    block = plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volumes[0].volume_id,
                                                  volume_capabilities=[capability(block=True)]))
    assert not block.HasField("confirmed") and block.message
    seen, token = [], ""
    while True:
        page = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2,
                                                                        starting_token=token))
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
    assert sorted(seen) == sorted(v.volume_id for v in volumes)
    assert code_of(lambda: plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(
        starting_token="bogus"))) == grpc.StatusCode.ABORTED
    caps = plugin.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest())
    rpc_type = csi_pb2.ControllerServiceCapability.RPC
    assert {c.rpc.type for c in caps.capabilities} == {rpc_type.CREATE_DELETE_VOLUME,
                                                      rpc_type.LIST_VOLUMES}
    node_caps = plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    node_rpc = csi_pb2.NodeServiceCapability.RPC
    assert {c.rpc.type for c in node_caps.capabilities} == {node_rpc.STAGE_UNSTAGE_VOLUME,
                                                           node_rpc.GET_VOLUME_STATS}


def test_inline_ephemeral_volume(plugin: Plugin, dataset: dict[str, str]) -> None:
    target = plugin.root / "pods" / "eph" / "vol"
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-eph-1", target_path=str(target), volume_capability=capability(),
        volume_context={"dataset": "ds", "ref": "main", "csi.storage.k8s.io/ephemeral": "true",
                        "csi.storage.k8s.io/pod.name": "trainer-0"})
    plugin.node.NodePublishVolume(request, timeout=60)
    plugin.node.NodePublishVolume(request, timeout=60)
    assert (target / "labels.csv").read_text() == "v2\n"
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="csi-eph-1", target_path=str(target)), timeout=60)
    assert not target.exists() and mounts_below(plugin.root) == []
    assert not daemons_of(plugin)


def stage_and_publish(plugin: Plugin) -> tuple[csi_pb2.Volume, Path, list[Path]]:
    volume = create(plugin)
    staging = plugin.root / "staging"
    staging.mkdir(exist_ok=True)
    plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging),
        volume_capability=capability(), volume_context=volume.volume_context), timeout=60)
    targets = [plugin.root / "pods" / n / "vol" for n in ("a", "b")]
    for target in targets:
        plugin.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging),
            target_path=str(target), volume_capability=capability(),
            volume_context=volume.volume_context), timeout=60)
    return volume, staging, targets


def test_plugin_restart_leaves_live_mounts_alone(plugin: Plugin,
                                                 dataset: dict[str, str]) -> None:
    volume, staging, targets = stage_and_publish(plugin)
    daemons = daemons_of(plugin)
    assert len(daemons) == 1
    with open(targets[0] / "labels.csv") as held:  # a pod keeps a file open across the restart
        plugin.kill()
        plugin.start()
        assert daemons_of(plugin) == daemons  # untouched
        assert held.read() == "v1\n"
    for target in targets:
        assert (target / "labels.csv").read_text() == "v1\n"
    for target in targets:  # the restarted plugin knows the volume: clean teardown
        plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume.volume_id, target_path=str(target)), timeout=60)
    plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging)), timeout=60)
    assert mounts_below(plugin.root) == []


def test_killed_mount_daemon_is_repaired(plugin: Plugin, dataset: dict[str, str]) -> None:
    _, _, targets = stage_and_publish(plugin)
    [daemon] = daemons_of(plugin)
    os.kill(daemon, signal.SIGKILL)

    def all_readable() -> bool:
        try:
            return all((t / "labels.csv").read_text() == "v1\n" for t in targets)
        except OSError:
            return False

    wait_for(all_readable, timeout=30, what="the targets to be served again")
    assert daemons_of(plugin) != [daemon]


def test_corrupt_state_file_is_refused_clearly(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="csi-", dir="/tmp"))
    try:
        (root / "state").mkdir()
        (root / "state" / "volumes.json").write_text('{"pvc-1": {"volume_id": ')  # torn write
        proc = subprocess.run(
            [sys.executable, "-m", "cachefs.cli.main", "csi", "--mode", "controller",
             "--endpoint", f"unix://{root}/csi.sock", "--state-dir", str(root / "state")],
            capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2
        assert "volumes.json is unreadable" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)
