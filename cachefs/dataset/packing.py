"""Cutting file contents into chunks: large files alone, small files packed together in path order.

A file of at least one chunk size is cut into consecutive chunks of exactly the chunk size (the
last one shorter), so an unchanged large file always yields the same chunks. Smaller files are
appended, in the order they are given (path order), to a shared pack buffer that is sealed into
one chunk when the next file would not fit: a small file never spans two chunks, so reading it
costs one chunk fetch, and neighbouring files (an ImageNet-style directory) arrive together.

A chunk's name is only known once it is sealed and hashed, which happens on the uploader's worker
threads; extents therefore hold a `ChunkSlot` that is filled in when the chunk is hashed, and
are resolved into plain `Extent`s after every chunk is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cachefs.dataset.objects import Extent


class ChunkSlot:
    """The name of a chunk that is being sealed; set exactly once by whoever hashes it."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None) -> None:
        self.name = name


@dataclass(frozen=True, slots=True)
class PendingExtent:
    """An extent whose chunk name may not be known yet."""

    slot: ChunkSlot
    offset: int
    length: int

    def resolve(self) -> Extent:
        if self.slot.name is None:
            raise RuntimeError("extent resolved before its chunk was sealed")
        return Extent(self.slot.name, self.offset, self.length)

    @classmethod
    def of(cls, extent: Extent) -> PendingExtent:
        return cls(ChunkSlot(extent.chunk), extent.offset, extent.length)


# Called with (slot, data) for every sealed chunk; must eventually set slot.name.
SealChunk = Callable[[ChunkSlot, bytes | bytearray], None]


class ChunkPacker:
    """Turns file contents into chunks, handing each sealed chunk to `seal`."""

    def __init__(self, chunk_size: int, seal: SealChunk) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk size must be positive")
        self.chunk_size = chunk_size
        self._seal = seal
        self._pack = bytearray()
        self._pack_slot = ChunkSlot()

    def add_small(self, data: bytes) -> PendingExtent:
        """Append one whole small file (shorter than the chunk size) to the current pack."""
        if not 0 < len(data) < self.chunk_size:
            raise ValueError("add_small takes 1 .. chunk_size-1 bytes")
        if len(self._pack) + len(data) > self.chunk_size:
            self.flush()
        extent = PendingExtent(self._pack_slot, len(self._pack), len(data))
        self._pack += data
        return extent

    def add_whole(self, data: bytes) -> PendingExtent:
        """Store `data` (one piece of a large file, at most the chunk size) as its own chunk."""
        if not 0 < len(data) <= self.chunk_size:
            raise ValueError("add_whole takes 1 .. chunk_size bytes")
        slot = ChunkSlot()
        self._seal(slot, data)
        return PendingExtent(slot, 0, len(data))

    def add_file(self, data: bytes) -> list[PendingExtent]:
        """Chunk a whole file held in memory (small: packed; large: cut into whole chunks)."""
        if not data:
            return []
        if len(data) < self.chunk_size:
            return [self.add_small(data)]
        view = memoryview(data)
        return [
            self.add_whole(bytes(view[i : i + self.chunk_size]))
            for i in range(0, len(data), self.chunk_size)
        ]

    def flush(self) -> None:
        """Seal the current pack (if it holds anything) and start a new one."""
        if self._pack:
            self._seal(self._pack_slot, self._pack)  # handed over, not copied
            self._pack = bytearray()
            self._pack_slot = ChunkSlot()
