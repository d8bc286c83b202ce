"""The CSI Controller service: volumes are dataset versions, created by resolving a ref.

A volume is named by a StorageClass's parameters: `remote` (a configured remote's name;
default: the plugin's --default-remote, else the configured default), `dataset`, and `ref`
(default `main`). A URL is accepted only if it equals a configured remote's URL, or with the
plugin's --allow-remote-urls (`Config.remote_for_volume`: the volume's mount carries the node's
credentials, so a volume must not choose where they go). CreateVolume records the remote's name
and resolves the ref once, to a commit, keeping both in the volume context, so every pod using
the volume sees the same version. Creation is idempotent by name: the same name with a
compatible request returns the same volume; with an incompatible capacity it is ALREADY_EXISTS.
Datasets are immutable, so every volume is read-only whatever the access mode: reader modes are
what it is for, writer modes are accepted and mounted read-only (documented in the README).
"""

from __future__ import annotations

import grpc
from blake3 import blake3

from cachefs.config import Config
from cachefs.dataset.repo import Repository
from cachefs.names import check_name
from cachefs.remotes.registry import open_remote_url
from csi.proto import csi_pb2, csi_pb2_grpc
from csi.rpc import RpcAbort, invalid, rpc
from csi.state import JsonStore
from csi.volume_pins import pin_volume, unpin_volume

PARAMETERS = {"remote", "dataset", "ref"}


def check_capabilities(capabilities: list[csi_pb2.VolumeCapability]) -> None:
    if not capabilities:
        raise invalid("volume capabilities are required")
    for capability in capabilities:
        check_capability(capability)


def check_capability(capability: csi_pb2.VolumeCapability) -> None:
    if not capability.HasField("mount") and not capability.HasField("block"):
        raise invalid("a volume capability needs an access type (mount)")
    if capability.HasField("block"):
        raise invalid("block volumes are not supported: cachefs volumes are file systems")
    if capability.access_mode.mode == csi_pb2.VolumeCapability.AccessMode.UNKNOWN:
        raise invalid("a volume capability needs an access mode")


def volume_remote(value: str | None, default_remote: str | None,
                  allow_urls: bool) -> tuple[str, str]:
    """(what a volume context records: the configured name, or an allowed URL; the URL).

    Refused with ConfigError (INVALID_ARGUMENT) before anything connects: see
    `Config.remote_for_volume`. The default remote goes through the same rule.
    """
    config = Config.load()
    name, url = config.remote_for_volume(value or default_remote or config.default_remote,
                                         allow_urls=allow_urls)
    return name or url, url


def resolve_volume(parameters: dict[str, str], default_remote: str | None,
                   allow_urls: bool = False) -> dict[str, str]:
    """remote (its configured name), dataset, ref and the commit the ref names now."""
    unknown = set(parameters) - PARAMETERS - {p for p in parameters if p.startswith("csi.storage")}
    if unknown:
        raise invalid(f"unknown parameters {sorted(unknown)}; known: {sorted(PARAMETERS)}")
    if "dataset" not in parameters:
        raise invalid("parameter 'dataset' is required")
    dataset = check_name(parameters["dataset"], "dataset name")
    ref = parameters.get("ref") or "main"
    remote, remote_url = volume_remote(parameters.get("remote"), default_remote, allow_urls)
    repo = Repository(open_remote_url(remote_url))
    try:
        commit_name = repo.resolve(dataset, ref).commit
        commit = repo.get_commit(commit_name)
    finally:
        repo.close()
    return {"remote": remote, "dataset": dataset, "ref": ref, "commit": commit_name,
            "files": str(commit.files), "bytes": str(commit.bytes)}


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, volumes: JsonStore, default_remote: str | None,
                 allow_remote_urls: bool = False) -> None:
        self.volumes = volumes
        self.default_remote = default_remote
        # StorageClass parameters are the cluster admin's: URLs only if the admin allows them.
        self.allow_remote_urls = allow_remote_urls

    @staticmethod
    def _volume(record: dict) -> csi_pb2.Volume:
        return csi_pb2.Volume(volume_id=record["volume_id"],
                              capacity_bytes=record["capacity_bytes"],
                              volume_context=record["context"])

    @rpc
    def CreateVolume(self, request, context):  # type: ignore[no-untyped-def]
        if not request.name:
            raise invalid("volume name is required")
        check_capabilities(list(request.volume_capabilities))
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0 or (limit and required > limit):
            raise RpcAbort(grpc.StatusCode.OUT_OF_RANGE,
                           f"bad capacity range: required {required} > limit {limit}")
        if request.HasField("volume_content_source"):
            raise invalid("volume content sources (clones, snapshots) are not supported")
        with self.volumes.lock:
            existing = self.volumes.get(request.name)
            params = dict(request.parameters)
            if existing is not None:
                if existing["parameters"] != params or not (
                        existing["capacity_bytes"] >= required
                        and (not limit or existing["capacity_bytes"] <= limit)):
                    raise RpcAbort(grpc.StatusCode.ALREADY_EXISTS,
                                   f"volume {request.name!r} exists with other parameters or "
                                   "an incompatible capacity")
                return csi_pb2.CreateVolumeResponse(volume=self._volume(existing))
            volume_context = resolve_volume(params, self.default_remote,
                                            self.allow_remote_urls)
            record = {
                "volume_id": "cachefs-" + blake3(request.name.encode()).hexdigest()[:24],
                "name": request.name,
                "parameters": params,
                # The dataset is read-only: capacity is what was asked (0: unknown).
                "capacity_bytes": required,
                "context": volume_context,
            }
            pin_volume(record["volume_id"], volume_context)  # gc keeps it until DeleteVolume
            self.volumes.put(request.name, record)
        return csi_pb2.CreateVolumeResponse(volume=self._volume(record))

    def _by_id(self, volume_id: str) -> dict | None:
        return next((r for _, r in self.volumes.items() if r["volume_id"] == volume_id), None)

    @rpc
    def DeleteVolume(self, request, context):  # type: ignore[no-untyped-def]
        if not request.volume_id:
            raise invalid("volume id is required")
        with self.volumes.lock:
            record = self._by_id(request.volume_id)
            if record is not None:
                unpin_volume(record["volume_id"], record["context"])
                self.volumes.delete(record["name"])
        return csi_pb2.DeleteVolumeResponse()

    @rpc
    def ValidateVolumeCapabilities(self, request, context):  # type: ignore[no-untyped-def]
        if not request.volume_id:
            raise invalid("volume id is required")
        if not request.volume_capabilities:
            raise invalid("volume capabilities are required")
        if self._by_id(request.volume_id) is None:
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"no volume {request.volume_id!r}")
        for capability in request.volume_capabilities:
            if not capability.HasField("mount"):
                return csi_pb2.ValidateVolumeCapabilitiesResponse(
                    message="only mount volumes are supported (read-only file systems)")
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @rpc
    def ListVolumes(self, request, context):  # type: ignore[no-untyped-def]
        records = [r for _, r in self.volumes.items()]
        start = 0
        if request.starting_token:
            if not request.starting_token.isdigit() or int(request.starting_token) > len(records):
                raise RpcAbort(grpc.StatusCode.ABORTED,
                               f"invalid starting_token {request.starting_token!r}")
            start = int(request.starting_token)
        if request.max_entries < 0:
            raise invalid("max_entries must not be negative")
        end = len(records) if not request.max_entries else start + request.max_entries
        page = records[start:end]
        next_token = str(end) if end < len(records) else ""
        return csi_pb2.ListVolumesResponse(
            entries=[csi_pb2.ListVolumesResponse.Entry(volume=self._volume(r)) for r in page],
            next_token=next_token)

    @rpc
    def ControllerGetCapabilities(self, request, context):  # type: ignore[no-untyped-def]
        rpc_type = csi_pb2.ControllerServiceCapability.RPC
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[
            csi_pb2.ControllerServiceCapability(rpc=rpc_type(type=t))
            for t in (rpc_type.CREATE_DELETE_VOLUME, rpc_type.LIST_VOLUMES)])
