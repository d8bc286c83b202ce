"""The CSI plugin's persistent state: controller volumes and node volumes, as JSON files.

Kept in the plugin's state directory so a restarted plugin knows every volume it created and
every volume staged or published on its node (csi-driver-host-path keeps its state the same
way). Writes are atomic (temporary file + rename) and serialized by a lock.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from cachefs.errors import ConfigError


class JsonStore:
    """A dict of records persisted as one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.records: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except FileNotFoundError:
            self.records = {}
        except (OSError, ValueError) as e:
            # Refuse rather than start empty: forgetting volumes would orphan their mounts.
            raise ConfigError(f"state file {path} is unreadable ({e}); repair or move it "
                              "away (volumes it lists must then be cleaned up by hand)") from e
        if not isinstance(self.records, dict):
            raise ConfigError(f"state file {path} does not hold a JSON object")

    def get(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            record = self.records.get(key)
            return dict(record) if record is not None else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        with self.lock:
            self.records[key] = record
            self._save()

    def delete(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            record = self.records.pop(key, None)
            if record is not None:
                self._save()
            return record

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            return sorted((k, dict(v)) for k, v in self.records.items())

    def snapshot(self) -> list[dict[str, Any]]:
        """The records as they are now, without taking the lock: a node RPC holds it while the
        mounter mounts (seconds), and a metrics scrape must not wait for that. dict.copy() runs
        under the GIL in one step, so the copy is never torn."""
        return list(self.records.copy().values())

    def _save(self) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.records, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
