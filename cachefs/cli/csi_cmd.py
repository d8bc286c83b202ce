"""`cachefs csi` and `cachefs csi mounter`: the Kubernetes CSI plugin and its mount owner."""

from __future__ import annotations

import argparse

from cachefs.cli.common import HelpFormatter

EXAMPLES = """examples:
  # everything on one machine, by hand (starts its own mounter):
  cachefs csi --endpoint unix:///tmp/csi.sock --node-id $(hostname)
  # in the node DaemonSet: the plugin and the mounter in separate containers
  cachefs csi mounter --socket /var/lib/cachefs-csi/mounter.sock --state-dir /var/lib/cachefs-csi
  cachefs csi --mode node --endpoint unix:///csi/csi.sock --node-id $NODE_NAME \\
      --mounter-socket /var/lib/cachefs-csi/mounter.sock --state-dir /var/lib/cachefs-csi
  # the controller Deployment (with csi-provisioner):
  cachefs csi --mode controller --endpoint unix:///csi/csi.sock --default-remote team

Volumes name a dataset version with three parameters / volume attributes: remote (URL or
configured remote name; default --default-remote), dataset, ref (default main). Every volume
is mounted read-only, whatever access mode is asked."""


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
    p.add_argument("--default-remote", help="remote for volumes that name none")
    p.add_argument("--state-dir", default="/var/lib/cachefs-csi",
                   help="where volumes and mounts are recorded (default /var/lib/cachefs-csi)")
    p.add_argument("--mounter-socket",
                   help="a separately running mounter (default: STATE_DIR/mounter.sock, "
                        "started if needed)")
    p.add_argument("--cache-dir", help="SSD cache directory shared by the node's mounts")
    p.set_defaults(func=run_plugin)
    roles = p.add_subparsers(dest="role", required=False, metavar="ROLE")
    m = roles.add_parser("mounter", help="run the mounter: the process that owns FUSE mounts",
                         description="Own the node's FUSE mounts and bind mounts, repair dead "
                                     "ones, and serve the plugin on a local socket.")
    m.add_argument("--socket", required=True, help="unix socket to serve (mode 0600)")
    m.add_argument("--state-dir", required=True, help="where mounts and binds are recorded")
    m.add_argument("--health-interval", type=float, default=2.0,
                   help="seconds between health checks of every mount (default 2)")
    m.add_argument("--cache-dir", dest="mounter_cache_dir",
                   help="default SSD cache directory of the mounts")
    m.set_defaults(func=run_mounter)


def run_plugin(args: argparse.Namespace) -> int:
    from csi.plugin import run

    return run(args)


def run_mounter(args: argparse.Namespace) -> int:
    from csi.mounter import main

    argv = ["--socket", args.socket, "--state-dir", args.state_dir,
            "--health-interval", str(args.health_interval)]
    if args.mounter_cache_dir:
        argv += ["--cache-dir", args.mounter_cache_dir]
    return main(argv)
