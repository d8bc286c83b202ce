"""Branches and tags: naming rules, resolution, compare-and-swap under real concurrent commits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cachefs.dataset.commit import commit_directory
from cachefs.dataset.repo import Repository
from cachefs.errors import (
    AlreadyExists,
    InvalidName,
    RefConflict,
    RefNotFound,
    UsageError,
)
from tests.helpers import local_repo


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    r = local_repo(tmp_path / "repo")
    r.create_dataset("ds")
    return r


def commit_text(repo: Repository, tmp_path: Path, text: str, branch: str = "main") -> str:
    src = tmp_path / f"src-{text}"
    src.mkdir()
    (src / "file").write_text(text)
    return commit_directory(repo, "ds", branch, src, text).commit


def test_branches_tags_and_resolution(repo: Repository, tmp_path: Path) -> None:
    c1 = commit_text(repo, tmp_path, "one")
    repo.set_ref("ds", "tags", "v1", c1, "test")
    repo.set_ref("ds", "heads", "dev", c1, "test")
    c2 = commit_text(repo, tmp_path, "two", branch="dev")
    assert repo.resolve("ds", "main").commit == c1  # committing to dev left main alone
    assert repo.resolve("ds", "dev").commit == c2
    assert repo.resolve("ds", "v1").commit == c1
    assert repo.resolve("ds", None).commit == c1
    assert repo.resolve("ds", c2[:8]).commit == c2
    assert repo.refs.list("ds", "heads") == {"dev": c2, "main": c1}
    assert [name for name, _ in repo.log(c2)] == [c2, c1]
    with pytest.raises(RefNotFound):
        repo.resolve("ds", "nope")
    with pytest.raises(RefNotFound):
        repo.resolve("ds", "abc")  # too short to be a commit prefix, and no such ref


def test_a_name_is_a_branch_or_a_tag_never_both(repo: Repository, tmp_path: Path) -> None:
    c1 = commit_text(repo, tmp_path, "one")
    repo.set_ref("ds", "tags", "v1", c1, "test")
    with pytest.raises(AlreadyExists, match="tag 'v1'"):
        repo.set_ref("ds", "heads", "v1", c1, "test")
    with pytest.raises(AlreadyExists):
        repo.set_ref("ds", "tags", "v1", c1, "tags never move")
    with pytest.raises(AlreadyExists, match="branch 'main'"):
        repo.set_ref("ds", "tags", "main", c1, "test")
    with pytest.raises(UsageError, match="is a tag"):
        commit_text(repo, tmp_path, "to-tag", branch="v1")


def test_deleted_refs_disappear_and_can_be_recreated(repo: Repository, tmp_path: Path) -> None:
    c1 = commit_text(repo, tmp_path, "one")
    repo.set_ref("ds", "heads", "tmp", c1, "test")
    assert repo.delete_ref("ds", "heads", "tmp") == c1
    assert "tmp" not in repo.refs.list("ds", "heads")
    with pytest.raises(RefNotFound):
        repo.delete_ref("ds", "heads", "tmp")
    repo.set_ref("ds", "tags", "tmp", c1, "a deleted branch name may become a tag")
    history = repo.refs.history("ds", "heads", "tmp")
    assert [h.commit for h in history] == [None, c1]


def test_commit_to_a_missing_branch_is_refused_once_main_exists(repo: Repository,
                                                                tmp_path: Path) -> None:
    commit_text(repo, tmp_path, "one")
    with pytest.raises(RefNotFound, match="cachefs branch ds feature"):
        commit_text(repo, tmp_path, "two", branch="feature")


@pytest.mark.parametrize("bad", ["", "-x", ".hidden", "a/b", "a b", "x" * 129, "é"])
def test_invalid_names_are_rejected(repo: Repository, tmp_path: Path, bad: str) -> None:
    c1 = commit_text(repo, tmp_path, "one")
    with pytest.raises(InvalidName):
        repo.set_ref("ds", "heads", bad, c1, "test")
    with pytest.raises(InvalidName):
        repo.create_dataset(bad)


def test_stale_compare_and_swap_changes_nothing(repo: Repository, tmp_path: Path) -> None:
    c1 = commit_text(repo, tmp_path, "one")
    stale = repo.refs.read("ds", "heads", "main")
    c2 = commit_text(repo, tmp_path, "two")
    with pytest.raises(RefConflict, match="moved concurrently"):
        repo.refs.compare_and_swap("ds", "heads", "main", stale, c1, "stale writer")
    assert repo.resolve("ds", "main").commit == c2


RACER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from cachefs.dataset.commit import commit_directory
    from cachefs.dataset.repo import Repository
    from cachefs.errors import CachefsError
    from cachefs.remotes.local import LocalRemote
    repo_path, src, go = sys.argv[1:4]
    repo = Repository(LocalRemote(repo_path))
    Path(src + ".ready").touch()
    deadline = time.monotonic() + 30
    while not os.path.exists(go):  # start line: every racer begins at once
        if time.monotonic() > deadline:
            sys.exit(99)
        time.sleep(0.001)
    try:
        result = commit_directory(repo, "ds", "main", src, f"racer {src}")
        print(json.dumps({"ok": True, "commit": result.commit}))
    except CachefsError as e:
        print(json.dumps({"ok": False, "error": str(e), "type": type(e).__name__}))
""")


def test_concurrent_commits_to_one_branch_lose_nothing(repo: Repository, tmp_path: Path) -> None:
    base = commit_text(repo, tmp_path, "base")
    go = tmp_path / "go"
    racers = []
    for i in range(6):
        src = tmp_path / f"racer{i}"
        src.mkdir()
        (src / "data").write_bytes(f"racer {i}".encode() * 1000)
        racers.append(subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "repo"), str(src), str(go)],
            stdout=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"racer{i}.ready").exists() for i in range(6)):
        assert time.monotonic() < deadline, "racers did not start"
        time.sleep(0.01)
    go.touch()
    results = []
    for proc in racers:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        results.append(json.loads(out))
    winners = [r["commit"] for r in results if r["ok"]]
    losers = [r for r in results if not r["ok"]]
    assert winners, results
    assert all(r["type"] == "RefConflict" and "retry" in r["error"] for r in losers), losers
    history = [name for name, _ in repo.log(repo.resolve("ds", "main").commit)]
    assert set(winners) <= set(history)  # every acknowledged commit is in the history
    assert len(history) == 1 + len(winners) and history[-1] == base
