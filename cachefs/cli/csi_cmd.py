"""`cachefs csi` and `cachefs csi mounter`: the Kubernetes CSI plugin and its mount owner."""

from __future__ import annotations

import argparse

from cachefs.cli.common import HelpFormatter

EXAMPLES = """examples:
  # everything on one machine, by hand (starts its own mounter):
  cachefs csi --endpoint unix:///tmp/csi.sock --node-id $(hostname)
  # in the node DaemonSet: the plugin and the mounter in separate containers
  cachefs csi mounter --socket /var/lib/cachefs-csi/mounter.sock --state-dir /var/lib/cachefs-csi \\
      --cache-dir /var/cache/cachefs --cache-peers 10.0.0.1:7470,10.0.0.2:7470
  cachefs csi --mode node --endpoint unix:///csi/csi.sock --node-id $NODE_NAME \\
      --mounter-socket /var/lib/cachefs-csi/mounter.sock --state-dir /var/lib/cachefs-csi
  # the mounter and the plugin with Prometheus metrics (http://ADDR/metrics):
  cachefs csi mounter --socket /var/lib/cachefs-csi/mounter.sock --state-dir /var/lib/cachefs-csi \\
      --metrics-listen 0.0.0.0:9812
  cachefs csi --mode node --node-id $NODE_NAME --mounter-socket /var/lib/cachefs-csi/mounter.sock \\
      --metrics-listen 0.0.0.0:9811
  # the controller Deployment (with csi-provisioner):
  cachefs csi --mode controller --endpoint unix:///csi/csi.sock --default-remote team
  # the node plugin, also serving its inventory and publishing it on its Node object:
  cachefs csi --mode node --node-id $NODE_NAME --cache-dir /var/cache/cachefs \\
      --inventory-listen 0.0.0.0:9810 --publish-inventory
  # this node's inventory (CPU, memory, NUMA, GPUs, RDMA, NICs, cache, cached datasets):
  cachefs csi inventory --cache-dir /var/cache/cachefs

Volumes name a dataset version with three parameters / volume attributes: remote (a remote
configured in config.toml, by name; default --default-remote), dataset, ref (default main).
A URL is accepted only if a configured remote has it, or, with --allow-remote-urls, in a
StorageClass or PersistentVolume (never in a pod's inline volume): the mount carries the
node's credentials to it. Every volume is mounted read-only, whatever access mode is asked."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("csi", parents=[common], formatter_class=HelpFormatter,
                       help="run the Kubernetes CSI plugin (csi.cachefs.io)",
                       description="Serve the CSI Identity, Controller and Node services on a "
                                   "unix socket.", epilog=EXAMPLES)
    p.add_argument("--endpoint", default="unix:///csi/csi.sock",
                   help="unix socket to serve (default unix:///csi/csi.sock)")
    p.add_argument("--node-id", help="this node's name (required for the node service)")
    p.add_argument("--mode", choices=("all", "node", "controller"), default="all",
                   help="which services to run (default all)")
    p.add_argument("--default-remote",
                   help="remote for volumes that name none (a configured remote's name)")
    p.add_argument("--allow-remote-urls", action="store_true",
                   help="let StorageClasses and PersistentVolumes (the cluster admin's) name a "
                        "remote by a URL no configured remote has; never inline volumes. The "
                        "node's credentials go to whatever such a URL names. A separately run "
                        "mounter needs the flag too (default: configured remotes only)")
    p.add_argument("--state-dir", default="/var/lib/cachefs-csi",
                   help="where volumes and mounts are recorded (default /var/lib/cachefs-csi)")
    p.add_argument("--mounter-socket",
                   help="a separately running mounter (default: STATE_DIR/mounter.sock, "
                        "started if needed)")
    p.add_argument("--cache-dir", help="SSD cache directory shared by the node's mounts")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics: CSI RPCs by "
                        "method and code, their latency, volumes staged and published "
                        "(default: off)")
    _add_inventory_options(p)
    p.set_defaults(func=run_plugin)
    roles = p.add_subparsers(dest="role", required=False, metavar="ROLE")
    _register_mounter(roles)
    _register_inventory(roles, common)


def _add_inventory_options(p: argparse.ArgumentParser) -> None:
    inv = p.add_argument_group(
        "node inventory", "CPU, memory, NUMA, GPUs, RDMA, NICs, the cache disk and the dataset\n"
        "versions cached on the node (see `cachefs csi inventory --help`)")
    inv.add_argument("--inventory-listen", metavar="HOST:PORT",
                     help="serve GET /inventory (JSON) and /healthz over HTTP, e.g. "
                          "0.0.0.0:9810 (default: off)")
    inv.add_argument("--publish-inventory", action="store_true",
                     help="keep the inventory on this node's Node object (--node-id): labels "
                          "cachefs.io/gpu-count, gpu-model, rdma and the annotation "
                          "cachefs.io/inventory; needs get and patch on nodes")
    inv.add_argument("--inventory-interval", type=float, default=60.0, metavar="SECONDS",
                     help="republish at least this often (default 60); changes to GPUs, RDMA "
                          "or the cached datasets are published at once")
    inv.add_argument("--peer-address", metavar="HOST:PORT",
                     help="this node's peer server (`cachefs peer serve`): its status and "
                          "counters go into the inventory (asked with the CACHEFS_TOKEN "
                          "token), e.g. 127.0.0.1:7470 (default: none)")
    inv.add_argument("--kube-api", metavar="URL",
                     help="Kubernetes API server (default: the in-cluster configuration)")
    inv.add_argument("--kube-token-file", metavar="FILE",
                     help="bearer token for --kube-api")


def _register_mounter(roles: argparse._SubParsersAction) -> None:
    m = roles.add_parser("mounter", help="run the mounter: the process that owns FUSE mounts",
                         description="Own the node's FUSE mounts and bind mounts, repair dead "
                                     "ones, and serve the plugin on a local socket.")
    m.add_argument("--socket", required=True, help="unix socket to serve (mode 0600)")
    m.add_argument("--state-dir", required=True, help="where mounts and binds are recorded")
    m.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between health checks of every mount (default 2)")
    m.add_argument("--hang-timeout", type=float, metavar="SECONDS",
                   help="how long a mount daemon may take to answer before it counts as hung: "
                        "its connection is aborted and it is remounted (default 10)")
    m.add_argument("--cache-dir", dest="mounter_cache_dir",
                   help="default SSD cache directory of the mounts")
    m.add_argument("--allow-remote-urls", dest="mounter_allow_remote_urls", action="store_true",
                   help="mount a PersistentVolume's remote URL that no configured remote has "
                        "(never an inline volume's; default: configured remotes only)")
    m.add_argument("--cache-peers", dest="mounter_cache_peers", metavar="SPEC",
                   help="the peer ring every mount joins, as `cachefs mount --cache-peers` "
                        "takes it, e.g. dns:cachefs-peers.cachefs.svc.cluster.local:7470 "
                        "(default: $CACHEFS_CACHE_PEERS; empty: no peer tier). Never taken from "
                        "a volume")
    m.add_argument("--token-file", dest="mounter_token_file", metavar="FILE",
                   help="cluster token file for the mounts' peer calls (default: the "
                        "CACHEFS_TOKEN environment variable, which the mounts inherit)")
    m.add_argument("--metrics-listen", dest="mounter_metrics_listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics: requests, "
                        "mounts and binds owned, repairs, health-check failures, re-binds "
                        "(default: off)")
    m.set_defaults(func=run_mounter)


def _register_inventory(roles: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    i = roles.add_parser("inventory", parents=[common], formatter_class=HelpFormatter,
                         help="print this node's resource inventory",
                         description="Print this node's resources and the dataset versions "
                                     "cached in its cache directory:\na summary, or with --json "
                                     "the document the node plugin serves and publishes.")
    i.add_argument("--cache-dir", dest="inventory_cache_dir", metavar="DIR",
                   help="SSD cache directory to report on (default: the csi --cache-dir, else "
                        "the user's default cache directory)")
    i.add_argument("--peer-address", dest="inventory_peer_address", metavar="HOST:PORT",
                   help="this node's peer server, asked for its status and counters (with "
                        "the CACHEFS_TOKEN token; default: the csi --peer-address, else none)")
    i.set_defaults(func=run_inventory)


def run_plugin(args: argparse.Namespace) -> int:
    from csi.plugin import run

    return run(args)


def run_mounter(args: argparse.Namespace) -> int:
    from csi.mounter import main

    argv = ["--socket", args.socket, "--state-dir", args.state_dir,
            "--health-interval", str(args.health_interval)]
    if args.hang_timeout is not None:
        argv += ["--hang-timeout", str(args.hang_timeout)]
    if args.mounter_cache_dir:
        argv += ["--cache-dir", args.mounter_cache_dir]
    if args.mounter_allow_remote_urls:
        argv.append("--allow-remote-urls")
    if args.mounter_cache_peers is not None:
        argv += ["--cache-peers", args.mounter_cache_peers]
    if args.mounter_token_file:
        argv += ["--token-file", args.mounter_token_file]
    if args.mounter_metrics_listen:
        argv += ["--metrics-listen", args.mounter_metrics_listen]
    return main(argv)


def run_inventory(args: argparse.Namespace) -> int:
    import os

    from cachefs.cli.common import print_json
    from cachefs.fuse.config import default_cache_dir
    from cachefs.grpc_auth import load_token
    from cachefs.peer.ring import parse_member
    from csi.inventory import collect_inventory, describe

    cache_dir = args.inventory_cache_dir or args.cache_dir or str(default_cache_dir())
    peer = args.inventory_peer_address or args.peer_address
    peer = parse_member(peer, "--peer-address") if peer else None
    inventory = collect_inventory(os.path.abspath(cache_dir), peer_address=peer,
                                  peer_token=load_token(None) if peer else None)
    if args.json:
        print_json(inventory)
    else:
        print(describe(inventory))
    return 0
