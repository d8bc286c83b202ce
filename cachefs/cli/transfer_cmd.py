"""`cachefs push|pull`: copying a dataset's versions from one remote to another."""

from __future__ import annotations

import argparse
import textwrap

from cachefs.cli.common import HelpFormatter, open_repository, print_json, progress_for
from cachefs.config import Config
from cachefs.dataset.repo import Repository
from cachefs.dataset.transfer import RefUpdate, TransferResult, transfer_dataset
from cachefs.errors import UsageError
from cachefs.names import check_name, format_size
from cachefs.remotes.registry import open_remote

_DESCRIPTION = "\n\n".join(textwrap.fill(paragraph, 79) for paragraph in (
    "Every branch and tag of DATASET is copied with all the history and data it reaches. "
    "Only objects the destination lacks are copied, each verified against its hash on the way "
    "(a corrupt object is never propagated); an interrupted copy resumes where it stopped when "
    "run again.",
    "Then the destination's refs move: a branch only fast-forwards and a tag never moves, "
    "unless --force. Branches and tags that exist only in the destination are left alone. If "
    "some refs are refused, the others are still updated and the command exits non-zero "
    "naming every refused one."))


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    for direction in ("push", "pull"):
        push = direction == "push"
        p = sub.add_parser(
            direction, parents=[common], formatter_class=HelpFormatter,
            help="copy a dataset's versions to another remote" if push else
                 "copy a dataset's versions from another remote",
            description=textwrap.fill(
                "Copy DATASET from --remote (the source; default: the default remote) to the "
                "remote named by --to. " if push else
                "Copy DATASET from the remote named by --from into --remote (the destination; "
                "default: the default remote). ", 79) + "\n\n" + _DESCRIPTION,
            epilog=(
                "examples:\n"
                f"  cachefs {direction} imagenet {'--to' if push else '--from'} s3-prod\n"
                f"  cachefs {direction} imagenet {'--to' if push else '--from'} "
                "s3://bucket/datasets?region=eu-west-1 --json\n"
                + ("  cachefs push imagenet --remote s3-prod --to oss://bucket/ds?endpoint=..."
                   "\n  cachefs push imagenet --to s3-prod --force    # overwrite diverged "
                   "branches\n" if push else
                   "  cachefs pull imagenet --from s3-prod --remote file:///mnt/nvme/repo\n")))
        p.add_argument("dataset", metavar="DATASET")
        p.add_argument("--to" if push else "--from", dest="other", required=True,
                       metavar="NAME|URL",
                       help=("destination" if push else "source")
                       + " remote: a configured name or a URL")
        p.add_argument("--force", action="store_true",
                       help="overwrite diverged or ahead branches and differing tags in the "
                            "destination (still compare-and-swap; the reflog keeps the old "
                            "value)")
        p.add_argument("--workers", type=int,
                       help="parallel object copies (default: per remote)")
        p.set_defaults(func=transfer_cmd, direction=direction)


def _describe_ref(r: RefUpdate) -> str:
    old = (r.old or "")[:12]
    new = r.new[:12]
    what = {
        "created": f"new {r.noun} at {new}",
        "fast-forward": f"{old} -> {new} (fast-forward)",
        "forced": f"{old} -> {new} (forced)",
        "unchanged": f"up to date at {new}",
        "refused": f"refused: {r.reason}",
    }[r.action]
    return f"  {r.noun:<6} {r.name:<24} {what}"


def _describe(result: TransferResult, direction: str) -> list[str]:
    lines = [f"{direction} {result.dataset}: {result.source} -> {result.destination}"
             + (" (dataset created)" if result.created_dataset else "")]
    if not result.objects:
        lines.append("copied 0 objects: the destination already had every object")
    else:
        lines.append(f"copied {result.objects} objects ({format_size(result.bytes)}): "
                     f"{result.chunks} chunks ({format_size(result.chunk_bytes)}), "
                     f"{result.trees} trees, {result.commits} commits")
    lines.extend(_describe_ref(r) for r in result.refs)
    if not result.refs:
        lines.append("  (the dataset has no branches or tags yet)")
    lines.append(f"refs: {len(result.updated)} updated, {len(result.unchanged)} up to date, "
                 f"{len(result.refused)} refused")
    return lines


def transfer_cmd(args: argparse.Namespace) -> int:
    check_name(args.dataset, "dataset name", existing=True)
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be at least 1")
    here = open_repository(args)
    there = Repository(open_remote(args.other, Config.load()))
    src, dst = (here, there) if args.direction == "push" else (there, here)
    try:
        result = transfer_dataset(src, dst, args.dataset, force=args.force,
                                  progress=progress_for(args), workers=args.workers,
                                  label=args.direction)
    finally:
        here.close()
        there.close()
    if args.json:
        print_json(result.to_json())
    else:
        print("\n".join(_describe(result, args.direction)))
    result.raise_if_refused()
    return 0
