"""The master's raft journal is on disk before an entry is acknowledged (master/journal.py):
no dirty page of it is left in the page cache after an append, a compaction or a stored vote,
and after a real 3-master group acknowledges a write, a majority of journals hold nothing
unwritten. cachestat(2) reads the dirty-page counts."""

from __future__ import annotations

import os
from pathlib import Path

from pysyncobj.journal import ResizableFile

from cachefs.directio import cachestat
from master.client import DirEntry
from master.journal import DurableFileJournal, create_journal, install
from tests.masters import MasterProcess, start_group, wait_leader

TOKEN = "raft-journal-test-token"


def dirty_pages(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        stat = cachestat(fd, 0, max(1, os.fstat(fd).st_size))
    finally:
        os.close(fd)
    assert stat is not None, "this kernel has no cachestat(2)"
    return int(stat.nr_dirty + stat.nr_writeback)


def test_every_append_is_synced_where_pysyncobj_leaves_it_in_the_page_cache(
        tmp_path: Path) -> None:
    # pysyncobj's own journal file, written as its FileJournal does: no msync
    stock = ResizableFile(str(tmp_path / "stock.journal"), defaultContent=b"header")
    stock.write(0, b"command" * 100)
    assert dirty_pages(tmp_path / "stock.journal") > 0  # what the check would catch
    stock._destroy()  # (which msyncs it)

    install()
    journal = create_journal(str(tmp_path / "raft.journal"))
    assert isinstance(journal, DurableFileJournal)
    for i in range(2, 300):  # past the first resizes of the mapped file
        journal.add(b"command-%d" % i * 20, i, 1)
        assert dirty_pages(tmp_path / "raft.journal") == 0, i
    journal.deleteEntriesTo(250)  # log compaction: the kept entries are written again
    assert dirty_pages(tmp_path / "raft.journal") == 0
    journal.setCurrentTerm(7, "node-2")  # a vote: stored before it is sent
    assert dirty_pages(tmp_path / "raft.journal.meta") == 0
    journal._destroy()

    reopened = create_journal(str(tmp_path / "raft.journal"))
    assert [entry[1] for entry in (reopened[i] for i in range(len(reopened)))] == \
        list(range(252, 300))
    assert reopened.getCurrentTerm() == 7 and reopened.getVotedForNodeId() == "node-2"
    reopened._destroy()


def test_an_acknowledged_write_is_on_disk_at_a_majority(
        tmp_path: Path, masters: list[MasterProcess]) -> None:
    group = start_group(tmp_path, 3, masters, token=TOKEN)
    leader = wait_leader(group)
    with leader.client() as client:
        for i in range(20):
            assert client.dir_put(DirEntry(f"refs/r/{i:03d}", inline=b"v" * 100),
                                  if_absent=True)
            clean = [m.id for m in group if dirty_pages(m.data_dir / "raft.journal") == 0]
            assert leader.id in clean and len(clean) >= 2, (i, clean)

