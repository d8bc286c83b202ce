"""Test helper: a real `cachefs gateway` process on 127.0.0.1.

`GatewayServer.start()` returns once `/-/health` answers; use it as a context manager (or call
`kill()`) so that no process outlives its test, whatever happened.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.servers import ServiceProcess, free_port

START_TIMEOUT_S = 30.0
TEST_KEY_ID = "AKIDCACHEFSTEST"
TEST_SECRET = "cachefs-test-secret/with+chars"


class GatewayServer(ServiceProcess):
    """`cachefs gateway` over the test's remote (the isolated XDG home's config)."""

    def __init__(self, workdir: Path, *args: str, port: int | None = None,
                 cache_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = env or {}
        self.args = args
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.endpoint = f"http://{self.address}"
        self.cache_dir = cache_dir or workdir / "gateway-cache"
        self.log = workdir / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self) -> Self:
        argv = [sys.executable, "-m", "cachefs.cli.main", "gateway", "--listen", self.address,
                "--cache-dir", str(self.cache_dir), *self.args]
        env = {k: v for k, v in os.environ.items() if k != "CACHEFS_TOKEN"}
        env.update(self.env)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"the gateway exited {self.proc.returncode}:\n"
                                     f"{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no answer in {START_TIMEOUT_S} s:\n{self.output()}")
            time.sleep(0.05)
        return self

    def healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            try:
                conn.request("GET", "/-/health")
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.kill()


def write_keys(path: Path, keys: dict[str, str]) -> Path:
    path.write_text("".join(f'"{k}" = "{v}"\n' for k, v in keys.items()))
    return path
