"""`cachefs ls|cat|diff`: looking inside versions without materializing them."""

from __future__ import annotations

import argparse
import stat
import sys

from cachefs.cli.common import HelpFormatter, iso_time, open_repository, print_json
from cachefs.dataset.diff import diff_commits
from cachefs.dataset.objects import Kind, TreeEntry, extent_bytes
from cachefs.errors import InvalidName, UsageError
from cachefs.names import format_size, is_hash_prefix, parse_address

_TYPE_BITS = {Kind.FILE: stat.S_IFREG, Kind.DIR: stat.S_IFDIR, Kind.SYMLINK: stat.S_IFLNK}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ls", parents=[common], formatter_class=HelpFormatter,
                       help="list files in a version",
                       epilog="examples:\n  cachefs ls imagenet\n  cachefs ls imagenet@v1:train "
                              "-l\n  cachefs ls imagenet@3f2a9c1e -R --json\n")
    p.add_argument("target", metavar="DATASET[@REF][:PATH]")
    p.add_argument("-l", "--long", action="store_true", help="mode, size, time")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    p.set_defaults(func=ls)

    p = sub.add_parser("cat", parents=[common], formatter_class=HelpFormatter,
                       help="write a file of a version to stdout",
                       epilog="examples:\n  cachefs cat imagenet@v1:labels.csv | head\n")
    p.add_argument("target", metavar="DATASET[@REF]:PATH")
    p.set_defaults(func=cat)

    p = sub.add_parser("diff", parents=[common], formatter_class=HelpFormatter,
                       help="files added, removed or modified between two versions",
                       description="Compare version REF_A of DATASET with REF_B. Identical "
                                   "subtrees are skipped, so the time follows the change.",
                       epilog="examples:\n  cachefs diff imagenet@v1 v2\n"
                              "  cachefs diff imagenet@v1 main --stat\n"
                              "  cachefs diff imagenet@3f2a9c1e main --json\n")
    p.add_argument("target", metavar="DATASET@REF_A")
    p.add_argument("other", metavar="REF_B")
    p.add_argument("--stat", action="store_true", help="summary counts and bytes only")
    p.set_defaults(func=diff)


def _row(path: str, e: TreeEntry) -> dict:
    row = {"path": path, "type": e.kind.name.lower(), "mode": f"{e.mode:04o}", "size": e.size,
           "mtime": iso_time(e.mtime_ns)}
    if e.kind is Kind.FILE:
        row["hash"] = e.hash
    if e.kind is Kind.SYMLINK:
        row["target"] = e.target
    return row


def ls(args: argparse.Namespace) -> int:
    address = parse_address(args.target)
    repo = open_repository(args)
    commit = repo.resolve(address.dataset, address.ref).commit
    entry = repo.find(commit, address.path)
    if entry.is_dir:
        prefix = f"{address.path}/" if address.path else ""
        items = (repo.walk(entry.hash, prefix) if args.recursive else
                 ((prefix + e.name, e) for e in repo.get_tree(entry.hash).entries))
    else:
        items = iter([(address.path, entry)])
    rows = [_row(path, e) for path, e in items]
    if args.json:
        print_json(rows)
        return 0
    for row in rows:
        name = row["path"] + ("/" if row["type"] == "dir" else "")
        if row["type"] == "symlink":
            name += f" -> {row['target']}"
        if args.long:
            kind = Kind[row["type"].upper()]
            mode = stat.filemode(_TYPE_BITS[kind] | int(row["mode"], 8))
            print(f"{mode} {row['size']:>12} {row['mtime']} {name}")
        else:
            print(name)
    return 0


def cat(args: argparse.Namespace) -> int:
    address = parse_address(args.target)
    if not address.path:
        raise UsageError("cat needs a file: DATASET[@REF]:PATH")
    repo = open_repository(args)
    commit = repo.resolve(address.dataset, address.ref).commit
    entry = repo.find(commit, address.path)
    if entry.kind is not Kind.FILE:
        raise UsageError(f"{address.path} is a {entry.kind.name.lower()}, not a file")
    out = sys.stdout.buffer
    current_name, current = "", b""
    for x in entry.extents:
        if x.chunk != current_name:
            current_name, current = x.chunk, repo.get_chunk(x.chunk)
        out.write(extent_bytes(x.chunk, current, x.offset, x.length))
    out.flush()
    return 0


def diff(args: argparse.Namespace) -> int:
    address = parse_address(args.target, allow_path=False)
    if address.ref is None:
        raise UsageError("diff needs two versions: DATASET@REF_A REF_B")
    if not is_hash_prefix(args.other):
        try:
            parse_address(f"{address.dataset}@{args.other}", allow_path=False)
        except InvalidName as e:
            raise InvalidName(f"invalid ref {args.other!r}") from e
    repo = open_repository(args)
    old = repo.resolve(address.dataset, address.ref).commit
    new = repo.resolve(address.dataset, args.other).commit
    changes = list(diff_commits(repo, old, new))
    counts = {c: sum(1 for d in changes if d.change == c) for c in ("added", "removed",
                                                                   "modified")}
    delta = sum(d.size_delta for d in changes)
    if args.json:
        if args.stat:
            print_json({**counts, "bytes_delta": delta, "from": old, "to": new})
        else:
            print_json([{"path": d.path, "change": d.change} for d in changes])
        return 0
    if not args.stat:
        marks = {"added": "A", "removed": "D", "modified": "M"}
        for d in changes:
            print(f"{marks[d.change]}\t{d.path}")
    else:
        for d in changes:
            print(f" {d.path:<60} {d.change:<9} {d.size_delta:+,d} B")
    print(f"{counts['added']} added, {counts['removed']} removed, {counts['modified']} modified "
          f"({'+' if delta >= 0 else '-'}{format_size(abs(delta))})",
          file=sys.stderr if not args.stat else sys.stdout)
    return 0
