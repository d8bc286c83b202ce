"""CSI volumes and gc, over the plugin's real socket: CreateVolume pins the commit it resolved
(DeleteVolume unpins), a staged volume's mount pins it too, and gc keeps a volume's version
after its branch is gone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from csi.proto import csi_pb2
from csi.volume_pins import pin_name
from tests.helpers import cli_json, run_cli
from tests.test_csi import (  # noqa: F401  (fixtures)
    Plugin,
    capability,
    create,
    daemons_of,
    dataset,
    mounts_below,
    plugin,
)

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="bind mounts need root (CI is root)")


def branch_version(tmp_path: Path) -> dict[str, bytes]:
    """Commit a version on a new branch `exp` of dataset `ds` (made by `dataset`): its new
    commit, trees and chunks are reached by `exp` alone."""
    src = tmp_path / "exp-src"
    files = {f"part-{i}.bin": os.urandom(40_000 + i) for i in range(6)}
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    run_cli("branch", "ds", "exp")
    run_cli("commit", "ds@exp", str(src), "-m", "experiment")
    return files


def pins_by_name() -> dict[str, dict]:
    return {p["name"]: p for p in cli_json("pin", "list")}


def test_a_provisioned_volume_keeps_its_version_until_deleted(
        plugin: Plugin, dataset: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    files = branch_version(tmp_path)
    volume = create(plugin, "pvc-exp", ref="exp")
    assert create(plugin, "pvc-exp", ref="exp").volume_id == volume.volume_id  # idempotent
    commit = volume.volume_context["commit"]
    pins = pins_by_name()
    pin = pins[pin_name(volume.volume_id)]
    assert (pin["dataset"], pin["commit"], pin["expires"]) == ("ds", commit, None)
    assert volume.volume_id in pin["holder"] and len(pins) == 1

    run_cli("branch", "ds", "-d", "exp")
    kept = cli_json("gc", "--grace", "0")
    assert kept["garbage_objects"] == 0 and kept["pins"] == [pin["name"]]

    staging = plugin.root / "staging"
    staging.mkdir()
    stage = csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging),
        volume_capability=capability(), volume_context=volume.volume_context)
    plugin.node.NodeStageVolume(stage, timeout=60)
    for name, data in files.items():  # every byte, from the remote (nothing was cached)
        assert (staging / name).read_bytes() == data
    mount_pins = [p for p in cli_json("pin", "list") if p["name"] != pin["name"]]
    assert len(mount_pins) == 1 and mount_pins[0]["commit"] == commit
    assert str(staging) in mount_pins[0]["holder"] and mount_pins[0]["ttl_s"] == 600

    plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging)), timeout=60)
    assert not daemons_of(plugin) and mounts_below(plugin.root) == []
    assert list(pins_by_name()) == [pin["name"]]  # the mount's pin went with its unmount

    delete = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
    plugin.controller.DeleteVolume(delete, timeout=60)
    plugin.controller.DeleteVolume(delete, timeout=60)  # idempotent
    assert pins_by_name() == {}
    freed = cli_json("gc", "--grace", "0")
    assert freed["garbage"]["commits"]["objects"] == 1 and freed["pins"] == []
