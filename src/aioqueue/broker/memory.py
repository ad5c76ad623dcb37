"""The embedded broker behind `memory://`: one process, nothing installed, nothing durable.

It keeps the same promises as the RabbitMQ broker within one process's lifetime (ordered log,
bounded prefetch, ack after outcome, delays, the delivery limit, the queue length limit, the
same errors), so a newcomer sees the real behaviour; everything is lost when the process stops,
which `serve` says loudly at start-up.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Collection, Coroutine
from typing import Any

from aioqueue import compactjson
from aioqueue.broker.base import (
    PRIORITY_BANDS,
    BandStats,
    Broker,
    DeadHandler,
    Delivery,
    DeliveryHandler,
    DropFn,
    Inspection,
    LeaderHandler,
    LogHandler,
    LogKind,
    QueueBand,
    band,
)
from aioqueue.broker.memory_topics import MemoryTopics
from aioqueue.config import DeadSettings, TopicsSettings
from aioqueue.errors import BrokerUnavailable, QueueFull

logger = logging.getLogger(__name__)

#: Dead letters kept in memory, beyond `dead.max_length` and `dead.max_age_seconds`: at most so
#: many bytes of them, the oldest going first. A dead letter is a job's whole message, args and
#: all (up to `jobs.max_args_bytes` each), and 10,000 of those could be gigabytes of RAM.
DEAD_LETTER_BYTES = 16 * 2**20


class MemoryDelivery(Delivery):
    __slots__ = ("_broker", "_queue", "_settled", "body", "priority", "redelivered", "returns")

    def __init__(
        self, broker: MemoryBroker, queue: str, body: bytes, priority: int, returns: int
    ) -> None:
        self._broker = broker
        self._queue = queue
        self.body = body
        self.priority = priority
        #: Times the message went back to its queue before (RabbitMQ's x-delivery-count).
        self.returns = returns
        self.redelivered = returns > 0
        self._settled = False

    async def ack(self) -> None:
        self._settle()

    async def requeue(self) -> None:
        if self._settle():  # once: a second requeue would count as another return
            self._broker.give_back(self._queue, self.body, self.priority, self.returns + 1)

    def _settle(self) -> bool:
        if self._settled:
            return False
        self._settled = True
        self._broker.release(self._queue)
        return True


class MemoryBroker(Broker):
    topics: MemoryTopics
    durable = False
    delay_resolution = 0.0

    def __init__(
        self,
        prefetch: int,
        max_queue_length: int = 0,
        delivery_limit: int | None = None,
        topics: TopicsSettings | None = None,
        dead: DeadSettings | None = None,
    ) -> None:
        retention = topics or TopicsSettings()
        self.topics = MemoryTopics(retention.retention_seconds, retention.retention_bytes)
        self._prefetch = prefetch
        self._max_queue_length = max_queue_length
        self._delivery_limit = delivery_limit
        #: Per queue: (-priority, arrival, delivery), so higher priorities come out first.
        self._queues: dict[str, asyncio.PriorityQueue[tuple[int, int, MemoryDelivery]]] = {}
        self._arrivals = itertools.count()
        #: Per queue: the messages of each priority band in it (for `inspect`; a PriorityQueue
        #: can only tell its length).
        self._ready: dict[str, list[int]] = {}
        #: Per queue: messages out of their delay that found it full, waiting for room in order.
        self._waiting: dict[str, collections.deque[tuple[bytes, int]]] = {}
        self._credit: dict[str, asyncio.Semaphore] = {}
        self._consumers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._on_log: LogHandler | None = None
        self._next_offset = 0
        self._on_dead: DeadHandler | None = None
        self._dead = dead or DeadSettings()
        #: (body, reason, when kept, on the monotonic clock), oldest first.
        self._dead_letters: collections.deque[tuple[bytes, str, float]] = collections.deque()
        self._dead_letter_bytes = 0
        self._leader: LeaderHandler | None = None

    async def start(
        self,
        queues: Collection[str],
        on_log: LogHandler,
        on_dead: DeadHandler,
        after: int | None = None,
    ) -> None:
        self._on_log, self._on_dead = on_log, on_dead
        for name in queues:
            self._queues[name] = asyncio.PriorityQueue()
            self._ready[name] = [0] * len(PRIORITY_BANDS)
            self._waiting[name] = collections.deque()
            self._credit[name] = asyncio.Semaphore(self._prefetch)

    async def consume(self, queue: str, handler: DeliveryHandler) -> None:
        self._consumers[queue] = asyncio.create_task(self._consume(queue, handler))

    async def _consume(self, queue: str, handler: DeliveryHandler) -> None:
        while True:
            await self._credit[queue].acquire()
            *_, delivery = await self._queues[queue].get()
            self._ready[queue][band(delivery.priority)] -= 1
            self._admit_waiting(queue)
            self._spawn(handler(delivery))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def put(self, queue: str, body: bytes, priority: int = 0, returns: int = 0) -> None:
        delivery = MemoryDelivery(self, queue, body, priority, returns)
        self._queues[queue].put_nowait((-priority, next(self._arrivals), delivery))
        self._ready[queue][band(priority)] += 1

    def give_back(self, queue: str, body: bytes, priority: int, returns: int) -> None:
        """A requeued message: back to its queue, or dead-lettered past the delivery limit.

        As a quorum queue's x-delivery-limit (measured on RabbitMQ 3.10.8): with limit N, the
        message is dead-lettered when it comes back for the (N+1)-th time, after N + 1
        deliveries, and the dead handler records the job `dead`.
        """
        if self._delivery_limit is not None and returns > self._delivery_limit:
            self._spawn(self._dead_lettered(body, "delivery_limit"))
        else:
            self.put(queue, body, priority, returns)

    async def _dead_lettered(self, body: bytes, reason: str) -> None:
        # What AmqpBroker's consumer of dead letters does: keep the message, report it.
        self._keep_dead_letter(body, reason)
        assert self._on_dead is not None
        try:
            await self._on_dead(body, reason)
        except BrokerUnavailable as exc:  # only while shutting down: the log is closed
            logger.warning("a message dead-lettered (%s) was not recorded: %s", reason, exc)

    def release(self, queue: str) -> None:
        self._credit[queue].release()

    async def lead(self, on_change: LeaderHandler) -> None:
        # One process, no other to compete with: it leads until it stops consuming.
        self._leader = on_change
        on_change(True)

    async def stop_consuming(self) -> None:
        leader, self._leader = self._leader, None
        if leader is not None:
            leader(False)
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

    @property
    def connected(self) -> bool:
        return self._on_log is not None

    async def inspect(self) -> Inspection:
        # One consumer per queue takes every band (`_consume`): as one RabbitMQ process would.
        bands = tuple(
            QueueBand(queue, name, ready, int(queue in self._consumers))
            for queue, counts in sorted(self._ready.items())
            for name, ready in zip(PRIORITY_BANDS, counts, strict=True)
        )
        head = self._next_offset - 1
        return Inspection(bands, head if head >= 0 else None)

    async def submit(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        self._check_route(queue)  # both before the log takes it
        if delay <= 0:
            self._check_room(queue)
        self._log(LogKind.JOB, body)
        await self.publish(body, queue, delay, priority)

    async def publish(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        self._check_route(queue)
        body = compactjson.own(body)  # kept until consumed: not in orjson's 4 KiB buffer
        if delay <= 0:
            self._check_room(queue)
            self.put(queue, body, priority)
            return
        timer: asyncio.TimerHandle | None = None

        def due() -> None:
            assert timer is not None
            self._timers.discard(timer)
            self._waiting[queue].append((body, priority))
            self._admit_waiting(queue)

        timer = asyncio.get_running_loop().call_later(delay, due)
        self._timers.add(timer)

    def _full(self, queue: str) -> bool:
        # Ready messages only, as RabbitMQ counts them: those handed to a consumer do not count.
        return 0 < self._max_queue_length <= self._queues[queue].qsize()

    def _check_room(self, queue: str) -> None:
        # As x-max-length with reject-publish: every publish into a full queue is refused, a
        # retry's as well as a submit's. Delayed ones go to the delay queues, which always
        # take them, and wait for room when due (see `_admit_waiting`).
        if self._full(queue):
            raise QueueFull("the queue is full (broker.max_queue_length)")

    def _admit_waiting(self, queue: str) -> None:
        """Move messages out of their delay into the queue while it has room.

        RabbitMQ's at-least-once dead-lettering out of the delay queues keeps a message that its
        full queue refused, and tries again later: nothing is lost, nothing jumps the limit.
        """
        waiting = self._waiting[queue]
        while waiting and not self._full(queue):
            body, priority = waiting.popleft()
            self.put(queue, body, priority)

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
        self._keep_dead_letter(body, reason)

    @property
    def dead_letters(self) -> list[tuple[bytes, str]]:
        """The dead-letter queue's messages and their reasons, oldest first."""
        self._expire_dead_letters()
        return [(body, reason) for body, reason, _ in self._dead_letters]

    def _keep_dead_letter(self, body: bytes, reason: str) -> None:
        self._dead_letters.append((body, reason, time.monotonic()))
        self._dead_letter_bytes += len(body)
        while len(self._dead_letters) > self._dead.max_length or (
            self._dead_letter_bytes > DEAD_LETTER_BYTES and len(self._dead_letters) > 1
        ):
            self._dead_letter_bytes -= len(self._dead_letters.popleft()[0])
        self._expire_dead_letters()

    def _expire_dead_letters(self) -> None:
        # As a queue's x-message-ttl: the oldest first, each after max_age_seconds.
        horizon = time.monotonic() - self._dead.max_age_seconds
        while self._dead_letters and self._dead_letters[0][2] < horizon:
            self._dead_letter_bytes -= len(self._dead_letters.popleft()[0])

    # Operations -------------------------------------------------------------------------------

    async def queue_stats(self, queue: str) -> list[BandStats]:
        self._check_route(queue)
        consumers = int(queue in self._consumers)
        return [BandStats(depth, consumers) for depth in self._ready[queue]]

    async def dead_letter_count(self) -> int:
        self._expire_dead_letters()
        return len(self._dead_letters)

    async def drop_dead_letters(self, drop: DropFn) -> int:
        self._expire_dead_letters()
        kept = [entry for entry in self._dead_letters if not drop(entry[0])]
        dropped = len(self._dead_letters) - len(kept)
        self._dead_letters = collections.deque(kept)
        self._dead_letter_bytes = sum(len(body) for body, _, _ in kept)
        return dropped

    async def purge_dead_letters(self) -> int:
        count = await self.dead_letter_count()
        self._dead_letters.clear()
        self._dead_letter_bytes = 0
        return count

    def _log(self, kind: LogKind, body: bytes) -> None:
        if self._on_log is None:
            raise RuntimeError("the memory broker is not started")
        offset = self._next_offset
        self._next_offset += 1
        self._on_log(kind, body, offset)
