# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled needle read: one read of a needle and its checks in C, without a GIL handoff when
the needle is in the page cache.

`pread_needle(fd, length, offset, key, cookie)` is `storage_server.needle.pread_needle` (the
pure-Python reference, property-tested to give the same answers): it returns `(buffer, end)`,
where `buffer` is the `length` bytes at `offset` (shorter only where the file ends first) and
`end` is where the verified data ends (it starts at `HEADER_BYTES`), or -1 when any check of
`storage_server.needle.data_end` fails (header fields, length, footer magic, CRC-32, padding,
key, cookie): the caller then asks `decode_needle` which one, for the error.

Why. A warm read of a ~110 KB needle is a ~15 us copy out of the page cache. In Python it was
two GIL handoffs (`os.pread` and ISA-L's `crc32` both release the GIL), and on 16 reader
threads each handoff is a futex wake and a context switch: measured here, 3.5 voluntary context
switches and ~65 us of CPU per warm read, four times the copy. So:

- cachestat(2) (one syscall, no I/O) says whether every page of the needle is in the page
  cache; if so, and the needle is shorter than `GIL_COPY_MAX` (1 MiB: a copy of ~100 us, where
  a handoff costs ~10), it is copied out holding the GIL, as no other thread needs to run
  meanwhile. Otherwise, or if the pages went in between (then the copy is short), the rest is
  read with the GIL released, as disk I/O must be, and as a long copy should be: a cached
  chunk of megabytes would keep every other thread waiting for milliseconds. On kernels
  without cachestat (before 6.5) the first try is `preadv2(RWF_NOWAIT)` holding the GIL
  instead, which returns at once on a miss but starts the readahead for it there (measured:
  cold reads 10% slower than with cachestat);
- the CRC-32 is ISA-L's `crc32_gzip_refl` (the C function behind `isal.isal_zlib.crc32`, which
  the reference uses), called directly, under the GIL for a hit and inside the GIL-free block
  for a miss. Where that symbol cannot be found (another build of python-isal), the check goes
  through `isal.isal_zlib.crc32` as in the reference.

Built at install time by `setup.py`; never committed as C or as a shared object.
"""

import ctypes
import os

from isal import isal_zlib

from storage_server import needle as _spec

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EINTR, ENOSYS, EPERM, errno
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.string cimport memcmp
from posix.types cimport off_t
from posix.uio cimport iovec
from posix.unistd cimport pread


cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    int RWF_NOWAIT


cdef extern from *:
    """
    #include <sys/syscall.h>
    #include <unistd.h>
    #ifndef SYS_cachestat
    #define SYS_cachestat 451  /* the same number on every architecture */
    #endif
    struct cachefs_cachestat_range { unsigned long long off, len; };
    struct cachefs_cachestat {
        unsigned long long nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
    };
    static long cachefs_cachestat_call(int fd, struct cachefs_cachestat_range *range,
                                       struct cachefs_cachestat *stat) {
        return syscall(SYS_cachestat, fd, range, stat, 0);
    }
    """
    struct cachefs_cachestat_range:
        unsigned long long off
        unsigned long long len
    struct cachefs_cachestat:
        unsigned long long nr_cache
        unsigned long long nr_dirty
        unsigned long long nr_writeback
        unsigned long long nr_evicted
        unsigned long long nr_recently_evicted
    long cachefs_cachestat_call(int fd, cachefs_cachestat_range *range,
                                cachefs_cachestat *stat) nogil


ctypedef uint32_t (*crc32_fn)(uint32_t, const unsigned char *, uint64_t) noexcept nogil

cdef uint32_t HEADER_MAGIC = _spec.HEADER_MAGIC
cdef uint32_t FOOTER_MAGIC = _spec.FOOTER_MAGIC
cdef unsigned int FORMAT_VERSION = _spec.FORMAT_VERSION
cdef unsigned int KNOWN_FLAGS = _spec.KNOWN_FLAGS
cdef unsigned int FLAG_TOMBSTONE = _spec.FLAG_TOMBSTONE
cdef uint64_t MAX_DATA_BYTES = _spec.MAX_DATA_BYTES
cdef Py_ssize_t HEADER_BYTES = _spec.HEADER_BYTES
cdef Py_ssize_t FOOTER_BYTES = _spec.FOOTER_BYTES
cdef Py_ssize_t ALIGNMENT = _spec.ALIGNMENT
cdef Py_ssize_t KEY_BYTES = _spec.KEY_BYTES
cdef Py_ssize_t KEY_AT = 24  # magic u32, version u8, flags u8, reserved u16, size, cookie, seq
assert (HEADER_BYTES, FOOTER_BYTES, ALIGNMENT, KEY_BYTES) == (56, 8, 8, 32)


cdef crc32_fn _find_crc32():
    """ISA-L's zlib-compatible CRC-32 from python-isal's extension, if it exports it and it
    gives the standard check value; else NULL."""
    cdef crc32_fn fn
    try:
        address = ctypes.cast(ctypes.CDLL(isal_zlib.__file__).crc32_gzip_refl,
                              ctypes.c_void_p).value
    except (OSError, AttributeError):
        return NULL
    if not address:
        return NULL
    fn = <crc32_fn><uintptr_t>address
    if fn(0, <const unsigned char *>b"123456789", 9) != 0xCBF43926:
        return NULL
    return fn


cdef crc32_fn _crc32 = _find_crc32()
DIRECT_CRC32 = _crc32 != NULL
"""Whether the CRC-32 is computed by ISA-L's C function directly (else through Python)."""


cdef Py_ssize_t _GIL_COPY_MAX = 1 << 20
GIL_COPY_MAX = _GIL_COPY_MAX
"""Needles shorter than this are copied out of the page cache holding the GIL."""

cdef bint _cachestat = True  # False once the kernel refused it: RWF_NOWAIT instead


def use_cachestat(bint enabled):
    """Whether a read asks cachestat(2) first (True, where the kernel has it) or tries
    RWF_NOWAIT; returns the previous setting (tests cover both paths)."""
    global _cachestat
    previous = _cachestat
    _cachestat = enabled
    return previous


def cachestat(int fd, unsigned long long offset, unsigned long long length):
    """cachestat(2) of the pages holding the range, exactly as given: (nr_cache, nr_dirty,
    nr_writeback, nr_evicted, nr_recently_evicted); OSError when the call fails. The one call
    of the syscall for Python: `storage_server.direct.cachestat` uses it where this is built."""
    cdef cachefs_cachestat_range rng
    cdef cachefs_cachestat counts
    rng.off = offset
    rng.len = length
    if cachefs_cachestat_call(fd, &rng, &counts) != 0:
        err = errno
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return (counts.nr_cache, counts.nr_dirty, counts.nr_writeback, counts.nr_evicted,
            counts.nr_recently_evicted)


cdef bint _all_cached(int fd, off_t offset, Py_ssize_t length) noexcept:
    """Whether every page holding the range is in the page cache (False when unknown)."""
    global _cachestat
    cdef cachefs_cachestat_range rng
    cdef cachefs_cachestat counts
    rng.off = offset & ~4095
    rng.len = ((offset + length + 4095) & ~4095) - rng.off
    if cachefs_cachestat_call(fd, &rng, &counts) != 0:
        if errno == ENOSYS or errno == EPERM:  # an older kernel, or a seccomp filter
            _cachestat = False
        return False
    return counts.nr_cache * 4096 >= rng.len


cdef inline uint32_t _le32(const unsigned char *p) noexcept nogil:
    return p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16) | (<uint32_t>p[3] << 24)


cdef Py_ssize_t _data_end(const unsigned char *p, Py_ssize_t n, const unsigned char *key,
                          uint32_t cookie) noexcept nogil:
    """Where the data ends if every field checks out (the CRC-32 too, when `_crc32` is
    found; else the caller checks it), or -1."""
    cdef uint32_t size, flags
    cdef Py_ssize_t end, i
    if n < HEADER_BYTES:
        return -1
    size = _le32(p + 8)
    flags = p[5]
    if (_le32(p) != HEADER_MAGIC or p[4] != FORMAT_VERSION or flags & ~KNOWN_FLAGS
            or p[6] or p[7] or size > MAX_DATA_BYTES or (size and flags & FLAG_TOMBSTONE)):
        return -1
    end = HEADER_BYTES + size
    if n != (end + FOOTER_BYTES + ALIGNMENT - 1) & ~(ALIGNMENT - 1):
        return -1
    if _le32(p + 12) != cookie or memcmp(p + KEY_AT, key, KEY_BYTES):
        return -1
    if _le32(p + end) != FOOTER_MAGIC:
        return -1
    for i in range(end + FOOTER_BYTES, n):
        if p[i]:
            return -1
    if _crc32 != NULL and _crc32(0, p, end) != _le32(p + end + 4):
        return -1
    return end


def pread_needle(int fd, Py_ssize_t length, off_t offset, bytes key, uint32_t cookie):
    """(the `length` bytes at `offset`, end of the verified data or -1); see the module
    docstring. Raises OSError when the read fails."""
    if length < 0 or offset < 0:
        raise ValueError(f"pread_needle: length {length}, offset {offset}")
    if len(key) != KEY_BYTES:
        raise ValueError(f"pread_needle: a key is {KEY_BYTES} bytes, got {len(key)}")
    cdef bytes buf = PyBytes_FromStringAndSize(NULL, length)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(buf)
    cdef const unsigned char *k = <const unsigned char *>PyBytes_AS_STRING(key)
    cdef Py_ssize_t done = 0, got, end
    cdef int err = 0
    cdef iovec iov
    iov.iov_base = p
    iov.iov_len = length
    if 0 < length < _GIL_COPY_MAX:  # a short copy out of the page cache keeps the GIL
        if _cachestat:
            if _all_cached(fd, offset, length):
                got = pread(fd, p, length, offset)
                if got > 0:
                    done = got
        else:
            got = preadv2(fd, &iov, 1, offset, RWF_NOWAIT)  # cannot block
            if got > 0:
                done = got
    if done == length:
        end = _data_end(p, done, k, cookie)
    else:
        with nogil:
            while done < length:
                got = pread(fd, p + done, length - done, offset + done)
                if got > 0:
                    done += got
                elif got == 0:
                    break  # the file ends here
                elif errno != EINTR:
                    err = errno
                    break
            end = _data_end(p, done, k, cookie) if done == length else -1
    if err:
        raise OSError(err, os.strerror(err))
    if done < length:
        return buf[:done], -1
    if end >= 0 and _crc32 == NULL and (
            isal_zlib.crc32(memoryview(buf)[:end]) != _le32(p + end + 4)):
        end = -1
    return buf, end
