"""The SSD tier's compiled read path: real mounts whose files are answered by C threads.

What is asserted: the bytes (whole files, shuffled, from many threads, and ranges at random
offsets; small files of packs and large files of many chunks, some of zeros), that the path
really answered them (its counters: large files' chunks around the page cache, or left to
Python while its memory tier holds them), and every case it must hand back
instead of answering: an entry not fetched yet (the origin), one whose sub-block fails its sum
(deleted, refetched, never returned), one without sums (verified whole by Python, upgraded, then
compiled). Also: `--read-threads 0` turns it off, readers killed mid-pass and an unmount during
a pass leave a daemon that exits cleanly, and the engine's inode table against a model.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.cache import compiled_reads
from cachefs.cache.disk import SUMS_XATTR
from cachefs.fuse.operations import COMPILED_READS
from tests.helpers import cli_json, run_cli
from tests.mounting import MountSet, alive, daemon_pids, is_mounted, wait_for

pytestmark = pytest.mark.skipif(
    not COMPILED_READS or compiled_reads.unavailable() is not None,
    reason="needs pyfuse3 with cachefs's patch (scripts/setup.sh builds it) and the "
           "cachefs.cache._fastread extension")

FILES = 240
CHUNK = "256KiB"  # several small files per pack, several packs


@pytest.fixture
def source(tmp_path: Path) -> Path:
    rng = random.Random(5)
    src = tmp_path / "src"
    for d in range(4):
        (src / f"class{d}").mkdir(parents=True)
    for i in range(FILES):
        size = rng.randrange(1, 40_000)
        (src / f"class{i % 4}" / f"img_{i:04d}.jpg").write_bytes(rng.randbytes(size))
    run_cli("init", "ds", "--chunk-size", CHUNK)
    run_cli("commit", "ds", str(src), "-m", "v1")
    return src


def files_of(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_shuffled(src: Path, mnt: Path, seed: int = 1) -> None:
    """Every file through the mount, shuffled, 8 threads; each must equal its source."""
    names = files_of(src)
    random.Random(seed).shuffle(names)
    with ThreadPoolExecutor(8) as pool:
        got = dict(zip(names, pool.map(lambda n: digest(mnt / n), names)))
    assert got == {n: digest(src / n) for n in names}


def stats(mnt: Path) -> dict:
    return cli_json("stats", str(mnt))


def chunk_entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "objects" / "chunks").rglob("*") if p.is_file())


def mount_warm(mounts: MountSet, source: Path, cache: Path, *args: str) -> Path:
    """A mount whose SSD tier holds every chunk (a first mount read everything), fresh."""
    mnt = mounts.mount("ds", mounts.mountpoint(), "--cache-dir", str(cache), *args)
    read_shuffled(source, mnt)
    run_cli("umount", str(mnt))
    return mounts.mount("ds", mnt, "--cache-dir", str(cache), *args)


def test_small_files_are_answered_by_the_compiled_path_with_the_right_bytes(
        source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mounts.mount("ds", mounts.mountpoint(), "--cache-dir", str(cache))
    first = stats(mnt)
    assert first["compiled_reads"] is True and first["fuse_no_open"] is True
    assert first["compiled_reads_crc"] == "isa-l"  # the isal module's, not zlib's
    assert first["compiled_reads_answered"] == 0
    read_shuffled(source, mnt)
    cold = stats(mnt)
    # Nothing was on the SSD yet: the path handed the first reads back, and Python fetched.
    assert cold["compiled_reads_handed_back"] >= 1 and cold["origin_requests"] >= 1
    run_cli("umount", str(mnt))

    mnt = mounts.mount("ds", mnt, "--cache-dir", str(cache))
    read_shuffled(source, mnt, seed=2)
    warm = stats(mnt)
    assert warm["compiled_reads_answered"] == FILES  # one READ per file, all of them compiled
    assert warm["compiled_reads_handed_back"] == 0 and warm["origin_requests"] == 0
    assert warm["ssd_range_reads"] >= FILES and warm["ssd_hits"] >= FILES
    assert warm["ssd_bytes_read"] >= sum((source / n).stat().st_size for n in files_of(source))
    assert warm["read_requests"] >= FILES
    assert warm["compiled_reads_answered"] <= warm["read_requests"]
    assert warm["corrupt_chunks"] == 0
    # The packs were written through the page cache: the hook answered from it, no worker.
    assert warm["compiled_reads_inline"] >= FILES // 2
    run_cli("umount", str(mnt))

    for entry in chunk_entries(cache):  # now from the disk: the first READ of a pack waits
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    mnt = mounts.mount("ds", mnt, "--cache-dir", str(cache))
    read_shuffled(source, mnt, seed=3)
    evicted = stats(mnt)
    assert evicted["compiled_reads_answered"] == FILES
    assert evicted["compiled_reads_inline"] < FILES  # a worker read what the cache lacked
    # and decided about the whole pack (asked for it, or not where the page cache evicts),
    # though the hook's failed RWF_NOWAIT read may have started the range's I/O since: the
    # worker must not take that for a cached range, which skips the decision altogether
    assert evicted["ssd_pack_prefetches"] + evicted["ssd_pack_prefetches_skipped"] >= 1
    assert evicted["compiled_reads_handed_back"] == 0 and evicted["origin_requests"] == 0


def test_ranges_at_random_offsets_match_the_source(source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mount_warm(mounts, source, cache)
    rng = random.Random(9)
    names = files_of(source)
    for _ in range(300):
        name = rng.choice(names)
        expected = (source / name).read_bytes()
        offset = rng.randrange(0, len(expected) + 10)  # past the end too: empty answers
        length = rng.randrange(1, 70_000)
        fd = os.open(mnt / name, os.O_RDONLY | os.O_DIRECT) if rng.random() < 0.5 else \
            os.open(mnt / name, os.O_RDONLY)
        try:
            assert os.pread(fd, length, offset) == expected[offset : offset + length]
        finally:
            os.close(fd)
    assert stats(mnt)["compiled_reads_answered"] >= 1


def test_a_flipped_byte_is_never_returned_and_the_pack_is_refetched(
        source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mount_warm(mounts, source, cache)
    run_cli("umount", str(mnt))
    entry = max(chunk_entries(cache), key=lambda p: p.stat().st_size)  # a pack of many files
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(entry, "r+b") as f:  # the same inode: its sums stay, and no longer match
        f.write(data)
    mnt = mounts.mount("ds", mnt, "--cache-dir", str(cache))
    read_shuffled(source, mnt, seed=3)
    figures = stats(mnt)
    assert figures["corrupt_chunks"] == 1
    assert figures["compiled_reads_handed_back"] >= 1 and figures["origin_requests"] >= 1
    assert figures["compiled_reads_answered"] >= FILES // 2  # the other packs stayed compiled


def test_an_entry_without_sums_is_verified_whole_upgraded_then_compiled(
        source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mount_warm(mounts, source, cache)
    run_cli("umount", str(mnt))
    for entry in chunk_entries(cache):  # as an older daemon wrote them
        os.removexattr(entry, SUMS_XATTR)
    mnt = mounts.mount("ds", mnt, "--cache-dir", str(cache))
    read_shuffled(source, mnt, seed=4)
    figures = stats(mnt)
    assert figures["compiled_reads_handed_back"] >= 1 and figures["origin_requests"] == 0
    assert all(os.getxattr(entry, SUMS_XATTR) for entry in chunk_entries(cache))
    run_cli("umount", str(mnt))
    mnt = mounts.mount("ds", mnt, "--cache-dir", str(cache))
    read_shuffled(source, mnt, seed=5)
    figures = stats(mnt)
    assert figures["compiled_reads_answered"] == FILES
    assert figures["compiled_reads_handed_back"] == 0


LARGE_CHUNK = "1MiB"  # a 1 MiB READ of a large file is one piece, read around the page cache


@pytest.fixture
def large_source(tmp_path: Path) -> Path:
    """Large files in 1 MiB chunks: one random, one with chunks of zeros (never stored)."""
    rng = random.Random(11)
    src = tmp_path / "large"
    src.mkdir()
    (src / "shard.bin").write_bytes(rng.randbytes((5 << 20) + 12_345))
    (src / "sparse.bin").write_bytes(rng.randbytes(1 << 20) + bytes(2 << 20)
                                     + rng.randbytes(100_000))
    run_cli("init", "big", "--chunk-size", LARGE_CHUNK)
    run_cli("commit", "big", str(src), "-m", "v1")
    return src


def read_ranges(src: Path, mnt: Path, count: int, seed: int) -> None:
    """Random ranges of the large files, some across chunks, half of them with O_DIRECT (every
    READ reaches the daemon), each equal to the source's bytes."""
    rng = random.Random(seed)
    for _ in range(count):
        name = rng.choice(["shard.bin", "sparse.bin"])
        expected = (src / name).read_bytes()
        offset = rng.randrange(0, len(expected) + 10)
        length = rng.randrange(1, 3 << 20)
        direct = rng.random() < 0.5
        if direct:  # O_DIRECT wants aligned offsets (FUSE passes others on, but be plain)
            offset -= offset % 4096
        fd = os.open(mnt / name, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            assert os.pread(fd, length, offset) == expected[offset : offset + length], \
                f"{name} {offset}+{length} direct={direct}"
        finally:
            os.close(fd)


def mount_large_warm(mounts: MountSet, src: Path, cache: Path) -> Path:
    mnt = mounts.mount("big", mounts.mountpoint(), "--cache-dir", str(cache))
    for name in ("shard.bin", "sparse.bin"):
        assert digest(mnt / name) == digest(src / name)
    run_cli("umount", str(mnt))
    return mounts.mount("big", mnt, "--cache-dir", str(cache))


def test_large_files_stream_through_the_compiled_path_around_the_page_cache(
        large_source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mount_large_warm(mounts, large_source, cache)
    for name in ("shard.bin", "sparse.bin"):
        assert digest(mnt / name) == digest(large_source / name)
    whole = stats(mnt)
    assert whole["compiled_reads_answered"] >= 6  # 1 MiB READs: at least one per chunk
    assert whole["ssd_direct_reads"] >= 5  # shard.bin's whole chunks, not in the page cache
    assert whole["origin_requests"] == 0 and whole["compiled_reads_handed_back"] == 0
    read_ranges(large_source, mnt, 200, seed=12)
    ranges = stats(mnt)
    assert ranges["compiled_reads_answered"] > whole["compiled_reads_answered"]
    assert ranges["origin_requests"] == 0 and ranges["corrupt_chunks"] == 0
    assert ranges["memory_hits"] == 0  # nothing of it went through Python's tiers


def test_a_large_file_s_chunk_held_in_memory_is_left_to_python(
        large_source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mounts.mount("big", mounts.mountpoint(), "--cache-dir", str(cache))
    assert digest(mnt / "shard.bin") == digest(large_source / "shard.bin")  # from the origin
    cold = stats(mnt)
    assert cold["origin_requests"] >= 6
    fd = os.open(mnt / "shard.bin", os.O_RDONLY)
    try:  # drop the mount's pages of it: the kernel asks the daemon again
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert digest(mnt / "shard.bin") == digest(large_source / "shard.bin")
    again = stats(mnt)
    # Every chunk is in the memory tier now (and on the SSD): Python answers from memory.
    assert again["compiled_reads_left_to_memory"] >= 6
    assert again["memory_hits"] > cold["memory_hits"]
    assert again["compiled_reads_answered"] == cold["compiled_reads_answered"]
    assert again["origin_requests"] == cold["origin_requests"]


def test_a_flipped_byte_in_a_large_file_s_chunk_is_never_returned(
        large_source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mount_large_warm(mounts, large_source, cache)
    run_cli("umount", str(mnt))
    entry = max(chunk_entries(cache), key=lambda p: p.stat().st_size)  # a 1 MiB chunk
    data = bytearray(entry.read_bytes())
    data[len(data) // 3] ^= 0x40
    with open(entry, "r+b") as f:  # the same inode: its sums stay, and no longer match
        f.write(data)
    mnt = mounts.mount("big", mnt, "--cache-dir", str(cache))
    for name in ("shard.bin", "sparse.bin"):
        assert digest(mnt / name) == digest(large_source / name)
    figures = stats(mnt)
    assert figures["corrupt_chunks"] == 1
    assert figures["compiled_reads_handed_back"] >= 1 and figures["origin_requests"] >= 1
    read_ranges(large_source, mnt, 50, seed=13)
    assert stats(mnt)["corrupt_chunks"] == 1  # refetched whole, intact since


def test_read_threads_0_reads_every_file_in_python(source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mount_warm(mounts, source, cache, "--read-threads", "0")
    read_shuffled(source, mnt)
    figures = stats(mnt)
    assert figures["compiled_reads"] is False and figures["compiled_reads_answered"] == 0
    assert figures["ssd_hits"] >= FILES


def test_read_threads_out_of_range_is_a_clear_error(source: Path, mounts: MountSet) -> None:
    proc = run_cli("mount", "ds", str(mounts.mountpoint()), "--read-threads", "-1", check=False)
    assert proc.returncode != 0 and "--read-threads" in proc.stderr


READER = """
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
names = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
rng = random.Random(seed)
while True:  # O_DIRECT: every read reaches the daemon, cached pages or not
    fd = os.open(rng.choice(names), os.O_RDONLY | os.O_DIRECT)
    while os.read(fd, 1 << 16):
        pass
    os.close(fd)
"""


def test_killed_readers_and_an_unmount_mid_pass_leave_a_clean_daemon(
        source: Path, mounts: MountSet) -> None:
    cache = mounts.root / "cache"
    mnt = mount_warm(mounts, source, cache)
    [pid] = daemon_pids(mnt)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(mnt), str(seed)])
               for seed in range(6)]
    try:
        wait_for(lambda: stats(mnt)["compiled_reads_answered"] >= 2 * FILES, timeout=60,
                 what="the readers to go through the compiled path")
        for reader in readers[:3]:  # requests of theirs may be queued in the engine
            reader.send_signal(signal.SIGKILL)
        survivors = stats(mnt)["compiled_reads_answered"]
        wait_for(lambda: stats(mnt)["compiled_reads_answered"] >= survivors + FILES, timeout=60,
                 what="the other readers to go on")
        read_shuffled(source, mnt, seed=6)  # still right, beside them
        # Unmount with the other readers still reading: the daemon stops its threads and exits.
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=True, timeout=30)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), "the daemon did not exit after the unmount"
        assert not is_mounted(mnt)
    finally:
        for reader in readers:
            reader.kill()
            reader.wait(timeout=30)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300)), max_size=400))
def test_the_engine_s_inode_table_agrees_with_a_model(ops: list[tuple[bool, int]]) -> None:
    base = 1 << 40  # far from any inode another test registers in this process
    model: dict[int, tuple[tuple[tuple[str, int, int], ...], bool]] = {}
    try:
        for add, n in ops:
            ino = base + n
            if add:
                # one to three extents, a chunk of zeros ("") among them now and then
                extents = tuple(("" if (n + i) % 5 == 0 else f"{n + i:064x}", n * 3, n * 7 + i)
                                for i in range(1 + n % 3))
                compiled_reads.CompiledReads.add(ino, extents, large=n % 2 == 0)
                model[ino] = (extents, n % 2 == 0)
            else:
                compiled_reads.CompiledReads.remove(ino)
                model.pop(ino, None)
        for n in range(1, 301):
            assert compiled_reads.CompiledReads.lookup(base + n) == model.get(base + n)
    finally:
        for n in range(1, 301):
            compiled_reads.CompiledReads.remove(base + n)


def test_a_pack_is_written_through_the_page_cache_only_while_the_path_runs(
        tmp_path: Path) -> None:
    from cachefs.cache.disk import DiskCache
    from cachefs.cache.tiered import object_is_intact
    from cachefs.directio import cachestat

    def resident(key: str) -> int:
        fd = os.open(tmp_path / "cache" / "objects" / key, os.O_RDONLY)
        try:
            state = cachestat(fd, 0, 1 << 20)
        finally:
            os.close(fd)
        assert state is not None
        return state.nr_cache

    disk = DiskCache(tmp_path / "cache", 64 << 20, verify=object_is_intact)
    keys = [f"chunks/{n:02x}/{n:02x}{'0' * 62}" for n in (1, 2, 3)]
    data = os.urandom(1 << 20)
    reads = disk.compiled_reads(1)
    disk.put_pack(keys[0], data)  # not started: around the page cache, as put
    reads.start()
    try:
        disk.put_pack(keys[1], data)  # its files are read from the entry next: kept cached
        disk.put(keys[2], data)  # any other chunk: around the page cache
    finally:
        reads.stop()
        disk.close()
    assert resident(keys[1]) == 256
    if resident(keys[0]) or resident(keys[2]):
        assert not disk._direct, "O_DIRECT works here, yet the entries were cached"
