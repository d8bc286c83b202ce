"""Runs the shared remote conformance suite over every backend, each against a real server.

- `TestLocalRemote`: the file:// remote in a temporary directory.
- `TestS3Remote`: the s3:// remote on a moto S3 server subprocess on 127.0.0.1.
- `TestOSSRemote`: the oss:// remote on `tests.oss_server.OSSServer` (an in-memory OSS-protocol
  server on 127.0.0.1 that checks every request's V4 signature).
Plus S3 failure modes (an endpoint that ignores put-if-absent, a missing bucket, nothing
listening), OSS failure modes (wrong or unknown keys, a tampered signature, missing credentials,
a missing bucket, nothing listening), tests of the OSS test server itself, and URL parsing in
`cachefs.remotes.registry.open_remote_url`.
"""

from __future__ import annotations

import calendar
import socket
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cachefs.dataset.refs import GenerationRefStore, RefValue
from cachefs.errors import (
    ConfigError,
    ObjectNotFound,
    PermissionDenied,
    RemoteError,
    RemoteUnsupported,
)
from cachefs.remotes.base import Remote
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.oss import OSSRemote, region_from_endpoint
from cachefs.remotes.registry import open_remote_url
from cachefs.remotes.s3 import S3Remote
from tests.oss_server import OSS_TEST_BUCKET, OSS_TEST_ENV, OSSServer
from tests.servers import LOOPBACK, IgnoringPutIfAbsentProxy, MotoServer

from .remote_suite import RefContract, RemoteContract, commit_hash


class TestLocalRemote(RemoteContract, RefContract):
    @pytest.fixture
    def remote(self, tmp_path: Path) -> Iterator[Remote]:
        remote = LocalRemote(tmp_path / "repo")
        try:
            yield remote
        finally:
            remote.close()


class TestS3Remote(RemoteContract, RefContract):
    @pytest.fixture
    def remote(self, s3_url: str) -> Iterator[Remote]:
        remote = open_remote_url(s3_url)
        assert isinstance(remote, S3Remote)
        try:
            yield remote
        finally:
            remote.close()

    def test_prefix_isolates_keys(self, remote: Remote, moto_server: MotoServer) -> None:
        """Objects beside the remote's prefix (even sharing its first characters) are unseen."""
        assert isinstance(remote, S3Remote)
        client = moto_server.client()
        try:
            for key in ("some/prefix2/a", "some/prefi", "other/x", "some/prefixa"):
                client.put_object(Bucket=remote.bucket, Key=key, Body=b"outside")
            remote.put("a", b"inside")
            listed = client.list_objects_v2(Bucket=remote.bucket, Prefix="some/prefix/")
            assert [o["Key"] for o in listed["Contents"]] == ["some/prefix/a"]
        finally:
            client.close()
        assert list(remote.list("")) == ["a"]
        assert remote.has(["a", "2/a", "../prefix2/a"]) == {"a"}
        assert remote.get("a") == b"inside"


class TestOSSRemote(RemoteContract, RefContract):
    @pytest.fixture
    def remote(self, oss_url: str) -> Iterator[Remote]:
        remote = open_remote_url(oss_url)
        assert isinstance(remote, OSSRemote)
        try:
            yield remote
        finally:
            remote.close()

    def test_prefix_isolates_keys(self, remote: Remote, oss_server: OSSServer) -> None:
        """Objects beside the remote's prefix (even sharing its first characters) are unseen."""
        assert isinstance(remote, OSSRemote)
        base = remote.prefix.removesuffix("/")  # t-.../some/prefix
        for key in (f"{base}2/a", base[:-1], f"{base}a", base.split("/")[0] + "/other/x"):
            oss_server.put_object(remote.bucket, key, b"outside")
        remote.put("a", b"inside")
        assert oss_server.keys(remote.bucket, base + "/") == [f"{base}/a"]
        assert list(remote.list("")) == ["a"]
        assert [i.key for i in remote.list_info("")] == ["a"]
        assert remote.has(["a", "2/a", "../prefix2/a"]) == {"a"}
        assert remote.get("a") == b"inside"

    def test_requests_per_operation(self, remote: Remote, oss_server: OSSServer) -> None:
        """What the remote sends: one request per get/put, one HEAD per has() key, no retries."""
        remote.put("k", b"0123456789")
        before = oss_server.counts
        assert remote.get("k", 2, 3) == b"234"
        assert remote.get("k", 10) == b""  # 416 InvalidRange, not the whole object
        assert remote.has(["k", "x", "y"]) == {"k"}
        assert remote.put_if_absent("k", b"other") is False
        delta = oss_server.counts - before
        assert delta == {"GetObject": 2, "HeadObject": 3, "PutObject": 1}


def _oss_remote(oss_server: OSSServer, bucket: str = OSS_TEST_BUCKET) -> Remote:
    return open_remote_url(oss_server.url_for(bucket, "p"))


def test_oss_wrong_secret_is_permission_denied(
    oss_url: str, oss_server: OSSServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "not-the-secret")
    remote = open_remote_url(oss_url)
    before = oss_server.error_counts["SignatureDoesNotMatch"]
    try:
        for operation in (
            lambda: remote.put("k", b"x"),
            lambda: remote.get("k"),
            lambda: remote.has(["k"]),
            lambda: list(remote.list("")),
        ):
            with pytest.raises(PermissionDenied, match="SignatureDoesNotMatch"):
                operation()
    finally:
        remote.close()
    # The server recomputed each signature and found it wrong: the check is not a no-op.
    assert oss_server.error_counts["SignatureDoesNotMatch"] == before + 4
    assert oss_server.keys(OSS_TEST_BUCKET, urlparse(oss_url).path.lstrip("/")) == []


def _signed_request(
    oss_server: OSSServer, method: str, key: str, secret: str
) -> tuple[str, dict[str, str]]:
    """A V4-signed request for `key` in the test bucket, signed by oss2's own signer."""
    import oss2
    import oss2.credentials
    import oss2.http

    url = f"{oss_server.endpoint}/{OSS_TEST_BUCKET}/{key}"
    request = oss2.http.Request(method, url, region=oss_server.region, product="oss")
    credentials = oss2.credentials.StaticCredentialsProvider(
        OSS_TEST_ENV["OSS_ACCESS_KEY_ID"], secret
    )
    oss2.ProviderAuthV4(credentials)._sign_request(request, OSS_TEST_BUCKET, key)
    return url, {k: v for k, v in request.headers.items() if v is not None}


def _send(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read()


def _error_code(body: bytes) -> str | None:
    return ET.fromstring(body).findtext("Code")


def _one_second_later(oss_date: str) -> str:
    signed_at = calendar.timegm(time.strptime(oss_date, "%Y%m%dT%H%M%SZ"))
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(signed_at + 1))


def test_oss_server_checks_signatures(oss_server: OSSServer) -> None:
    """Plain HTTP requests: a correct V4 signature is accepted, any tampering is refused."""
    oss_server.put_object(OSS_TEST_BUCKET, "signed/object", b"payload")
    secret = OSS_TEST_ENV["OSS_ACCESS_KEY_SECRET"]
    url, headers = _signed_request(oss_server, "GET", "signed/object", secret)
    assert _send(url, headers) == (200, b"payload")

    before = oss_server.error_counts["SignatureDoesNotMatch"]
    auth = headers["authorization"]
    last = auth[-1]
    tampered = auth[:-1] + ("0" if last != "0" else "1")
    for bad_url, bad_headers in [
        (url, headers | {"authorization": tampered}),  # the signature itself
        (url.replace("signed/object", "signed/other"), headers),  # the resource signed
        (url, headers | {"x-oss-date": _one_second_later(headers["x-oss-date"])}),  # a header
        (url + "?acl", headers),  # a query parameter
        _signed_request(oss_server, "GET", "signed/object", "wrong-secret"),  # the key
    ]:
        status, body = _send(bad_url, bad_headers)
        assert (status, _error_code(body)) == (403, "SignatureDoesNotMatch"), body
    assert oss_server.error_counts["SignatureDoesNotMatch"] == before + 5

    status, body = _send(url, {k: v for k, v in headers.items() if k != "authorization"})
    assert (status, _error_code(body)) == (403, "AccessDenied")


def test_oss_unknown_access_key_is_permission_denied(
    oss_url: str, oss_server: OSSServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "LTAIunknown")
    remote = open_remote_url(oss_url)
    before = oss_server.error_counts["InvalidAccessKeyId"]
    try:
        with pytest.raises(PermissionDenied, match="InvalidAccessKeyId"):
            remote.get("k")
        with pytest.raises(PermissionDenied):
            remote.put_if_absent("k", b"x")
    finally:
        remote.close()
    assert oss_server.error_counts["InvalidAccessKeyId"] == before + 2


def test_oss_session_token(oss_server: OSSServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """OSS_SESSION_TOKEN (STS credentials) is sent with, and signed into, every request."""
    oss_server.add_key("STS.testkey", "sts-secret", security_token="sts-token")
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", "STS.testkey")
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", "sts-secret")
    monkeypatch.setenv("OSS_SESSION_TOKEN", "sts-token")
    remote = _oss_remote(oss_server)
    try:
        remote.put("sts", b"x")
        assert remote.get("sts") == b"x"
        remote.delete("sts")
        monkeypatch.setenv("OSS_SESSION_TOKEN", "expired-token")
        with pytest.raises(PermissionDenied, match="InvalidSecurityToken"):
            remote.get("sts")
    finally:
        remote.close()


def test_oss_missing_credentials_is_config_error(
    oss_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OSS_ACCESS_KEY_SECRET")
    with pytest.raises(ConfigError, match="OSS_ACCESS_KEY_SECRET"):
        open_remote_url(oss_url)
    monkeypatch.delenv("OSS_ACCESS_KEY_ID")
    with pytest.raises(ConfigError, match="OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET"):
        open_remote_url(oss_url)
    # Credentials that vanish after the remote was opened are still a configuration error.
    monkeypatch.setenv("OSS_ACCESS_KEY_ID", OSS_TEST_ENV["OSS_ACCESS_KEY_ID"])
    monkeypatch.setenv("OSS_ACCESS_KEY_SECRET", OSS_TEST_ENV["OSS_ACCESS_KEY_SECRET"])
    remote = open_remote_url(oss_url)
    try:
        monkeypatch.delenv("OSS_ACCESS_KEY_ID")
        with pytest.raises(ConfigError, match="OSS_ACCESS_KEY_ID"):
            remote.get("k")
    finally:
        remote.close()


def test_oss_missing_bucket_raises_remote_error(oss_url: str, oss_server: OSSServer) -> None:
    remote = _oss_remote(oss_server, "cachefs-no-such-bucket")
    try:
        for operation in (
            lambda: remote.get("k"),
            lambda: remote.get("k", 1, 2),
            lambda: remote.get("k", 1, 0),
            lambda: remote.put("k", b"x"),
            lambda: remote.put_if_absent("k", b"x"),
            lambda: remote.has(["k"]),
            lambda: remote.has(["k", "j"]),
            lambda: list(remote.list("")),
            lambda: remote.delete("k"),
        ):
            with pytest.raises(RemoteError, match="cachefs-no-such-bucket") as info:
                operation()
            assert not isinstance(info.value, ObjectNotFound)
    finally:
        remote.close()


def test_oss_nothing_listening_raises_remote_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in OSS_TEST_ENV.items():
        monkeypatch.setenv(var, value)
    # A bound socket that never listens: connections to its port are refused, and no other
    # process can take the port while the test runs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind((LOOPBACK, 0))
        endpoint = f"http://{LOOPBACK}:{closed.getsockname()[1]}"
        remote = open_remote_url(f"oss://bucket/p?endpoint={endpoint}&region=cn-hangzhou")
        try:
            for operation in (
                lambda: remote.get("k"),
                lambda: remote.put_if_absent("k", b"x"),
                lambda: remote.has(["k", "j"]),
                lambda: list(remote.list("")),
            ):
                started = time.monotonic()
                with pytest.raises(RemoteError, match="no answer"):
                    operation()
                assert time.monotonic() - started < 30
        finally:
            remote.close()


def test_open_remote_url_oss_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in OSS_TEST_ENV.items():
        monkeypatch.setenv(var, value)
    endpoint = "endpoint=http://127.0.0.1:1&region=cn-hangzhou"
    with pytest.raises(ConfigError, match=r"bogus.*known: endpoint, max_connections, region"):
        open_remote_url(f"oss://bucket/p?{endpoint}&bogus=1")
    for url, problem in [
        ("oss://bucket/p", "endpoint="),
        ("oss://bucket/p?endpoint_url=http://127.0.0.1:1", "endpoint_url"),
        ("oss://bucket/p?endpoint=http://127.0.0.1:1", "region="),
        ("oss://bucket/p?endpoint=127.0.0.1:1&region=r", "http"),
        (f"oss://bucket/p?{endpoint}&max_connections=lots", "max_connections"),
        (f"oss://Bad_Bucket/p?{endpoint}", "bucket name"),
        (f"oss:///p?{endpoint}", "oss://BUCKET"),
        (f"oss://key:secret@bucket/p?{endpoint}", "OSS_ACCESS_KEY_ID"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            open_remote_url(url)
    remote = open_remote_url(f"oss://bucket/a/b/?{endpoint}&max_connections=8")
    assert isinstance(remote, OSSRemote)
    assert (remote.url, remote.prefix, remote.parallelism) == ("oss://bucket/a/b", "a/b/", 4)
    remote.close()


def test_oss_region_from_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    assert region_from_endpoint("https://oss-cn-hangzhou.aliyuncs.com") == "cn-hangzhou"
    assert region_from_endpoint("https://oss-cn-beijing-internal.aliyuncs.com") == "cn-beijing"
    assert region_from_endpoint("http://oss-ap-southeast-1.aliyuncs.com:80") == "ap-southeast-1"
    assert region_from_endpoint("https://oss-accelerate.aliyuncs.com") is None
    assert region_from_endpoint("http://127.0.0.1:9000") is None
    for var, value in OSS_TEST_ENV.items():
        monkeypatch.setenv(var, value)
    remote = open_remote_url("oss://bucket/p?endpoint=https://oss-eu-central-1.aliyuncs.com")
    assert isinstance(remote, OSSRemote) and remote.region == "eu-central-1"
    remote.close()  # opening does no I/O: nothing was sent anywhere


# --- the OSS test server itself, through oss2 (not through OSSRemote) ----------------------


@pytest.fixture
def oss2_bucket(oss_server: OSSServer) -> Iterator[object]:
    import oss2

    session = oss2.Session()
    auth = oss2.AuthV4(OSS_TEST_ENV["OSS_ACCESS_KEY_ID"], OSS_TEST_ENV["OSS_ACCESS_KEY_SECRET"])
    try:
        yield oss2.Bucket(
            auth, oss_server.endpoint, OSS_TEST_BUCKET, session=session, region=oss_server.region
        )
    finally:
        session.session.close()


def test_oss_server_forbid_overwrite(oss2_bucket: object) -> None:
    import oss2

    assert isinstance(oss2_bucket, oss2.Bucket)
    key = f"server/{time.monotonic_ns()}"
    forbid = {"x-oss-forbid-overwrite": "true"}
    oss2_bucket.put_object(key, b"first", headers=forbid)
    with pytest.raises(oss2.exceptions.ServerError) as info:
        oss2_bucket.put_object(key, b"second", headers=forbid)
    assert (info.value.status, info.value.code) == (409, "FileAlreadyExists")
    oss2_bucket.put_object(key, b"third", headers={"x-oss-forbid-overwrite": "false"})
    assert oss2_bucket.get_object(key).read() == b"third"
    with pytest.raises(oss2.exceptions.ServerError) as info:
        oss2_bucket.put_object(key, b"x", headers={"Content-MD5": "AAAAAAAAAAAAAAAAAAAAAA=="})
    assert (info.value.status, info.value.code) == (400, "InvalidDigest")
    oss2_bucket.delete_object(key)


def test_oss_server_ranges(oss2_bucket: object) -> None:
    """OSS range rules: out-of-range is the whole object (200) unless behaviour is standard."""
    import oss2

    assert isinstance(oss2_bucket, oss2.Bucket)
    key = f"server/{time.monotonic_ns()}"
    oss2_bucket.put_object(key, b"0123456789")
    standard = {"x-oss-range-behavior": "standard"}
    for byte_range, headers, status, data in [
        ((2, 4), {}, 206, b"234"),
        ((7, None), {}, 206, b"789"),
        ((None, 3), {}, 206, b"789"),
        ((5, 20), {}, 200, b"0123456789"),  # end past the end: ignored
        ((10, None), {}, 200, b"0123456789"),  # start past the end: ignored
        ((5, 20), standard, 206, b"56789"),  # clamped
        ((None, 30), standard, 206, b"0123456789"),
    ]:
        result = oss2_bucket.get_object(key, byte_range=byte_range, headers=headers)
        assert (result.status, result.read()) == (status, data), byte_range
    with pytest.raises(oss2.exceptions.ServerError) as info:
        oss2_bucket.get_object(key, byte_range=(10, None), headers=standard)
    assert (info.value.status, info.value.code) == (416, "InvalidRange")
    oss2_bucket.delete_object(key)


def test_oss_server_list_paging_and_delimiter(oss2_bucket: object) -> None:
    import oss2

    assert isinstance(oss2_bucket, oss2.Bucket)
    base = f"server/{time.monotonic_ns()}/"
    names = ["a", "b/1", "b/2", "c", "d/x/y", "e%+ key"]
    for name in names:
        oss2_bucket.put_object(base + name, b"")
    listed = [o.key for o in oss2.ObjectIteratorV2(oss2_bucket, prefix=base, max_keys=2)]
    assert listed == [base + n for n in names]
    page = oss2_bucket.list_objects_v2(prefix=base, delimiter="/", max_keys=2)
    assert [o.key for o in page.object_list] == [base + "a"]
    assert page.prefix_list == [base + "b/"] and page.is_truncated
    page = oss2_bucket.list_objects_v2(
        prefix=base, delimiter="/", continuation_token=page.next_continuation_token
    )
    assert [o.key for o in page.object_list] == [base + "c", base + "e%+ key"]
    assert page.prefix_list == [base + "d/"] and not page.is_truncated
    with pytest.raises(oss2.exceptions.ServerError) as info:
        oss2_bucket.list_objects_v2(prefix=base, max_keys=1001)
    assert (info.value.status, info.value.code) == (400, "InvalidArgument")
    for name in names:
        oss2_bucket.delete_object(base + name)


def _s3_url(bucket: str, endpoint: str, prefix: str = "p") -> str:
    return f"s3://{bucket}/{prefix}?endpoint_url={endpoint}&region=us-east-1"


def test_s3_ignoring_put_if_absent_is_refused(s3_url: str) -> None:
    """An endpoint that silently ignores If-None-Match must not get ref updates."""
    direct = open_remote_url(s3_url)
    endpoint = urlparse(s3_url).query.split("endpoint_url=")[1].split("&")[0]
    with IgnoringPutIfAbsentProxy(endpoint) as proxy:
        proxied = open_remote_url(s3_url.replace(endpoint, proxy.endpoint))
        try:
            # The proxy is a working S3 endpoint...
            proxied.put("plain", b"through the proxy")
            assert direct.get("plain") == b"through the proxy"
            # ...that turns put-if-absent into a plain put.
            assert proxied.put_if_absent("twice", b"1") is True
            assert proxied.put_if_absent("twice", b"2") is True
            assert direct.get("twice") == b"2"
            assert proxy.stripped == 2
            for key in ("plain", "twice"):
                direct.delete(key)

            refs = GenerationRefStore(proxied)
            with pytest.raises(RemoteUnsupported, match="put-if-absent"):
                refs.compare_and_swap(
                    "ds", "heads", "main", RefValue(None, 0), commit_hash("c1"), "commit"
                )
            # Refused again on the next attempt, and nothing was written: no ref generation
            # object, no leftover probe key.
            with pytest.raises(RemoteUnsupported):
                refs.compare_and_swap(
                    "ds", "heads", "main", RefValue(None, 0), commit_hash("c1"), "commit"
                )
            assert list(direct.list("")) == []
            assert GenerationRefStore(direct).read("ds", "heads", "main") == RefValue(None, 0)
        finally:
            proxied.close()
            direct.close()


def test_s3_missing_bucket_raises_remote_error(moto_server: MotoServer) -> None:
    remote = open_remote_url(_s3_url("cachefs-no-such-bucket", moto_server.endpoint))
    try:
        for operation in (
            lambda: remote.get("k"),
            lambda: remote.get("k", 1, 2),
            lambda: remote.put("k", b"x"),
            lambda: remote.put_if_absent("k", b"x"),
            lambda: list(remote.list("")),
            lambda: remote.delete("k"),
        ):
            with pytest.raises(RemoteError, match="cachefs-no-such-bucket") as info:
                operation()
            assert not isinstance(info.value, ObjectNotFound)
    finally:
        remote.close()


def test_s3_nothing_listening_raises_remote_error() -> None:
    # A bound socket that never listens: connections to its port are refused, and no other
    # process can take the port while the test runs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind((LOOPBACK, 0))
        endpoint = f"http://{LOOPBACK}:{closed.getsockname()[1]}"
        remote = open_remote_url(_s3_url("bucket", endpoint))
        try:
            for operation in (lambda: remote.get("k"), lambda: remote.put_if_absent("k", b"x")):
                started = time.monotonic()
                with pytest.raises(RemoteError):
                    operation()
                assert time.monotonic() - started < 25
        finally:
            remote.close()


def test_open_remote_url_unknown_scheme() -> None:
    for url in ("ftp://host/x", "gs://bucket/p", "bucket/p", "/abs/path", "S4://x"):
        with pytest.raises(ConfigError):
            open_remote_url(url)


def test_open_remote_url_s3_unknown_option() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        open_remote_url("s3://bucket/p?endpoint_url=http://127.0.0.1:1&bogus=1")
    with pytest.raises(ConfigError, match="endpoint"):
        open_remote_url("s3://bucket/p?endpoint=http://127.0.0.1:1")


def test_open_remote_url_bad_urls() -> None:
    with pytest.raises(ConfigError):
        open_remote_url("s3:///no-bucket")
    with pytest.raises(ConfigError):
        open_remote_url("file://remote-host/path")
    with pytest.raises(ConfigError):
        open_remote_url("s3://bucket/p?max_connections=lots")


def test_open_remote_url_file(tmp_path: Path) -> None:
    remote = open_remote_url((tmp_path / "repo").as_uri())
    assert isinstance(remote, LocalRemote)
    assert remote.root == tmp_path / "repo"
    remote.close()
