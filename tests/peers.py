"""Test helper: real `cachefs peer serve` processes on 127.0.0.1, each a "node" of a peer ring.

`PeerServer.start()` returns once the server answers `Status`; `PeerSet` (the `peer_servers`
fixture's) kills every server a test started, whatever happened, so no process outlives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from cachefs.peer.client import PeerCallError, PeerClient
from tests.servers import ServiceProcess, free_port

START_TIMEOUT_S = 30.0


class PeerServer(ServiceProcess):
    """One `cachefs peer serve` on 127.0.0.1 serving `cache_dir`; `port` is kept on restart."""

    def __init__(self, cache_dir: Path, token: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.cache_dir = cache_dir
        self.token = token
        self.extra = extra
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = cache_dir.parent / f"peer-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PeerServer:
        args = [sys.executable, "-m", "cachefs.cli.main", "peer", "serve",
                "--cache-dir", str(self.cache_dir), "--listen", self.address, *self.extra]
        if self.token:
            token_file = self.cache_dir.parent / f"peer-{self.port}.token"
            token_file.write_text(self.token + "\n")
            args += ["--token-file", str(token_file)]
        env = {k: v for k, v in os.environ.items() if k != "CACHEFS_TOKEN"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        client = self.client()
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the peer server exited {self.proc.returncode}:\n"
                                         f"{self.output()}")
                try:
                    client.status(timeout=2)
                    return self
                except PeerCallError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no answer in {START_TIMEOUT_S} s:\n"
                                             f"{self.output()}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def client(self, token: str | None = "") -> PeerClient:
        """A client sending `token` (default: the server's own)."""
        return PeerClient(self.address, self.token if token == "" else token)

    def status(self) -> dict:  # type: ignore[type-arg]
        client = self.client()
        try:
            return client.status(timeout=5)
        finally:
            client.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class PeerSet:
    """The peer servers of one test; `close` kills those still running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[PeerServer] = []

    def start(self, name: str, token: str | None = None,
              extra: tuple[str, ...] = ()) -> PeerServer:
        cache_dir = self.root / name / "cache"
        cache_dir.mkdir(parents=True, exist_ok=True)
        server = PeerServer(cache_dir, token, extra)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            server.kill()
