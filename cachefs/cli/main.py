"""The `cachefs` command: parses arguments, runs one subcommand, maps errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import sys

from cachefs import __version__
from cachefs.cli import (
    checkout_verify_cmd,
    cluster_cmd,
    csi_cmd,
    dataset_cmd,
    gateway_cmd,
    gc_cmd,
    history_cmd,
    inspect_cmd,
    master_cmd,
    mount_cmd,
    peer_cmd,
    pin_cmd,
    remote_cmd,
    scheduler_cmd,
    storage_cmd,
    transfer_cmd,
)
from cachefs.cli.common import HelpFormatter, common_options
from cachefs.errors import CachefsError
from cachefs.memory import tune_malloc

DESCRIPTION = """\
cachefs: versioned datasets for ML training, with a git-like history.

A remote (repository) holds datasets; a dataset has versions (commits) named by branches and
tags. Address a version as DATASET[@REF][:PATH], where REF is a branch, a tag or a commit-hash
prefix (default: main)."""

EPILOG = """\
quick tour:
  cachefs init photos
  cachefs commit photos ./photos -m "first version"
  cachefs tag photos v1
  cachefs log photos
  cachefs ls photos@v1 -l
  cachefs diff photos@v1 main
  cachefs checkout photos@v1 /tmp/photos-v1

Run `cachefs COMMAND --help` for each command's options and examples."""

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog="cachefs", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"cachefs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (remote_cmd, dataset_cmd, history_cmd, transfer_cmd, inspect_cmd,
                   checkout_verify_cmd, mount_cmd, gc_cmd, pin_cmd, csi_cmd, scheduler_cmd,
                   storage_cmd, master_cmd, cluster_cmd, peer_cmd, gateway_cmd):
        module.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CachefsError as e:  # raised by argument types such as parse_size
        print(f"cachefs: error: {e}", file=sys.stderr)
        return e.exit_code
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    tune_malloc()
    try:
        return int(args.func(args) or 0)
    except CachefsError as e:
        if args.verbose >= 2:
            logging.getLogger("cachefs").exception("failed")
        print(f"cachefs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cachefs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
