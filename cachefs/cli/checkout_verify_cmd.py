"""`cachefs checkout|verify`: writing a version out, and checking a version's integrity."""

from __future__ import annotations

import argparse
import sys

from cachefs.cli.common import HelpFormatter, open_repository, print_json, progress_for
from cachefs.dataset.checkout import checkout
from cachefs.dataset.verify import verify
from cachefs.errors import CorruptObject
from cachefs.names import format_size, parse_address


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "checkout", parents=[common], formatter_class=HelpFormatter,
        help="write a version (or a path in it) to a local directory",
        description="Materialize DATASET@REF (or PATH inside it) into DIR, which must not exist "
                    "or be empty. Every chunk is verified against its hash before it is written; "
                    "the result appears under DIR only when complete.",
        epilog="examples:\n  cachefs checkout imagenet@v1 /data/imagenet-v1\n"
               "  cachefs checkout imagenet@main:val /tmp/val\n")
    p.add_argument("target", metavar="DATASET[@REF][:PATH]")
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--workers", type=int, default=8, help="parallel chunk fetches (default 8)")
    p.set_defaults(func=checkout_cmd)

    p = sub.add_parser(
        "verify", parents=[common], formatter_class=HelpFormatter,
        help="re-hash every object reachable from a version (fsck)",
        description="Fetch every commit, tree and chunk reachable from DATASET@REF (its whole "
                    "history) and check each against its hash, and every file against its "
                    "content hash. Exits non-zero naming each broken object.",
        epilog="examples:\n  cachefs verify imagenet\n  cachefs verify imagenet@v1 --json\n")
    p.add_argument("target", metavar="DATASET[@REF]")
    p.add_argument("--workers", type=int, default=8, help="parallel chunk fetches (default 8)")
    p.set_defaults(func=verify_cmd)


def checkout_cmd(args: argparse.Namespace) -> int:
    address = parse_address(args.target)
    repo = open_repository(args)
    commit = repo.resolve(address.dataset, address.ref).commit
    result = checkout(repo, commit, address.path, args.directory, progress_for(args),
                      workers=args.workers)
    if args.json:
        print_json({"commit": commit, "files": result.files, "dirs": result.dirs,
                    "symlinks": result.symlinks, "bytes": result.bytes})
    else:
        print(f"checked out {address.dataset}@{commit[:12]} into {args.directory}: "
              f"{result.files} files, {format_size(result.bytes)}")
    return 0


def verify_cmd(args: argparse.Namespace) -> int:
    address = parse_address(args.target, allow_path=False)
    repo = open_repository(args)
    commit = repo.resolve(address.dataset, address.ref).commit
    report = verify(repo, commit, progress_for(args), workers=args.workers)
    if args.json:
        print_json({"ok": report.ok, "commits": report.commits, "trees": report.trees,
                    "chunks": report.chunks, "files": report.files, "bytes": report.bytes,
                    "problems": report.problems})
    else:
        for problem in report.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"checked {report.commits} commits, {report.trees} trees, {report.chunks} chunks, "
              f"{report.files} distinct files ({format_size(report.bytes)}): "
              + ("ok" if report.ok else f"{len(report.problems)} problems"))
    if not report.ok:
        return CorruptObject.exit_code
    return 0
