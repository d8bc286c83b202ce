"""`cachefs cluster up|down`: run a whole haystack cluster (masters + storage servers) locally."""

from __future__ import annotations

import argparse
from pathlib import Path

from cachefs.cli.common import HelpFormatter, print_json

EXAMPLES = """examples:
  cachefs cluster up --dir /tmp/hay                     # 3 masters, 3 storage servers, R=2
  cachefs cluster up --dir /tmp/hay --masters 1 --storage 2 --replicas 2 --json
  export CACHEFS_TOKEN=$(cat /tmp/hay/token)
  URL=$(python3 -c 'import json; print(json.load(open("/tmp/hay/cluster.json"))["url"])')
  cachefs remote add hay "$URL/teamA"
  cachefs init photos --remote hay && cachefs commit photos ./photos --remote hay -m "v1"
  cachefs master status "$URL"
  cachefs cluster down --dir /tmp/hay

Every process listens on 127.0.0.1 and requires the generated token (DIR/token). `up` returns
once the masters have a leader and every volume has its replicas; `up` on a DIR whose cluster
was stopped restarts the same members with their data."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cluster", formatter_class=HelpFormatter,
                       help="run a local haystack cluster (masters + storage servers)",
                       description="Start or stop a whole haystack:// cluster on loopback: "
                                   "raft masters and Haystack storage servers as background "
                                   "processes, with a generated token.", epilog=EXAMPLES)
    roles = p.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    up = roles.add_parser("up", parents=[common], formatter_class=HelpFormatter,
                          help="start a cluster (or restart a stopped one) and wait until it "
                               "serves", epilog=EXAMPLES)
    up.add_argument("--dir", required=True, type=Path, metavar="DIR",
                    help="where the cluster keeps its data, logs, token and cluster.json")
    up.add_argument("--masters", type=int, default=3, metavar="M",
                    help="raft masters (default 3; 1 for no high availability)")
    up.add_argument("--storage", type=int, default=3, metavar="S",
                    help="storage servers (default 3)")
    up.add_argument("--replicas", type=int, default=2, metavar="R",
                    help="replicas of every volume (default 2)")
    up.add_argument("--min-replicas", type=int, default=0, metavar="N",
                    help="acknowledgements a chunk write needs (default 0: every live replica)")
    up.add_argument("--volumes", type=int, default=16, metavar="N",
                    help="logical volumes, fixed for the cluster's lifetime (default 16)")
    up.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                    help="how long to wait for the cluster to serve (default 120)")
    up.set_defaults(func=run_up)
    down = roles.add_parser("down", parents=[common], formatter_class=HelpFormatter,
                            help="stop the cluster's processes (its data stays)")
    down.add_argument("--dir", required=True, type=Path, metavar="DIR")
    down.set_defaults(func=run_down)


def run_up(args: argparse.Namespace) -> int:
    from master.cluster import cluster_up

    state = cluster_up(args.dir, masters=args.masters, storage=args.storage,
                       replicas=args.replicas, volumes=args.volumes,
                       min_replicas=args.min_replicas, timeout=args.timeout)
    if args.json:
        print_json(state)
    else:
        print(f"cluster up: {state['url']}")
        print(f"token:      {state['token_file']} (export CACHEFS_TOKEN=$(cat "
              f"{state['token_file']}))")
        for role in ("masters", "storage"):
            for m in state[role]:
                print(f"  {role[:-1] if role == 'masters' else 'storage'} {m['id']:<4} "
                      f"{m['addr']:<21} pid {m['pid']}  log {m['log']}")
    return 0


def run_down(args: argparse.Namespace) -> int:
    from master.cluster import cluster_down

    result = cluster_down(args.dir)
    if args.json:
        print_json(result)
    else:
        print(f"stopped {len(result['stopped'])} processes"
              + (f" ({len(result['killed_after_grace'])} killed after the grace period)"
                 if result["killed_after_grace"] else ""))
    return 0
