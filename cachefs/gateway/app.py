"""The gateway's ASGI application: plain HTTP and the read side of the S3 API on one port.

Layout: `/DATASET/REF/PATH`, for both doors. For S3, the bucket is the dataset and a key's first
segment is the ref (`s3://imagenet/v3/train/n01/x.jpg`); a delimiter listing at the bucket's
root lists branches and tags as common prefixes.

- Plain HTTP: `GET`/`HEAD /DATASET/REF/PATH` with a single `Range`, `If-None-Match`,
  `If-Modified-Since` (and `If-Match`, `If-Unmodified-Since`); `GET /DATASET/REF/DIR/?list` is
  a JSON listing (`/DATASET/?list`: its branches and tags; `/?list`: the datasets).
- S3: `ListBuckets`, `ListObjectsV2`, `ListObjects`, `HeadBucket`, `GetBucketLocation`,
  `HeadObject`, `GetObject`. Writes answer `AccessDenied`, other operations `NotImplemented`.
  Errors are S3's XML documents, except for requests that are plainly not an S3 client's (a
  bearer token, a `?list`), which get one line of text.

Every response names the commit it read in `X-Cachefs-Commit`; `ETag` is the file's BLAKE3 (64
hex, quoted: never 32 hex, which clients take for an MD5); a response read through a commit hash
is `Cache-Control: immutable`. Bodies stream, piece by piece, from the cache tiers; a piece that
fails verification ends the connection mid-body (the client sees a short body, never wrong
bytes). Paths are checked before anything is looked up: `..`, `.`, encoded slashes, NUL and
empty segments are refused.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import itertools
import json
import logging
import mimetypes
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

from cachefs.dataset.objects import Kind, TreeEntry
from cachefs.errors import CachefsError, CorruptObject, NotFound, PathNotFound
from cachefs.gateway import s3xml
from cachefs.gateway.auth import Authenticator, AuthError
from cachefs.gateway.bridge import TrioGuest
from cachefs.gateway.catalog import Catalog, Piece, Version
from cachefs.gateway.metrics import GatewayMetrics
from cachefs.metrics import CONTENT_TYPE as METRICS_TYPE

log = logging.getLogger("cachefs.gateway")
access_log = logging.getLogger("cachefs.gateway.access")

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

MAX_KEYS = 1000
MAX_PATH_BYTES = 4096
# Query parameters of S3 operations the gateway does not offer (bucket and object
# sub-resources): answered NotImplemented rather than mistaken for a GET.
UNSUPPORTED_SUBRESOURCES = frozenset({
    "acl", "analytics", "cors", "encryption", "inventory", "lifecycle", "logging", "metrics",
    "notification", "object-lock", "ownershipControls", "policy", "policyStatus",
    "publicAccessBlock", "replication", "requestPayment", "tagging", "torrent", "uploads",
    "uploadId", "versioning", "versions", "website", "accelerate", "intelligent-tiering",
    "legal-hold", "retention", "restore", "select", "attributes", "delete", "partNumber"})
IMMUTABLE = "public, max-age=31536000, immutable"
MUTABLE = "no-cache"


class HttpError(Exception):
    """An answer other than success, with its S3 code (also used for the text body)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or []


def bad_request(message: str, code: str = "InvalidArgument") -> HttpError:
    return HttpError(400, code, message)


@dataclass
class Request:
    method: str
    raw_path: str
    raw_query: str
    query: dict[str, str]
    headers: dict[str, str]
    segments: list[str]
    request_id: str
    s3: bool = False
    operation: str = "other"
    started: bool = False  # the response's status line is sent: an error now ends the stream
    sent: int = 0  # body bytes sent


def split_target(raw_path: bytes) -> list[str]:
    """Decoded path segments of a request target (a trailing '/' adds none). Refused with
    400: a path over MAX_PATH_BYTES, `.` or `..`, an encoded '/', NUL, an empty segment, bytes
    that are not UTF-8."""
    if len(raw_path) > MAX_PATH_BYTES:
        raise bad_request("the path is too long", "KeyTooLongError")
    if not raw_path.startswith(b"/"):
        raise bad_request("the path must start with '/'", "InvalidURI")
    body = raw_path[1:].removesuffix(b"/")
    if not body:
        return []
    segments = []
    for raw in body.split(b"/"):
        part = unquote_to_bytes(raw)
        if not part:
            raise bad_request("empty path segment ('//')", "InvalidURI")
        if part in (b".", b".."):
            raise bad_request("'.' and '..' are not allowed in paths", "InvalidURI")
        if b"/" in part or b"\0" in part:
            raise bad_request("encoded '/' or NUL in a path segment", "InvalidURI")
        try:
            segments.append(part.decode())
        except UnicodeDecodeError:
            raise bad_request("the path is not UTF-8", "InvalidURI") from None
    return segments


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=` range over `size` bytes; None to send the whole file
    (a header this server does not honour: several ranges, another unit). Raises 416."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first:  # the last N bytes
            n = int(last)
            if n <= 0 or size == 0:
                raise ValueError
            return max(0, size - n), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        start, end = size, size  # unsatisfiable
    if start < 0 or start >= size or end <= start:
        raise HttpError(416, "InvalidRange", "The requested range is not satisfiable",
                        [("Content-Range", f"bytes */{size}")])
    return start, min(end, size)


def http_date(time_ns: int) -> str:
    return email.utils.formatdate(time_ns / 1e9, usegmt=True)


def parse_http_date(value: str) -> float | None:
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.timestamp() if parsed is not None else None


def etag_of(entry: TreeEntry) -> str:
    return f'"{entry.hash}"'


def etag_matches(header: str, etag: str) -> bool:
    candidates = [c.strip() for c in header.split(",")]
    return "*" in candidates or any(c.removeprefix("W/") == etag for c in candidates)


def encode_token(payload: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode()
                                    ).decode().rstrip("=")


def decode_token(token: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad_request("the continuation token is not one this gateway gave") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("k"), str) \
            or not isinstance(payload.get("c", {}), dict):
        raise bad_request("the continuation token is not one this gateway gave")
    return payload


class GatewayApp:
    """The ASGI callable."""

    def __init__(self, catalog: Catalog, auth: Authenticator, metrics: GatewayMetrics,
                 tiers: TrioGuest, access_log: bool = True,
                 on_ready: Callable[[], None] | None = None) -> None:
        self.catalog = catalog
        self.auth = auth
        self.metrics = metrics
        self.tiers = tiers
        self.call = tiers.call
        self.access_log = access_log
        self.on_ready = on_ready
        self._ids = itertools.count(1)
        self._boot = f"{int(time.time()):x}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        request_id = f"{self._boot}-{next(self._ids):x}"
        self.metrics.in_flight.inc()
        status = 500
        request: Request | None = None
        try:
            try:
                request = self._request(scope, request_id)
                status = await self._serve(request, send)
            except HttpError as e:
                status = e.status
                await self._error(send, scope, request, e, request_id)
            except AuthError as e:
                status = e.status
                self.metrics.auth_failures.labels(e.code).inc()
                await self._error(send, scope, request, HttpError(e.status, e.code, str(e)),
                                  request_id)
            except CachefsError as e:
                if request is not None and request.started:
                    # Mid-body: the connection ends here and the client sees a short body,
                    # never wrong or missing bytes in a complete-looking one.
                    log.error("%s %s: ended mid-body: %s", scope["method"], scope.get("path"), e)
                    raise
                if isinstance(e, CorruptObject):
                    log.error("%s %s: %s", scope["method"], scope.get("path"), e)
                status = e.http_status
                code = e.s3_code
                if isinstance(e, NotFound) and request is not None and not request.s3:
                    code = "NotFound"
                await self._error(send, scope, request, HttpError(status, code, str(e)),
                                  request_id)
        finally:
            self.metrics.in_flight.dec()
            operation = request.operation if request is not None else "invalid"
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(operation, str(status)).inc()
            self.metrics.latency.labels(operation).observe(elapsed)
            if self.access_log:
                client = scope.get("client") or ("-", 0)
                access_log.info('%s "%s %s" %d %d %.6fs', client[0], scope["method"],
                                scope.get("raw_path", b"").decode("latin-1"), status,
                                request.sent if request is not None else 0, elapsed)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.tiers.start()
                self.catalog.nursery = self.tiers.nursery
                if self.on_ready is not None:
                    self.on_ready()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.tiers.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _request(self, scope: Scope, request_id: str) -> Request:
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        raw_path = scope.get("raw_path") or scope["path"].encode()
        raw_query = scope.get("query_string", b"").decode("latin-1")
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        method = scope["method"].upper()
        request = Request(method, raw_path.decode("latin-1"), raw_query, query, headers,
                          split_target(raw_path), request_id)
        # Errors in S3's XML unless the request is plainly not an S3 client's: a bearer
        # token, or a plain-HTTP listing (anonymous S3 clients look like curl otherwise, and
        # they need the XML's error codes).
        request.s3 = not (headers.get("authorization", "").startswith("Bearer ")
                          or "list" in query)
        return request

    # -- routing ----------------------------------------------------------------------------
    async def _serve(self, request: Request, send: Send) -> int:
        segments = request.segments
        if segments[:1] == ["-"]:
            return await self._service(request, send)
        request.operation = "auth"
        self.auth.check(request.method, request.raw_path, request.raw_query, request.headers)
        if request.method not in ("GET", "HEAD"):
            request.operation = "write"
            if request.method in ("PUT", "POST", "DELETE", "PATCH"):
                raise HttpError(403, "AccessDenied",
                                "this gateway is read-only: datasets change by commits")
            raise HttpError(405, "MethodNotAllowed", f"{request.method} is not allowed here")
        unsupported = sorted(UNSUPPORTED_SUBRESOURCES & request.query.keys())
        if unsupported:
            request.operation = "unsupported"
            raise HttpError(501, "NotImplemented",
                            f"the {unsupported[0]!r} operation is not offered by this gateway")
        if not segments:
            if "list" in request.query:
                request.operation = "list_datasets"
                return await self._json(send, request, {"datasets":
                                                        await self.call(self.catalog.datasets)})
            request.operation = "ListBuckets"
            return await self._list_buckets(request, send)
        dataset = segments[0]
        if len(segments) == 1:
            return await self._bucket(request, send, dataset)
        ref, path = segments[1], "/".join(segments[2:])
        version = self.catalog.version_now(dataset, ref) \
            or await self.call(self.catalog.version, dataset, ref)
        if "list" in request.query and not request.s3:
            request.operation = "list_dir"
            return await self._list_dir(request, send, version, path)
        request.operation = "GetObject" if request.method == "GET" else "HeadObject"
        if not path:
            raise NotFound(f"{dataset}/{ref} is a version, not a file (list it with "
                           f"/{dataset}/{ref}/?list)")
        entry = self.catalog.entry_now(version, path) \
            or await self.call(self.catalog.entry, version, path)
        if entry.is_dir:
            raise PathNotFound(f"{path} is a directory (list it with "
                               f"/{dataset}/{ref}/{path}/?list)")
        return await self._object(request, send, version, entry)

    async def _service(self, request: Request, send: Send) -> int:
        """`/-/metrics` and `/-/health`: no dataset can be named `-`."""
        what = request.segments[1:]
        request.operation = "service"
        if what == ["metrics"]:
            body = self.metrics.exposition()
            await self._respond(send, 200, [("Content-Type", METRICS_TYPE)], body,
                                request.method == "HEAD")
            return 200
        if what == ["health"]:
            await self._respond(send, 200, [("Content-Type", "text/plain")], b"ok\n",
                                request.method == "HEAD")
            return 200
        raise HttpError(404, "NotFound", "no such service path")

    async def _bucket(self, request: Request, send: Send, dataset: str) -> int:
        query = request.query
        if "list" in query and not request.s3:
            request.operation = "list_refs"
            branches, tags = await self.call(self.catalog.refs, dataset)
            return await self._json(send, request, {"dataset": dataset, "branches": branches,
                                                    "tags": tags})
        if "location" in query:
            request.operation = "GetBucketLocation"
            await self.call(self.catalog.refs, dataset)  # NoSuchBucket if absent
            return await self._xml(send, request, s3xml.bucket_location())
        if request.method == "HEAD":
            request.operation = "HeadBucket"
            await self.call(self.catalog.refs, dataset)
            await self._respond(send, 200, [("Content-Type", s3xml.CONTENT_TYPE)], b"", True)
            return 200
        v2 = query.get("list-type") == "2"
        request.operation = "ListObjectsV2" if v2 else "ListObjects"
        return await self._list_objects(request, send, dataset, v2)

    # -- listings ---------------------------------------------------------------------------
    async def _list_buckets(self, request: Request, send: Send) -> int:
        names = await self.call(self.catalog.datasets)
        created = await self.call(self.catalog.created, names)
        return await self._xml(send, request, s3xml.list_buckets(zip(names, created,
                                                                     strict=True)))

    async def _list_objects(self, request: Request, send: Send, dataset: str, v2: bool) -> int:
        query = request.query
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        try:
            max_keys = int(query.get("max-keys", MAX_KEYS))
        except ValueError:
            raise bad_request("max-keys must be an integer") from None
        if max_keys < 0:
            raise bad_request("max-keys must not be negative")
        max_keys = min(max_keys, MAX_KEYS)
        encoding = query.get("encoding-type")
        if encoding not in (None, "url"):
            raise bad_request(f"unknown encoding-type {encoding!r}")
        token = query.get("continuation-token") if v2 else None
        pinned: dict[str, str] = {}
        if v2:
            after = query.get("start-after", "")
            if token is not None:
                payload = decode_token(token)
                after = payload["k"]
                pinned = {str(k): str(v) for k, v in payload.get("c", {}).items()}
        else:
            after = query.get("marker", "")
        objects, prefixes, truncated, last = await self.call(
            self._page, dataset, prefix, delimiter, after, pinned, max_keys)
        listing = s3xml.Listing(
            bucket=dataset, prefix=prefix, delimiter=delimiter, max_keys=max_keys,
            objects=objects, common_prefixes=prefixes, truncated=truncated,
            url_encoded=encoding == "url", continuation_token=token,
            next_continuation_token=encode_token({"k": last, "c": pinned})
            if v2 and truncated else None,
            start_after=query.get("start-after") if v2 else None,
            marker=None if v2 else after,
            next_marker=last if not v2 and truncated and delimiter else None)
        return await self._xml(send, request, s3xml.list_objects(listing, v2))

    async def _page(self, dataset: str, prefix: str, delimiter: str, after: str,
                    pinned: dict[str, str], max_keys: int
                    ) -> tuple[list[s3xml.ObjectItem], list[str], bool, str]:
        """One page of a listing (run in trio: it walks trees through the tiers): its objects,
        common prefixes, whether more follow, and its last key."""
        objects: list[s3xml.ObjectItem] = []
        prefixes: list[str] = []
        last = ""
        async for key, entry in self._keys(dataset, prefix, delimiter, after, pinned):
            if len(objects) + len(prefixes) >= max_keys:
                return objects, prefixes, True, last
            last = key
            if entry is None:
                prefixes.append(key)
            else:
                objects.append(s3xml.ObjectItem(key, entry.size, entry.mtime_ns,
                                                etag_of(entry)))
        return objects, prefixes, False, last

    async def _keys(self, dataset: str, prefix: str, delimiter: str, after: str,
                    pinned: dict[str, str]):  # type: ignore[no-untyped-def]
        """(key, entry) in key order for a listing of `dataset`; entry None for a common
        prefix. Refs are resolved once per listing: `pinned` (ref -> commit) carries what a
        listing's earlier pages saw, and gains what this page resolves."""
        ref_part, slash, inner = prefix.partition("/")
        if slash:
            refs = [ref_part]
        else:
            branches, tags = await self.catalog.refs(dataset)
            refs = sorted({r for r in [*branches, *tags] if r.startswith(ref_part)})
        for ref in refs:
            ref_key = ref + "/"
            if after and after >= ref_key and not after.startswith(ref_key):
                continue  # this ref's keys all sort before `after`
            if delimiter == "/" and not slash:
                # S3's answer at the root: one common prefix per ref.
                if ref_key > after:
                    yield ref_key, None
                continue
            if ref in pinned:
                version = await self.catalog.pinned(dataset, ref, pinned[ref])
            else:
                try:
                    version = await self.catalog.version(dataset, ref)  # (in trio)
                except NotFound:
                    if slash:
                        return
                    continue
                pinned[ref] = version.commit
            inner_after = after[len(ref_key):] if after.startswith(ref_key) else ""
            recurse = delimiter != "/"
            group: str | None = None
            async for item in self.catalog.walk(version, inner if slash else "", inner_after,
                                                recurse):
                key = ref_key + item.key
                if item.entry.kind is Kind.DIR:
                    yield key, None
                    continue
                entry = item.entry
                if entry.kind is Kind.SYMLINK:
                    # Listed as what a GET of it returns: the file it points to inside the
                    # version (size and ETag); a link to a directory, out of the version or
                    # to nothing is no object.
                    try:
                        target = await self.catalog.entry(version, item.key)
                    except NotFound:
                        continue
                    if target.kind is not Kind.FILE:
                        continue
                    entry = target
                if delimiter and delimiter != "/":
                    cut = key.find(delimiter, len(prefix))
                    if cut >= 0:
                        common = key[: cut + len(delimiter)]
                        if common != group and common > after:
                            group = common
                            yield common, None
                        continue
                yield key, entry

    async def _list_dir(self, request: Request, send: Send, version: Version, path: str) -> int:
        entry = await self.call(self.catalog.entry, version, path) if path \
            else self.catalog.root(version)
        if not entry.is_dir:
            raise HttpError(400, "NotADirectory", f"{path} is not a directory")
        children = await self.call(self.catalog.children, version, entry)
        body = {
            "dataset": version.dataset, "ref": version.ref, "commit": version.commit,
            "path": path, "entries": [{
                "name": c.name, "kind": c.kind.name.lower(), "size": c.size,
                "mode": f"{c.mode:o}", "mtime_ns": c.mtime_ns,
                **({"hash": c.hash} if c.kind is Kind.FILE else {}),
                **({"target": c.target} if c.kind is Kind.SYMLINK else {})}
                for c in children]}
        return await self._json(send, request, body, version)

    # -- objects ----------------------------------------------------------------------------
    async def _object(self, request: Request, send: Send, version: Version,
                      entry: TreeEntry) -> int:
        etag = etag_of(entry)
        headers = [("ETag", etag), ("Last-Modified", http_date(entry.mtime_ns)),
                   ("Accept-Ranges", "bytes"),
                   ("Cache-Control", IMMUTABLE if version.by_hash else MUTABLE),
                   ("X-Cachefs-Commit", version.commit)]
        status = self._precondition(request.headers, etag, entry.mtime_ns)
        if status is not None:
            if status == 412:
                raise HttpError(412, "PreconditionFailed",
                                "At least one of the preconditions you specified did not hold",
                                headers)
            await self._respond(send, 304, headers, b"", True)
            return 304
        size = entry.size
        start, end = 0, size
        status = 200
        wanted = request.headers.get("range")
        if wanted:
            try:
                picked = parse_range(wanted, size)
            except HttpError as e:
                e.headers += headers
                raise
            if picked is not None:
                start, end = picked
                status = 206
                headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        content_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
        headers += [("Content-Type", content_type), ("Content-Length", str(end - start))]
        pieces = self.catalog.plan(version, entry, start, end) \
            if request.method != "HEAD" else []
        # The first piece before the status line: a file that cannot be read (corrupt
        # everywhere, origin down) gets an error status, not a short body, where it can.
        if pieces and pieces[0].whole_chunk:
            self.tiers.spawn(self.catalog.prefetch, version, entry, pieces[0].extent_index)
        first = await self._piece(version, pieces[0]) if pieces else b""
        await send({"type": "http.response.start", "status": status,
                    "headers": self._encode(headers, request.request_id)})
        request.started = True
        if pieces:
            await self._send_piece(send, request, first)
            for i in range(1, len(pieces)):
                piece = pieces[i]
                if piece.whole_chunk and piece.extent_index != pieces[i - 1].extent_index:
                    # A long read enters a new chunk: the next ones are fetched meanwhile.
                    self.tiers.spawn(self.catalog.prefetch, version, entry, piece.extent_index)
                await self._send_piece(send, request, await self._piece(version, piece))
        await send({"type": "http.response.body", "body": b""})
        return status

    async def _piece(self, version: Version, piece: Piece) -> bytes | memoryview:
        """A piece from memory or the page cache without leaving the HTTP loop, else from the
        tiers in trio."""
        data = self.catalog.piece_now(version, piece)
        if data is None:
            data = await self.call(self.catalog.piece, version, piece)
        return data

    async def _send_piece(self, send: Send, request: Request, piece: bytes | memoryview) -> None:
        await send({"type": "http.response.body", "more_body": True,
                    "body": bytes(piece) if isinstance(piece, memoryview) else piece})
        self.metrics.bytes_sent.inc(len(piece))
        request.sent += len(piece)

    @staticmethod
    def _precondition(headers: dict[str, str], etag: str, mtime_ns: int) -> int | None:
        """304 or 412 where a conditional header says so (RFC 9110's order), else None."""
        mtime = mtime_ns // 1_000_000_000
        if "if-match" in headers:
            if not etag_matches(headers["if-match"], etag):
                return 412
        elif "if-unmodified-since" in headers:
            since = parse_http_date(headers["if-unmodified-since"])
            if since is not None and mtime > since:
                return 412
        if "if-none-match" in headers:
            if etag_matches(headers["if-none-match"], etag):
                return 304
        elif "if-modified-since" in headers:
            since = parse_http_date(headers["if-modified-since"])
            if since is not None and mtime <= since:
                return 304
        return None

    # -- responses --------------------------------------------------------------------------
    @staticmethod
    def _encode(headers: list[tuple[str, str]], request_id: str) -> list[tuple[bytes, bytes]]:
        out = [(k.lower().encode("latin-1"), v.encode("latin-1", "replace"))
               for k, v in headers]
        out.append((b"x-amz-request-id", request_id.encode()))
        return out

    async def _respond(self, send: Send, status: int, headers: list[tuple[str, str]],
                       body: bytes, head: bool, request_id: str = "") -> None:
        headers = [*headers, ("Content-Length", str(len(body)))]
        await send({"type": "http.response.start", "status": status,
                    "headers": self._encode(headers, request_id)})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _xml(self, send: Send, request: Request, body: bytes) -> int:
        await self._respond(send, 200, [("Content-Type", s3xml.CONTENT_TYPE)], body,
                            request.method == "HEAD", request.request_id)
        return 200

    async def _json(self, send: Send, request: Request, doc: object,
                    version: Version | None = None) -> int:
        body = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        headers = [("Content-Type", "application/json")]
        if version is not None:
            headers += [("X-Cachefs-Commit", version.commit),
                        ("Cache-Control", IMMUTABLE if version.by_hash else MUTABLE)]
        await self._respond(send, 200, headers, body, request.method == "HEAD",
                            request.request_id)
        return 200

    async def _error(self, send: Send, scope: Scope, request: Request | None, error: HttpError,
                     request_id: str) -> None:
        head = scope["method"].upper() == "HEAD"
        if error.status >= 500:
            log.warning("%s %s: %d %s: %s", scope["method"], scope.get("path"), error.status,
                        error.code, error)
        s3 = request is None or request.s3
        if s3:
            body = s3xml.error_document(error.code, str(error), scope.get("path", ""),
                                        request_id)
            content_type = s3xml.CONTENT_TYPE
        else:
            body = f"{error.status} {error.code}: {error}\n".encode()
            content_type = "text/plain; charset=utf-8"
        extra = [("Content-Type", content_type)]
        if any(name in (b"transfer-encoding", b"content-length") and value not in (b"", b"0")
               for name, value in scope["headers"]):
            # A request body this answer leaves unread: the connection cannot carry another
            # request (its bytes would be parsed as one).
            extra.append(("Connection", "close"))
        await self._respond(send, error.status, [*error.headers, *extra], body, head, request_id)
