#!/usr/bin/env bash
# Regenerates the Python gRPC stubs of the CSI spec (proto/csi.proto) into csi/proto/:
# csi_pb2.py, csi_pb2.pyi and csi_pb2_grpc.py. The stubs are committed, so an install needs
# no protoc; tests/test_proto_current.py fails when they are stale. Re-run this after
# changing proto/csi.proto or the pinned grpcio-tools, and commit the result.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]     (OUT_DIR defaults to csi/proto)
# Needs grpcio-tools (the `test` extra pins the version the committed stubs came from);
# PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/csi/proto}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$out"

# -I proto: the file is registered as "csi.proto", as in the spec's own generated code.
# grpc_tools.protoc adds the include path of its bundled google/protobuf/*.proto itself.
"$PYTHON" -m grpc_tools.protoc -I"$root/proto" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  "$root/proto/csi.proto"

# The gRPC plugin imports the messages module as a top-level module; make it package-relative
# so that `from csi.proto import csi_pb2_grpc` works.
grpc_py="$out/csi_pb2_grpc.py"
sed -e 's/^import csi_pb2 as csi__pb2$/from . import csi_pb2 as csi__pb2/' "$grpc_py" >"$grpc_py.tmp"
mv "$grpc_py.tmp" "$grpc_py"
grep -q '^from \. import csi_pb2 as csi__pb2$' "$grpc_py" || {
  echo "gen_proto: the import fix did not apply to $grpc_py (grpcio-tools output changed?)" >&2
  exit 1
}
