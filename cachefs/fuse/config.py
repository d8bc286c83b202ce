"""The configuration of one mount: every `cachefs mount` flag, validated, as a frozen dataclass."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cachefs.cache.compiled_reads import DEFAULT_THREADS as DEFAULT_READ_THREADS
from cachefs.config import _xdg
from cachefs.errors import UsageError
from cachefs.httpserver import parse_listen

DEFAULT_MEMORY_CACHE = 512 << 20
DEFAULT_ORIGIN_TIMEOUT_S = 30.0
MAX_READ_THREADS = 256


def default_cache_dir() -> Path:
    return _xdg("XDG_CACHE_HOME", ".cache") / "cachefs"


@dataclass(frozen=True)
class MountConfig:
    """What a mount daemon needs; passed to it as JSON."""

    remote_url: str
    dataset: str
    ref: str
    commit: str
    mountpoint: str
    cache_dir: str
    cache_size: int | None = None  # None: a fraction of the free disk (DiskCache's default)
    memory_cache: int = DEFAULT_MEMORY_CACHE
    read_threads: int = DEFAULT_READ_THREADS  # the compiled read path's; 0: off
    uid: int = 0
    gid: int = 0
    umask: int = 0
    origin_timeout: float = DEFAULT_ORIGIN_TIMEOUT_S
    origin_parallelism: int = 16
    metrics: str | None = None  # HOST:PORT for the Prometheus endpoint
    allow_other: bool = False
    read_ahead_kb: int = 4096
    log_file: str | None = None
    pin: bool = True  # pin the commit in the remote while mounted (gc keeps it)
    remote_name: str | None = None  # the remote's configured name (peers are asked by name)
    cache_peers: list[str] | None = None  # the peer ring's members, HOST:PORT
    cache_peers_file: str | None = None  # ... or a file listing them (re-read on change)
    token_file: str | None = None  # the cluster token for peer calls (else CACHEFS_TOKEN)

    def __post_init__(self) -> None:
        if self.memory_cache < 0:
            raise UsageError("--memory-cache must not be negative")
        if self.read_threads < 0 or self.read_threads > MAX_READ_THREADS:
            raise UsageError(f"--read-threads must be 0 to {MAX_READ_THREADS}")
        if self.cache_size is not None and self.cache_size <= 0:
            raise UsageError("--cache-size must be positive")
        if not 0 <= self.umask <= 0o777:
            raise UsageError(f"--umask {self.umask:o} is not a valid umask")
        if self.origin_timeout <= 0:
            raise UsageError("--timeout must be positive")
        if self.metrics is not None:
            parse_listen(self.metrics, "--metrics")
        if self.cache_peers is not None and self.cache_peers_file is not None:
            raise UsageError("give --cache-peers or --cache-peers-file, not both")
        if self.peers_wanted and self.remote_name is None:
            raise UsageError("the peer tier asks peers for chunks of a remote by its name: "
                             "mount with --remote NAME, a remote configured on every node "
                             "(`cachefs remote add NAME URL`), not a URL")

    @property
    def peers_wanted(self) -> bool:
        return self.cache_peers is not None or self.cache_peers_file is not None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountConfig:
        return cls(**json.loads(text))

    @property
    def log_path(self) -> Path:
        if self.log_file:
            return Path(self.log_file)
        name = self.mountpoint.strip("/").replace("/", "_") or "root"
        return Path(self.cache_dir) / "logs" / f"mount-{name}.log"

    @staticmethod
    def user_ids() -> tuple[int, int]:
        return os.getuid(), os.getgid()
