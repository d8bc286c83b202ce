#!/usr/bin/env bash
# Regenerates the Python gRPC stubs of the project's .proto files:
#   proto/csi.proto     (the CSI spec)         -> csi/proto/csi_pb2.py, .pyi, csi_pb2_grpc.py
#   proto/storage.proto (the storage server)   -> storage_server/proto/storage_pb2.py, .pyi,
#                                                 storage_pb2_grpc.py
#   proto/master.proto  (the raft master)      -> master/proto/master_pb2.py, .pyi,
#                                                 master_pb2_grpc.py
#   proto/peer.proto    (the peer tier)        -> cachefs/peer/proto/peer_pb2.py, .pyi,
#                                                 peer_pb2_grpc.py
# The stubs are committed, so an install needs no protoc; tests/test_proto_current.py fails
# when they are stale. Re-run this after changing a .proto file or the pinned grpcio-tools,
# and commit the result.
#
# Usage: scripts/gen_proto.sh [CSI_OUT_DIR [STORAGE_OUT_DIR [MASTER_OUT_DIR [PEER_OUT_DIR]]]]
#        (defaults: csi/proto, storage_server/proto, master/proto and cachefs/peer/proto)
# Needs grpcio-tools (the `test` extra pins the version the committed stubs came from);
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
csi_out="${1:-$root/csi/proto}"
storage_out="${2:-$root/storage_server/proto}"
master_out="${3:-$root/master/proto}"
peer_out="${4:-$root/cachefs/peer/proto}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

# generate NAME OUT_DIR: proto/NAME.proto -> OUT_DIR/NAME_pb2.py, NAME_pb2.pyi, NAME_pb2_grpc.py
generate() {
  local name="$1" out="$2"
  mkdir -p "$out"
  # -I proto: the file is registered as "NAME.proto", as in the CSI spec's own generated code.
  # grpc_tools.protoc adds the include path of its bundled google/protobuf/*.proto itself.
  "$PYTHON" -m grpc_tools.protoc -I"$root/proto" \
    --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "$root/proto/$name.proto"

  # The gRPC plugin imports the messages module as a top-level module; make it
  # package-relative so that `from csi.proto import csi_pb2_grpc` works.
  local grpc_py="$out/${name}_pb2_grpc.py" alias="${name}__pb2"
  sed -e "s/^import ${name}_pb2 as ${alias}\$/from . import ${name}_pb2 as ${alias}/" \
    "$grpc_py" >"$grpc_py.tmp"
  mv "$grpc_py.tmp" "$grpc_py"
  grep -q "^from \. import ${name}_pb2 as ${alias}\$" "$grpc_py" || {
    echo "gen_proto: the import fix did not apply to $grpc_py (grpcio-tools output changed?)" >&2
    exit 1
  }
}

generate csi "$csi_out"
generate storage "$storage_out"
generate master "$master_out"
generate peer "$peer_out"
