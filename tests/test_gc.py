"""gc and `datasets rm`: what is kept, what is removed, and safety against concurrent writers.

Every check runs on real remotes (a repository directory, and the moto S3 server for the CLI
path) and re-opens the repository before verifying, so no in-process cache hides a deletion.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cachefs.dataset.commit import commit_directory
from cachefs.dataset.gc import collect_garbage
from cachefs.dataset.locks import LOCK_PREFIX, LockInfo, RepositoryLock, live_locks
from cachefs.dataset.repo import Repository
from cachefs.dataset.verify import verify
from cachefs.errors import CorruptObject, RepositoryBusy
from cachefs.remotes.local import LocalRemote
from cachefs.remotes.registry import open_remote_url
from tests.helpers import PausingProgress, cli_json, run_cli
from tests.recording_remote import RecordingRemote

CHUNK = 64 * 1024
WAIT_S = 30.0


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)  # no two chunks alike


def fresh(repo: Repository) -> Repository:
    return Repository(LocalRemote(repo.remote.root))  # type: ignore[attr-defined]


def object_keys(repo: Repository) -> set[str]:
    return {k for prefix in ("chunks/", "trees/", "commits/") for k in repo.remote.list(prefix)}


def assert_intact(repo: Repository, dataset: str) -> None:
    """Every version every ref of `dataset` reaches, history included, is complete and valid."""
    repo = fresh(repo)
    for kind in ("heads", "tags"):
        for name, commit in repo.refs.list(dataset, kind).items():
            report = verify(repo, commit)
            assert report.ok, f"{dataset} {kind}/{name}: {report.problems}"


def quick_lock(remote: object, kind: str, **kw: float) -> RepositoryLock:
    return RepositoryLock(remote, kind, poll_s=0.02, **kw)  # type: ignore[arg-type]


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = Repository(LocalRemote(tmp_path / "repo"))
    r.create_dataset("keep", CHUNK)
    r.create_dataset("drop", CHUNK)
    return r


def commit(repo: Repository, dataset: str, src: Path, branch: str = "main") -> str:
    return commit_directory(repo, dataset, branch, src, f"commit of {src.name}").commit


def test_gc_keeps_everything_reachable_and_removes_a_deleted_dataset(
        repo: Repository, tmp_path: Path) -> None:
    shared = blob(1, 3 * CHUNK)
    keep = write_tree(tmp_path / "k1", {"shared.bin": shared, "a/small": b"keep-small"})
    drop = write_tree(tmp_path / "d1", {"shared.bin": shared, "big.bin": blob(2, 5 * CHUNK),
                                        "x/y/small": b"drop-small"})
    first = commit(repo, "keep", keep)
    (keep / "a" / "small").write_bytes(b"keep-small, second version")
    commit(repo, "keep", keep)
    commit(repo, "drop", drop)
    before = object_keys(repo)

    dry = collect_garbage(fresh(repo), grace_s=0, dry_run=True)
    assert dry.garbage_objects == 0 and object_keys(repo) == before

    removed = fresh(repo).delete_dataset("drop")
    assert set(removed) == {"heads/main"}
    # The reflog still reaches the deleted branch's commit within the grace period.
    kept = collect_garbage(fresh(repo), grace_s=3600)
    assert kept.garbage_objects == 0 and object_keys(repo) == before

    dry = collect_garbage(fresh(repo), grace_s=0, dry_run=True)
    assert object_keys(repo) == before
    result = collect_garbage(fresh(repo), grace_s=0)
    assert result.garbage_objects == dry.garbage_objects > 0
    after = object_keys(repo)
    assert after == before - {k for k in before if k not in after}
    assert len(before) - len(after) == result.garbage_objects
    # big.bin's 5 chunks, the drop commit and its 3 trees went; shared.bin's chunks stayed.
    assert result.garbage["chunks"].objects == 6  # big.bin's 5 and the small-file pack
    assert result.garbage["commits"].objects == 1
    assert_intact(repo, "keep")
    assert verify(fresh(repo), first).ok  # history of a live branch is live
    assert "drop" not in fresh(repo).datasets()


def test_gc_reflog_restores_a_deleted_branch_until_the_grace_period(
        repo: Repository, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "s", {"f": blob(3, 2 * CHUNK)})
    commit(repo, "keep", src)
    repo.set_ref("keep", "heads", "exp", repo.resolve("keep", "main").commit, "test")
    (src / "f").write_bytes(blob(4, 2 * CHUNK))
    exp_commit = commit(repo, "keep", src, branch="exp")
    repo.delete_ref("keep", "heads", "exp")

    assert collect_garbage(fresh(repo), grace_s=3600).garbage_objects == 0
    # Within the grace period the branch can be brought back from the reflog.
    history = fresh(repo).refs.history("keep", "heads", "exp")
    assert history[0].commit is None and history[0].previous == exp_commit
    fresh(repo).set_ref("keep", "heads", "exp", exp_commit, "restored")
    assert collect_garbage(fresh(repo), grace_s=0).garbage_objects == 0
    assert_intact(repo, "keep")

    fresh(repo).delete_ref("keep", "heads", "exp")
    result = collect_garbage(fresh(repo), grace_s=0)
    assert result.garbage["commits"].objects == 1 and result.garbage["chunks"].objects == 2
    assert result.ref_generations_pruned >= 1
    # Each ref keeps its newest generation; the live branch still resolves.
    assert len(fresh(repo).refs.history("keep", "heads", "exp")) == 1
    assert_intact(repo, "keep")


def test_gc_keeps_recent_unreferenced_objects_and_their_closure(
        repo: Repository, tmp_path: Path) -> None:
    """An interrupted commit's objects survive gc within the grace period (for a retry)."""
    src = write_tree(tmp_path / "s", {"one": blob(5, 2 * CHUNK), "sub/two": b"two"})
    name = commit(repo, "drop", src)
    repo.delete_ref("drop", "heads", "main")
    tree = fresh(repo).get_commit(name).tree
    # Age everything except the root tree: the tree is recent, so what it reaches stays.
    old = time.time() - 7200
    for key in object_keys(repo):
        if not key.endswith(tree):
            os.utime(repo.remote.root / key, (old, old))  # type: ignore[attr-defined]
    for gen in (repo.remote.root / "refs").rglob("0*"):  # type: ignore[attr-defined]
        os.utime(gen, (old, old))
    result = collect_garbage(fresh(repo), grace_s=3600)
    assert result.garbage_objects == 1  # only the commit, which is old and unreferenced
    assert result.kept_recent == 5  # the recent root tree, its subtree and their 3 chunks
    for key in object_keys(fresh(repo)):
        assert not key.startswith("commits/")
    # The surviving tree is still complete.
    survivor = fresh(repo)
    for _, entry in survivor.walk(tree):
        for x in entry.extents:
            survivor.get_chunk(x.chunk)


def test_gc_deletes_from_the_top_down(repo: Repository, tmp_path: Path) -> None:
    """Commits first, then trees parents-before-children, chunks last: an interrupted gc never
    leaves a stored tree whose children are gone."""
    src = write_tree(tmp_path / "s", {"a/b/c/deep": blob(6, CHUNK + 5), "top": b"top"})
    name = commit(repo, "drop", src)
    pairs = tree_edges(fresh(repo), name)
    repo.delete_dataset("drop")
    recording = RecordingRemote(LocalRemote(repo.remote.root))  # type: ignore[attr-defined]
    collect_garbage(Repository(recording), grace_s=0)
    deleted = [k for op, k in recording.calls if op == "delete"
               and k.split("/")[0] in ("commits", "trees", "chunks")]
    kinds = [k.split("/")[0] for k in deleted]
    assert kinds == sorted(kinds, key=("commits", "trees", "chunks").index)
    positions = {k.rsplit("/", 1)[1]: i for i, k in enumerate(deleted)}
    for parent, child in pairs:
        assert positions[parent] < positions[child], "a child tree was deleted before its parent"


def tree_edges(repo: Repository, commit_name: str) -> list[tuple[str, str]]:
    """(parent tree, child tree) pairs of a commit."""
    pairs = []
    stack = [repo.get_commit(commit_name).tree]
    while stack:
        tree = stack.pop()
        for entry in repo.get_tree(tree).entries:
            if entry.is_dir:
                pairs.append((tree, entry.hash))
                stack.append(entry.hash)
    assert len(pairs) == 3
    return pairs


def test_gc_refuses_to_delete_when_a_live_tree_is_corrupt(
        repo: Repository, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "s", {"sub/f": b"data"})
    name = commit(repo, "keep", src)
    commit(repo, "drop", write_tree(tmp_path / "d", {"g": blob(7, CHUNK)}))
    repo.delete_dataset("drop")
    tree = fresh(repo).get_commit(name).tree
    path = repo.remote.root / "trees" / tree[:2] / tree  # type: ignore[attr-defined]
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    before = object_keys(repo)
    with pytest.raises(CorruptObject, match="nothing more deleted"):
        collect_garbage(fresh(repo), grace_s=0)
    assert object_keys(repo) == before
    assert not list(repo.remote.list(LOCK_PREFIX))  # the lock was released


# -- concurrency -----------------------------------------------------------------------------


def reuse_scenario(repo: Repository, tmp_path: Path) -> tuple[Path, bytes]:
    """A deleted dataset's content, about to be committed again by another dataset: the new
    commit finds the chunks stored and reuses them instead of uploading."""
    content = blob(8, 3 * CHUNK)
    commit(repo, "drop", write_tree(tmp_path / "d", {"data.bin": content}))
    repo.delete_dataset("drop")
    return write_tree(tmp_path / "k", {"renamed.bin": content}), content


def test_commit_during_the_mark_phase_is_not_lost(repo: Repository, tmp_path: Path) -> None:
    src, _ = reuse_scenario(repo, tmp_path)

    def commit_then_lock() -> RepositoryLock:
        # Runs after the first (unlocked) mark, which found the chunks unreachable.
        result = commit_directory(fresh(repo), "keep", "main", src, "reuses the chunks")
        assert result.new_bytes == 0  # reused, not uploaded
        return quick_lock(repo.remote, "gc")

    collect_garbage(fresh(repo), grace_s=0, lock_factory=commit_then_lock)
    assert_intact(repo, "keep")


def test_gc_waits_for_a_running_writer(repo: Repository, tmp_path: Path) -> None:
    src, _ = reuse_scenario(repo, tmp_path)
    progress = PausingProgress()
    outcome: dict[str, object] = {}

    def run_commit() -> None:
        try:
            outcome["commit"] = commit_directory(fresh(repo), "keep", "main", src, "reuse",
                                                 progress=progress)
        except Exception as e:
            outcome["commit"] = e

    gc_waiting = threading.Event()

    def run_gc() -> None:
        lock = lambda: quick_lock(repo.remote, "gc", on_wait=lambda _: gc_waiting.set())  # noqa: E731
        try:
            outcome["gc"] = collect_garbage(fresh(repo), grace_s=0, lock_factory=lock)
        except Exception as e:
            outcome["gc"] = e

    writer = threading.Thread(target=run_commit)
    collector = threading.Thread(target=run_gc)
    writer.start()
    try:
        assert progress.paused.wait(WAIT_S), "the commit did not start"
        collector.start()  # its first mark finds the chunks unreachable, then it waits
        assert gc_waiting.wait(WAIT_S), "gc did not wait for the writer"
    finally:
        progress.resume.set()  # the writer reuses the chunks, moves its branch, unlocks
        writer.join(WAIT_S)
        collector.join(WAIT_S)
    assert not writer.is_alive() and not collector.is_alive()
    assert getattr(outcome["commit"], "new_bytes", None) == 0, outcome  # reused, not uploaded
    assert not isinstance(outcome["gc"], Exception), outcome
    assert_intact(repo, "keep")


def test_writer_waits_for_gc_and_gc_rivals_are_refused(repo: Repository) -> None:
    gc_lock = quick_lock(repo.remote, "gc").acquire()
    try:
        with pytest.raises(RepositoryBusy, match="gc is already running"):
            quick_lock(repo.remote, "gc").acquire()
        with pytest.raises(RepositoryBusy, match="gc lock held by"):
            quick_lock(repo.remote, "writer", wait_s=0.2).acquire()
        waited: list[LockInfo] = []
        acquired = threading.Event()

        def writer() -> None:
            with quick_lock(repo.remote, "writer", on_wait=waited.append):
                acquired.set()

        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + WAIT_S
        while not waited and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waited and waited[0].kind == "gc" and not acquired.is_set()
    finally:
        gc_lock.release()
    thread.join(WAIT_S)
    assert acquired.is_set()
    assert not list(repo.remote.list(LOCK_PREFIX))


def test_stale_lock_of_a_killed_writer_is_ignored(repo: Repository, tmp_path: Path) -> None:
    """kill -9 of a committing process leaves its lock; once stale, gc goes ahead."""
    src = write_tree(tmp_path / "big", {f"f{i:03d}": blob(100 + i, CHUNK) for i in range(400)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachefs.cli.main", "commit", "keep", str(src), "-m", "killed",
         "--remote", repo.remote.url, "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + WAIT_S
        while not (list(repo.remote.list(LOCK_PREFIX)) and list(repo.remote.list("chunks/"))):
            assert proc.poll() is None, "the commit finished before it could be killed"
            assert time.monotonic() < deadline, "the commit never started writing"
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.kill()
        proc.wait(WAIT_S)
    (lock,) = live_locks(repo.remote)
    assert lock.kind == "writer"
    with pytest.raises(RepositoryBusy):
        collect_garbage(fresh(repo), grace_s=0, lock_factory=lambda: quick_lock(
            repo.remote, "gc", wait_s=0.2))
    old = time.time() - 3600
    os.utime(repo.remote.root / lock.key, (old, old))  # type: ignore[attr-defined]
    assert live_locks(repo.remote) == []
    result = collect_garbage(fresh(repo), grace_s=0)
    assert result.garbage["chunks"].objects > 0  # the killed commit's orphans
    assert not list(repo.remote.list("chunks/"))


def test_gc_under_concurrent_commits_loses_nothing(tmp_path: Path) -> None:
    """Real processes: commits that keep reusing content of deleted versions, racing gc."""
    url = "file://" + str(tmp_path / "repo")
    run_cli("init", "keep", "--chunk-size", "64KiB", "--remote", url)
    src = tmp_path / "src"
    script = f"""
import sys
from pathlib import Path
from cachefs.cli.main import main
src = Path({str(src)!r})
for i in range(8):
    # Alternate between two contents so each commit re-adds chunks the previous one dropped.
    for n in range(6):
        (src / f"f{{n}}").parent.mkdir(parents=True, exist_ok=True)
        (src / f"f{{n}}").write_bytes(bytes([i % 2, n]) * {CHUNK})
    rc = main(["commit", "keep", str(src), "-m", f"round {{i}}", "--remote", {url!r}])
    assert rc == 0, rc
    main(["branch", "keep", f"b{{i}}", "--remote", {url!r}])
    if i % 2:
        main(["branch", "keep", "-d", f"b{{i - 1}}", "--remote", {url!r}])
"""
    committer = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE,
                                 text=True)
    try:
        gcs = 0
        while committer.poll() is None or gcs == 0:
            run_cli("gc", "--grace", "0", "--remote", url)
            gcs += 1
        _, err = committer.communicate(timeout=WAIT_S)
        assert committer.returncode == 0, err
    finally:
        committer.kill()
        committer.wait(WAIT_S)
    run_cli("gc", "--grace", "0", "--remote", url)
    repo = Repository(open_remote_url(url))
    for kind in ("heads", "tags"):
        for name, commit_name in repo.refs.list("keep", kind).items():
            assert verify(repo, commit_name).ok, name
    out = tmp_path / "out"
    run_cli("checkout", "keep", str(out), "--remote", url)
    assert (out / "f0").read_bytes() == bytes([1, 0]) * CHUNK


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_datasets_rm_and_gc_on_s3(s3_url: str, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "s", {"a": blob(9, 2 * CHUNK), "b/c": b"small"})
    run_cli("init", "scratch", "--chunk-size", "64KiB", "--remote", s3_url)
    run_cli("commit", "scratch", str(src), "-m", "one", "--remote", s3_url)
    run_cli("tag", "scratch", "v1", "--remote", s3_url)
    removed = cli_json("datasets", "rm", "scratch", "--remote", s3_url)
    assert set(removed["removed_refs"]) == {"heads/main", "tags/v1"}
    assert cli_json("datasets", "--remote", s3_url) == []
    missing = run_cli("log", "scratch", "--remote", s3_url, check=False)
    assert missing.returncode == 3 and "does not exist" in missing.stderr

    dry = cli_json("gc", "--grace", "1h", "--dry-run", "--remote", s3_url)
    assert dry["garbage_objects"] == 0  # the reflog still reaches it
    dry = cli_json("gc", "--grace", "0", "--dry-run", "--remote", s3_url)
    assert dry["dry_run"] and dry["garbage"]["chunks"]["objects"] == 3
    done = cli_json("gc", "--grace", "0", "--remote", s3_url)
    assert done["garbage_objects"] == dry["garbage_objects"]
    assert done["garbage_bytes"] == dry["garbage_bytes"] > 2 * CHUNK
    again = run_cli("gc", "--grace", "0", "--remote", s3_url).stdout
    assert "removed 0 objects" in again
    remote = open_remote_url(s3_url)
    assert [k for k in remote.list("") if k.split("/")[0] in ("chunks", "trees", "commits",
                                                              "locks")] == []


def test_cli_gc_bad_input(tmp_path: Path) -> None:
    bad = run_cli("gc", "--grace", "soon", check=False)
    assert bad.returncode == 2 and "invalid duration 'soon'" in bad.stderr
    bad = run_cli("gc", "--grace", "-5m", check=False)
    assert bad.returncode == 2
    absent = run_cli("datasets", "rm", "nope", check=False)
    assert absent.returncode == 3 and "does not exist" in absent.stderr
