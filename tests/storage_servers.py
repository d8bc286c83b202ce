"""Storage server processes for tests: `StorageServer` (one real `cachefs storage serve` on
127.0.0.1; the `storage_servers` fixture in conftest.py kills every started one) and test needles
keyed by BLAKE3."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import blake3

from cachefs.errors import RemoteError
from storage_server.client import StorageClient
from tests.servers import ServiceProcess, free_port

VOLUMES = 4
START_TIMEOUT_S = 30.0
MIB = 1 << 20


def flip_a_byte_of_the_segment(server: StorageServer, at_least: int) -> None:
    """Flip one byte in the middle of the server's only segment file of `at_least` bytes or
    more (the one holding the needle just written), in place."""
    segments = [p for p in (server.data_dir / "volumes").rglob("*")
                if p.is_file() and p.stat().st_size >= at_least]
    assert len(segments) == 1, segments
    with open(segments[0], "r+b") as f:
        f.seek(segments[0].stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def key_of(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def needles(count: int, size: int = 1000, tag: bytes = b"") -> dict[bytes, bytes]:
    """`count` distinct needles, sizes varying around `size`, keyed by their BLAKE3 hash."""
    out: dict[bytes, bytes] = {}
    for i in range(count):
        data = (tag + b"needle-%d-" % i) * (1 + (size + i * 37) // 16)
        out[key_of(data)] = data
    return out


class StorageServer(ServiceProcess):
    """One `cachefs storage serve` process on 127.0.0.1; `start()` waits until it answers."""

    def __init__(self, data_dir: Path, token: str | None = None, volumes: int = VOLUMES,
                 extra: tuple[str, ...] = (), metrics: bool = False) -> None:
        self.data_dir = data_dir
        self.token = token
        self.volumes = volumes
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # With `metrics`: --metrics-listen on a port of its own, scraped at `metrics_url`.
        self.metrics_url: str | None = None
        if metrics:
            metrics_address = f"127.0.0.1:{free_port()}"
            self.metrics_url = f"http://{metrics_address}/metrics"
            extra = (*extra, "--metrics-listen", metrics_address)
        self.extra = extra
        self.log = data_dir.parent / f"{data_dir.name}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StorageServer:
        args = [sys.executable, "-m", "cachefs.cli.main", "storage", "serve",
                "--data-dir", str(self.data_dir), "--listen", self.address,
                "--volumes", str(self.volumes), *self.extra]
        if self.token:
            token_file = self.data_dir.parent / f"{self.data_dir.name}.token"
            token_file.write_text(self.token + "\n")
            args += ["--token-file", str(token_file)]
        env = {k: v for k, v in os.environ.items() if k != "CACHEFS_TOKEN"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.client(timeout=2) as client:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited {self.proc.returncode}:\n"
                                         f"{self.output()}")
                try:
                    client.stat()
                    return self
                except RemoteError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no answer in {START_TIMEOUT_S} s:\n"
                                             f"{self.output()}") from None
                    time.sleep(0.1)

    def client(self, token: str | None = "", timeout: float = 30.0) -> StorageClient:
        """A client sending `token` (default: the server's own)."""
        return StorageClient(self.address, self.token if token == "" else token, timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
