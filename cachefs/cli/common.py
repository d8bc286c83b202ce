"""What every CLI subcommand shares: opening the repository, JSON output, progress bars, times."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import UTC, datetime
from typing import Any

from cachefs.config import Config
from cachefs.dataset.repo import Repository
from cachefs.remotes.registry import open_remote


def common_options() -> argparse.ArgumentParser:
    """The flags every subcommand takes (parents= of each subparser)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--remote", metavar="NAME|URL",
                        help="remote to use: a configured name or a URL "
                             "(default: the configured default remote, else 'local')")
    parent.add_argument("--json", action="store_true",
                        help="print exactly one JSON document on stdout")
    parent.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-vv for debug)")
    return parent


def open_repository(args: argparse.Namespace) -> Repository:
    return Repository(open_remote(args.remote, Config.load()))


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def iso_time(time_ns: int) -> str:
    """ISO 8601 UTC, seconds precision: 2026-11-22T20:54:05Z."""
    moment = datetime.fromtimestamp(time_ns / 1e9, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


class TerminalProgress:
    """A tqdm bar on stderr when it is a terminal (and not --json); silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None

    def start(self, total: int, unit: str, description: str) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.close()
        # A fresh pty reports 0x0, which tqdm takes as "no room" and draws nothing; shutil
        # falls back to 80x24 there.
        size = shutil.get_terminal_size()
        self._bar = tqdm(total=total, unit=unit, unit_scale=True, unit_divisor=1024,
                         desc=description, leave=False, ncols=min(size.columns, 120),
                         nrows=size.lines)

    def update(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.update(amount)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_for(args: argparse.Namespace) -> TerminalProgress:
    return TerminalProgress(enabled=not args.json)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-formatted examples in each command's epilog."""
