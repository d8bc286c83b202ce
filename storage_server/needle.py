"""The needle: one stored object inside a segment file (byte table: storage_server/FORMAT.md).

A needle is a 56-byte header, the data, an 8-byte footer and zero padding to a multiple of 8:

    header  magic u32 | version u8 | flags u8 | reserved u16 | size u32 | cookie u32 |
            sequence u64 | key 32 bytes
    footer  magic u32 | crc32 u32 (CRC-32 of header + data, zlib's polynomial)

All integers are little-endian. `decode_needle` is strict: any deviation from the layout raises
`CorruptObject` naming the field, so a torn, overwritten or foreign needle is never taken for
data. `parse_header` checks only the header, which is what a recovery scan needs to learn the
length of the needle before reading the rest.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from isal.isal_zlib import crc32  # zlib's CRC-32, ~13x faster (ISA-L): checked per read

from cachefs.contracts import KEY_BYTES, check_key
from cachefs.errors import CorruptObject, InvalidName

HEADER_MAGIC = 0x484E4643  # b"CFNH" little-endian: cachefs needle header
FOOTER_MAGIC = 0x464E4643  # b"CFNF": cachefs needle footer
FORMAT_VERSION = 1
MAX_DATA_BYTES = 64 << 20  # a cachefs chunk is at most 64 MiB
ALIGNMENT = 8

FLAG_TOMBSTONE = 0x01
KNOWN_FLAGS = FLAG_TOMBSTONE

_HEADER = struct.Struct("<IBBHII Q32s")
_FOOTER = struct.Struct("<II")
HEADER_BYTES = _HEADER.size  # 56
FOOTER_BYTES = _FOOTER.size  # 8
assert HEADER_BYTES == 56 and FOOTER_BYTES == 8


@dataclass(frozen=True, slots=True)
class NeedleHeader:
    """The fixed fields of a needle, as read from its first `HEADER_BYTES` bytes."""

    flags: int
    size: int
    cookie: int
    sequence: int
    key: bytes

    @property
    def length(self) -> int:
        """Bytes the whole needle occupies in its segment, padding included."""
        return needle_size(self.size)

    @property
    def tombstone(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)


@dataclass(frozen=True, slots=True)
class Needle:
    """A decoded, verified needle; `data` is a view into the buffer it was decoded from."""

    key: bytes
    cookie: int
    flags: int
    sequence: int
    data: memoryview

    @property
    def tombstone(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)


def needle_size(data_len: int) -> int:
    """Bytes a needle holding `data_len` bytes of data occupies, padding included."""
    return _align(HEADER_BYTES + data_len + FOOTER_BYTES)


def _align(n: int) -> int:
    return (n + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def encode_needle_parts(key: bytes, data: bytes | memoryview, cookie: int, flags: int = 0,
                        sequence: int = 0) -> tuple[bytes, bytes | memoryview, bytes]:
    """One needle as (header, data, footer and padding), for a vectored write that never
    copies the data. `cookie` is a u32, `sequence` a u64 (the volume's write order, which
    decides between two needles of one key; see FORMAT.md)."""
    check_key(key, "needle key")
    if len(data) > MAX_DATA_BYTES:
        raise InvalidName(f"needle data: {len(data)} bytes, at most {MAX_DATA_BYTES}")
    if flags & ~KNOWN_FLAGS or not 0 <= flags <= 0xFF:
        raise InvalidName(f"needle flags: unknown bits in {flags:#x}")
    if flags & FLAG_TOMBSTONE and len(data):
        raise InvalidName("needle flags: a tombstone carries no data")
    if not 0 <= cookie <= 0xFFFFFFFF:
        raise InvalidName(f"needle cookie: {cookie} is not a u32")
    if not 0 <= sequence <= 0xFFFFFFFFFFFFFFFF:
        raise InvalidName(f"needle sequence: {sequence} is not a u64")
    size = len(data)
    header = _HEADER.pack(HEADER_MAGIC, FORMAT_VERSION, flags, 0, size, cookie, sequence,
                          bytes(key))
    crc = crc32(data, crc32(header))
    tail = _FOOTER.pack(FOOTER_MAGIC, crc)
    padding = needle_size(size) - HEADER_BYTES - size - len(tail)
    return header, data, tail + bytes(padding)


def encode_needle(key: bytes, data: bytes | memoryview, cookie: int, flags: int = 0,
                  sequence: int = 0) -> bytes:
    """The bytes of one needle (see `encode_needle_parts`)."""
    return b"".join(encode_needle_parts(key, data, cookie, flags, sequence))


def parse_header(buf: bytes | bytearray | memoryview) -> NeedleHeader:
    """Check and decode the header at the start of `buf` (at least `HEADER_BYTES` long)."""
    if len(buf) < HEADER_BYTES:
        raise CorruptObject(f"needle truncated: {len(buf)} bytes, the header alone is "
                            f"{HEADER_BYTES}")
    magic, version, flags, reserved, size, cookie, sequence, key = _HEADER.unpack_from(buf, 0)
    if magic != HEADER_MAGIC:
        raise CorruptObject(f"needle header magic: {magic:#010x}, expected {HEADER_MAGIC:#010x}")
    if version != FORMAT_VERSION:
        raise CorruptObject(f"needle format version: {version}, this build reads "
                            f"{FORMAT_VERSION}")
    if flags & ~KNOWN_FLAGS:
        raise CorruptObject(f"needle flags: unknown bits in {flags:#04x}")
    if reserved:
        raise CorruptObject(f"needle reserved field: {reserved:#06x}, must be zero")
    if size > MAX_DATA_BYTES:
        raise CorruptObject(f"needle size: {size} bytes, at most {MAX_DATA_BYTES}")
    if flags & FLAG_TOMBSTONE and size:
        raise CorruptObject(f"needle size: a tombstone with {size} bytes of data")
    return NeedleHeader(flags=flags, size=size, cookie=cookie, sequence=sequence, key=key)


def decode_needle(buf: bytes | bytearray | memoryview, expect_key: bytes | None = None,
                  expect_cookie: int | None = None) -> Needle:
    """Check every field of the needle that is exactly `buf` and return it. Raises
    `CorruptObject` naming what is wrong: header fields, length, footer magic, checksum,
    padding, or a key or cookie other than the expected one."""
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf.cast("B")
    header = parse_header(view)
    name = expect_key.hex() if expect_key is not None else header.key.hex()
    total = header.length
    if len(view) < total:
        raise CorruptObject(f"needle truncated: {len(view)} of {total} bytes", name)
    if len(view) > total:
        raise CorruptObject(f"needle length: {len(view)} bytes, its size field says {total}",
                            name)
    end = HEADER_BYTES + header.size
    footer_magic, crc = _FOOTER.unpack_from(view, end)
    if footer_magic != FOOTER_MAGIC:
        raise CorruptObject(f"needle footer magic: {footer_magic:#010x}, expected "
                            f"{FOOTER_MAGIC:#010x}", name)
    actual = crc32(view[:end])
    if actual != crc:
        raise CorruptObject(f"needle checksum: crc32 {actual:#010x}, footer says {crc:#010x}",
                            name)
    if any(view[end + FOOTER_BYTES:]):
        raise CorruptObject("needle padding: not zero", name)
    if expect_key is not None and header.key != expect_key:
        raise CorruptObject(f"needle key: {header.key.hex()}, expected {expect_key.hex()}", name)
    if expect_cookie is not None and header.cookie != expect_cookie:
        raise CorruptObject(f"needle cookie: {header.cookie:#010x}, expected "
                            f"{expect_cookie:#010x}", name)
    return Needle(key=header.key, cookie=header.cookie, flags=header.flags,
                  sequence=header.sequence, data=view[HEADER_BYTES:end])


_PADDING = tuple(bytes(n) for n in range(ALIGNMENT))


def data_end(buf: bytes, expect_key: bytes, expect_cookie: int) -> int:
    """The fast path of `decode_needle` for reads: every check it makes (header fields, length,
    footer magic, checksum, padding, key, cookie) in a few comparisons, returning where the
    data ends (it starts at `HEADER_BYTES`), or -1 if any fails."""
    if len(buf) >= HEADER_BYTES:
        magic, version, flags, reserved, size, cookie, _, key = _HEADER.unpack_from(buf, 0)
        end = HEADER_BYTES + size
        pad = len(buf) - end - FOOTER_BYTES
        if (magic == HEADER_MAGIC and version == FORMAT_VERSION and not flags & ~KNOWN_FLAGS
                and not reserved and size <= MAX_DATA_BYTES
                and not (size and flags & FLAG_TOMBSTONE)
                and len(buf) == (end + FOOTER_BYTES + ALIGNMENT - 1) & ~(ALIGNMENT - 1)
                and key == expect_key and cookie == expect_cookie):
            footer_magic, crc = _FOOTER.unpack_from(buf, end)
            if (footer_magic == FOOTER_MAGIC and crc32(memoryview(buf)[:end]) == crc
                    and (not pad or buf[end + FOOTER_BYTES:] == _PADDING[pad])):
                return end
    return -1


def verified_data_end(buf: bytes, expect_key: bytes, expect_cookie: int) -> int:
    """`data_end`, raising the `CorruptObject` of `decode_needle` (which names the field) where
    a check fails."""
    end = data_end(buf, expect_key, expect_cookie)
    if end >= 0:
        return end
    decode_needle(buf, expect_key=expect_key, expect_cookie=expect_cookie)
    raise CorruptObject("needle: failed its checks")  # decode_needle raised already


def pread_needle(fd: int, length: int, offset: int, key: bytes,
                 cookie: int) -> tuple[bytes, int]:
    """One pread of the needle of `length` bytes at `offset` and its checks: (the bytes, shorter
    only where the file ends first; `data_end` of them, -1 if a check fails). The reference of
    the compiled `storage_server._needle.pread_needle`, which the read path uses when built."""
    if length < 0 or offset < 0:
        raise ValueError(f"pread_needle: length {length}, offset {offset}")
    if len(key) != KEY_BYTES:
        raise ValueError(f"pread_needle: a key is {KEY_BYTES} bytes, got {len(key)}")
    buf = os.pread(fd, length, offset)
    return buf, data_end(buf, key, cookie) if len(buf) == length else -1
