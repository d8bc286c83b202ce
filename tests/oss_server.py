"""An OSS-protocol HTTP server for tests: objects in memory, every request's V4 signature checked.

`OSSServer` speaks enough of the Alibaba Cloud OSS REST API for `cachefs.remotes.oss` (through
oss2): PutObject (with ``x-oss-forbid-overwrite``), GetObject (with ``Range`` and
``x-oss-range-behavior``), HeadObject (errors in the ``x-oss-err`` header, as OSS sends them),
DeleteObject and ListObjectsV2; anything else is answered 400 NotImplemented. It binds 127.0.0.1
on a port the OS picks, serves from a background thread, and stops within a bounded time.

Every request must carry an OSS signature V4 (``Authorization: OSS4-HMAC-SHA256 Credential=AK/
DATE/REGION/oss/aliyun_v4_request, [AdditionalHeaders=..., ]Signature=HEX``). The server
recomputes it from the request as it arrived, written here from the OSS documentation rather than
taken from oss2: the canonical request (method, URI-encoded ``/bucket/key``, sorted encoded query,
the ``x-oss-*``, ``content-type``, ``content-md5`` and additional headers, the payload hash from
``x-oss-content-sha256``), the string to sign (``OSS4-HMAC-SHA256``, ``x-oss-date``, scope, the
request's SHA-256) and the HMAC-SHA256 key chain from ``"aliyun_v4" + secret`` over date, region,
``oss`` and ``aliyun_v4_request``. A wrong signature gets 403 SignatureDoesNotMatch, an unknown key
403 InvalidAccessKeyId, a clock off by more than 15 minutes 403 RequestTimeTooSkewed. Errors are
OSS XML with an ``x-oss-request-id`` header.

A bucket can be created with `BucketQuirks` to act like a faulty OSS-compatible server: one that
ignores ``x-oss-forbid-overwrite`` (every PUT overwrites), or one whose ListObjectsV2 answers
lack ``IsTruncated`` (oss2 cannot parse them).

The server counts requests per operation (``counts["GetObject"]``) and errors per code
(``error_counts["SignatureDoesNotMatch"]``), so tests can assert what a client really sent.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import http.client
import ipaddress
import string
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Self
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from tests.servers import LOOPBACK, KeepAliveHandler, LoopbackHTTPServer, ServerContext, wait_until

# The key every test client and the session's server use, and the machine variables that must
# not leak into tests; nothing reaches real OSS.
OSS_TEST_ENV = {
    "OSS_ACCESS_KEY_ID": "LTAItestaccesskeyid",
    "OSS_ACCESS_KEY_SECRET": "test-access-key-secret",
}
OSS_UNSET_ENV = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN")
OSS_TEST_REGION = "cn-hangzhou"
OSS_TEST_BUCKET = "cachefs-test"  # the bucket the session's server has

V4_ALGORITHM = "OSS4-HMAC-SHA256"
V4_TERMINATOR = "aliyun_v4_request"
PRODUCT = "oss"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
MAX_SKEW_S = 15 * 60  # what OSS tolerates between the request's x-oss-date and its own clock
DEFAULT_MAX_KEYS = 100
MAX_KEYS = 1000
MAX_KEY_BYTES = 1023
_DEFAULT_SIGNED = frozenset({"content-type", "content-md5"})  # signed whenever present
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-_.~")


# --- signature V4 -------------------------------------------------------------------------------


def v4_uri_encode(text: str, keep_slash: bool) -> str:
    """Percent-encode every byte of UTF-8 `text` but A-Z a-z 0-9 - _ . ~ (and / if kept)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        out.append(char if char in _UNRESERVED or (keep_slash and char == "/") else f"%{byte:02X}")
    return "".join(out)


def v4_canonical_request(
    method: str,
    bucket: str,
    key: str,
    query: list[tuple[str, str]],
    headers: Mapping[str, str],
    additional_headers: list[str],
    payload_hash: str,
) -> str:
    """The V4 canonical request; `headers` maps lower-case names to values."""
    uri = v4_uri_encode(f"/{bucket}/{key}" if bucket else "/", keep_slash=True)
    params = sorted((v4_uri_encode(k, False), v4_uri_encode(v, False)) for k, v in query)
    canonical_query = "&".join(f"{k}={v}" if v else k for k, v in params)
    signed = {
        name: value.strip()
        for name, value in headers.items()
        if name.startswith("x-oss-") or name in _DEFAULT_SIGNED or name in additional_headers
    }
    canonical_headers = "".join(f"{name}:{signed[name]}\n" for name in sorted(signed))
    return "\n".join(
        [
            method,
            uri,
            canonical_query,
            canonical_headers,
            ";".join(sorted(additional_headers)),
            payload_hash,
        ]
    )


def v4_string_to_sign(date_time: str, scope: str, canonical_request: str) -> str:
    digest = hashlib.sha256(canonical_request.encode("utf-8")).hexdigest()
    return f"{V4_ALGORITHM}\n{date_time}\n{scope}\n{digest}"


def v4_signature(secret: str, date: str, region: str, string_to_sign: str) -> str:
    """HMAC-SHA256 of `string_to_sign` under the key derived from `secret`, date and region."""
    key = ("aliyun_v4" + secret).encode("utf-8")
    for part in (date, region, PRODUCT, V4_TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def parse_v4_authorization(value: str) -> dict[str, str]:
    """``OSS4-HMAC-SHA256 Credential=..., Signature=...`` -> {"Credential": ..., ...}."""
    _, _, rest = value.partition(" ")
    fields = {}
    for part in rest.split(","):
        name, sep, field_value = part.strip().partition("=")
        if sep:
            fields[name] = field_value.strip()
    return fields


# --- the store ----------------------------------------------------------------------------------


class OSSError(Exception):
    """One OSS error answer: HTTP status, error code, message and extra XML fields."""

    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


@dataclass
class StoredObject:
    data: bytes
    content_type: str
    mtime: float = field(default_factory=time.time)

    @property
    def etag(self) -> str:
        """OSS ETags of simple uploads are the upper-case MD5 hex (quoted in headers and XML)."""
        return hashlib.md5(self.data).hexdigest().upper()

    @property
    def last_modified(self) -> int:
        return int(self.mtime)  # OSS keeps whole seconds


@dataclass(frozen=True)
class BucketQuirks:
    """How a bucket departs from OSS, as some OSS-compatible servers do."""

    ignore_forbid_overwrite: bool = False  # x-oss-forbid-overwrite: true is not honoured
    listing_without_is_truncated: bool = False  # ListObjectsV2 answers lack IsTruncated


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def _http_date(seconds: float) -> str:
    return formatdate(seconds, usegmt=True)


def _iso8601(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(seconds))


def _xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def _sub(parent: ET.Element, tag: str, text: str | int) -> ET.Element:
    child = ET.SubElement(parent, tag)
    child.text = str(text)
    return child


def _is_ip_or_localhost(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _parse_range(spec: str, size: int, standard: bool) -> tuple[int, int] | None:
    """The inclusive byte range to send for a ``Range`` header, None for the whole object (200).

    OSS by default ignores an invalid or out-of-range ``Range`` (200, the whole object); with
    ``x-oss-range-behavior: standard`` it clamps an end past the object's end and answers 416
    InvalidRange to a start at or past it. Of several ranges, OSS serves only the first.
    """
    unit, _, ranges = spec.partition("=")
    first, dash, end_text = ranges.split(",")[0].strip().partition("-")
    if unit.strip() != "bytes" or not dash or not (first or end_text):
        return None
    try:
        start = int(first) if first else None
        end = int(end_text) if end_text else None
    except ValueError:
        return None
    if start is None:  # bytes=-N: the last N bytes
        assert end is not None
        if standard and (end == 0 or size == 0):
            raise OSSError(416, "InvalidRange", "The requested range cannot be satisfied")
        if end == 0 or end > size:
            return None if not standard else (0, size - 1)
        return size - end, size - 1
    if end is not None and end < start:
        return None
    if start >= size:
        if standard:
            raise OSSError(416, "InvalidRange", "The requested range cannot be satisfied")
        return None
    if end is None or end >= size:
        if end is not None and not standard:
            return None
        end = size - 1
    return start, end


class OSSServer(ServerContext):
    """An in-memory OSS-protocol server on 127.0.0.1; a context manager (start/stop)."""

    def __init__(
        self,
        access_key_id: str,
        access_key_secret: str,
        region: str = OSS_TEST_REGION,
        startup_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.region = region
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._keys: dict[str, tuple[str, str | None]] = {}
        self.add_key(access_key_id, access_key_secret)
        self._buckets: dict[str, dict[str, StoredObject]] = {}
        self._quirks: dict[str, BucketQuirks] = {}
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._error_counts: Counter[str] = Counter()
        self._httpd: _Server | None = None
        self.port = 0

    # --- set-up and inspection (no HTTP, no signature) ----------------------------------------

    def add_key(self, access_key_id: str, secret: str, security_token: str | None = None) -> None:
        """Accept requests signed with this key (and, if given, carrying this STS token)."""
        self._keys[access_key_id] = (secret, security_token)

    def create_bucket(self, name: str, quirks: BucketQuirks | None = None) -> None:
        with self._lock:
            self._buckets.setdefault(name, {})
            self._quirks[name] = quirks or BucketQuirks()

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        with self._lock:
            self._buckets[bucket][key] = StoredObject(data, "application/octet-stream")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self._buckets[bucket] if k.startswith(prefix))

    @property
    def counts(self) -> Counter[str]:
        """Requests received so far per operation (PutObject, GetObject, ...), a snapshot."""
        with self._lock:
            return Counter(self._counts)

    @property
    def error_counts(self) -> Counter[str]:
        """Error answers sent so far per OSS error code, a snapshot."""
        with self._lock:
            return Counter(self._error_counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._error_counts.clear()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url_for(self, bucket: str, prefix: str = "") -> str:
        """An ``oss://`` remote URL for `bucket`/`prefix` on this server."""
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"oss://{bucket}{path}?endpoint={self.endpoint}&region={self.region}"

    # --- lifecycle ----------------------------------------------------------------------------

    def _responds(self) -> bool:
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=2)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            return response.getheader("x-oss-request-id") is not None
        except OSError:
            return False
        finally:
            conn.close()

    def start(self) -> Self:
        """Bind a free loopback port, serve in a thread, return once it answers HTTP."""
        if self._httpd is not None:
            raise RuntimeError("OSS server already started")
        self._httpd = _Server(self)
        self.port = int(self._httpd.server_address[1])
        self._httpd.start(f"oss-test-server:{self.port}")
        try:
            wait_until(self._responds, self.startup_timeout, f"OSS test server on {self.endpoint}")
        except BaseException:
            self.stop()
            raise
        self.reset_counts()  # the readiness probe is not a client request
        return self

    def stop(self) -> None:
        """Stop accepting, cut open connections, join every thread; safe to call twice."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.stop(self.stop_timeout)

    # --- the protocol -------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Response:
        """Answer one request; `headers` maps lower-case names to values."""
        request_id = uuid.uuid4().hex[:24].upper()
        split = urlsplit(target)
        host = headers.get("host", "")
        hostname = host.rpartition(":")[0] if ":" in host and not host.endswith("]") else host
        if _is_ip_or_localhost(hostname) or "." not in hostname:  # path style: /bucket/key
            _, _, rest = split.path.partition("/")
            bucket_part, _, raw_key = rest.partition("/")
            bucket = unquote(bucket_part)
        else:  # virtual-hosted style: bucket.endpoint/key
            bucket = hostname.split(".", 1)[0]
            raw_key = split.path[1:]
        key = unquote(raw_key)
        query = parse_qsl(split.query, keep_blank_values=True)
        params = dict(query)
        operation = self._operation(method, bucket, key, params)
        with self._lock:
            self._counts[operation] += 1
        try:
            self._authenticate(method, bucket, key, query, headers, body)
            response = self._execute(operation, bucket, key, params, headers, body)
        except Exception as e:
            # An OSSError is the answer; anything else is a bug here: say so, as OSS would.
            error = e if isinstance(e, OSSError) else OSSError(500, "InternalError", repr(e))
            with self._lock:
                self._error_counts[error.code] += 1
            response = self._error(error, request_id, bucket, key, head=method == "HEAD")
        response.headers.update(
            {
                "x-oss-request-id": request_id,
                "Date": _http_date(time.time()),
                "Server": "AliyunOSS",
            }
        )
        return response

    @staticmethod
    def _operation(method: str, bucket: str, key: str, params: Mapping[str, str]) -> str:
        if not bucket:
            return "ListBuckets" if method == "GET" else "Unsupported"
        if not key:
            if method == "GET" and params.get("list-type") == "2":
                return "ListObjectsV2"
            return "UnsupportedBucketOperation"
        if params:
            return "UnsupportedObjectOperation"  # sub-resources: acl, tagging, append...
        return {
            "PUT": "PutObject",
            "GET": "GetObject",
            "HEAD": "HeadObject",
            "DELETE": "DeleteObject",
        }.get(method, "UnsupportedObjectOperation")

    def _error(
        self, error: OSSError, request_id: str, bucket: str, key: str, head: bool
    ) -> Response:
        root = ET.Element("Error")
        _sub(root, "Code", error.code)
        _sub(root, "Message", error.message)
        _sub(root, "RequestId", request_id)
        _sub(root, "HostId", f"{bucket}.{LOOPBACK}" if bucket else LOOPBACK)
        for name, value in error.extra.items():
            _sub(root, name, value)
        body = _xml(root)
        headers = {"Content-Type": "application/xml"}
        if head:  # a HEAD answer has no body: OSS puts the error document in a header
            headers["x-oss-err"] = base64.b64encode(body).decode()
            return Response(error.status, headers)
        return Response(error.status, headers, body)

    def _authenticate(
        self,
        method: str,
        bucket: str,
        key: str,
        query: list[tuple[str, str]],
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        authorization = headers.get("authorization", "")
        if not authorization:
            raise OSSError(403, "AccessDenied", "Anonymous access is forbidden for this operation.")
        if not authorization.startswith(V4_ALGORITHM + " "):
            raise OSSError(
                403,
                "AccessDenied",
                "This server accepts only signature V4 (OSS4-HMAC-SHA256) requests.",
            )
        fields = parse_v4_authorization(authorization)
        credential = fields.get("Credential", "").split("/")
        signature = fields.get("Signature", "")
        if len(credential) != 5 or not signature:
            raise OSSError(400, "InvalidArgument", "Authorization header is invalid.")
        access_key_id, date, region, product, terminator = credential
        if access_key_id not in self._keys:
            raise OSSError(
                403,
                "InvalidAccessKeyId",
                "The OSS Access Key Id you provided does not exist in our records.",
                OSSAccessKeyId=access_key_id,
            )
        secret, token = self._keys[access_key_id]
        if headers.get("x-oss-security-token") != token:
            raise OSSError(403, "InvalidSecurityToken", "The security token is invalid.")
        date_time = headers.get("x-oss-date", "")
        try:
            signed_at = calendar.timegm(time.strptime(date_time, "%Y%m%dT%H%M%SZ"))
        except ValueError:
            raise OSSError(403, "AccessDenied", "x-oss-date is missing or malformed.") from None
        if abs(time.time() - signed_at) > MAX_SKEW_S:
            raise OSSError(
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
            )
        if date != date_time[:8] or product != PRODUCT or terminator != V4_TERMINATOR:
            raise OSSError(403, "SignatureDoesNotMatch", "Invalid credential scope.")
        if region != self.region:
            raise OSSError(
                403,
                "SignatureDoesNotMatch",
                f"Invalid signing region {region!r}: this bucket is in {self.region!r}.",
            )
        payload_hash = headers.get("x-oss-content-sha256", "")
        if not payload_hash:
            raise OSSError(403, "AccessDenied", "x-oss-content-sha256 is required.")
        if payload_hash != UNSIGNED_PAYLOAD and payload_hash != hashlib.sha256(body).hexdigest():
            raise OSSError(400, "InvalidDigest", "x-oss-content-sha256 does not match the body.")
        additional = [h for h in fields.get("AdditionalHeaders", "").split(";") if h]
        canonical = v4_canonical_request(
            method, bucket, key, query, headers, additional, payload_hash
        )
        string_to_sign = v4_string_to_sign(date_time, "/".join(credential[1:]), canonical)
        expected = v4_signature(secret, date, region, string_to_sign)
        if not hmac.compare_digest(expected, signature):
            raise OSSError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided. Check your key and signing method.",
                OSSAccessKeyId=access_key_id,
                CanonicalRequest=canonical,
                StringToSign=string_to_sign,
            )

    def _execute(
        self,
        operation: str,
        bucket: str,
        key: str,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> Response:
        if operation.startswith("Unsupported") or operation == "ListBuckets":
            raise OSSError(400, "NotImplemented", f"{operation} is not implemented here.")
        with self._lock:
            if bucket not in self._buckets:
                raise OSSError(
                    404, "NoSuchBucket", "The specified bucket does not exist.", BucketName=bucket
                )
        if operation == "ListObjectsV2":
            return self._list_objects_v2(bucket, params)
        key_bytes = key.encode("utf-8")
        if len(key_bytes) > MAX_KEY_BYTES or key.startswith(("/", "\\")):
            raise OSSError(400, "InvalidObjectName", "The specified object is not valid.")
        if operation == "PutObject":
            return self._put_object(bucket, key, headers, body)
        if operation == "DeleteObject":
            with self._lock:
                self._buckets[bucket].pop(key, None)
            return Response(204, {"Content-Length": "0"})
        with self._lock:
            obj = self._buckets[bucket].get(key)
        if obj is None:
            raise OSSError(404, "NoSuchKey", "The specified key does not exist.", Key=key)
        return self._get_object(obj, headers, head=operation == "HeadObject")

    def _put_object(
        self, bucket: str, key: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        md5 = hashlib.md5(body).digest()
        content_md5 = headers.get("content-md5")
        if content_md5 is not None:
            try:
                given = base64.b64decode(content_md5, validate=True)
            except ValueError:
                given = b""
            if given != md5:
                raise OSSError(400, "InvalidDigest", "The Content-MD5 you specified was invalid.")
        obj = StoredObject(body, headers.get("content-type") or "application/octet-stream")
        forbid_overwrite = headers.get("x-oss-forbid-overwrite", "").lower() == "true"
        with self._lock:
            forbid_overwrite &= not self._quirks[bucket].ignore_forbid_overwrite
            objects = self._buckets[bucket]
            if forbid_overwrite and key in objects:
                raise OSSError(
                    409,
                    "FileAlreadyExists",
                    "The object you specified already exists and can not be overwritten.",
                )
            objects[key] = obj
        return Response(
            200,
            {
                "ETag": f'"{obj.etag}"',
                "Content-MD5": base64.b64encode(md5).decode(),
                "Content-Length": "0",
            },
        )

    def _get_object(self, obj: StoredObject, headers: Mapping[str, str], head: bool) -> Response:
        data = obj.data
        response_headers = {
            "ETag": f'"{obj.etag}"',
            "Last-Modified": _http_date(obj.last_modified),
            "Content-Type": obj.content_type,
            "Accept-Ranges": "bytes",
            "x-oss-object-type": "Normal",
            "x-oss-storage-class": "Standard",
        }
        status = 200
        spec = headers.get("range")
        if spec and not head:
            standard = headers.get("x-oss-range-behavior", "").lower() == "standard"
            try:
                byte_range = _parse_range(spec, len(data), standard)
            except OSSError as e:
                e.extra["ActualObjectSize"] = str(len(data))
                raise
            if byte_range is not None:
                start, end = byte_range
                status = 206
                response_headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data = data[start : end + 1]
        response_headers["Content-Length"] = str(len(data))
        return Response(status, response_headers, b"" if head else data)

    def _list_objects_v2(self, bucket: str, params: Mapping[str, str]) -> Response:
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter", "")
        encoding = params.get("encoding-type", "")
        if encoding not in ("", "url"):
            raise OSSError(400, "InvalidArgument", "encoding-type must be url.")
        try:
            max_keys = int(params.get("max-keys") or DEFAULT_MAX_KEYS)
        except ValueError:
            max_keys = -1
        if not 0 <= max_keys <= MAX_KEYS:
            raise OSSError(400, "InvalidArgument", f"max-keys must be 0..{MAX_KEYS}.")
        token = params.get("continuation-token", "")
        skip_below = ""  # keys under this common prefix were already summarized
        if token:
            try:
                kind, _, after = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
            except ValueError:
                kind, after = "", ""
            if kind not in ("K", "P"):
                raise OSSError(400, "InvalidArgument", "The continuation token is invalid.")
            if kind == "P":
                skip_below = after
        else:
            after = params.get("start-after", "")

        with self._lock:
            listed = sorted(
                (k, o) for k, o in self._buckets[bucket].items() if k.startswith(prefix)
            )
        contents: list[tuple[str, StoredObject]] = []
        common: list[str] = []
        last = ""
        truncated = False
        for name, obj in listed:
            if name <= after or (skip_below and name.startswith(skip_below)):
                continue
            cut = name.find(delimiter, len(prefix)) if delimiter else -1
            entry = name[: cut + len(delimiter)] if cut >= 0 else name
            if cut >= 0 and common and common[-1] == entry:
                continue
            if len(contents) + len(common) >= max_keys:
                truncated = True
                break
            if cut >= 0:
                common.append(entry)
                skip_below = entry
                last = "P:" + entry
            else:
                contents.append((name, obj))
                last = "K:" + name

        def enc(text: str) -> str:
            return quote(text, safe="/") if encoding == "url" else text

        root = ET.Element("ListBucketResult")
        _sub(root, "Name", bucket)
        _sub(root, "Prefix", enc(prefix))
        if token:
            _sub(root, "ContinuationToken", token)
        if params.get("start-after"):
            _sub(root, "StartAfter", enc(params["start-after"]))
        _sub(root, "MaxKeys", max_keys)
        _sub(root, "Delimiter", enc(delimiter))
        if encoding:
            _sub(root, "EncodingType", encoding)
        with self._lock:
            quirks = self._quirks[bucket]
        if not quirks.listing_without_is_truncated:
            _sub(root, "IsTruncated", "true" if truncated else "false")
        if truncated:
            _sub(root, "NextContinuationToken", base64.urlsafe_b64encode(last.encode()).decode())
        _sub(root, "KeyCount", len(contents) + len(common))
        for name, obj in contents:
            item = ET.SubElement(root, "Contents")
            _sub(item, "Key", enc(name))
            _sub(item, "LastModified", _iso8601(obj.last_modified))
            _sub(item, "ETag", f'"{obj.etag}"')
            _sub(item, "Type", "Normal")
            _sub(item, "Size", len(obj.data))
            _sub(item, "StorageClass", "Standard")
        for name in common:
            _sub(ET.SubElement(root, "CommonPrefixes"), "Prefix", enc(name))
        body = _xml(root)
        return Response(
            200, {"Content-Type": "application/xml", "Content-Length": str(len(body))}, body
        )


# --- HTTP ---------------------------------------------------------------------------------------


class _Handler(KeepAliveHandler):
    disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart
    server: _Server

    def _serve(self) -> None:
        body = self.read_body()  # always, so that the connection stays in step
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self.server.oss.handle(self.command, self.path, headers, body)
        if self.command != "HEAD" or "Content-Length" not in response.headers:
            response.headers["Content-Length"] = str(len(response.body))
        self.send_response(response.status)
        for name, value in response.headers.items():
            if name.lower() not in ("date", "server"):  # send_response wrote its own
                self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and response.body:
            self.wfile.write(response.body)

    def version_string(self) -> str:
        return "AliyunOSS"

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _serve


class _Server(LoopbackHTTPServer):
    def __init__(self, oss: OSSServer) -> None:
        self.oss = oss
        super().__init__(_Handler)
