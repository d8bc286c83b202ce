"""Property tests of the object model: tree and commit encodings, validation, chunk packing."""

from __future__ import annotations

import os

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.dataset.objects import (
    COMMIT_MAGIC,
    MAX_CHUNK_SIZE,
    TREE_MAGIC,
    Commit,
    Extent,
    Kind,
    Tree,
    TreeEntry,
    decode_commit,
    decode_tree,
    encode,
    hash_bytes,
)
from cachefs.dataset.packing import ChunkPacker, ChunkSlot
from cachefs.errors import CorruptObject, InvalidName

hashes = st.binary(min_size=32, max_size=32).map(bytes.hex)
names = st.text(
    alphabet=st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
    min_size=1, max_size=40,
).filter(lambda n: n not in (".", ".."))


@st.composite
def entries(draw: st.DrawFn, name: str) -> TreeEntry:
    kind = draw(st.sampled_from(list(Kind)))
    mode = draw(st.integers(0, 0o7777))
    mtime = draw(st.integers(-(2**62), 2**62))
    if kind is Kind.FILE:
        extents = tuple(draw(st.lists(
            st.integers(0, MAX_CHUNK_SIZE).flatmap(lambda length: st.builds(
                Extent, hashes, st.integers(0, MAX_CHUNK_SIZE - length), st.just(length))),
            max_size=5)))
        return TreeEntry(name, kind, mode, sum(x.length for x in extents), mtime,
                         draw(hashes), extents)
    if kind is Kind.SYMLINK:
        target = draw(st.text(alphabet=st.characters(blacklist_characters="\0",
                                                     blacklist_categories=("Cs",)),
                              min_size=1, max_size=60))
        return TreeEntry(name, kind, mode, len(os.fsencode(target)), mtime, draw(hashes),
                         target=target)
    return TreeEntry(name, kind, mode, 0, mtime, draw(hashes))


@st.composite
def trees(draw: st.DrawFn) -> Tree:
    entry_names = draw(st.lists(names, unique=True, max_size=30))
    return Tree.from_entries([draw(entries(n)) for n in entry_names])


@given(trees())
@settings(max_examples=200, deadline=None)
def test_tree_round_trip(tree: Tree) -> None:
    name, stored = encode(tree)
    decoded = decode_tree(name, stored)
    assert decoded.entries == tree.entries
    assert encode(decoded)[0] == name  # canonical: same tree, same name
    for entry in tree.entries:
        assert decoded.get(entry.name) == entry


@given(trees(), st.data())
@settings(max_examples=100, deadline=None)
def test_tree_flipped_bit_never_yields_wrong_entries(tree: Tree, data: st.DataObject) -> None:
    """A flipped bit is detected, or it hit only the zstd envelope (the content hash matches)."""
    name, stored = encode(tree)
    i = data.draw(st.integers(0, len(stored) - 1))
    damaged = bytearray(stored)
    damaged[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        decoded = decode_tree(name, bytes(damaged))
    except CorruptObject as e:
        assert e.object_name == name
    else:
        assert decoded.entries == tree.entries


def test_tree_flipped_content_byte_is_detected() -> None:
    tree = Tree.from_entries([TreeEntry("a", Kind.DIR, 0o755, 0, 0, "0" * 64)])
    name, stored = encode(tree)
    body = zstandard.ZstdDecompressor().decompress(stored[4:])
    damaged = TREE_MAGIC + zstandard.ZstdCompressor().compress(body.replace(b"a", b"b", 1))
    with pytest.raises(CorruptObject, match="do not match its hash") as info:
        decode_tree(name, damaged)
    assert info.value.object_name == name


def _forge_tree(rows: list) -> tuple[str, bytes]:
    """A tree whose hash is right but whose content breaks the rules (what an attacker stores)."""
    body = msgpack.packb(rows, use_bin_type=True)
    return hash_bytes(TREE_MAGIC + body), TREE_MAGIC + zstandard.ZstdCompressor().compress(body)


@pytest.mark.parametrize("bad", [b"..", b".", b"", b"a/b", b"../../etc", b"x\0y", b"/abs"])
def test_decode_rejects_path_traversal_names(bad: bytes) -> None:
    name, stored = _forge_tree([[bad, int(Kind.DIR), 0o755, 0, 0, bytes(32), None]])
    with pytest.raises(CorruptObject, match=name):
        decode_tree(name, stored)


def test_decode_rejects_unsorted_duplicate_and_inconsistent_entries() -> None:
    row = [b"b", int(Kind.DIR), 0o755, 0, 0, bytes(32), None]
    for rows in ([row, [b"a", *row[1:]]], [row, row],
                 [[b"f", int(Kind.FILE), 0o644, 10, 0, bytes(32), [bytes(32), 0, 9]]],
                 [[b"f", 9, 0o644, 0, 0, bytes(32), None]],
                 [[b"f", int(Kind.FILE), 0o644, -1, 0, bytes(32), []]]):
        name, stored = _forge_tree(rows)
        with pytest.raises(CorruptObject):
            decode_tree(name, stored)


def test_tree_from_entries_rejects_duplicates() -> None:
    e = TreeEntry("a", Kind.DIR, 0o755, 0, 0, "0" * 64)
    with pytest.raises(InvalidName):
        Tree.from_entries([e, e])


def test_commit_round_trip_and_corruption() -> None:
    commit = Commit("a" * 64, ("b" * 64,), "ds", "me@host", "msg\nbody", 123, 4, 5)
    name, stored = encode(commit)
    assert decode_commit(name, stored) == commit
    assert stored.startswith(COMMIT_MAGIC)
    with pytest.raises(CorruptObject):
        decode_commit(name, stored[:-1] + bytes([stored[-1] ^ 1]))
    with pytest.raises(CorruptObject):
        decode_tree(name, stored)  # a commit is never mistaken for a tree


@given(st.lists(st.integers(0, 3000), max_size=40), st.sampled_from([256, 1000, 1024]))
@settings(max_examples=200, deadline=None)
def test_packing_reassembles_every_file(sizes: list[int], chunk_size: int) -> None:
    chunks: dict[str, bytes] = {}
    sealed_order: list[str] = []

    def seal(slot: ChunkSlot, data: bytes | bytearray) -> None:
        assert 0 < len(data) <= chunk_size
        slot.name = hash_bytes(data)
        chunks[slot.name] = bytes(data)
        sealed_order.append(slot.name)

    packer = ChunkPacker(chunk_size, seal)
    files = [os.urandom(n) for n in sizes]
    extents = [packer.add_file(f) for f in files]
    packer.flush()
    previous: tuple[str, int] | None = None
    for data, file_extents in zip(files, extents, strict=True):
        resolved = [x.resolve() for x in file_extents]
        rebuilt = b"".join(chunks[x.chunk][x.offset : x.offset + x.length] for x in resolved)
        assert rebuilt == data
        if 0 < len(data) < chunk_size:
            assert len(resolved) == 1  # a small file never spans two chunks
            here = (resolved[0].chunk, resolved[0].offset)
            if previous is not None and previous[0] == here[0]:
                assert here[1] > previous[1]  # packed in the order given (path order)
            previous = here
        elif data:
            assert all(x.offset == 0 for x in resolved)
            assert [x.length for x in resolved[:-1]] == [chunk_size] * (len(resolved) - 1)


def test_packing_seals_when_next_file_does_not_fit() -> None:
    sealed: list[int] = []

    def seal(slot: ChunkSlot, data: bytes | bytearray) -> None:
        slot.name = hash_bytes(data)
        sealed.append(len(data))

    packer = ChunkPacker(100, seal)
    packer.add_file(b"a" * 60)
    packer.add_file(b"b" * 30)
    packer.add_file(b"c" * 20)  # 60 + 30 + 20 > 100: seals the first pack of 90
    packer.add_file(b"d" * 100)  # exactly one chunk: a chunk of its own
    packer.flush()
    assert sealed == [90, 100, 20]
