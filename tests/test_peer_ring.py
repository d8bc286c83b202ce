"""The peer ring (`cachefs.peer.ring`): rendezvous hashing and member lists.

- every node computes the same owner from the same members, in any order;
- a member leaving moves only its own chunks (each to its next-ranked member), one joining
  takes about 1/N of them and nothing else moves;
- shares are even; member lists parse as HOST:PORT, duplicates and comments dropped, and a
  malformed one is a clear UsageError.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.dataset.objects import hash_bytes
from cachefs.errors import UsageError
from cachefs.peer.ring import owner, parse_member, parse_members, rank, shares

CHUNKS = [hash_bytes(str(i).encode()) for i in range(4000)]
MEMBERS = [f"10.0.0.{i}:7470" for i in range(1, 9)]


def test_every_order_of_the_members_gives_the_same_ranking() -> None:
    shuffled = MEMBERS[:]
    random.Random(3).shuffle(shuffled)
    for chunk in CHUNKS[:200]:
        assert rank(MEMBERS, chunk) == rank(shuffled, chunk)
        assert owner(MEMBERS, chunk) == owner(shuffled, chunk) == rank(MEMBERS, chunk)[0]
    assert owner([], CHUNKS[0]) is None and rank([], CHUNKS[0]) == []


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=2, max_value=12), st.integers(min_value=0, max_value=11))
def test_a_member_leaving_moves_only_its_chunks_to_their_next_member(n: int, gone: int) -> None:
    members = [f"node-{i}:7470" for i in range(n)]
    leaving = members[gone % n]
    rest = [m for m in members if m != leaving]
    for chunk in CHUNKS[:300]:
        before = rank(members, chunk)
        after = owner(rest, chunk)
        if before[0] == leaving:
            assert after == before[1]
        else:
            assert after == before[0]


def test_a_member_joining_takes_about_one_nth_and_nothing_else_moves() -> None:
    joined = [*MEMBERS, "10.0.0.99:7470"]
    moved = 0
    for chunk in CHUNKS:
        old, new = owner(MEMBERS, chunk), owner(joined, chunk)
        if old != new:
            assert new == "10.0.0.99:7470"
            moved += 1
    assert abs(moved / len(CHUNKS) - 1 / len(joined)) < 0.03


def test_shares_are_even() -> None:
    share = shares(MEMBERS, CHUNKS)
    assert sum(share.values()) == pytest.approx(1.0)
    assert all(abs(s - 1 / len(MEMBERS)) < 0.03 for s in share.values())


def test_member_lists() -> None:
    assert parse_member(" 127.0.0.1:07470 ") == "127.0.0.1:7470"
    assert parse_member("[::1]:7470") == "[::1]:7470"
    assert parse_members("a:1, b:2\nc:3  # a comment\n# only a comment\na:1") == \
        ["a:1", "b:2", "c:3"]
    for bad in ("nohost", "h:", ":80", "h:0", "h:70000", "h:x", "::1:7470"):
        with pytest.raises(UsageError):
            parse_member(bad)
