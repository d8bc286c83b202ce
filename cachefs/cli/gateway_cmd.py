"""`cachefs gateway`: serve a remote's datasets over HTTP and the S3 API from the node's cache."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from cachefs.cli.common import HelpFormatter
from cachefs.errors import UsageError
from cachefs.names import parse_size

GATEWAY_EXAMPLES = """examples:
  # a notebook's machine: anonymous, loopback only
  cachefs gateway --listen 127.0.0.1:7480 --anonymous
  curl -r 0-99 http://127.0.0.1:7480/imagenet/v3/train/n01/x.jpg
  curl 'http://127.0.0.1:7480/imagenet/main/train/?list'

  # a team's warm cache in front of S3, for S3 clients (AWS Signature V4)
  cachefs gateway --listen 0.0.0.0:7480 --remote team --cache-dir /var/cache/cachefs \\
      --s3-keys /etc/cachefs/gateway-keys.toml
  aws --endpoint-url http://gateway:7480 s3 ls s3://imagenet/v3/
  aws --endpoint-url http://gateway:7480 s3 cp --recursive s3://imagenet/v3/val ./val

  # plain HTTP clients with a bearer token
  cachefs gateway --listen 0.0.0.0:7480 --token-file /etc/cachefs/gateway-token
  curl -H "Authorization: Bearer $(cat token)" http://gateway:7480/imagenet/v3/labels.csv

Layout: /DATASET/REF/PATH for both doors. To S3 clients a bucket is a dataset and a key's
first segment is a ref (branch, tag or commit hash): s3://imagenet/v3/train/n01/x.jpg; a
delimiter listing of a bucket's root lists its branches and tags. A branch is resolved at most
every --ref-ttl seconds; a listing's pages all read the commit its first page saw. Responses
carry the commit read in X-Cachefs-Commit and the file's BLAKE3 as ETag.

The --s3-keys file maps access key ids to secrets, as TOML (AKID = "secret") or JSON
({"AKID": "secret"}); it is re-read when it changes. Requests name datasets of the configured
remote only, never a place to connect to. Metrics: /-/metrics (Prometheus); health: /-/health."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("gateway", parents=[common], formatter_class=HelpFormatter,
                       help="serve datasets over HTTP and the S3 API, from the node's cache",
                       description="Serve every dataset of a remote over plain HTTP and the "
                                   "read side of the S3 API, through the same cache tiers as "
                                   "a mount (memory, the SSD cache dir, peers, then the "
                                   "origin). Runs in the foreground until SIGTERM.",
                       epilog=GATEWAY_EXAMPLES)
    p.add_argument("--listen", default="127.0.0.1:7480", metavar="HOST:PORT",
                   help="address to serve on (default 127.0.0.1:7480)")
    p.add_argument("--cache-dir",
                   help="SSD cache directory, shared with the node's mounts (default: "
                        "$XDG_CACHE_HOME/cachefs)")
    p.add_argument("--cache-size", type=parse_size,
                   help="SSD cache bound (default: half the free disk, keeping a free-space "
                        "floor)")
    p.add_argument("--memory-cache", type=parse_size, default="1GiB",
                   help="memory cache bound (default 1GiB)")
    p.add_argument("--ref-ttl", type=float, default=5.0, metavar="SECONDS",
                   help="how long a resolved branch or tag is reused (default 5)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not log each request (by default one line each on stderr, through "
                        "the cachefs.gateway.access logger)")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="also serve the Prometheus metrics at http://HOST:PORT/metrics (they "
                        "are always at /-/metrics on --listen)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds before an uncached read that the origin cannot serve fails "
                        "(default 30)")
    auth = p.add_argument_group("authentication (one at least)")
    auth.add_argument("--s3-keys", metavar="FILE",
                      help="access key id -> secret map (TOML or JSON) for AWS Signature V4, "
                           "in headers and presigned URLs")
    auth.add_argument("--token-file", metavar="FILE",
                      help="a bearer token: plain HTTP clients send 'Authorization: Bearer "
                           "TOKEN'")
    auth.add_argument("--anonymous", action="store_true",
                      help="serve without authentication (loopback addresses only, unless "
                           "--insecure)")
    auth.add_argument("--insecure", action="store_true",
                      help="allow --anonymous on a non-loopback address")
    peers = p.add_argument_group("peer tier", "as for `cachefs mount`")
    peers.add_argument("--cache-peers", metavar="SOURCE,...",
                       help="the peer ring's members (HOST:PORT, dns:NAME:PORT, file:PATH, "
                            "master:REMOTE)")
    peers.add_argument("--cache-peers-file", metavar="FILE",
                       help="a file listing them, re-read when it changes")
    peers.add_argument("--peer-token-file", metavar="FILE",
                       help="file holding the cluster token for peer calls (default: the "
                            "CACHEFS_TOKEN environment variable)")
    p.set_defaults(func=gateway)


def gateway(args: argparse.Namespace) -> int:
    from cachefs.config import Config
    from cachefs.dataset.repo import Repository
    from cachefs.fuse.config import default_cache_dir
    from cachefs.gateway.auth import Authenticator, KeyFile, TokenFile
    from cachefs.gateway.server import GatewaySettings, check_exposure, run_gateway
    from cachefs.grpc_auth import load_token
    from cachefs.httpserver import parse_listen
    from cachefs.remotes.registry import open_remote_url

    host, port = parse_listen(args.listen, "--listen")
    if not (args.s3_keys or args.token_file or args.anonymous):
        raise UsageError("cachefs gateway: choose how clients authenticate: --s3-keys FILE "
                         "(S3 clients, AWS Signature V4), --token-file FILE (plain HTTP, "
                         "'Authorization: Bearer'), or --anonymous (loopback only)")
    auth = Authenticator(KeyFile(args.s3_keys) if args.s3_keys else None,
                         TokenFile(args.token_file) if args.token_file else None,
                         anonymous=args.anonymous)
    check_exposure(host, auth, args.insecure)
    settings_file = Config.load()
    remote_arg = args.remote or settings_file.default_remote
    remote_url = settings_file.url_of(remote_arg)
    remote_name = remote_arg if "://" not in remote_arg else None
    cache_peers = None
    if args.cache_peers is not None:
        from cachefs.peer.sources import parse_specs

        cache_peers = parse_specs(args.cache_peers)
    settings = GatewaySettings(
        host=host, port=port, remote_url=remote_url, remote_name=remote_name,
        cache_dir=Path(os.path.abspath(args.cache_dir or default_cache_dir())),
        cache_size=args.cache_size, memory_cache=args.memory_cache, ref_ttl=args.ref_ttl,
        origin_timeout=args.timeout, cache_peers=cache_peers,
        cache_peers_file=(os.path.abspath(args.cache_peers_file) if args.cache_peers_file
                          else None),
        peer_token=load_token(args.peer_token_file) if (cache_peers or args.cache_peers_file)
        else None, access_log=args.access_log, metrics_listen=args.metrics_listen)
    if args.verbose == 0:  # a server says what it does: its start, its stop, its requests
        logging.getLogger("cachefs.gateway").setLevel(logging.INFO)
    repo = Repository(open_remote_url(remote_url))

    def ready(address: str) -> None:
        print(f"gateway serving on {address}", flush=True)

    run_gateway(settings, repo, auth, ready)
    return 0
