"""A server's malformed answer is one line naming the server, never a traceback; a server that
ignores conditional writes is refused naming its own protocol's header.

Real servers on loopback: the OSS test server with a bucket whose listings lack IsTruncated (oss2
raises RuntimeError parsing them) or that ignores x-oss-forbid-overwrite, and the moto S3 server
behind a proxy that cuts listing answers short (botocore cannot parse them) or drops
If-None-Match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from cachefs.dataset.refs import GenerationRefStore, RefValue
from cachefs.errors import RemoteError, RemoteUnsupported
from cachefs.remotes.registry import open_remote_url
from tests.fault_proxy import Fault, FaultProxy
from tests.helpers import run_cli
from tests.oss_server import OSS_TEST_ENV, BucketQuirks, OSSServer
from tests.servers import IgnoringPutIfAbsentProxy

BROKEN_LISTING_BUCKET = "cachefs-broken-listing"
OVERWRITING_BUCKET = "cachefs-overwriting"
COMMIT = "c" * 64


@pytest.fixture
def oss_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value in OSS_TEST_ENV.items():
        monkeypatch.setenv(var, value)


def assert_one_line_error(proc: object, exit_code: int, *names: str) -> str:
    """The CLI failed with `exit_code` and one line on stderr naming each of `names`."""
    stderr = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == exit_code, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("cachefs: error: "), stderr
    for name in names:
        assert name in stderr, (name, stderr)
    for secret in (*OSS_TEST_ENV.values(), "testing"):  # no credential, OSS or AWS
        assert secret not in stderr
    return str(stderr)


def test_oss_listing_oss2_cannot_parse_is_a_remote_error(oss_server: OSSServer, oss_env: None,
                                                         tmp_path: Path) -> None:
    oss_server.create_bucket(BROKEN_LISTING_BUCKET,
                             BucketQuirks(listing_without_is_truncated=True))
    url = oss_server.url_for(BROKEN_LISTING_BUCKET, "repo")
    remote = open_remote_url(url)
    try:
        remote.put("datasets/ds", b"{}")
        with pytest.raises(RemoteError, match="IsTruncated") as info:
            list(remote.list("datasets/"))
        assert oss_server.endpoint in str(info.value)
    finally:
        remote.close()
    proc = run_cli("datasets", "--remote", url, check=False)
    assert_one_line_error(proc, RemoteError.exit_code, oss_server.endpoint, "IsTruncated",
                          "malformed answer")


def bad_size(body: bytes) -> bytes:
    """Well-formed XML that is not a listing: sizes that are not numbers."""
    return re.sub(rb"<Size>\d+</Size>", b"<Size>many</Size>", body)


def cut_short(body: bytes) -> bytes:
    """Not even XML: botocore takes a 200 it cannot read for a server error and retries."""
    return body[: len(body) // 2]


@pytest.mark.parametrize(("spoil", "says"), [(bad_size, "malformed answer"),
                                             (cut_short, "500 from")])
def test_s3_listing_botocore_cannot_parse_is_a_remote_error(
        s3_url: str, spoil: Callable[[bytes], bytes], says: str) -> None:
    endpoint = parse_qs(urlparse(s3_url).query)["endpoint_url"][0]
    fault = Fault("GET", "list-type=2", spoil, times=1000)
    with FaultProxy(endpoint, fault) as proxy:
        url = s3_url.replace(endpoint, proxy.endpoint)
        remote = open_remote_url(url)
        try:
            remote.put("datasets/ds", b"{}")
            with pytest.raises(RemoteError, match=says) as info:
                list(remote.list("datasets/"))
            assert proxy.endpoint in str(info.value) and "\n" not in str(info.value)
        finally:
            remote.close()
        proc = run_cli("datasets", "--remote", url, check=False)
        assert_one_line_error(proc, RemoteError.exit_code, proxy.endpoint, says)
        assert fault.hits > 0


@pytest.fixture
def overwriting_oss_url(oss_server: OSSServer, oss_env: None) -> Iterator[str]:
    oss_server.create_bucket(OVERWRITING_BUCKET, BucketQuirks(ignore_forbid_overwrite=True))
    yield oss_server.url_for(OVERWRITING_BUCKET, "repo")


def test_oss_ignoring_forbid_overwrite_is_refused_naming_its_header(
        overwriting_oss_url: str, tmp_path: Path) -> None:
    remote = open_remote_url(overwriting_oss_url)
    try:
        with pytest.raises(RemoteUnsupported, match="x-oss-forbid-overwrite") as info:
            GenerationRefStore(remote).compare_and_swap("ds", "heads", "main",
                                                        RefValue(None, 0), COMMIT, "test")
        assert "If-None-Match" not in str(info.value)
    finally:
        remote.close()
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data")
    run_cli("init", "ds", "--remote", overwriting_oss_url)
    proc = run_cli("commit", "ds", str(src), "-m", "m", "--remote", overwriting_oss_url,
                   check=False)
    stderr = assert_one_line_error(proc, RemoteUnsupported.exit_code, "x-oss-forbid-overwrite")
    assert "If-None-Match" not in stderr


def test_s3_ignoring_if_none_match_is_refused_naming_its_header(s3_url: str) -> None:
    endpoint = parse_qs(urlparse(s3_url).query)["endpoint_url"][0]
    with IgnoringPutIfAbsentProxy(endpoint) as proxy:
        remote = open_remote_url(s3_url.replace(endpoint, proxy.endpoint))
        try:
            with pytest.raises(RemoteUnsupported, match=r"If-None-Match: \*"):
                GenerationRefStore(remote).compare_and_swap("ds", "heads", "main",
                                                            RefValue(None, 0), COMMIT, "test")
        finally:
            remote.close()
