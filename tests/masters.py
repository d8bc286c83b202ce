"""Master processes for tests: `MasterProcess` (one real `cachefs master serve` on 127.0.0.1)
and `start_group` (a raft group of them). The `masters` fixture in conftest.py kills every
started one at the end, whatever happened."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cachefs.errors import CachefsError
from master.client import MasterClient
from tests.servers import ServiceProcess, free_port, wait_until

START_TIMEOUT_S = 30.0
LEADER_TIMEOUT_S = 30.0


BIND_ATTEMPTS = 3


class MasterProcess(ServiceProcess):
    """One `cachefs master serve` member. Ports are picked once, so `start()` after `kill()`
    or `stop()` restarts the same member on the same addresses and data directory."""

    def __init__(self, data_dir: Path, member_id: str, token: str | None = None,
                 extra: Sequence[str] = (), metrics: bool = False) -> None:
        self.data_dir = data_dir
        self.id = member_id
        self.token = token
        self.port = free_port()
        self.raft_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.raft_address = f"127.0.0.1:{self.raft_port}"
        # With `metrics`: --metrics-listen on a port of its own, scraped at `metrics_url`.
        self.metrics_url: str | None = None
        if metrics:
            metrics_address = f"127.0.0.1:{free_port()}"
            self.metrics_url = f"http://{metrics_address}/metrics"
            extra = (*extra, "--metrics-listen", metrics_address)
        self.extra = tuple(extra)
        self.peers = ""  # set by start_group: every member's ID=GRPC/RAFT
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def peer_entry(self) -> str:
        return f"{self.id}={self.address}/{self.raft_address}"

    def start(self, wait: bool = True) -> MasterProcess:
        args = [sys.executable, "-m", "cachefs.cli.main", "master", "serve", "-v",
                "--id", self.id, "--listen", self.address, "--raft", self.raft_address,
                "--data-dir", str(self.data_dir), *self.extra]
        if self.peers:
            args += ["--peers", self.peers]
        if self.token:
            token_file = self.data_dir.parent / f"{self.data_dir.name}.token"
            token_file.write_text(self.token + "\n")
            args += ["--token-file", str(token_file)]
        env = {k: v for k, v in os.environ.items() if k != "CACHEFS_TOKEN"}
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self) -> None:
        def serving() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"master {self.id} exited {self.proc.returncode}:\n"
                                     f"{self.output()}")
            return "serving on" in self.output(since_start=True)

        wait_until(serving, START_TIMEOUT_S, f"master {self.id} to serve", interval=0.05)

    def client(self, token: str | None = "", timeout: float = 10.0) -> MasterClient:
        """A client of this member alone, sending `token` (default: its own)."""
        return MasterClient([self.address], self.token if token == "" else token, timeout)

    def output(self, since_start: bool = False) -> str:
        if not self.log.exists():
            return ""
        data = self.log.read_bytes()
        return data[self._log_start if since_start else 0:].decode(errors="replace")


def start_group(root: Path, count: int, started: list[MasterProcess],
                token: str | None = None, tokens: Sequence[str | None] | None = None,
                extra: Sequence[str] = (), metrics: bool = False) -> list[MasterProcess]:
    """`count` members (ids 1..count) knowing each other, appended to `started` before they
    start (so the fixture kills them whatever happens); returns once every one serves.
    `tokens` gives each member its own token (default: `token` for all); `metrics` gives
    each its own --metrics-listen (`MasterProcess.metrics_url`)."""
    for attempt in range(BIND_ATTEMPTS):
        # A port picked free can be taken before its member binds it (by the other members'
        # own outgoing raft connections, among others): then the whole group starts again on
        # fresh ports and fresh data dirs, since every member's --peers names every port.
        base = root if attempt == 0 else root / f"attempt{attempt}"
        base.mkdir(parents=True, exist_ok=True)
        members = [MasterProcess(base / f"master{i}", str(i),
                                 tokens[i - 1] if tokens is not None else token, extra,
                                 metrics)
                   for i in range(1, count + 1)]
        peers = ",".join(m.peer_entry for m in members)
        for m in members:
            m.peers = peers
            started.append(m)
        for m in members:
            m.start(wait=False)
        try:
            for m in members:
                m.wait_serving()
        except AssertionError as e:
            if "cannot listen there" not in str(e) or attempt == BIND_ATTEMPTS - 1:
                raise
            for m in members:
                m.kill()
            continue
        return members
    raise AssertionError("unreachable")


def group_status(members: Sequence[MasterProcess], token: str | None = "",
                 timeout: float = 8.0) -> dict[str, Any] | None:
    """The status document from the running members, or None if none answers."""
    alive = [m for m in members if m.alive()]
    if not alive:
        return None
    with MasterClient([m.address for m in alive],
                      alive[0].token if token == "" else token, timeout) as client:
        try:
            return client.status()
        except CachefsError:
            return None


def wait_leader(members: Sequence[MasterProcess], timeout: float = LEADER_TIMEOUT_S,
                other_than: str | None = None) -> MasterProcess:
    """The member leading once a running member reports a leader (not `other_than`)."""
    found: list[MasterProcess] = []

    def elected() -> bool:
        doc = group_status(members)
        if doc is None or doc["leader_id"] is None or doc["leader_id"] == other_than:
            return False
        found[:] = [m for m in members if m.id == doc["leader_id"]]
        return bool(found)

    wait_until(elected, timeout, "a raft leader", interval=0.1)
    return found[0]
