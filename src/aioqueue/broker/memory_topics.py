"""The topic log of `memory://`: a list in this process, trimmed to its retention.

Offsets start at 0 and grow by one per message; a message is handed to the live handler as it
is appended, so `position` is always the next offset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from aioqueue import compactjson
from aioqueue.broker.base import TopicEntry, TopicHandler, TopicLog


class MemoryTopics(TopicLog):
    def __init__(self, retention_seconds: float, retention_bytes: int) -> None:
        self._max_age = retention_seconds
        self._max_bytes = retention_bytes
        #: (offset, topic, data, time appended); the retained ones are those from `_start` on.
        self._entries: list[tuple[int, str, bytes, float]] = []
        self._start = 0
        self._bytes = 0
        self._next = 0
        self._handler: TopicHandler | None = None
        self._grew = asyncio.Event()

    def listen(self, handler: TopicHandler) -> None:
        self._handler = handler

    @property
    def position(self) -> int:
        return self._next

    async def wait_position(self) -> int:
        return self._next

    async def publish(self, topic: str, data: bytes) -> int:
        # A turn of the loop, as a broker's confirm takes: a task publishing in a loop must not
        # hold the process.
        await asyncio.sleep(0)
        data = compactjson.own(data)  # kept for the retention: not in orjson's 4 KiB buffer
        offset, self._next = self._next, self._next + 1
        now = time.time()
        self._entries.append((offset, topic, data, now))
        self._bytes += len(data)
        self._trim(now)
        self._grew.set()
        self._grew = asyncio.Event()
        if self._handler is not None:
            self._handler(offset, topic, data)
        return offset

    def _trim(self, now: float) -> None:
        entries, start = self._entries, self._start
        while start < len(entries) - 1 and (
            self._bytes > self._max_bytes or entries[start][3] < now - self._max_age
        ):
            self._bytes -= len(entries[start][2])
            start += 1
        if start > len(entries) // 2:  # drop the trimmed half at once: amortised O(1)
            del entries[:start]
            start = 0
        self._start = start

    def lost(self, after: int, first: int) -> bool:
        return first > after + 1  # offsets are consecutive

    async def read(self, after: int) -> AsyncGenerator[TopicEntry, None]:
        while True:
            self._trim(time.time())
            entries, start = self._entries, self._start
            if start == len(entries) or entries[-1][0] <= after:
                await self._grew.wait()
                continue
            # Offsets are consecutive: the one after `after` is found by subtraction.
            index = max(start, start + after + 1 - entries[start][0])
            offset, topic, data, _ = entries[index]
            after = offset
            yield offset, topic, data
