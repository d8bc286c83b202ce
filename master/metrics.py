"""The raft master's Prometheus metrics (`cachefs master serve --metrics-listen HOST:PORT`).

One `CollectorRegistry` per member (cachefs.metrics): RPCs by method and code and their latency
(`GrpcMetrics`, refused calls included), and at each scrape this member's own view of the raft
group, the object directory, the storage servers, volumes and nodes, taken from the figures its
`status` answer is built from (`Master.local_status`: without the read barrier `status` commits
first, so a scrape never writes to the raft log). Liveness (servers and nodes up or down) is the
leader's soft state: a follower reports those as "unknown".
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachefs.metrics import GrpcMetrics, StatsCollector, new_registry


class RaftView(Protocol):
    def log_entries(self) -> int: ...
    def disk_bytes(self) -> tuple[int, int]: ...


class Master(Protocol):
    """What the metrics read of a member (master.server.Master; a Protocol, so that this
    module does not import the server that imports it)."""

    @property
    def raft(self) -> RaftView: ...
    def local_status(self, error: str | None = None) -> dict[str, Any]: ...
    def counted(self) -> dict[str, int]: ...

log = logging.getLogger("cachefs.master.metrics")

PREFIX = "cachefs_master_"

# The flat figures (`figures`), exported by `StatsCollector`; every one is a gauge.
HELP = {
    "raft_term": "raft term this member is in",
    "raft_is_leader": "1 if this member is the raft leader, else 0",
    "raft_has_quorum": "1 while this member's raft counts a majority of the group as "
                       "reachable, else 0",
    "raft_commit_index": "index of the last raft log entry this member knows committed",
    "raft_last_applied": "index of the last raft log entry applied to this member's state",
    "raft_log_entries": "entries in this member's raft log (since its last log compaction)",
    "raft_journal_bytes": "size of this member's raft journal file on disk (grown by "
                          "doubling, so at least the bytes of its entries)",
    "raft_dump_bytes": "size of this member's last full dump of the state on disk (written "
                       "by log compaction; 0 before the first)",
    "raft_members": "members of the raft group, this one included",
    "raft_members_connected": "members of the raft group this one's raft is connected to, "
                              "itself included",
    "directory_entries": "entries (names) in the object directory",
    "volumes": "logical volumes of the cluster (0 until the first leader configured it)",
    "replicas": "replicas each volume should have (R)",
    "placement_epoch": "placement epoch: raised whenever a replica set or a replica's "
                       "address changes",
    "volumes_under_replicated": "volumes with fewer replicas up than R (on a follower: with "
                                "fewer than R replicas placed)",
    "volumes_lagging": "volumes one of whose replicas lacks needles the others have "
                       "(known to the leader only)",
}
SERVERS_HELP = ("storage servers registered with the cluster, by state: up, down (no heartbeat "
                "within --down-after), dead (declared dead), unknown (this member does not "
                "lead, so it has no liveness)")
NODES_HELP = ("cachefs nodes registered, by state: up (heartbeat within --down-after), down, "
              "unknown (this member does not lead, so it has no liveness)")
LEADER_HELP = ("the raft leader this member knows and reaches, as its --id in the label "
               "leader_id (value 1; no sample when it knows none)")
CAS_HELP = ("create-if-absent directory puts this member answered (the compare-and-swap refs "
            "are built on), by result: created, or refused because the name exists")
SERVER_STATES = ("up", "down", "dead", "unknown")
NODE_STATES = ("up", "down", "unknown")


def figures(master: Master, doc: dict[str, Any]) -> dict[str, int]:
    """The flat figures of `HELP` from a `local_status` document and the raft node."""
    journal_bytes, dump_bytes = master.raft.disk_bytes()
    members = doc["members"]
    return {
        "raft_term": doc["term"],
        "raft_is_leader": int(any(m["self"] and m["role"] == "leader" for m in members)),
        "raft_has_quorum": int(doc["has_quorum"]),
        "raft_commit_index": doc["commit_index"],
        "raft_last_applied": doc["last_applied"],
        "raft_log_entries": master.raft.log_entries(),
        "raft_journal_bytes": journal_bytes,
        "raft_dump_bytes": dump_bytes,
        "raft_members": len(members),
        "raft_members_connected": sum(1 for m in members if m["connected"]),
        "directory_entries": doc["directory_entries"],
        "volumes": doc["volume_count"],
        "replicas": doc["replicas"],
        "placement_epoch": doc["epoch"],
        "volumes_under_replicated": len(doc["under_replicated"]),
        "volumes_lagging": len(doc["lagging"]),
    }


def by_state(items: list[dict[str, Any]], states: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(states, 0)
    for item in items:
        counts[item["state"]] = counts.get(item["state"], 0) + 1
    return counts


class MasterCollector(Collector):
    """Everything but the RPCs, from one `local_status` document per scrape."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def collect(self) -> Iterator[Metric]:
        try:
            doc = self.master.local_status()
            flat = figures(self.master, doc)
        except Exception:  # a scrape never fails because one source did
            log.exception("metrics: the master's figures are unavailable")
            return
        yield from StatsCollector(PREFIX, lambda: flat, help_text=HELP).collect()
        leader = GaugeMetricFamily(PREFIX + "raft_leader_info", LEADER_HELP,
                                   labels=["leader_id"])
        if doc["leader_id"] is not None:
            leader.add_metric([doc["leader_id"]], 1)
        yield leader
        for name, text, items, states in (
                ("storage_servers", SERVERS_HELP, doc["storage"], SERVER_STATES),
                ("nodes", NODES_HELP, doc["nodes"], NODE_STATES)):
            family = GaugeMetricFamily(PREFIX + name, text, labels=["state"])
            for state, count in by_state(items, states).items():
                family.add_metric([state], count)
            yield family
        counts = self.master.counted()
        cas = CounterMetricFamily(PREFIX + "directory_conditional_puts", CAS_HELP,
                                  labels=["result"])
        for result in ("created", "refused"):
            cas.add_metric([result], counts.get(f"conditional_puts_{result}", 0))
        yield cas


class MasterMetrics:
    """A member's registry: its RPCs (`grpc`, an observer for its gRPC server) and its
    figures."""

    def __init__(self, master: Master) -> None:
        self.registry = new_registry()
        self.grpc = GrpcMetrics(self.registry, PREFIX.rstrip("_"))
        self.registry.register(MasterCollector(master))
