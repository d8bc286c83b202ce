"""Shared test helpers: running the real CLI, comparing directory trees, opening repositories."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cachefs.dataset.repo import Repository
from cachefs.progress import NoProgress
from cachefs.remotes.local import LocalRemote

CLI_TIMEOUT_S = 120


def run_cli(*args: str, check: bool = True, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `cachefs ARGS...` as a real process; the environment is the test's (isolated XDG)."""
    proc = subprocess.run(
        [sys.executable, "-m", "cachefs.cli.main", *args],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"cachefs {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def cli_json(*args: str) -> Any:
    return json.loads(run_cli(*args, "--json").stdout)


def local_repo(path: Path) -> Repository:
    return Repository(LocalRemote(path))


def snapshot(root: Path, with_mtime: bool = True) -> dict[str, tuple]:
    """Everything a checkout must reproduce, per relative path."""
    result: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            mtime = st.st_mtime_ns if with_mtime else 0
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("link", os.readlink(path), mtime)
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", stat.S_IMODE(st.st_mode), mtime)
            else:
                result[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, mtime,
                               path.read_bytes())
    return result


def wait_until_not_racy(root: Path, window_s: float = 1.05, limit_s: float = 5.0) -> None:
    """Wait until every file under `root` is older than the racily-clean window (bounded)."""
    newest = max((p.lstat().st_ctime_ns for p in root.rglob("*")), default=0)
    deadline = time.monotonic() + limit_s
    while time.time_ns() - newest < window_s * 1e9:
        if time.monotonic() > deadline:
            raise AssertionError("clock did not advance past the racily-clean window")
        time.sleep(0.05)


class PausingProgress(NoProgress):
    """Stops a writer once it holds its lock (its first progress bar), until `resume` is set."""

    def __init__(self, wait_s: float = 30.0) -> None:
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.wait_s = wait_s

    def start(self, total: int, unit: str, description: str) -> None:
        self.paused.set()
        assert self.resume.wait(self.wait_s)
