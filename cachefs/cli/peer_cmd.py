"""`cachefs peer serve|status`: serve a node's SSD cache to its peers; show the ring."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cachefs.cli.common import HelpFormatter, print_json
from cachefs.names import parse_size

TOKEN_HELP = "file holding the cluster token (default: the CACHEFS_TOKEN environment variable)"
STATUS_TIMEOUT_S = 2.0
REGISTER_TIMEOUT_S = 5.0  # one registration, retries across the masters included
SHARE_SAMPLE = 20_000  # chunk names sampled to show each member's share of the ring

SERVE_EXAMPLES = """examples:
  # one node, no token: loopback only
  cachefs peer serve --cache-dir /var/cache/cachefs --listen 127.0.0.1:7470
  # every node of a cluster, on the cache dir its mounts use
  cachefs peer serve --cache-dir /var/cache/cachefs --listen 0.0.0.0:7470 \\
      --advertise 10.0.0.1:7470 --token-file /etc/cachefs/token \\
      --metrics-listen 0.0.0.0:9470     # Prometheus: http://10.0.0.1:9470/metrics
  # then, on every node:
  cachefs mount imagenet@v3 /mnt/imagenet --remote team --cache-dir /var/cache/cachefs \\
      --cache-peers 10.0.0.1:7470,10.0.0.2:7470,10.0.0.3:7470 --token-file /etc/cachefs/token

Each chunk has one owner among the peers (rendezvous hashing of its name over the members that
answer); a mount that misses a chunk asks its owner, and the owner reads it from the origin once
for every node, keeps it in its cache and serves it. A peer fetches for others only from the
remotes configured on its own node (`cachefs remote add`), named in the request: never a URL.
--advertise must be the address the mounts list (it is the member's identity in the ring).

With a haystack cluster, --register REMOTE (a configured haystack remote) registers the node in
the masters' node registry and heartbeats it every 3 s: mounts with --cache-peers master:REMOTE
find it there, and lose it within the masters' --down-after (10 s) once it stops. It registers
the dataset versions its mounts serve (the mounts of this machine on the same --cache-dir, plus
--serving), for mounts with --peer-scope dataset."""

STATUS_EXAMPLES = """examples:
  cachefs peer status --cache-peers 10.0.0.1:7470,10.0.0.2:7470 --token-file /etc/cachefs/token
  cachefs peer status --cache-peers-file /etc/cachefs/peers --json
  cachefs peer status --cache-peers dns:peers.cachefs.svc.cluster.local:7470
  cachefs peer status --cache-peers master:hay

Asks every member for its Status (2 s each): live members, each one's share of the chunks, and
its server's counters (chunks served from its cache and from the origin, origin bytes fetched
on behalf of others); and this machine's mounts, for the members they hold in quarantine (a
member that served a corrupt chunk is skipped by that mount for a minute)."""


DRAIN_EXAMPLES = """examples:
  cachefs peer drain 10.0.0.1:7470 --token-file /etc/cachefs/token     # before maintenance
  cachefs peer drain 10.0.0.1:7470 --token-file /etc/cachefs/token --resume

SIGTERM drains too (for --drain-seconds) before the server stops: a Kubernetes pod's peer
container leaves the rings, and its readiness probe fails, before it goes."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("peer", formatter_class=HelpFormatter,
                       help="serve this node's cache to its peers, or show the peer ring",
                       description="The peer tier: N nodes reading one dataset read it from the "
                                   "origin about once.",
                       epilog=f"{SERVE_EXAMPLES}\n\n{STATUS_EXAMPLES}")
    roles = p.add_subparsers(dest="peer_command", required=True, metavar="COMMAND")
    s = roles.add_parser("serve", formatter_class=HelpFormatter,
                         help="serve this node's SSD cache directory to the other nodes",
                         description="Serve the node's shared SSD cache directory over gRPC "
                                     "(proto/peer.proto), fetching chunks it lacks from the "
                                     "origin once for every asker.", epilog=SERVE_EXAMPLES)
    s.add_argument("--cache-dir", metavar="DIR",
                   help="the SSD cache directory the node's mounts use (default: "
                        "$XDG_CACHE_HOME/cachefs)")
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve, e.g. 0.0.0.0:7470 (without a token: loopback only)")
    s.add_argument("--advertise", metavar="HOST:PORT",
                   help="the address the mounts list for this node (default: --listen; "
                        "required when --listen is a wildcard address)")
    s.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)
    s.add_argument("--remotes", metavar="NAME,...",
                   help="the configured remotes this node fetches from for its peers "
                        "(default: every configured remote)")
    s.add_argument("--datasets", metavar="PATTERN,...",
                   help="serve chunks only for these datasets (shell patterns; default: all)")
    s.add_argument("--cache-size", type=parse_size, metavar="SIZE",
                   help="SSD cache bound, as for `cachefs mount` (default: the cache's)")
    s.add_argument("--register", metavar="REMOTE",
                   help="register this node, and heartbeat it, in the node registry of the "
                        "haystack cluster behind the configured remote REMOTE (for mounts "
                        "using --cache-peers master:REMOTE)")
    s.add_argument("--node-name", metavar="NAME",
                   help="this node's name in the registry (default: the host name)")
    s.add_argument("--serving", metavar="DATASET@COMMIT,...",
                   help="versions to register as served, besides those of this machine's "
                        "mounts on --cache-dir (found by themselves)")
    s.add_argument("--heartbeat-interval", type=float, default=3.0, metavar="SECONDS",
                   help="seconds between heartbeats with --register (default 3; keep it "
                        "well under the masters' --down-after)")
    s.add_argument("--drain-seconds", type=float, default=2.0, metavar="SECONDS",
                   help="on SIGTERM, seconds to stay up draining (chunk requests refused at "
                        "once, status 'draining') before stopping, so the rings and a "
                        "readiness probe see the node leave (default 2)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics: chunks served "
                        "from the cache and from the origin, origin fetches and bytes, "
                        "refusals, draining, RPCs by method and code (default: none)")
    s.add_argument("-v", "--verbose", action="count", default=0,
                   help="log more (-vv for debug)")
    s.set_defaults(func=serve)

    d = roles.add_parser("drain", parents=[common], formatter_class=HelpFormatter,
                         help="take a peer server out of the rings without stopping it",
                         description="Ask a peer server to drain: it refuses chunk requests "
                                     "at once (askers go to each chunk's next member instead "
                                     "of waiting a deadline), says 'draining' in its status "
                                     "(probers keep it out of their rings), and stops "
                                     "heartbeating to the node registry; calls in flight "
                                     "finish. --resume undoes it.",
                         epilog=DRAIN_EXAMPLES)
    d.add_argument("address", metavar="HOST:PORT", help="the peer server, as the rings know it")
    d.add_argument("--resume", action="store_true", help="serve again")
    d.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)
    d.set_defaults(func=drain)

    t = roles.add_parser("status", parents=[common], formatter_class=HelpFormatter,
                         help="the ring as this node sees it",
                         description="Ask every member of the ring for its status.",
                         epilog=STATUS_EXAMPLES)
    members = t.add_mutually_exclusive_group(required=True)
    members.add_argument("--cache-peers", metavar="SOURCE,...",
                         help="the members, or where they come from, as for `cachefs mount`: "
                              "HOST:PORT, dns:NAME:PORT, file:PATH, master:REMOTE")
    members.add_argument("--cache-peers-file", metavar="FILE", help="a file listing them")
    t.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)
    t.add_argument("--alive", action="store_true",
                   help="exit 0 when every member answers, draining ones included (a liveness "
                        "check); without it, exit 0 when at least one member is live, i.e. "
                        "answers and is not draining (a readiness check)")
    t.set_defaults(func=status)


def serve(args: argparse.Namespace) -> int:
    from cachefs.cache.disk import DiskCache
    from cachefs.cache.tiered import object_is_intact
    from cachefs.config import Config
    from cachefs.errors import UsageError
    from cachefs.fuse.config import default_cache_dir
    from cachefs.grpc_auth import check_listen, load_token
    from cachefs.httpserver import parse_listen
    from cachefs.peer.ring import parse_member
    from cachefs.peer.server import PeerService
    from cachefs.peer.server import serve as serve_peer

    token = load_token(args.token_file)
    host, _ = parse_listen(args.listen, "--listen")
    check_listen(host, token)  # before the cache is opened: a refused start changes nothing
    if args.metrics_listen:
        parse_listen(args.metrics_listen, "--metrics-listen")
    if args.advertise:
        advertise = parse_member(args.advertise, "--advertise")
    elif host in ("0.0.0.0", "::"):
        raise UsageError(f"--listen {args.listen} is a wildcard address: give --advertise "
                         "HOST:PORT, the address the mounts list for this node")
    else:
        advertise = ""  # the bound address
    configured = Config.load().all_remotes()
    remotes = configured
    if args.remotes:
        wanted = [name.strip() for name in args.remotes.split(",") if name.strip()]
        unknown = [name for name in wanted if name not in configured]
        if unknown:
            raise UsageError(f"--remotes: {', '.join(unknown)} not configured on this node "
                             f"(configured: {', '.join(sorted(configured))})")
        remotes = {name: configured[name] for name in wanted}
    datasets = [p.strip() for p in (args.datasets or "").split(",") if p.strip()]
    registry = _registry(args)  # checked before the cache is opened
    cache_dir = Path(os.path.abspath(args.cache_dir)) if args.cache_dir else default_cache_dir()
    cache = DiskCache(cache_dir, capacity_bytes=args.cache_size, verify=object_is_intact)
    service = PeerService(cache, remotes, datasets, advertise)
    heartbeat = None

    def ready(address: str) -> None:
        nonlocal heartbeat
        if registry is not None:
            from cachefs.peer.register import NodeHeartbeat

            extra = _serving(args.serving)
            versions = LocalVersions(str(cache.directory))
            heartbeat = NodeHeartbeat(registry, args.node_name or socket.gethostname(),
                                      service.address, cache.capacity_bytes,
                                      lambda: [*extra, *versions()], args.heartbeat_interval,
                                      paused=service.draining.is_set)
            heartbeat.start()
        print(f"serving {cache.directory} to peers on {address} as {service.address}; "
              f"remotes: {', '.join(sorted(remotes))}", flush=True)

    try:
        serve_peer(service, args.listen, token, ready=ready, drain_s=args.drain_seconds,
                   metrics_listen=args.metrics_listen)
    finally:
        if heartbeat is not None:
            heartbeat.close()
        elif registry is not None:
            registry.close()
        cache.close()
    print("stopped", flush=True)
    return 0


def _registry(args: argparse.Namespace) -> Any:
    """The node registry of --register's cluster (a NodeRegistry), or None."""
    from cachefs.errors import UsageError

    if args.register is None:
        for flag, value in (("--node-name", args.node_name), ("--serving", args.serving)):
            if value:
                raise UsageError(f"{flag} needs --register REMOTE")
        return None
    from cachefs.peer.register import NODE_NAME_RE
    from cachefs.peer.sources import remote_url
    from cachefs.remotes.haystack import NodeRegistry

    if args.node_name is not None and not NODE_NAME_RE.fullmatch(args.node_name):
        raise UsageError(f"--node-name {args.node_name!r}: 1 to 253 of A-Z a-z 0-9 . _ -")
    if not 0.1 <= args.heartbeat_interval <= 600:
        raise UsageError("--heartbeat-interval: between 0.1 and 600 seconds")
    _serving(args.serving)
    return NodeRegistry.from_url(remote_url(args.register), timeout=REGISTER_TIMEOUT_S)


def _serving(text: str | None) -> list[str]:
    from cachefs.errors import UsageError
    from cachefs.peer.sources import SERVING_RE

    versions = [v for v in (text or "").replace(",", " ").split()]
    for version in versions:
        if not SERVING_RE.fullmatch(version):
            raise UsageError(f"--serving {version!r}: expected DATASET@COMMIT (the commit's "
                             "64 hex digits)")
    return versions


class LocalVersions:
    """The versions ("DATASET@COMMIT") of this machine's cachefs mounts on one cache
    directory: asked of each mount once (its version never changes), by mount point and
    FUSE connection, so a remount is asked again. A mount that does not answer (starting,
    hung, dead) is asked again at most every `RETRY_S`, so it cannot slow every heartbeat
    down; one on another cache directory is never asked again ("" below)."""

    RETRY_S = 10.0

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir
        self._known: dict[tuple[str, str], tuple[str | None, float]] = {}

    def __call__(self) -> list[str]:
        import time

        from cachefs.errors import CachefsError
        from cachefs.fuse.mount import FSTYPE, mount_info, mount_table

        try:
            mounts = [(e.mountpoint, e.device) for e in mount_table() if e.fstype == FSTYPE]
        except OSError:
            return []
        now = time.monotonic()
        known: dict[tuple[str, str], tuple[str | None, float]] = {}
        for key in mounts:
            version, asked = self._known.get(key, (None, -math.inf))
            if version is None and now - asked >= self.RETRY_S:
                version = self._ask(key[0], mount_info, CachefsError)
                asked = now
            known[key] = (version, asked)
        self._known = known
        return sorted({version for version, _ in known.values() if version})  # not None, ""

    def _ask(self, mountpoint: str, mount_info: Any, errors: type[Exception]) -> str | None:
        try:
            info = mount_info(mountpoint, STATUS_TIMEOUT_S)
        except errors:
            return None
        if info.get("state") != "serving":
            return None
        if os.path.abspath(str(info.get("cache_dir", ""))) != self.cache_dir:
            return ""
        return f"{info['dataset']}@{info['commit']}"


def status(args: argparse.Namespace) -> int:
    from cachefs.errors import UsageError
    from cachefs.grpc_auth import load_token
    from cachefs.peer.client import PeerCallError, PeerClient
    from cachefs.peer.members import Membership
    from cachefs.peer.ring import shares
    from cachefs.peer.sources import parse_specs

    token = load_token(args.token_file)
    if args.cache_peers is not None:
        membership = Membership(parse_specs(args.cache_peers), token=token)
    else:
        membership = Membership(members_file=os.path.abspath(args.cache_peers_file),
                                token=token)
    try:
        members = membership.members()
        sources = membership.state()["sources"]
    finally:
        membership.close()
    if not members:
        raise UsageError("no peer given" if args.cache_peers_file is None and not sources
                         else "no member found: " + ", ".join(s["source"] for s in sources))

    def ask(member: str) -> dict[str, Any]:
        client = PeerClient(member, token)
        try:
            server = client.status(STATUS_TIMEOUT_S)
        except PeerCallError as e:
            return {"live": False, "error": str(e)}
        finally:
            client.close()
        if server.get("draining"):  # up, but out of every ring
            return {"live": False, "draining": True, "server": server, "error": "draining"}
        return {"live": True, "server": server}

    with ThreadPoolExecutor(max_workers=min(32, len(members))) as pool:
        answers = dict(zip(members, pool.map(ask, members), strict=True))
    quarantined = _quarantined_by_local_mounts()
    live = [m for m in members if answers[m]["live"]]
    sample = (f"{i:064x}" for i in range(SHARE_SAMPLE))
    share = shares(live, (_spread(name) for name in sample)) if live else {}
    doc = {
        "members": [{"address": m, "share": round(share.get(m, 0.0), 4),
                     "quarantined_by": quarantined.get(m, []), **answers[m]}
                    for m in members],
        "live": live,
        "down": [m for m in members if m not in live],
        "quarantined": sorted(m for m in members if quarantined.get(m)),
        "sources": [{"source": s["source"], "members": s["members"]} for s in sources],
    }
    if args.json:
        print_json(doc)
    else:
        _print_status(doc)
    if args.alive:
        return 0 if all(answers[m]["live"] or answers[m].get("draining") for m in members) else 1
    return 0 if live else 1


def drain(args: argparse.Namespace) -> int:
    from cachefs.grpc_auth import load_token
    from cachefs.peer.client import PeerClient
    from cachefs.peer.ring import parse_member

    address = parse_member(args.address, "address")
    client = PeerClient(address, load_token(args.token_file))
    try:
        draining = client.drain(resume=args.resume, timeout=STATUS_TIMEOUT_S)
    finally:
        client.close()
    if args.json:
        print_json({"address": address, "draining": draining})
    else:
        print(f"{address}: {'draining (out of the rings)' if draining else 'serving'}")
    return 0


def _quarantined_by_local_mounts() -> dict[str, list[str]]:
    """member -> the mounts of this machine that hold it in quarantine (a member that served a
    corrupt chunk; each mount decides for itself). Mounts that do not answer in time, or run
    without peers, are skipped."""
    from cachefs.errors import CachefsError
    from cachefs.fuse.mount import cachefs_mounts, mount_stats

    found: dict[str, list[str]] = {}
    for mountpoint in cachefs_mounts():
        try:
            ring = mount_stats(mountpoint, STATUS_TIMEOUT_S).get("peer_ring")
        except CachefsError:
            continue
        if isinstance(ring, dict):
            for member in ring.get("quarantined", {}):
                found.setdefault(member, []).append(mountpoint)
    return found


def _spread(name: str) -> str:
    """Sample chunk names spread like real ones (BLAKE3 outputs), from a counter."""
    from cachefs.dataset.objects import hash_bytes

    return hash_bytes(name.encode())


def _print_status(doc: dict[str, Any]) -> None:
    rows = [("MEMBER", "STATE", "SHARE", "FROM CACHE", "FROM ORIGIN", "ORIGIN BYTES")]
    for m in doc["members"]:
        server = m.get("server", {})
        state = (("quarantined" if m["quarantined_by"] else "live") if m["live"]
                 else "draining" if m.get("draining") else "down")
        rows.append((m["address"], state, f"{m['share']:.1%}",
                     str(server.get("served_from_cache", "-")),
                     str(server.get("served_from_origin", "-")),
                     str(server.get("origin_bytes", "-"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    for m in doc["members"]:
        if not m["live"]:
            print(f"{m['address']}: {m['error']}", file=sys.stderr)
    print("from: " + "; ".join(f"{s['source']} ({len(s['members'])})" for s in doc["sources"]))
