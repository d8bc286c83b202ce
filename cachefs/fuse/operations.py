"""The thin pyfuse3 layer: FUSE requests to `DatasetFS` calls, errors to errno, in one place.

Everything about the file system lives in `cachefs.fs`; this class only converts types, keeps
the readdirplus lookup-count contract (an entry's count rises only when the kernel took it), and
turns `FsError` into `FUSEError`. Writes of any kind get EROFS (the mount is also mounted `ro`,
so the kernel refuses most of them before they reach us). Because a version never changes, the
kernel may cache entries and attributes for a day and keep file pages across opens.

Opens cost nothing where pyfuse3 carries cachefs's patch (`NO_OPEN`, patches/pyfuse3-*.patch):
the first OPEN is answered ENOSYS, after which the kernel sends no OPEN or RELEASE on this mount
and keeps every file's page cache across opens, and `read` gets the inode in place of a file
handle (`DatasetFS.read_inode`). A small file then costs a LOOKUP and a READ, and once its pages
are cached, nothing. Without the patch, `open` hands out file handles as usual.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from cachefs.fs import Attributes, Caller, DatasetFS, FsError, Inode

log = logging.getLogger("cachefs.fuse")

# Linux learnt to take ENOSYS for OPEN as "no OPEN needed" in 4.19 (fs/fuse/file.c, no_open);
# an older kernel would return ENOSYS to open(2) itself. 5.1 leaves a margin for backports.
NO_OPEN_KERNEL = (5, 1)


def kernel_takes_no_open(release: str) -> bool:
    """Whether a kernel of this `uname -r` release handles OPEN answered with ENOSYS."""
    try:
        major, minor = (int(part) for part in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= NO_OPEN_KERNEL


# pyfuse3 with cachefs's patch (patches/), on a kernel that takes it: `open` answers ENOSYS, after
# which the kernel sends no OPEN or RELEASE (and keeps each file's page cache across opens), and
# `read` gets the inode.
NO_OPEN = (bool(getattr(pyfuse3, "NO_OPEN_READ_BY_INODE", False))
           and kernel_takes_no_open(os.uname().release))
# ... and with the read hook (patches/): the disk tier's compiled read path may take READs.
COMPILED_READS = NO_OPEN and bool(getattr(pyfuse3, "READ_HOOK", False))
CACHE_TIMEOUT_S = 86400.0  # immutable content: entries and attributes never go stale
T = TypeVar("T")


def _errors_to_errno(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _entry(fs: DatasetFS, node: Inode) -> pyfuse3.EntryAttributes:
    a: Attributes = fs.attributes(node)
    out = pyfuse3.EntryAttributes()
    out.st_ino = a.ino
    out.generation = 0
    out.entry_timeout = CACHE_TIMEOUT_S
    out.attr_timeout = CACHE_TIMEOUT_S
    out.st_mode = a.mode
    out.st_nlink = a.nlink
    out.st_uid = a.uid
    out.st_gid = a.gid
    out.st_rdev = 0
    out.st_size = a.size
    out.st_blksize = 1 << 20
    out.st_blocks = a.blocks
    out.st_atime_ns = a.mtime_ns
    out.st_mtime_ns = a.mtime_ns
    out.st_ctime_ns = a.mtime_ns
    return out


class CachefsOperations(pyfuse3.Operations):
    """pyfuse3 operations of one read-only dataset mount."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: DatasetFS) -> None:
        super().__init__()
        self.fs = fs
        fs.status["fuse_no_open"] = NO_OPEN
        if not NO_OPEN:
            log.info("every open of a file costs an OPEN and a RELEASE request: %s",
                     "a kernel before 5.1" if getattr(pyfuse3, "NO_OPEN_READ_BY_INODE", False)
                     else "pyfuse3 without cachefs's patch (scripts/build_pyfuse3.sh)")

    @_errors_to_errno
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return _entry(self.fs, await self.fs.lookup(parent_inode, os.fsdecode(name)))

    @_errors_to_errno
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return _entry(self.fs, self.fs.inode(inode))

    @_errors_to_errno
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.fs.forget(inode, count)

    @_errors_to_errno
    async def opendir(self, inode: int, ctx: Any) -> int:
        node = self.fs.inode(inode)
        if not node.entry.is_dir:
            raise FsError(errno.ENOTDIR)
        return inode

    @_errors_to_errno
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        for next_id, entry in await self.fs.readdir(fh, start_id):
            node = self.fs.readdir_inode(fh, entry)
            if not pyfuse3.readdir_reply(token, os.fsencode(entry.name), _entry(self.fs, node),
                                         next_id):
                self.fs.drop_unreferenced([node])  # the buffer is full: the kernel took none
                break
            self.fs.confirm_readdir(node)

    async def releasedir(self, fh: int) -> None:
        pass

    @_errors_to_errno
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        self.fs.reads.open_requests += 1
        if NO_OPEN:
            # The kernel stops sending OPEN and RELEASE (and keeps the page cache of every file
            # across opens). Nothing is lost: the mount is read-only ("ro", so the kernel refuses
            # opens for writing itself) and checks modes itself (default_permissions).
            raise FsError(errno.ENOSYS)
        fh = self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    @_errors_to_errno
    async def read(self, fh: int, off: int, size: int) -> Any:
        if NO_OPEN:  # `fh` is the inode
            return await self.fs.read_inode(fh, off, size)
        return await self.fs.read(fh, off, size)

    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    # No `flush`: pyfuse3's default answers ENOSYS once, and the kernel then stops sending a
    # FLUSH on every close() (one Python round trip per file less; +55% warm small files).

    @_errors_to_errno
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        # The caller decides what it may ask for (a warmup needs read permission on the file).
        return await self.fs.getxattr(inode, name, Caller(ctx.uid, ctx.gid, ctx.pid))

    @_errors_to_errno
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.fs.listxattr(inode)

    async def statfs(self, ctx: Any) -> Any:
        out = pyfuse3.StatvfsData()
        out.f_bsize = 1 << 20
        out.f_frsize = 1 << 20
        out.f_namemax = 255
        return out

    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        return not mode & os.W_OK

    # Every modifying operation: the version is immutable.
    async def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = fsync = fsyncdir = _read_only
