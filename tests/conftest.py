"""Shared pytest fixtures: an isolated home for every test, and a real moto S3 server on loopback.

- `isolated_home` (autouse): XDG directories under the test's tmp_path and AWS test credentials,
  so no test reads or writes the real home, the real config or real AWS settings.
- `moto_server` (session): one `tests.servers.MotoServer` subprocess, always stopped at the end.
- `s3_url`: a fresh, empty bucket on that server, as an ``s3://`` remote URL with a prefix.
- `oss_server` (session): one `tests.oss_server.OSSServer` (in-memory, V4 signatures checked) on
  127.0.0.1 with one bucket, always stopped at the end.
- `storage_servers`: the `tests.storage_servers.StorageServer` processes a test starts (it
  appends them); every one is killed at the end, whatever happened.
- `masters`: the same for `tests.masters.MasterProcess` (`start_group` appends them).
- `peer_servers`: a `tests.peers.PeerSet`: the `cachefs peer serve` processes a test starts, one
  cache dir each, every one killed at the end.
- `oss_url`: a fresh prefix in that bucket as an ``oss://`` remote URL, with the test OSS
  credentials in the environment (where the remote reads them).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.masters import MasterProcess
from tests.mounting import MountSet
from tests.oss_server import OSS_TEST_BUCKET, OSS_TEST_ENV, OSS_UNSET_ENV, OSSServer
from tests.peers import PeerSet
from tests.servers import AWS_TEST_ENV, AWS_UNSET_ENV, MotoServer
from tests.storage_servers import StorageServer

# Tests run several at a time (pytest-xdist, scripts/test.sh): a per-example deadline would
# measure the machine's load, not the code.
settings.register_profile("parallel", deadline=None)
# CI must not depend on luck: there, property tests replay the same examples every run
# (locally they keep exploring new ones).
settings.register_profile("ci", parent=settings.get_profile("parallel"), derandomize=True,
                          database=None)
settings.load_profile("ci" if os.environ.get("CI") else "parallel")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point XDG_* at tmp_path/home/... and use test AWS credentials; returns the fake home."""
    home = tmp_path / "home"
    for var, sub in [
        ("XDG_CONFIG_HOME", "config"),
        ("XDG_DATA_HOME", "data"),
        ("XDG_STATE_HOME", "state"),
        ("XDG_CACHE_HOME", "cache"),
    ]:
        (home / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(home / sub))
    for var, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(var, value)
    for var in AWS_UNSET_ENV + OSS_UNSET_ENV:
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """A moto S3 server subprocess on 127.0.0.1, shared by the session, stopped at its end."""
    server = MotoServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_url(moto_server: MotoServer) -> str:
    """``s3://BUCKET/some/prefix?endpoint_url=...&region=us-east-1`` on a new, empty bucket."""
    bucket = f"cachefs-test-{uuid.uuid4().hex[:16]}"
    moto_server.create_bucket(bucket)
    return f"s3://{bucket}/some/prefix?endpoint_url={moto_server.endpoint}&region=us-east-1"


@pytest.fixture(scope="session")
def oss_server() -> Iterator[OSSServer]:
    """An OSS-protocol server on 127.0.0.1 with bucket `OSS_TEST_BUCKET`, stopped at the end."""
    server = OSSServer(OSS_TEST_ENV["OSS_ACCESS_KEY_ID"], OSS_TEST_ENV["OSS_ACCESS_KEY_SECRET"])
    try:
        server.start()
        server.create_bucket(OSS_TEST_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def oss_url(oss_server: OSSServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """``oss://BUCKET/PREFIX?endpoint=...&region=...`` under a new prefix, credentials set."""
    for var, value in OSS_TEST_ENV.items():
        monkeypatch.setenv(var, value)
    return oss_server.url_for(OSS_TEST_BUCKET, f"t-{uuid.uuid4().hex[:16]}/some/prefix")


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[MountSet]:
    """Real cachefs mounts for one test; all unmounted (and daemons stopped) afterwards."""
    mount_set = MountSet(tmp_path)
    try:
        yield mount_set
    finally:
        mount_set.cleanup()


@pytest.fixture
def storage_servers() -> Iterator[list[StorageServer]]:
    started: list[StorageServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.kill()


@pytest.fixture
def peer_servers(tmp_path: Path) -> Iterator[PeerSet]:
    """`cachefs peer serve` processes of one test (one cache dir each), killed at its end."""
    started = PeerSet(tmp_path / "nodes")
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def masters() -> Iterator[list[MasterProcess]]:
    started: list[MasterProcess] = []
    try:
        yield started
    finally:
        for master in started:
            master.kill()
