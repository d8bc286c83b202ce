"""Damaged or malicious stores: flipped bytes, truncation, missing objects and path traversal are
refused with errors naming the object, and nothing is written where it should not be."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest
import zstandard

from cachefs.config import data_dir
from cachefs.dataset.objects import TREE_MAGIC, Commit, Kind, encode, hash_bytes
from cachefs.dataset.repo import commit_key, tree_key
from tests.helpers import cli_json, local_repo, run_cli

EXIT_NOT_FOUND, EXIT_CORRUPT = 3, 6


@pytest.fixture
def committed(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A dataset in the default local repo; returns (repo dir, {path: first chunk name})."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(200_000))  # 4 chunks of 64 KiB
    (src / "a.txt").write_text("alpha")
    (src / "b.txt").write_text("beta")
    run_cli("init", "ds", "--chunk-size", "64KiB")
    run_cli("commit", "ds", str(src), "-m", "v1")
    repo_dir = data_dir() / "repo"
    repo = local_repo(repo_dir)
    commit = repo.resolve("ds", "main").commit
    chunks = {p: e.extents[0].chunk for p, e in repo.walk(repo.get_commit(commit).tree)
              if e.kind is Kind.FILE}
    return repo_dir, chunks


def chunk_file(repo_dir: Path, name: str) -> Path:
    return repo_dir / "chunks" / name[:2] / name


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cli_json_failing(*args: str) -> dict:
    proc = run_cli(*args, "--json", check=False)
    assert proc.returncode != 0
    return json.loads(proc.stdout)


def test_flipped_chunk_byte_fails_checkout_cat_and_verify(committed, tmp_path: Path) -> None:
    repo_dir, chunks = committed
    bad = chunks["big.bin"]
    flip_byte(chunk_file(repo_dir, bad))
    out = tmp_path / "out"
    proc = run_cli("checkout", "ds", str(out), check=False)
    assert proc.returncode == EXIT_CORRUPT and bad in proc.stderr, proc.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "cachefs-checkout" in p.name]
    proc = run_cli("cat", "ds:big.bin", check=False)
    assert proc.returncode == EXIT_CORRUPT and bad in proc.stderr
    proc = run_cli("verify", "ds", check=False)
    assert proc.returncode == EXIT_CORRUPT
    assert bad in proc.stderr and "big.bin" in proc.stderr
    report = cli_json_failing("verify", "ds")
    assert not report["ok"] and any(bad in p for p in report["problems"])


def test_truncated_and_missing_chunks_are_named(committed, tmp_path: Path) -> None:
    repo_dir, chunks = committed
    truncated = chunk_file(repo_dir, chunks["big.bin"])
    truncated.write_bytes(truncated.read_bytes()[:-100])
    proc = run_cli("verify", "ds", check=False)
    assert proc.returncode == EXIT_CORRUPT and chunks["big.bin"] in proc.stderr
    truncated.unlink()
    proc = run_cli("checkout", "ds", str(tmp_path / "out"), check=False)
    assert proc.returncode == EXIT_NOT_FOUND and chunks["big.bin"] in proc.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_tree_is_named(committed) -> None:
    repo_dir, _ = committed
    repo = local_repo(repo_dir)
    tree = repo.get_commit(repo.resolve("ds", "main").commit).tree
    flip_byte(repo_dir / "trees" / tree[:2] / tree, offset=6)
    proc = run_cli("ls", "ds", check=False)
    assert proc.returncode == EXIT_CORRUPT and tree in proc.stderr


@pytest.mark.parametrize("evil", [b"../escaped", b"a/../../escaped", b"..", b"/etc"])
def test_path_traversal_in_a_stored_tree_is_rejected(tmp_path: Path, evil: bytes) -> None:
    run_cli("init", "ds")
    repo = local_repo(data_dir() / "repo")
    body = msgpack.packb([[evil, int(Kind.FILE), 0o644, 0, 0, bytes.fromhex(hash_bytes(b"")), []]],
                         use_bin_type=True)
    tree = hash_bytes(TREE_MAGIC + body)
    repo.remote.put(tree_key(tree), TREE_MAGIC + zstandard.ZstdCompressor().compress(body))
    name, stored = encode(Commit(tree, (), "ds", "mallory", "evil", 0, 1, 0))
    repo.remote.put(commit_key(name), stored)
    repo.refs.compare_and_swap("ds", "heads", "main", repo.refs.read("ds", "heads", "main"),
                               name, "planted")
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli("checkout", "ds", str(work / "out"), check=False, cwd=work)
    assert proc.returncode == EXIT_CORRUPT and tree in proc.stderr, proc.stderr
    assert not list(tmp_path.rglob("escaped")) and not (work / "out").exists()
    assert run_cli("ls", "ds", check=False).returncode == EXIT_CORRUPT
    assert run_cli("verify", "ds", check=False).returncode == EXIT_CORRUPT


def test_paths_with_dot_dot_are_refused_on_the_command_line(committed) -> None:
    for target in ("ds:../x", "ds:a/../../b"):
        proc = run_cli("ls", target, check=False)
        assert proc.returncode == 2 and ".." in proc.stderr


def test_verify_of_a_healthy_dataset_passes(committed) -> None:
    report = cli_json("verify", "ds")
    assert report["ok"] and report["files"] == 3 and report["chunks"] == 5
