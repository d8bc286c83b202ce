"""The CSI driver's trust boundary: a volume's `remote` reaches only configured remotes.

A volume's mount carries the node's credentials to its remote, and inline volumes are written by
whoever may create a pod, so: a volume names a configured remote (or a configured remote's URL);
any other URL is refused with INVALID_ARGUMENT before anything connects to it, by the plugin and
again by the mounter (every path arrives there); `--allow-remote-urls` lets PersistentVolumes and
StorageClasses name other URLs, never inline volumes. Real plugin, real mounter, real mounts; a
listening socket stands in for the attacker's server and must see no connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cachefs.config import Config, local_repo_url
from cachefs.errors import ConfigError
from csi.mounter import MounterClient, request_raw
from csi.proto import csi_pb2
from tests.mounting import daemon_pids, wait_for
from tests.test_csi import Plugin, capability, commit_two_versions, mounts_below

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="bind mounts need root (CI is root)")

EPHEMERAL = "csi.storage.k8s.io/ephemeral"
NO_CONNECTION_WAIT_S = 0.5  # how long the attacker's socket is watched after a refusal
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class TrustPlugin(Plugin):
    """test_csi's Plugin (with extra command-line flags) and its mounter."""

    @property
    def mounter(self) -> MounterClient:
        return MounterClient(str(self.state / "mounter.sock"), timeout=60)

    def mounter_log(self) -> str:
        return (self.state / "mounter" / "mounter.log").read_text(errors="replace")


def team_url() -> str:
    """The local repository under another spelling: a configured remote `team` of its own."""
    return "file://localhost" + local_repo_url()[len("file://"):]


@contextlib.contextmanager
def running_plugin(flags: list[str]) -> Iterator[TrustPlugin]:
    root = Path(tempfile.mkdtemp(prefix="csit-", dir="/tmp"))
    plugin = TrustPlugin(root, flags)
    try:
        yield plugin.start()
    finally:
        plugin.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def configured() -> Config:
    """config.toml with `team` (the test repository by another URL), saved before any start."""
    config = Config({"team": team_url()})
    config.save()
    return config


@pytest.fixture
def plugin(configured: Config) -> Iterator[TrustPlugin]:
    with running_plugin([]) as p:
        yield p


@pytest.fixture
def permissive(configured: Config) -> Iterator[TrustPlugin]:
    with running_plugin(["--allow-remote-urls"]) as p:
        yield p


@pytest.fixture
def versions(tmp_path: Path) -> dict[str, str]:
    return commit_two_versions(tmp_path)


@pytest.fixture
def attacker() -> Iterator[socket.socket]:
    """A listening TCP socket on loopback: the server a hostile volume names."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def hostile_urls(sock: socket.socket) -> list[str]:
    port = sock.getsockname()[1]
    return [f"haystack://user:secret@127.0.0.1:{port}",
            f"s3://bucket/prefix?endpoint_url=http://127.0.0.1:{port}"]


def assert_never_contacted(sock: socket.socket) -> None:
    """No connection is pending on `sock`: it is watched briefly, as a daemon started by a
    refused request would connect asynchronously."""
    readable, _, _ = select.select([sock], [], [], NO_CONNECTION_WAIT_S)
    assert readable == [], "the hostile remote was contacted"


def refusal(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_refused_naming_remotes(error: grpc.RpcError) -> None:
    assert error.code() == INVALID, error.details()
    details = error.details()
    assert "local" in details and "team" in details, details  # the configured remotes
    assert "secret" not in details and "user" not in details  # never the URL's credentials


def inline_publish(plugin: Plugin, target: Path, attributes: dict[str, str]
                   ) -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-eph-" + target.parent.name, target_path=str(target),
        volume_capability=capability(), volume_context=attributes)


def stage(plugin: Plugin, volume_id: str, attributes: dict[str, str], name: str) -> Path:
    staging = plugin.root / name
    staging.mkdir()
    plugin.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=capability(),
        volume_context=attributes), timeout=60)
    return staging


def test_an_inline_volume_naming_a_url_is_refused_before_anything_connects(
        plugin: TrustPlugin, versions: dict[str, str], attacker: socket.socket) -> None:
    for i, url in enumerate(hostile_urls(attacker)):
        for j, attributes in enumerate([
                {"remote": url, "dataset": "ds", "ref": "v1", EPHEMERAL: "true"},
                # with a commit: nothing needs resolving, the mount itself would connect
                {"remote": url, "dataset": "ds", "commit": versions["v1"], EPHEMERAL: "true"},
                # no staging path and no word from kubelet: inline all the same
                {"remote": url, "dataset": "ds", "commit": versions["v1"]}]):
            target = plugin.root / "pods" / f"p{i}{j}" / "vol"
            request = inline_publish(plugin, target, attributes)
            error = refusal(lambda r=request: plugin.node.NodePublishVolume(r, timeout=60))
            assert_refused_naming_remotes(error)
            assert not daemon_pids(target)
    assert_never_contacted(attacker)
    assert mounts_below(plugin.root) == []
    # A configured remote, by name, is what an inline volume may use.
    target = plugin.root / "pods" / "ok" / "vol"
    plugin.node.NodePublishVolume(inline_publish(
        plugin, target, {"remote": "team", "dataset": "ds", "ref": "v1", EPHEMERAL: "true"}),
        timeout=60)
    assert (target / "labels.csv").read_text() == "v1\n"
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id="csi-eph-ok", target_path=str(target)), timeout=60)
    assert mounts_below(plugin.root) == []


def test_the_mounter_refuses_a_url_sent_to_it_directly(
        plugin: TrustPlugin, versions: dict[str, str], attacker: socket.socket) -> None:
    path = plugin.root / "direct"
    for url in hostile_urls(attacker):
        for inline in (True, False):  # this mounter runs without --allow-remote-urls
            with pytest.raises(ConfigError, match="not a configured remote"):
                plugin.mounter.mount(str(path), remote=url, dataset="ds", ref="main",
                                     commit=versions["v1"], inline=inline)
        # A request that does not say whether it is inline counts as inline.
        line = json.dumps({"op": "mount", "path": str(path), "remote": url, "dataset": "ds",
                           "ref": "main", "commit": versions["v1"]}).encode() + b"\n"
        reply = json.loads(request_raw(plugin.mounter.socket_path, line, timeout=60))
        assert reply["ok"] is False and reply["error"]["type"] == "ConfigError"
        assert "secret" not in reply["error"]["message"]
    assert_never_contacted(attacker)
    assert not daemon_pids(path) and plugin.mounter.status()["mounts"] == {}
    assert "secret" not in plugin.mounter_log()


def test_a_static_pv_naming_a_configured_remote_or_its_url_mounts(
        plugin: TrustPlugin, versions: dict[str, str]) -> None:
    volumes = {"pv-url": {"remote": team_url(), "dataset": "ds", "ref": "v1"},
               "pv-name": {"remote": "team", "dataset": "ds", "ref": "v1"},
               # a volume context recorded by CreateVolume before names were recorded
               "pv-old": {"remote": local_repo_url(), "dataset": "ds", "ref": "v1",
                          "commit": versions["v1"]}}
    for volume_id, attributes in volumes.items():
        staging = stage(plugin, volume_id, attributes, "staging-" + volume_id)
        target = plugin.root / "pods" / volume_id / "vol"
        plugin.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=capability(), volume_context=attributes), timeout=60)
        assert (target / "labels.csv").read_text() == "v1\n"
        assert len(list((target / "train").iterdir())) == 20
    mounts = plugin.mounter.status()["mounts"]
    assert {m["remote_url"] for m in mounts.values()} == {team_url(), local_repo_url()}


def test_create_volume_records_the_remote_name(
        plugin: TrustPlugin, versions: dict[str, str], attacker: socket.socket) -> None:
    def create(name: str, **parameters: str) -> csi_pb2.Volume:
        return plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[capability()],
            parameters={"dataset": "ds", "ref": "v1", **parameters}), timeout=60).volume

    made = {"by-url": create("by-url", remote=team_url()), "by-name": create("by-name",
            remote="team"), "by-default": create("by-default")}
    assert {n: v.volume_context["remote"] for n, v in made.items()} == {
        "by-url": "team", "by-name": "team", "by-default": "local"}
    for i, url in enumerate(hostile_urls(attacker)):
        assert_refused_naming_remotes(refusal(lambda u=url, n=i: create(f"bad-{n}", remote=u)))
    assert_refused_naming_remotes(refusal(lambda: create("unknown", remote="nosuch")))
    assert_never_contacted(attacker)
    listed = plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest())
    assert sorted(e.volume.volume_id for e in listed.entries) == sorted(
        v.volume_id for v in made.values())  # nothing recorded for the refused ones


def test_allow_remote_urls_admits_a_pv_url_never_an_inline_one(
        permissive: TrustPlugin, versions: dict[str, str], attacker: socket.socket) -> None:
    plugin = permissive
    unconfigured = "file://" + local_repo_url()[len("file://"):] + "/"  # no remote has it
    staging = stage(plugin, "pv-any", {"remote": unconfigured, "dataset": "ds", "ref": "v1"},
                    "staging")
    assert (staging / "labels.csv").read_text() == "v1\n"
    volume = plugin.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
        name="sc-url", volume_capabilities=[capability()],
        parameters={"remote": unconfigured, "dataset": "ds"}), timeout=60).volume
    assert volume.volume_context["remote"] == unconfigured  # no name to record
    for i, url in enumerate([*hostile_urls(attacker), unconfigured]):
        target = plugin.root / "pods" / f"p{i}" / "vol"
        error = refusal(lambda t=target, u=url: plugin.node.NodePublishVolume(inline_publish(
            plugin, t, {"remote": u, "dataset": "ds", "commit": versions["v1"],
                        EPHEMERAL: "true"}), timeout=60))
        assert_refused_naming_remotes(error)
        with pytest.raises(ConfigError):  # the mounter holds the line on its own
            plugin.mounter.mount(str(target), remote=url, dataset="ds", ref="main",
                                 commit=versions["v1"], inline=True)
    assert_never_contacted(attacker)
    assert list(plugin.mounter.status()["mounts"]) == [str(staging)]


def test_a_repair_checks_the_recorded_remote_again(
        plugin: TrustPlugin, versions: dict[str, str]) -> None:
    staging = stage(plugin, "pv", {"remote": "team", "dataset": "ds", "ref": "v1"}, "staging")
    [daemon] = daemon_pids(staging)
    Config().save()  # the admin removes `team`: its URL is trusted no more
    with contextlib.suppress(ProcessLookupError):
        os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: "is not a configured remote" in plugin.mounter_log(), timeout=30,
             what="the mounter to refuse remounting the removed remote")
    assert not daemon_pids(staging)
