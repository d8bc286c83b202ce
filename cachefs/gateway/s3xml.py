"""S3's XML documents as the gateway answers them: errors, bucket and object listings.

Shapes and element order follow the S3 API reference (ListBuckets, ListObjectsV2, ListObjects,
GetBucketLocation, the Error document), in the 2006-03-01 namespace, so that boto3, the aws CLI,
rclone and s3fs parse them as they parse AWS's own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote
from xml.sax.saxutils import escape

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
XML_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
CONTENT_TYPE = "application/xml"


def iso8601(time_ns: int) -> str:
    """An S3 timestamp (UTC, milliseconds): 2026-12-07T04:38:51.000Z."""
    when = dt.datetime.fromtimestamp(time_ns / 1e9, tz=dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _el(name: str, value: object) -> str:
    return f"<{name}>{escape(str(value))}</{name}>"


def error_document(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (XML_HEAD + "<Error>" + _el("Code", code) + _el("Message", message)
            + _el("Resource", resource) + _el("RequestId", request_id)
            + "</Error>").encode()


def list_buckets(buckets: Iterable[tuple[str, int]]) -> bytes:
    """`buckets`: (name, creation time in ns)."""
    parts = [XML_HEAD, f'<ListAllMyBucketsResult xmlns="{S3_NS}">',
             "<Owner><ID>cachefs</ID><DisplayName>cachefs</DisplayName></Owner><Buckets>"]
    for name, created_ns in buckets:
        parts.append("<Bucket>" + _el("Name", name) + _el("CreationDate", iso8601(created_ns))
                     + "</Bucket>")
    parts.append("</Buckets></ListAllMyBucketsResult>")
    return "".join(parts).encode()


def bucket_location() -> bytes:
    # An empty LocationConstraint is us-east-1's: clients then sign for the region they chose.
    return (XML_HEAD + f'<LocationConstraint xmlns="{S3_NS}"></LocationConstraint>').encode()


@dataclass(frozen=True)
class ObjectItem:
    key: str
    size: int
    mtime_ns: int
    etag: str  # quoted


@dataclass(frozen=True)
class Listing:
    """One page of a bucket listing, and what the request asked (echoed back)."""

    bucket: str
    prefix: str
    delimiter: str
    max_keys: int
    objects: list[ObjectItem]
    common_prefixes: list[str]
    truncated: bool
    url_encoded: bool
    # ListObjectsV2
    continuation_token: str | None = None
    next_continuation_token: str | None = None
    start_after: str | None = None
    # ListObjects (version 1)
    marker: str | None = None
    next_marker: str | None = None


def _key(listing: Listing, value: str) -> str:
    return quote(value, safe="/") if listing.url_encoded else value


def list_objects(listing: Listing, v2: bool) -> bytes:
    parts = [XML_HEAD, f'<ListBucketResult xmlns="{S3_NS}">', _el("Name", listing.bucket),
             _el("Prefix", _key(listing, listing.prefix))]
    if v2:
        if listing.continuation_token is not None:
            parts.append(_el("ContinuationToken", listing.continuation_token))
        if listing.start_after:
            parts.append(_el("StartAfter", _key(listing, listing.start_after)))
        parts.append(_el("KeyCount", len(listing.objects) + len(listing.common_prefixes)))
    else:
        parts.append(_el("Marker", _key(listing, listing.marker or "")))
        if listing.next_marker is not None:
            parts.append(_el("NextMarker", _key(listing, listing.next_marker)))
    parts.append(_el("MaxKeys", listing.max_keys))
    if listing.delimiter:
        parts.append(_el("Delimiter", _key(listing, listing.delimiter)))
    if listing.url_encoded:
        parts.append(_el("EncodingType", "url"))
    parts.append(_el("IsTruncated", "true" if listing.truncated else "false"))
    if v2 and listing.next_continuation_token is not None:
        parts.append(_el("NextContinuationToken", listing.next_continuation_token))
    for item in listing.objects:
        parts.append("<Contents>" + _el("Key", _key(listing, item.key))
                     + _el("LastModified", iso8601(item.mtime_ns)) + _el("ETag", item.etag)
                     + _el("Size", item.size) + "<StorageClass>STANDARD</StorageClass>"
                     + "</Contents>")
    for prefix in listing.common_prefixes:
        parts.append("<CommonPrefixes>" + _el("Prefix", _key(listing, prefix))
                     + "</CommonPrefixes>")
    parts.append("</ListBucketResult>")
    return "".join(parts).encode()
