"""Versioning semantics: unchanged files are not re-read, only new bytes are uploaded, diffs skip
identical subtrees, the racily-clean rule, and data made durable before the branch moves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cachefs.dataset.commit import commit_directory
from cachefs.dataset.diff import diff_commits
from cachefs.dataset.objects import MIN_CHUNK_SIZE
from cachefs.dataset.repo import Repository
from cachefs.dataset.scanindex import RACY_WINDOW_NS, ScanIndex, ScanRecord, is_racy
from cachefs.remotes.local import LocalRemote
from tests.helpers import wait_until_not_racy
from tests.recording_remote import RecordingRemote


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Repository, RecordingRemote]:
    remote = RecordingRemote(LocalRemote(tmp_path / "repo"))
    repo = Repository(remote)
    repo.create_dataset("ds", chunk_size=MIN_CHUNK_SIZE)
    return repo, remote


def make_dataset(root: Path, dirs: int = 20, files: int = 10, size: int = 3000) -> None:
    for d in range(dirs):
        sub = root / f"d{d:02d}"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub / f"f{f:02d}").write_bytes(os.urandom(size))


def test_recommit_reads_and_uploads_only_the_change(recorded, tmp_path: Path) -> None:
    repo, _ = recorded
    src = tmp_path / "src"
    make_dataset(src)
    wait_until_not_racy(src)
    first = commit_directory(repo, "ds", "main", src, "v1")
    assert first.read_bytes == first.bytes and first.reused_files == 0

    changed = [src / "d03" / "f01", src / "d07" / "f09"]
    for path in changed:
        path.write_bytes(os.urandom(3000))
    second = commit_directory(repo, "ds", "main", src, "v2")
    changed_bytes = sum(p.stat().st_size for p in changed)
    assert second.read_bytes == changed_bytes  # the other 198 files were not opened
    assert second.reused_files == 198
    assert second.new_bytes == changed_bytes
    assert second.parent == first.commit
    assert [d.path for d in diff_commits(repo, first.commit, second.commit)] == [
        "d03/f01", "d07/f09"]


def test_renamed_and_copied_content_reuses_extents(recorded, tmp_path: Path) -> None:
    repo, _ = recorded
    src = tmp_path / "src"
    make_dataset(src, dirs=2, files=5, size=20_000)
    first = commit_directory(repo, "ds", "main", src, "v1")
    (src / "d00" / "f00").rename(src / "renamed")
    shutil.copy(src / "d01" / "f01", src / "copy")
    big = src / "big"
    big.write_bytes(os.urandom(MIN_CHUNK_SIZE * 3 + 5))
    second = commit_directory(repo, "ds", "main", src, "v2")
    assert second.new_bytes == big.stat().st_size  # rename and copy upload nothing
    shutil.copy(big, src / "big_copy")
    third = commit_directory(repo, "ds", "main", src, "v3")
    assert third.new_bytes == 0
    changes = {(d.path, d.change) for d in diff_commits(repo, first.commit, third.commit)}
    assert changes == {("d00/f00", "removed"), ("renamed", "added"), ("copy", "added"),
                       ("big", "added"), ("big_copy", "added")}


def test_reuse_works_without_the_local_scan_index(recorded, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit from another machine (no scan index) still uploads only new content."""
    repo, _ = recorded
    src = tmp_path / "src"
    make_dataset(src, dirs=3, files=4)
    commit_directory(repo, "ds", "main", src, "v1")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "other-machine-state"))
    (src / "new").write_bytes(os.urandom(777))
    result = commit_directory(repo, "ds", "main", src, "v2")
    assert result.reused_files == 0 and result.read_bytes == result.bytes
    assert result.new_bytes == 777


def test_diff_skips_identical_subtrees(recorded, tmp_path: Path) -> None:
    repo, remote = recorded
    src = tmp_path / "src"
    make_dataset(src, dirs=40, files=3, size=100)
    first = commit_directory(repo, "ds", "main", src, "v1")
    (src / "d17" / "f01").write_bytes(b"changed")
    second = commit_directory(repo, "ds", "main", src, "v2")
    fresh = Repository(remote)  # no in-process tree cache
    remote.calls.clear()
    changes = list(diff_commits(fresh, first.commit, second.commit))
    assert [(c.path, c.change) for c in changes] == [("d17/f01", "modified")]
    assert remote.count("get", "trees/") == 4  # two roots and the two d17s, not 82 trees


def test_data_is_flushed_before_the_branch_moves(recorded, tmp_path: Path) -> None:
    repo, remote = recorded
    src = tmp_path / "src"
    make_dataset(src, dirs=2, files=2)
    remote.calls.clear()
    commit_directory(repo, "ds", "main", src, "v1")
    ops = [(op, key) for op, key in remote.calls if op in ("put", "flush", "put_if_absent")]
    ref_write = next(i for i, (op, key) in enumerate(ops)
                     if op == "put_if_absent" and key.startswith("refs/"))
    flush = ops.index(("flush", ""))
    last_object_put = max(i for i, (op, key) in enumerate(ops) if op == "put")
    assert last_object_put < flush < ref_write


def test_racy_rule() -> None:
    start = 10 * 10**9
    assert is_racy(start - RACY_WINDOW_NS // 2, 0, start)  # modified within the second
    assert is_racy(0, start + 5, start)  # changed (ctime) after the scan began
    assert not is_racy(start - 2 * RACY_WINDOW_NS, start - 2 * RACY_WINDOW_NS, start)


def test_racily_clean_record_is_never_trusted(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    st = path.stat()
    record = ScanRecord(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, "0" * 64, (),
                        racy=False)
    index = ScanIndex("c" * 64, 0, {"f": record})
    assert index.lookup("f", st) == record
    index.records["f"] = ScanRecord(*[getattr(record, f) for f in
                                      ("size", "mtime_ns", "ctime_ns", "inode",
                                       "content_hash", "extents")], racy=True)
    assert index.lookup("f", st) is None


def test_file_changed_in_the_same_second_is_committed(recorded, tmp_path: Path) -> None:
    repo, _ = recorded
    src = tmp_path / "src"
    src.mkdir()
    target = src / "labels.csv"
    target.write_text("a,1\n")
    first = commit_directory(repo, "ds", "main", src, "v1")
    st = target.stat()
    index = ScanIndex.load(ScanIndex.path_for(repo.remote.url, "ds", src.absolute()))
    assert index is not None and index.records["labels.csv"].racy
    # Same size, same mtime: only the racily-clean rule (and ctime) can notice the change.
    target.write_text("a,2\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = commit_directory(repo, "ds", "main", src, "v2")
    assert second.commit != first.commit
    entry = repo.find(second.commit, "labels.csv")
    data = b"".join(repo.get_chunk(x.chunk)[x.offset : x.offset + x.length]
                    for x in entry.extents)
    assert data == b"a,2\n"


def test_unchanged_directory_makes_no_new_commit(recorded, tmp_path: Path) -> None:
    repo, _ = recorded
    src = tmp_path / "src"
    make_dataset(src, dirs=1, files=2)
    first = commit_directory(repo, "ds", "main", src, "v1")
    again = commit_directory(repo, "ds", "main", src, "v1 again")
    assert again.unchanged and again.commit == first.commit
    forced = commit_directory(repo, "ds", "main", src, "forced", allow_empty=True)
    assert forced.commit != first.commit and forced.new_bytes == 0
