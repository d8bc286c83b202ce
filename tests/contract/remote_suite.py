"""The shared remote conformance suite: every backend must pass these, run against a real server.

Written once as abstract test classes (trio/fsspec style). A backend's test module subclasses
them as ``TestXxx(RemoteContract, RefContract)`` and supplies a `remote` fixture that yields a
fresh, empty `cachefs.remotes.base.Remote` (and closes it afterwards). The class names do not
start with ``Test``, so pytest collects them only through such subclasses.

- `RemoteContract`: the object interface (get with ranges, put, put_if_absent, has, list,
  delete, flush, close).
- `RefContract`: the ref protocol built on it (`cachefs.dataset.refs.GenerationRefStore`):
  compare-and-swap, races, listing, reflog, name checks and corrupt generation objects.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from cachefs.dataset.refs import GenerationRefStore, RefValue
from cachefs.errors import CorruptObject, InvalidName, ObjectNotFound, RefConflict
from cachefs.remotes.base import Remote

T = TypeVar("T")

RACERS = 8
JOIN_TIMEOUT = 30.0  # seconds; well under pytest-timeout, so a hang fails with a clear message


def race(n: int, fn: Callable[[int], T]) -> list[T | BaseException]:
    """Run fn(0..n-1) in n threads released together; return each result or exception."""
    barrier = threading.Barrier(n, timeout=JOIN_TIMEOUT)

    def run(i: int) -> T | BaseException:
        barrier.wait()
        try:
            return fn(i)
        except Exception as e:
            return e

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(run, i) for i in range(n)]
        return [f.result(timeout=JOIN_TIMEOUT) for f in futures]


def commit_hash(label: str) -> str:
    """A well-formed (64 hex) commit name derived from `label`."""
    return hashlib.sha256(label.encode()).hexdigest()


class RemoteContract:
    """Conformance tests for the object interface of a Remote."""

    @pytest.fixture
    def remote(self) -> Iterator[Remote]:
        raise NotImplementedError("a backend's test class must provide the `remote` fixture")

    def test_is_a_remote(self, remote: Remote) -> None:
        assert isinstance(remote, Remote)
        assert isinstance(remote.url, str) and "://" in remote.url

    # --- put / get -------------------------------------------------------------------------

    def test_round_trip_bytes(self, remote: Remote) -> None:
        remote.put("objects/ab/cdef", b"hello world")
        assert remote.get("objects/ab/cdef") == b"hello world"

    def test_round_trip_memoryview(self, remote: Remote) -> None:
        buf = bytearray(b"--payload of a memoryview--")
        remote.put("mv", memoryview(buf)[2:-2])
        assert remote.get("mv") == b"payload of a memoryview"

    def test_round_trip_empty(self, remote: Remote) -> None:
        remote.put("empty", b"")
        assert remote.get("empty") == b""
        assert remote.has(["empty"]) == {"empty"}

    def test_round_trip_5_mib(self, remote: Remote) -> None:
        data = os.urandom(5 * 1024 * 1024)
        remote.put("big", data)
        got = remote.get("big")
        assert len(got) == len(data) and got == data

    def test_get_returns_bytes(self, remote: Remote) -> None:
        remote.put("k", memoryview(b"abc"))
        assert type(remote.get("k")) is bytes
        assert type(remote.get("k", 1, 1)) is bytes

    def test_ranged_get(self, remote: Remote) -> None:
        data = bytes(range(256)) * 4
        remote.put("ranged", data)
        assert remote.get("ranged", 0) == data
        assert remote.get("ranged", 10) == data[10:]
        assert remote.get("ranged", 10, 20) == data[10:30]
        assert remote.get("ranged", 0, 1) == data[:1]
        assert remote.get("ranged", len(data) - 1) == data[-1:]
        assert remote.get("ranged", 1000, 100) == data[1000:]  # length runs past the end
        assert remote.get("ranged", 0, 10 * len(data)) == data

    def test_ranged_get_past_end_is_empty(self, remote: Remote) -> None:
        remote.put("ranged", b"0123456789")
        assert remote.get("ranged", 10) == b""
        assert remote.get("ranged", 10, 5) == b""
        assert remote.get("ranged", 1000) == b""
        assert remote.get("ranged", 1000, 1) == b""

    def test_ranged_get_length_zero(self, remote: Remote) -> None:
        remote.put("ranged", b"0123456789")
        assert remote.get("ranged", 0, 0) == b""
        assert remote.get("ranged", 5, 0) == b""
        assert remote.get("ranged", 100, 0) == b""

    def test_ranged_get_of_empty_object(self, remote: Remote) -> None:
        remote.put("empty", b"")
        assert remote.get("empty", 0, 5) == b""
        assert remote.get("empty", 3) == b""

    def test_get_missing_raises_object_not_found(self, remote: Remote) -> None:
        remote.put("present", b"x")
        for key in ("absent", "nested/absent/key", "present/below"):
            for start, length in [(0, None), (0, 10), (5, None), (5, 0), (0, 0)]:
                with pytest.raises(ObjectNotFound):
                    remote.get(key, start, length)

    def test_put_is_idempotent(self, remote: Remote) -> None:
        for _ in range(3):
            remote.put("same", b"same bytes")
        assert remote.get("same") == b"same bytes"
        assert list(remote.list("same")) == ["same"]

    # --- put_if_absent ---------------------------------------------------------------------

    def test_put_if_absent_creates_once(self, remote: Remote) -> None:
        assert remote.put_if_absent("once", b"first") is True
        assert remote.put_if_absent("once", b"second") is False
        assert remote.put_if_absent("once", b"first") is False
        assert remote.get("once") == b"first"

    def test_put_if_absent_over_put_object(self, remote: Remote) -> None:
        remote.put("existing", b"put")
        assert remote.put_if_absent("existing", b"other") is False
        assert remote.get("existing") == b"put"

    def test_put_if_absent_after_delete(self, remote: Remote) -> None:
        assert remote.put_if_absent("k", b"1") is True
        remote.delete("k")
        assert remote.put_if_absent("k", b"2") is True
        assert remote.get("k") == b"2"

    def test_concurrent_put_if_absent_one_winner(self, remote: Remote) -> None:
        results = race(RACERS, lambda i: remote.put_if_absent("contended", f"writer {i}".encode()))
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        assert results.count(True) == 1, results
        assert results.count(False) == RACERS - 1, results
        winner = results.index(True)
        assert remote.get("contended") == f"writer {winner}".encode()

    # --- has -------------------------------------------------------------------------------

    def test_has_many(self, remote: Remote) -> None:
        present = [f"objects/{i:02x}/{i:064x}" for i in range(0, 40, 2)]
        missing = [f"objects/{i:02x}/{i:064x}" for i in range(1, 40, 2)]
        for key in present:
            remote.put(key, key.encode())
        missing += ["objects/zz", "nothing-here", present[0] + "x", present[0][:-1]]
        query = [k for pair in zip(present, missing) for k in pair] + missing[len(present) :]
        assert remote.has(query) == set(present)
        assert remote.has(iter(query)) == set(present)  # any iterable, consumed once
        assert remote.has(query + query) == set(present)  # duplicates are harmless

    def test_has_edge_cases(self, remote: Remote) -> None:
        remote.put("a/b", b"x")
        assert remote.has([]) == set()
        assert remote.has(["a/b"]) == {"a/b"}
        assert remote.has(["a/c"]) == set()
        assert remote.has(["a"]) == set()  # a "directory" is not an object

    # --- list ------------------------------------------------------------------------------

    KEYS = (
        "ab",
        "a/b/c1",
        "a/b/c10",
        "a/b/c2",
        "a/b/d/e/f",
        "a/b2/x",
        "a/bc",
        "b/a",
        "refs/ds/heads/main/00000000000000000001",
        "refs/ds/heads/main/00000000000000000002",
        "refs/ds/heads/main2/00000000000000000001",
    )

    @pytest.fixture
    def listed(self, remote: Remote) -> Remote:
        for key in self.KEYS:
            remote.put(key, key.encode())
        return remote

    PREFIXES = (
        "",
        "a",
        "a/",
        "a/b",  # ends mid-name: matches a/b/..., a/b2/... and a/bc
        "a/b/",
        "a/b/c",
        "a/b/c1",  # a whole key and a longer one
        "a/b/d/",
        "a/b/d/e/f",
        "refs/ds/heads/main",
        "refs/ds/heads/main/",
        "refs/ds/",
        "b",
        "zzz",
        "a/b/c1/",  # below a key that is not a "directory"
        "no/such/dir/",
    )

    def test_list_prefix(self, listed: Remote) -> None:
        wrong = {}
        for prefix in self.PREFIXES:
            got = list(listed.list(prefix))
            want = sorted(k for k in self.KEYS if k.startswith(prefix))
            if got != want:
                wrong[prefix] = {"got": got, "want": want}
        assert not wrong

    def test_list_is_lexicographic(self, listed: Remote) -> None:
        got = list(listed.list(""))
        assert got == sorted(self.KEYS)
        assert got.index("a/b/c10") < got.index("a/b/c2")
        assert got.index("a/b/d/e/f") < got.index("a/b2/x") < got.index("a/bc") < got.index("ab")

    def test_list_empty_remote(self, remote: Remote) -> None:
        assert list(remote.list("")) == []
        assert list(remote.list("refs/")) == []

    def test_list_after_delete(self, listed: Remote) -> None:
        listed.delete("a/b/c1")
        listed.delete("a/b/d/e/f")
        assert list(listed.list("a/b/")) == ["a/b/c10", "a/b/c2"]

    def test_list_many(self, remote: Remote) -> None:
        keys = [f"many/{i:05d}" for i in range(1050)]  # more than one S3 page (1000)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: remote.put(k, b""), keys))
        assert list(remote.list("many/")) == keys

    def test_list_info_matches_list(self, listed: Remote) -> None:
        for prefix in ("", "a/b/", "zzz"):
            infos = list(listed.list_info(prefix))
            assert [i.key for i in infos] == list(listed.list(prefix))
        sizes = {i.key: i.size for i in listed.list_info("")}
        assert sizes == {k: len(listed.get(k)) for k in self.KEYS}

    def test_list_info_times_and_etags(self, remote: Remote) -> None:
        before_ns = time.time_ns()
        remote.put("obj", b"first")
        (first,) = remote.list_info("obj")
        # Store clocks may be second-granular (S3 LastModified) and a little skewed.
        assert abs(first.mtime_ns - before_ns) < 120 * 10**9
        assert first.etag
        remote.put("obj", b"second, longer")
        (second,) = remote.list_info("obj")
        assert second.size == len(b"second, longer")
        assert second.etag != first.etag
        remote.put("same", b"first")
        (same,) = remote.list_info("same")
        assert same.size == first.size

    # --- delete ----------------------------------------------------------------------------

    def test_delete_present(self, remote: Remote) -> None:
        remote.put("doomed", b"x")
        remote.put("kept", b"y")
        remote.delete("doomed")
        assert remote.has(["doomed", "kept"]) == {"kept"}
        with pytest.raises(ObjectNotFound):
            remote.get("doomed")
        assert list(remote.list("")) == ["kept"]
        assert remote.get("kept") == b"y"

    def test_delete_absent_is_silent(self, remote: Remote) -> None:
        remote.delete("never-existed")
        remote.delete("no/such/nested/key")
        remote.put("file", b"x")
        remote.delete("file/below")  # below an object (a file, on a file system)
        remote.delete("file")
        remote.put("once", b"x")
        remote.delete("once")
        remote.delete("once")
        assert list(remote.list("")) == []

    # --- flush / close ---------------------------------------------------------------------

    def test_flush(self, remote: Remote) -> None:
        remote.flush()  # nothing written yet
        remote.put("durable", b"x")
        assert remote.put_if_absent("durable-too", b"y")
        remote.flush()
        assert remote.get("durable") == b"x"
        assert remote.get("durable-too") == b"y"

    def test_close_twice(self, remote: Remote) -> None:
        remote.put("k", b"v")
        assert remote.has(["k", "k2"]) == {"k"}  # starts any worker pool
        remote.close()
        remote.close()


class RefContract:
    """Conformance tests for refs on a Remote through GenerationRefStore (put-if-absent)."""

    DATASET = "imagenet-1k"

    @pytest.fixture
    def remote(self) -> Iterator[Remote]:
        raise NotImplementedError("a backend's test class must provide the `remote` fixture")

    @pytest.fixture
    def refs(self, remote: Remote) -> GenerationRefStore:
        return GenerationRefStore(remote)

    def test_absent_ref(self, refs: GenerationRefStore) -> None:
        assert refs.read(self.DATASET, "heads", "main") == RefValue(None, 0)
        assert refs.read(self.DATASET, "tags", "v1") == RefValue(None, 0)
        assert refs.list(self.DATASET, "heads") == {}
        assert refs.history(self.DATASET, "heads", "main") == []

    def test_compare_and_swap_advances(self, refs: GenerationRefStore) -> None:
        c1, c2 = commit_hash("c1"), commit_hash("c2")
        v1 = refs.compare_and_swap(self.DATASET, "heads", "main", RefValue(None, 0), c1, "commit")
        assert v1 == RefValue(c1, 1)
        assert refs.read(self.DATASET, "heads", "main") == v1
        v2 = refs.compare_and_swap(self.DATASET, "heads", "main", v1, c2, "commit")
        assert v2 == RefValue(c2, 2)
        assert refs.read(self.DATASET, "heads", "main") == v2
        # Another store over the same remote (another process) sees the same value.
        assert GenerationRefStore(refs.remote).read(self.DATASET, "heads", "main") == v2

    def test_refs_are_independent(self, refs: GenerationRefStore) -> None:
        c1, c2 = commit_hash("c1"), commit_hash("c2")
        refs.compare_and_swap(self.DATASET, "heads", "main", RefValue(None, 0), c1, "a")
        refs.compare_and_swap(self.DATASET, "tags", "main", RefValue(None, 0), c2, "b")
        refs.compare_and_swap("other", "heads", "main", RefValue(None, 0), c2, "c")
        assert refs.read(self.DATASET, "heads", "main") == RefValue(c1, 1)
        assert refs.read(self.DATASET, "tags", "main") == RefValue(c2, 1)
        assert refs.read("other", "heads", "main") == RefValue(c2, 1)
        assert refs.read(self.DATASET, "heads", "mai") == RefValue(None, 0)

    def test_stale_compare_and_swap_conflicts(self, refs: GenerationRefStore) -> None:
        c1, c2, c3 = commit_hash("c1"), commit_hash("c2"), commit_hash("c3")
        v1 = refs.compare_and_swap(self.DATASET, "heads", "main", RefValue(None, 0), c1, "a")
        v2 = refs.compare_and_swap(self.DATASET, "heads", "main", v1, c2, "b")
        before = list(refs.remote.list("refs/"))
        for stale in (v1, RefValue(None, 0)):
            with pytest.raises(RefConflict):
                refs.compare_and_swap(self.DATASET, "heads", "main", stale, c3, "stale")
        assert refs.read(self.DATASET, "heads", "main") == v2
        assert list(refs.remote.list("refs/")) == before
        assert [e.commit for e in refs.history(self.DATASET, "heads", "main")] == [c2, c1]

    def test_racing_compare_and_swap_one_winner(self, remote: Remote) -> None:
        base = GenerationRefStore(remote)
        v1 = base.compare_and_swap(
            self.DATASET, "heads", "main", RefValue(None, 0), commit_hash("base"), "base"
        )
        commits = [commit_hash(f"racer {i}") for i in range(RACERS)]

        def attempt(i: int) -> RefValue:
            # One store per thread, as if each were its own process.
            store = GenerationRefStore(remote)
            return store.compare_and_swap(self.DATASET, "heads", "main", v1, commits[i], "race")

        results = race(RACERS, attempt)
        wins = [r for r in results if isinstance(r, RefValue)]
        others = [r for r in results if not isinstance(r, RefValue)]
        assert len(wins) == 1, results
        assert all(isinstance(r, RefConflict) for r in others), others
        assert wins[0].generation == 2
        assert base.read(self.DATASET, "heads", "main") == wins[0]
        history = base.history(self.DATASET, "heads", "main")
        assert [e.generation for e in history] == [2, 1]
        assert history[0].commit == wins[0].commit and history[0].previous == v1.commit

    def test_list_current_names(self, refs: GenerationRefStore) -> None:
        ds = self.DATASET
        c1, c2, c3 = commit_hash("c1"), commit_hash("c2"), commit_hash("c3")
        main = refs.compare_and_swap(ds, "heads", "main", RefValue(None, 0), c1, "a")
        refs.compare_and_swap(ds, "heads", "main", main, c2, "b")
        dev = refs.compare_and_swap(ds, "heads", "dev", RefValue(None, 0), c1, "c")
        refs.compare_and_swap(ds, "heads", "feature.x", RefValue(None, 0), c3, "d")
        refs.compare_and_swap(ds, "tags", "v1.0", RefValue(None, 0), c1, "e")
        assert refs.list(ds, "heads") == {"dev": c1, "feature.x": c3, "main": c2}
        deleted = refs.compare_and_swap(ds, "heads", "dev", dev, None, "delete")
        assert deleted == RefValue(None, 2)
        assert refs.read(ds, "heads", "dev") == RefValue(None, 2)
        assert refs.list(ds, "heads") == {"feature.x": c3, "main": c2}
        assert refs.list(ds, "tags") == {"v1.0": c1}
        assert refs.list("other", "heads") == {}
        # A deleted ref can be recreated from its deletion.
        assert refs.compare_and_swap(ds, "heads", "dev", deleted, c3, "f") == RefValue(c3, 3)
        assert refs.list(ds, "heads") == {"dev": c3, "feature.x": c3, "main": c2}

    def test_history_newest_first(self, refs: GenerationRefStore) -> None:
        c1, c2, c3 = commit_hash("c1"), commit_hash("c2"), commit_hash("c3")
        v = RefValue(None, 0)
        for commit, reason in [(c1, "first"), (c2, "second"), (None, "delete"), (c3, "again")]:
            v = refs.compare_and_swap(self.DATASET, "heads", "main", v, commit, reason)
        history = refs.history(self.DATASET, "heads", "main")
        assert [e.generation for e in history] == [4, 3, 2, 1]
        assert [e.commit for e in history] == [c3, None, c2, c1]
        assert [e.previous for e in history] == [None, c2, c1, None]
        assert [e.reason for e in history] == ["again", "delete", "second", "first"]
        assert all(e.who for e in history)
        times = [e.time_ns for e in history]
        assert times == sorted(times, reverse=True) and times[-1] > 0

    BAD_NAMES = (
        ("", "main"),
        ("../escape", "main"),
        ("a/b", "main"),
        (".hidden", "main"),
        ("-dash", "main"),
        ("ds", ""),
        ("ds", "a/b"),
        ("ds", ".."),
        ("ds", "-x"),
        ("ds", "x" * 129),
        ("ds", "spa ce"),
    )

    def test_invalid_names(self, refs: GenerationRefStore) -> None:
        commit = commit_hash("c")
        for dataset, name in self.BAD_NAMES:
            with pytest.raises(InvalidName):
                refs.read(dataset, "heads", name)
            with pytest.raises(InvalidName):
                refs.compare_and_swap(dataset, "heads", name, RefValue(None, 0), commit, "x")
            with pytest.raises(InvalidName):
                refs.history(dataset, "heads", name)
            if dataset != "ds":
                with pytest.raises(InvalidName):
                    refs.list(dataset, "heads")
        assert list(refs.remote.list("refs/")) == []

    def test_invalid_commit(self, refs: GenerationRefStore) -> None:
        for commit in ["", "abc", "G" * 64, commit_hash("c").upper(), commit_hash("c") + "0"]:
            with pytest.raises(InvalidName):
                refs.compare_and_swap(self.DATASET, "heads", "main", RefValue(None, 0), commit, "x")
        assert list(refs.remote.list("refs/")) == []

    CORRUPT = (
        b"not json",
        b"\xff\xfe\x00",
        b"",
        b"[]",
        b"null",
        b'"a string"',
        b"{}",
        b'{"commit": 42}',
        b'{"commit": "not-a-hash"}',
        b'{"commit": null, "previous": "zz"}',
    )

    def test_corrupt_generation_object(self, refs: GenerationRefStore) -> None:
        good = refs.compare_and_swap(
            self.DATASET, "heads", "good", RefValue(None, 0), commit_hash("c"), "x"
        )
        for i, raw in enumerate(self.CORRUPT):
            name = f"bad{i}"
            key = f"refs/{self.DATASET}/heads/{name}/{1:020d}"
            refs.remote.put(key, raw)
            with pytest.raises(CorruptObject) as info:
                refs.read(self.DATASET, "heads", name)
            assert info.value.object_name == key, raw
            with pytest.raises(CorruptObject):
                refs.history(self.DATASET, "heads", name)
            with pytest.raises(CorruptObject):
                refs.list(self.DATASET, "heads")
            refs.remote.delete(key)
        assert refs.list(self.DATASET, "heads") == {"good": good.commit}

    def test_corrupt_newest_generation_blocks_updates(self, refs: GenerationRefStore) -> None:
        v1 = refs.compare_and_swap(
            self.DATASET, "heads", "main", RefValue(None, 0), commit_hash("c1"), "x"
        )
        refs.remote.put(f"refs/{self.DATASET}/heads/main/{2:020d}", b"garbage")
        with pytest.raises(CorruptObject):
            refs.read(self.DATASET, "heads", "main")
        # Generation 2 exists, so v1 is stale: the update fails (as a conflict, or on reading
        # the corrupt value to report it) and writes nothing.
        with pytest.raises((RefConflict, CorruptObject)):
            refs.compare_and_swap(self.DATASET, "heads", "main", v1, commit_hash("c2"), "y")
        assert len(list(refs.remote.list(f"refs/{self.DATASET}/heads/main/"))) == 2
