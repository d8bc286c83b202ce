"""Running the gateway: its tiers, its authentication, hypercorn on trio, a graceful SIGTERM.

hypercorn serves the ASGI app on trio, the event loop the cache tiers already run in (chunks
stream from `TieredStore` without crossing threads). It bounds what a client can send: request
heads over `MAX_HEAD_BYTES` are refused by its HTTP/1.1 parser, idle keep-alive connections are
closed after `KEEP_ALIVE_S`. SIGTERM and SIGINT stop accepting, let requests in flight finish for
up to `GRACEFUL_S`, then end.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from cachefs.cache.disk import DiskCache
from cachefs.cache.memory import MemoryCache
from cachefs.cache.peer import PeerTier
from cachefs.cache.tiered import object_is_intact
from cachefs.dataset.repo import Repository
from cachefs.errors import UsageError
from cachefs.gateway.app import GatewayApp
from cachefs.gateway.auth import Authenticator
from cachefs.gateway.catalog import DEFAULT_REF_TTL, Catalog
from cachefs.gateway.metrics import GatewayMetrics

log = logging.getLogger("cachefs.gateway.server")

MAX_HEAD_BYTES = 16 * 1024  # request line + headers
KEEP_ALIVE_S = 75.0
GRACEFUL_S = 10.0


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


def hypercorn_config(settings: GatewaySettings) -> HypercornConfig:
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.h2_max_header_list_size = MAX_HEAD_BYTES
    config.keep_alive_timeout = KEEP_ALIVE_S
    config.graceful_timeout = GRACEFUL_S
    config.include_server_header = False
    config.accesslog = logging.getLogger("cachefs.gateway.access") if settings.access_log \
        else None
    config.access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(L)ss'
    config.errorlog = logging.getLogger("cachefs.gateway.http")
    return config


async def run_gateway(settings: GatewaySettings, repo: Repository, auth: Authenticator,
                      ready: Callable[[list[str]], None] | None = None) -> None:
    catalog = build_catalog(settings, repo)
    metrics = GatewayMetrics(catalog.stats)
    app = GatewayApp(catalog, auth, metrics)
    config = hypercorn_config(settings)
    stop = trio.Event()

    async def wait_for_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: finishing the requests in flight (up to %.0f s)", signum,
                         GRACEFUL_S)
                stop.set()
                return

    async with trio.open_nursery() as nursery:
        catalog.nursery = nursery
        nursery.start_soon(wait_for_signal)

        async def serving(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(app, config, shutdown_trigger=stop.wait,  # type: ignore[arg-type]
                        task_status=task_status)
            nursery.cancel_scope.cancel()  # the connections are done: prefetches too

        binds = await nursery.start(serving)
        log.info("gateway serving %s on %s", settings.remote_name or "its remote",
                 ", ".join(binds))
        if ready is not None:
            ready(binds)
    log.info("gateway stopped")
