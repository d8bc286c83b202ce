"""A real remote wrapped to record the operations made on it (for ordering and counting checks)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from cachefs.remotes.base import ObjectInfo, Remote


class RecordingRemote:
    """Forwards every call to a real remote and appends (operation, key) to `calls`."""

    def __init__(self, inner: Remote) -> None:
        self.inner = inner
        self.url = inner.url
        self.parallelism = getattr(inner, "parallelism", 4)
        self.calls: list[tuple[str, str]] = []

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        self.calls.append(("get", key))
        return self.inner.get(key, start, length)

    def put(self, key: str, data: bytes | memoryview) -> None:
        self.calls.append(("put", key))
        self.inner.put(key, data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        self.calls.append(("put_if_absent", key))
        return self.inner.put_if_absent(key, data)

    def has(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        self.calls.extend(("has", k) for k in keys)
        return self.inner.has(keys)

    def list(self, prefix: str) -> Iterator[str]:
        self.calls.append(("list", prefix))
        return self.inner.list(prefix)

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        self.calls.append(("list_info", prefix))
        return self.inner.list_info(prefix)

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.inner.delete(key)

    def flush(self) -> None:
        self.calls.append(("flush", ""))
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def count(self, op: str, prefix: str = "") -> int:
        return sum(1 for o, k in self.calls if o == op and k.startswith(prefix))
