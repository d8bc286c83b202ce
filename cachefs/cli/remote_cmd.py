"""`cachefs remote add|list|remove`: named remotes in the user's config file."""

from __future__ import annotations

import argparse

from cachefs.cli.common import HelpFormatter, print_json
from cachefs.config import Config
from cachefs.remotes.registry import check_remote_url

EXAMPLES = """examples:
  cachefs remote add team 's3://datasets/cachefs?endpoint_url=http://rgw:7480' --default
  cachefs remote add scratch file:///mnt/nvme/cachefs-repo
  cachefs remote list --json
  cachefs remote remove scratch

Credentials never go into URLs: S3 uses boto3's default chain (AWS_ACCESS_KEY_ID, profiles,
instance roles). `remote add` checks a URL as opening it would, without connecting: the scheme
(file, s3, oss, haystack), the bucket or host, and every option and its value.
  s3://BUCKET[/PREFIX]  endpoint_url=http(s)://HOST[:PORT], region, addressing_style=
    auto|path|virtual, request_checksum_calculation=when_required|when_supported (for S3
    clones that reject CRC checksums), max_connections (>= 2)
  oss://BUCKET[/PREFIX] endpoint=http(s)://HOST (required), region, max_connections (>= 2)
  haystack://HOST:PORT[,HOST:PORT...][/NAMESPACE]  token_file, timeout (seconds)
  file:///PATH          no options
"""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("remote", parents=[common], formatter_class=HelpFormatter,
                       help="manage named remotes (repositories)",
                       description="Add, list and remove named remotes. The remote 'local' "
                                   "(the embedded repository) always exists.",
                       epilog=EXAMPLES)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", parents=[common], help="add a remote",
                             formatter_class=HelpFormatter, epilog=EXAMPLES)
    add.add_argument("name")
    add.add_argument("url", help="file:///path, s3://bucket/prefix?options, "
                     "oss://bucket/prefix?endpoint=..., haystack://host:port[,...]")
    add.add_argument("--default", action="store_true", help="make it the default remote")
    add.set_defaults(func=add_remote)
    ls = actions.add_parser("list", parents=[common], help="list remotes")
    ls.set_defaults(func=list_remotes)
    rm = actions.add_parser("remove", parents=[common], help="forget a remote (data is kept)")
    rm.add_argument("name")
    rm.set_defaults(func=remove_remote)


def add_remote(args: argparse.Namespace) -> int:
    # Refuse a URL now rather than at its first use (ConfigError: exit 2, nothing saved).
    check_remote_url(args.url)
    config = Config.load().with_remote(args.name, args.url, args.default)
    config.save()
    if args.json:
        print_json({"name": args.name, "url": args.url, "default": config.default == args.name})
    else:
        print(f"added remote {args.name} -> {args.url}" + (" (default)" if args.default else ""))
    return 0


def list_remotes(args: argparse.Namespace) -> int:
    config = Config.load()
    rows = [{"name": n, "url": u, "default": n == config.default_remote}
            for n, u in config.all_remotes().items()]
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            print(f"{'*' if row['default'] else ' '} {row['name']:<16} {row['url']}")
    return 0


def remove_remote(args: argparse.Namespace) -> int:
    Config.load().without_remote(args.name).save()
    if args.json:
        print_json({"removed": args.name})
    else:
        print(f"removed remote {args.name}")
    return 0
