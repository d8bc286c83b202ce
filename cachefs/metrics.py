"""Prometheus metrics of every cachefs daemon: registries, collectors, gRPC timing, an endpoint.

Every daemon keeps its metrics in its own `prometheus_client.CollectorRegistry` (two daemons in
one test process must not share counters) and serves it with `MetricsEndpoint` at
`http://ADDR/metrics` (`--metrics-listen ADDR`; the mount's option is `--metrics`). Names follow
Prometheus conventions: a `cachefs_<component>_` prefix, base units (`_bytes`, `_seconds`),
counters ending in `_total`, help text on every metric (docs/metrics.md lists them all).

- `StatsCollector` exposes a daemon's own figures (a dict it already computes for `stats` or
  `status`), read at each scrape: the names listed as counters become counters, the rest gauges.
- `GrpcMetrics` is a gRPC server interceptor: RPCs by method and status code
  (`..._rpcs_total`) and their latency by method and code (`..._rpc_seconds`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cachefs.errors import UsageError
from cachefs.httpserver import BaseHandler, ServiceHTTPServer, parse_listen

log = logging.getLogger("cachefs.metrics")

# No `*_created` sample beside every counter and histogram: twice the series for a timestamp
# that Prometheus does not need (process start shows in the counters' resets).
prometheus_client.disable_created_metrics()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0)


def new_registry() -> CollectorRegistry:
    return CollectorRegistry()


class StatsCollector(Collector):
    """Figures of `stats()` (name -> number), each exported as `prefix + name`: a counter
    (`_total`) where the name is in `counters`, else a gauge. Booleans become 0/1 gauges;
    anything not a number is left out. `labels`: constant labels on every sample.
    `help_text`: name -> help (default: the name in words)."""

    def __init__(self, prefix: str, stats: Callable[[], Mapping[str, object]],
                 counters: Iterable[str] = (), labels: Mapping[str, str] | None = None,
                 help_text: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self._stats = stats
        self.counters = frozenset(counters)
        self.labels = dict(labels or {})
        self.help_text = dict(help_text or {})

    def collect(self) -> Iterator[Metric]:
        try:
            figures = self._stats()
        except Exception:  # a scrape never fails because one source did
            log.exception("metrics: %s figures unavailable", self.prefix.rstrip("_"))
            return
        names = list(self.labels)
        values = list(self.labels.values())
        for name, value in sorted(figures.items()):
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, int | float):
                continue
            full = self.prefix + name
            text = self.help_text.get(name, name.replace("_", " "))
            family: CounterMetricFamily | GaugeMetricFamily
            if name in self.counters:
                family = CounterMetricFamily(full.removesuffix("_total"), text, labels=names)
            else:
                family = GaugeMetricFamily(full, text, labels=names)
            family.add_metric(values, value)
            yield family


def _code_name(context: grpc.ServicerContext, failed: bool = False) -> str:
    """The status code the servicer set; for a call that raised (`failed`) without setting
    one, UNKNOWN, as gRPC answers it."""
    code = context.code() if hasattr(context, "code") else None
    if code is None:
        return "UNKNOWN" if failed else "OK"
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    return "UNKNOWN" if failed and name == "OK" else name


class GrpcMetrics(grpc.ServerInterceptor):
    """RPCs by method and code, and their latency, for one gRPC server (`prefix`: the
    component's, e.g. ``cachefs_master``)."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.rpcs = Counter(f"{prefix}_rpcs", "RPCs answered, by method and status code",
                            ["method", "code"], registry=registry)
        self.latency = Histogram(f"{prefix}_rpc_seconds",
                                 "time to answer an RPC (a stream: to its end), by method and "
                                 "status code", ["method", "code"], registry=registry,
                                 buckets=LATENCY_BUCKETS)

    def _done(self, method: str, code: str, started: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.latency.labels(method, code).observe(time.perf_counter() - started)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = behavior(request, context)
                code = _code_name(context)
                return response
            except Exception:
                code = _code_name(context, failed=True)
                raise
            finally:
                self._done(method, code, started)

        return wrapped

    def _streaming(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = "UNKNOWN"
            try:
                yield from behavior(request, context)
                code = _code_name(context)
            except GeneratorExit:
                code = "CANCELLED"
                raise
            except Exception:
                code = _code_name(context, failed=True)
                raise
            finally:
                self._done(method, code, started)

        return wrapped


class _MetricsHandler(BaseHandler):
    server: MetricsEndpoint
    logger = log

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_body(404, b"only /metrics here\n", "text/plain; charset=utf-8")
            return
        self.send_body(200, generate_latest(self.server.registry), CONTENT_TYPE)

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.send_not_allowed("GET, HEAD")


class MetricsEndpoint(ServiceHTTPServer):
    """`registry` at http://ADDR/metrics, served from a thread (`start()`, `stop()`)."""

    thread_name = "cachefs-metrics"

    def __init__(self, listen: str, registry: CollectorRegistry,
                 option: str = "--metrics-listen") -> None:
        self.registry = registry
        super().__init__(parse_listen(listen, option), _MetricsHandler)


def serve_metrics(listen: str | None, registry: CollectorRegistry,
                  option: str = "--metrics-listen") -> MetricsEndpoint | None:
    """Start an endpoint where `listen` is given (logged), else None. UsageError (naming
    `option`) where the address cannot be listened on."""
    if not listen:
        return None
    try:
        endpoint = MetricsEndpoint(listen, registry, option).start()
    except OSError as e:
        raise UsageError(f"{option} {listen}: cannot listen there: {e.strerror or e}") from e
    log.info("metrics at %s/metrics", endpoint.url)
    return endpoint
