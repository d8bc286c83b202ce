"""`cachefs gc`: reclaim the space of objects no version reaches any more."""

from __future__ import annotations

import argparse

from cachefs.cli.common import HelpFormatter, open_repository, print_json, progress_for
from cachefs.dataset.gc import DEFAULT_GRACE_S, collect_garbage
from cachefs.errors import UsageError
from cachefs.names import format_size

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '15m', '1h', '7d' or plain seconds."""
    value = text.strip().lower()
    unit = value[-1:] if value[-1:] in _UNITS else "s"
    number = value[:-1] if value[-1:] in _UNITS else value
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise UsageError(f"invalid duration {text!r}: use e.g. 30m, 1h, 7d") from None
    if seconds < 0:
        raise UsageError(f"invalid duration {text!r}: must not be negative")
    return seconds


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "gc", parents=[common], formatter_class=HelpFormatter,
        help="remove objects no version reaches",
        description="Delete the chunks, trees and commits of the remote that no branch or tag "
                    "reaches, nor any ref position or object younger than the grace period "
                    "(the reflog: `cachefs branch DATASET NAME COMMIT` restores a deleted or "
                    "overwritten branch until then), nor any version a live pin holds (mounts "
                    "and CSI volumes pin theirs: cachefs pin list). Safe while commits and "
                    "pushes run: the deletion waits for running writers and holds new ones "
                    "back meanwhile.",
        epilog="examples:\n  cachefs gc --dry-run\n  cachefs gc --grace 7d --remote team\n"
               "  cachefs datasets rm scratch && cachefs gc --grace 0\n")
    p.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    p.add_argument("--grace", type=parse_duration, default=DEFAULT_GRACE_S, metavar="DURATION",
                   help="keep what was written or referenced this recently (default 1h; "
                        "e.g. 0, 30m, 7d)")
    p.add_argument("--workers", type=int, default=16, help="parallel requests (default 16)")
    p.set_defaults(func=gc)


def gc(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    result = collect_garbage(repo, args.grace, args.dry_run, progress_for(args), args.workers)
    if args.json:
        print_json(result.to_json())
        return 0
    verb = "would remove" if args.dry_run else "removed"
    parts = [f"{t.objects} {kind}" for kind, t in result.garbage.items() if t.objects]
    print(f"{verb} {result.garbage_objects} objects ({', '.join(parts) or 'nothing'}), "
          f"{format_size(result.garbage_bytes)}")
    live = sum(t.objects for t in result.live.values())
    live_bytes = sum(t.bytes for t in result.live.values())
    print(f"kept {live} objects, {format_size(live_bytes)} "
          f"({result.kept_recent} only because they are younger than the grace period)")
    if result.pins:
        print(f"kept what {len(result.pins)} live pins hold (cachefs pin list)")
    if result.pins_pruned:
        print(f"removed {len(result.pins_pruned)} expired pins")
    if result.ref_generations_pruned:
        print(f"pruned {result.ref_generations_pruned} old reflog entries")
    if result.missing:
        print(f"warning: {len(result.missing)} referenced objects are missing, e.g. "
              f"{result.missing[0]} (check with: cachefs verify)")
    return 0
