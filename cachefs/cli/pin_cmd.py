"""`cachefs pin add|rm|list`: keep versions from gc while something outside the refs uses them."""

from __future__ import annotations

import argparse

from cachefs.cli.common import HelpFormatter, iso_time, open_repository, print_json
from cachefs.cli.gc_cmd import parse_duration
from cachefs.dataset.pins import Pin, PinStore
from cachefs.errors import NotFound, UsageError
from cachefs.names import parse_address

DESCRIPTION = """\
A pin keeps one version (a commit) and everything it reaches from `cachefs gc`, like a ref
that no one can move. Mounts pin the version they show (with a 10-minute lease their daemon
renews every minute; `cachefs umount` removes it) and CSI volumes pin theirs until they are
deleted. Pin a version yourself while a job reads it by commit hash, or to keep a branch's
current version after the branch moves on."""


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("pin", formatter_class=HelpFormatter,
                       help="keep versions from gc (pins of mounts, volumes and users)",
                       description=DESCRIPTION,
                       epilog="examples:\n  cachefs pin add imagenet@v1 --name eval-2026\n"
                              "  cachefs pin add imagenet@main --ttl 7d\n"
                              "  cachefs pin list\n  cachefs pin rm eval-2026\n")
    actions = p.add_subparsers(dest="pin_command", required=True, metavar="ACTION")

    a = actions.add_parser("add", parents=[common], formatter_class=HelpFormatter,
                           help="pin the commit DATASET@REF names now",
                           description="Resolve REF (default main) to a commit and pin that "
                                       "commit: gc keeps it until the pin is removed or, with "
                                       "--ttl, until that long after it was created.",
                           epilog="examples:\n  cachefs pin add imagenet@v1\n"
                                  "  cachefs pin add imagenet@3f2a9c1e --name paper-run\n"
                                  "  cachefs pin add imagenet --ttl 12h --remote team\n")
    a.add_argument("target", metavar="DATASET[@REF]")
    a.add_argument("--name", help="the pin's name (default: DATASET-COMMIT-RANDOM)")
    a.add_argument("--ttl", type=parse_duration, metavar="DURATION",
                   help="expire this long after creation (e.g. 12h, 7d; default: never)")
    a.set_defaults(func=add)

    r = actions.add_parser("rm", parents=[common], formatter_class=HelpFormatter,
                           help="remove pins",
                           description="Remove pins by name; what only they kept goes at the "
                                       "next gc (after its grace period).",
                           epilog="examples:\n  cachefs pin rm paper-run\n")
    r.add_argument("names", nargs="+", metavar="NAME")
    r.set_defaults(func=rm)

    ls = actions.add_parser("list", parents=[common], formatter_class=HelpFormatter,
                            help="list pins",
                            description="List every pin: name, version, holder, and when it "
                                        "expires (expired pins keep nothing; gc removes them). "
                                        "--json gives a list of objects with the fields name, "
                                        "dataset, commit, holder, created, renewed, expires "
                                        "(null: never), ttl_s and expired.",
                            epilog="examples:\n  cachefs pin list\n  cachefs pin list --json\n")
    ls.set_defaults(func=list_pins)


def _row(pin: Pin) -> dict[str, object]:
    expires = pin.expires_ns
    return {"name": pin.name, "dataset": pin.dataset, "commit": pin.commit,
            "holder": pin.holder, "created": iso_time(pin.created_ns),
            "renewed": iso_time(pin.renewed_ns),
            "expires": None if expires is None else iso_time(expires),
            "ttl_s": pin.ttl_s, "expired": pin.expired()}


def add(args: argparse.Namespace) -> int:
    address = parse_address(args.target, allow_path=False)
    if args.ttl is not None and args.ttl <= 0:
        raise UsageError("--ttl must be more than 0")
    repo = open_repository(args)
    commit = repo.resolve(address.dataset, address.ref).commit
    pin = PinStore(repo.remote).add(address.dataset, commit, args.name, args.ttl)
    if args.json:
        print_json(_row(pin))
    else:
        until = "" if pin.expires_ns is None else f" until {iso_time(pin.expires_ns)}"
        print(f"pinned {pin.dataset}@{address.ref_or_default} ({commit[:12]}) as "
              f"{pin.name}{until}")
    return 0


def rm(args: argparse.Namespace) -> int:
    store = PinStore(open_repository(args).remote)
    missing = [name for name in args.names if not store.remove(name)]
    if args.json:
        print_json({"removed": [n for n in args.names if n not in missing],
                    "missing": missing})
    else:
        for name in args.names:
            if name not in missing:
                print(f"removed pin {name}")
    if missing:
        raise NotFound(f"no pin named {', '.join(missing)}")
    return 0


def list_pins(args: argparse.Namespace) -> int:
    rows = [_row(pin) for pin in PinStore(open_repository(args).remote).list()]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no pins")
    for r in rows:
        state = "EXPIRED" if r["expired"] else (
            "no expiry" if r["expires"] is None else f"expires {r['expires']}")
        print(f"{r['name']}  {r['dataset']}@{str(r['commit'])[:12]}  {state}  "
              f"held by {r['holder']}")
    return 0
