"""The oss:// remote: Alibaba Cloud OSS (or an OSS-protocol server), through the oss2 library.

URL: ``oss://BUCKET[/PREFIX]?endpoint=URL&region=R&max_connections=N``. ``endpoint`` is required
(``https://oss-cn-hangzhou.aliyuncs.com``, or ``http://HOST:PORT`` for a private server);
``region`` is needed for signing and is read from an ``oss-REGION[-internal].aliyuncs.com``
endpoint when not given. Requests are signed with OSS signature V4 (``OSS4-HMAC-SHA256``,
`oss2.ProviderAuthV4`). Credentials never appear in the URL: they come from the environment
(``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET``, optionally ``OSS_SESSION_TOKEN``) through oss2's
environment provider, read again for every request.

One oss2 session (a pooled requests session, thread-safe) serves every thread. oss2 itself never
retries a request; the session's adapter retries connection failures and 5xx answers a bounded
number of times, and connects time out, so a dead endpoint fails within seconds. Writes carry a
Content-MD5 (the store refuses a corrupted upload); oss2's CRC wrapper is off, so a retried PUT
resends the same bytes. OSS error codes are mapped to cachefs exceptions in one table.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

from cachefs.errors import (
    CachefsError,
    ConfigError,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
)
from cachefs.remotes.base import ObjectInfo, ParallelHas, one_line, server_of
from cachefs.remotes.registry import int_option, url_options

log = logging.getLogger("cachefs.remotes.oss")

_OPTIONS = {"endpoint", "region", "max_connections"}
_CREDENTIAL_VARS = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET")

# OSS error code (or HTTP status, when an answer has no code) -> cachefs exception. A code wins
# over its status: NoSuchBucket is a 404 too, but not a missing object.
_ERRORS: dict[str, type[CachefsError]] = {
    "NoSuchKey": ObjectNotFound,
    "404": ObjectNotFound,
    "AccessDenied": PermissionDenied,
    "InvalidAccessKeyId": PermissionDenied,
    "SignatureDoesNotMatch": PermissionDenied,
    "InvalidSecurityToken": PermissionDenied,
    "SecurityTokenExpired": PermissionDenied,
    "403": PermissionDenied,
    "NoSuchBucket": RemoteError,
}
_EXISTS = "FileAlreadyExists"  # a PUT with x-oss-forbid-overwrite over an existing object (409)
_RANGE_PAST_END = "InvalidRange"  # 416, with x-oss-range-behavior: standard
_CLIENT_ERROR = -1  # oss2's status for an error raised before any request was sent

# Endpoints named after their region: oss-cn-hangzhou.aliyuncs.com, oss-cn-beijing-internal...
_REGION_ENDPOINT = re.compile(r"^oss-(?P<region>[a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")
_NOT_REGIONS = {"accelerate", "accelerate-overseas"}

CONNECT_TIMEOUT = 5.0  # seconds to open a connection (each attempt)
READ_TIMEOUT = 60.0  # seconds without a byte from an open connection
CONNECT_RETRIES = 2  # so at most 3 connects: ~16 s before a black-holed endpoint is an error
STATUS_RETRIES = 2  # answers 500, 502, 503 and 504 are retried this often
LIST_PAGE = 1000  # keys per ListObjectsV2 call (the OSS maximum)


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "code", "") or "")


def _status(exc: Exception) -> int:
    status = getattr(exc, "status", 0)
    return status if isinstance(status, int) else 0


def region_from_endpoint(endpoint: str) -> str | None:
    """The region an Aliyun OSS endpoint host names (``oss-cn-hangzhou...`` -> cn-hangzhou)."""
    match = _REGION_ENDPOINT.match((urlparse(endpoint).hostname or "").lower())
    if match is None or match["region"] in _NOT_REGIONS:
        return None
    return match["region"]


def _credentials_missing() -> list[str]:
    return [name for name in _CREDENTIAL_VARS if not os.environ.get(name)]


def _check_settings(bucket: str, endpoint: str, region: str | None,
                    max_connections: int) -> str:
    """Check what an OSS remote is opened with (the URL's parts, or the constructor's
    arguments); the region to sign with."""
    import oss2.utils

    if not oss2.utils.is_valid_bucket_name(bucket):
        raise ConfigError(f"invalid OSS bucket name {bucket!r}")
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"invalid OSS endpoint {server_of(endpoint)!r}: "
                          "expected http(s)://HOST[:PORT]")
    region = region or region_from_endpoint(endpoint)
    if not region:
        raise ConfigError(
            f"the OSS endpoint {server_of(endpoint)!r} does not name its region: add region=... "
            "(e.g. region=cn-hangzhou) to the remote URL"
        )
    if max_connections < 2:
        raise ConfigError("max_connections must be at least 2")
    return region


def parse_url(url: str) -> tuple[str, str, dict[str, Any]]:
    """(bucket, prefix, constructor settings) of an oss:// URL, checked without connecting
    (credentials are the environment's when the remote is opened, not the URL's)."""
    parsed = urlparse(url)
    if "@" in parsed.netloc:
        raise ConfigError(
            "credentials do not belong in a remote URL: set OSS_ACCESS_KEY_ID and "
            "OSS_ACCESS_KEY_SECRET in the environment"
        )
    if not parsed.netloc:
        raise ConfigError("invalid OSS URL: no bucket; expected oss://BUCKET[/PREFIX]?endpoint=")
    options = url_options(parsed, _OPTIONS, "OSS")
    endpoint = options.get("endpoint")
    if not endpoint:
        raise ConfigError(
            "the OSS URL needs endpoint=..., e.g. endpoint=https://oss-cn-hangzhou.aliyuncs.com"
        )
    settings: dict[str, Any] = {
        "endpoint": endpoint,
        "region": options.get("region") or None,
        "max_connections": int_option(options, "max_connections", 32, "OSS", minimum=2),
    }
    _check_settings(parsed.netloc, endpoint, settings["region"], settings["max_connections"])
    return parsed.netloc, parsed.path, settings


def _require_credentials() -> None:
    missing = _credentials_missing()
    if missing:
        raise ConfigError(
            f"no OSS credentials: set {' and '.join(missing)} in the environment "
            f"({', '.join(_CREDENTIAL_VARS)}, optionally OSS_SESSION_TOKEN)"
        )


def _retrying_session(max_connections: int) -> Any:
    """An oss2 session pooling `max_connections`, with bounded retries of connection failures
    and 5xx answers (module doc)."""
    import oss2
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(
        total=CONNECT_RETRIES + STATUS_RETRIES,
        connect=CONNECT_RETRIES,
        read=0,  # the request may have been applied: never resend it blindly
        status=STATUS_RETRIES,
        other=0,
        backoff_factor=0.2,
        status_forcelist=(500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD", "PUT", "DELETE"}),
        respect_retry_after_header=False,  # keep every wait bounded
        raise_on_status=False,  # hand the last answer to oss2, which reads its error
    )
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max_connections, max_retries=retry)
    return oss2.Session(adapter=adapter)


class OSSRemote(ParallelHas):
    """A remote stored as objects under an OSS bucket prefix."""

    pool_name = "cachefs-oss"
    conditional_write = "x-oss-forbid-overwrite"  # how put_if_absent asks (named in refusals)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str,
        region: str | None = None,
        max_connections: int = 32,
    ) -> None:
        import oss2
        import oss2.credentials

        region = _check_settings(bucket, endpoint, region, max_connections)
        _require_credentials()

        self.bucket = bucket
        self.endpoint = endpoint
        self.server = server_of(endpoint)  # what messages name: no user info, path or query
        self.region = region
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"oss://{bucket}/{self.prefix}".rstrip("/")
        self.parallelism = max_connections // 2  # leave connections for has() probes

        self._session = _retrying_session(max_connections)
        auth = oss2.ProviderAuthV4(oss2.credentials.EnvironmentVariableCredentialsProvider())
        self._bucket = oss2.Bucket(
            auth,
            endpoint,
            bucket,
            session=self._session,
            # oss2 hands this to requests as it is: (connect, read) timeouts.
            connect_timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            region=region,
            enable_crc=False,
            app_name="cachefs",
        )
        log.debug("opened %s at %s (region %s)", self.url, endpoint, region)

    @classmethod
    def from_url(cls, url: str) -> OSSRemote:
        bucket, prefix, settings = parse_url(url)
        return cls(bucket, prefix, **settings)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _translate(self, exc: Exception, key: str, action: str) -> CachefsError:
        code = _error_code(exc)
        status = _status(exc)
        where = f"oss://{self.bucket}/{self._key(key)}"
        kind = _ERRORS.get(code) or _ERRORS.get(str(status))
        if code == "NoSuchBucket":
            return RemoteError(f"OSS bucket {self.bucket!r} does not exist ({self.url})")
        if kind is ObjectNotFound:
            return ObjectNotFound(f"object {key} not found in {self.url}")
        if kind is PermissionDenied:
            return PermissionDenied(
                f"{action} {where}: access denied ({code or status}); check OSS_ACCESS_KEY_ID "
                "and OSS_ACCESS_KEY_SECRET"
            )
        if status == _CLIENT_ERROR and _credentials_missing():
            return ConfigError(f"no OSS credentials: set {' and '.join(_credentials_missing())}")
        if status < 0:  # no answer: a connection failure (oss2 RequestError) or a ClientError
            detail = getattr(exc, "exception", None) or getattr(exc, "body", None) or exc
            return RemoteError(f"{action} {where}: no answer from {self.server}: "
                               f"{one_line(detail)}")
        return RemoteError(f"{action} {where}: {code or 'error'} (HTTP {status}) from "
                           f"{self.server}: {one_line(exc)}")

    def _call(self, action: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one oss2 call, translating its errors (and requests' mid-body failures)."""
        import oss2.exceptions
        import requests

        where = f"oss://{self.bucket}/{self._key(key)}"
        try:
            return fn(*args, **kwargs)
        except oss2.exceptions.OssError as e:
            raise self._translate(e, key, action) from e
        except requests.RequestException as e:  # e.g. a connection cut mid-body
            raise RemoteError(f"{action} {where}: talking to {self.server}: "
                              f"{one_line(e)}") from e
        except CachefsError:
            raise
        except Exception as e:
            # oss2 parses answers with checks of its own that raise RuntimeError ("parse xml:
            # IsTruncated could not be found"), ValueError, ParseError...: a server that is not
            # quite OSS. One line naming it, never a traceback.
            raise RemoteError(f"{action} {where}: malformed answer from {self.server}: "
                              f"{type(e).__name__}: {one_line(e)}") from e

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        headers: dict[str, str] = {}
        if start or length is not None:
            if length == 0:
                if not self._exists(key):
                    raise ObjectNotFound(f"object {key} not found in {self.url}")
                return b""
            end = "" if length is None else str(start + length - 1)
            # Without "standard", OSS ignores a range that runs past the end (200, whole object).
            headers = {"Range": f"bytes={start}-{end}", "x-oss-range-behavior": "standard"}

        def read() -> tuple[int, bytes]:
            result = self._bucket.get_object(self._key(key), headers=headers)
            return result.status, result.read()

        try:
            status, data = self._call("reading", key, read)
        except RemoteError as e:
            if _error_code(e.__cause__ or e) == _RANGE_PAST_END:
                return b""  # the object exists; the range starts at or past its end
            raise
        if headers and status == 200:  # a store that ignored the range sent the whole object
            data = data[start:] if length is None else data[start : start + length]
        return bytes(data)

    def _put_headers(self, data: bytes) -> dict[str, str]:
        return {
            "Content-Type": "application/octet-stream",
            "Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
        }

    def put(self, key: str, data: bytes | memoryview) -> None:
        body = bytes(data)
        self._call(
            "writing",
            key,
            self._bucket.put_object,
            self._key(key),
            body,
            headers=self._put_headers(body),
        )

    def put_if_absent(self, key: str, data: bytes) -> bool:
        body = bytes(data)
        headers = self._put_headers(body) | {"x-oss-forbid-overwrite": "true"}
        try:
            self._call(
                "creating", key, self._bucket.put_object, self._key(key), body, headers=headers
            )
            return True
        except RemoteError as e:
            if _error_code(e.__cause__ or e) == _EXISTS:  # 409: the object is already there
                return False
            raise

    def _exists(self, key: str) -> bool:
        try:
            self._call("checking", key, self._bucket.head_object, self._key(key))
            return True
        except ObjectNotFound:
            return False

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        token = ""
        while True:
            page = self._call(
                "listing",
                prefix,
                self._bucket.list_objects_v2,
                prefix=self._key(prefix),
                continuation_token=token,
                max_keys=LIST_PAGE,
            )
            for item in page.object_list:
                yield ObjectInfo(
                    item.key[len(self.prefix) :],
                    int(item.size),
                    int(item.last_modified) * 10**9,  # OSS LastModified has whole seconds
                    str(item.etag).strip('"'),
                )
            if not page.is_truncated:
                return
            if not page.next_continuation_token or page.next_continuation_token == token:
                raise RemoteError(
                    f"listing {self.url}: {self.server} sent a truncated page without a new "
                    "continuation token"
                )
            token = page.next_continuation_token

    def delete(self, key: str) -> None:
        # OSS answers 204 for an absent key; a store that says 404 means the same.
        with contextlib.suppress(ObjectNotFound):
            self._call("deleting", key, self._bucket.delete_object, self._key(key))

    def flush(self) -> None:
        """OSS acknowledges a PUT only once it is durable: nothing to do."""

    def close(self) -> None:
        self._close_pool()
        self._session.session.close()  # the pooled connections (closing twice is harmless)

    def __repr__(self) -> str:
        return f"OSSRemote({self.url!r})"
