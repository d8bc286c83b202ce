"""The raft journal, made durable before raft acts on an entry: pysyncobj's file journal, synced.

pysyncobj appends its journal through an mmap and never msyncs it, so an entry a follower
acknowledged, or a leader counted towards a majority, could sit in the page cache only: safe
from kill -9 (the page cache outlives the process) but lost if a majority of the masters lose
power at once. Raft's safety argument needs an entry on stable storage before the member
acknowledges it.

`DurableFileJournal` fdatasyncs the file after every append (and fsyncs the term and vote that
pysyncobj stores beside it): pysyncobj appends on its raft thread and only then sends the
append-entries response (a follower) or counts its own copy (the leader), so every entry it
acknowledges is durable. Log compaction re-appends the entries it keeps one by one, so it syncs
once at the end instead. `install` makes pysyncobj create journals of this class; `MasterRaft`
calls it before building its `SyncObj`. The file format is pysyncobj's own, unchanged.

Cost: one fdatasync per raft command, which group commit (master/batching.py) shares among the
directory operations of a batch.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pysyncobj.journal
import pysyncobj.syncobj
from pysyncobj.journal import FileJournal, Journal, MemoryJournal, MetaStorer
from pysyncobj.pickle import dumps, loads

from cachefs.fsutil import fsync_dir


class DurableMetaStorer(MetaStorer):  # type: ignore[misc]
    """pysyncobj's store of currentTerm and votedFor, fsynced: raft needs them on stable
    storage before a vote is sent (pysyncobj renames an unsynced temporary file)."""

    def getMeta(self) -> dict[str, Any]:
        try:  # (pysyncobj's leaves the file open)
            with open(self.getPath(), "rb") as f:
                meta: dict[str, Any] = loads(f.read())
            return meta
        except (OSError, ValueError, EOFError):
            return {}

    def storeMeta(self, meta: dict[str, Any]) -> None:
        path = self.getPath()
        with open(path + ".tmp", "wb") as f:
            f.write(dumps(meta))
            f.flush()
            os.fsync(f.fileno())
        shutil.move(path + ".tmp", path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))


class DurableFileJournal(FileJournal):  # type: ignore[misc]
    """pysyncobj's `FileJournal`, synced after every append (see the module docstring)."""

    _bulk = False  # appending many entries at once: sync after the last

    def __init__(self, journal_file: str) -> None:
        super().__init__(journal_file)
        # fdatasync of the journal's inode through a descriptor of our own: it releases the
        # GIL, where mmap.flush (msync) holds it and stalls every thread of the master
        self._sync_fd = os.open(journal_file, os.O_RDONLY)

    def flush(self) -> None:
        os.fdatasync(self._sync_fd)

    def _destroy(self) -> None:
        super()._destroy()
        os.close(self._sync_fd)

    def add(self, command: Any, idx: int, term: int) -> None:
        super().add(command, idx, term)
        if not self._bulk:
            self.flush()

    def deleteEntriesTo(self, entryTo: int) -> None:
        self._bulk = True
        try:
            super().deleteEntriesTo(entryTo)
        finally:
            self._bulk = False
        self.flush()

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        super().deleteEntriesFrom(entryFrom)
        self.flush()  # a conflicting suffix must not come back after a crash


def create_journal(journal_file: str | None = None) -> Journal:
    """pysyncobj's `createJournal`, with the durable file journal."""
    if journal_file is None:
        return MemoryJournal()
    return DurableFileJournal(journal_file)


def install() -> None:
    """Make every `SyncObj` built from now on use `DurableFileJournal`, and every file journal
    `DurableMetaStorer` (pysyncobj looks both names up when it builds them)."""
    pysyncobj.journal.MetaStorer = DurableMetaStorer
    pysyncobj.syncobj.createJournal = create_journal
