"""Which dataset versions were mounted from a cache directory: `CACHE_DIR/versions/`.

Every mount daemon records the version it serves, when it starts, in
``CACHE_DIR/versions/<dataset>@<commit>.json``::

    {"dataset": "imagenet", "commit": "<64 hex>", "remote": "s3://bucket/prefix",
     "refs": ["main", "v1"]}

`refs` lists every ref under which that commit was mounted (a commit mounted as ``main`` and
later as ``v1`` lists both). A record is merged under an flock of ``versions/.lock`` and replaced
atomically (temporary file, then rename), so concurrent mounts and readers never see a partial
file. The node inventory (`csi.inventory`) reads these records to report what the node caches.
Recording is best effort: a failure is logged, never fatal to the mount.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any

log = logging.getLogger("cachefs.cache.versions")

VERSIONS_DIR = "versions"
_COMMIT_RE = re.compile(r"[0-9a-f]{64}")


def versions_dir(cache_dir: str | Path) -> Path:
    return Path(cache_dir) / VERSIONS_DIR


def record_path(cache_dir: str | Path, dataset: str, commit: str) -> Path:
    return versions_dir(cache_dir) / f"{dataset}@{commit}.json"


def _valid(record: object) -> bool:
    return (isinstance(record, dict)
            and isinstance(record.get("dataset"), str) and record["dataset"]
            and "/" not in record["dataset"]
            and isinstance(record.get("commit"), str)
            and _COMMIT_RE.fullmatch(record["commit"]) is not None
            and isinstance(record.get("refs"), list)
            and all(isinstance(r, str) for r in record["refs"]))


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if _valid(record) else None


def record_version(cache_dir: str | Path, dataset: str, commit: str, remote: str,
                   ref: str) -> bool:
    """Record (or merge `ref` into) the version record of `dataset`@`commit`; False, logged, if
    it could not be written."""
    directory = versions_dir(cache_dir)
    path = record_path(cache_dir, dataset, commit)
    tmp = directory / f".tmp-{secrets.token_hex(8)}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            old = _read(path)
            refs = list(old["refs"]) if old is not None else []
            if ref and ref not in refs:
                refs.append(ref)
            record = {"dataset": dataset, "commit": commit, "remote": remote, "refs": refs}
            if record == old:
                return True  # nothing new: leave the file (and the directory's mtime) alone
            tmp.write_text(json.dumps(record) + "\n")
            os.replace(tmp, path)
        finally:
            os.close(fd)  # releases the flock
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("could not record the mounted version %s@%s in %s: %s", dataset, commit,
                    directory, e)
        return False
    return True


def read_versions(cache_dir: str | Path) -> list[dict[str, Any]]:
    """Every valid version record under `cache_dir`, sorted by (dataset, commit); files that
    are unreadable or malformed are skipped."""
    records = []
    try:
        names = os.listdir(versions_dir(cache_dir))
    except OSError:
        return []
    for name in sorted(names):
        if name.startswith(".") or not name.endswith(".json"):
            continue
        record = _read(versions_dir(cache_dir) / name)
        if record is not None:
            records.append(record)
    records.sort(key=lambda r: (r["dataset"], r["commit"]))
    return records
