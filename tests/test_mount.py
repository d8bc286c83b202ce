"""Real FUSE mounts: content and metadata, reads, caches, sharing, failures, unmounting."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachefs.config import data_dir
from tests.helpers import cli_json, run_cli, snapshot
from tests.mounting import MountSet, daemon_pids, is_mounted, wait_for
from tests.servers import MotoServer, free_port

CHUNK = 64 << 10


def make_source(root: Path) -> None:
    (root / "empty_dir").mkdir(parents=True)
    deep = root.joinpath(*[f"level{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "bottom.txt").write_text("deep down")
    (root / "empty_file").touch()
    (root / "many_chunks.bin").write_bytes(os.urandom(CHUNK * 9 + 1234))
    (root / "exact_chunk.bin").write_bytes(os.urandom(CHUNK))
    small = root / "small"
    small.mkdir()
    for i in range(120):
        (small / f"img_{i:04d}.jpg").write_bytes(os.urandom(200 + i * 97))
    exe = root / "tool.sh"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o750)
    (root / "ro.txt").write_text("read only")
    (root / "ro.txt").chmod(0o444)
    os.symlink("small/img_0001.jpg", root / "link")
    os.symlink("/nonexistent/target", root / "dangling")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_source(src)
    run_cli("init", "ds", "--chunk-size", "64KiB")
    run_cli("commit", "ds", str(src), "-m", "v1")
    return src


def stats(mountpoint: Path) -> dict:
    return cli_json("stats", str(mountpoint))


def read_all(root: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digests[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def test_every_file_and_attribute_matches_the_source(dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mount("ds", mounts.mountpoint())
    assert snapshot(mnt) == snapshot(dataset)
    st = (mnt / "tool.sh").stat()
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    commit = cli_json("log", "ds")[0]["commit"]
    assert os.getxattr(mnt / "small" / "img_0003.jpg", "user.cachefs.commit").decode() == commit
    assert os.getxattr(mnt / "empty_dir", "user.cachefs.commit").decode() == commit
    content_hash = os.getxattr(mnt / "ro.txt", "user.cachefs.hash").decode()
    entry = cli_json("ls", "ds:ro.txt")[0]
    assert content_hash == entry["hash"]
    info = [m for m in cli_json("mounts") if m["mountpoint"] == str(mnt)]  # other mounts may run
    assert [(m["dataset"], m["commit"], m["state"]) for m in info] == [("ds", commit, "serving")]
    assert info[0]["pid"] in daemon_pids(mnt)


def test_a_directory_of_10000_entries(tmp_path: Path, mounts: MountSet) -> None:
    src = tmp_path / "wide"
    src.mkdir()
    for i in range(10_000):
        (src / f"f{i:05d}").write_bytes(i.to_bytes(4, "little"))
    run_cli("init", "wide")
    run_cli("commit", "wide", str(src), "-m", "wide")
    mnt = mounts.mount("wide", mounts.mountpoint())
    names = sorted(os.listdir(mnt))
    assert names == [f"f{i:05d}" for i in range(10_000)]
    assert (mnt / "f09999").read_bytes() == (9999).to_bytes(4, "little")
    assert len(list(os.scandir(mnt))) == 10_000


def test_random_reads_across_chunk_boundaries(dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mount("ds", mounts.mountpoint())
    expected = (dataset / "many_chunks.bin").read_bytes()
    rng = random.Random(7)
    fd = os.open(mnt / "many_chunks.bin", os.O_RDONLY)
    try:
        for _ in range(300):
            offset = rng.randrange(0, len(expected) + 100)
            size = rng.choice([1, 100, 4096, CHUNK - 1, CHUNK + 1, 3 * CHUNK])
            assert os.pread(fd, size, offset) == expected[offset : offset + size]
        for boundary in range(CHUNK, len(expected), CHUNK):
            assert os.pread(fd, 10, boundary - 5) == expected[boundary - 5 : boundary + 5]
    finally:
        os.close(fd)


READER = """
import hashlib, os, sys
root = sys.argv[1]
out = {}
for dirpath, _, files in os.walk(root):
    for name in sorted(files):
        path = os.path.join(dirpath, name)
        if not os.path.islink(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
print(__import__("json").dumps(out))
"""


def test_many_concurrent_reader_processes(dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mount("ds", mounts.mountpoint())
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(mnt)], stdout=subprocess.PIPE,
                                text=True) for _ in range(8)]
    expected = read_all(dataset)
    for proc in readers:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        assert json.loads(out) == expected
    stored = [p for kind in ("chunks", "trees", "commits")
              for p in (data_dir() / "repo" / kind).rglob("*") if p.is_file()]
    assert stats(mnt)["origin_requests"] <= len(stored)  # each object once, not once a reader


def test_non_root_user_reads_a_root_mount(dataset: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to mount for another user")  # CI and this machine run as root
    public = Path(tempfile.mkdtemp(prefix="cachefs-public-", dir="/tmp"))
    public.chmod(0o755)
    mount_set = MountSet(public)
    try:
        mnt = mount_set.mount("ds", mount_set.mountpoint())
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               "cat", str(mnt / "small" / "img_0005.jpg")], capture_output=True,
                              timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == (dataset / "small" / "img_0005.jpg").read_bytes()
        denied = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 "sh", "-c", f"echo x > {mnt}/new"], capture_output=True,
                                timeout=30, check=False)
        assert denied.returncode != 0
    finally:
        mount_set.cleanup()
        shutil.rmtree(public, ignore_errors=True)


def test_warm_remount_needs_no_origin_request(dataset: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mounts.mount("ds", mounts.mountpoint(), "--cache-dir", str(cache))
    first = read_all(mnt)
    assert stats(mnt)["origin_requests"] > 0
    run_cli("umount", str(mnt))
    assert not is_mounted(mnt)
    mnt = mounts.mount("ds", mnt, "--cache-dir", str(cache))
    assert read_all(mnt) == first == read_all(dataset)
    figures = stats(mnt)
    assert figures["origin_requests"] == 0 and figures["origin_bytes"] == 0
    assert figures["ssd_hits"] > 0


def test_ssd_cache_bound_holds(dataset: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    bound = 256 << 10
    mnt = mounts.mount("ds", mounts.mountpoint(), "--cache-dir", str(cache), "--cache-size",
                       str(bound), "--memory-cache", "0")
    assert read_all(mnt) == read_all(dataset)
    figures = stats(mnt)
    assert figures["ssd_bytes_used"] <= bound
    on_disk = sum(p.stat().st_size for p in (cache / "objects").rglob("*") if p.is_file())
    assert on_disk <= bound
    assert figures["ssd_evictions"] > 0


def test_two_mounts_share_one_cache_dir(dataset: Path, tmp_path: Path, mounts: MountSet) -> None:
    (dataset / "v2_only.txt").write_text("second version")
    run_cli("commit", "ds", str(dataset), "-m", "v2")
    log = cli_json("log", "ds")
    cache = mounts.root / "cache"
    v1 = mounts.mount(f"ds@{log[1]['commit'][:12]}", mounts.mountpoint("v1"), "--cache-dir",
                      str(cache))
    v2 = mounts.mount("ds", mounts.mountpoint("v2"), "--cache-dir", str(cache))
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(m)], stdout=subprocess.PIPE,
                                text=True) for m in (v1, v2, v1, v2)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in readers]
    expected_v2 = read_all(dataset)
    expected_v1 = {k: v for k, v in expected_v2.items() if k != "v2_only.txt"}
    assert results == [expected_v1, expected_v2, expected_v1, expected_v2]
    chunks = [p.name for p in (cache / "objects" / "chunks").rglob("*") if p.is_file()]
    assert len(chunks) == len(set(chunks))  # every shared chunk is stored once
    repo_chunks = {p.name for p in (data_dir() / "repo" / "chunks").rglob("*") if p.is_file()}
    assert set(chunks) <= repo_chunks


def test_corrupt_ssd_entry_is_dropped_and_refetched(dataset: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mounts.mount("ds", mounts.mountpoint(), "--cache-dir", str(cache))
    expected = (dataset / "exact_chunk.bin").read_bytes()
    assert (mnt / "exact_chunk.bin").read_bytes() == expected
    run_cli("umount", str(mnt))
    entry = next(p for p in (cache / "objects" / "chunks").rglob("*")
                 if p.is_file() and p.stat().st_size == CHUNK)
    data = bytearray(entry.read_bytes())
    data[100] ^= 0xFF
    entry.write_bytes(bytes(data))
    mnt = mounts.mount("ds", mnt, "--cache-dir", str(cache))
    for path in ("exact_chunk.bin", "many_chunks.bin"):
        assert (mnt / path).read_bytes() == (dataset / path).read_bytes()
    figures = stats(mnt)
    assert figures["corrupt_chunks"] == 1 and figures["origin_requests"] >= 1


def test_writes_get_erofs(dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mount("ds", mounts.mountpoint())
    attempts = [
        lambda: open(mnt / "ro.txt", "w"),  # noqa: SIM115
        lambda: open(mnt / "new.txt", "x"),  # noqa: SIM115
        lambda: (mnt / "newdir").mkdir(),
        lambda: (mnt / "ro.txt").unlink(),
        lambda: (mnt / "ro.txt").rename(mnt / "moved.txt"),
        lambda: os.chmod(mnt / "ro.txt", 0o777),
        lambda: os.symlink("x", mnt / "sym"),
        lambda: os.setxattr(mnt / "ro.txt", "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert snapshot(mnt) == snapshot(dataset)


def test_unknown_ref_fails_clearly_and_leaves_no_mount(dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mountpoint()
    proc = run_cli("mount", "ds@nosuchref", str(mnt), check=False)
    assert proc.returncode == 3 and "no branch, tag or commit 'nosuchref'" in proc.stderr
    assert not is_mounted(mnt) and not daemon_pids(mnt)
    proc = run_cli("mount", "ds", str(mnt / "missing"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_unmount_with_open_files(dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mount("ds", mounts.mountpoint())
    pid = daemon_pids(mnt)[0]
    expected = (dataset / "many_chunks.bin").read_bytes()
    with open(mnt / "many_chunks.bin", "rb") as f:
        assert f.read(10) == expected[:10]
        proc = run_cli("umount", str(mnt), check=False)
        assert proc.returncode == 11 and "busy" in proc.stderr and "--lazy" in proc.stderr
        assert is_mounted(mnt) and (mnt / "ro.txt").read_text() == "read only"
        run_cli("umount", str(mnt), "--lazy")
        assert not is_mounted(mnt)
        assert f.read() == expected[10:]  # the open file keeps working after detaching
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             what="the daemon to exit after the last file closed")
    mnt = mounts.mount("ds", mnt)
    run_cli("umount", str(mnt))  # not busy: a clean unmount, and the daemon exits
    assert not is_mounted(mnt) and not daemon_pids(mnt)


def test_warmup_fills_the_ssd_tier(dataset: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mounts.mount("ds", mounts.mountpoint(), "--cache-dir", str(cache))
    result = cli_json("warmup", str(mnt))
    assert result["files"] == 126 and result["fetched_bytes"] > 0
    before = stats(mnt)
    assert before["ssd_bytes_used"] >= result["bytes"] - CHUNK  # small files share chunks
    assert read_all(mnt) == read_all(dataset)
    after = stats(mnt)
    assert after["origin_requests"] == before["origin_requests"]  # everything came from SSD
    again = cli_json("warmup", str(mnt / "small"))
    assert again["fetched_bytes"] == 0
    proc = run_cli("warmup", str(dataset), check=False)
    assert proc.returncode == 11 and "not inside a cachefs mount" in proc.stderr


def test_stats_json_and_prometheus_metrics(dataset: Path, mounts: MountSet) -> None:
    port = free_port()
    mnt = mounts.mount("ds", mounts.mountpoint(), "--metrics", f"127.0.0.1:{port}")
    (mnt / "many_chunks.bin").read_bytes()
    figures = stats(mnt)
    for key in ("memory_hits", "ssd_hits", "origin_requests", "origin_bytes", "ssd_bytes_used",
                "corrupt_chunks", "read_bytes", "read_throughput_bytes_per_s"):
        assert key in figures
    assert figures["read_bytes"] >= (dataset / "many_chunks.bin").stat().st_size
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    # The names served before cachefs_mount_*, kept as deprecated aliases for one release
    # (label order is the exposition library's: compared parsed).
    samples = {s.name: s for family in text_string_to_metric_families(text)
               for s in family.samples}
    assert samples["cachefs_origin_requests"].labels["dataset"] == "ds"
    assert "cachefs_ssd_bytes_used" in samples


def test_mount_helper_for_mount_t_fuse_cachefs(dataset: Path, mounts: MountSet) -> None:
    mnt = mounts.mountpoint()
    mounts.points.append(mnt)
    helper = Path(sys.executable).with_name("mount.cachefs")
    proc = subprocess.run([str(helper), "ds@main", str(mnt), "-o",
                           f"ro,_netdev,cache_dir={mounts.root / 'cache'},memory_cache=64MiB"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (mnt / "ro.txt").read_text() == "read only"
    bad = subprocess.run([str(helper), "ds", str(mnt), "-o", "bogus=1"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode != 0 and "unknown option 'bogus=1'" in bad.stderr


def test_origin_down_serves_cache_and_fails_uncached_reads_in_bounded_time(
        tmp_path: Path, mounts: MountSet) -> None:
    server = MotoServer().start()
    try:
        server.create_bucket("origin-down")
        url = f"s3://origin-down/ds?endpoint_url={server.endpoint}&region=us-east-1"
        src = tmp_path / "src"
        src.mkdir()
        (src / "cached.bin").write_bytes(os.urandom(3 * CHUNK))
        (src / "uncached.bin").write_bytes(os.urandom(3 * CHUNK))
        run_cli("remote", "add", "s3", url)
        run_cli("init", "ds", "--chunk-size", "64KiB", "--remote", "s3")
        run_cli("commit", "ds", str(src), "-m", "v1", "--remote", "s3")
        mnt = mounts.mount("ds", mounts.mountpoint(), "--remote", "s3", "--timeout", "5")
        assert (mnt / "cached.bin").read_bytes() == (src / "cached.bin").read_bytes()
        server.stop()
        assert (mnt / "cached.bin").read_bytes() == (src / "cached.bin").read_bytes()
        started = time.monotonic()
        with pytest.raises(OSError) as info:
            (mnt / "uncached.bin").read_bytes()
        assert info.value.errno == errno.EIO
        assert time.monotonic() - started < 20
        assert (mnt / "cached.bin").read_bytes() == (src / "cached.bin").read_bytes()
        assert stats(mnt)["origin_errors"] + stats(mnt)["origin_timeouts"] >= 1
    finally:
        server.stop()


def test_sequential_reads_arrive_as_large_requests(tmp_path: Path, mounts: MountSet) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "shard.bin").write_bytes(os.urandom(8 << 20))
    run_cli("init", "big")
    run_cli("commit", "big", str(src), "-m", "one shard")
    mnt = mounts.mount("big", mounts.mountpoint())
    with open(mnt / "shard.bin", "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
    sizes = {int(k): v for k, v in stats(mnt)["read_request_sizes"].items()}
    assert sum(k * v for k, v in sizes.items()) >= 8 << 20
    if os.getuid() == 0:  # the readahead knob in /sys needs root
        assert max(sizes) == 1 << 20, sizes


def test_mount_t_fuse_cachefs_through_mount8(dataset: Path, mounts: MountSet) -> None:
    """mount(8) runs /sbin/mount.fuse.cachefs (the documented link to mount.cachefs)."""
    if os.getuid() != 0:
        pytest.skip("mount(8) with a helper in /sbin needs root")  # CI runs as root
    link = Path("/sbin/mount.fuse.cachefs")
    created = not link.exists()
    if created:
        link.symlink_to(Path(sys.executable).with_name("mount.cachefs"))
    try:
        mnt = mounts.mountpoint()
        mounts.points.append(mnt)
        proc = subprocess.run(["mount", "-t", "fuse.cachefs", "ds@main", str(mnt), "-o",
                               f"cache_dir={mounts.root / 'cache'},timeout=10"],
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert (mnt / "ro.txt").read_text() == "read only"
        assert is_mounted(mnt)
    finally:
        if created:
            link.unlink()


def test_opens_reach_the_daemon_at_most_once_and_pages_stay_cached(
        dataset: Path, mounts: MountSet) -> None:
    """With cachefs's pyfuse3 patch the kernel sends no OPEN (after the first, answered
    ENOSYS) and no RELEASE, and keeps each file's pages across opens: re-reading files costs
    no request. Without the patch (or on a kernel before 5.1) every open is an OPEN."""
    from cachefs.fuse.operations import NO_OPEN as patched

    mnt = mounts.mount("ds", mounts.mountpoint())
    files = sorted((dataset / "small").iterdir())[:40]
    for _ in range(3):
        for path in files:
            assert (mnt / "small" / path.name).read_bytes() == path.read_bytes()
    figures = stats(mnt)
    assert figures["fuse_no_open"] is patched
    assert figures["open_requests"] == (1 if patched else 3 * len(files))
    assert figures["read_requests"] == len(files)  # the 2nd and 3rd rounds: the page cache
    assert figures["open_files"] == 0
    with open(mnt / "many_chunks.bin", "rb") as f:  # a large file read in two halves
        data = (dataset / "many_chunks.bin").read_bytes()
        f.seek(len(data) // 2)
        assert f.read() == data[len(data) // 2 :]
        f.seek(0)
        assert f.read(len(data) // 2) == data[: len(data) // 2]


def test_no_open_is_used_only_on_kernels_that_take_it() -> None:
    from cachefs.fuse.operations import kernel_takes_no_open

    assert kernel_takes_no_open("6.18.0-1-cloud-amd64")
    assert kernel_takes_no_open("5.1.0") and kernel_takes_no_open("5.10.0-28-amd64")
    assert not kernel_takes_no_open("4.18.0-553.el8_10.x86_64")  # RHEL 8
    assert not kernel_takes_no_open("not a release")


def test_two_versions_mounted_in_turn_at_one_path(dataset: Path, mounts: MountSet) -> None:
    """No page of one version is served for the other: each mount is a new connection, so a
    kept page cache (across opens, no OPEN to drop it) never crosses versions."""
    mnt = mounts.mountpoint()
    name = "small/img_0007.jpg"
    v1 = (dataset / name).read_bytes()
    run_cli("tag", "ds", "v1")
    v2 = b"version two " * 50
    (dataset / name).write_bytes(v2)
    run_cli("commit", "ds", str(dataset), "-m", "v2")
    for ref, expected in (("ds@v1", v1), ("ds@main", v2), ("ds@v1", v1)):
        mounts.mount(ref, mnt)
        assert (mnt / name).read_bytes() == expected
        assert (mnt / name).read_bytes() == expected  # from the page cache
        run_cli("umount", str(mnt))
