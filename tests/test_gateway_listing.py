"""The gateway's listing walk (Catalog.walk) against a reference: S3's key order and grouping.

Random trees whose names continue each other below '/' ('a', 'a-b', 'a.b', 'a/...') are
committed to a real local repository; the walk must give exactly the sorted keys a reference
computes from the file list (prefix, start-after, delimiter '/'), and paging with the last
item of each page as the next page's start (what continuation tokens carry) must give the same
list as one long listing.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs.cache.memory import MemoryCache
from cachefs.dataset.commit import commit_directory
from cachefs.dataset.objects import Kind
from cachefs.gateway.catalog import Catalog
from tests.helpers import local_repo

NAMES = ["a", "a-b", "a.b", "a0", "ab", "b", "é", "a_b"]
path_st = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)


def consistent(paths: list[str]) -> list[str]:
    """Paths where no file is also a directory of another path."""
    chosen = sorted(set(paths))
    return [p for p in chosen if not any(q.startswith(p + "/") for q in chosen)]


def reference(files: list[str], prefix: str, after: str, recurse: bool) -> list[str]:
    keys = sorted((f for f in files if f.startswith(prefix) and f.encode() > after.encode()),
                  key=str.encode)
    if recurse:
        return keys
    out: list[str] = []
    for key in keys:
        cut = key.find("/", len(prefix))
        item = key if cut < 0 else key[: cut + 1]
        if item.encode() > after.encode() and (not out or out[-1] != item):
            out.append(item)
    return out


def walk(catalog: Catalog, prefix: str, after: str, recurse: bool) -> list[str]:
    async def run() -> list[str]:
        version = await catalog.version("ds", "main")
        return [item.key async for item in catalog.walk(version, prefix, after, recurse)
                if item.entry.kind is Kind.FILE or not recurse]

    return trio.run(run)


def committed(paths: list[str]) -> tuple[Catalog, list[str], tempfile.TemporaryDirectory[str]]:
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    files = consistent(paths)
    for rel in files:
        (root / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "src" / rel).write_bytes(rel.encode())
    repo = local_repo(root / "repo")
    repo.create_dataset("ds")
    commit_directory(repo, "ds", "main", root / "src", "m", author="t@localhost")
    return Catalog(repo, MemoryCache(1 << 20), None), files, tmp


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=st.lists(path_st, min_size=1, max_size=25),
       prefix=st.sampled_from(["", "a", "a/", "a-", "a/a", "b/", "é", "zz"]),
       after=st.sampled_from(["", "a", "a-b", "a/", "a/a.b", "a0/b", "ab", "é/a", "zz"]),
       recurse=st.booleans())
def test_walk_matches_the_reference(paths: list[str], prefix: str, after: str,
                                    recurse: bool) -> None:
    catalog, files, tmp = committed(paths)
    with tmp:
        if not recurse and after.startswith(prefix) and "/" in after[len(prefix):].rstrip("/"):
            after = ""  # a delimiter listing starts after an item it gave: not inside a group
        assert walk(catalog, prefix, after, recurse) == reference(files, prefix, after,
                                                                   recurse)


@settings(max_examples=25, deadline=None)
@given(paths=st.lists(path_st, min_size=1, max_size=25), page=st.integers(1, 4),
       recurse=st.booleans())
def test_pages_joined_equal_one_listing(paths: list[str], page: int, recurse: bool) -> None:
    catalog, files, tmp = committed(paths)
    with tmp:
        whole = walk(catalog, "", "", recurse)
        assert whole == reference(files, "", "", recurse)
        joined: list[str] = []
        after = ""
        for _ in itertools.count():
            items = walk(catalog, "", after, recurse)[:page]
            if not items:
                break
            joined += items
            after = items[-1]
        assert joined == whole
