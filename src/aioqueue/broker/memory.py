"""The embedded broker behind `memory://`: one process, nothing installed, nothing durable.

It keeps the same promises as the RabbitMQ broker within one process's lifetime (ordered log,
bounded prefetch, ack after outcome, delays), so a newcomer sees the real behaviour; everything
is lost when the process stops, which `serve` says loudly at start-up.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Collection

from aioqueue.broker.base import Broker, DeadHandler, Delivery, DeliveryHandler, LogHandler, LogKind
from aioqueue.errors import BrokerUnavailable, QueueFull

#: Dead letters kept in memory; the oldest go first beyond this.
DEAD_LETTERS_KEPT = 10_000


class MemoryDelivery(Delivery):
    __slots__ = ("_broker", "_queue", "_settled", "body", "priority", "redelivered")

    def __init__(
        self, broker: MemoryBroker, queue: str, body: bytes, priority: int, redelivered: bool
    ) -> None:
        self._broker = broker
        self._queue = queue
        self.body = body
        self.priority = priority
        self.redelivered = redelivered
        self._settled = False

    async def ack(self) -> None:
        self._settle()

    async def requeue(self) -> None:
        self._settle()
        self._broker.put(self._queue, self.body, self.priority, redelivered=True)

    def _settle(self) -> None:
        if not self._settled:
            self._settled = True
            self._broker.release(self._queue)


class MemoryBroker(Broker):
    durable = False
    delay_resolution = 0.0

    def __init__(self, prefetch: int, max_queue_length: int = 0) -> None:
        self._prefetch = prefetch
        self._max_queue_length = max_queue_length
        #: Per queue: (-priority, arrival, delivery), so higher priorities come out first.
        self._queues: dict[str, asyncio.PriorityQueue[tuple[int, int, MemoryDelivery]]] = {}
        self._arrivals = itertools.count()
        self._credit: dict[str, asyncio.Semaphore] = {}
        self._consumers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._on_log: LogHandler | None = None
        self.dead_letters: collections.deque[tuple[bytes, str]] = collections.deque(
            maxlen=DEAD_LETTERS_KEPT
        )

    async def start(
        self, queues: Collection[str], on_log: LogHandler, on_dead: DeadHandler
    ) -> None:
        self._on_log = on_log
        for name in queues:
            self._queues[name] = asyncio.PriorityQueue()
            self._credit[name] = asyncio.Semaphore(self._prefetch)

    async def consume(self, queue: str, handler: DeliveryHandler) -> None:
        self._consumers[queue] = asyncio.create_task(self._consume(queue, handler))

    async def _consume(self, queue: str, handler: DeliveryHandler) -> None:
        while True:
            await self._credit[queue].acquire()
            *_, delivery = await self._queues[queue].get()
            task = asyncio.create_task(handler(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def put(self, queue: str, body: bytes, priority: int = 0, redelivered: bool = False) -> None:
        delivery = MemoryDelivery(self, queue, body, priority, redelivered)
        self._queues[queue].put_nowait((-priority, next(self._arrivals), delivery))

    def release(self, queue: str) -> None:
        self._credit[queue].release()

    async def stop_consuming(self) -> None:
        consumers = list(self._consumers.values())
        self._consumers.clear()
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_consuming()
        for timer in self._timers:
            timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def problem(self) -> str | None:
        return None if self._on_log is not None else "broker not started"

    async def submit(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        self._check_route(queue)  # before the log takes it
        if self._max_queue_length and self._queues[queue].qsize() >= self._max_queue_length:
            raise QueueFull("the queue is full (broker.max_queue_length)")
        self._log(LogKind.JOB, body)
        await self.publish(body, queue, delay, priority)

    async def publish(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        self._check_route(queue)
        if delay <= 0:
            self.put(queue, body, priority)
            return
        timer: asyncio.TimerHandle | None = None

        def due() -> None:
            assert timer is not None
            self._timers.discard(timer)
            self.put(queue, body, priority)

        timer = asyncio.get_running_loop().call_later(delay, due)
        self._timers.add(timer)

    def _check_route(self, queue: str) -> None:
        # As RabbitMQ returns a message no queue is bound to take (then BrokerUnavailable);
        # checked for a delayed message too, which would otherwise be lost when due.
        if queue not in self._queues:
            raise BrokerUnavailable(
                f"publish: could not route the message: no queue {queue!r} (this broker has"
                f" {', '.join(sorted(self._queues)) or 'none'})"
            )

    async def append(self, body: bytes) -> None:
        self._log(LogKind.EVENTS, body)

    async def dead_letter(self, body: bytes, reason: str) -> None:
        self.dead_letters.append((body, reason))

    def _log(self, kind: LogKind, body: bytes) -> None:
        if self._on_log is None:
            raise RuntimeError("the memory broker is not started")
        self._on_log(kind, body)
