"""Single flight: concurrent calls for one key share one run of the work (trio).

The first caller of `SingleFlight.run(key, work)` leads: it runs `work()`; callers that arrive
while it runs wait for its outcome instead of repeating the work. A failure of the work is every
waiter's failure (the origin said no, the object is corrupt: asking again at once would not
help). A leader that did not finish — cancelled because its reader gave up or a sibling task in
its nursery failed — says nothing about the key, so its waiters run the work again (one of them
leads the retry) instead of failing with an error that belonged to someone else's cancel scope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from cachefs.errors import CachefsError, RemoteError

T = TypeVar("T")


@dataclass
class _Flight(Generic[T]):
    done: trio.Event = field(default_factory=trio.Event)
    finished: bool = False  # False: the leader was cancelled or interrupted; waiters retry
    result: T | None = None
    error: CachefsError | None = None


class SingleFlight(Generic[T]):
    """Runs at most one `work()` per key at a time; concurrent callers share its outcome."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._flights

    def __len__(self) -> int:
        return len(self._flights)

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        """The outcome of `work()` for `key`: this call's own run, or the one in flight."""
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.finished:
                if flight.error is not None:
                    raise flight.error
                return flight.result  # type: ignore[return-value]
            # The leader was cancelled: loop, and lead the retry unless another waiter does.
        flight = self._flights[key] = _Flight()
        try:
            flight.result = await work()
            flight.finished = True
            return flight.result
        except CachefsError as e:
            flight.error, flight.finished = e, True
            raise
        except Exception as e:  # a bug or an unexpected library error: the same for all
            flight.error = RemoteError(f"fetching {key} failed: {e}")
            flight.finished = True
            raise
        finally:  # also on Cancelled and KeyboardInterrupt: finished stays False
            del self._flights[key]
            flight.done.set()
