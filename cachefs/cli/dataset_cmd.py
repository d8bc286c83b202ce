"""`cachefs init` and `cachefs datasets`: creating and listing datasets in a remote."""

from __future__ import annotations

import argparse

from cachefs.cli.common import HelpFormatter, iso_time, open_repository, print_json
from cachefs.names import check_name, format_size, parse_size


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "init", parents=[common], formatter_class=HelpFormatter,
        help="create a dataset",
        description="Create an empty dataset in the remote. Its chunk size (the unit of "
                    "storage, caching and transfer) is fixed for the dataset's life.",
        epilog="examples:\n  cachefs init imagenet\n  cachefs init shards --chunk-size 16MiB "
               "--remote team\n")
    p.add_argument("dataset")
    p.add_argument("--chunk-size", default="4MiB", type=parse_size,
                   help="chunk size, 64KiB..64MiB (default 4MiB)")
    p.set_defaults(func=init)

    p = sub.add_parser("datasets", parents=[common], formatter_class=HelpFormatter,
                       help="list (or remove) the datasets of a remote",
                       description="Without a subcommand, list the datasets of the remote.",
                       epilog="examples:\n  cachefs datasets\n  cachefs datasets --remote team "
                              "--json\n  cachefs datasets rm scratch\n")
    p.set_defaults(func=datasets)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    rm = actions.add_parser(
        "rm", parents=[common], formatter_class=HelpFormatter,
        help="delete a dataset's branches and tags",
        description="Delete every branch and tag of DATASET, and the dataset itself. Its data "
                    "is removed later by `cachefs gc`, once nothing else reaches it and the gc "
                    "grace period has passed; until then the reflog still reaches it.",
        epilog="examples:\n  cachefs datasets rm scratch\n  cachefs gc --grace 0  "
               "# then reclaim the space now\n")
    rm.add_argument("dataset", metavar="DATASET")
    rm.set_defaults(func=remove_dataset)


def init(args: argparse.Namespace) -> int:
    check_name(args.dataset, "dataset name")
    repo = open_repository(args)
    settings = repo.create_dataset(args.dataset, args.chunk_size)
    if args.json:
        print_json({"dataset": settings.name, "chunk_size": settings.chunk_size,
                    "remote": repo.remote.url})
    else:
        print(f"created dataset {settings.name} in {repo.remote.url} "
              f"(chunk size {format_size(settings.chunk_size)})")
    return 0


def datasets(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    rows = []
    for name in repo.datasets():
        settings = repo.dataset(name)
        branches = repo.refs.list(name, "heads")
        head = branches.get("main")
        commit = repo.get_commit(head) if head else None
        rows.append({
            "name": name,
            "chunk_size": settings.chunk_size,
            "branches": sorted(branches),
            "tags": sorted(repo.refs.list(name, "tags")),
            "main": head,
            "files": commit.files if commit else 0,
            "bytes": commit.bytes if commit else 0,
            "updated": iso_time(commit.time_ns) if commit else None,
        })
    if args.json:
        print_json(rows)
    elif not rows:
        print(f"no datasets in {repo.remote.url} (create one with: cachefs init NAME)")
    else:
        print(f"{'DATASET':<24} {'MAIN':<12} {'FILES':>10} {'SIZE':>11}  UPDATED")
        for r in rows:
            print(f"{r['name']:<24} {(r['main'] or '-')[:12]:<12} {r['files']:>10} "
                  f"{format_size(r['bytes']):>11}  {r['updated'] or '-'}")
    return 0


def remove_dataset(args: argparse.Namespace) -> int:
    check_name(args.dataset, "dataset name", existing=True)
    repo = open_repository(args)
    removed = repo.delete_dataset(args.dataset)
    if args.json:
        print_json({"dataset": args.dataset, "removed_refs": removed})
    else:
        for ref, commit in removed.items():
            print(f"deleted {ref.replace('heads/', 'branch ').replace('tags/', 'tag ')} "
                  f"(was {commit[:12]})")
        print(f"removed dataset {args.dataset} from {repo.remote.url}; its data is reclaimed "
              "by `cachefs gc` once nothing else reaches it and the grace period has passed")
    return 0
