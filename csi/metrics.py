"""Prometheus metrics of the CSI plugin and of the CSI mounter (`--metrics-listen ADDR`).

Both build on `cachefs.metrics` (one registry per process, served at http://ADDR/metrics).

- The plugin (`cachefs csi`): every CSI RPC by method and status code with its latency
  (`GrpcMetrics`, prefix ``cachefs_csi``; CreateVolume and DeleteVolume counts are among them),
  and gauges read from its state at each scrape: volumes staged and published on the node,
  volumes the controller has created.
- The mounter (`cachefs csi mounter`): its socket requests by op and result with their latency,
  the mounts and binds it owns, and counters of what keeps them healthy: daemons started,
  repairs and failed repairs, health checks that found a mount down, stale binds bound again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram

from cachefs.metrics import (
    LATENCY_BUCKETS,
    GrpcMetrics,
    StatsCollector,
)
from csi.state import JsonStore

PLUGIN_PREFIX = "cachefs_csi"
MOUNTER_PREFIX = "cachefs_csi_mounter_"
# What a health check can find a recorded mount to be when it is not serving (csi.mounter.Probe).
DOWN_STATES = ("dead", "hung", "absent")
INVALID_OP = "invalid"  # the op label of a request that names no known op or cannot be read

PLUGIN_HELP = {
    "volumes_staged": "volumes staged on this node now (NodeStageVolume done, "
                      "NodeUnstageVolume not yet)",
    "volumes_published": "volumes published into at least one pod on this node now",
    "published_targets": "pod target paths volumes are published at on this node now",
    "controller_volumes": "volumes the controller has created and not deleted (its record)",
}

MOUNTER_HELP = {
    "mounts": "cachefs mounts the mounter owns now (recorded, serving or being repaired)",
    "binds": "read-only bind mounts into pod target paths the mounter owns now",
}


def node_figures(volumes: JsonStore) -> dict[str, int]:
    """The node service's gauges, from its record of volumes (never waiting on its lock)."""
    records = volumes.snapshot()
    return {
        "volumes_staged": sum(1 for r in records if r.get("staging")),
        "volumes_published": sum(1 for r in records if r.get("targets")),
        "published_targets": sum(len(r.get("targets") or ()) for r in records),
    }


def plugin_metrics(registry: CollectorRegistry, node_volumes: JsonStore | None,
                   controller_volumes: JsonStore | None) -> GrpcMetrics:
    """Register the plugin's metrics in `registry` (the stores of the services this mode runs)
    and return the interceptor for its gRPC server."""
    interceptor = GrpcMetrics(registry, PLUGIN_PREFIX)

    def figures() -> dict[str, int]:
        found: dict[str, int] = {}
        if node_volumes is not None:
            found.update(node_figures(node_volumes))
        if controller_volumes is not None:
            found["controller_volumes"] = len(controller_volumes.snapshot())
        return found

    registry.register(StatsCollector(PLUGIN_PREFIX + "_", figures, help_text=PLUGIN_HELP))
    return interceptor


class MounterMetrics:
    """The mounter's counters (incremented where the events happen, csi/mounter.py) and its
    gauges (`figures`: mounts and binds, read from its state at each scrape)."""

    def __init__(self, registry: CollectorRegistry, ops: list[str],
                 figures: Callable[[], Mapping[str, int]]) -> None:
        p = MOUNTER_PREFIX
        self.registry = registry
        self.requests = Counter(
            p + "requests", "requests answered on the mounter's socket, by op ('invalid': no "
            "known op, or unreadable) and result ('ok', or the cachefs error type reported)",
            ["op", "result"], registry=registry)
        self.request_seconds = Histogram(
            p + "request_seconds", "time to answer a request on the mounter's socket, by op",
            ["op"], registry=registry, buckets=LATENCY_BUCKETS)
        self.mounts_started = Counter(
            p + "mounts_started", "mount daemons started (new mounts and repairs)",
            registry=registry)
        self.repairs = Counter(
            p + "repairs", "recorded mounts started again after being found down, by what "
            "they were: dead (daemon gone), hung (no answer in --hang-timeout), absent",
            ["state"], registry=registry)
        self.repair_failures = Counter(
            p + "repair_failures", "repairs of a recorded mount that failed (retried at the next "
            "health round), by what the mount was: dead, hung, absent",
            ["state"], registry=registry)
        self.health_rounds = Counter(
            p + "health_rounds", "health rounds completed (one at start, then every "
            "--health-interval seconds)", registry=registry)
        self.health_check_failures = Counter(
            p + "health_check_failures", "health checks that found a recorded mount not "
            "serving, by what it was: dead (daemon gone), hung (no answer in --hang-timeout), "
            "absent (no longer mounted)", ["state"], registry=registry)
        self.rebinds = Counter(
            p + "rebinds", "stale bind mounts of pod target paths bound again (after their "
            "source mount was repaired, or lost)", registry=registry)
        self.rebind_failures = Counter(
            p + "rebind_failures", "attempts to bind a stale bind mount again that failed "
            "(retried at the next health round)", registry=registry)
        # Every label value known in advance starts at 0, so a first event shows as an
        # increase (rate() and increase() see nothing before a series exists).
        for op in ops:
            self.requests.labels(op, "ok")
        for state in DOWN_STATES:
            self.repairs.labels(state)
            self.repair_failures.labels(state)
            self.health_check_failures.labels(state)
        registry.register(StatsCollector(p, figures, help_text=MOUNTER_HELP))

    def request(self, op: str, result: str, seconds: float) -> None:
        self.requests.labels(op, result).inc()
        self.request_seconds.labels(op).observe(seconds)

