"""The cold baselines of benchmarks.read: which files it drops from the page cache, and the disk's
sequential read pass reads every byte (O_DIRECT, or the page cache where refused)."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.read import disk_sequential_read, evict_tree, files_under


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))


def test_files_under_objects_only(tmp_path: Path) -> None:
    _write(tmp_path / "objects" / "chunks" / "ab" / "abc", 10)
    _write(tmp_path / "objects" / "trees" / "cd" / "cde", 10)
    _write(tmp_path / "state", 10)
    _write(tmp_path / "tmp" / "x", 10)
    found = sorted(Path(p).relative_to(tmp_path).as_posix()
                   for p in files_under(tmp_path, within="objects"))
    assert found == ["objects/chunks/ab/abc", "objects/trees/cd/cde"]
    assert len(files_under(tmp_path)) == 4
    assert evict_tree(tmp_path, within="objects") == 2
    assert evict_tree(tmp_path) == 4


def test_disk_sequential_read_reads_every_byte(tmp_path: Path) -> None:
    sizes = [0, 1, 4095, 4096, (4 << 20) + 123, 9 << 20]
    paths = []
    for i, size in enumerate(sizes):
        _write(tmp_path / f"f{i}", size)
        paths.append(str(tmp_path / f"f{i}"))
    result = disk_sequential_read(paths)
    assert result.files == len(sizes)
    assert result.bytes == sum(sizes)
