"""The commit scan index: what the last commit from a directory saw, so unchanged files are skipped.

Like git's index, it records for every file the (size, mtime_ns, ctime_ns, inode) seen when it was
read and the content hash and extents that came out. The next commit from the same directory to
the same branch reuses a file without opening it when all four still match. Timestamps are coarse
(a kernel tick, or a second on some file systems), so a file changed shortly after being read can
keep its old timestamps: any file whose mtime or ctime falls within one second of the start of
the scan that read it is "racily clean" and is read again next time (git's rule).

The index is a cache: losing or corrupting it only costs a full re-read. It is used only when
the branch still points at the commit it was written for.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zstandard
from blake3 import blake3

from cachefs.config import state_dir
from cachefs.dataset.objects import Extent

log = logging.getLogger("cachefs.scanindex")

INDEX_VERSION = 3  # v3: an ETag per record (imports from buckets)
RACY_WINDOW_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class ScanRecord:
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    content_hash: str
    extents: tuple[Extent, ...]
    racy: bool
    etag: str = ""  # set for objects imported from a bucket: (size, etag) identifies them


def is_racy(mtime_ns: int, ctime_ns: int, scan_started_ns: int) -> bool:
    """True if a change after reading the file could have left its timestamps unchanged."""
    return max(mtime_ns, ctime_ns) >= scan_started_ns - RACY_WINDOW_NS


@dataclass
class ScanIndex:
    commit: str | None
    scan_started_ns: int
    records: dict[str, ScanRecord]

    def lookup(self, path: str, st: os.stat_result) -> ScanRecord | None:
        """The record for `path` if the file is certainly unchanged since it was read."""
        rec = self.records.get(path)
        if rec is None or rec.racy:
            return None
        if (rec.size, rec.mtime_ns, rec.ctime_ns, rec.inode) != (
            st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
        ):
            return None
        return rec

    def lookup_object(self, key: str, size: int, etag: str) -> ScanRecord | None:
        """The record for a bucket object if its size and ETag are unchanged since it was read."""
        rec = self.records.get(key)
        if rec is None or not rec.etag or (rec.size, rec.etag) != (size, etag):
            return None
        return rec

    @staticmethod
    def path_for(remote_url: str, dataset: str, source: Path | str) -> Path:
        key = blake3(f"{remote_url}\0{dataset}\0{source}".encode()).hexdigest()[:32]
        return state_dir() / "scan" / f"{key}.idx"

    @classmethod
    def load(cls, path: Path) -> ScanIndex | None:
        try:
            raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(),
                                                          max_output_size=1 << 32)
            doc = msgpack.unpackb(raw, raw=False)
            if doc["version"] != INDEX_VERSION:
                return None
            records = {}
            for row in doc["records"]:
                name, size, mtime, ctime, ino, content, flat, racy, etag = row
                extents = tuple(
                    Extent(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)
                )
                records[os.fsdecode(name)] = ScanRecord(
                    size, mtime, ctime, ino, content, extents, racy, etag
                )
            return cls(doc["commit"], doc["scan_started_ns"], records)
        except FileNotFoundError:
            return None
        except Exception as e:  # a cache: any damage only means a full re-read
            log.warning("ignoring unreadable scan index %s: %s", path, e)
            return None

    def save(self, path: Path) -> None:
        rows = [
            [os.fsencode(name), r.size, r.mtime_ns, r.ctime_ns, r.inode, r.content_hash,
             [v for x in r.extents for v in (x.chunk, x.offset, x.length)], r.racy, r.etag]
            for name, r in self.records.items()
        ]
        doc = {"version": INDEX_VERSION, "commit": self.commit,
               "scan_started_ns": self.scan_started_ns, "records": rows}
        data = zstandard.ZstdCompressor(level=1).compress(msgpack.packb(doc, use_bin_type=True))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not save scan index %s: %s", path, e)
