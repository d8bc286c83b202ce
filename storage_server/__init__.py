"""storage_server: the Haystack-style volume store of a `haystack://` cluster.

`store.VolumeStore` is the engine one storage server runs over its data directory: logical
volumes (`vid = key mod N`) of append-only segment files of needles (`needle.py`, byte layout in
`FORMAT.md`), an LMDB needle index (`index.py`), group commit, crash recovery and compaction
(`volume.py`). `server.py` serves it over gRPC (proto/storage.proto), `client.py` calls it and
`repair.py` copies missing needles between replicas.
"""
