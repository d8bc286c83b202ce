"""The gateway's Prometheus metrics: requests by operation and status, bytes, latency, tiers.

Kept in the gateway's own `CollectorRegistry` (not the process-wide default), so that two
gateways in one process (tests) do not share counters; served at `/-/metrics` on the gateway's
port (a path no dataset can take: dataset names start with a letter or digit).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cachefs.cache.tiered import TIER_FIGURES
from cachefs.metrics import StatsCollector


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
        self.registry.register(StatsCollector(
            "cachefs_gateway_", tier_stats,
            counters=[key for key, counter, _ in TIER_FIGURES if counter],
            help_text={key: text for key, _, text in TIER_FIGURES}))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
