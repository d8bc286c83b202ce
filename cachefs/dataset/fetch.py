"""Reading chunks in a planned order with a bounded window of parallel fetches ahead.

Checkout and verify know every chunk they will need, in order, before they start: a stream
submits fetches up to `window` chunks ahead on worker threads (each chunk verified against its
name there) and hands them back in plan order, so the consumer writes or hashes one chunk while
the next ones are on the wire. Memory is bounded by window x chunk size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from cachefs.dataset.repo import Repository


class ChunkStream:
    """Yields whole, verified chunks in the order planned; `take(name)` returns the next one."""

    def __init__(self, repo: Repository, plan: Iterable[str], workers: int = 8,
                 window: int = 16) -> None:
        self.repo = repo
        self._plan = iter(plan)
        self._window = window
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="cachefs-fetch")
        self._inflight: deque[tuple[str, Future[bytes]]] = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._inflight) < self._window:
            name = next(self._plan, None)
            if name is None:
                return
            self._inflight.append((name, self._pool.submit(self.repo.get_chunk, name)))

    def take(self, name: str) -> bytes:
        """The next planned chunk, which must be `name`; raises what its fetch raised."""
        planned, future = self._inflight.popleft()
        if planned != name:
            raise RuntimeError(f"chunk stream out of order: planned {planned}, asked {name}")
        self._fill()
        return future.result()

    def close(self) -> None:
        for _, future in self._inflight:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ChunkStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collapse_repeats(names: Iterable[str]) -> Iterable[str]:
    """Drop consecutive duplicates (small files packed together share one chunk)."""
    last = None
    for name in names:
        if name != last:
            yield name
            last = name
