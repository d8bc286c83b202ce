from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterStorageRequest(_message.Message):
    __slots__ = ("id", "address", "zone", "capacity_bytes", "volumes")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    zone: str
    capacity_bytes: int
    volumes: int
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., zone: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., volumes: _Optional[int] = ...) -> None: ...

class RegisterStorageResponse(_message.Message):
    __slots__ = ("volumes", "replicas")
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    volumes: int
    replicas: int
    def __init__(self, volumes: _Optional[int] = ..., replicas: _Optional[int] = ...) -> None: ...

class VolumeCount(_message.Message):
    __slots__ = ("vid", "needles")
    VID_FIELD_NUMBER: _ClassVar[int]
    NEEDLES_FIELD_NUMBER: _ClassVar[int]
    vid: int
    needles: int
    def __init__(self, vid: _Optional[int] = ..., needles: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("id", "free_bytes", "counts", "repaired")
    ID_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    REPAIRED_FIELD_NUMBER: _ClassVar[int]
    id: str
    free_bytes: int
    counts: _containers.RepeatedCompositeFieldContainer[VolumeCount]
    repaired: _containers.RepeatedCompositeFieldContainer[RepairDone]
    def __init__(self, id: _Optional[str] = ..., free_bytes: _Optional[int] = ..., counts: _Optional[_Iterable[_Union[VolumeCount, _Mapping]]] = ..., repaired: _Optional[_Iterable[_Union[RepairDone, _Mapping]]] = ...) -> None: ...

class RepairDone(_message.Message):
    __slots__ = ("vid", "source", "ok", "error")
    VID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    vid: int
    source: str
    ok: bool
    error: str
    def __init__(self, vid: _Optional[int] = ..., source: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class RepairTask(_message.Message):
    __slots__ = ("vid", "source_id", "source_address")
    VID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    vid: int
    source_id: str
    source_address: str
    def __init__(self, vid: _Optional[int] = ..., source_id: _Optional[str] = ..., source_address: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("repairs", "registered", "vids", "epoch")
    REPAIRS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    VIDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    repairs: _containers.RepeatedCompositeFieldContainer[RepairTask]
    registered: bool
    vids: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    def __init__(self, repairs: _Optional[_Iterable[_Union[RepairTask, _Mapping]]] = ..., registered: _Optional[bool] = ..., vids: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ...) -> None: ...

class DeclareDeadRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeclareDeadResponse(_message.Message):
    __slots__ = ("replaced",)
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    replaced: int
    def __init__(self, replaced: _Optional[int] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("id", "address", "state")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    id: str
    address: str
    state: str
    def __init__(self, id: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class VolumePlacement(_message.Message):
    __slots__ = ("vid", "replicas")
    VID_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    vid: int
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, vid: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

class GetPlacementRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Placement(_message.Message):
    __slots__ = ("epoch", "volumes", "replicas", "min_replicas", "placement")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    VOLUMES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    volumes: int
    replicas: int
    min_replicas: int
    placement: _containers.RepeatedCompositeFieldContainer[VolumePlacement]
    def __init__(self, epoch: _Optional[int] = ..., volumes: _Optional[int] = ..., replicas: _Optional[int] = ..., min_replicas: _Optional[int] = ..., placement: _Optional[_Iterable[_Union[VolumePlacement, _Mapping]]] = ...) -> None: ...

class DirEntry(_message.Message):
    __slots__ = ("name", "inline", "has_inline", "needle", "size", "mtime_ns")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    HAS_INLINE_FIELD_NUMBER: _ClassVar[int]
    NEEDLE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    name: str
    inline: bytes
    has_inline: bool
    needle: bytes
    size: int
    mtime_ns: int
    def __init__(self, name: _Optional[str] = ..., inline: _Optional[bytes] = ..., has_inline: _Optional[bool] = ..., needle: _Optional[bytes] = ..., size: _Optional[int] = ..., mtime_ns: _Optional[int] = ...) -> None: ...

class DirGetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DirGetResponse(_message.Message):
    __slots__ = ("found", "entry")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    found: bool
    entry: DirEntry
    def __init__(self, found: _Optional[bool] = ..., entry: _Optional[_Union[DirEntry, _Mapping]] = ...) -> None: ...

class DirPutRequest(_message.Message):
    __slots__ = ("entry", "if_absent", "request_id", "only_if_last_under")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    IF_ABSENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ONLY_IF_LAST_UNDER_FIELD_NUMBER: _ClassVar[int]
    entry: DirEntry
    if_absent: bool
    request_id: str
    only_if_last_under: str
    def __init__(self, entry: _Optional[_Union[DirEntry, _Mapping]] = ..., if_absent: _Optional[bool] = ..., request_id: _Optional[str] = ..., only_if_last_under: _Optional[str] = ...) -> None: ...

class DirPutResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class DirPutManyRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[DirEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[DirEntry, _Mapping]]] = ...) -> None: ...

class DirPutManyResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...

class DirDeleteRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DirDeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class DirListRequest(_message.Message):
    __slots__ = ("prefix", "start_after", "limit")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    start_after: str
    limit: int
    def __init__(self, prefix: _Optional[str] = ..., start_after: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class DirListResponse(_message.Message):
    __slots__ = ("entries", "more")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[DirEntry]
    more: bool
    def __init__(self, entries: _Optional[_Iterable[_Union[DirEntry, _Mapping]]] = ..., more: _Optional[bool] = ...) -> None: ...

class RegisterNodeRequest(_message.Message):
    __slots__ = ("name", "peer_address", "cache_bytes", "inventory_json", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    peer_address: str
    cache_bytes: int
    inventory_json: str
    serving: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., peer_address: _Optional[str] = ..., cache_bytes: _Optional[int] = ..., inventory_json: _Optional[str] = ..., serving: _Optional[_Iterable[str]] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ("serving",)
    SERVING_FIELD_NUMBER: _ClassVar[int]
    serving: str
    def __init__(self, serving: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("name", "peer_address", "cache_bytes", "last_seen_s", "serving")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PEER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    name: str
    peer_address: str
    cache_bytes: int
    last_seen_s: float
    serving: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., peer_address: _Optional[str] = ..., cache_bytes: _Optional[int] = ..., last_seen_s: _Optional[float] = ..., serving: _Optional[_Iterable[str]] = ...) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes", "timeout_s")
    NODES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[Node]
    timeout_s: float
    def __init__(self, nodes: _Optional[_Iterable[_Union[Node, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...
