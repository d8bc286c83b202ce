"""`cachefs gateway`: plain HTTP and the S3 API over real sockets, against a real gateway process.

The dataset is committed with the CLI to the test's local remote; the gateway serves it on a
loopback port; clients are http.client (raw paths, exact headers), urllib and boto3 (signed,
presigned, unsigned).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import botocore
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from tests.gateway import (
    CHUNK,
    ODD_NAMES,
    TEST_KEY_ID,
    TEST_SECRET,
    GatewayServer,
    home_env,
    make_dataset,
    write_keys,
)
from tests.helpers import run_cli, wait_until_not_racy
from tests.peers import PeerSet
from tests.servers import free_port

pytestmark = pytest.mark.timeout(180)



@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """One dataset and two gateways over it for the module's read-only tests: anonymous, and
    with S3 keys (no test here changes the dataset; those that do make their own)."""
    root = tmp_path_factory.mktemp("gateway-site")
    env = home_env(root / "home")
    data = make_dataset(root / "src", env)
    links = root / "links"
    (links / "sub").mkdir(parents=True)
    (links / "sub" / "data.txt").write_bytes(b"linked data")
    for name, target in (("inside", "sub/data.txt"), ("dirlink", "sub"),
                         ("escape", "../../../../etc/passwd"), ("absolute", "/etc/passwd"),
                         ("loop", "loop"), ("dangling", "nothing")):
        (links / name).symlink_to(target)
    run_cli("init", "links", env=env)
    run_cli("commit", "links", str(links), "-m", "links", env=env)
    keys = write_keys(root / "keys.toml", {TEST_KEY_ID: TEST_SECRET})
    with GatewayServer(root, "--anonymous", "--ref-ttl", "0", env=env) as anonymous, \
            GatewayServer(root, "--s3-keys", str(keys), "--ref-ttl", "0", env=env,
                          cache_dir=root / "signed-cache") as signed:
        yield {**data, "root": root, "anonymous": anonymous, "signed": signed}


@pytest.fixture
def dataset(site: dict[str, object]) -> dict[str, object]:
    return site


@pytest.fixture
def gateway(site: dict[str, object]) -> GatewayServer:
    return site["anonymous"]  # type: ignore[return-value]


@pytest.fixture
def signed_gateway(site: dict[str, object]) -> GatewayServer:
    return site["signed"]  # type: ignore[return-value]


def get(server: GatewayServer, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request with `path` sent exactly as given (http.client does not normalize it)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        conn.close()


def quote(path: str) -> str:
    return urllib.request.quote(path)


def s3_client(server: GatewayServer, signed: bool = True, secret: str = TEST_SECRET):
    config = BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                        signature_version="s3v4" if signed else botocore.UNSIGNED)
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=secret,
                        config=config)


# -- plain HTTP --------------------------------------------------------------------------------
def test_get_whole_files_and_headers(gateway: GatewayServer, dataset: dict) -> None:
    for ref in ("v1", "main"):
        for rel, data in dataset[ref].items():
            status, headers, body = get(gateway, quote(f"/photos/{ref}/{rel}"))
            assert status == 200, (rel, body)
            assert body == data, rel
            assert headers["content-length"] == str(len(data))
            assert headers["x-cachefs-commit"] == dataset["commits"][ref]
            etag = headers["etag"]
            assert len(etag) == 66 and etag[0] == etag[-1] == '"'  # 64 hex: never an MD5's 32
            assert headers["cache-control"] == "no-cache"  # a branch or tag may move
            assert headers["accept-ranges"] == "bytes"


def test_commit_hash_is_immutable_and_pins_the_version(gateway: GatewayServer,
                                                       dataset: dict) -> None:
    commit = dataset["commits"]["v1"]
    status, headers, body = get(gateway, f"/photos/{commit[:12]}/train/c0/img000.jpg")
    assert status == 200 and body == dataset["v1"]["train/c0/img000.jpg"]
    assert "immutable" in headers["cache-control"]
    assert headers["x-cachefs-commit"] == commit


def test_ranges(gateway: GatewayServer, dataset: dict) -> None:
    data = dataset["v1"]["shard.bin"]
    size = len(data)
    cases = {"bytes=0-0": (0, 1), "bytes=10-99": (10, 100), f"bytes={CHUNK - 5}-{CHUNK + 5}":
             (CHUNK - 5, CHUNK + 6), "bytes=-100": (size - 100, size), "bytes=300000-":
             (300000, size), f"bytes=5-{size * 2}": (5, size)}
    for spec, (start, end) in cases.items():
        status, headers, body = get(gateway, "/photos/v1/shard.bin", {"Range": spec})
        assert status == 206, spec
        assert body == data[start:end], spec
        assert headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
    # Past the end: 416 with the size; several ranges: the whole file.
    status, headers, _ = get(gateway, "/photos/v1/shard.bin", {"Range": f"bytes={size}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{size}"
    status, _, body = get(gateway, "/photos/v1/shard.bin", {"Range": "bytes=0-1,5-6"})
    assert status == 200 and body == data
    # A sparse file's zero chunks, and an empty file.
    status, _, body = get(gateway, "/photos/v1/sparse.bin", {"Range": f"bytes={CHUNK}-"})
    assert status == 206 and body == dataset["v1"]["sparse.bin"][CHUNK:]
    status, _, body = get(gateway, "/photos/v1/empty.txt")
    assert status == 200 and body == b""
    status, _, _ = get(gateway, "/photos/v1/empty.txt", {"Range": "bytes=0-"})
    assert status == 416


def test_conditional_requests(gateway: GatewayServer, dataset: dict) -> None:
    status, headers, _ = get(gateway, "/photos/v1/shard.bin", method="HEAD")
    assert status == 200
    etag, modified = headers["etag"], headers["last-modified"]
    assert get(gateway, "/photos/v1/shard.bin", {"If-None-Match": etag})[0] == 304
    assert get(gateway, "/photos/v1/shard.bin", {"If-None-Match": '"' + "0" * 64 + '"'})[0] \
        == 200
    assert get(gateway, "/photos/v1/shard.bin", {"If-Modified-Since": modified})[0] == 304
    assert get(gateway, "/photos/v1/shard.bin",
               {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})[0] == 200
    assert get(gateway, "/photos/v1/shard.bin", {"If-Match": '"nope"'})[0] == 412
    assert get(gateway, "/photos/v1/shard.bin", {"If-Match": etag})[0] == 200
    # The file changed between v1 and main: its ETag did too.
    changed = get(gateway, "/photos/main/train/c0/img000.jpg", method="HEAD")[1]["etag"]
    assert get(gateway, "/photos/v1/train/c0/img000.jpg", method="HEAD")[1]["etag"] != changed


def test_json_listings(gateway: GatewayServer, dataset: dict) -> None:
    status, headers, body = get(gateway, "/photos/v1/train/c1/?list")
    assert status == 200 and headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["commit"] == dataset["commits"]["v1"]
    names = {e["name"]: e for e in doc["entries"]}
    expected = {rel.rsplit("/", 1)[1]: data for rel, data in dataset["v1"].items()
                if rel.startswith("train/c1/")}
    assert set(names) == set(expected)
    for name, data in expected.items():
        assert names[name]["size"] == len(data) and names[name]["kind"] == "file"
    refs = json.loads(get(gateway, "/photos/?list")[2])
    assert refs["branches"] == ["main"] and refs["tags"] == ["v1"]
    assert json.loads(get(gateway, "/?list")[2])["datasets"] == ["links", "photos"]
    assert get(gateway, "/photos/v1/shard.bin/?list")[0] == 400  # not a directory


def test_symlinks_are_followed_inside_the_version_only(gateway: GatewayServer,
                                                       signed_gateway: GatewayServer) -> None:
    assert get(gateway, "/links/main/inside")[2] == b"linked data"
    assert get(gateway, "/links/main/dirlink/data.txt")[2] == b"linked data"
    for name in ("escape", "absolute", "loop", "dangling", "dirlink"):
        status, _, body = get(gateway, f"/links/main/{name}")
        assert status == 404, (name, body)
        assert b"root:" not in body
    keys, _ = all_keys(s3_client(signed_gateway), Bucket="links", Prefix="main/")
    assert keys == ["main/inside", "main/sub/data.txt"]  # links to files, as those files


@pytest.mark.parametrize("path", [
    "/photos/v1/../v1/shard.bin", "/photos/v1/%2e%2e/v1/shard.bin", "/photos/v1/odd%2fplain.txt",
    "/photos/v1/odd/plain.txt%00", "/photos/v1//shard.bin", "/photos/./v1/shard.bin",
    "/photos/v1/%ff%fe"])
def test_traversal_and_bad_paths_refused(gateway: GatewayServer, path: str) -> None:
    status, _, body = get(gateway, path)
    assert status == 400, (path, status, body)
    assert b"InvalidURI" in body


def test_not_found_and_errors(gateway: GatewayServer) -> None:
    status, _headers, body = get(gateway, "/photos/v1/nope.jpg")
    assert status == 404 and b"<Code>NoSuchKey</Code>" in body
    assert get(gateway, "/nosuch/v1/x")[0] == 404
    assert b"NoSuchBucket" in get(gateway, "/nosuch/v1/x")[2]
    assert get(gateway, "/photos/nosuchref/x")[0] == 404
    assert get(gateway, "/photos/v1/train")[0] == 404  # a directory is not an object
    assert get(gateway, "/photos/v1/shard.bin", method="PUT")[0] == 403
    assert get(gateway, "/photos/v1/shard.bin", method="DELETE")[0] == 403
    status, _, body = get(gateway, "/photos?acl")
    assert status == 501 and b"NotImplemented" in body
    assert get(gateway, "/Bad..Name/v1/x")[0] in (400, 404)


def test_oversized_headers_refused(gateway: GatewayServer) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /photos/v1/shard.bin HTTP/1.1\r\nHost: x\r\n"
                     + b"X-Filler: " + b"a" * 64 * 1024 + b"\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.split(b" ")[1] in (b"400", b"431"), reply[:100]
    status, _, _body = get(gateway, "/photos/v1/plain-missing")  # still serving
    assert status == 404


def test_too_many_header_fields_refused(gateway: GatewayServer) -> None:
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"GET /photos/v1/shard.bin HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n")
        reply = sock.recv(4096)
    assert reply.split(b" ")[1] == b"400", reply[:100]


def test_64_concurrent_clients_read_every_byte_right(gateway: GatewayServer,
                                                     dataset: dict) -> None:
    items = [(ref, rel, data) for ref in ("v1", "main") for rel, data in dataset[ref].items()]
    order = [items[i % len(items)] for i in range(4 * len(items))]
    random.Random(3).shuffle(order)

    def fetch(item: tuple[str, str, bytes]) -> bool:
        ref, rel, data = item
        with urllib.request.urlopen(gateway.endpoint + quote(f"/photos/{ref}/{rel}"),
                                    timeout=60) as response:
            return response.read() == data

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(fetch, order))
    assert all(results) and len(results) == len(order)


# -- S3 ------------------------------------------------------------------------------------------
def all_keys(client, **kwargs) -> tuple[list[str], list[str]]:
    keys, prefixes = [], []
    for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    return keys, prefixes


def test_boto3_signed_listing_get_head(signed_gateway: GatewayServer, dataset: dict) -> None:
    s3 = s3_client(signed_gateway)
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["links", "photos"]
    assert s3.get_bucket_location(Bucket="photos")["LocationConstraint"] is None
    _, prefixes = all_keys(s3, Bucket="photos", Delimiter="/")
    assert prefixes == ["main/", "v1/"]  # refs, as common prefixes
    expected = sorted((f"{ref}/{rel}" for ref in ("main", "v1") for rel in dataset[ref]),
                      key=lambda k: k.encode())
    keys, _ = all_keys(s3, Bucket="photos", PaginationConfig={"PageSize": 7})
    assert keys == expected  # every key, in UTF-8 byte order, across pages
    keys, prefixes = all_keys(s3, Bucket="photos", Prefix="v1/", Delimiter="/")
    assert prefixes == ["v1/a/", "v1/odd/", "v1/train/"]
    assert keys == ["v1/a-b", "v1/empty.txt", "v1/shard.bin", "v1/sparse.bin"] or \
        keys == sorted((k for k in expected if k.startswith("v1/") and "/" not in k[3:]),
                       key=lambda k: k.encode())
    keys, _ = all_keys(s3, Bucket="photos", Prefix="v1/odd/", StartAfter="v1/odd/plain.txt")
    assert keys == [k for k in expected if k.startswith("v1/odd/") and
                    k.encode() > b"v1/odd/plain.txt"]
    for name in ODD_NAMES:
        body = s3.get_object(Bucket="photos", Key=f"v1/odd/{name}")["Body"].read()
        assert body == dataset["v1"][f"odd/{name}"], name
    ranged = s3.get_object(Bucket="photos", Key="v1/shard.bin", Range="bytes=100-199")
    assert ranged["Body"].read() == dataset["v1"]["shard.bin"][100:200]
    head = s3.head_object(Bucket="photos", Key="main/train/c0/img000.jpg")
    assert head["ContentLength"] == len(b"changed on main")
    assert head["ResponseMetadata"]["HTTPHeaders"]["x-cachefs-commit"] == \
        dataset["commits"]["main"]


def test_boto3_errors_in_s3_format(signed_gateway: GatewayServer) -> None:
    s3 = s3_client(signed_gateway)
    for call, code in [
        (lambda: s3.get_object(Bucket="photos", Key="v1/nope"), "NoSuchKey"),
        (lambda: s3.list_objects_v2(Bucket="nosuch"), "NoSuchBucket"),
        (lambda: s3.put_object(Bucket="photos", Key="v1/x", Body=b"x"), "AccessDenied"),
        (lambda: s3.delete_object(Bucket="photos", Key="v1/shard.bin"), "AccessDenied"),
        (lambda: s3.get_bucket_acl(Bucket="photos"), "NotImplemented"),
        (lambda: s3.get_object(Bucket="photos", Key="v1/shard.bin", Range="bytes=999999-"),
         "InvalidRange"),
        (lambda: s3_client(signed_gateway, secret="wrong").list_buckets(),
         "SignatureDoesNotMatch"),
        (lambda: s3_client(signed_gateway, signed=False).list_buckets(), "AccessDenied"),
    ]:
        with pytest.raises(ClientError) as caught:
            call()
        assert caught.value.response["Error"]["Code"] == code


def test_presigned_urls(signed_gateway: GatewayServer, dataset: dict) -> None:
    s3 = s3_client(signed_gateway)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "photos",
                                                          "Key": "v1/odd/with space.txt"},
                                    ExpiresIn=60)
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == dataset["v1"]["odd/with space.txt"]
    expired = s3.generate_presigned_url("get_object", Params={"Bucket": "photos",
                                                              "Key": "v1/shard.bin"},
                                        ExpiresIn=1)
    time.sleep(1.5)  # the URL's own lifetime: nothing else to await
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(expired, timeout=30)
    with caught.value as error:
        assert error.code == 403 and b"expired" in error.read()
    log = signed_gateway.output()
    assert "X-Amz-Signature" not in log and TEST_SECRET not in log  # queries are never logged
    tampered = url.replace("with%20space", "plain")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(tampered, timeout=30)
    with caught.value as error:
        assert error.code == 403


def test_listing_pages_keep_their_commit(tmp_path: Path) -> None:
    env = home_env(tmp_path / "home")
    dataset = make_dataset(tmp_path / "src", env)
    keys = write_keys(tmp_path / "keys.toml", {TEST_KEY_ID: TEST_SECRET})
    with GatewayServer(tmp_path, "--s3-keys", str(keys), "--ref-ttl", "0", env=env) as server:
        listing_pages_keep_their_commit(server, dataset, env)


def listing_pages_keep_their_commit(signed_gateway: GatewayServer, dataset: dict,
                                    env: dict[str, str]) -> None:
    s3 = s3_client(signed_gateway)
    first = s3.list_objects_v2(Bucket="photos", Prefix="main/train/", MaxKeys=5)
    assert first["IsTruncated"]
    src = dataset["src"]
    for rel in list(dataset["main"]):
        if rel.startswith("train/c3/"):
            (src / rel).unlink()  # main moves on: a quarter of train/ is gone
    wait_until_not_racy(src)
    run_cli("commit", "photos", str(src), "-m", "v3", env=env)
    keys = [o["Key"] for o in first["Contents"]]
    token = first["NextContinuationToken"]
    while token:
        page = s3.list_objects_v2(Bucket="photos", Prefix="main/train/", MaxKeys=5,
                                  ContinuationToken=token)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
    assert keys == sorted(f"main/{rel}" for rel in dataset["main"]
                          if rel.startswith("train/"))  # the old commit's, every page
    fresh, _ = all_keys(s3, Bucket="photos", Prefix="main/train/")
    assert not any("/c3/" in k for k in fresh) and fresh  # a new listing sees the new commit
    with pytest.raises(ClientError) as caught:
        s3.list_objects_v2(Bucket="photos", ContinuationToken="not-a-token")
    assert caught.value.response["Error"]["Code"] == "InvalidArgument"


# -- auth and exposure ---------------------------------------------------------------------------
def test_bearer_token(tmp_path: Path, dataset: dict) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-token\n")
    with GatewayServer(tmp_path, "--token-file", str(token_file), env=dataset["env"]) as server:
        good = {"Authorization": "Bearer s3cr3t-token"}
        status, _, body = get(server, "/photos/v1/shard.bin", good)
        assert status == 200 and body == dataset["v1"]["shard.bin"]
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Basic czNjcjN0LXRva2Vu"}):
            status, _, body = get(server, "/photos/v1/shard.bin", headers)
            assert status in (400, 403), headers  # 400: a scheme it does not take (Basic)
            assert b"s3cr3t" not in body
    assert "s3cr3t-token" not in server.output()


def test_refuses_to_start_without_auth_or_anonymous_off_loopback(tmp_path: Path) -> None:
    def gateway(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cachefs.cli.main", "gateway", *args],
                              capture_output=True, text=True, timeout=60)

    no_auth = gateway("--listen", "127.0.0.1:0")
    assert no_auth.returncode == 2
    assert "--s3-keys" in no_auth.stderr and "--anonymous" in no_auth.stderr
    open_to_all = gateway("--listen", "0.0.0.0:0", "--anonymous")
    assert open_to_all.returncode == 2 and "--insecure" in open_to_all.stderr


def test_sigterm_finishes_and_exits(tmp_path: Path, dataset: dict) -> None:
    server = GatewayServer(tmp_path, "--anonymous", env=dataset["env"]).start()
    try:
        assert get(server, "/photos/v1/shard.bin")[0] == 200
        assert server.stop() == 0
        assert "gateway stopped" in server.output()
    finally:
        server.kill()


def test_metrics_count_requests(tmp_path: Path, dataset: dict) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    with GatewayServer(tmp_path, "--anonymous", "--metrics-listen", f"127.0.0.1:{port}",
                       env=dataset["env"]) as gateway:
        metrics_count_requests(gateway, dataset, text_string_to_metric_families)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            families = list(text_string_to_metric_families(answer.read().decode()))
        assert all(f.documentation for f in families)
        assert any(f.name == "cachefs_gateway_requests" for f in families)


def metrics_count_requests(gateway: GatewayServer, dataset: dict, parse) -> None:  # type: ignore[no-untyped-def]

    for _ in range(3):
        assert get(gateway, "/photos/v1/shard.bin")[0] == 200
    assert get(gateway, "/photos/v1/nope")[0] == 404
    status, _, body = get(gateway, "/-/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in parse(body.decode())
               for s in family.samples}
    assert samples[("cachefs_gateway_requests_total",
                    (("operation", "GetObject"), ("status", "200")))] == 3
    assert samples[("cachefs_gateway_requests_total",
                    (("operation", "GetObject"), ("status", "404")))] == 1
    assert samples[("cachefs_gateway_sent_bytes_total", ())] == \
        3 * len(dataset["v1"]["shard.bin"])


def test_corrupt_cache_entry_is_never_served(tmp_path: Path) -> None:
    """A flipped byte in the gateway's SSD cache is caught and the chunk is read again from the
    origin; a flipped byte in the origin itself fails the request (never wrong bytes). On a
    dataset of its own: it corrupts the origin."""
    env = home_env(tmp_path / "home")
    dataset = make_dataset(tmp_path / "src", env)
    data = dataset["v1"]["shard.bin"]
    with GatewayServer(tmp_path, "--anonymous", env=env) as server:
        assert get(server, "/photos/v1/shard.bin")[2] == data
    entries = [p for p in (server.cache_dir / "objects").rglob("*") if p.is_file()
               and p.stat().st_size >= CHUNK]
    assert entries
    for entry in entries:
        raw = bytearray(entry.read_bytes())
        raw[100] ^= 0xFF
        entry.write_bytes(bytes(raw))
    with GatewayServer(tmp_path, "--anonymous", port=server.port, env=env) as server:
        status, _, body = get(server, "/photos/v1/shard.bin")
        assert status == 200 and body == data
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        metrics = get(server, "/-/metrics")[2].decode()
        assert metric(metrics, "cachefs_gateway_corrupt_chunks_total") >= 1
        assert metric(metrics, "cachefs_gateway_origin_requests_total") >= 1
    # The origin's own copy of a chunk, corrupt, with an empty cache: an error, not the bytes.
    repo = Path(env["XDG_DATA_HOME"]) / "cachefs" / "repo" / "chunks"
    small = dataset["v1"]["odd/plain.txt"]
    corrupted = 0
    for chunk in repo.rglob("*"):
        raw = chunk.read_bytes() if chunk.is_file() else b""
        if small in raw:
            chunk.write_bytes(raw.replace(small, small.upper()))
            corrupted += 1
    assert corrupted
    with GatewayServer(tmp_path, "--anonymous", env=env,
                       cache_dir=tmp_path / "empty-cache") as server:
        status, _, body = get(server, "/photos/v1/odd/plain.txt")
        assert status >= 500 and small not in body and small.upper() not in body


def metric(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in the exposition")


# -- faults --------------------------------------------------------------------------------------
def raw_get(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one response with a Content-Length, read to its end (or EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed before the head")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(head.split(b" ")[1]), body


def test_sigterm_lets_a_download_in_flight_finish(tmp_path: Path, dataset: dict) -> None:
    data = dataset["v1"]["shard.bin"]
    server = GatewayServer(tmp_path, "--anonymous", env=dataset["env"]).start()
    try:
        sock = raw_get(server.port, "/photos/v1/shard.bin")
        first = sock.recv(100)  # the download has begun
        assert first.startswith(b"HTTP/1.1 200")
        server.proc.send_signal(signal.SIGTERM)
        rest = b""
        while True:
            more = sock.recv(65536)
            if not more:
                break
            rest += more
        sock.close()
        body = (first + rest).partition(b"\r\n\r\n")[2]
        assert body == data
        assert server.proc.wait(30) == 0
    finally:
        server.kill()


def test_kill9_mid_stream_then_a_restart_serves_the_right_bytes(tmp_path: Path,
                                                                dataset: dict) -> None:
    env = dataset["env"]
    server = GatewayServer(tmp_path, "--anonymous", env=env).start()
    try:
        sock = raw_get(server.port, "/photos/v1/shard.bin")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
        server.proc.kill()
        server.proc.wait(10)
        sock.close()
    finally:
        server.kill()
    with GatewayServer(tmp_path, "--anonymous", env=env, port=server.port) as again:
        for rel in ("shard.bin", "train/c1/img001.jpg", "sparse.bin"):
            status, _, body = get(again, quote(f"/photos/v1/{rel}"))
            assert status == 200 and body == dataset["v1"][rel]


def test_a_cancelled_request_beside_a_live_one(tmp_path: Path, dataset: dict) -> None:
    """Clients that hang up mid-body, on a cold gateway, while others read the same file: the
    others get every byte, and the gateway keeps serving."""
    data = dataset["v1"]["shard.bin"]
    with GatewayServer(tmp_path, "--anonymous", env=dataset["env"]) as server:
        def quitter() -> None:
            sock = raw_get(server.port, "/photos/v1/shard.bin")
            sock.recv(10)
            sock.close()

        def reader() -> bytes:
            sock = raw_get(server.port, "/photos/v1/shard.bin")
            try:
                return read_response(sock)[1]
            finally:
                sock.close()

        with ThreadPoolExecutor(16) as pool:
            quits = [pool.submit(quitter) for _ in range(8)]
            reads = [pool.submit(reader) for _ in range(8)]
            assert all(f.result() == data for f in reads)
            for f in quits:
                f.result()
        assert get(server, "/photos/v1/shard.bin")[2] == data


def test_cached_files_are_served_while_the_origin_is_gone(tmp_path: Path) -> None:
    env = home_env(tmp_path / "home")
    dataset = make_dataset(tmp_path / "src", env)
    commit = dataset["commits"]["v1"]
    with GatewayServer(tmp_path, "--anonymous", env=env) as server:
        status, _, body = get(server, f"/photos/{commit}/shard.bin")
        assert status == 200 and body == dataset["v1"]["shard.bin"]
        repo = Path(env["XDG_DATA_HOME"]) / "cachefs" / "repo"
        repo.rename(repo.with_name("repo-away"))
        status, _, body = get(server, f"/photos/{commit}/shard.bin")
        assert status == 200 and body == dataset["v1"]["shard.bin"]
        started = time.monotonic()
        status, _, body = get(server, f"/photos/{commit}/train/c2/img002.jpg")
        assert status >= 500, (status, body)  # never cached: an error, in bounded time
        assert time.monotonic() - started < 30


def test_reads_through_the_peer_tier(tmp_path: Path, peer_servers: PeerSet) -> None:
    """A gateway with --cache-peers asks the chunk's owner, which fetches from the origin for
    it: the gateway itself reads only commits and trees from the origin, no chunk."""
    dataset = make_dataset(tmp_path / "src", {})
    peer = peer_servers.start("node1")
    with GatewayServer(tmp_path, "--anonymous", "--cache-peers", peer.address) as server:
        for rel in ("shard.bin", "train/c3/img003.jpg"):
            status, _, body = get(server, quote(f"/photos/v1/{rel}"))
            assert status == 200 and body == dataset["v1"][rel]
        metrics = get(server, "/-/metrics")[2].decode()
    assert metric(metrics, "cachefs_gateway_peer_hits_total") >= 6  # the shard's chunks, a pack
    assert metric(metrics, "cachefs_gateway_origin_bytes_total") < CHUNK  # metadata only
