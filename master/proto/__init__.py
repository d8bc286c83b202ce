"""Python gRPC stubs of the raft master's API, package ``cachefs.master.v1``.

``master_pb2.py``, ``master_pb2.pyi`` and ``master_pb2_grpc.py`` are generated from
``proto/master.proto`` by ``scripts/gen_proto.sh`` with the ``grpcio-tools`` version pinned in
pyproject.toml's ``test`` extra, and committed: never edit them by hand
(tests/test_proto_current.py fails when they are stale).

    from master.proto import master_pb2, master_pb2_grpc
"""
