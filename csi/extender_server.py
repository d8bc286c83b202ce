"""`cachefs scheduler-extender`: the kube-scheduler extender over HTTP, with its API reads.

    POST /filter       ExtenderArgs -> ExtenderFilterResult
    POST /prioritize   ExtenderArgs -> HostPriorityList
    GET  /healthz      "ok"

The decisions are `csi.extender`'s. This module adds what needs the outside world: reading the
candidate Nodes when the scheduler sends names only (nodeCacheCapable), by one Node list cached
for a few seconds, and following a pod's PVCs to their csi.cachefs.io PVs. Without API access
(outside a cluster and no --kube-api), names-only requests fail the nodes of pods that ask for
hardware, with that reason, and PVC lookups are skipped. An API error never fails a request: a
PVC that cannot be read is skipped (logged), Nodes that cannot be read go to FailedNodes (the
scheduler tries again later), and a list that cannot be refreshed is served stale for a while.

Answers are 200 with JSON. Anything that is not an ExtenderArgs document is 400 (which the
scheduler reports as an extender error), a body over 32 MiB 413, another method 405, another
path 404. The extender takes no credentials (the scheduler's extender client sends none): it
reads only, and should listen where only the scheduler reaches it (a sidecar of the scheduler
on 127.0.0.1, or a cluster-internal Service).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from cachefs.errors import UsageError
from cachefs.httpserver import BaseHandler, BodyError, ServiceHTTPServer, parse_listen
from csi import extender
from csi.extender import ExtenderArgs, NodeFacts, WantedVersion
from csi.rpc import DRIVER_NAME

log = logging.getLogger("cachefs.csi.extender")

MAX_BODY = 32 * 1024 * 1024
DEFAULT_LISTEN = "127.0.0.1:8888"
NODE_TTL_S = 5.0  # how long a Node list read for a names-only request is reused
STALE_LIMIT_S = 60.0  # how long a list may be served while the API cannot be read
CLAIM_TTL_S = 5.0
API_TIMEOUT_S = 2.0  # kube-scheduler waits 5 s (httpTimeout) for the whole answer
NO_API = ("the extender has no Kubernetes API access to read Node objects (run it in the "
          "cluster or give --kube-api), so it cannot check this node")


def describe_error(error: BaseException) -> str:
    status = getattr(error, "status", None)
    if status:
        return f"HTTP {status} {getattr(error, 'reason', '') or ''}".strip()
    return f"{type(error).__name__}: {error}"


class KubeReader:
    """The extender's reads from the API server: Nodes (one cached list) and PVC -> PV."""

    def __init__(self, api: Any, node_ttl: float = NODE_TTL_S, claim_ttl: float = CLAIM_TTL_S,
                 timeout: float = API_TIMEOUT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.node_ttl = node_ttl
        self.claim_ttl = claim_ttl
        self.timeout = timeout
        self.clock = clock
        self._nodes: dict[str, dict[str, Any]] | None = None
        self._nodes_at = 0.0
        self._nodes_lock = threading.Lock()
        self._cache: dict[tuple[str, ...], tuple[float, Any]] = {}
        self._cache_lock = threading.Lock()

    def _get(self, method: str, *args: Any) -> Any:
        """One GET through the client, decoded as plain JSON (no model objects)."""
        response = getattr(self.api, method)(*args, _preload_content=False,
                                             _request_timeout=self.timeout)
        try:
            return json.loads(response.data)
        finally:
            response.release_conn()

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Every Node by name: a list at most `node_ttl` old, or stale while the API is down."""
        with self._nodes_lock:
            age = self.clock() - self._nodes_at
            if self._nodes is not None and age < self.node_ttl:
                return self._nodes
            try:
                document = self._get("list_node")
            except Exception as e:
                if self._nodes is not None and age < STALE_LIMIT_S:
                    log.warning("cannot list Nodes (%s); using the list read %.0f s ago",
                                describe_error(e), age)
                    return self._nodes
                raise
            items = document.get("items") if isinstance(document, dict) else None
            self._nodes = {extender.node_name(n): n for n in items or []
                           if isinstance(n, dict)}
            self._nodes_at = self.clock()
            return self._nodes

    def node_facts(self, names: list[str]) -> dict[str, NodeFacts | str]:
        try:
            nodes = self.nodes()
        except Exception as e:
            log.warning("cannot list Nodes: %s", describe_error(e))
            reason = f"cannot read Nodes from the Kubernetes API: {describe_error(e)}"
            return dict.fromkeys(names, reason)
        return {name: extender.node_facts(nodes[name]) if name in nodes
                else f"node {name} not found in the Kubernetes API" for name in names}

    def _cached(self, key: tuple[str, ...], ttl: float, read: Callable[[], Any]) -> Any:
        now = self.clock()
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < ttl:
                return hit[1]
        value = read()
        with self._cache_lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[key] = (now, value)
        return value

    def _read_or_none(self, method: str, *args: Any) -> Any:
        try:
            return self._get(method, *args)
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return None
            raise

    def claim_version(self, namespace: str, claim: str) -> WantedVersion | None:
        """The version a PVC's csi.cachefs.io PV names; None for other drivers, unbound or
        absent claims. API errors propagate (the caller skips the volume)."""
        pvc = self._cached(("pvc", namespace, claim), self.claim_ttl, lambda: self._read_or_none(
            "read_namespaced_persistent_volume_claim", claim, namespace))
        volume_name = ((pvc or {}).get("spec") or {}).get("volumeName")
        if not volume_name:
            log.debug("PVC %s/%s is absent or not bound yet: no dataset from it", namespace,
                      claim)
            return None
        # A PV's volumeAttributes never change: a longer cache is safe.
        pv = self._cached(("pv", volume_name), 12 * self.claim_ttl,
                          lambda: self._read_or_none("read_persistent_volume", volume_name))
        source = ((pv or {}).get("spec") or {}).get("csi") or {}
        if source.get("driver") != DRIVER_NAME:
            return None
        return extender.version_from_attributes(source.get("volumeAttributes"))


class Extender:
    """filter and prioritize on parsed ExtenderArgs, with API reads where needed."""

    def __init__(self, kube: KubeReader | None) -> None:
        self.kube = kube

    def _facts(self, args: ExtenderArgs) -> dict[str, NodeFacts | str]:
        if not args.names_only:
            return {extender.node_name(n): extender.node_facts(n) for n in args.nodes}
        if self.kube is None:
            return dict.fromkeys(args.node_names, NO_API)
        return self.kube.node_facts(args.node_names)

    def filter(self, args: ExtenderArgs) -> dict[str, Any]:
        try:
            needed = extender.pod_requirements(args.pod).any
        except extender.BadPodRequest as e:
            log.info("filter %s: %s: every node fails", extender.pod_label(args.pod), e)
            needed = False
        result = extender.filter_result(args, self._facts(args) if needed else {})
        failed = {**result["FailedNodes"], **result["FailedAndUnresolvableNodes"]}
        if needed and failed:
            log.info("filter %s: %d of %d nodes fail, e.g. %s: %s", extender.pod_label(args.pod),
                     len(failed), len(args.node_names), *next(iter(failed.items())))
        return result

    def pod_versions(self, pod: dict[str, Any]) -> list[WantedVersion]:
        wanted = extender.pod_datasets(pod)
        claims = extender.pod_claims(pod)
        metadata = pod.get("metadata")
        namespace = (metadata.get("namespace") if isinstance(metadata, dict) else None) \
            or "default"
        if claims and self.kube is None:
            log.debug("pod %s: no API access, its PVCs are not followed",
                      extender.pod_label(pod))
        elif claims:
            assert self.kube is not None
            for claim in claims:
                try:
                    version = self.kube.claim_version(namespace, claim)
                except Exception as e:
                    log.warning("pod %s: cannot read PVC %s or its PV (%s); its dataset is "
                                "left out of the score", extender.pod_label(pod), claim,
                                describe_error(e))
                    continue
                if version is not None:
                    wanted.append(version)
        return extender.dedupe(wanted)

    def prioritize(self, args: ExtenderArgs) -> list[dict[str, Any]]:
        wanted = self.pod_versions(args.pod)
        facts = self._facts(args) if wanted else {}
        result = extender.priority_list(args, wanted, facts)
        if wanted:
            log.debug("prioritize %s (%s): %s", extender.pod_label(args.pod),
                      ", ".join(map(str, wanted)), extender.explain(result, wanted, facts))
        return result


class _Handler(BaseHandler):
    server: ExtenderServer
    server_version = "cachefs-scheduler-extender"
    timeout = 120  # an idle connection is dropped after this long
    logger = log

    ROUTES = {"/filter": "POST", "/prioritize": "POST", "/healthz": "GET"}

    def _send(self, code: int, payload: Any, close: bool = False,
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_body(code, data, "application/json", headers, close=close)

    def _error(self, code: int, message: str, close: bool = False,
               headers: dict[str, str] | None = None) -> None:
        self._send(code, {"error": message}, close=close, headers=headers)

    def _route(self) -> None:
        path = "/" + urlsplit(self.path).path.strip("/")
        allowed = self.ROUTES.get(path)
        if allowed is None:
            self._error(404, f"no such endpoint {path}: use POST /filter, POST /prioritize or "
                             "GET /healthz", close=True)
            return
        if self.command != allowed and not (allowed == "GET" and self.command == "HEAD"):
            self._error(405, f"{path} takes {allowed}, not {self.command}", close=True,
                        headers={"Allow": allowed if allowed == "POST" else "GET, HEAD"})
            return
        if path == "/healthz":
            self._send(200, "ok")
            return
        try:
            body = self.read_body(MAX_BODY)
        except BodyError as e:
            self._error(e.code, str(e), close=True)
            return
        if not body.strip():
            self._error(400, "the request body is empty: expected ExtenderArgs JSON")
            return
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as e:
            self._error(400, f"the request body is not JSON: {e}")
            return
        try:
            args = extender.parse_args(document)
        except extender.BadArgs as e:
            self._error(400, str(e))
            return
        verb = self.server.extender.filter if path == "/filter" else \
            self.server.extender.prioritize
        try:
            result: Any = verb(args)
        except Exception as e:
            log.exception("%s failed", path)
            self._error(500, f"{path} failed: {describe_error(e)}")
            return
        self._send(200, result)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _route


class ExtenderServer(ServiceHTTPServer):
    """The extender's threading HTTP server; `start()` serves in a thread, `stop()` ends it
    and every open connection."""

    thread_name = "scheduler-extender"

    def __init__(self, address: tuple[str, int], ext: Extender) -> None:
        self.extender = ext
        super().__init__(address, _Handler)


def build_server(listen: str, api: Any | None, node_ttl: float = NODE_TTL_S) -> ExtenderServer:
    kube = KubeReader(api, node_ttl=node_ttl) if api is not None else None
    try:
        return ExtenderServer(parse_listen(listen, "--listen"), Extender(kube))
    except OSError as e:
        raise UsageError(f"cannot listen on {listen}: {e.strerror or e}") from e


def connect_api(api_url: str | None, token_file: str | None) -> Any | None:
    """The API client, or None (logged) when outside a cluster and no --kube-api is given."""
    from cachefs.errors import ConfigError
    from csi.kube import core_api

    try:
        return core_api(api_url, token_file)
    except ConfigError as e:
        if api_url is not None:
            raise
        log.warning("running without Kubernetes API access (%s): requests that name nodes only "
                    "(nodeCacheCapable) fail the nodes of pods that ask for GPUs or RDMA, and "
                    "pods' PVCs are not followed", e)
        return None
