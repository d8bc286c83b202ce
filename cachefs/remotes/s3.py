"""The s3:// remote: AWS S3, Ceph RGW, MinIO or any S3-compatible store, through boto3.

URL: ``s3://BUCKET[/PREFIX]?endpoint_url=URL&region=R&addressing_style=path|virtual
&request_checksum_calculation=when_required``. Credentials never appear in the URL: boto3's
default chain supplies them (environment, shared profiles, instance roles; ``AWS_CA_BUNDLE``
for a private CA). One boto3 client (thread-safe, pooled connections) serves every thread.

S3 error codes are mapped to cachefs exceptions in one table, chaining the original error.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger("cachefs.remotes.s3")

_OPTIONS = {"endpoint_url", "region", "addressing_style", "request_checksum_calculation",
            "max_connections"}
_CHOICES = {"addressing_style": ("auto", "path", "virtual"),  # botocore's values
            "request_checksum_calculation": ("when_required", "when_supported")}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_malformed_answer(exc: Exception) -> bool:
    """Whether `exc` came from reading a server's answer that is not valid S3 (botocore's
    parser, or our own reading of what it parsed), rather than from no answer at all."""
    from botocore.parsers import ResponseParserError

    return isinstance(exc, (ResponseParserError, ValueError, LookupError, TypeError,
                            AttributeError, SyntaxError))


def parse_url(url: str) -> tuple[str, str, dict[str, Any]]:
    """(bucket, prefix, constructor settings) of an s3:// URL, checked without connecting."""
    parsed = urlparse(url)
    if not parsed.netloc:
        raise ConfigError("invalid S3 URL: no bucket; expected s3://BUCKET[/PREFIX]?OPTIONS")
    if "@" in parsed.netloc:
        raise ConfigError("credentials do not belong in a remote URL: use the environment "
                          "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), a profile or a role")
    options = url_options(parsed, _OPTIONS, "S3")
    settings: dict[str, Any] = {
        # at least 2: half of them serve transfers, the other half has() probes
        "max_connections": int_option(options, "max_connections", 32, "S3", minimum=2)}
    for name, choices in _CHOICES.items():
        if name in options and options[name] not in choices:
            raise ConfigError(f"S3 remote option {name}={options[name]!r}: expected one of "
                              + ", ".join(choices))
    if "endpoint_url" in options:
        endpoint = urlparse(options["endpoint_url"])
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
            raise ConfigError("S3 remote option endpoint_url: expected http(s)://HOST[:PORT]")
    if "region" in options and not options["region"]:
        raise ConfigError("S3 remote option region is empty")
    for name in ("endpoint_url", "region", *_CHOICES):
        if options.get(name):
            settings[name] = options[name]
    return parsed.netloc, parsed.path, settings


class S3Remote(ParallelHas):
    """A remote stored as objects under a bucket prefix."""

    pool_name = "cachefs-s3"
    conditional_write = "If-None-Match: *"  # how put_if_absent asks (named in refusals)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str | None = None,
        request_checksum_calculation: str | None = None,
        max_connections: int = 32,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.parallelism = max_connections // 2  # leave connections for has() probes
        config_kwargs: dict[str, object] = {
            "max_pool_connections": max_connections,
            "retries": {"max_attempts": 5, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        }
        if addressing_style:
            config_kwargs["s3"] = {"addressing_style": addressing_style}
        if request_checksum_calculation:
            config_kwargs["request_checksum_calculation"] = request_checksum_calculation
            config_kwargs["response_checksum_validation"] = request_checksum_calculation
        session = boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(**config_kwargs),
        )
        # What messages name: no user info, path or query (the client picks AWS's endpoint
        # when none is given).
        self.server = server_of(self._client.meta.endpoint_url)

    @classmethod
    def from_url(cls, url: str) -> S3Remote:
        bucket, prefix, settings = parse_url(url)
        return cls(bucket, prefix, **settings)

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _translate(self, exc: Exception, key: str, action: str) -> CachefsError:
        code = _error_code(exc)
        where = f"s3://{self.bucket}/{self._key(key)}"
        if code in _NOT_FOUND:
            return ObjectNotFound(f"object {key} not found in {self.url}")
        if code in _DENIED:
            return PermissionDenied(f"{action} {where}: access denied ({code}); check credentials")
        if code == "NoSuchBucket":
            return RemoteError(f"bucket {self.bucket!r} does not exist ({self.url})")
        if code:
            return RemoteError(f"{action} {where}: {code} from {self.server}: {one_line(exc)}")
        if _is_malformed_answer(exc):
            return RemoteError(f"{action} {where}: malformed answer from {self.server}: "
                               f"{type(exc).__name__}: {one_line(exc)}")
        return RemoteError(f"{action} {where}: {type(exc).__name__} ({self.server}): "
                           f"{one_line(exc)}")

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        kwargs: dict[str, str] = {}
        if start or length is not None:
            if length == 0:
                if not self._exists(key):
                    raise ObjectNotFound(f"object {key} not found in {self.url}")
                return b""
            end = "" if length is None else str(start + length - 1)
            kwargs["Range"] = f"bytes={start}-{end}"
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)
            return response["Body"].read()
        except Exception as e:
            if _error_code(e) == "InvalidRange":
                return b""
            raise self._translate(e, key, "reading") from e

    def put(self, key: str, data: bytes | memoryview) -> None:
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=bytes(data))
        except Exception as e:
            raise self._translate(e, key, "writing") from e

    def put_if_absent(self, key: str, data: bytes) -> bool:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
            return True
        except Exception as e:
            if _error_code(e) in _PRECONDITION:
                return False
            raise self._translate(e, key, "creating") from e

    def _exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as e:
            if _error_code(e) in _NOT_FOUND:
                return False
            raise self._translate(e, key, "checking") from e

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        item["Key"][len(self.prefix) :],
                        int(item["Size"]),
                        int(item["LastModified"].timestamp() * 1e9),
                        str(item.get("ETag", "")).strip('"'),
                    )
        except Exception as e:
            raise self._translate(e, prefix, "listing") from e

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            if _error_code(e) not in _NOT_FOUND:
                raise self._translate(e, key, "deleting") from e

    def flush(self) -> None:
        """S3 acknowledges a PUT only once it is durable: nothing to do."""

    def close(self) -> None:
        self._close_pool()
        self._client.close()  # the pooled connections (closing twice is harmless)

    def __repr__(self) -> str:
        return f"S3Remote({self.url!r})"
