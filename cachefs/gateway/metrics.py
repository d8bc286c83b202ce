"""The gateway's Prometheus metrics: requests by operation and status, bytes, latency, tiers.

Kept in the gateway's own `CollectorRegistry` (not the process-wide default), so that two
gateways in one process (tests) do not share counters; served at `/-/metrics` on the gateway's
port (a path no dataset can take: dataset names start with a letter or digit).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cachefs.metrics import StatsCollector

# The tiers' figures (Catalog.stats) that count events: counters; the rest are levels (gauges).
TIER_COUNTERS = (
    "memory_hits", "ssd_hits", "ssd_misses", "ssd_evictions", "ssd_range_reads",
    "ssd_bytes_read", "ssd_direct_reads", "ssd_pack_prefetches", "ssd_pack_prefetches_skipped",
    "origin_requests", "origin_bytes", "origin_errors", "origin_timeouts", "corrupt_chunks",
    "peer_hits", "peer_bytes", "peer_errors", "peer_timeouts", "hedged_requests",
    "peer_corrupt", "peer_misses")


class GatewayMetrics:
    def __init__(self, tier_stats: Callable[[], dict[str, object]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cachefs_gateway_requests", "HTTP requests answered, by operation and status",
            ["operation", "status"], registry=self.registry)
        self.bytes_sent = Counter(
            "cachefs_gateway_sent_bytes", "bytes of object data sent to clients",
            registry=self.registry)
        self.latency = Histogram(
            "cachefs_gateway_request_seconds",
            "time to answer a request (to the end of its body), by operation",
            ["operation"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.in_flight = Gauge("cachefs_gateway_requests_in_flight",
                               "requests being answered now", registry=self.registry)
        self.auth_failures = Counter(
            "cachefs_gateway_auth_failures", "requests refused by authentication, by S3 code",
            ["code"], registry=self.registry)
        self.registry.register(StatsCollector("cachefs_gateway_", tier_stats,
                                              counters=TIER_COUNTERS))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
