"""push / pull between any two remotes: only missing objects, bottom-up, verified, resumable, and
refs moved by compare-and-swap (fast-forward only, tags fixed, unless --force).

Real backends only: file:// directories under tmp_path and the moto S3 server (`s3_url`)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cachefs.dataset.checkout import checkout
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.objects import MIN_CHUNK_SIZE, Kind, decode_commit, decode_tree
from cachefs.dataset.repo import Repository, chunk_key, commit_key, tree_key
from cachefs.dataset.transfer import TransferResult, transfer_dataset
from cachefs.errors import (
    CorruptObject,
    DatasetNotFound,
    RefConflict,
    RemoteError,
    UsageError,
)
from cachefs.remotes.base import Remote
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.registry import open_remote_url
from tests.helpers import cli_json, run_cli, snapshot
from tests.oss_server import OSS_TEST_BUCKET, OSSServer
from tests.recording_remote import RecordingRemote
from tests.servers import MotoServer, wait_until

CHUNK = MIN_CHUNK_SIZE  # 64 KiB: many chunks from little data
OBJECT_PREFIXES = ("chunks/", "trees/", "commits/")


# -- helpers -------------------------------------------------------------------------------------
def write_tree(root: Path, seed: int, big_chunks: int = 5) -> None:
    """Small files (packed), a multi-chunk file, an empty file, a symlink, modes, nesting."""
    rnd = random.Random(seed)
    for d in range(3):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(8):
            (sub / f"f{f}.bin").write_bytes(rnd.randbytes(rnd.randint(1, 20_000)))
    (root / "big.bin").write_bytes(rnd.randbytes(CHUNK * big_chunks + 321))
    (root / "empty").touch()
    exe = root / "run.sh"
    exe.write_text(f"#!/bin/sh\necho {seed}\n")
    exe.chmod(0o755)
    if not (root / "link").is_symlink():
        os.symlink("dir0/nested/f0.bin", root / "link")


def object_keys(remote: Remote) -> set[str]:
    return {k for prefix in OBJECT_PREFIXES for k in remote.list(prefix)}


def assert_closed(repo: Repository) -> None:
    """Every tree and commit stored has everything it refers to stored too."""
    keys = object_keys(repo.remote)
    for key in keys:
        kind, _, name = key.split("/")
        if kind == "trees":
            tree = decode_tree(name, repo.remote.get(key))
            kids = {tree_key(e.hash) for e in tree.entries if e.kind is Kind.DIR}
            kids |= {chunk_key(x.chunk) for e in tree.entries if e.kind is Kind.FILE
                     for x in e.extents}
        elif kind == "commits":
            commit = decode_commit(name, repo.remote.get(key))
            kids = {tree_key(commit.tree), *(commit_key(p) for p in commit.parents)}
        else:
            continue
        assert kids <= keys, f"{key} is stored without {sorted(kids - keys)[:3]}"


def _counts(keys: set[str]) -> tuple[int, ...]:
    """(chunks, trees, commits) among keys."""
    return tuple(sum(k.startswith(p) for k in keys) for p in OBJECT_PREFIXES)


def checkout_matches(repo: Repository, ref: str, expected: dict, tmp_path: Path) -> None:
    out = tmp_path / f"out-{uuid.uuid4().hex[:8]}"
    checkout(repo, repo.resolve("ds", ref).commit, "", out)
    assert snapshot(out) == expected


class FlakyRemote(RecordingRemote):
    """A real remote that records calls and, after `fail_after` object puts, fails every put
    (a network that went away in the middle of a push)."""

    def __init__(self, inner: Remote, fail_after: int | None = None) -> None:
        super().__init__(inner)
        self.fail_after = fail_after
        self.object_puts = 0

    def put(self, key: str, data: bytes | memoryview) -> None:
        if key.startswith(OBJECT_PREFIXES):
            if self.fail_after is not None and self.object_puts >= self.fail_after:
                raise RemoteError(f"writing {key}: connection reset (test)")
            self.object_puts += 1
        super().put(key, data)


@pytest.fixture
def new_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """A fresh, empty remote URL of a kind: 'file', 's3' (moto) or 'oss' (the OSS-protocol
    server of tests/oss_server.py)."""
    count = iter(range(1000))

    def make(kind: str) -> str:
        if kind == "file":
            return f"file://{tmp_path}/repo-{next(count)}"
        if kind == "s3":
            moto: MotoServer = request.getfixturevalue("moto_server")
            bucket = f"cachefs-transfer-{uuid.uuid4().hex[:12]}"
            moto.create_bucket(bucket)
            return f"s3://{bucket}/p?endpoint_url={moto.endpoint}&region=us-east-1"
        if kind == "oss":
            request.getfixturevalue("oss_url")  # the server, and its credentials in the env
            oss: OSSServer = request.getfixturevalue("oss_server")
            return oss.url_for(OSS_TEST_BUCKET, f"t-{uuid.uuid4().hex[:16]}/transfer")
        raise ValueError(kind)

    return make


@pytest.fixture
def src_repo(tmp_path: Path) -> Repository:
    repo = Repository(LocalRemote(tmp_path / "src-repo"))
    repo.create_dataset("ds", chunk_size=CHUNK)
    return repo


# -- push/pull between backends, through the CLI ------------------------------------------------
@pytest.mark.parametrize("kinds", [("file", "s3"), ("file", "oss"), ("s3", "oss")],
                         ids=lambda k: "<->".join(k))
def test_push_and_pull_between_backends(kinds: tuple[str, str], new_url, tmp_path: Path) -> None:
    """push A -> B, then pull B -> C (C of A's kind): both directions of each pair."""
    a_url, b_url, c_url = new_url(kinds[0]), new_url(kinds[1]), new_url(kinds[0])
    a = Repository(open_remote_url(a_url))
    a.create_dataset("ds", chunk_size=CHUNK)
    src = tmp_path / "src"
    write_tree(src, 1)
    v1 = snapshot(src)
    commit_directory(a, "ds", "main", src, "v1")
    a.set_ref("ds", "tags", "v1", a.resolve("ds", "main").commit, "test")
    write_tree(src, 2)  # changes every file's content
    v2 = snapshot(src)
    commit_directory(a, "ds", "main", src, "v2")
    a.set_ref("ds", "heads", "dev", a.resolve("ds", "v1").commit, "test")

    pushed = cli_json("push", "ds", "--remote", a_url, "--to", b_url)
    assert pushed["created_dataset"] and pushed["refused"] == 0
    assert pushed["copied"]["objects"] == len(object_keys(a.remote))
    assert pushed["copied"]["commits"] == 2 and pushed["copied"]["chunks"] > 10
    assert {(r["kind"], r["name"], r["action"]) for r in pushed["refs"]} == {
        ("branch", "main", "created"), ("branch", "dev", "created"), ("tag", "v1", "created")}
    out = tmp_path / "out-main"
    run_cli("checkout", "ds@main", str(out), "--remote", b_url)
    assert snapshot(out) == v2
    b = Repository(open_remote_url(b_url))
    checkout_matches(b, "v1", v1, tmp_path)
    assert b.resolve("ds", "dev").commit == a.resolve("ds", "dev").commit

    again = run_cli("push", "ds", "--remote", a_url, "--to", b_url)
    assert "copied 0 objects" in again.stdout and "3 up to date, 0 refused" in again.stdout

    pulled = cli_json("pull", "ds", "--from", b_url, "--remote", c_url)
    assert (pulled["copied"]["objects"], pulled["copied"]["bytes"]) == (
        pushed["copied"]["objects"], pushed["copied"]["bytes"])
    c = Repository(open_remote_url(c_url))
    checkout_matches(c, "main", v2, tmp_path)
    checkout_matches(c, "v1", v1, tmp_path)
    assert c.refs.history("ds", "heads", "main")[0].reason == f"copied from {b.remote.url}"


# -- only what is missing ------------------------------------------------------------------------
def test_incremental_push_copies_only_new_objects(src_repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, 1)
    commit_directory(src_repo, "ds", "main", src, "v1")
    dst_remote = FlakyRemote(LocalRemote(tmp_path / "dst"))
    dst = Repository(dst_remote)
    first = transfer_dataset(src_repo, dst, "ds")
    assert first.objects == len(object_keys(src_repo.remote))

    before = object_keys(src_repo.remote)
    (src / "dir1" / "nested" / "f3.bin").write_bytes(os.urandom(5000))
    (src / "new.bin").write_bytes(os.urandom(CHUNK * 2))
    commit_directory(src_repo, "ds", "main", src, "v2")
    new = object_keys(src_repo.remote) - before
    dst_remote.calls.clear()

    class Bar:
        total = done = 0

        def start(self, total: int, unit: str, description: str) -> None:
            self.total = total

        def update(self, amount: int) -> None:
            self.done += amount

        def close(self) -> None:
            pass

    bar = Bar()
    second = transfer_dataset(src_repo, dst, "ds", progress=bar)
    copied = {k for op, k in dst_remote.calls if op == "put" and k.startswith(OBJECT_PREFIXES)}
    assert copied == new
    assert (second.chunks, second.trees, second.commits) == _counts(new)
    assert bar.total == bar.done == second.chunk_bytes
    assert [(r.name, r.action) for r in second.refs] == [("main", "fast-forward")]
    assert_closed(dst)


# -- interrupted and resumed ---------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["chunks", "trees"])
def test_interrupted_push_resumes_and_copies_only_the_rest(
        phase: str, src_repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, 7)
    expected = snapshot(src)
    commit_directory(src_repo, "ds", "main", src, "v1")
    total = object_keys(src_repo.remote)
    chunks = sum(k.startswith("chunks/") for k in total)
    fail_after = 4 if phase == "chunks" else chunks + 2
    flaky = FlakyRemote(LocalRemote(tmp_path / "dst"), fail_after=fail_after)
    dst = Repository(flaky)
    with pytest.raises(RemoteError, match="connection reset"):
        transfer_dataset(src_repo, dst, "ds", workers=2)
    present = object_keys(flaky.inner)
    assert 0 < len(present) < len(total)
    assert not list(flaky.inner.list("refs/"))  # no ref moved
    assert not list(flaky.inner.list("locks/"))  # the lock was released
    assert_closed(dst)  # only closed sets: every stored object has its closure

    flaky.fail_after = None
    flaky.calls.clear()
    result = transfer_dataset(src_repo, dst, "ds")
    copied = {k for op, k in flaky.calls if op == "put" and k.startswith(OBJECT_PREFIXES)}
    assert copied == total - present and result.objects == len(copied)
    checkout_matches(dst, "main", expected, tmp_path)


def test_push_killed_with_sigkill_resumes(src_repo: Repository, s3_url: str,
                                          tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_tree(src, 3, big_chunks=120)
    expected = snapshot(src)
    commit_directory(src_repo, "ds", "main", src, "v1")
    total = object_keys(src_repo.remote)
    dst = Repository(open_remote_url(s3_url))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachefs.cli.main", "push", "ds", "--remote",
         src_repo.remote.url, "--to", s3_url, "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    try:
        wait_until(lambda: proc.poll() is not None
                   or len(list(dst.remote.list("chunks/"))) >= 5, 60, "chunks in the bucket")
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        assert proc.stderr is not None
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr  # killed while copying, not finished
    present = object_keys(dst.remote)
    assert 5 <= len(present) < len(total)
    assert not list(dst.remote.list("refs/"))
    assert_closed(dst)

    result = transfer_dataset(src_repo, dst, "ds")  # its dead lock does not block a writer
    assert result.objects == len(total - present)
    assert object_keys(dst.remote) == total
    checkout_matches(dst, "main", expected, tmp_path)


# -- refs ----------------------------------------------------------------------------------------
@pytest.fixture
def diverged(src_repo: Repository, tmp_path: Path) -> tuple[Repository, Repository]:
    """src and dst share v1 on main, then each committed something else on main."""
    src = tmp_path / "src"
    write_tree(src, 1, big_chunks=1)
    commit_directory(src_repo, "ds", "main", src, "v1")
    dst = Repository(LocalRemote(tmp_path / "dst"))
    transfer_dataset(src_repo, dst, "ds")
    (src / "only-in-src").write_text("a")
    commit_directory(src_repo, "ds", "main", src, "src v2")
    other = tmp_path / "other"
    write_tree(other, 2, big_chunks=1)
    commit_directory(dst, "ds", "main", other, "dst v2")
    return src_repo, dst


def test_diverged_branch_is_refused_then_forced(diverged, tmp_path: Path) -> None:
    src, dst = diverged
    src.set_ref("ds", "tags", "v9", src.resolve("ds", "main").commit, "test")
    ours, theirs = src.resolve("ds", "main").commit, dst.resolve("ds", "main").commit
    proc = run_cli("push", "ds", "--remote", src.remote.url, "--to", dst.remote.url,
                   check=False)
    assert proc.returncode == RefConflict.exit_code
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    for word in ("'main'", "diverged", ours[:12], theirs[:12], "--force",
                 "other 1 refs were updated"):
        assert word in proc.stderr, word
    assert dst.resolve("ds", "main").commit == theirs  # not moved
    assert dst.resolve("ds", "v9").commit == ours  # the other refs were still updated
    assert "refused" in proc.stdout and "new tag" in proc.stdout

    forced = cli_json("push", "ds", "--remote", src.remote.url, "--to", dst.remote.url,
                      "--force")
    assert [(r["name"], r["action"], r["old"]) for r in forced["refs"]] == [
        ("main", "forced", theirs), ("v9", "unchanged", ours)]
    assert dst.resolve("ds", "main").commit == ours
    assert "forced" in dst.refs.history("ds", "heads", "main")[0].reason


def test_fast_forward_follows_every_parent_and_ahead_is_refused(diverged) -> None:
    src, dst = diverged
    s2, d2 = src.resolve("ds", "main").commit, dst.resolve("ds", "main").commit
    assert [r.action for r in transfer_dataset(src, dst, "ds").refs] == ["refused"]
    # Merge dst's work into src: pull its objects (its main is refused, diverged), then a merge
    # commit whose *second* parent is dst's head.
    assert [r.action for r in transfer_dataset(dst, src, "ds").refs] == ["refused"]
    merge, _ = src.put_meta(replace(src.get_commit(s2), parents=(s2, d2), message="merge"))
    src.refs.compare_and_swap("ds", "heads", "main", src.refs.read("ds", "heads", "main"),
                              merge, "merge")
    result = transfer_dataset(src, dst, "ds")
    assert [(r.name, r.action, r.old) for r in result.refs] == [("main", "fast-forward", d2)]
    # src moved back behind dst: dst is ahead, not a fast-forward
    src.refs.compare_and_swap("ds", "heads", "main", src.refs.read("ds", "heads", "main"),
                              s2, "rewind")
    refused = transfer_dataset(src, dst, "ds").refused
    assert len(refused) == 1 and "is ahead in" in refused[0].reason
    assert dst.resolve("ds", "main").commit == merge


def test_tag_conflict_and_kind_clash_are_refused(src_repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, 1, big_chunks=1)
    c1 = commit_directory(src_repo, "ds", "main", src, "v1").commit
    dst = Repository(LocalRemote(tmp_path / "dst"))
    transfer_dataset(src_repo, dst, "ds")
    (src / "x").write_text("x")
    c2 = commit_directory(src_repo, "ds", "main", src, "v2").commit
    src_repo.set_ref("ds", "tags", "v1", c2, "test")
    dst.set_ref("ds", "tags", "v1", c1, "test")
    src_repo.set_ref("ds", "heads", "exp", c1, "test")
    dst.set_ref("ds", "tags", "exp", c1, "test")
    dst.set_ref("ds", "heads", "mine", c1, "test")

    result = transfer_dataset(src_repo, dst, "ds")
    actions = {r.name: r.action for r in result.refs}
    assert actions == {"main": "fast-forward", "v1": "refused", "exp": "refused"}
    reasons = {r.name: r.reason for r in result.refused}
    assert "tags never move" in reasons["v1"] and "--force" in reasons["v1"]
    assert "a branch in" in reasons["exp"] and "but a tag in" in reasons["exp"]
    with pytest.raises(RefConflict, match="2 of 3 refs"):
        result.raise_if_refused()
    assert dst.resolve("ds", "v1").commit == c1

    forced = transfer_dataset(src_repo, dst, "ds", force=True)
    assert {r.name: r.action for r in forced.refs} == {
        "main": "unchanged", "v1": "forced", "exp": "refused"}  # --force never changes a kind
    assert dst.resolve("ds", "v1").commit == c2
    assert dst.refs.list("ds", "heads") == {"main": c2, "mine": c1}  # dst-only refs untouched


# -- refusals that copy nothing ------------------------------------------------------------------
@pytest.mark.parametrize("what", ["chunk", "tree"])
def test_corrupt_source_object_is_refused_and_not_propagated(
        what: str, src_repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, 1)
    commit_directory(src_repo, "ds", "main", src, "v1")
    victim = sorted(src_repo.remote.list(f"{what}s/"))[0]
    path = tmp_path / "src-repo" / victim
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    name = victim.rsplit("/", 1)[1]
    dst = Repository(LocalRemote(tmp_path / "dst"))
    with pytest.raises(CorruptObject, match=f"{what} {name} is corrupt") as err:
        transfer_dataset(src_repo, dst, "ds")
    assert err.value.object_name == name and "repair the source" in str(err.value)
    proc = run_cli("push", "ds", "--remote", src_repo.remote.url, "--to", dst.remote.url,
                   check=False)
    assert proc.returncode == CorruptObject.exit_code and name in proc.stderr
    assert victim not in object_keys(dst.remote)
    assert not list(dst.remote.list("refs/"))
    assert_closed(dst)


def test_other_chunk_size_in_destination_is_refused(src_repo: Repository, tmp_path: Path
                                                    ) -> None:
    src = tmp_path / "src"
    write_tree(src, 1, big_chunks=1)
    commit_directory(src_repo, "ds", "main", src, "v1")
    dst = Repository(LocalRemote(tmp_path / "dst"))
    dst.create_dataset("ds", chunk_size=CHUNK * 2)
    with pytest.raises(UsageError, match=r"chunk size 131072 in .* but 65536"):
        transfer_dataset(src_repo, dst, "ds")
    assert not object_keys(dst.remote) and not list(dst.remote.list("refs/"))


def test_cli_errors(src_repo: Repository, tmp_path: Path) -> None:
    dst_url = f"file://{tmp_path}/dst"
    proc = run_cli("push", "nope", "--remote", src_repo.remote.url, "--to", dst_url,
                   check=False)
    assert proc.returncode == DatasetNotFound.exit_code and "'nope' does not exist" in proc.stderr
    same = f"file://{tmp_path}/./src-repo/"
    proc = run_cli("pull", "ds", "--from", same, "--remote", src_repo.remote.url, check=False)
    assert proc.returncode == UsageError.exit_code and "same repository" in proc.stderr
    # an empty dataset: created in the destination, nothing else to do
    result = json.loads(run_cli("push", "ds", "--remote", src_repo.remote.url, "--to", dst_url,
                                "--json").stdout)
    assert result["created_dataset"] and result["refs"] == [] and result["copied"]["objects"] == 0


def test_result_counts_add_up() -> None:
    r = TransferResult("ds", "a", "b", chunks=2, trees=3, commits=1, chunk_bytes=10,
                       meta_bytes=5)
    assert (r.objects, r.bytes) == (6, 15)
    r.raise_if_refused()  # nothing refused: no error
