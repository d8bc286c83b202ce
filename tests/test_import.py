"""Committing straight from a bucket prefix: a real moto S3 server and the OSS test server.

The import must reproduce the objects byte for byte as files, read nothing twice on a re-import
(checked by counting the GET requests the OSS server received), and say clearly what it skipped.
"""

from __future__ import annotations

import random
from pathlib import Path
from urllib.parse import urlparse

import pytest

from cachefs.dataset.importer import import_prefix
from cachefs.dataset.repo import Repository
from cachefs.errors import RemoteError
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.registry import open_remote_url
from tests.helpers import cli_json, run_cli
from tests.oss_server import OSSServer
from tests.servers import MotoServer

CHUNK = 64 * 1024


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


OBJECTS = {
    "train/cat/001.jpg": blob(1, 3000),
    "train/cat/002.jpg": blob(2, 5000),
    "train/dog/001.jpg": blob(3, 4000),
    "train/shard-000.tar": blob(4, 3 * CHUNK + 123),  # several chunks, fetched by range
    "val/a b (1).jpg": blob(5, 100),
    "labels.csv": b"path,label\ntrain/cat/001.jpg,cat\n",
    "empty.txt": b"",
}


def put_all(source_url: str, objects: dict[str, bytes]) -> None:
    remote = open_remote_url(source_url)
    try:
        for key, data in objects.items():
            remote.put(key, data)
    finally:
        remote.close()


def checkout_files(dataset: str, out: Path) -> dict[str, bytes]:
    run_cli("checkout", dataset, str(out))
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.fixture
def source_url(request: pytest.FixtureRequest) -> str:
    """A fresh prefix to import from, on S3 (moto) or OSS (the test server)."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("source_url", ["s3_url", "oss_url"], indirect=True)
def test_import_reproduces_the_objects(source_url: str, tmp_path: Path) -> None:
    put_all(source_url, {**OBJECTS, "empty-dir/": b""})
    run_cli("init", "ds", "--chunk-size", "64KiB")
    result = cli_json("commit", "ds", source_url, "-m", "import")
    assert result["files"] == len(OBJECTS) and result["skipped"] == []
    assert result["bytes"] == result["read_bytes"] == sum(map(len, OBJECTS.values()))
    out = tmp_path / "out"
    assert checkout_files("ds", out) == OBJECTS
    assert (out / "empty-dir").is_dir() and not any((out / "empty-dir").iterdir())
    assert run_cli("verify", "ds").returncode == 0


@pytest.mark.parametrize("source_url", ["s3_url", "oss_url"], indirect=True)
def test_reimport_reads_only_changed_objects(source_url: str, tmp_path: Path) -> None:
    put_all(source_url, OBJECTS)
    run_cli("init", "ds", "--chunk-size", "64KiB")
    cli_json("commit", "ds", source_url, "-m", "one")
    changed = {"train/cat/002.jpg": blob(20, 5100), "new/extra.jpg": blob(21, 700)}
    put_all(source_url, changed)
    remote = open_remote_url(source_url)
    remote.delete("train/dog/001.jpg")
    remote.close()
    result = cli_json("commit", "ds", source_url, "-m", "two")
    assert result["read_bytes"] == sum(map(len, changed.values()))
    assert result["reused_files"] == len(OBJECTS) - 2  # all but the changed and deleted one
    expected = {k: v for k, v in OBJECTS.items() if k != "train/dog/001.jpg"} | changed
    assert checkout_files("ds", tmp_path / "out") == expected
    again = cli_json("commit", "ds", source_url, "-m", "three")
    assert again["unchanged"] and again["read_bytes"] == 0


def test_reimport_sends_no_get_for_unchanged_objects(oss_url: str, oss_server: OSSServer,
                                                     tmp_path: Path) -> None:
    put_all(oss_url, OBJECTS)
    run_cli("init", "ds", "--chunk-size", "64KiB")
    before = oss_server.counts["GetObject"]
    cli_json("commit", "ds", oss_url, "-m", "one")
    # one GET per small object (empty ones too), one per chunk-sized range of the large one
    assert oss_server.counts["GetObject"] - before == len(OBJECTS) - 1 + 4
    put_all(oss_url, {"labels.csv": b"path,label\n"})
    before = oss_server.counts["GetObject"]
    result = cli_json("commit", "ds", oss_url, "-m", "two")
    assert oss_server.counts["GetObject"] - before == 1
    assert result["read_bytes"] == len(b"path,label\n")


def test_import_skips_keys_that_are_not_paths(s3_url: str, moto_server: MotoServer,
                                              tmp_path: Path) -> None:
    parsed = urlparse(s3_url)
    prefix = parsed.path.strip("/") + "/"
    client = moto_server.client()
    try:
        for key, data in {"ok/file": b"fine", "bad//double": b"x", "dot/./x": b"y",
                          "clash": b"an object", "clash/inner": b"under an object"}.items():
            client.put_object(Bucket=parsed.netloc, Key=prefix + key, Body=data)
    finally:
        client.close()
    run_cli("init", "ds")
    proc = run_cli("commit", "ds", s3_url, "-m", "messy bucket")
    assert "skipped 'bad//double'" in proc.stderr and "skipped 'dot/./x'" in proc.stderr
    assert "skipped 'clash/inner'" in proc.stderr
    assert checkout_files("ds", tmp_path / "out") == {"ok/file": b"fine", "clash": b"an object"}


def test_import_of_an_empty_prefix_is_refused(s3_url: str) -> None:
    run_cli("init", "ds")
    proc = run_cli("commit", "ds", s3_url, "-m", "nothing", check=False)
    assert proc.returncode == 3 and "no objects under" in proc.stderr


def test_imported_content_already_stored_is_not_uploaded(s3_url: str, tmp_path: Path) -> None:
    """The same bytes committed from a local directory and then imported are stored once."""
    src = tmp_path / "src"
    for key, data in OBJECTS.items():
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(data)
    run_cli("init", "local-copy", "--chunk-size", "64KiB")
    run_cli("init", "imported", "--chunk-size", "64KiB")
    run_cli("commit", "local-copy", str(src), "-m", "from disk")
    put_all(s3_url, OBJECTS)
    result = cli_json("commit", "imported", s3_url, "-m", "from the bucket")
    assert result["new_bytes"] == 0


class ShrinkingSource:
    """A real remote whose objects lose bytes between the listing and the read."""

    def __init__(self, inner: LocalRemote) -> None:
        self.inner = inner
        self.url = inner.url

    def list_info(self, prefix: str):  # type: ignore[no-untyped-def]
        return self.inner.list_info(prefix)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return self.inner.get(key, start, length)[:-1]


def test_object_changed_during_import_fails_clearly(tmp_path: Path) -> None:
    source = LocalRemote(tmp_path / "bucket")
    source.put("a/b.jpg", blob(9, 1000))
    repo = Repository(LocalRemote(tmp_path / "repo"))
    repo.create_dataset("ds", CHUNK)
    with pytest.raises(RemoteError, match="changed during the import"):
        import_prefix(repo, "ds", "main", ShrinkingSource(source), "m")  # type: ignore[arg-type]
    assert repo.refs.list("ds", "heads") == {}
