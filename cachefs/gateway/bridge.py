"""Trio inside the gateway's asyncio loop: the cache tiers' async code, called from HTTP handlers.

The HTTP server (uvicorn on uvloop) is asyncio; the cache tiers (`TieredStore`, single flight,
worker threads with capacity limiters) are trio. `TrioGuest` runs trio as a *guest* of the
asyncio loop (`trio.lowlevel.start_guest_run`): trio's tasks run on the loop's own thread,
between asyncio callbacks, and only trio's wait for I/O sits on a helper thread. So the two
share every object without locks, and a handler that finds what it needs in memory never
crosses into trio at all (the gateway's warm path); `call` is for the rest.

`call(fn, *args)` runs `await fn(*args)` as a trio task and gives its result (or exception)
to the awaiting asyncio task; cancelling the asyncio task (a client gone) cancels the trio one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger("cachefs.gateway.bridge")

T = TypeVar("T")


class TrioGuest:
    def __init__(self) -> None:
        self.nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._done: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        """Start trio on the running asyncio loop; returns once its nursery is open."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        self._done = loop.create_future()

        async def trio_main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                started.set_result(None)
                await trio.sleep_forever()

        def done(outcome: Any) -> None:
            assert self._done is not None
            if not self._done.done():
                self._done.set_result(outcome)

        trio.lowlevel.start_guest_run(
            trio_main, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon, done_callback=done,
            host_uses_signal_set_wakeup_fd=True)
        await started

    async def stop(self) -> None:
        """Cancel everything trio runs (prefetches included) and wait until it has ended."""
        if self._token is None or self.nursery is None or self._done is None:
            return
        self._token.run_sync_soon(self.nursery.cancel_scope.cancel)
        outcome = await self._done
        try:
            outcome.unwrap()
        except BaseException:
            log.exception("the tiers' trio run ended with an error")

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`await fn(*args)` in trio, from asyncio."""
        assert self._token is not None and self.nursery is not None, "start() first"
        loop = asyncio.get_running_loop()
        result: asyncio.Future[T] = loop.create_future()
        scopes: list[trio.CancelScope] = []

        async def task() -> None:
            with trio.CancelScope() as scope:
                scopes.append(scope)
                try:
                    value = await fn(*args)
                except trio.Cancelled:
                    raise
                except BaseException as e:  # handed to the asyncio side, which raises it
                    if not result.done():
                        result.set_exception(e)
                    return
                if not result.done():
                    result.set_result(value)
            if not result.done():
                result.cancel()  # cancelled from the asyncio side, or trio is stopping

        nursery = self.nursery

        def start() -> None:
            try:
                nursery.start_soon(task)
            except RuntimeError:  # the nursery is closing: trio is stopping
                if not result.done():
                    result.cancel()

        self._token.run_sync_soon(start)
        try:
            return await result
        except asyncio.CancelledError:
            if scopes:
                self._token.run_sync_soon(scopes[0].cancel)
            raise

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start `fn(*args)` in trio and do not wait for it (prefetches)."""
        if self._token is None or self.nursery is None:
            return
        nursery = self.nursery

        def start() -> None:
            with contextlib.suppress(RuntimeError):  # trio is stopping: nothing to prefetch for
                nursery.start_soon(fn, *args)

        self._token.run_sync_soon(start)
