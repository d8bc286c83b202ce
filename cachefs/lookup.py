"""Read-path extent lookup: which pieces of which chunks cover a read of (offset, size) in a file.

A file's content is a tuple of extents `(chunk, offset in chunk, length)` in file order
(`cachefs.dataset.objects.Extent`). `FileLayout` is built once per file from those extents and
keeps them as flat `array('q')` columns: each extent's start offset in the file (cumulative), its
offset inside its chunk, its length, and an index into `chunks`, the file's distinct chunk names in
order of first use. The query `FileLayout.pieces(offset, size)` is on the hot path of every FUSE
read: it returns the covering pieces in file order as `(extent index, offset inside that extent's
chunk, length)`, clipped to the end of the file, so a read at or after EOF, or of 0 bytes, is [].
Zero-length extents never produce a piece.

Two implementations give identical answers (checked by property tests):

- `pieces_reference`: plain Python (a hand-written binary search, then a loop), the reference the
  compiled version is tested and benchmarked against;
- `cachefs._lookup`: the same algorithm in Cython over typed memoryviews, built at install time
  (`setup.py`). `COMPILED` says whether it is in use; without it a warning is logged once and
  `FileLayout.pieces` falls back to the reference.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Iterable, Sequence

from cachefs.dataset.objects import Extent, TreeEntry

log = logging.getLogger("cachefs.lookup")

Piece = tuple[int, int, int]
"""(extent index, offset inside that extent's chunk, length)."""

_INT64_MAX = (1 << 63) - 1

try:
    from cachefs import _lookup
except ImportError as e:  # pragma: no cover - exercised only without a build
    _lookup = None  # type: ignore[assignment]
    COMPILED: bool = False
    log.warning("cachefs._lookup (the compiled extent lookup) is not built: using the slower "
                "pure-Python reference instead (%s); reinstall with `pip install .`", e)
else:
    COMPILED = True


def _check_query(offset: int, size: int) -> None:
    # The same errors, in the same order, as the compiled version's argument conversion.
    for value in (offset, size):
        if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            raise OverflowError(f"read offset or size out of int64 range: {value}")
    if offset < 0 or size < 0:
        raise ValueError(f"negative read offset or size: offset={offset} size={size}")


def pieces_reference(starts: Sequence[int], chunk_offsets: Sequence[int],
                     lengths: Sequence[int], offset: int, size: int) -> list[Piece]:
    """The pure-Python reference: pieces covering `size` bytes at `offset`, clipped to EOF.

    `starts`, `chunk_offsets` and `lengths` are the per-extent columns of a `FileLayout` (same
    length; `starts` cumulative). Deliberately plain Python (no bisect or other C helpers): it is
    what the Cython version is checked and benchmarked against.
    """
    _check_query(offset, size)
    n = len(starts)
    if n != len(chunk_offsets) or n != len(lengths):
        raise ValueError("starts, chunk_offsets and lengths differ in length")
    if n == 0:
        return []
    end = starts[n - 1] + lengths[n - 1]
    if size == 0 or offset >= end:
        return []
    if size > end - offset:
        size = end - offset
    # First extent whose end is past `offset` (ends are non-decreasing; this also steps over
    # zero-length extents at `offset`).
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if starts[mid] + lengths[mid] <= offset:
            lo = mid + 1
        else:
            hi = mid
    stop = offset + size  # <= end: no overflow
    out: list[Piece] = []
    pos = offset
    i = lo
    while pos < stop and i < n:
        length = lengths[i]
        if length:
            skip = pos - starts[i]
            take = length - skip
            if take > stop - pos:
                take = stop - pos
            out.append((i, chunk_offsets[i] + skip, take))
            pos += take
        i += 1
    return out


class _ReferenceLayout:
    """Stand-in for `cachefs._lookup.Layout` when the extension is not built: same interface."""

    __slots__ = ("_chunk_offsets", "_lengths", "_starts")

    def __init__(self, starts: array[int], chunk_offsets: array[int], lengths: array[int]) -> None:
        self._starts = starts
        self._chunk_offsets = chunk_offsets
        self._lengths = lengths

    def pieces(self, offset: int, size: int) -> list[Piece]:
        return pieces_reference(self._starts, self._chunk_offsets, self._lengths, offset, size)


# FileLayout inherits `pieces` straight from the compiled class when it is built, so a read
# pays no Python-level call on top of the C lookup.
_LayoutBase: type = _lookup.Layout if _lookup is not None else _ReferenceLayout


class FileLayout(_LayoutBase):  # type: ignore[misc, valid-type]
    """One file's extents as flat columns, answering `pieces(offset, size)` for reads.

    `pieces(offset, size) -> list[tuple[int, int, int]]`: the pieces `(extent index, offset
    inside that extent's chunk, length)` covering `size` bytes at file `offset`, in file order,
    clipped to the end of the file: [] for `size` 0 or `offset` at or after EOF; ValueError for a
    negative `offset` or `size`. Compiled (`cachefs._lookup.Layout.pieces`) when `COMPILED`.

    Attributes (read-only: the compiled lookup holds the arrays' buffers, so they cannot be
    resized): `starts`, `chunk_offsets`, `lengths`, `chunk_ids` (all `array('q')`, one item per
    extent), `chunks` (distinct chunk names; `chunk_ids[i]` indexes it) and `size` (the file's
    length: the sum of the extent lengths).
    """

    __slots__ = ("chunk_ids", "chunk_offsets", "chunks", "lengths", "size", "starts")

    def __init__(self, extents: Iterable[Extent]) -> None:
        starts = array("q")
        chunk_offsets = array("q")
        lengths = array("q")
        chunk_ids = array("q")
        chunks: list[str] = []
        ids: dict[str, int] = {}
        pos = 0
        for x in extents:
            if x.offset < 0 or x.length < 0:
                raise ValueError(f"bad extent {x}: negative offset or length")
            if pos + x.length > _INT64_MAX or x.offset + x.length > _INT64_MAX:
                raise OverflowError(f"bad extent {x}: its end is past 2**63-1")
            cid = ids.get(x.chunk)
            if cid is None:
                cid = ids[x.chunk] = len(chunks)
                chunks.append(x.chunk)
            starts.append(pos)
            chunk_offsets.append(x.offset)
            lengths.append(x.length)
            chunk_ids.append(cid)
            pos += x.length
        super().__init__(starts, chunk_offsets, lengths)
        self.starts = starts
        self.chunk_offsets = chunk_offsets
        self.lengths = lengths
        self.chunk_ids = chunk_ids
        self.chunks: tuple[str, ...] = tuple(chunks)
        self.size: int = pos

    @classmethod
    def from_entry(cls, entry: TreeEntry) -> FileLayout:
        """The layout of a file's tree entry (its extents)."""
        return cls(entry.extents)

    def __len__(self) -> int:
        """Number of extents."""
        return len(self.starts)

    def __repr__(self) -> str:
        return (f"FileLayout(extents={len(self.starts)}, chunks={len(self.chunks)}, "
                f"size={self.size})")

    def chunk(self, extent: int) -> str:
        """Name of the chunk holding extent number `extent` (as returned by `pieces`)."""
        return self.chunks[self.chunk_ids[extent]]

    def pieces_reference(self, offset: int, size: int) -> list[Piece]:
        """Same as `pieces`, always through the pure-Python reference."""
        return pieces_reference(self.starts, self.chunk_offsets, self.lengths, offset, size)


def pieces(starts: array[int], chunk_offsets: array[int], lengths: array[int],
           offset: int, size: int) -> list[Piece]:
    """`pieces_reference` over `array('q')` columns, through the compiled lookup when built."""
    if _lookup is not None:
        return _lookup.pieces(starts, chunk_offsets, lengths, offset, size)
    return pieces_reference(starts, chunk_offsets, lengths, offset, size)
