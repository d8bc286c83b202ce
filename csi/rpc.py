"""What every CSI service shares: its names, and the one mapping of cachefs errors to gRPC
status codes (`cachefs.grpc_errors`, shared with the storage server)."""

from __future__ import annotations

from cachefs.grpc_errors import RpcAbort, invalid, rpc

__all__ = ["DRIVER_NAME", "TOPOLOGY_KEY", "RpcAbort", "invalid", "rpc"]

DRIVER_NAME = "csi.cachefs.io"
TOPOLOGY_KEY = "topology.csi.cachefs.io/node"
