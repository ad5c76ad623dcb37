"""The order in which the jobs a process holds start: highest priority first, none starved.

A broker may hand a process more jobs of one queue than it runs at once (RabbitMQ does: one
consumer per priority band, each with its own prefetch), so the process picks which runs next.
A job that has waited `max_wait` seconds goes first whatever its priority: lower priorities are
delayed by higher ones, never held for ever (nor past RabbitMQ's consumer_timeout, which closes
the channel of a message unacked for too long).

A holder may leave work behind that still runs (a sync task's thread, which cannot be stopped):
it keeps its slot past its block (`Slot.keep`) until that work returns, so a queue never has more
than `limit` things running, whether or not their jobs are over.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable

_Entry = tuple[int, int, float, asyncio.Future[None]]


class NoSlot(Exception):
    """No slot is given: the gate is shut, or every slot is kept (see `PriorityGate`)."""


class Slot:
    """One holder's place in a gate, from `PriorityGate.slot`."""

    __slots__ = ("_gate", "_inside", "kept")

    def __init__(self, gate: PriorityGate) -> None:
        self._gate = gate
        self._inside = True
        #: True while kept (`keep()`): the block's end does not give the slot back.
        self.kept = False

    def keep(self) -> Callable[[], None]:
        """Keep the slot past the `async with` block, for work that outlives it; the function
        returned gives it back. Call that on the event loop's thread; more than once is harmless.
        """
        assert not self.kept, "kept already"
        self.kept = True
        gate = self._gate
        gate._kept += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if given_back:
                return
            given_back = True
            gate._kept -= 1
            if self._inside:
                self.kept = False  # the block goes on: its end gives the slot back, as ever
            else:
                gate._release()

        return give_back


class PriorityGate:
    """At most `limit` holders at once; waiters enter by priority, then by arrival.

    With `patience`, a waiter checks every `patience` seconds whether every slot is kept
    (`Slot.keep`): then no slot can be expected within any known time, and it gets `NoSlot` so
    that its message goes back to the broker rather than wait for ever in this process.
    """

    def __init__(self, limit: int, max_wait: float, patience: float | None = None) -> None:
        self._limit = limit
        self._free = limit
        self._kept = 0
        self._shut = False
        self._max_wait = max_wait
        self._patience = patience
        self._order = itertools.count()
        #: (-priority, arrival number, arrival time, future): a heap by priority.
        self._waiting: list[_Entry] = []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kept(self) -> int:
        """Slots kept past their holders' blocks, not given back yet."""
        return self._kept

    def shut(self) -> None:
        """Give no more slots: every waiter, and every later arrival, gets `NoSlot`. Holders
        keep theirs until they leave (for a process that stops: its waiters go back at once,
        even if every slot is kept)."""
        self._shut = True
        waiting, self._waiting = self._waiting, []
        for *_, future in waiting:
            if not future.done():
                future.set_exception(NoSlot("shutting down"))

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[Slot]:
        """Hold a slot for the block (`NoSlot` instead, see the class): the highest priority
        waiting gets the next free one, or the oldest waiter past `max_wait`."""
        if self._shut:
            raise NoSlot("shutting down")
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            await self._wait(priority)
        held = Slot(self)
        try:
            yield held
        finally:
            held._inside = False
            if not held.kept:
                self._release()

    async def _wait(self, priority: int) -> None:
        future = asyncio.get_running_loop().create_future()
        entry = (-priority, next(self._order), time.monotonic(), future)
        heapq.heappush(self._waiting, entry)
        try:
            while True:
                # asyncio.wait, unlike wait_for, leaves the future alone when it times out.
                done, _ = await asyncio.wait([future], timeout=self._patience)
                if done:
                    future.result()  # NoSlot if the gate was shut meanwhile
                    return
                if self._kept >= self._limit:
                    self._drop(entry)
                    future.cancel()
                    raise NoSlot(f"all {self._limit} slots are held by stuck work")
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release()  # admitted, then cancelled before it ran: pass it on
            else:
                future.cancel()  # so that _release passes over it
                self._drop(entry)
            raise

    def _drop(self, entry: _Entry) -> None:
        with contextlib.suppress(ValueError):  # _release or shut() may have taken it
            self._waiting.remove(entry)
            heapq.heapify(self._waiting)

    def _release(self) -> None:
        while self._waiting:
            entry = self._oldest_overdue() or heapq.heappop(self._waiting)
            if not entry[3].done():  # not a waiter cancelled meanwhile
                entry[3].set_result(None)
                return
        self._free += 1

    def _oldest_overdue(self) -> _Entry | None:
        # A linear scan: only jobs that a process holds wait here (a few prefetch windows).
        oldest = min(self._waiting, key=lambda entry: entry[1])
        if time.monotonic() - oldest[2] < self._max_wait:
            return None
        self._waiting.remove(oldest)
        heapq.heapify(self._waiting)
        return oldest
