"""File-system steps that several stores share: fsync a directory, and write a new file in full
then publish it under its final name (the two halves of a temp-write-then-publish).

The callers choose the temporary name (the disk cache puts the size in it, for its usage scan)
and what happens when the final name exists (the disk cache and `put_if_absent` keep the first
object, `LocalRemote.put` replaces it after an fsync); what is common to all of them lives here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from contextlib import suppress

StrPath = str | os.PathLike[str]


def fsync_dir(path: StrPath) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: StrPath, data: bytes | memoryview, *, mode: int = 0o644,
                   extra_flags: int = 0, fsync: bool = False, make_parent: bool = False,
                   before_close: Callable[[int], None] | None = None) -> None:
    """Create `path` (O_EXCL: it must not exist) and write all of `data` to it; then call
    `before_close(fd)` and fsync it, if asked. `make_parent` creates a missing parent directory.
    On any failure the file is closed and removed, and the error raised."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | extra_flags
    try:
        fd = os.open(path, flags, mode)
    except FileNotFoundError:
        if not make_parent:
            raise
        os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
        fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if before_close is not None:
            before_close(fd)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with suppress(FileNotFoundError):
            os.unlink(path)
        raise
    os.close(fd)


def link_into_place(tmp: StrPath, path: StrPath,
                    replace_without_links: Collection[int] = ()) -> bool:
    """Publish the written file `tmp` as `path` with link(2), which never replaces: False if
    `path` exists already. A link that fails with an errno of `replace_without_links` (a file
    system without hard links) renames `tmp` over `path` instead. Unless renamed, `tmp` stays:
    the caller removes it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in replace_without_links:
            raise
        os.replace(tmp, path)
    return True
