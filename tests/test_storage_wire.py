"""storage_server.wire reads and writes exactly what the generated protobuf classes do."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage_server.proto import storage_pb2 as pb
from storage_server.wire import (
    MalformedMessage,
    decode_get_response,
    decode_put_request,
    encode_get_response,
    encode_put_request,
    encode_varint,
)

needle_lists = st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=3000)), max_size=6)


@given(needle_lists)
def test_put_request_decodes_what_protobuf_encodes(items: list[tuple[bytes, bytes]]) -> None:
    message = pb.PutRequest(needles=[pb.Needle(key=k, data=d) for k, d in items])
    decoded = decode_put_request(message.SerializeToString())
    assert [(key, bytes(data)) for key, data in decoded] == items
    assert all(isinstance(data, memoryview) for _, data in decoded)  # not copied


@given(needle_lists)
def test_put_request_encodes_what_protobuf_encodes(items: list[tuple[bytes, bytes]]) -> None:
    expected = pb.PutRequest(needles=[pb.Needle(key=k, data=d) for k, d in items])
    assert encode_put_request(items) == expected.SerializeToString()
    assert encode_put_request([(k, memoryview(d)) for k, d in items]) == \
        expected.SerializeToString()


@given(st.binary(max_size=5000))
def test_get_response_round_trips_with_protobuf(data: bytes) -> None:
    assert encode_get_response(data) == pb.GetResponse(data=data).SerializeToString()
    assert decode_get_response(pb.GetResponse(data=data).SerializeToString()) == data
    assert pb.GetResponse.FromString(encode_get_response(memoryview(data))).data == data


def test_unknown_fields_are_skipped_like_protobuf() -> None:
    needle = pb.Needle(key=b"k" * 32, data=b"payload").SerializeToString()
    extra = (b"\x18" + encode_varint(300)          # field 3, varint
             + b"\x21" + bytes(8)                  # field 4, fixed64
             + b"\x2d" + bytes(4)                  # field 5, fixed32
             + b"\x32\x03abc")                     # field 6, bytes
    message = b"\x0a" + encode_varint(len(needle) + len(extra)) + needle + extra + extra
    assert [(k, bytes(d)) for k, d in decode_put_request(message)] == [(b"k" * 32, b"payload")]
    assert decode_get_response(extra + b"\x0a\x02hi") == b"hi"


@pytest.mark.parametrize("message", [
    b"\x0a",                                    # length missing
    b"\x0a\x05abc",                             # length past the end
    b"\x0a" + b"\xff" * 11,                     # varint too long
    b"\x0a\x02\x0a\x05",                        # needle's key runs past the needle
    b"\x08\x01",                                # needles as a varint
    b"\x0a\x02\x08\x01",                        # key as a varint
    b"\x0b",                                    # group start (wire type 3)
    b"\x02",                                    # field number 0
    b"\x19\x00",                                # truncated fixed64
])
def test_malformed_put_requests_are_refused(message: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_put_request(message)
