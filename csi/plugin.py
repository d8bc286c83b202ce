"""The CSI plugin process: Identity, Controller and Node services over one unix socket.

`cachefs csi --endpoint unix:///csi/csi.sock --node-id NODE [--mode all|node|controller]`.
The node part needs a mounter (the process that owns the FUSE mounts): `--mounter-socket` names
one that runs separately (its own container in the DaemonSet); without it the plugin connects to
the mounter at STATE_DIR/mounter.sock, starting it first if none answers, so one command is
enough to try the plugin by hand. Either way the mounter outlives the plugin: restarting the
plugin touches no mount.

The node plugin can also serve the node's resource inventory over HTTP (`--inventory-listen`)
and keep it on its Node object (`--publish-inventory`): `csi.inventory`, `csi.publish`; with
`--peer-address`, the inventory includes the node's peer server (its Status, asked with the
cluster token of CACHEFS_TOKEN).

A volume's `remote` names a configured remote (config.toml, shared by the plugin, the mounter and
the controller); a URL only if a configured remote has it, or with `--allow-remote-urls` for
StorageClasses and PersistentVolumes (the cluster admin's), never for inline ephemeral volumes
(any pod's): see `Config.remote_for_volume`. The flag is passed to a mounter the plugin starts;
a separately running mounter needs it too.

The CSI socket is local (kubelet and the sidecars reach it through a host path); it is created
with mode 0660 and carries no token, as in every CSI driver.

With `--metrics-listen HOST:PORT` the plugin serves Prometheus metrics at
http://HOST:PORT/metrics (csi/metrics.py): every CSI RPC by method and status code with its
latency, volumes staged and published on the node, volumes the controller has created. A
mounter the plugin starts itself serves none (run it separately, with its own
`--metrics-listen`, to watch it).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from cachefs.config import Config
from cachefs.errors import ConfigError, UsageError
from cachefs.fuse.config import default_cache_dir
from cachefs.grpc_auth import load_token
from cachefs.metrics import new_registry, serve_metrics
from cachefs.peer.ring import parse_member
from csi.controller import ControllerService
from csi.identity import IdentityService
from csi.inventory import collect_inventory
from csi.kube import core_api
from csi.metrics import plugin_metrics
from csi.mounter import MounterClient, spawn_mounter
from csi.node import NodeService
from csi.proto import csi_pb2_grpc
from csi.publish import InventoryServer, NodePublisher
from csi.rpc import DRIVER_NAME
from csi.state import JsonStore

log = logging.getLogger("cachefs.csi")
MODES = ("all", "node", "controller")


def socket_path(endpoint: str) -> str:
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise UsageError(f"--endpoint {endpoint!r}: expected unix:///absolute/path.sock")
    if not path.startswith("/"):
        raise UsageError(f"--endpoint {endpoint!r}: the socket path must be absolute")
    return path


def connect_mounter(state_dir: Path, mounter_socket: str | None,
                    allow_remote_urls: bool = False) -> MounterClient:
    if mounter_socket:
        client = MounterClient(mounter_socket)
        client.ping()
        return client
    path = str(state_dir / "mounter.sock")
    client = MounterClient(path)
    try:
        client.ping()
        log.info("using the running mounter at %s", path)
    except Exception:
        log.info("starting a mounter at %s", path)
        spawn_mounter(path, str(state_dir / "mounter"), allow_remote_urls=allow_remote_urls)
    return client


def check_default_remote(default_remote: str | None, allow_remote_urls: bool) -> None:
    """Refuse a --default-remote that volumes could not use: the trust rule applies to it too
    (a volume that names no remote mounts it, inline ones included)."""
    if not default_remote:
        return
    try:
        Config.load().remote_for_volume(default_remote, allow_urls=allow_remote_urls)
    except ConfigError as e:
        raise UsageError(f"--default-remote: {e}") from None


def build_server(endpoint: str, node_id: str, mode: str, default_remote: str | None,
                 state_dir: Path, mounter_socket: str | None = None,
                 cache_dir: str | None = None, allow_remote_urls: bool = False,
                 registry: CollectorRegistry | None = None) -> grpc.Server:
    """The plugin's gRPC server, not started; with `registry`, its metrics are kept there."""
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    if mode != "controller" and not node_id:
        raise UsageError("--node-id is required for the node service")
    check_default_remote(default_remote, allow_remote_urls)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = socket_path(endpoint)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)  # a stale socket of an earlier run
    controller_volumes = (JsonStore(state_dir / "volumes.json") if mode != "node" else None)
    node_volumes = (JsonStore(state_dir / "node-volumes.json") if mode != "controller"
                    else None)
    interceptors = ([plugin_metrics(registry, node_volumes, controller_volumes)]
                    if registry is not None else [])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="csi"),
                         interceptors=interceptors)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService(mode != "node"), server)
    if controller_volumes is not None:
        controller = ControllerService(controller_volumes, default_remote, allow_remote_urls)
        csi_pb2_grpc.add_ControllerServicer_to_server(controller, server)
    if node_volumes is not None:
        mounter = connect_mounter(state_dir, mounter_socket, allow_remote_urls)
        node = NodeService(node_id, mounter, node_volumes, default_remote, cache_dir,
                           allow_remote_urls)
        csi_pb2_grpc.add_NodeServicer_to_server(node, server)
    server.add_insecure_port(f"unix://{path}")
    return server


def inventory_services(args: argparse.Namespace) -> list[Any]:
    """The inventory endpoint and Node publisher the flags ask for (not started yet)."""
    listen = getattr(args, "inventory_listen", None)
    publish = getattr(args, "publish_inventory", False)
    if not listen and not publish:
        return []
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    peer_address = getattr(args, "peer_address", None)
    if peer_address:
        peer_address = parse_member(peer_address, "--peer-address")
    collect = functools.partial(collect_inventory, cache_dir,
                                node_name=getattr(args, "node_id", None),
                                peer_address=peer_address,
                                peer_token=load_token(None) if peer_address else None)
    services: list[Any] = []
    if listen:
        try:
            services.append(InventoryServer(listen, collect))
        except OSError as e:
            raise UsageError(f"--inventory-listen {listen}: cannot listen there: {e}") from e
    if publish:
        if args.mode == "controller" or not args.node_id:
            raise UsageError("--publish-inventory needs the node service and --node-id")
        interval = getattr(args, "inventory_interval", 60.0)
        if interval <= 0:
            raise UsageError("--inventory-interval must be positive")
        api = core_api(getattr(args, "kube_api", None), getattr(args, "kube_token_file", None))
        services.append(NodePublisher(api, args.node_id, collect, interval=interval,
                                      watch_dir=cache_dir))
    return services


def run(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    services = inventory_services(args)
    allow_urls = getattr(args, "allow_remote_urls", False)
    registry = new_registry()
    # Listening first: an address that cannot be used stops the start before anything else.
    metrics = serve_metrics(getattr(args, "metrics_listen", None), registry)
    try:
        server = build_server(args.endpoint, args.node_id or "", args.mode, args.default_remote,
                              state_dir, args.mounter_socket, args.cache_dir, allow_urls,
                              registry)
    except BaseException:
        if metrics is not None:
            metrics.stop()
        raise
    server.start()
    os.chmod(socket_path(args.endpoint), 0o660)
    log.info("%s serving %s (mode %s, node %s, remote URLs %s)", DRIVER_NAME, args.endpoint,
             args.mode, args.node_id,
             "allowed for PVs and StorageClasses" if allow_urls else "only configured ones")
    for service in services:
        service.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    for service in services:
        service.stop()
    server.stop(grace=5).wait()
    if metrics is not None:
        metrics.stop()
    return 0
