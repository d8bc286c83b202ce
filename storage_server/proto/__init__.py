"""Python gRPC stubs of the storage server's API, package ``cachefs.storage.v1``.

``storage_pb2.py``, ``storage_pb2.pyi`` and ``storage_pb2_grpc.py`` are generated from
``proto/storage.proto`` by ``scripts/gen_proto.sh`` with the ``grpcio-tools`` version pinned in
pyproject.toml's ``test`` extra, and committed: never edit them by hand
(tests/test_proto_current.py fails when they are stale).

    from storage_server.proto import storage_pb2, storage_pb2_grpc
"""
