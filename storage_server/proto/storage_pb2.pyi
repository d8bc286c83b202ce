from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Needle(_message.Message):
    __slots__ = ("key", "data")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    data: bytes
    def __init__(self, key: _Optional[bytes] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("needles",)
    NEEDLES_FIELD_NUMBER: _ClassVar[int]
    needles: _containers.RepeatedCompositeFieldContainer[Needle]
    def __init__(self, needles: _Optional[_Iterable[_Union[Needle, _Mapping]]] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("bytes_written",)
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    bytes_written: int
    def __init__(self, bytes_written: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key", "offset", "length", "has_length")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    offset: int
    length: int
    has_length: bool
    def __init__(self, key: _Optional[bytes] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., has_length: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class HasRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class HasResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    def __init__(self, key: _Optional[bytes] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("vid", "start_after", "limit")
    VID_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    vid: int
    start_after: bytes
    limit: int
    def __init__(self, vid: _Optional[int] = ..., start_after: _Optional[bytes] = ..., limit: _Optional[int] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "more")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    more: bool
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., more: _Optional[bool] = ...) -> None: ...

class StatRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatResponse(_message.Message):
    __slots__ = ("volumes", "needles", "bytes", "free_bytes", "corrupt_reads", "json")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    NEEDLES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_READS_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    volumes: int
    needles: int
    bytes: int
    free_bytes: int
    corrupt_reads: int
    json: str
    def __init__(self, volumes: _Optional[int] = ..., needles: _Optional[int] = ..., bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., corrupt_reads: _Optional[int] = ..., json: _Optional[str] = ...) -> None: ...

class CompactRequest(_message.Message):
    __slots__ = ("vid", "has_vid")
    VID_FIELD_NUMBER: _ClassVar[int]
    HAS_VID_FIELD_NUMBER: _ClassVar[int]
    vid: int
    has_vid: bool
    def __init__(self, vid: _Optional[int] = ..., has_vid: _Optional[bool] = ...) -> None: ...

class CompactResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("vid", "has_vid")
    VID_FIELD_NUMBER: _ClassVar[int]
    HAS_VID_FIELD_NUMBER: _ClassVar[int]
    vid: int
    has_vid: bool
    def __init__(self, vid: _Optional[int] = ..., has_vid: _Optional[bool] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("checked", "corrupt", "json")
    CHECKED_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    checked: int
    corrupt: _containers.RepeatedScalarFieldContainer[bytes]
    json: str
    def __init__(self, checked: _Optional[int] = ..., corrupt: _Optional[_Iterable[bytes]] = ..., json: _Optional[str] = ...) -> None: ...
