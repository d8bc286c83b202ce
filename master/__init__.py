"""The raft master of a haystack:// cluster (docs/design.md, "Master"; data directory: FORMAT.md).

- `master.state`: the replicated state (pysyncobj `@replicated` methods) and its raft node;
- `master.journal`: pysyncobj's raft journal, synced before an entry is acknowledged;
- `master.batching`: group commit of directory operations into one raft command;
- `master.placement`: the replica-assignment algorithm (pure functions);
- `master.liveness`: the leader's soft state (heartbeats, needle counts, lag, repair tasks);
- `master.server`: the gRPC service and `serve` (`cachefs master serve`);
- `master.client`: `MasterClient`, used by the CLI, the storage agent and the haystack remote;
- `master.cluster`: `cachefs cluster up|down`, a whole cluster on loopback.
"""
