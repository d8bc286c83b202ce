"""Single flight: concurrent calls for one key share one run of the work (trio).

The first caller of `SingleFlight.run(key, work)` leads: it runs `work()`; callers that arrive
while it runs wait for its outcome instead of repeating the work. A failure of the work is every
waiter's failure (the origin said no, the object is corrupt: asking again at once would not
help). A leader that did not finish — cancelled because its reader gave up or a sibling task in
its nursery failed — says nothing about the key, so its waiters run the work again (one of them
leads the retry) instead of failing with an error that belonged to someone else's cancel scope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import trio

from cachefs.errors import CachefsError, RemoteError

T = TypeVar("T")


@dataclass
class _SharedCall(Generic[T]):
    """One leader's run of the work for a key, and its outcome once done, for its waiters."""

    done: trio.Event = field(default_factory=trio.Event)
    finished: bool = False  # False: the leader was cancelled or interrupted; waiters retry
    result: T | None = None
    error: CachefsError | None = None


class SingleFlight(Generic[T]):
    """Runs at most one `work()` per key at a time; concurrent callers share its outcome."""

    def __init__(self) -> None:
        self._calls: dict[str, _SharedCall[T]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._calls

    def live_keys(self) -> Mapping[str, object]:
        """The keys in flight, live (see `MemoryCache.live_keys`)."""
        return self._calls

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        """The outcome of `work()` for `key`: this call's own run, or the one in flight."""
        while (call := self._calls.get(key)) is not None:
            await call.done.wait()
            if call.finished:
                if call.error is not None:
                    raise call.error
                return call.result  # type: ignore[return-value]
            # The leader was cancelled: loop, and lead the retry unless another waiter does.
        call = self._calls[key] = _SharedCall()
        try:
            call.result = await work()
            call.finished = True
            return call.result
        except CachefsError as e:
            call.error, call.finished = e, True
            raise
        except Exception as e:  # a bug or an unexpected library error: the same for all
            call.error = RemoteError(f"fetching {key} failed: {e}")
            call.finished = True
            raise
        finally:  # also on Cancelled and KeyboardInterrupt: finished stays False
            del self._calls[key]
            call.done.set()
