"""Test helper: a real `cachefs gateway` process on 127.0.0.1.

`GatewayServer.start()` returns once `/-/health` answers; use it as a context manager (or call
`kill()`) so that no process outlives its test, whatever happened.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.helpers import run_cli, wait_until_not_racy
from tests.servers import ServiceProcess, free_port

START_TIMEOUT_S = 30.0
CHUNK = 64 * 1024  # the test dataset's chunk size: its shard spans several chunks
ODD_NAMES = ["plain.txt", "with space.txt", "plus+equals=.bin", "tilde~and-dash_.bin",
             "ünïcödé.txt", "a-b", "percent%20literal.txt"]
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


def make_dataset(src: Path, env: dict[str, str]) -> dict[str, object]:
    """`photos`: v1 (tag) and main (one file changed after it), with packed small files, a
    multi-chunk file, a sparse file, odd names and a directory beside a name that continues
    it below '/' (`a` and `a-b`: S3 lists `a-b` before `a/...`)."""
    rng = random.Random(7)
    files: dict[str, bytes] = {}
    for i in range(40):
        files[f"train/c{i % 4}/img{i:03d}.jpg"] = rng.randbytes(rng.randint(1, 9000))
    files["shard.bin"] = rng.randbytes(5 * CHUNK + 123)
    files["sparse.bin"] = bytes(3 * CHUNK) + b"tail"
    files["empty.txt"] = b""
    for name in ODD_NAMES:
        files[f"odd/{name}"] = name.encode() * 3
    files["a/inside.txt"] = b"inside"
    for rel, data in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (src / "odd" / "link-to-shard").symlink_to("../shard.bin")  # served as the file it names
    files["odd/link-to-shard"] = files["shard.bin"]
    run_cli("init", "photos", "--chunk-size", "64KiB", env=env)
    wait_until_not_racy(src)
    run_cli("commit", "photos", str(src), "-m", "v1", env=env)
    run_cli("tag", "photos", "v1", env=env)
    v1 = dict(files)
    files["train/c0/img000.jpg"] = b"changed on main"
    (src / "train/c0/img000.jpg").write_bytes(files["train/c0/img000.jpg"])
    wait_until_not_racy(src)
    run_cli("commit", "photos", str(src), "-m", "v2", env=env)
    commits = {ref: json.loads(run_cli("log", f"photos@{ref}", "--json", env=env).stdout)[0]
               ["commit"] for ref in ("v1", "main")}
    return {"src": src, "v1": v1, "main": files, "commits": commits, "env": env}


def home_env(root: Path) -> dict[str, str]:
    env = {}
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"),
                     ("XDG_STATE_HOME", "state"), ("XDG_CACHE_HOME", "cache")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    return env
