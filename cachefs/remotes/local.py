"""The file:// remote: a repository in a local directory (the embedded default).

Objects are files named by their key. A put writes a temporary file and renames it into place, so
a reader never sees a partial object; durability is batched: `flush` syncs the whole file system
once (syncfs) instead of fsyncing thousands of chunk files one by one, and the repository calls it
before any ref moves. `put_if_absent` is a hard link of a fully written, fsynced temporary file:
link(2) fails with EEXIST atomically, so exactly one of several racing writers wins and the
winner's content is complete the moment the name appears.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from cachefs.errors import ConfigError, ObjectNotFound, RemoteError
from cachefs.remotes.base import ObjectInfo

log = logging.getLogger("cachefs.remotes.local")

_TMP_PREFIX = ".tmp."
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _syncfs(fd: int) -> None:
    if hasattr(_libc, "syncfs") and _libc.syncfs(fd) == 0:
        return
    os.sync()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalRemote:
    """A remote stored as files under one directory."""

    parallelism = 4  # worker threads worth running against it (hashing is the bound)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = "file://" + str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RemoteError(f"cannot create repository directory {self.root}: {e}") from e

    @classmethod
    def from_url(cls, url: str) -> LocalRemote:
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost") or not parsed.path:
            raise ConfigError(f"invalid file URL {url!r}: expected file:///absolute/path")
        return cls(unquote(parsed.path))

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ValueError(f"invalid remote key {key!r}")
        return self.root.joinpath(*parts)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                if start == 0 and length is None:
                    return f.readall()
                size = os.fstat(f.fileno()).st_size
                end = size if length is None else min(size, start + length)
                return os.pread(f.fileno(), max(0, end - start), start)
        except (FileNotFoundError, NotADirectoryError):  # absent, or below a non-directory
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as e:
            raise RemoteError(f"reading {key} from {self.url}: {e}") from e

    def _write_temp(self, path: Path, data: bytes | memoryview, fsync: bool) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def put(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data, fsync=False)
            os.replace(tmp, path)
        except OSError as e:
            raise RemoteError(f"writing {key} to {self.url}: {e}") from e

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data, fsync=True)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
            return True
        except OSError as e:
            raise RemoteError(f"creating {key} in {self.url}: {e}") from e

    def has(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if self._path(k).is_file()}

    def list(self, prefix: str) -> Iterator[str]:
        base_key, _, _ = prefix.rpartition("/")
        base = self._path(base_key) if base_key else self.root
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            found.extend(
                rel + name
                for name in filenames
                if not name.startswith(".") and (rel + name).startswith(prefix)
            )
        return iter(sorted(found))

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            try:
                st = self._path(key).stat()
            except FileNotFoundError:
                continue  # deleted since it was listed
            yield ObjectInfo(key, st.st_size, st.st_mtime_ns, f"{st.st_size:x}-{st.st_mtime_ns:x}")

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except NotADirectoryError:
            pass  # below a non-directory: absent
        except OSError as e:
            raise RemoteError(f"deleting {key} from {self.url}: {e}") from e

    def flush(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _syncfs(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"LocalRemote({str(self.root)!r})"


with contextlib.suppress(AttributeError):
    _libc.syncfs.argtypes = [ctypes.c_int]
