"""The immutable object model: chunks, extents, trees and commits, and their versioned encodings.

Every object is named by the BLAKE3 hash (64 hex characters) of its canonical bytes. A chunk is
stored raw, so its name is the hash of exactly the stored bytes and a byte range of it can be read
directly. Trees and commits are metadata: their canonical form is a 4-byte magic followed by
msgpack, and they are stored as the same magic followed by the zstd-compressed msgpack; the name
is the hash of the canonical (uncompressed) form, so a compressor upgrade never renames a tree
and unchanged subtrees keep their names across versions.

Encodings (version 1, see docs/formats.md):

| object | canonical bytes | stored bytes |
| --- | --- | --- |
| tree   | b"cfT\\x01" + msgpack(list of entries) | b"cfT\\x01" + zstd(msgpack(...)) |
| commit | b"cfC\\x01" + msgpack(map)             | b"cfC\\x01" + zstd(msgpack(...)) |

A tree entry is the msgpack array `[name: bin, kind: int, mode: int, size: int, mtime_ns: int,
hash: bin(32), extra]`, entries strictly sorted by name bytes; `extra` is, for a file, a flat
array `[chunk: bin(32), offset, length, ...]` of its extents in file order; for a symlink, the
target as bin; for a directory, nil. Decoding validates everything (names, order, sizes), so a
tree from a store can never name '..' or a path with '/' in it.
"""

from __future__ import annotations

import bisect
import itertools
import os
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from typing import NamedTuple

import msgpack
import zstandard
from blake3 import blake3

from cachefs.errors import CorruptObject, InvalidName
from cachefs.names import check_entry_bytes

HASH_BYTES = 32
TREE_MAGIC = b"cfT\x01"
COMMIT_MAGIC = b"cfC\x01"
MAX_META_BYTES = 1 << 30  # a decompressed tree larger than this is refused as corrupt
DEFAULT_CHUNK_SIZE = 4 << 20
MIN_CHUNK_SIZE = 64 << 10
MAX_CHUNK_SIZE = 64 << 20
_ZSTD_LEVEL = 3


def hash_bytes(data: bytes | memoryview) -> str:
    """The object name of `data`: its BLAKE3 hash in lowercase hex."""
    return blake3(data).hexdigest()


@lru_cache(maxsize=64)
def zero_chunk_hash(length: int) -> str:
    """Name of a chunk of `length` zero bytes: sparse regions are recognised without reading."""
    return hash_bytes(bytes(length))


def verify_chunk(name: str, data: bytes | memoryview) -> None:
    """Raise CorruptObject unless `data` hashes to `name`."""
    if hash_bytes(data) != name:
        raise CorruptObject(f"chunk {name} is corrupt: its bytes do not match its hash", name)


def extent_bytes(chunk: str, data: bytes | memoryview, offset: int, length: int) -> memoryview:
    """The `length` bytes at `offset` of chunk `chunk` (its verified `data`), without a copy.

    A tree names its extents; the chunk's hash vouches only for the chunk. An extent that does
    not fit its chunk belongs to a tree that lies: CorruptObject, never a short slice (a short
    piece would shift every later byte of a read)."""
    view = memoryview(data)[offset : offset + length]
    if len(view) != length:
        raise CorruptObject(
            f"an extent ({offset}+{length}) does not fit chunk {chunk} ({len(data)} bytes)", chunk)
    return view


class Kind(IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3


class Extent(NamedTuple):
    """`length` bytes at `offset` inside chunk `chunk` (hex name)."""

    chunk: str
    offset: int
    length: int


# Named tuples, not dataclasses: a mount decodes trees of up to millions of entries, and a
# tuple is built several times faster (and is just as immutable).
class TreeEntry(NamedTuple):
    """One directory entry. `hash` is the content hash (file), tree name (dir) or target hash."""

    name: str
    kind: Kind
    mode: int
    size: int
    mtime_ns: int
    hash: str
    extents: tuple[Extent, ...] = ()
    target: str = ""

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR


def _name_key(name: str) -> bytes:
    return os.fsencode(name)


@dataclass(frozen=True)
class Tree:
    """One directory: its entries sorted by name bytes."""

    entries: tuple[TreeEntry, ...]
    _names: list[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not hasattr(self, "_names"):
            object.__setattr__(self, "_names", [_name_key(e.name) for e in self.entries])

    @classmethod
    def _decoded(cls, entries: tuple[TreeEntry, ...], names: list[bytes]) -> Tree:
        """A tree whose sorted raw names are already at hand (decoding)."""
        tree = cls.__new__(cls)
        object.__setattr__(tree, "entries", entries)
        object.__setattr__(tree, "_names", names)
        return tree

    @classmethod
    def from_entries(cls, entries: list[TreeEntry]) -> Tree:
        ordered = sorted(entries, key=lambda e: _name_key(e.name))
        for a, b in itertools.pairwise(ordered):
            if a.name == b.name:
                raise InvalidName(f"duplicate entry name {a.name!r} in a tree")
        return cls(tuple(ordered))

    def get(self, name: str) -> TreeEntry | None:
        key = _name_key(name)
        i = bisect.bisect_left(self._names, key)
        if i < len(self._names) and self._names[i] == key:
            return self.entries[i]
        return None

    def canonical(self) -> bytes:
        rows = []
        for e in self.entries:
            if e.kind is Kind.FILE:
                extra: object = [
                    v
                    for x in e.extents
                    for v in (bytes.fromhex(x.chunk), x.offset, x.length)
                ]
            elif e.kind is Kind.SYMLINK:
                extra = os.fsencode(e.target)
            else:
                extra = None
            rows.append(
                [os.fsencode(e.name), int(e.kind), e.mode, e.size, e.mtime_ns,
                 bytes.fromhex(e.hash), extra]
            )
        return TREE_MAGIC + msgpack.packb(rows, use_bin_type=True)


@dataclass(frozen=True)
class Commit:
    """One version of a dataset."""

    tree: str
    parents: tuple[str, ...]
    dataset: str
    author: str
    message: str
    time_ns: int
    files: int
    bytes: int

    def canonical(self) -> bytes:
        body = {
            "tree": self.tree,
            "parents": list(self.parents),
            "dataset": self.dataset,
            "author": self.author,
            "message": self.message,
            "time_ns": self.time_ns,
            "files": self.files,
            "bytes": self.bytes,
        }
        return COMMIT_MAGIC + msgpack.packb(body, use_bin_type=True)


def encode(obj: Tree | Commit) -> tuple[str, bytes]:
    """Return (name, stored bytes) of a tree or commit."""
    canonical = obj.canonical()
    magic, body = canonical[:4], canonical[4:]
    stored = magic + zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(body)
    return hash_bytes(canonical), stored


_META_KINDS = {TREE_MAGIC: "tree", COMMIT_MAGIC: "commit"}


def check_stored_meta(name: str, stored: bytes, magic: bytes) -> bytes:
    """Decompress a stored tree or commit and check it against its name; return the body.

    This is the integrity check (cheap: no parsing); decoding validates the content besides.
    """
    what = _META_KINDS[magic]
    if stored[:4] != magic:
        raise CorruptObject(f"{what} {name} is corrupt: bad header", name)
    try:
        body = zstandard.ZstdDecompressor().decompress(stored[4:], max_output_size=MAX_META_BYTES)
    except zstandard.ZstdError as e:
        raise CorruptObject(f"{what} {name} is corrupt: {e}", name) from e
    if hash_bytes(magic + body) != name:
        raise CorruptObject(f"{what} {name} is corrupt: its bytes do not match its hash", name)
    return body


def _decode_body(name: str, stored: bytes, magic: bytes, what: str) -> object:
    body = check_stored_meta(name, stored, magic)
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as e:
        raise CorruptObject(f"{what} {name} is corrupt: {e}", name) from e


def _hex(value: object) -> str:
    if type(value) is not bytes or len(value) != HASH_BYTES:
        raise ValueError("hash must be 32 bytes")
    return value.hex()


_KINDS = {int(k): k for k in Kind}
_FS_ENCODING = sys.getfilesystemencoding()


def _nonneg(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _decode_entry(row: object) -> TreeEntry:
    if not isinstance(row, list) or len(row) != 7:
        raise ValueError("entry must be a 7-element array")
    raw_name, kind_value, mode, size, mtime_ns, hash_value, extra = row
    if type(raw_name) is not bytes:
        raise ValueError("entry name must be bytes")
    name = check_entry_bytes(raw_name).decode(_FS_ENCODING, "surrogateescape")
    kind = _KINDS.get(kind_value)
    if kind is None:
        raise ValueError(f"bad entry kind {kind_value!r}")
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ValueError(f"bad mode {mode!r}")
    if not isinstance(mtime_ns, int):
        raise ValueError("bad mtime")
    size = _nonneg(size)
    extents: tuple[Extent, ...] = ()
    target = ""
    if kind is Kind.FILE:
        if type(extra) is not list or len(extra) % 3:
            raise ValueError("file extents must be triples")
        if len(extra) == 3:  # the common case: a small file, one extent
            offset = _nonneg(extra[1])
            if _nonneg(extra[2]) != size:
                raise ValueError(f"extents of {name!r} do not add up to its size")
            if offset + size > MAX_CHUNK_SIZE:
                raise ValueError(f"an extent of {name!r} ends past the largest chunk size")
            extents = (Extent(_hex(extra[0]), offset, size),)
            return TreeEntry(name, kind, mode, size, mtime_ns, _hex(hash_value), extents)
        extents = tuple(
            Extent(_hex(extra[i]), _nonneg(extra[i + 1]), _nonneg(extra[i + 2]))
            for i in range(0, len(extra), 3)
        )
        if sum(x.length for x in extents) != size:
            raise ValueError(f"extents of {name!r} do not add up to its size")
        if any(x.offset + x.length > MAX_CHUNK_SIZE for x in extents):
            raise ValueError(f"an extent of {name!r} ends past the largest chunk size")
    elif kind is Kind.SYMLINK:
        if not isinstance(extra, bytes) or not extra or b"\0" in extra:
            raise ValueError("bad symlink target")
        target = os.fsdecode(extra)
    elif extra is not None:
        raise ValueError("a directory entry has no extra data")
    return TreeEntry(name, kind, mode, size, mtime_ns, _hex(hash_value), extents, target)


def decode_tree(name: str, stored: bytes) -> Tree:
    """Decode and fully validate a stored tree; CorruptObject names it on any problem."""
    rows = _decode_body(name, stored, TREE_MAGIC, "tree")
    try:
        if not isinstance(rows, list):
            raise ValueError("a tree must be an array")
        entries = tuple(_decode_entry(row) for row in rows)
        keys = [row[0] for row in rows]  # raw name bytes, checked by _decode_entry
        if any(a >= b for a, b in itertools.pairwise(keys)):
            raise ValueError("entries are not strictly sorted by name")
    except (ValueError, InvalidName) as e:
        raise CorruptObject(f"tree {name} is invalid: {e}", name) from e
    return Tree._decoded(entries, keys)


def decode_commit(name: str, stored: bytes) -> Commit:
    """Decode and validate a stored commit; CorruptObject names it on any problem."""
    body = _decode_body(name, stored, COMMIT_MAGIC, "commit")
    try:
        if not isinstance(body, dict):
            raise ValueError("a commit must be a map")
        parents = body["parents"]
        if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
            raise ValueError("bad parents")
        commit = Commit(
            tree=str(body["tree"]),
            parents=tuple(parents),
            dataset=str(body["dataset"]),
            author=str(body["author"]),
            message=str(body["message"]),
            time_ns=int(body["time_ns"]),
            files=_nonneg(body["files"]),
            bytes=_nonneg(body["bytes"]),
        )
        for h in (commit.tree, *commit.parents):
            if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"bad object name {h!r}")
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptObject(f"commit {name} is invalid: {e}", name) from e
    return commit
