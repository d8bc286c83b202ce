"""Runs the shared remote conformance suite over every backend, each against a real server.

- `TestLocalRemote`: the file:// remote in a temporary directory.
- `TestS3Remote`: the s3:// remote on a moto S3 server subprocess on 127.0.0.1.
Plus S3 failure modes (an endpoint that ignores put-if-absent, a missing bucket, nothing
listening) and URL parsing in `cachefs.remotes.registry.open_remote_url`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cachefs.dataset.refs import GenerationRefStore, RefValue
from cachefs.errors import ConfigError, ObjectNotFound, RemoteError, RemoteUnsupported
from cachefs.remotes.base import Remote
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.registry import open_remote_url
from cachefs.remotes.s3 import S3Remote
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
