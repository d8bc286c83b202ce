"""The storage server's link to the masters: registration, heartbeats and repairs.

A `StorageAgent` runs two threads inside `cachefs storage serve --master ADDRS`:

- the **heartbeat** thread registers the server (id, advertised address, zone, capacity, its
  volume count) and then, every `interval` seconds, sends a heartbeat with the free bytes and
  the live-needle count of every volume (the master keeps those of the vids the server
  replicates; sending them all means a count is known from the first heartbeat after a
  placement change), plus the repairs finished since the last one. The masters' answer lists
  the vids it replicates now and the repairs to start; an answer saying the server is unknown (it
  was declared dead, or the masters lost it) makes it register again. `MasterClient` tries
  every master and sticks to the one that answers (followers forward heartbeats to the
  leader). Masters being unreachable is logged and retried at the next interval; the storage
  server keeps serving.
- the **repair** thread runs the tasks one at a time with
  `storage_server.repair.repair_volume(source, this server, vid)` and wakes the heartbeat
  thread when one finishes, so the master sees the new counts at once.

The counts come from `VolumeStore.stat()` (its per-volume `live`). `stats()` sums the
heartbeats and repairs so far (needles checked and copied, bytes copied; the repair running
counted as far as it got) for the metrics (storage_server/metrics.py).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

from cachefs.errors import CachefsError, UsageError
from master.client import MasterClient, RepairDone, RepairTask
from storage_server.client import StorageClient
from storage_server.repair import RepairReport, repair_volume

log = logging.getLogger("cachefs.storage.agent")

DEFAULT_INTERVAL_S = 3.0


@dataclass(frozen=True)
class AgentConfig:
    """`cachefs storage serve --master ADDRS --server-id ID --zone Z --advertise HOST:PORT`."""

    masters: tuple[str, ...]
    server_id: str
    zone: str = "default"
    advertise: str = ""          # how clients and peers reach this server; "" = the bound one
    interval: float = DEFAULT_INTERVAL_S

    def __post_init__(self) -> None:
        if not self.masters:
            raise UsageError("--master: at least one master address")
        if not self.server_id:
            raise UsageError("--server-id is required with --master")
        if self.interval <= 0:
            raise UsageError(f"--heartbeat-interval {self.interval}: must be positive")


class StorageAgent:
    """Registers `store` with the masters and keeps it in its replica sets (module docstring).
    `local_address` is where this process's own gRPC server is reachable (repairs write
    through it)."""

    def __init__(self, store: Any, config: AgentConfig, token: str | None,
                 local_address: str) -> None:
        self.store = store
        self.config = config
        self.token = token
        self.local_address = local_address
        self.advertise = config.advertise or local_address
        self.client = MasterClient(list(config.masters), token,
                                   timeout=max(2 * config.interval, 5.0))
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._tasks: queue.Queue[RepairTask | None] = queue.Queue()
        self._queued: set[int] = set()
        self._done: list[RepairDone] = []
        self._lock = threading.Lock()
        self.vids: tuple[int, ...] = ()  # the volumes it replicates (the last answer)
        self._registered = False
        self._threads: list[threading.Thread] = []
        self.heartbeats = 0
        # Repairs for the metrics (`stats`): the one running, and the sums of those done.
        self._repairing: RepairReport | None = None
        self._repaired = {"repairs_succeeded": 0, "repairs_failed": 0,
                          "repair_checked_needles": 0, "repair_copied_needles": 0,
                          "repair_copied_bytes": 0}

    def start(self) -> None:
        for name, target in (("storage-heartbeat", self._heartbeat_loop),
                             ("storage-repair", self._repair_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._tasks.put(None)
        for thread in self._threads:
            thread.join(10)
        self.client.close()

    # -- heartbeats ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.beat()
                if failures:
                    log.info("masters reachable again")
                failures = 0
            except CachefsError as e:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("heartbeat to the masters failed (%d in a row): %s", failures, e)
            except Exception:
                log.exception("heartbeat failed")
            self._wake.wait(self.config.interval)
            self._wake.clear()

    def register(self) -> None:
        stat = os.statvfs(self.store.data_dir)
        volumes, replicas = self.client.register_storage(
            self.config.server_id, self.advertise, self.config.zone,
            stat.f_blocks * stat.f_frsize, self.store.volumes)
        self._registered = True
        log.info("registered with the masters as %s at %s (cluster: %d volumes, %d replicas)",
                 self.config.server_id, self.advertise, volumes, replicas)

    def beat(self) -> None:
        """Register if needed, send one heartbeat, queue the repairs it answers."""
        if not self._registered:
            self.register()
        doc = self.store.stat()
        live = {row["vid"]: row["live"] for row in doc["per_volume"]}
        with self._lock:
            done, self._done = self._done, []
        try:
            answer = self.client.heartbeat(self.config.server_id, doc["free_bytes"], live,
                                           done)
        except BaseException:
            with self._lock:
                self._done = done + self._done  # report them next time
            raise
        self.heartbeats += 1
        if not answer.registered:
            log.warning("the masters do not know this server (declared dead?): registering "
                        "again")
            self._registered = False
            self._wake.set()
            return
        self.vids = answer.vids
        for task in answer.repairs:
            with self._lock:
                if task.vid in self._queued:
                    continue
                self._queued.add(task.vid)
            self._tasks.put(task)

    # -- repairs ---------------------------------------------------------------------------

    def _repair_loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None or self._stop.is_set():
                return
            result = self.repair(task)
            with self._lock:
                self._queued.discard(task.vid)
                self._done.append(result)
            self._wake.set()

    def repair(self, task: RepairTask) -> RepairDone:
        log.info("repairing volume %d from %s (%s)", task.vid, task.source_id,
                 task.source_address)
        report = RepairReport(vid=task.vid, source=task.source_address,
                              target=self.local_address)
        with self._lock:
            self._repairing = report
        ok = False
        try:
            with StorageClient(task.source_address, self.token) as source, \
                    StorageClient(self.local_address, self.token) as local:
                repair_volume(source, local, task.vid, report=report)
            ok = True
        except CachefsError as e:
            log.warning("repair of volume %d from %s failed: %s", task.vid, task.source_id, e)
            return RepairDone(task.vid, task.source_id, False, str(e))
        finally:
            with self._lock:  # what a failed repair copied was copied all the same
                self._repairing = None
                self._add_repair(report, ok)
        log.info("repaired volume %d from %s: %d needles copied", task.vid, task.source_id,
                 report.copied)
        return RepairDone(task.vid, task.source_id, True)

    def _add_repair(self, report: RepairReport, ok: bool) -> None:
        """Add a finished repair's `report` to the sums (caller holds the lock)."""
        done = self._repaired
        done["repairs_succeeded" if ok else "repairs_failed"] += 1
        done["repair_checked_needles"] += report.checked
        done["repair_copied_needles"] += report.copied
        done["repair_copied_bytes"] += report.bytes_copied

    def stats(self) -> dict[str, int]:
        """Heartbeats and repairs so far (the repair running counted as far as it got)."""
        with self._lock:
            running = self._repairing
            figures = dict(self._repaired)
            queued = len(self._queued) - (running is not None)
        if running is not None:
            figures["repair_checked_needles"] += running.checked
            figures["repair_copied_needles"] += running.copied
            figures["repair_copied_bytes"] += running.bytes_copied
        return {**figures, "repairs_running": int(running is not None),
                "repairs_queued": max(0, queued), "heartbeats": self.heartbeats,
                "registered": int(self._registered)}


def local_address(bound: str) -> str:
    """Where this process reaches its own server bound at `bound` (a wildcard host becomes
    loopback)."""
    host, _, port = bound.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", ""):
        return f"127.0.0.1:{port}"
    if host == "::":
        return f"[::1]:{port}"
    return bound
