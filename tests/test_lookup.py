"""Read-path extent lookup: the compiled `cachefs._lookup` agrees with the pure-Python reference.

Property tests over random layouts (empty files, one extent, many extents, zero-length
extents) and random reads (at and around extent boundaries, spanning them, past EOF, of 0 bytes
or of more than the file): both implementations give identical answers, and the pieces always
reassemble exactly the requested bytes of a file built from random chunk contents. The compiled
extension is part of the product: a missing build fails here, it is never skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs import lookup
from cachefs.dataset.objects import Extent, Kind, TreeEntry
from cachefs.lookup import FileLayout, Piece, pieces_reference

INT64_MAX = (1 << 63) - 1


def chunk_name(i: int) -> str:
    return f"{i:064x}"


@st.composite
def chunks_and_extents(draw: st.DrawFn, max_extents: int = 40) -> tuple[list[bytes], list[Extent]]:
    """Random chunk contents and a file of extents over them (zero-length extents included)."""
    chunks = draw(st.lists(st.binary(min_size=0, max_size=48), min_size=1, max_size=6))
    extents = []
    for _ in range(draw(st.integers(0, max_extents))):
        c = draw(st.integers(0, len(chunks) - 1))
        offset = draw(st.integers(0, len(chunks[c])))
        length = draw(st.integers(0, len(chunks[c]) - offset))
        extents.append(Extent(chunk_name(c), offset, length))
    return chunks, extents


@st.composite
def big_extents(draw: st.DrawFn) -> list[Extent]:
    """Extents with large offsets and lengths (no bytes behind them): 64-bit arithmetic."""
    n = draw(st.integers(0, 60))
    lengths = st.one_of(st.integers(0, 3), st.integers(0, 1 << 22), st.integers(0, 1 << 40))
    return [Extent(chunk_name(draw(st.integers(0, 9))), draw(st.integers(0, 1 << 40)),
                   draw(lengths)) for _ in range(n)]


def file_bytes(chunks: list[bytes], extents: list[Extent]) -> bytes:
    return b"".join(chunks[int(x.chunk, 16)][x.offset:x.offset + x.length] for x in extents)


@st.composite
def read_at(draw: st.DrawFn, layout: FileLayout) -> tuple[int, int]:
    """A read: offsets at, next to and between extent boundaries, at and past EOF."""
    boundaries = sorted({*layout.starts, layout.size})
    near = st.sampled_from(boundaries).flatmap(
        lambda b: st.integers(max(0, b - 2), b + 2))
    offset = draw(st.one_of(near, st.integers(0, layout.size + 8),
                            st.integers(0, INT64_MAX)))
    size = draw(st.one_of(st.integers(0, 4), st.integers(0, layout.size + 8),
                          st.integers(0, INT64_MAX), st.just(INT64_MAX)))
    return offset, size


def compiled_function(layout: FileLayout, offset: int, size: int) -> list[Piece]:
    """The compiled module-level function (not the Layout method) on the layout's columns."""
    from cachefs import _lookup

    return _lookup.pieces(layout.starts, layout.chunk_offsets, layout.lengths, offset, size)


def check_read(layout: FileLayout, offset: int, size: int) -> list[Piece]:
    """Both compiled entry points equal the reference; the pieces are well formed."""
    expected = pieces_reference(layout.starts, layout.chunk_offsets, layout.lengths,
                                offset, size)
    assert layout.pieces(offset, size) == expected
    assert compiled_function(layout, offset, size) == expected
    assert lookup.pieces(layout.starts, layout.chunk_offsets, layout.lengths,
                         offset, size) == expected
    assert layout.pieces_reference(offset, size) == expected
    want = max(0, min(offset + size, layout.size) - offset)
    assert sum(n for _, _, n in expected) == want
    pos = offset
    last = -1
    for index, chunk_offset, n in expected:
        assert index > last and n > 0
        start, length = layout.starts[index], layout.lengths[index]
        assert start <= pos < start + length
        assert chunk_offset == layout.chunk_offsets[index] + (pos - start)
        assert pos + n <= start + length
        pos += n
        last = index
    return expected


def test_compiled_is_built() -> None:
    import cachefs._lookup

    assert lookup.COMPILED is True
    assert FileLayout.pieces is cachefs._lookup.Layout.pieces
    assert cachefs._lookup.__file__.endswith(".so")


@settings(max_examples=400, deadline=None)
@given(data=st.data(), layout_spec=chunks_and_extents())
def test_pieces_reassemble_the_file(data: st.DataObject,
                                    layout_spec: tuple[list[bytes], list[Extent]]) -> None:
    chunks, extents = layout_spec
    layout = FileLayout(extents)
    content = file_bytes(chunks, extents)
    assert layout.size == len(content)
    reads = [(0, layout.size), (0, 1), (layout.size, 1), (layout.size + 1, 5), (0, 0)]
    reads += [data.draw(read_at(layout)) for _ in range(8)]
    for offset, size in reads:
        got = check_read(layout, offset, size)
        assembled = b"".join(chunks[int(layout.chunk(i), 16)][o:o + n] for i, o, n in got)
        assert assembled == content[offset:offset + size]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), extents=big_extents())
def test_compiled_matches_reference_on_large_layouts(data: st.DataObject,
                                                     extents: list[Extent]) -> None:
    layout = FileLayout(extents)
    for _ in range(10):
        offset, size = data.draw(read_at(layout))
        check_read(layout, offset, size)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 5000), min_size=200, max_size=1500),
       data=st.data())
def test_many_extents_every_boundary(lengths: list[int], data: st.DataObject) -> None:
    layout = FileLayout(Extent(chunk_name(i % 7), i % 13, n) for i, n in enumerate(lengths))
    size = data.draw(st.integers(1, 20_000))
    for start in layout.starts:
        for offset in (start - 1, start, start + 1):
            if offset >= 0:
                check_read(layout, offset, size)


def test_examples() -> None:
    empty = FileLayout([])
    assert len(empty) == 0 and empty.size == 0
    assert empty.pieces(0, 10) == [] and empty.pieces(0, 0) == []

    one = FileLayout([Extent(chunk_name(1), 100, 50)])
    assert one.pieces(0, 50) == [(0, 100, 50)]
    assert one.pieces(10, 1000) == [(0, 110, 40)]
    assert one.pieces(49, 1) == [(0, 149, 1)]
    assert one.pieces(50, 1) == [] and one.pieces(10, 0) == []

    layout = FileLayout([Extent(chunk_name(1), 0, 10), Extent(chunk_name(2), 5, 0),
                         Extent(chunk_name(1), 20, 10), Extent(chunk_name(3), 7, 5)])
    assert layout.size == 25 and len(layout) == 4
    assert layout.chunks == (chunk_name(1), chunk_name(2), chunk_name(3))
    assert list(layout.chunk_ids) == [0, 1, 0, 2]
    assert layout.chunk(2) == chunk_name(1) and layout.chunk(3) == chunk_name(3)
    assert list(layout.starts) == [0, 10, 10, 20]
    assert layout.pieces(8, 14) == [(0, 8, 2), (2, 20, 10), (3, 7, 2)]  # skips the empty one
    assert layout.pieces(10, 1) == [(2, 20, 1)]  # exactly at a boundary
    assert layout.pieces(19, 100) == [(2, 29, 1), (3, 7, 5)]  # clipped to EOF
    assert layout.pieces(20, INT64_MAX) == [(3, 7, 5)]  # no overflow
    assert layout.pieces(INT64_MAX, INT64_MAX) == []


def test_from_entry() -> None:
    extents = (Extent(chunk_name(1), 0, 4), Extent(chunk_name(2), 3, 6))
    entry = TreeEntry("f", Kind.FILE, 0o644, 10, 0, chunk_name(9), extents)
    layout = FileLayout.from_entry(entry)
    assert layout.size == 10 and layout.pieces(2, 5) == [(0, 2, 2), (1, 3, 3)]


@pytest.mark.parametrize(("offset", "size"), [(-1, 1), (0, -1), (-5, -5)])
def test_negative_reads_are_refused(offset: int, size: int) -> None:
    layout = FileLayout([Extent(chunk_name(1), 0, 10)])
    for fn in (layout.pieces, layout.pieces_reference,
               lambda o, s: compiled_function(layout, o, s)):
        with pytest.raises(ValueError):
            fn(offset, size)


@pytest.mark.parametrize(("offset", "size"), [(1 << 63, 1), (0, 1 << 64), (-(1 << 64), 0)])
def test_out_of_range_reads_overflow(offset: int, size: int) -> None:
    layout = FileLayout([Extent(chunk_name(1), 0, 10)])
    for fn in (layout.pieces, layout.pieces_reference):
        with pytest.raises(OverflowError):
            fn(offset, size)


def test_bad_layouts_are_refused() -> None:
    from cachefs import _lookup

    with pytest.raises(ValueError):
        FileLayout([Extent(chunk_name(1), -1, 10)])
    with pytest.raises(ValueError):
        FileLayout([Extent(chunk_name(1), 0, -1)])
    with pytest.raises(OverflowError):
        FileLayout([Extent(chunk_name(1), 0, 1 << 62), Extent(chunk_name(2), 0, 1 << 62)])
    with pytest.raises(ValueError):  # starts not cumulative
        _lookup.Layout(array("q", [0, 5]), array("q", [0, 0]), array("q", [4, 4]))
    with pytest.raises(ValueError):  # columns of different lengths
        _lookup.Layout(array("q", [0]), array("q", [0, 0]), array("q", [4]))
    with pytest.raises(ValueError):
        _lookup.pieces(array("q", [0]), array("q", [0]), array("q", []), 0, 1)
    layout = FileLayout([Extent(chunk_name(1), 0, 10)])
    with pytest.raises(BufferError):  # the compiled lookup holds the columns: they are frozen
        layout.starts.append(10)


def test_without_the_extension_falls_back_and_warns() -> None:
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "sys.modules['cachefs._lookup'] = None\n"
        "from cachefs.dataset.objects import Extent\n"
        "from cachefs import lookup\n"
        "layout = lookup.FileLayout([Extent('0' * 64, 3, 10), Extent('1' * 64, 0, 5)])\n"
        "print(lookup.COMPILED, layout.pieces(8, 100))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert proc.stdout.strip() == "False [(0, 11, 2), (1, 0, 5)]"
    assert proc.stderr.count("WARNING:cachefs.lookup:") == 1
    assert "not built" in proc.stderr


def test_benchmark_quick_json() -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.lookup", "--quick", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert set(result["ratios"]) == {"cython_vs_python", "cython_vs_python_mixed"}
    assert all(isinstance(v, float) and v > 0 for v in result["ratios"].values())
    assert result["raw"]["chunked"]["extents"] == 1000
    assert result["quick"] is True
