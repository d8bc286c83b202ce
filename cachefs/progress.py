"""The progress-reporting seam: library code reports work done, the CLI decides how to show it."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """Receives progress of one long operation; `update` may be called from worker threads."""

    def start(self, total: int, unit: str, description: str) -> None: ...

    def update(self, amount: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """Progress that shows nothing (library default, non-terminal output)."""

    def start(self, total: int, unit: str, description: str) -> None:
        pass

    def update(self, amount: int) -> None:
        pass

    def close(self) -> None:
        pass
