"""Registering a peer server in a haystack cluster's node registry, and heartbeating it there.

`cachefs peer serve --register REMOTE` announces the node to the masters of the cluster behind
the configured remote REMOTE: its name, its peer address, its cache's bound and the dataset
versions its mounts serve ("DATASET@COMMIT"), and sends the same registration again every
`interval_s` as its heartbeat. The masters list it (`master:` membership,
`cachefs/peer/sources.py`) while heartbeats arrive and drop it on their own a timeout after the
last one, so a node that dies leaves every ring that reads the registry.

A registration refused for a reason that will not pass (a wrong token, a malformed request)
fails the start; a cluster that cannot be reached is logged and tried again at every beat.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol

from cachefs.errors import CachefsError, PermissionDenied, UsageError

log = logging.getLogger("cachefs.peer.register")

DEFAULT_INTERVAL_S = 3.0
NODE_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,253}")  # as the masters check it
ERROR_LOG_INTERVAL_S = 60.0


class Registry(Protocol):
    """What a heartbeat needs of the registry (`cachefs.remotes.haystack.NodeRegistry`)."""

    def register(self, name: str, peer_address: str, cache_bytes: int,
                 serving: list[str]) -> float: ...

    def close(self) -> None: ...


class NodeHeartbeat:
    """Registers one node, then re-registers it every `interval_s` from a thread. `serving`
    gives the versions served now (asked at every beat); while `paused()` (the node drains),
    no beat is sent, so the masters drop the node from the registry's live list."""

    def __init__(self, registry: Registry, name: str, peer_address: str, cache_bytes: int,
                 serving: Callable[[], list[str]], interval_s: float = DEFAULT_INTERVAL_S,
                 paused: Callable[[], bool] = lambda: False) -> None:
        self.registry = registry
        self.name = name
        self.peer_address = peer_address
        self.cache_bytes = cache_bytes
        self.serving = serving
        self.paused = paused
        self.interval_s = interval_s
        self.beats = 0
        self.last_error: str | None = None
        self._last_logged: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> float:
        """One registration; the masters' node timeout. Raises what the call raised."""
        serving = sorted(set(self.serving()))
        timeout = self.registry.register(self.name, self.peer_address, self.cache_bytes,
                                         serving)
        self.beats += 1
        return timeout

    def start(self) -> None:
        """The first registration (a refusal that will not pass raises; an unreachable
        cluster is logged), then the heartbeat thread."""
        try:
            timeout = self.beat()
        except (PermissionDenied, UsageError):
            raise  # the owner closes the registry (`close`)
        except CachefsError as e:
            self._failed(e)
        else:
            log.info("registered node %s (peer %s) with the masters; they drop it after %g s "
                     "without a heartbeat", self.name, self.peer_address, timeout)
            if timeout and self.interval_s >= timeout:
                log.warning("heartbeat every %g s, but the masters drop a node after %g s: "
                            "lower --heartbeat-interval", self.interval_s, timeout)
        self._thread = threading.Thread(target=self._run, name="node-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.paused():
                continue
            try:
                self.beat()
            except Exception as e:  # the heartbeat must outlive any one failure
                self._failed(e)
                continue
            if self.last_error is not None:
                log.info("node %s: heartbeats reach the masters again", self.name)
                self.last_error = None
                self._last_logged = None

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        text = str(error) or type(error).__name__
        if (text != self.last_error or self._last_logged is None
                or now - self._last_logged >= ERROR_LOG_INTERVAL_S):
            log.warning("node %s: registration failed (trying again every %g s): %s",
                        self.name, self.interval_s, text)
            self._last_logged = now
        self.last_error = text

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.registry.close()
