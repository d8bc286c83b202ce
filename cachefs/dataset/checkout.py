"""Materializing a version (or a subtree of it) as ordinary files, every byte verified.

The version is written into a hidden staging directory next to the destination and renamed into
place only when complete, so an interrupted or failed checkout leaves nothing half-written under
the destination name. Files are written in path order; the chunks they need are fetched ahead in
parallel and verified against their names before a byte of them is written (fetch.py). Chunks of
zeros are not fetched at all: the file is extended with a hole (sparse files stay sparse). Modes
and mtimes are applied last, directories deepest first, so read-only directories can be filled.

"Complete when it appears" holds across a crash too: before the rename, one syncfs of the
destination's file system makes every staged file and directory durable, and after it the parent
directory is fsynced, so the rename itself is. One syncfs, not an fsync per file: for 2,000 files
of 8 KiB it took 30 ms against 850-1,030 ms on this project's ext4 disk (one journal commit each).
It goes through a descriptor opened before the first file is written, because the kernel reports
a writeback error only to descriptors opened before it happened. A failed sync fails the
checkout (LocalIOError) and leaves no DEST. A crash before the rename leaves at most the hidden
staging directory `.DEST.cachefs-checkout-*` (safe to delete) and no DEST; after the parent's
fsync, DEST is there and complete.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cachefs.dataset.fetch import ChunkStream, collapse_repeats
from cachefs.dataset.objects import Kind, TreeEntry, extent_bytes, zero_chunk_hash
from cachefs.dataset.repo import Repository
from cachefs.errors import AlreadyExists, CachefsError, LocalIOError
from cachefs.progress import NoProgress, Progress
from cachefs.remotes.local import syncfs

log = logging.getLogger("cachefs.checkout")


@dataclass(frozen=True)
class CheckoutResult:
    files: int
    dirs: int
    symlinks: int
    bytes: int


def _is_hole(extent_chunk: str, offset: int, length: int) -> bool:
    return offset == 0 and extent_chunk == zero_chunk_hash(length)


class _Checkout:
    def __init__(self, repo: Repository, progress: Progress, workers: int) -> None:
        self.repo = repo
        self.progress = progress
        self.workers = workers
        self.files: list[tuple[Path, TreeEntry]] = []
        self.dirs: list[tuple[Path, TreeEntry]] = []
        self.links = 0

    def plan(self, entry: TreeEntry, path: Path) -> None:
        """Create the directory skeleton and symlinks; list the files to write."""
        if entry.kind is Kind.DIR:
            # 0o700 until finish() applies the stored mode; the root (mode 0) gets the umask's.
            path.mkdir(mode=0o700 if entry.mode else 0o777)
            self.dirs.append((path, entry))
            for child in self.repo.get_tree(entry.hash).entries:
                self.plan(child, path / child.name)
        elif entry.kind is Kind.SYMLINK:
            os.symlink(entry.target, path)
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
            self.links += 1
        else:
            self.files.append((path, entry))

    def write_files(self) -> int:
        total = sum(e.size for _, e in self.files)
        self.progress.start(total, "B", "checkout")
        plan = collapse_repeats(
            x.chunk
            for _, e in self.files
            for x in e.extents
            if not _is_hole(x.chunk, x.offset, x.length)
        )
        current_name, current = "", b""
        with ChunkStream(self.repo, plan, workers=self.workers) as stream:
            for path, entry in self.files:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                try:
                    position = 0
                    for x in entry.extents:
                        if not _is_hole(x.chunk, x.offset, x.length):
                            if x.chunk != current_name:
                                current_name, current = x.chunk, stream.take(x.chunk)
                            view = extent_bytes(x.chunk, current, x.offset, x.length)
                            written = 0
                            while written < x.length:
                                written += os.pwrite(fd, view[written:], position + written)
                        position += x.length
                    os.ftruncate(fd, entry.size)  # trailing holes
                finally:
                    os.close(fd)
                self.progress.update(entry.size)
        return total

    def finish(self) -> None:
        for path, entry in self.files:
            os.chmod(path, entry.mode)
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
        for path, entry in reversed(self.dirs):
            if entry.mode:
                os.chmod(path, entry.mode)
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))


def _sync_staged(parent_fd: int, job: _Checkout) -> None:
    """Make the staged tree durable: one syncfs, or (a C library without it) fsync each."""
    try:
        syncfs(parent_fd)
        return
    except OSError as e:
        if e.errno != errno.ENOSYS:
            raise
    for path, _ in job.files + job.dirs:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync(dest: Path, what: str, sync: Callable[[], None]) -> None:
    """Run `sync`, turning its failure into LocalIOError naming the destination and errno."""
    try:
        sync()
    except OSError as e:
        name = errno.errorcode.get(e.errno or 0, "?")
        raise LocalIOError(f"checkout into {dest} failed: syncing {what} to disk: "
                           f"{e.strerror or e} ({name})") from e


def _undo_rename(dest: Path, replaced_empty_dir: bool) -> None:
    """Take back a rename whose durability failed: DEST never stands for a doubtful copy."""
    shutil.rmtree(dest, ignore_errors=True)
    if replaced_empty_dir:
        with contextlib.suppress(OSError):
            dest.mkdir()


def checkout(
    repo: Repository,
    commit: str,
    path: str,
    destination: str | os.PathLike[str],
    progress: Progress | None = None,
    workers: int = 8,
) -> CheckoutResult:
    """Write `path` of version `commit` to `destination` (which must not exist, or be empty)."""
    progress = progress or NoProgress()
    entry = repo.find(commit, path)
    if entry.name == "/":  # the version's root: keep the user's default directory mode
        entry = TreeEntry(".", Kind.DIR, 0, 0, entry.mtime_ns, entry.hash)
    dest = Path(destination).absolute()
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise AlreadyExists(f"destination {dest} exists and is not an empty directory")
    if not dest.parent.is_dir():
        raise LocalIOError(f"parent directory {dest.parent} does not exist")
    staging = dest.parent / f".{dest.name}.cachefs-checkout-{secrets.token_hex(4)}"
    job = _Checkout(repo, progress, workers)
    replaced_empty_dir = dest.is_dir()
    try:  # opened before anything is written: syncfs reports writeback errors to it from now on
        parent_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise LocalIOError(f"cannot open {dest.parent}: {e.strerror or e}") from e
    try:
        job.plan(entry, staging)
        written = job.write_files()
        job.finish()
        _sync(dest, "the checked-out files", lambda: _sync_staged(parent_fd, job))
        os.rename(staging, dest)  # replaces an empty directory atomically
        try:
            _sync(dest, "the rename into place", lambda: os.fsync(parent_fd))
        except LocalIOError:
            _undo_rename(dest, replaced_empty_dir)
            raise
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CachefsError):
            raise LocalIOError(f"checkout into {dest} failed: {e}") from e
        raise
    finally:
        os.close(parent_fd)
        progress.close()
    dirs = len(job.dirs)
    return CheckoutResult(len(job.files), dirs, job.links, written)
