"""Python gRPC stubs of the peer tier's API, package ``cachefs.peer.v1``.

``peer_pb2.py``, ``peer_pb2.pyi`` and ``peer_pb2_grpc.py`` are generated from ``proto/peer.proto``
by ``scripts/gen_proto.sh`` with the ``grpcio-tools`` version pinned in pyproject.toml's ``test``
extra, and committed: never edit them by hand (tests/test_proto_current.py fails when they are
stale).

    from cachefs.peer.proto import peer_pb2, peer_pb2_grpc
"""
