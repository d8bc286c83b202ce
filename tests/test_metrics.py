"""The shared metrics ground (cachefs/metrics.py): figures as counters and gauges, gRPC RPCs by
method and code over a real loopback gRPC server, and the /metrics endpoint, parsed with
prometheus_client's own parser."""

from __future__ import annotations

import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachefs.metrics import GrpcMetrics, StatsCollector, new_registry, serve_metrics
from tests.servers import free_port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def test_stats_become_counters_and_gauges_served_at_metrics() -> None:
    figures = {"chunks_served": 3, "cache_bytes": 1024, "draining": True, "name": "x"}
    registry = new_registry()
    registry.register(StatsCollector("cachefs_test_", lambda: figures,
                                     counters={"chunks_served"}, labels={"node": "n1"}))
    endpoint = serve_metrics(f"127.0.0.1:{free_port()}", registry)
    assert endpoint is not None
    try:
        got = samples(scrape(endpoint.url + "/metrics"))
        assert got[("cachefs_test_chunks_served_total", (("node", "n1"),))] == 3
        assert got[("cachefs_test_cache_bytes", (("node", "n1"),))] == 1024
        assert got[("cachefs_test_draining", (("node", "n1"),))] == 1
        assert not any(name.startswith("cachefs_test_name") for name, _ in got)
        figures["chunks_served"] = 5  # read at each scrape
        assert samples(scrape(endpoint.url + "/metrics"))[
            ("cachefs_test_chunks_served_total", (("node", "n1"),))] == 5
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(endpoint.url + "/other", timeout=10)
        assert caught.value.code == 404
        caught.value.close()
    finally:
        endpoint.stop()


def test_grpc_rpcs_counted_by_method_and_code() -> None:
    registry = new_registry()
    interceptor = GrpcMetrics(registry, "cachefs_test")

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        if request == b"boom":
            raise RuntimeError("unexpected")
        return request

    def count(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for i in range(int(request)):
            yield str(i).encode()

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count)})
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[interceptor])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo_call = channel.unary_unary("/test.Echo/Echo")
            count_call = channel.unary_stream("/test.Echo/Count")
            assert echo_call(b"hi", timeout=10) == b"hi"
            assert echo_call(b"hi", timeout=10) == b"hi"
            for request, code in ((b"bad", grpc.StatusCode.INVALID_ARGUMENT),
                                  (b"boom", grpc.StatusCode.UNKNOWN)):
                with pytest.raises(grpc.RpcError) as caught:
                    echo_call(request, timeout=10)
                assert caught.value.code() == code
            assert list(count_call(b"3", timeout=10)) == [b"0", b"1", b"2"]
    finally:
        server.stop(None)
    from prometheus_client import generate_latest

    got = samples(generate_latest(registry).decode())
    assert got[("cachefs_test_rpcs_total", (("code", "OK"), ("method", "Echo")))] == 2
    assert got[("cachefs_test_rpcs_total",
                (("code", "INVALID_ARGUMENT"), ("method", "Echo")))] == 1
    assert got[("cachefs_test_rpcs_total", (("code", "UNKNOWN"), ("method", "Echo")))] == 1
    assert got[("cachefs_test_rpcs_total", (("code", "OK"), ("method", "Count")))] == 1
    assert got[("cachefs_test_rpc_seconds_count", (("code", "OK"), ("method", "Echo")))] == 2
    assert got[("cachefs_test_rpc_seconds_count",
                (("code", "INVALID_ARGUMENT"), ("method", "Echo")))] == 1
