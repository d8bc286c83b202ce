"""storage_server: the Haystack-style volume store of a `haystack://` cluster, and its gRPC server.

`store.VolumeStore` is the engine one storage server runs over its data directory: logical
volumes (`vid = key mod N`) of append-only segment files of needles (`needle.py`; the compiled
read in `_needle.pyx`), an LMDB needle index (`index.py`), O_DIRECT appends (`direct.py`), group
commit, crash recovery and compaction (`volume.py`). Byte layouts: `FORMAT.md`. `server.py`
serves it over gRPC (proto/storage.proto, bulk messages through `wire.py`), `client.py` calls one
server or writes and reads a volume's replicas, `repair.py` copies missing needles between
replicas, and `agent.py` registers a server with the masters and runs the repairs they assign.
"""
