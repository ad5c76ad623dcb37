"""The order in which the jobs a process holds start: highest priority first, none starved.

A broker may hand a process more jobs of one queue than it runs at once (RabbitMQ does: one
consumer per priority band, each with its own prefetch), so the process picks which runs next.
A job that has waited `max_wait` seconds goes first whatever its priority: lower priorities are
delayed by higher ones, never held for ever (nor past RabbitMQ's consumer_timeout, which closes
the channel of a message unacked for too long).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator


class PriorityGate:
    """At most `limit` holders at once; waiters enter by priority, then by arrival."""

    def __init__(self, limit: int, max_wait: float) -> None:
        self._free = limit
        self._max_wait = max_wait
        self._order = itertools.count()
        #: (-priority, arrival number, arrival time, future): a heap by priority.
        self._waiting: list[tuple[int, int, float, asyncio.Future[None]]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            future = asyncio.get_running_loop().create_future()
            entry = (-priority, next(self._order), time.monotonic(), future)
            heapq.heappush(self._waiting, entry)
            try:
                await future
            except asyncio.CancelledError:
                if future.cancelled():
                    with contextlib.suppress(ValueError):  # _release may have dropped it
                        self._waiting.remove(entry)
                        heapq.heapify(self._waiting)
                else:
                    self._release()  # admitted, then cancelled before it ran: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            entry = self._oldest_overdue() or heapq.heappop(self._waiting)
            if not entry[3].done():  # not a waiter cancelled meanwhile
                entry[3].set_result(None)
                return
        self._free += 1

    def _oldest_overdue(self) -> tuple[int, int, float, asyncio.Future[None]] | None:
        # A linear scan: only jobs that a process holds wait here (a few prefetch windows).
        oldest = min(self._waiting, key=lambda entry: entry[1])
        if time.monotonic() - oldest[2] < self._max_wait:
            return None
        self._waiting.remove(oldest)
        heapq.heapify(self._waiting)
        return oldest
