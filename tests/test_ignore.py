""".cachefsignore: gitignore-syntax patterns leave paths out of a commit (real CLI, file://)."""

from __future__ import annotations

from pathlib import Path

from cachefs.dataset.ignore import IgnoreRules
from tests.helpers import cli_json, run_cli

FILES = {
    "train/a.jpg": b"a",
    "train/a.jpg.tmp": b"partial download",
    "train/keep.tmp": b"re-included by a negation",
    "build/out.bin": b"build output",
    "src/build/nested.bin": b"a nested build directory is ignored too",
    "notes": b"ignored only at the top",
    "train/notes": b"kept: the pattern is anchored",
    "logs/run1/cache/x": b"any cache directory",
    "logs/run1/metrics.csv": b"kept",
    "build.txt": b"kept: 'build/' only matches directories",
}
IGNORE = """\
# editor and download leftovers
*.tmp
!keep.tmp
build/
/notes
**/cache/
"""
KEPT = {".cachefsignore", "train/a.jpg", "train/keep.tmp", "train/notes",
        "logs/run1/metrics.csv", "build.txt"}


def make_source(root: Path) -> Path:
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".cachefsignore").write_text(IGNORE)
    return root


def committed_files(dataset: str) -> set[str]:
    return {e["path"] for e in cli_json("ls", dataset, "-R") if e["type"] == "file"}


def test_ignore_patterns_follow_gitignore_rules(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    run_cli("init", "ds")
    result = cli_json("commit", "ds", str(src), "-m", "with ignores")
    assert committed_files("ds") == KEPT
    assert result["files"] == len(KEPT)
    # build/, src/build/, logs/run1/cache/, a.jpg.tmp and notes: an ignored directory counts once
    assert result["ignored"] == 5
    out = tmp_path / "out"
    run_cli("checkout", "ds", str(out))
    got = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert got == KEPT
    assert (out / ".cachefsignore").read_text() == IGNORE


def test_changing_the_ignore_file_changes_the_next_commit(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    run_cli("init", "ds")
    run_cli("commit", "ds", str(src), "-m", "one")
    (src / ".cachefsignore").write_text("*.tmp\n.cachefsignore\n")
    run_cli("commit", "ds", str(src), "-m", "two")
    assert committed_files("ds") == {p for p in FILES if not p.endswith(".tmp")}
    (src / ".cachefsignore").unlink()
    run_cli("commit", "ds", str(src), "-m", "three")
    assert committed_files("ds") == set(FILES)


def test_rules_match_directories_only_with_a_trailing_slash() -> None:
    rules = IgnoreRules(["tmp/", "*.log", "!important.log", "/top"])
    assert rules.ignores("tmp", is_dir=True)
    assert not rules.ignores("tmp", is_dir=False)
    assert rules.ignores("a/b/c.log", is_dir=False)
    assert not rules.ignores("a/important.log", is_dir=False)
    assert rules.ignores("top", is_dir=False) and not rules.ignores("x/top", is_dir=False)
    assert rules.patterns == 4


def test_without_an_ignore_file_nothing_is_left_out(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    (src / ".cachefsignore").unlink()
    run_cli("init", "ds")
    result = cli_json("commit", "ds", str(src), "-m", "all")
    assert result["ignored"] == 0 and committed_files("ds") == set(FILES)
    assert IgnoreRules.load(src) is None
