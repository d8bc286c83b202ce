"""What the processes of a haystack cluster agree on: placement, the volume formula, key checks.

The master computes placements, storage servers store needles by volume, and clients
(`storage_server.client.ReplicatedStorage`, `cachefs.remotes.haystack`) route keys with them;
all of them import these definitions from here, the one place they are written. This module is
part of the shared ground of `cachefs/`: it imports nothing of `master/` or `storage_server/`,
so both servers may import it (tests/test_layers.py holds that).

- A needle key is `KEY_BYTES` bytes (the BLAKE3 hash of a chunk): `check_key`.
- A key lives in logical volume `volume_of(key, N) = int.from_bytes(key, "big") % N`.
- A `Placement` (from the master) maps each volume to its replicas (`ReplicaInfo`), each "up",
  "lagging" (up, being repaired), "down" (missed heartbeats) or "dead" (declared; being
  replaced); writes go to the "up" and "lagging" ones (`write_targets`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cachefs.errors import InvalidName, UsageError

KEY_BYTES = 32  # a needle key: the BLAKE3 hash of its data
STATES = ("up", "lagging", "down", "dead")
WRITABLE_STATES = ("up", "lagging")


def check_key(key: bytes | bytearray | memoryview, field: str = "key") -> bytes:
    """`key` as bytes; InvalidName (a UsageError, INVALID_ARGUMENT over gRPC) naming `field`
    unless it is exactly `KEY_BYTES` bytes."""
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) != KEY_BYTES:
        shown = len(key) if isinstance(key, bytes | bytearray | memoryview) else type(key).__name__
        raise InvalidName(f"{field}: a key is {KEY_BYTES} bytes (a BLAKE3 hash), got {shown}")
    return bytes(key)


def volume_of(key: bytes, volumes: int) -> int:
    """The logical volume (vid) that `key` lives in, of `volumes` (N)."""
    return int.from_bytes(key, "big") % volumes


@dataclass(frozen=True)
class ReplicaInfo:
    """One replica of a volume: the storage server's id, its gRPC address and its state."""

    id: str
    address: str
    state: str  # "up", "lagging", "down" or "dead"

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise UsageError(f"replica {self.id}: state {self.state!r} is not one of "
                             f"{', '.join(STATES)}")
        if not self.address:
            raise UsageError(f"replica {self.id}: no address")


@dataclass(frozen=True)
class Placement:
    """Where every volume lives: `vids[vid]` are the replicas of volume `vid`. Empty `vids`
    means the cluster has no placement yet (fewer than N storage servers registered)."""

    epoch: int
    volumes: int          # N
    replicas: int         # R
    min_replicas: int     # acknowledgements a write needs; 0: every writable replica
    vids: tuple[tuple[ReplicaInfo, ...], ...]

    def __post_init__(self) -> None:
        if self.volumes < 1:
            raise UsageError(f"placement: {self.volumes} volumes, at least 1 needed")
        if self.min_replicas < 0:
            raise UsageError(f"placement: min_replicas {self.min_replicas} is negative")
        if self.vids and len(self.vids) != self.volumes:
            raise UsageError(f"placement: {len(self.vids)} replica sets for "
                             f"{self.volumes} volumes")
        for vid, replicas in enumerate(self.vids):
            addresses = [r.address for r in replicas]
            if len(set(addresses)) != len(addresses):
                raise UsageError(f"placement: volume {vid} names one address twice: "
                                 f"{', '.join(addresses)}")

    @classmethod
    def from_message(cls, message: Any) -> Placement:
        """From a `Placement` message of proto/master.proto (its fields, duck-typed)."""
        vids: list[tuple[ReplicaInfo, ...]] = [()] * len(message.placement)
        for volume in message.placement:
            if volume.vid >= len(vids):
                raise UsageError(f"placement: volume {volume.vid} out of range")
            vids[volume.vid] = tuple(ReplicaInfo(r.id, r.address, r.state)
                                     for r in volume.replicas)
        return cls(epoch=message.epoch, volumes=message.volumes, replicas=message.replicas,
                   min_replicas=message.min_replicas, vids=tuple(vids))

    def vid_of(self, key: bytes) -> int:
        return volume_of(key, self.volumes)

    def replicas_of(self, vid: int) -> tuple[ReplicaInfo, ...]:
        return self.vids[vid]

    def required_acks(self, vid: int) -> int:
        """How many replicas of `vid` must acknowledge a write (at least 1)."""
        if self.min_replicas:
            return self.min_replicas
        return max(1, len(write_targets(self.vids[vid])))


def write_targets(replicas: Sequence[ReplicaInfo]) -> list[ReplicaInfo]:
    """The replicas a write goes to: "up" and "lagging" ones."""
    return [r for r in replicas if r.state in WRITABLE_STATES]
