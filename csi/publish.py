"""Where the node inventory goes: an HTTP endpoint, and the node's Kubernetes Node object.

`InventoryServer` (``cachefs csi --inventory-listen HOST:PORT``) serves ``GET /inventory`` (the
JSON of `csi.inventory.collect_inventory`) and ``GET /healthz``; any other path is 404, any other
method 405. It carries no token, like the mounts' Prometheus endpoint: it only reads.

`NodePublisher` (``--publish-inventory``) keeps the inventory on the Node object through the
Kubernetes API: one PATCH (`CoreV1Api.patch_node`, which sends a dict body as
``application/strategic-merge-patch+json``) that sets the scheduling labels

    cachefs.io/gpu-count: "8"
    cachefs.io/gpu-model: NVIDIA-H100-80GB-HBM3     (removed when the node has no GPU)
    cachefs.io/rdma: "true" | "false"

and the annotation ``cachefs.io/inventory`` (the compact JSON). It publishes at start, then
every `interval` seconds, and at once when something a scheduler cares about changed: every
`check_interval` seconds it compares the mtimes of the cache's state file and versions/
directory (a put, an eviction or a new mount changes them), and only then collects the inventory
and compares its labels and cached datasets (fractions to the percent) with what it last
published; change-driven publishes are at most one per `min_gap` seconds. A failure (API server
down, 401/403, a conflict) is logged and retried with a doubling backoff (from `backoff`, 1 s,
up to `interval`); it never stops the plugin. The service account needs ``get`` and ``patch`` on
``nodes``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from cachefs.httpserver import TEXT_PLAIN, BaseHandler, ServiceHTTPServer, parse_listen
from csi import labels

log = logging.getLogger("cachefs.csi.publish")

Collect = Callable[[], dict[str, Any]]
ANNOTATION_LIMIT = 200_000  # bytes; the API server refuses more than 256 KiB of annotations


# -- HTTP ---------------------------------------------------------------------------------------

class _InventoryHandler(BaseHandler):
    server: InventoryServer
    logger = log

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/healthz":
            self.send_body(200, b"ok\n", TEXT_PLAIN)
        elif path == "/inventory":
            try:
                body = json.dumps(self.server.collect(), indent=1).encode() + b"\n"
            except Exception as e:
                log.exception("collecting the inventory failed")
                self.send_body(500, f"{type(e).__name__}: {e}\n".encode(), TEXT_PLAIN)
                return
            self.send_body(200, body, "application/json")
        else:
            self.send_body(404, b"not found: try /inventory or /healthz\n", TEXT_PLAIN)

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        self.send_not_allowed("GET, HEAD")

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _not_allowed


class InventoryServer(ServiceHTTPServer):
    """``GET /inventory`` and ``GET /healthz`` on `address` (HOST:PORT; port 0: a free one)."""

    thread_name = "cachefs-inventory-http"

    def __init__(self, address: str, collect: Collect) -> None:
        self.collect = collect
        super().__init__(parse_listen(address, "--inventory-listen"), _InventoryHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self, name: str | None = None, poll_interval: float = 0.2) -> Self:
        super().start(name, poll_interval)
        log.info("serving the node inventory on %s/inventory", self.url)
        return self


# -- the Node object ------------------------------------------------------------------------

def node_labels(inventory: dict[str, Any]) -> dict[str, str | None]:
    """The scheduling labels of an inventory (None: remove the label)."""
    gpus = inventory.get("gpus") or {}
    models = gpus.get("models") or []
    model = labels.label_value(models[0]) if models else ""
    rdma = (inventory.get("rdma") or {}).get("devices") or []
    return {labels.GPU_COUNT: str(int(gpus.get("count") or 0)),
            labels.GPU_MODEL: model or None,
            labels.RDMA: "true" if rdma else "false"}


def inventory_json(inventory: dict[str, Any], limit: int = ANNOTATION_LIMIT) -> str:
    """The compact JSON for the annotation; if it is over `limit` bytes, the least cached
    dataset versions are left out (and `datasets_truncated` is set)."""
    text = json.dumps(inventory, separators=(",", ":"))
    if len(text) <= limit:
        return text
    doc = dict(inventory)
    datasets = sorted(doc.get("datasets") or [], key=lambda d: -d.get("bytes_cached", 0))
    doc["datasets_truncated"] = True
    while datasets:
        datasets = datasets[: len(datasets) // 2]
        doc["datasets"] = datasets
        text = json.dumps(doc, separators=(",", ":"))
        if len(text) <= limit:
            return text
    doc["datasets"] = []
    return json.dumps(doc, separators=(",", ":"))


def node_patch(inventory: dict[str, Any]) -> dict[str, Any]:
    """The patch body that publishes `inventory` on a Node."""
    return {"metadata": {"labels": node_labels(inventory),
                         "annotations": {labels.INVENTORY: inventory_json(inventory)}}}


def scheduling_view(inventory: dict[str, Any]) -> Any:
    """What a scheduler cares about: a change here is published at once."""
    return (sorted((k, v or "") for k, v in node_labels(inventory).items()),
            sorted((d["dataset"], d["commit"], tuple(d["refs"]), d["complete"],
                    round(float(d["fraction_cached"]), 2))
                   for d in inventory.get("datasets") or []))


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _describe_error(e: Exception) -> str:
    status = getattr(e, "status", None)
    if status in (401, 403):
        return (f"the API server refused it ({status} {getattr(e, 'reason', '')}): the service "
                f"account needs get and patch on nodes")
    if status is not None:
        return f"{status} {getattr(e, 'reason', '')}: {str(getattr(e, 'body', '') or '')[:300]}"
    return f"{type(e).__name__}: {e}"


class NodePublisher:
    """A thread that keeps `collect()`'s inventory on Node `node_name` (see the module doc).

    `api` is a `kubernetes.client.CoreV1Api` (or a callable returning one, called on first
    use); `watch_dir` is the cache directory whose changes trigger an early check."""

    def __init__(self, api: Any, node_name: str, collect: Collect, *,
                 interval: float = 60.0, check_interval: float = 2.0, min_gap: float = 5.0,
                 watch_dir: str | None = None, request_timeout: float = 30.0,
                 backoff: float = 1.0) -> None:
        if interval <= 0 or check_interval <= 0:
            raise ValueError("intervals must be positive")
        self._api = api
        self.node_name = node_name
        self.collect = collect
        self.interval = interval
        self.check_interval = min(check_interval, interval)
        self.min_gap = min_gap
        self.request_timeout = request_timeout
        self.backoff = backoff  # the first retry delay; doubled per failure, up to `interval`
        self._watch = ([os.path.join(watch_dir, "state"), os.path.join(watch_dir, "versions")]
                       if watch_dir else [])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0  # successful patches
        self.failures = 0  # failed attempts in a row
        self.last_error: str | None = None
        self.last_view: Any = None

    def _client(self) -> Any:
        if not hasattr(self._api, "patch_node"):
            self._api = self._api()  # a factory: a failure here is retried like any other
        return self._api

    def _signature(self) -> tuple[int, ...]:
        return tuple(_mtime_ns(p) for p in self._watch)

    def publish(self, inventory: dict[str, Any] | None = None) -> None:
        """Collect (unless given) and patch the Node once; raises what the API raises."""
        inventory = self.collect() if inventory is None else inventory
        self._client().patch_node(self.node_name, node_patch(inventory),
                                  _request_timeout=self.request_timeout)
        self.last_view = scheduling_view(inventory)
        self.published += 1

    def _attempt(self, inventory: dict[str, Any] | None) -> bool:
        try:
            self.publish(inventory)
        except Exception as e:  # never fatal: logged, retried with backoff
            self.failures += 1
            self.last_error = _describe_error(e)
            log.warning("publishing the inventory on node %s failed (attempt %d): %s",
                        self.node_name, self.failures, self.last_error)
            return False
        if self.failures:
            log.info("published the inventory on node %s again after %d failure(s)",
                     self.node_name, self.failures)
        self.failures = 0
        self.last_error = None
        return True

    def run(self) -> None:
        """The loop (what the thread runs) until `stop()`."""
        signature = self._signature()
        next_full = 0.0  # due at once: publish at start
        last_publish = float("-inf")
        while not self._stop.is_set():
            now = time.monotonic()
            inventory = None
            due = now >= next_full
            if not due:
                current = self._signature()
                if current != signature and now - last_publish >= self.min_gap:
                    signature = current
                    try:
                        inventory = self.collect()
                        due = scheduling_view(inventory) != self.last_view
                    except Exception:
                        log.exception("collecting the inventory failed")
            if due:
                signature = self._signature()
                if self._attempt(inventory):
                    last_publish = time.monotonic()
                    next_full = last_publish + self.interval
                else:
                    backoff = min(self.interval,
                                  self.backoff * 2.0 ** min(self.failures - 1, 30))
                    next_full = time.monotonic() + backoff
            wait = min(self.check_interval, max(0.0, next_full - time.monotonic()))
            self._stop.wait(wait)

    def start(self) -> NodePublisher:
        self._thread = threading.Thread(target=self.run, daemon=True,
                                        name="cachefs-inventory-publisher")
        self._thread.start()
        log.info("publishing the inventory on node %s every %gs and on change",
                 self.node_name, self.interval)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
