"""The git-like CLI as a user runs it: real processes, JSON contracts, exit codes, help texts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.helpers import cli_json, run_cli

COMMANDS = ["remote", "init", "commit", "log", "branch", "tag", "ls", "cat", "diff", "checkout",
            "verify", "datasets", "push", "pull", "gc", "scheduler-extender"]


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[Path, dict, dict]:
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    for i in range(5):
        (src / "train" / f"{i}.jpg").write_bytes(os.urandom(5000))
    (src / "labels.csv").write_text("0,cat\n")
    run_cli("init", "ds")
    v1 = cli_json("commit", "ds", str(src), "-m", "first")
    (src / "labels.csv").write_text("0,dog\n")
    (src / "train" / "0.jpg").unlink()
    (src / "train" / "9.jpg").write_bytes(b"new")
    v2 = cli_json("commit", "ds", str(src), "-m", "second\n\nwith a body")
    return src, v1, v2


def test_commit_log_and_diff_json_contracts(two_versions) -> None:
    _, v1, v2 = two_versions
    assert set(v1) >= {"commit", "files", "bytes", "new_bytes", "new_meta_bytes"}
    assert v1["files"] == 6 and v1["bytes"] == 25006 and v1["new_bytes"] == 25006
    assert v1["new_meta_bytes"] > 0
    assert v2["new_bytes"] == 3 + 6  # 9.jpg and the new labels.csv
    log = cli_json("log", "ds")
    assert [e["commit"] for e in log] == [v2["commit"], v1["commit"]]
    assert set(log[0]) >= {"commit", "parents", "message", "author", "time"}
    assert log[0]["parents"] == [v1["commit"]] and log[1]["parents"] == []
    assert log[0]["message"] == "second\n\nwith a body"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", log[0]["time"])
    assert cli_json("log", "ds", "-n", "1") == log[:1]
    diff = cli_json("diff", f"ds@{v1['commit'][:10]}", "main")
    assert diff == [{"path": "labels.csv", "change": "modified"},
                    {"path": "train/0.jpg", "change": "removed"},
                    {"path": "train/9.jpg", "change": "added"}]
    stat = run_cli("diff", f"ds@{v1['commit']}", "main", "--stat").stdout
    assert "1 added, 1 removed, 1 modified" in stat


def test_branch_tag_ls_cat_checkout(two_versions, tmp_path: Path) -> None:
    src, v1, _ = two_versions
    run_cli("tag", "ds", "v1", v1["commit"][:12])
    run_cli("branch", "ds", "exp", "v1")
    assert cli_json("tag", "ds") == [{"name": "v1", "commit": v1["commit"]}]
    assert {b["name"] for b in cli_json("branch", "ds")} == {"main", "exp"}
    assert run_cli("cat", "ds@v1:labels.csv").stdout == "0,cat\n"
    assert run_cli("cat", "ds:labels.csv").stdout == "0,dog\n"
    listing = cli_json("ls", "ds@exp", "-R")
    assert [r["path"] for r in listing] == ["labels.csv", "train"] + [
        f"train/{i}.jpg" for i in range(5)]
    assert listing[0]["type"] == "file" and listing[1]["type"] == "dir"
    long = run_cli("ls", "ds:train", "-l").stdout
    assert "-rw" in long and "train/9.jpg" in long
    out = tmp_path / "v1"
    result = cli_json("checkout", "ds@v1", str(out))
    assert result["files"] == 6 and (out / "labels.csv").read_text() == "0,cat\n"
    # tags are fixed; a name is never both; deleting works
    assert run_cli("tag", "ds", "v1", "main", check=False).returncode == 4
    proc = run_cli("branch", "ds", "v1", check=False)
    assert proc.returncode == 4 and "tag 'v1' already exists" in proc.stderr
    proc = run_cli("commit", "ds@v1", str(src), "-m", "x", check=False)
    assert proc.returncode == 2 and "is a tag" in proc.stderr
    run_cli("branch", "ds", "-d", "exp")
    assert [b["name"] for b in cli_json("branch", "ds")] == ["main"]
    datasets = cli_json("datasets")
    assert datasets[0]["name"] == "ds" and datasets[0]["tags"] == ["v1"]


def test_remotes_are_configured_by_name(tmp_path: Path) -> None:
    other = tmp_path / "other-repo"
    run_cli("remote", "add", "other", f"file://{other}")
    listed = cli_json("remote", "list")
    assert {"name": "other", "url": f"file://{other}", "default": False} in listed
    assert [r["name"] for r in listed if r["default"]] == ["local"]
    run_cli("init", "elsewhere", "--remote", "other")
    assert (other / "datasets" / "elsewhere").is_file()
    assert cli_json("datasets") == []  # the default remote is still 'local'
    run_cli("remote", "add", "team", f"file://{tmp_path / 'team'}", "--default")
    assert [r["name"] for r in cli_json("remote", "list") if r["default"]] == ["team"]
    assert run_cli("remote", "add", "team", "file:///x", check=False).returncode == 4
    assert run_cli("remote", "remove", "local", check=False).returncode == 2
    run_cli("remote", "remove", "team")
    assert [r["name"] for r in cli_json("remote", "list") if r["default"]] == ["local"]
    assert [d["name"] for d in cli_json("datasets", "--remote", f"file://{other}")] == [
        "elsewhere"]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["init", "bad/name"], 2, "invalid dataset name"),
    (["log", "missing"], 3, "cachefs init missing"),
    (["ls", "ds@nope"], 3, "no branch, tag or commit 'nope'"),
    (["ls", "ds"], 3, "has no versions yet"),
    (["cat", "ds:nothing.txt"], 3, "no such file"),
    (["ls", "ds", "--remote", "gopher://x"], 2, "unsupported remote URL"),
    (["ls", "ds", "--remote", "nosuch"], 3, "no remote named 'nosuch'"),
    (["init", "ds", "--chunk-size", "1KiB"], 2, "chunk size"),
    (["init", "ds", "--chunk-size", "lots"], 2, "invalid size"),
])
def test_errors_are_one_clear_line(args: list[str], code: int, message: str,
                                   tmp_path: Path) -> None:
    if args[0] != "init":
        run_cli("init", "ds")
    if args[0] != "init" and "no versions" not in message:
        (tmp_path / "src").mkdir()
        (tmp_path / "src" / "f").write_text("x")
        run_cli("commit", "ds", str(tmp_path / "src"), "-m", "v1")
    proc = run_cli(*args, check=False)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_commit_of_a_missing_directory_changes_nothing(tmp_path: Path) -> None:
    run_cli("init", "ds")
    proc = run_cli("commit", "ds", str(tmp_path / "nope"), "-m", "x", check=False)
    assert proc.returncode == 3 and "does not exist" in proc.stderr
    assert cli_json("branch", "ds") == []


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    proc = run_cli(command, "--help")
    assert "examples:" in proc.stdout and "--remote" in proc.stdout and "--json" in proc.stdout


def test_json_output_is_exactly_one_document(two_versions) -> None:
    for args in (["log", "ds"], ["ls", "ds", "-R"], ["datasets"], ["remote", "list"],
                 ["branch", "ds"], ["verify", "ds"]):
        proc = run_cli(*args, "--json")
        json.loads(proc.stdout)  # raises if anything else was printed


def test_s3_remote_through_the_cli(s3_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(300_000))
    run_cli("remote", "add", "s3", s3_url)
    run_cli("init", "ds", "--remote", "s3")
    result = cli_json("commit", "ds", str(src), "-m", "to s3", "--remote", "s3")
    assert result["new_bytes"] == 300_000
    out = tmp_path / "out"
    run_cli("checkout", "ds", str(out), "--remote", "s3")
    assert (out / "x.bin").read_bytes() == (src / "x.bin").read_bytes()
    assert cli_json("verify", "ds", "--remote", "s3")["ok"]


def test_long_commands_show_a_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import pty
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(3 << 20))
    run_cli("init", "ds")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "cachefs.cli.main", "commit", "ds", str(src),
                             "-m", "tty"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave)
    os.close(slave)
    output = b""
    while True:
        try:
            piece = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not piece:
            break
        output += piece
    os.close(master)
    assert proc.wait(timeout=60) == 0
    assert b"commit:" in output and b"%|" in output and b"3.00M" in output
    # not a terminal: no bar at all
    assert "%" not in run_cli("checkout", "ds", str(tmp_path / "out")).stderr
