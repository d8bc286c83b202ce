"""A writer whose lock lapsed (removed, or not refreshed for too long) never moves a ref.

gc ignores a writer lock that was not rewritten for `stale_s` and may then delete objects the
writer reused; the writer must notice before its ref moves, fail with LockLost (exit 12) and
leave the ref where it was. Checked on real remotes (a repository directory and the moto S3
server), through commit and push, and with a remote whose lock rewrites really fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.dataset.commit import commit_directory
from cachefs.dataset.locks import FRESH_FRACTION, LOCK_PREFIX, RepositoryLock
from cachefs.dataset.refs import GenerationRefStore, RefValue
from cachefs.dataset.repo import Repository
from cachefs.dataset.transfer import transfer_dataset
from cachefs.errors import LockLost, RemoteError, RepositoryBusy
from cachefs.remotes.base import Remote
from cachefs.remotes.registry import open_remote_url
from tests.helpers import PausingProgress
from tests.recording_remote import RecordingRemote
from tests.servers import wait_until

WAIT_S = 30.0
C1, C2 = "1" * 64, "2" * 64


class FailingLockWrites(RecordingRemote):
    """A real remote whose lock writes fail once `failing` is set (a refresh that cannot get
    through: the store unreachable for this writer, expired credentials)."""

    def __init__(self, inner: Remote) -> None:
        super().__init__(inner)
        self.failing = False
        self.failed = 0

    def put(self, key: str, data: bytes | memoryview) -> None:
        if self.failing and key.startswith(LOCK_PREFIX):
            self.failed += 1
            raise RemoteError(f"writing {key} to {self.url}: connection refused")
        super().put(key, data)


@pytest.fixture(params=["file", "s3"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return "file://" + str(tmp_path / "repo")
    return str(request.getfixturevalue("s3_url"))


@pytest.fixture
def remotes(url: str) -> Iterator[tuple[Remote, Remote]]:
    """Two connections to one repository: the writer's, and an outsider's (gc, an admin)."""
    writer, outsider = open_remote_url(url), open_remote_url(url)
    try:
        yield writer, outsider
    finally:
        writer.close()
        outsider.close()


def source(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "file").write_text(text * 1000)
    return root


def run_paused(work: object, progress: PausingProgress, while_paused: object) -> object:
    """Run `work()` in a thread, do `while_paused()` once it holds its lock, return what
    `work` returned or raised."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["result"] = work()  # type: ignore[operator]
        except Exception as e:
            outcome["result"] = e

    thread = threading.Thread(target=target)
    thread.start()
    try:
        assert progress.paused.wait(WAIT_S), "the writer never took its lock"
        while_paused()  # type: ignore[operator]
    finally:
        progress.resume.set()
        thread.join(WAIT_S)
    assert not thread.is_alive()
    return outcome["result"]


def remove_locks(remote: Remote) -> None:
    keys = list(remote.list(LOCK_PREFIX))
    assert len(keys) == 1 and "writer-" in keys[0]
    remote.delete(keys[0])


def test_commit_whose_lock_was_removed_moves_no_ref(remotes: tuple[Remote, Remote],
                                                    tmp_path: Path) -> None:
    writer, outsider = remotes
    repo = Repository(writer)
    repo.create_dataset("ds")
    first = commit_directory(repo, "ds", "main", source(tmp_path / "one", "one"), "one").commit
    progress = PausingProgress()
    outcome = run_paused(
        lambda: commit_directory(repo, "ds", "main", source(tmp_path / "two", "two"), "two",
                                 progress=progress),
        progress, lambda: remove_locks(outsider))
    assert isinstance(outcome, LockLost), outcome
    assert isinstance(outcome, RepositoryBusy) and outcome.exit_code == 12
    assert "lock object was removed" in str(outcome) and "not moved" in str(outcome)
    assert Repository(outsider).refs.read("ds", "heads", "main") == RefValue(first, 1)
    assert list(outsider.list(LOCK_PREFIX)) == []


def test_push_whose_lock_was_removed_moves_no_ref(remotes: tuple[Remote, Remote],
                                                  tmp_path: Path) -> None:
    writer, outsider = remotes
    src = Repository(open_remote_url("file://" + str(tmp_path / "src")))
    src.create_dataset("ds")
    commit_directory(src, "ds", "main", source(tmp_path / "one", "one"), "one")
    progress = PausingProgress()
    outcome = run_paused(
        lambda: transfer_dataset(src, Repository(writer), "ds", progress=progress),
        progress, lambda: remove_locks(outsider))
    assert isinstance(outcome, LockLost), outcome
    assert Repository(outsider).refs.read("ds", "heads", "main") == RefValue(None, 0)


def test_a_writer_whose_refreshes_fail_stops_before_the_ref_moves(tmp_path: Path) -> None:
    remote = FailingLockWrites(open_remote_url("file://" + str(tmp_path / "repo")))
    refs = GenerationRefStore(remote)
    refs.compare_and_swap("ds", "heads", "main", RefValue(None, 0), C1, "before the lock")
    lock = RepositoryLock(remote, "writer", refresh_s=0.02, stale_s=0.5, poll_s=0.02)
    with lock:
        moved = refs.compare_and_swap("ds", "heads", "main", RefValue(C1, 1), C2, "fresh")
        assert moved == RefValue(C2, 2)  # a fresh lock lets refs move
        remote.failing = True
        failing_since = time.monotonic()
        # Refreshes keep failing until gc could be close to calling the lock stale.
        wait_until(lambda: remote.failed >= 3
                   and time.monotonic() - failing_since > 0.5 * FRESH_FRACTION,
                   WAIT_S, "failed lock refreshes")
        with pytest.raises(LockLost, match=r"not refreshed for .*connection refused"):
            refs.compare_and_swap("ds", "heads", "main", moved, C1, "stale writer")
        remote.failing = False  # refreshing again does not make a lapsed lock good
        with pytest.raises(LockLost):
            refs.compare_and_swap("ds", "heads", "main", moved, C1, "stale writer")
    assert refs.read("ds", "heads", "main") == RefValue(C2, 2)
    assert list(remote.list(LOCK_PREFIX)) == []
    # Released, the lock guards nothing any more: a ref moves through the same remote.
    refs.compare_and_swap("ds", "heads", "main", RefValue(C2, 2), C1, "after the lock")


def test_the_refresher_does_not_recreate_a_removed_lock(tmp_path: Path) -> None:
    remote = RecordingRemote(open_remote_url("file://" + str(tmp_path / "repo")))
    with RepositoryLock(remote, "writer", refresh_s=0.02, poll_s=0.02) as lock:

        def noticed() -> bool:
            if lock.lost is not None:
                return True
            # (Again, if a round that had already seen it rewrote it: removal races a round.)
            remote.inner.delete(lock.key)
            return False

        wait_until(noticed, WAIT_S, "the refresher to notice the removal")
        assert "removed" in (lock.lost or "")
        assert list(remote.list(LOCK_PREFIX)) == []  # not written back
        with pytest.raises(LockLost, match="removed"):
            lock.check_held()
