"""A fake Kubernetes API server for tests: real HTTP on 127.0.0.1, checked as the API server would.

`FakeKubeAPI` serves the few core/v1 resources cachefs reads and writes, from an in-memory store,
to the real `kubernetes` client (point it there with `csi.kube.core_api(api.url, token_file)`):

    GET   /api/v1/nodes                                  NodeList (labelSelector: k=v, k!=v, k, !k)
    GET   /api/v1/nodes/NAME                             Node
    PATCH /api/v1/nodes/NAME                             Node, after applying the patch
    GET   /api/v1/namespaces/NS/persistentvolumeclaims/NAME
    GET   /api/v1/persistentvolumes/NAME

Checks, with `Status` JSON answers like the API server's: a request without
``Authorization: Bearer <token>`` gets 401; an unknown path or object 404; another method 405;
a PATCH whose content type is not one of the patch types 415; a body that is not JSON 400; a
merge or strategic merge patch that is not a JSON object 400 (a JSON patch must be a list).
Patches apply to the whole stored object as RFC 7386 merge patches (for the maps of
metadata.labels/annotations, a strategic merge patch means the same; a null value deletes the
key); a JSON patch (RFC 6902 add/replace/remove/test) is applied too. Each change bumps
metadata.resourceVersion.

Every request is recorded in `.requests` as `Request(method, path, content_type, body)`
(`path` without the query string, `body` the decoded JSON or None). `.fail_status = 503` makes
every request fail with that status until set back to None; `stop()` then `start()` brings the
server back on the same port with the same store (an API server that was down).
"""

from __future__ import annotations

import copy
import json
import threading
import uuid
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs, unquote, urlsplit

from tests.servers import LOOPBACK, KeepAliveHandler, LoopbackHTTPServer, ServerContext

PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
)
_CREATED = "2024-01-01T00:00:00Z"
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 415: "UnsupportedMediaType", 422: "Invalid",
            500: "InternalError", 503: "ServiceUnavailable"}


class Request(NamedTuple):
    method: str
    path: str
    content_type: str | None
    body: Any


class KubeError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_object(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": _REASONS.get(code, "Unknown"), "code": code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: `patch` applied to `target` (a new object; neither argument is changed)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KubeError(422, f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(target: dict[str, Any], ops: list[Any]) -> dict[str, Any]:
    """RFC 6902 add/replace/remove/test on objects (enough for metadata maps)."""
    result = copy.deepcopy(target)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise KubeError(400, f"invalid JSON patch operation {op!r}")
        *parents, last = _pointer(op["path"])
        node: Any = result
        for part in parents:
            if not isinstance(node, dict) or part not in node:
                raise KubeError(422, f"path {op['path']} does not exist")
            node = node[part]
        if not isinstance(node, dict):
            raise KubeError(422, f"path {op['path']} is not in an object")
        kind = op["op"]
        if kind in ("add", "replace"):
            if kind == "replace" and last not in node:
                raise KubeError(422, f"path {op['path']} does not exist")
            node[last] = copy.deepcopy(op.get("value"))
        elif kind == "remove":
            if last not in node:
                raise KubeError(422, f"path {op['path']} does not exist")
            del node[last]
        elif kind == "test":
            if node.get(last) != op.get("value"):
                raise KubeError(422, f"test of {op['path']} failed")
        else:
            raise KubeError(400, f"unsupported JSON patch operation {kind!r}")
    return result


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


class _Handler(KeepAliveHandler):
    server: _Server

    def _handle(self) -> None:
        api: FakeKubeAPI = self.server.api
        raw = self.read_body()
        url = urlsplit(self.path)
        path = unquote(url.path)
        content_type = self.headers.get("Content-Type")
        media = content_type.split(";")[0].strip().lower() if content_type else None
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                bad_json = True
        with api.lock:
            api.requests.append(Request(self.command, path, content_type, body))
        try:
            if api.fail_status is not None:
                raise KubeError(api.fail_status, "injected failure")
            if self.headers.get("Authorization") != f"Bearer {api.token}":
                raise KubeError(401, "Unauthorized")
            if bad_json:
                raise KubeError(400, "the request body is not valid JSON")
            code, payload = api.dispatch(self.command, path, parse_qs(url.query), media, body)
        except KubeError as e:
            code, payload = e.code, status_object(e.code, e.message)
        self.send_body(code, json.dumps(payload).encode(), "application/json")

    do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _handle


class _Server(LoopbackHTTPServer):
    def __init__(self, api: FakeKubeAPI, port: int) -> None:
        self.api = api
        self._port = port
        super().__init__(_Handler)

    def server_bind(self) -> None:
        self.server_address = (LOOPBACK, self._port)  # 0: a free port; else the port it had
        super().server_bind()


class FakeKubeAPI(ServerContext):
    """An in-memory Kubernetes API server on 127.0.0.1; a context manager (see module doc)."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token or uuid.uuid4().hex
        self.lock = threading.RLock()
        self.nodes: dict[str, dict[str, Any]] = {}
        self.pvcs: dict[tuple[str, str], dict[str, Any]] = {}
        self.pvs: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self.fail_status: int | None = None
        self.port = 0
        self._server: _Server | None = None
        self._version = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # -- the store --------------------------------------------------------------------------

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _metadata(self, name: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "uid": str(uuid.uuid4()), "resourceVersion": self._next_version(),
                "creationTimestamp": _CREATED, **extra}

    def add_node(self, name: str, labels: dict[str, str] | None = None,
                 annotations: dict[str, str] | None = None) -> dict[str, Any]:
        with self.lock:
            labels = {"kubernetes.io/hostname": name, **(labels or {})}
            node = {"apiVersion": "v1", "kind": "Node",
                    "metadata": self._metadata(name, labels=labels,
                                               annotations=dict(annotations or {})),
                    "spec": {}, "status": {}}
            self.nodes[name] = node
            return copy.deepcopy(node)

    def add_pvc(self, namespace: str, name: str, volume_name: str) -> dict[str, Any]:
        with self.lock:
            pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": self._metadata(name, namespace=namespace),
                   "spec": {"accessModes": ["ReadOnlyMany"], "volumeName": volume_name,
                            "resources": {"requests": {"storage": "1Gi"}}},
                   "status": {"phase": "Bound" if volume_name else "Pending"}}
            self.pvcs[(namespace, name)] = pvc
            return copy.deepcopy(pvc)

    def add_pv(self, name: str, csi_driver: str,
               volume_attributes: dict[str, str]) -> dict[str, Any]:
        with self.lock:
            pv = {"apiVersion": "v1", "kind": "PersistentVolume",
                  "metadata": self._metadata(name),
                  "spec": {"accessModes": ["ReadOnlyMany"], "capacity": {"storage": "1Gi"},
                           "csi": {"driver": csi_driver, "volumeHandle": name,
                                   "volumeAttributes": dict(volume_attributes)}},
                  "status": {"phase": "Bound"}}
            self.pvs[name] = pv
            return copy.deepcopy(pv)

    def node(self, name: str) -> dict[str, Any]:
        """A copy of the stored Node (KeyError when absent)."""
        with self.lock:
            return copy.deepcopy(self.nodes[name])

    def patches(self, node: str | None = None) -> list[Request]:
        """The PATCH requests recorded so far (to one node's path, when given)."""
        with self.lock:
            return [r for r in self.requests if r.method == "PATCH"
                    and (node is None or r.path == f"/api/v1/nodes/{node}")]

    # -- requests ---------------------------------------------------------------------------

    def dispatch(self, method: str, path: str, query: dict[str, list[str]], media: str | None,
                 body: Any) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "v1"]:
            raise KubeError(404, f"the server could not find the requested resource ({path})")
        rest = parts[2:]
        with self.lock:
            if rest == ["nodes"]:
                self._allow(method, "GET")
                selector = query.get("labelSelector", [""])[0]
                items = [copy.deepcopy(n) for _, n in sorted(self.nodes.items())
                         if _selector_matches(selector, n["metadata"].get("labels") or {})]
                return 200, {"apiVersion": "v1", "kind": "NodeList",
                             "metadata": {"resourceVersion": str(self._version)},
                             "items": items}
            if len(rest) == 2 and rest[0] == "nodes":
                self._allow(method, "GET", "PATCH")
                node = self._get(self.nodes, rest[1], "nodes", rest[1])
                if method == "PATCH":
                    node = self._patch(rest[1], node, media, body)
                return 200, copy.deepcopy(node)
            if len(rest) == 4 and rest[0] == "namespaces" and rest[2] == "persistentvolumeclaims":
                self._allow(method, "GET")
                pvc = self._get(self.pvcs, (rest[1], rest[3]), "persistentvolumeclaims", rest[3])
                return 200, copy.deepcopy(pvc)
            if len(rest) == 2 and rest[0] == "persistentvolumes":
                self._allow(method, "GET")
                return 200, copy.deepcopy(self._get(self.pvs, rest[1], "persistentvolumes",
                                                    rest[1]))
        raise KubeError(404, f"the server could not find the requested resource ({path})")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            raise KubeError(405, f"method {method} is not allowed here")

    @staticmethod
    def _get(store: dict[Any, dict[str, Any]], key: Any, kind: str, name: str) -> dict[str, Any]:
        try:
            return store[key]
        except KeyError:
            raise KubeError(404, f'{kind} "{name}" not found') from None

    def _patch(self, name: str, node: dict[str, Any], media: str | None,
               body: Any) -> dict[str, Any]:
        if media not in PATCH_TYPES:
            raise KubeError(415, f"the body of the request was in an unknown format - accepted "
                                 f"media types include: {', '.join(PATCH_TYPES)}")
        if media == "application/json-patch+json":
            if not isinstance(body, list):
                raise KubeError(400, "a JSON patch must be a list of operations")
            patched = json_patch(node, body)
        else:
            if not isinstance(body, dict):
                raise KubeError(400, "a merge patch must be a JSON object")
            patched = merge_patch(node, body)
        meta = patched.get("metadata")
        if not isinstance(meta, dict) or meta.get("name") != name:
            raise KubeError(422, "metadata.name cannot be changed")
        for field in ("labels", "annotations"):
            values = meta.get(field) or {}
            if not isinstance(values, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
                raise KubeError(422, f"metadata.{field} must map strings to strings")
        patched["apiVersion"], patched["kind"] = "v1", "Node"
        meta["resourceVersion"] = self._next_version()
        self.nodes[name] = patched
        return patched

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Serve (again, on the same port after `stop()`)."""
        if self._server is not None:
            raise RuntimeError("fake Kubernetes API already running")
        self._server = _Server(self, self.port)
        self.port = int(self._server.server_address[1])
        self._server.start(f"fake-kube-api:{self.port}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and cut open connections; the store is kept. Safe to call twice."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout)
