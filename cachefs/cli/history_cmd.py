"""`cachefs commit|log|branch|tag`: making versions and naming them."""

from __future__ import annotations

import argparse
import sys
from urllib.parse import unquote, urlparse

from cachefs.cli.common import (
    HelpFormatter,
    iso_time,
    open_repository,
    print_json,
    progress_for,
)
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.importer import import_prefix
from cachefs.dataset.refs import RefKind
from cachefs.errors import UsageError
from cachefs.names import check_name, format_size, parse_address
from cachefs.remotes.registry import BACKENDS, open_remote_url


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    _register_commit(sub, common)
    _register_log(sub, common)
    _register_refs(sub, common)


def _register_commit(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "commit", parents=[common], formatter_class=HelpFormatter,
        help="commit a directory (or a bucket prefix) as a new version",
        description="Record DIR as the next version of DATASET on BRANCH (default main). Files "
                    "unchanged since the last commit from DIR are not re-read; content already "
                    "in the remote is not uploaded again; small files are packed together. "
                    "Paths matching DIR/.cachefsignore (gitignore syntax) are left out.\n\n"
                    "DIR may also be an object-store prefix (s3://BUCKET/PREFIX/ or "
                    "oss://BUCKET/PREFIX/?endpoint=..., with the same options as remotes): "
                    "the objects are streamed through hashing and packing without a local copy, "
                    "and a re-import does not read objects whose size and ETag are unchanged.",
        epilog="examples:\n  cachefs commit imagenet ./imagenet -m 'initial import'\n"
               "  cachefs commit imagenet@relabel ./imagenet -m 'fix labels' --json\n"
               "  cachefs commit imagenet s3://raw-data/imagenet/ -m 'import from S3'\n")
    p.add_argument("target", metavar="DATASET[@BRANCH]")
    p.add_argument("directory", metavar="DIR|URL")
    p.add_argument("-m", "--message", required=True, help="what changed")
    p.add_argument("--author", help="author (default: user@host)")
    p.add_argument("--allow-empty", action="store_true",
                   help="record a commit even when nothing changed")
    p.add_argument("--workers", type=int, help="parallel chunk uploads (default: per remote)")
    p.set_defaults(func=commit)


def _register_log(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("log", parents=[common], formatter_class=HelpFormatter,
                       help="show the history of a version",
                       epilog="examples:\n  cachefs log imagenet\n  cachefs log imagenet@v2 -n 5 "
                              "--json\n")
    p.add_argument("target", metavar="DATASET[@REF]")
    p.add_argument("-n", "--max-count", type=int, default=None, help="show at most N commits")
    p.set_defaults(func=log_cmd)


def _register_refs(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for kind, noun in (("heads", "branch"), ("tags", "tag")):
        p = sub.add_parser(
            noun, parents=[common], formatter_class=HelpFormatter,
            help=f"list, create or delete {noun}es" if noun == "branch" else "list, create or "
                                                                             "delete tags",
            description=(f"Without NAME, list the {'branches' if noun == 'branch' else 'tags'} "
                         "of DATASET. With NAME, create it at START (default: main). "
                         + ("Branches move with each commit." if noun == "branch" else
                            "Tags never move: name a tag in training jobs for reproducibility.")),
            epilog=f"examples:\n  cachefs {noun} imagenet\n  cachefs {noun} imagenet "
                   f"{'relabel' if noun == 'branch' else 'v1'} main\n"
                   f"  cachefs {noun} imagenet -d {'relabel' if noun == 'branch' else 'v1'}\n")
        p.add_argument("dataset", metavar="DATASET")
        p.add_argument("name", nargs="?", metavar="NAME")
        p.add_argument("start", nargs="?", metavar="START",
                       help="branch, tag or commit to start from (default: main)")
        p.add_argument("-d", "--delete", metavar="NAME", help=f"delete {noun} NAME")
        p.set_defaults(func=ref_cmd, kind=kind, noun=noun)


def commit(args: argparse.Namespace) -> int:
    address = parse_address(args.target, allow_path=False)
    branch = check_name(address.ref_or_default, "branch name", existing=True)
    repo = open_repository(args)
    skipped: list[str] = []
    scheme = urlparse(args.directory).scheme
    if scheme in BACKENDS and scheme != "file":
        source = open_remote_url(args.directory)
        try:
            result, skipped = import_prefix(
                repo, address.dataset, branch, source, args.message, author=args.author,
                progress=progress_for(args), allow_empty=args.allow_empty, workers=args.workers)
        finally:
            source.close()
    else:
        directory = args.directory
        if scheme == "file":
            directory = unquote(urlparse(directory).path)
        result = commit_directory(repo, address.dataset, branch, directory, args.message,
                                  author=args.author, progress=progress_for(args),
                                  allow_empty=args.allow_empty, workers=args.workers)
    if args.json:
        print_json({"commit": result.commit, "files": result.files, "bytes": result.bytes,
                    "new_bytes": result.new_bytes, "new_meta_bytes": result.new_meta_bytes,
                    "parent": result.parent, "read_bytes": result.read_bytes,
                    "reused_files": result.reused_files, "unchanged": result.unchanged,
                    "ignored": result.ignored, "skipped": skipped})
        return 0
    for key in skipped[:10]:
        print(f"warning: skipped {key!r}: not a usable path", file=sys.stderr)
    if len(skipped) > 10:
        print(f"warning: ... and {len(skipped) - 10} more keys skipped", file=sys.stderr)
    if result.unchanged:
        print(f"nothing changed: {address.dataset}@{branch} stays at {result.commit[:12]}")
    else:
        print(f"[{address.dataset}@{branch} {result.commit[:12]}] {result.files} files, "
              f"{format_size(result.bytes)}; uploaded {format_size(result.new_bytes)} new data "
              f"+ {format_size(result.new_meta_bytes)} metadata "
              f"({result.reused_files} files unchanged, not re-read"
              + (f"; {result.ignored} entries ignored by .cachefsignore)" if result.ignored
                 else ")"))
    return 0


def log_cmd(args: argparse.Namespace) -> int:
    address = parse_address(args.target, allow_path=False)
    repo = open_repository(args)
    start = repo.resolve(address.dataset, address.ref).commit
    rows = []
    for name, c in repo.log(start):
        if args.max_count is not None and len(rows) >= args.max_count:
            break
        rows.append({"commit": name, "parents": list(c.parents), "message": c.message,
                     "author": c.author, "time": iso_time(c.time_ns),
                     "files": c.files, "bytes": c.bytes})
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        print(f"commit {r['commit']}")
        print(f"Author: {r['author']}")
        print(f"Date:   {r['time']}")
        print(f"Files:  {r['files']} ({format_size(r['bytes'])})")
        print()
        for line in (r["message"] or "(no message)").splitlines():
            print(f"    {line}")
        print()
    return 0


def ref_cmd(args: argparse.Namespace) -> int:
    kind: RefKind = args.kind
    repo = open_repository(args)
    check_name(args.dataset, "dataset name", existing=True)
    if args.delete:
        if args.name:
            raise UsageError("give either NAME or -d NAME, not both")
        old = repo.delete_ref(args.dataset, kind,
                              check_name(args.delete, f"{args.noun} name", existing=True))
        if args.json:
            print_json({"deleted": args.delete, "commit": old})
        else:
            print(f"deleted {args.noun} {args.delete} (was {old[:12]})")
        return 0
    if not args.name:
        repo.dataset(args.dataset)
        refs = repo.refs.list(args.dataset, kind)
        if args.json:
            print_json([{"name": n, "commit": c} for n, c in refs.items()])
        else:
            for n, c in refs.items():
                print(f"{n:<32} {c[:12]}")
            if not refs:
                plural = "branches" if args.noun == "branch" else "tags"
                print(f"no {plural} in {args.dataset}", file=sys.stderr)
        return 0
    start = repo.resolve(args.dataset, args.start).commit
    repo.set_ref(args.dataset, kind, args.name, start, f"{args.noun}: created from "
                                                        f"{args.start or 'main'}")
    if args.json:
        print_json({"name": args.name, "commit": start})
    else:
        print(f"created {args.noun} {args.name} at {start[:12]}")
    return 0
