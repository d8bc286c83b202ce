"""The CSI Node service: stage one cachefs mount per volume, bind it read-only into each pod.

NodeStageVolume asks the mounter for one FUSE mount of the volume's commit at the staging path
(shared by every pod on the node); NodePublishVolume bind-mounts it read-only at the pod's
target path (created here). An inline ephemeral volume has no staging step: it is mounted at
publish, straight at the target. A static PersistentVolume names a ref, not a commit: it is
resolved at stage time.

What a volume may name as its `remote` is checked here first (INVALID_ARGUMENT, before anything
connects) and again by the mounter, by one rule (`Config.remote_for_volume`): a configured
remote's name or URL; another URL only with --allow-remote-urls, and never for an inline
ephemeral volume, whose attributes anyone who may create a pod writes. A publish counts as inline
when kubelet says so (`csi.storage.k8s.io/ephemeral`, sent because the CSIDriver sets
podInfoOnMount) or when it has no staging path (kubelet stages every PersistentVolume first).
Unpublish and unstage of something already gone succeed, and leave
nothing mounted or running. The FUSE mounts belong to the mounter process, so restarting this
plugin never touches them.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from csi.controller import check_capability, resolve_volume, volume_remote
from csi.mounter import MounterClient
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.rpc import TOPOLOGY_KEY, RpcAbort, invalid, rpc
from csi.state import JsonStore

EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"


def _require(value: str, what: str) -> str:
    if not value:
        raise invalid(f"{what} is required")
    return value


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, mounter: MounterClient, volumes: JsonStore,
                 default_remote: str | None, cache_dir: str | None = None,
                 allow_remote_urls: bool = False) -> None:
        self.node_id = node_id
        self.mounter = mounter
        self.volumes = volumes  # volume id -> {"context", "staging", "targets", "ephemeral"}
        self.default_remote = default_remote
        self.cache_dir = cache_dir
        self.allow_remote_urls = allow_remote_urls  # for PersistentVolumes only

    def _context(self, volume_context: dict[str, str], inline: bool) -> dict[str, str]:
        """The volume context with a commit: CreateVolume's, or the ref resolved now; its
        remote checked by the trust rule (ConfigError: INVALID_ARGUMENT) before anything
        connects, and recorded by its configured name where it has one."""
        allow = self.allow_remote_urls and not inline
        context = {k: v for k, v in volume_context.items() if not k.startswith("csi.storage")}
        if context.get("commit") and context.get("remote"):
            context["remote"] = volume_remote(context["remote"], self.default_remote, allow)[0]
            return context
        params = {k: context[k] for k in ("remote", "dataset", "ref") if context.get(k)}
        return resolve_volume(params, self.default_remote, allow)

    def _mount(self, path: str, context: dict[str, str], inline: bool) -> None:
        self.mounter.mount(path, remote=context["remote"], dataset=context["dataset"],
                           ref=context.get("ref", "main"), commit=context["commit"],
                           cache_dir=self.cache_dir, inline=inline)

    @rpc
    def NodeStageVolume(self, request, context):  # type: ignore[no-untyped-def]
        volume_id = _require(request.volume_id, "volume id")
        staging = _require(request.staging_target_path, "staging target path")
        if not request.HasField("volume_capability"):
            raise invalid("volume capability is required")
        check_capability(request.volume_capability)
        with self.volumes.lock:
            record = self.volumes.get(volume_id) or {"targets": [], "ephemeral": False}
            if record.get("staging") and record["staging"] != staging:
                raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                               f"volume {volume_id} is staged at {record['staging']}")
            # Staged already (a retry): keep the commit it was staged with.
            volume = (record["context"] if record.get("staging") == staging
                      else self._context(dict(request.volume_context), inline=False))
            self._mount(staging, volume, inline=False)
            record.update(staging=staging, context=volume)
            self.volumes.put(volume_id, record)
        return csi_pb2.NodeStageVolumeResponse()

    @rpc
    def NodeUnstageVolume(self, request, context):  # type: ignore[no-untyped-def]
        volume_id = _require(request.volume_id, "volume id")
        staging = _require(request.staging_target_path, "staging target path")
        with self.volumes.lock:
            self.mounter.unmount(staging)
            record = self.volumes.get(volume_id)
            if record is not None:
                record["staging"] = None
                if record["targets"]:
                    self.volumes.put(volume_id, record)
                else:
                    self.volumes.delete(volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    @rpc
    def NodePublishVolume(self, request, context):  # type: ignore[no-untyped-def]
        volume_id = _require(request.volume_id, "volume id")
        target = _require(request.target_path, "target path")
        if not request.HasField("volume_capability"):
            raise invalid("volume capability is required")
        check_capability(request.volume_capability)
        # Inline by kubelet's word, or by shape: a PersistentVolume is always staged first.
        ephemeral = (request.volume_context.get(EPHEMERAL_KEY) == "true"
                     or not request.staging_target_path)
        with self.volumes.lock:
            record = self.volumes.get(volume_id) or {"targets": [], "staging": None,
                                                     "ephemeral": ephemeral}
            if ephemeral:
                volume = self._context(dict(request.volume_context), inline=True)
                self._mount(target, volume, inline=True)
                record["context"] = volume
            else:
                staging = _require(request.staging_target_path, "staging target path")
                if record.get("staging") != staging:
                    raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"volume {volume_id} is not staged at {staging}")
                self.mounter.bind(staging, target)
            if target not in record["targets"]:
                record["targets"].append(target)
            self.volumes.put(volume_id, record)
        return csi_pb2.NodePublishVolumeResponse()

    @rpc
    def NodeUnpublishVolume(self, request, context):  # type: ignore[no-untyped-def]
        volume_id = _require(request.volume_id, "volume id")
        target = _require(request.target_path, "target path")
        with self.volumes.lock:
            record = self.volumes.get(volume_id)
            if record is not None and record.get("ephemeral"):
                self.mounter.unmount(target)
            else:
                self.mounter.unbind(target)
            if os.path.isdir(target):
                os.rmdir(target)
            if record is not None and target in record["targets"]:
                record["targets"].remove(target)
                if not record["targets"] and not record.get("staging"):
                    self.volumes.delete(volume_id)
                else:
                    self.volumes.put(volume_id, record)
        return csi_pb2.NodeUnpublishVolumeResponse()

    @rpc
    def NodeGetVolumeStats(self, request, context):  # type: ignore[no-untyped-def]
        volume_id = _require(request.volume_id, "volume id")
        path = _require(request.volume_path, "volume path")
        record = self.volumes.get(volume_id)
        if record is None:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"volume {volume_id} is not on this node")
        if path not in (record.get("staging"), *record["targets"]) or not Path(path).exists():
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"{path} is not a path of {volume_id}")
        volume = record.get("context") or {}
        size, files = int(volume.get("bytes", 0)), int(volume.get("files", 0))
        unit = csi_pb2.VolumeUsage
        return csi_pb2.NodeGetVolumeStatsResponse(usage=[
            unit(total=size, used=size, available=0, unit=unit.BYTES),
            unit(total=files, used=files, available=0, unit=unit.INODES)])

    @rpc
    def NodeGetCapabilities(self, request, context):  # type: ignore[no-untyped-def]
        rpc_type = csi_pb2.NodeServiceCapability.RPC
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=rpc_type(type=t))
            for t in (rpc_type.STAGE_UNSTAGE_VOLUME, rpc_type.GET_VOLUME_STATS)])

    @rpc
    def NodeGetInfo(self, request, context):  # type: ignore[no-untyped-def]
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self.node_id}))
