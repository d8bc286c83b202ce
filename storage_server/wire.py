"""The protobuf wire format of the two bulk messages, PutRequest and GetResponse, without copies.

The generated classes (upb) copy a bytes field when a message is parsed and again on every
access of the field, and building a message copies the value in before serializing copies it
out: for a 4 MiB needle that is ~0.6 ms per copy, several per call on each side. These
functions read and write exactly the bytes `proto/storage.proto` defines (the server and
clients built from the .proto interoperate with them unchanged):

    PutRequest  { repeated Needle needles = 1; }   Needle { bytes key = 1; bytes data = 2; }
    GetResponse { bytes data = 1; }

`encode_put_request` and `encode_get_response` copy the data once (the join);
`decode_put_request` returns the needles' data as memoryviews into the received message;
`decode_get_response` copies it once (into the `bytes` callers expect). Unknown fields are
skipped, as protobuf does; a truncated or malformed message raises `MalformedMessage`.
"""

from __future__ import annotations

from collections.abc import Sequence

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class MalformedMessage(ValueError):
    """The bytes are not a well-formed message of the expected type."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise MalformedMessage("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise MalformedMessage("varint longer than 10 bytes")


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field: an int, or a view for LEN fields."""
    out: list[tuple[int, int, int | memoryview]] = []
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise MalformedMessage("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            out.append((number, wire, value))
        elif wire == _LEN:
            length, pos = _varint(buf, pos)
            if length > end - pos:
                raise MalformedMessage(f"field {number}: {length} bytes, {end - pos} left")
            out.append((number, wire, buf[pos:pos + length]))
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > end:
                raise MalformedMessage(f"field {number}: truncated fixed-width value")
        else:
            raise MalformedMessage(f"field {number}: unsupported wire type {wire}")
    return out


def _len_field(number: int, wire: int, value: int | memoryview) -> memoryview:
    if wire != _LEN or not isinstance(value, memoryview):
        raise MalformedMessage(f"field {number}: wire type {wire}, expected length-delimited")
    return value


def decode_put_request(message: bytes) -> list[tuple[bytes, memoryview]]:
    """The (key, data) of each needle of a serialized PutRequest; data are views into
    `message` (a missing field is empty, as in protobuf)."""
    needles: list[tuple[bytes, memoryview]] = []
    for number, wire, value in _fields(memoryview(message)):
        if number != 1:
            continue
        key, data = b"", memoryview(b"")
        for n, w, v in _fields(_len_field(number, wire, value)):
            if n == 1:
                key = bytes(_len_field(n, w, v))
            elif n == 2:
                data = _len_field(n, w, v)
        needles.append((key, data))
    return needles


def _len_delimited(number: int, value: bytes | memoryview) -> list[bytes | memoryview]:
    """The pieces of one length-delimited field, for a join."""
    return [encode_varint(number << 3 | _LEN), encode_varint(len(value)), value]


def encode_put_request(items: Sequence[tuple[bytes, bytes | memoryview]]) -> bytes:
    """A serialized PutRequest of (key, data) needles, as protobuf writes it (empty fields
    left out)."""
    parts: list[bytes | memoryview] = []
    for key, data in items:
        needle = ((_len_delimited(1, key) if len(key) else [])
                  + (_len_delimited(2, data) if len(data) else []))
        parts += [encode_varint(1 << 3 | _LEN), encode_varint(sum(len(p) for p in needle)),
                  *needle]
    return b"".join(parts)


def encode_get_response(data: bytes | memoryview) -> bytes:
    """A serialized GetResponse holding `data` (no field at all for empty data, as protobuf
    writes it)."""
    if not len(data):
        return b""
    return b"".join((b"\x0a", encode_varint(len(data)), data))


def decode_get_response(message: bytes) -> bytes:
    """The data of a serialized GetResponse (the last occurrence wins, as in protobuf)."""
    data = b""
    for number, wire, value in _fields(memoryview(message)):
        if number == 1:
            data = bytes(_len_field(number, wire, value))
    return data
