"""`cachefs scheduler-extender`: the kube-scheduler extender (HTTP filter / prioritize)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from cachefs.cli.common import HelpFormatter

log = logging.getLogger("cachefs.csi.extender")

EXAMPLES = """examples:
  # a sidecar of kube-scheduler (its KubeSchedulerConfiguration names http://127.0.0.1:8888):
  cachefs scheduler-extender -v
  # its own Deployment behind a Service:
  cachefs scheduler-extender --listen 0.0.0.0:8888 -v
  # outside the cluster, against an API server:
  cachefs scheduler-extender --kube-api https://10.0.0.1:6443 --kube-token-file token

Pods ask with annotations: cachefs.io/gpu-count: "8", cachefs.io/gpu-model: "NVIDIA H100 80GB
HBM3", cachefs.io/rdma: "true" (filter: nodes without them are dropped, with the reason), and
are placed near their data (prioritize: 0-10 by the bytes of the pod's dataset versions each
node caches: its csi.cachefs.io volumes, inline or through PVCs, and cachefs.io/datasets:
"imagenet@v1,coco"). Endpoints: POST /filter, POST /prioritize, GET /healthz."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "scheduler-extender", parents=[common], formatter_class=HelpFormatter,
        help="run the kube-scheduler extender (GPU/RDMA filter, dataset-locality scores)",
        description="Serve kube-scheduler's extender protocol over HTTP: filter out nodes\n"
                    "without the GPUs or RDMA a pod asks for, and score nodes by how much of\n"
                    "the pod's datasets they already cache (each Node's cachefs.io/inventory\n"
                    "annotation).",
        epilog=EXAMPLES)
    p.add_argument("--listen", default="127.0.0.1:8888", metavar="HOST:PORT",
                   help="address to serve (default 127.0.0.1:8888; 0.0.0.0:8888 for a Service)")
    p.add_argument("--kube-api", metavar="URL",
                   help="API server URL (default: the in-cluster configuration)")
    p.add_argument("--kube-token-file", metavar="FILE",
                   help="bearer token for --kube-api")
    p.add_argument("--node-cache-ttl", type=float, default=5.0, metavar="SECONDS",
                   help="how long a Node list read for names-only requests is reused "
                        "(default 5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from csi.extender_server import build_server, connect_api

    api = connect_api(args.kube_api, args.kube_token_file)
    server = build_server(args.listen, api, node_ttl=args.node_cache_ttl)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    if server.server_address[0] not in ("127.0.0.1", "::1", "localhost"):
        log.info("serving without authentication (the scheduler sends none): keep %s reachable "
                 "by the scheduler only", args.listen)
    log.info("scheduler extender serving %s (POST /filter, POST /prioritize, GET /healthz)",
                server.url)
    try:
        stop.wait()
    finally:
        server.stop()
    return 0
