"""Repair (anti-entropy) of one logical volume between two storage servers.

`repair_volume(source, target, vid)` brings `target` up to date with `source` for volume `vid`:
it pages through the source's keys (ListKeys), asks the target which of each page it lacks
(Has), reads those from the source (Get) and writes them to the target (Put) in batches of
about `batch_bytes`. Needles are immutable and idempotent, so a repair can run while both
servers take writes, be interrupted and run again. It only adds: a needle deleted on the
source stays on the target. The master runs it for a replica that was down or is new.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from cachefs.errors import CorruptObject, ObjectNotFound
from storage_server.client import StorageClient

log = logging.getLogger("cachefs.storage.repair")

REPAIR_BATCH_BYTES = 16 << 20
LIST_PAGE = 1000


@dataclass
class RepairReport:
    vid: int
    source: str
    target: str
    checked: int = 0        # source keys compared
    missing: int = 0        # of those, absent on the target
    copied: int = 0         # needles written to the target
    bytes_copied: int = 0   # their data bytes
    vanished: int = 0       # listed on the source, gone when read (deleted meanwhile)
    corrupt: list[str] = field(default_factory=list)  # source needles failing their checksum

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def repair_volume(source: StorageClient, target: StorageClient, vid: int,
                  batch_bytes: int = REPAIR_BATCH_BYTES, page: int = LIST_PAGE,
                  report: RepairReport | None = None) -> RepairReport:
    """Copy every needle of volume `vid` that `source` has and `target` lacks. `report`: the
    one to fill in as it goes (another thread may read its progress), else a new one."""
    if report is None:
        report = RepairReport(vid=vid, source=source.address, target=target.address)
    batch: list[tuple[bytes, bytes]] = []
    size = 0

    def flush() -> None:
        nonlocal batch, size
        if batch:
            target.put_many(batch)
            report.copied += len(batch)
            report.bytes_copied += size
            batch, size = [], 0

    for keys in source.iter_keys(vid, page):
        report.checked += len(keys)
        present = target.has_many(keys)
        for key, there in zip(keys, present, strict=True):
            if there:
                continue
            report.missing += 1
            try:
                data = source.get(key)
            except ObjectNotFound:
                report.vanished += 1
                continue
            except CorruptObject:
                log.warning("repair of volume %d: %s has a corrupt copy of %s; skipped",
                            vid, source.address, key.hex())
                report.corrupt.append(key.hex())
                continue
            batch.append((key, data))
            size += len(data)
            if size >= batch_bytes:
                flush()
    flush()
    log.info("repair of volume %d from %s to %s: %d checked, %d missing, %d copied",
             vid, source.address, target.address, report.checked, report.missing, report.copied)
    return report
