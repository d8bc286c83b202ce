"""`cachefs master serve|status|declare-dead`: run a raft master, inspect or administer it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from cachefs.cli.common import HelpFormatter, print_json
from cachefs.errors import RemoteError

log = logging.getLogger("cachefs.master")

TOKEN_HELP = "file holding the cluster token (default: the CACHEFS_TOKEN environment variable)"

SERVE_EXAMPLES = """examples:
  # one master on one machine, no token: loopback only
  cachefs master serve --id 1 --listen 127.0.0.1:7700 --raft 127.0.0.1:7800 \\
      --data-dir /srv/cachefs-master
  # three masters (run one per machine, each with its own --id, --listen and --raft)
  PEERS=1=10.0.0.1:7700/10.0.0.1:7800,2=10.0.0.2:7700/10.0.0.2:7800,3=10.0.0.3:7700/10.0.0.3:7800
  cachefs master serve --id 1 --listen 0.0.0.0:7700 --raft 10.0.0.1:7800 --peers $PEERS \\
      --data-dir /srv/cachefs-master --token-file /etc/cachefs/token --volumes 64 --replicas 2

--peers lists every member as ID=GRPC_ADDRESS/RAFT_ADDRESS (this one may be included; its
entry then says how the others reach it). The raft journal and dumps live in DATA_DIR, so a
restarted master (or the whole group) comes back with its state. With a token, every gRPC call
needs it and the raft traffic is encrypted with it: a member without it cannot join.
--volumes, --replicas and --min-replicas are fixed by the first leader when the cluster is
created. A storage server silent for --down-after seconds is down; down for --dead-after more
seconds, it is declared dead and replaced in every replica set (0: only by declare-dead).
SIGTERM or SIGINT stops the master cleanly."""

STATUS_EXAMPLES = """examples:
  cachefs master status 127.0.0.1:7700
  cachefs master status haystack://10.0.0.1:7700,10.0.0.2:7700,10.0.0.3:7700 --json

Prints the leader, the term, the members, the storage servers (up, down, dead, last heartbeat)
and the volumes that are under-replicated or lagging. Without a leader it prints what the
reachable member knows, says so, and exits with 7."""

DECLARE_DEAD_EXAMPLES = """examples:
  cachefs master declare-dead 127.0.0.1:7700 storage-3

The server is replaced in every replica set it was in; the new replicas are filled by repair
from the surviving ones. It can register again later as a fresh, empty server."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("master", formatter_class=HelpFormatter,
                       help="run or administer the raft master of a haystack cluster",
                       description="The raft master group of a haystack:// cluster: storage "
                                   "membership, volume placement, the object directory.",
                       epilog=f"{SERVE_EXAMPLES}\n\n{STATUS_EXAMPLES}")
    roles = p.add_subparsers(dest="master_command", required=True, metavar="COMMAND")
    _register_serve(roles, common)
    _register_admin(roles, common)


def _register_serve(roles: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = roles.add_parser("serve", parents=[common], formatter_class=HelpFormatter,
                         help="run one member of the master group",
                         description="Run one raft member and serve the Master gRPC API "
                                     "(proto/master.proto).", epilog=SERVE_EXAMPLES)
    s.add_argument("--id", required=True, help="this member's id (as in --peers)")
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="gRPC address to serve (without a token: loopback only)")
    s.add_argument("--raft", required=True, metavar="HOST:PORT",
                   help="this member's raft address (the others connect to it)")
    s.add_argument("--peers", default="", metavar="ID=GRPC/RAFT,...",
                   help="every member of the group (default: this one alone)")
    s.add_argument("--data-dir", required=True, metavar="DIR",
                   help="raft journal and dumps (created if missing)")
    s.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)
    s.add_argument("--volumes", type=int, default=64, metavar="N",
                   help="logical volumes of a new cluster (default 64)")
    s.add_argument("--replicas", type=int, default=2, metavar="R",
                   help="replicas of each volume (default 2)")
    s.add_argument("--min-replicas", type=int, default=0, metavar="N",
                   help="replicas a write needs before it is acknowledged (default 0: every "
                        "live replica)")
    s.add_argument("--down-after", type=float, default=10.0, metavar="SECONDS",
                   help="a storage server or cachefs node without heartbeat this long is down "
                        "(default 10)")
    s.add_argument("--dead-after", type=float, default=600.0, metavar="SECONDS",
                   help="down this much longer, it is declared dead and replaced "
                        "(default 600; 0: never automatically)")
    s.add_argument("--commit-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long a call waits for the raft group (default 5)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics: raft term, "
                        "leader, commit index and log, directory entries, storage servers, "
                        "volumes, nodes, RPCs by method and code (default: off)")
    s.set_defaults(func=serve)


def _register_admin(roles: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for name, help_text, description, epilog, func in (
        ("status", "print the leader, members, storage servers and volumes",
         "Print the state of the master group and of the storage servers it manages.",
         STATUS_EXAMPLES, status),
        ("declare-dead", "replace a storage server in every replica set",
         "Declare a storage server dead: it is replaced in every replica set it was in and "
         "the new replicas are filled by repair.", DECLARE_DEAD_EXAMPLES, declare_dead),
    ):
        a = roles.add_parser(name, parents=[common], formatter_class=HelpFormatter,
                             help=help_text, description=description, epilog=epilog)
        a.add_argument("url", metavar="URL",
                       help="the masters: HOST:PORT[,HOST:PORT...], haystack:// optional")
        if name == "declare-dead":
            a.add_argument("server_id", metavar="ID", help="the storage server's id")
        a.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)
        a.add_argument("--timeout", type=float, default=20.0, metavar="SECONDS",
                       help="give up after this long (default 20)")
        a.set_defaults(func=func)


def serve(args: argparse.Namespace) -> int:
    from cachefs.grpc_auth import load_token
    from master.server import MasterConfig, parse_peers
    from master.server import serve as serve_master

    config = MasterConfig(
        id=args.id, listen=args.listen, raft=args.raft, data_dir=Path(args.data_dir),
        peers=parse_peers(args.peers), token=load_token(args.token_file),
        volumes=args.volumes, replicas=args.replicas, min_replicas=args.min_replicas,
        down_after=args.down_after, dead_after=args.dead_after,
        commit_timeout=args.commit_timeout, metrics_listen=args.metrics_listen)

    def ready(address: str) -> None:
        print(f"master {config.id} serving on {address}, raft on {config.raft} "
              f"({len(config.members)} members, data in {args.data_dir})", flush=True)

    serve_master(config, ready=ready)
    print("stopped", flush=True)
    return 0


def _client(args: argparse.Namespace) -> Any:
    from cachefs.grpc_auth import load_token
    from master.client import MasterClient

    return MasterClient(args.url, token=load_token(args.token_file), timeout=args.timeout)


def status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        doc = client.status()
    if args.json:
        print_json(doc)
    else:
        print(describe_status(doc))
    return 0 if doc.get("leader") else RemoteError.exit_code


def declare_dead(args: argparse.Namespace) -> int:
    with _client(args) as client:
        replaced = client.declare_dead(args.server_id)
    if args.json:
        print_json({"id": args.server_id, "replaced": replaced})
    else:
        print(f"storage server {args.server_id} declared dead: replaced in {replaced} "
              "replica sets")
    return 0


def describe_status(doc: dict[str, Any]) -> str:
    """The status document for people."""
    lines = []
    if doc.get("leader"):
        lines.append(f"leader: master {doc['leader_id']} at {doc['leader']} "
                     f"(term {doc['term']})")
    else:
        lines.append(f"leader: NONE ({doc.get('error') or 'no raft leader'}); this is what "
                     f"master {doc['self']} knows")
    lines.append("members:")
    for m in doc["members"]:
        lines.append(f"  {m['id']:<6} {m['role']:<11} grpc {m['grpc']}  raft {m['raft']}"
                     + ("  (answered)" if m["self"] else ""))
    lines.append(f"volumes: {doc['volume_count']}, replicas {doc['replicas']}, "
                 f"placement epoch {doc['epoch']}, directory entries "
                 f"{doc['directory_entries']}")
    lines.append("storage servers:" if doc["storage"] else "storage servers: none registered")
    for s in doc["storage"]:
        age = s["last_heartbeat_age_s"]
        lines.append(f"  {s['id']:<12} {s['state']:<8} {s['address']:<22} zone {s['zone']:<10} "
                     f"replica of {s['replica_of']:>4} volumes, last heartbeat "
                     + ("never" if age is None else f"{age:.1f} s ago"))
    under, lagging = doc["under_replicated"], doc["lagging"]
    if not under and not lagging:
        lines.append("every volume has all its replicas up to date" if doc["volumes"]
                     and any(v["replicas"] for v in doc["volumes"])
                     else "no volume placed yet")
    for v in doc["volumes"]:
        if v["vid"] not in under and v["vid"] not in lagging:
            continue
        flags = []
        if v["under_replicated"]:
            flags.append("UNDER-REPLICATED")
        if v["lagging"]:
            flags.append(f"LAGGING by up to {v['max_lag']}")
        replicas = ", ".join(
            f"{r['id']} {r['state']}" + (f" (needles {r['needles']}, lag {r['lag']})"
                                         if r["needles"] is not None else "")
            for r in v["replicas"])
        lines.append(f"  volume {v['vid']}: {' '.join(flags)}: {replicas or 'no replicas'}")
    return "\n".join(lines)
