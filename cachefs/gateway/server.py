"""Running the gateway: its tiers, its authentication, uvicorn on uvloop, a graceful SIGTERM.

The HTTP server is uvicorn with its httptools (llhttp) parser on uvloop: measured here with a
trivial ASGI app answering 110 KB bodies to wrk (32 connections), 25,200 requests/s against
8,100 for uvicorn's pure-Python h11 parser on asyncio and 2,600 for hypercorn on trio, so only
this pairing leaves room for the gateway's own work under nginx's 14,700 (benchmarks.gateway).
The cache tiers are trio: they run as a guest on the same loop (cachefs.gateway.bridge).

Bounds on what a client sends: a request line and headers over `MAX_HEAD_BYTES`, or more than
`MAX_HEADERS` header fields, end the connection with a 400 (`BoundedHttpToolsProtocol`; llhttp
alone has no limit); idle keep-alive connections are closed after `KEEP_ALIVE_S`; past
`MAX_CONNECTIONS` connections or requests in flight, requests get a 503. SIGTERM and SIGINT
stop accepting and let requests in flight finish for up to `GRACEFUL_S`.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cachefs.cache.disk import DiskCache
from cachefs.cache.memory import MemoryCache
from cachefs.cache.peer import PeerTier
from cachefs.cache.tiered import object_is_intact
from cachefs.dataset.repo import Repository
from cachefs.errors import UsageError
from cachefs.gateway.app import GatewayApp
from cachefs.gateway.auth import Authenticator
from cachefs.gateway.bridge import TrioGuest
from cachefs.gateway.catalog import DEFAULT_REF_TTL, Catalog
from cachefs.gateway.metrics import GatewayMetrics
from cachefs.metrics import serve_metrics

log = logging.getLogger("cachefs.gateway.server")

MAX_HEAD_BYTES = 16 * 1024  # request line + headers
MAX_HEADERS = 100
KEEP_ALIVE_S = 75
GRACEFUL_S = 10
MAX_CONNECTIONS = 4096


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on each request's head."""

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._header_count = 0
        super().on_message_begin()

    def _count(self, nbytes: int) -> None:
        self._head_bytes += nbytes
        if self._head_bytes > MAX_HEAD_BYTES:
            # Raised inside llhttp's callback: uvicorn answers 400 and closes the connection.
            raise httptools.HttpParserError("request head too large")

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            raise httptools.HttpParserError("too many header fields")
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)


class _Server(uvicorn.Server):
    """uvicorn's server, for which a SIGTERM or SIGINT is a stop asked for: it ends with exit
    status 0 once the requests in flight are done, instead of re-raising the signal."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: do not wait
            return
        if not self.should_exit:
            log.info("signal %d: finishing the requests in flight (up to %d s)", sig, GRACEFUL_S)
        self.should_exit = True


@dataclass(frozen=True)
class GatewaySettings:
    host: str
    port: int
    remote_url: str
    remote_name: str | None
    cache_dir: Path
    cache_size: int | None
    memory_cache: int
    ref_ttl: float = DEFAULT_REF_TTL
    origin_timeout: float = 30.0
    cache_peers: list[str] | None = None
    cache_peers_file: str | None = None
    peer_token: str | None = None
    access_log: bool = True
    metrics_listen: str | None = None  # also at /-/metrics on the gateway's own port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, auth: Authenticator, insecure: bool) -> None:
    """Anonymous access is for loopback, unless the operator says --insecure."""
    if auth.anonymous and not is_loopback(host) and not insecure:
        raise UsageError(f"--anonymous on {host}, which is not a loopback address, serves every "
                         "dataset of the remote to anyone who can reach it: add --insecure if "
                         "that is what you want, or use --s3-keys / --token-file")


def build_catalog(settings: GatewaySettings, repo: Repository) -> Catalog:
    disk = DiskCache(settings.cache_dir, capacity_bytes=settings.cache_size,
                     verify=object_is_intact)
    peer_factory: Callable[[str, int], PeerTier | None] | None = None
    if settings.cache_peers or settings.cache_peers_file:
        from cachefs.peer.members import Membership

        if settings.remote_name is None:
            raise UsageError("the peer tier needs --remote to name a configured remote "
                             "(peers fetch by remote name, never by URL)")
        membership = Membership(settings.cache_peers, settings.cache_peers_file,
                                settings.peer_token)
        membership.start()
        remote_name = settings.remote_name

        def peer_factory(dataset: str, chunk_size: int) -> PeerTier | None:
            return PeerTier(membership, remote_name, dataset, chunk_size,
                            origin_timeout=settings.origin_timeout)

    return Catalog(repo, MemoryCache(settings.memory_cache), disk, ref_ttl=settings.ref_ttl,
                   origin_timeout=settings.origin_timeout, peer_factory=peer_factory)


def uvicorn_config(app: Any, settings: GatewaySettings) -> uvicorn.Config:
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:  # pragma: no cover (a dependency; asyncio's own loop works too)
        loop = "asyncio"
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, loop=loop,
        http=BoundedHttpToolsProtocol,  # type: ignore[arg-type]
        lifespan="on", access_log=False, log_config=None, proxy_headers=False,
        server_header=False, date_header=True, timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_S, limit_concurrency=MAX_CONNECTIONS)


def run_gateway(settings: GatewaySettings, repo: Repository, auth: Authenticator,
                ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    catalog = build_catalog(settings, repo)
    metrics = GatewayMetrics(catalog.stats)
    address = f"http://{settings.host}:{settings.port}"

    def on_ready() -> None:
        log.info("gateway serving %s on %s", settings.remote_name or "its remote", address)
        if ready is not None:
            ready(address)

    app = GatewayApp(catalog, auth, metrics, TrioGuest(), access_log=settings.access_log,
                     on_ready=on_ready)
    server = _Server(uvicorn_config(app, settings))
    endpoint = serve_metrics(settings.metrics_listen, metrics.registry)
    try:
        server.run()
    finally:
        if endpoint is not None:
            endpoint.stop()
    if server.started:
        log.info("gateway stopped")
    else:
        raise UsageError(f"the gateway could not serve on {address} (see the log above)")
