# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Compiled read-path extent lookup: the Cython hot path behind `cachefs.lookup.FileLayout.pieces`.

Same algorithm and same answers as `cachefs.lookup.pieces_reference` (property-tested): a binary
search for the first extent whose end is past the read offset, then a loop emitting
`(extent index, offset inside that extent's chunk, length)` tuples until the read, clipped to
the end of the file, is covered. The per-extent columns are `array('q')` (int64) seen through
typed memoryviews.

- `Layout(starts, chunk_offsets, lengths)`: checks the columns once and keeps them; its
  `pieces(offset, size)` method is what `FileLayout` calls on every read (no per-call buffer
  acquisition).
- `pieces(starts, chunk_offsets, lengths, offset, size)`: the same lookup as a plain function,
  for columns that are consistent (as `FileLayout` builds them; not re-checked per call).

Built at install time by `setup.py`; never committed as C or as a shared object.
"""

cdef extern from *:
    """
    #define CACHEFS_INT64_MAX 0x7fffffffffffffffLL
    """
    long long CACHEFS_INT64_MAX


cdef list _pieces(const long long *starts, const long long *chunk_offsets,
                  const long long *lengths, Py_ssize_t n, long long offset, long long size):
    cdef Py_ssize_t lo, hi, mid, i
    cdef long long end, stop, pos, length, skip, take
    cdef list out
    if offset < 0 or size < 0:
        raise ValueError(f"negative read offset or size: offset={offset} size={size}")
    if n == 0:
        return []
    end = starts[n - 1] + lengths[n - 1]
    if size == 0 or offset >= end:
        return []
    if size > end - offset:
        size = end - offset
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if starts[mid] + lengths[mid] <= offset:
            lo = mid + 1
        else:
            hi = mid
    stop = offset + size
    out = []
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


cdef class Layout:
    """A file's checked extent columns; `pieces(offset, size)` answers reads against them."""

    cdef const long long[::1] _starts
    cdef const long long[::1] _chunk_offsets
    cdef const long long[::1] _lengths
    cdef Py_ssize_t _n

    def __init__(self, const long long[::1] starts, const long long[::1] chunk_offsets,
                 const long long[::1] lengths):
        cdef Py_ssize_t n = starts.shape[0], i
        cdef long long pos = 0
        if chunk_offsets.shape[0] != n or lengths.shape[0] != n:
            raise ValueError("starts, chunk_offsets and lengths differ in length")
        for i in range(n):
            if lengths[i] < 0 or chunk_offsets[i] < 0:
                raise ValueError(f"extent {i}: negative offset or length")
            if starts[i] != pos:
                raise ValueError(f"extent {i}: start {starts[i]} is not the sum of the lengths "
                                 f"before it ({pos})")
            if lengths[i] > CACHEFS_INT64_MAX - pos or (
                    lengths[i] > CACHEFS_INT64_MAX - chunk_offsets[i]):
                raise OverflowError(f"extent {i}: end past 2**63-1")
            pos += lengths[i]
        self._starts = starts
        self._chunk_offsets = chunk_offsets
        self._lengths = lengths
        self._n = n

    def pieces(self, long long offset, long long size) -> list:
        """Pieces `(extent index, offset in its chunk, length)` covering the read, clipped to EOF."""
        if self._n == 0:
            return _pieces(NULL, NULL, NULL, 0, offset, size)
        return _pieces(&self._starts[0], &self._chunk_offsets[0], &self._lengths[0], self._n,
                       offset, size)

    def __len__(self) -> int:
        return self._n


def pieces(const long long[::1] starts, const long long[::1] chunk_offsets,
           const long long[::1] lengths, long long offset, long long size) -> list:
    """Pieces covering `size` bytes at `offset` over consistent int64 columns, clipped to EOF."""
    cdef Py_ssize_t n = starts.shape[0]
    if offset < 0 or size < 0:
        raise ValueError(f"negative read offset or size: offset={offset} size={size}")
    if chunk_offsets.shape[0] != n or lengths.shape[0] != n:
        raise ValueError("starts, chunk_offsets and lengths differ in length")
    if n == 0:
        return _pieces(NULL, NULL, NULL, 0, offset, size)
    return _pieces(&starts[0], &chunk_offsets[0], &lengths[0], n, offset, size)
