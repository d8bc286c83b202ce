"""`cachefs storage serve|stat|compact|verify`: run a Haystack storage server, administer one."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from cachefs.cli.common import HelpFormatter, print_json
from cachefs.errors import CorruptObject
from cachefs.names import format_size, parse_size

log = logging.getLogger("cachefs.storage")

TOKEN_HELP = "file holding the cluster token (default: the CACHEFS_TOKEN environment variable)"

SERVE_EXAMPLES = """examples:
  # a single machine, no token: loopback only
  cachefs storage serve --data-dir /srv/cachefs --listen 127.0.0.1:8700
  # in a cluster: every address, every call must carry the cluster token
  cachefs storage serve --data-dir /srv/cachefs --listen 0.0.0.0:8700 \\
      --token-file /etc/cachefs/token --fsync-interval-ms 2
  # a member of a haystack cluster: registers with the masters, heartbeats, runs repairs
  cachefs storage serve --data-dir /srv/cachefs --listen 0.0.0.0:8700 \\
      --advertise 10.0.0.5:8700 --master 10.0.0.1:7700,10.0.0.2:7700,10.0.0.3:7700 \\
      --server-id storage-5 --zone rack-2 --token-file /etc/cachefs/token

The data directory holds the volumes (DIR/volumes/); the number of volumes is fixed when it is
created (--volumes, default: the store's). On start the store rebuilds what a crash left
behind and the report says what was recovered and which torn tails were truncated. SIGTERM or
SIGINT stops accepting calls, lets those in flight finish and closes the store."""

STAT_EXAMPLES = """examples:
  cachefs storage stat 127.0.0.1:8700
  CACHEFS_TOKEN=$(cat /etc/cachefs/token) cachefs storage stat 10.0.0.5:8700 --json"""

COMPACT_EXAMPLES = """examples:
  cachefs storage compact 127.0.0.1:8700            # every volume
  cachefs storage compact 127.0.0.1:8700 --vid 17 --json"""

VERIFY_EXAMPLES = """examples:
  cachefs storage verify 127.0.0.1:8700
  cachefs storage verify 10.0.0.5:8700 --vid 3 --token-file /etc/cachefs/token --json

Reads every needle and checks its checksum; exits with 6 when any is corrupt."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("storage", formatter_class=HelpFormatter,
                       help="run or administer a Haystack storage server",
                       description="The storage server of a haystack:// cluster: logical "
                                   "volumes of append-only segment files, served over gRPC.",
                       epilog=f"{SERVE_EXAMPLES}\n\n{STAT_EXAMPLES}")
    roles = p.add_subparsers(dest="storage_command", required=True, metavar="COMMAND")
    _register_serve(roles, common)
    _register_admin(roles, common)


def _register_serve(roles: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    s = roles.add_parser("serve", parents=[common], formatter_class=HelpFormatter,
                         help="serve a data directory over gRPC",
                         description="Serve the volumes of a data directory over gRPC "
                                     "(proto/storage.proto).", epilog=SERVE_EXAMPLES)
    s.add_argument("--data-dir", required=True, metavar="DIR",
                   help="where the volumes live (created if missing)")
    s.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve, e.g. 127.0.0.1:8700 (without a token: loopback only)")
    s.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)
    s.add_argument("--fsync-interval-ms", type=float, default=0.0, metavar="N",
                   help="group commit: at most one fsync per N ms, so more writes share each "
                        "(default 0: the next fsync starts when the last ends; the writes that "
                        "arrived meanwhile still share it)")
    s.add_argument("--buffered-writes", action="store_true",
                   help="append needles through the page cache instead of with O_DIRECT "
                        "(default: O_DIRECT where the file system allows it, which spares the "
                        "CPU a copy of every byte; writes are durable either way)")
    s.add_argument("--index-cache", type=int, metavar="N",
                   help="keep the index entries of up to N recently read needles in memory "
                        "(~300 bytes each; default: the store's), so that a warm read needs no "
                        "index transaction; 0 turns it off")
    s.add_argument("--memory-cache", type=parse_size, default=0, metavar="SIZE",
                   help="keep the data of hot needles in memory, up to SIZE (e.g. 2GiB): "
                        "repeated reads skip the disk and the checksum, concurrent reads of one "
                        "needle make one disk read, and a scan does not flush what is hot "
                        "(TinyLFU admission). Default 0: off")
    s.add_argument("--volumes", type=int, metavar="N",
                   help="logical volumes of a new data directory (an existing one keeps its own)")
    s.add_argument("--segment-size", type=parse_size, metavar="SIZE",
                   help="roll a volume's segment file at this size, e.g. 1GiB "
                        "(default: the store's)")
    s.add_argument("--master", metavar="ADDRS",
                   help="register with these masters (HOST:PORT[,HOST:PORT...], haystack:// "
                        "optional), heartbeat and run the repairs they ask for")
    s.add_argument("--server-id", metavar="ID",
                   help="this server's id in the cluster, stable across restarts (with "
                        "--master; 1 to 64 of A-Z a-z 0-9 . _ -)")
    s.add_argument("--zone", default="default", metavar="ZONE",
                   help="failure domain: replicas go to distinct zones where possible "
                        "(default: 'default')")
    s.add_argument("--advertise", metavar="HOST:PORT",
                   help="the address clients and other servers reach this one at (default: "
                        "--listen; required when --listen is a wildcard address)")
    s.add_argument("--heartbeat-interval", type=float, default=3.0, metavar="SECONDS",
                   help="seconds between heartbeats to the masters (default 3)")
    s.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics: needles, bytes "
                        "and garbage per volume, fsync latency, the memory cache, repairs, "
                        "RPCs by method and code (default: off)")
    s.set_defaults(func=serve)


def _register_admin(roles: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for name, help_text, description, epilog, func in (
        ("stat", "print a server's volumes, needles, bytes and free space",
         "Print a storage server's totals and per-volume statistics, the corrupt reads it saw "
         "and what its last start recovered.", STAT_EXAMPLES, stat),
        ("compact", "reclaim the space of deleted needles",
         "Rewrite the live needles of one volume (or every volume) into new segments while "
         "reads continue, and print what was reclaimed.", COMPACT_EXAMPLES, compact),
        ("verify", "check every needle's checksum",
         "Read every needle of one volume (or every volume) and check its checksum.",
         VERIFY_EXAMPLES, verify),
    ):
        a = roles.add_parser(name, parents=[common], formatter_class=HelpFormatter,
                             help=help_text, description=description, epilog=epilog)
        a.add_argument("address", metavar="ADDR", help="the server, HOST:PORT")
        a.add_argument("--token-file", metavar="FILE", help=TOKEN_HELP)
        a.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="give up on an unreachable server after this long (default 60)")
        if name != "stat":
            a.add_argument("--vid", type=int, metavar="V", help="only this volume")
        a.set_defaults(func=func)


def serve(args: argparse.Namespace) -> int:
    from cachefs.grpc_auth import check_listen, load_token
    from cachefs.httpserver import parse_listen
    from storage_server.server import serve as serve_store
    from storage_server.store import VolumeStore

    token = load_token(args.token_file)
    host, _ = parse_listen(args.listen, "--listen")
    check_listen(host, token)  # before the store is opened: a refused start changes nothing
    if args.metrics_listen:
        parse_listen(args.metrics_listen, "--metrics-listen")
    agent = agent_config(args, host)
    options: dict[str, Any] = {"volumes": args.volumes,
                               "fsync_interval_ms": args.fsync_interval_ms,
                               "direct_io": not args.buffered_writes}
    if args.segment_size is not None:
        options["segment_bytes"] = args.segment_size
    if args.index_cache is not None:
        options["index_cache_entries"] = args.index_cache
    options["memory_cache_bytes"] = args.memory_cache
    store = VolumeStore(args.data_dir, **options)
    try:
        print(recovery_line(store.stat()), flush=True)

        def ready(address: str) -> None:
            print(f"serving on {address} ({store.volumes} volumes, data in {args.data_dir})",
                  flush=True)

        serve_store(store, args.listen, token, ready=ready, agent=agent,
                    metrics_listen=args.metrics_listen)
    finally:
        store.close()
    print("stopped", flush=True)
    return 0


def agent_config(args: argparse.Namespace, listen_host: str) -> Any:
    """The `AgentConfig` of --master and its companions (None without --master)."""
    from cachefs.errors import UsageError
    from cachefs.httpserver import parse_listen

    if not args.master:
        for option in ("server_id", "advertise"):
            if getattr(args, option):
                raise UsageError(f"--{option.replace('_', '-')} needs --master")
        return None
    from master.client import parse_masters
    from storage_server.agent import AgentConfig

    if not args.server_id:
        raise UsageError("--master needs --server-id ID (stable across restarts)")
    if not args.advertise and listen_host in ("0.0.0.0", "::"):
        raise UsageError(f"--listen {args.listen} is a wildcard address: give --advertise "
                         "HOST:PORT, the address the others reach this server at")
    if args.advertise:
        parse_listen(args.advertise, "--advertise")
    return AgentConfig(masters=tuple(parse_masters(args.master)), server_id=args.server_id,
                       zone=args.zone, advertise=args.advertise or "",
                       interval=args.heartbeat_interval)


def recovery_line(doc: dict[str, Any]) -> str:
    """What the store's start recovered (from its stat() document), for people."""
    rec = doc["recovered"]
    parts = []
    if rec["needles_indexed"]:
        parts.append(f"indexed {rec['needles_indexed']} needles "
                     f"({rec['tombstones_indexed']} deletions) written after the index "
                     f"({rec['segments_scanned']} segments scanned)")
    for cut in rec["truncated"]:
        parts.append(f"truncated a torn tail of {cut['bytes']} bytes: volume {cut['vid']} "
                     f"segment {cut['segment']:08x} at offset {cut['offset']} ({cut['reason']})")
    if rec["retired_removed"]:
        parts.append(f"removed {rec['retired_removed']} segments a compaction retired")
    for missing in rec["missing"]:
        parts.append(f"MISSING: volume {missing['vid']} segment {missing['segment']:08x} "
                     f"({missing['size']} bytes on disk, {missing['indexed']} indexed)")
    if not parts:
        return "recovery: clean, nothing to redo"
    return "recovery:\n" + "\n".join(f"  {part}" for part in parts)


def _client(args: argparse.Namespace) -> Any:
    from cachefs.grpc_auth import load_token
    from storage_server.client import StorageClient

    return StorageClient(args.address, token=load_token(args.token_file), timeout=args.timeout)


def stat(args: argparse.Namespace) -> int:
    with _client(args) as client:
        doc = client.stat()
    if args.json:
        print_json(doc)
    else:
        print(describe_stat(doc))
    return 0


def compact(args: argparse.Namespace) -> int:
    with _client(args) as client:
        doc = client.compact(args.vid)
    if args.json:
        print_json(doc)
    else:
        print(describe_compact(doc))
    return 0


def verify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        doc = client.verify(args.vid)
    corrupt = doc["corrupt"]
    if args.json:
        print_json(doc)
    else:
        print(f"checked {doc['checked']} needles: {len(corrupt)} corrupt")
        for key in corrupt:
            print(f"  corrupt: {key}")
    return CorruptObject.exit_code if corrupt else 0


def describe_stat(doc: dict[str, Any]) -> str:
    totals = doc["totals"]
    lines = [
        f"{doc['volumes']} volumes, {totals['segments']} segments, {totals['live']} needles "
        f"({format_size(totals['live_bytes'])}), {totals['deleted']} deleted",
        f"segment files {format_size(totals['bytes'])}, free {format_size(doc['free_bytes'])}",
        f"corrupt reads {doc['corrupt_reads']}, fsyncs {doc['fsyncs']} for "
        f"{doc['needles_committed']} needles",
        memory_cache_line(doc.get("memory_cache") or {}),
        recovery_line(doc).replace("recovery:", "last start's recovery:", 1),
    ]
    return "\n".join(lines)


def memory_cache_line(cache: dict[str, Any]) -> str:
    """The memory cache's figures (from the stat() document), for people."""
    if not cache.get("capacity_bytes"):
        return "memory cache: off"
    return (f"memory cache: {format_size(cache['used_bytes'])} of "
            f"{format_size(cache['capacity_bytes'])} in {cache['entries']} needles; "
            f"{cache['hits']} hits ({format_size(cache['hit_bytes'])}), {cache['misses']} "
            f"misses, {cache['evictions']} evictions, {cache['admissions_refused']} "
            f"admissions refused")


def describe_compact(doc: dict[str, Any]) -> str:
    lines = [f"compacted {len(doc['volumes'])} volumes: {format_size(doc['bytes_before'])} -> "
             f"{format_size(doc['bytes_after'])}, {format_size(doc['reclaimed'])} reclaimed"]
    lines += [f"  corrupt needle dropped: {key}" for key in doc["corrupt"]]
    return "\n".join(lines)
