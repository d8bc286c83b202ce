"""The raft master of a haystack:// cluster (docs/design.md, "Master").

- `master.state`: the replicated state (pysyncobj `@replicated` methods) and its raft node;
- `master.placement`: the replica-assignment algorithm (pure functions);
- `master.liveness`: the leader's soft state (heartbeats, needle counts, lag, repair tasks);
- `master.server`: the gRPC service and `serve` (`cachefs master serve`);
- `master.client`: `MasterClient`, used by the CLI, the storage agent and the haystack remote.
"""
