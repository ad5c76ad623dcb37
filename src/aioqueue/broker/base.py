"""What aioqueue needs of a message broker, and nothing about any broker in particular.

A broker carries three kinds of traffic:

* **job messages**, one per attempt of a job, to a named queue; consumed with a bounded
  number in flight and acked only once the attempt's outcome is recorded;
* **the event log**, one totally ordered log that every process reads from its retention start
  and then live. It holds the body of every submitted job (the `queued` event) and batches of
  later events. The job store of every process is built by applying it in order.
* **topic messages**, in a log of their own (`Broker.topics`, a `TopicLog`), kept for a
  retention and read live by every process, and from any retained offset for a catch-up.

`submit()` puts one message in both at once, so a job is in its queue if and only if it is in
the log. Usage, as `Service` does it::

    broker = MemoryBroker()                      # or AmqpBroker(settings)
    await broker.start(queues={"default"}, on_log=eventlog.on_log, on_dead=runner.on_dead)
    broker.consume("default", runner.on_delivery)
    await broker.submit(spec_bytes, "default")   # returns once the broker confirmed it
    ...
    await broker.close()

Every publishing method returns only after the broker confirmed the message and raises
`BrokerUnavailable` otherwise (including when no confirm came in time). Errors of the broker's
client library never escape a `Broker`.

A queue is three queues in the broker, one per priority band (`PRIORITY_BANDS`); messages of a
higher band are handed out first. The dead-letter queue is one for all queues, never consumed by
aioqueue, and bounded (`DeadSettings`): it is where an operator finds what died.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

#: Job priorities are served in three bands (RabbitMQ's quorum queues have no priorities: one
#: queue per band, see amqp.py), named by the priorities each takes.
PRIORITY_BANDS = ("0-3", "4-6", "7-9")


def band(priority: int) -> int:
    """The index in `PRIORITY_BANDS` of the band of a priority (0 to 9)."""
    return (priority >= 4) + (priority >= 7)


@dataclass(frozen=True, slots=True)
class QueueBand:
    """One priority band of a job queue as the broker sees it: every process's consumers."""

    queue: str
    band: str
    #: Messages ready to be delivered (not those delivered and not yet acked, nor delayed ones).
    ready: int
    consumers: int


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the broker tells of itself when asked (`Broker.inspect`), for metrics."""

    bands: tuple[QueueBand, ...]
    #: The offset of the newest entry of the event log, as far as the broker tells (None: it is
    #: empty, or did not say).
    log_head: int | None


@dataclass(frozen=True, slots=True)
class BandStats:
    """One band of a queue, as the broker sees it now."""

    #: Messages ready to be handed out (not those held by consumers, nor those delayed).
    depth: int
    #: Consumers attached, over every process.
    consumers: int


#: Decides, from its body, whether a message of the dead-letter queue goes.
DropFn = Callable[[bytes], bool]


class LogKind(StrEnum):
    #: A submitted job's message body: its `queued` event.
    JOB = "job"
    #: `{"id": batch_id, "events": [event, ...]}`: later events, batched.
    EVENTS = "events"


class Delivery(abc.ABC):
    """One job message handed to a consumer.

    Settling it (ack, requeue) never raises and never hangs: where it cannot be done (its
    channel is gone), the broker delivers the message again anyway.
    """

    #: The message body: a job spec (see `jobs.Job.spec`).
    body: bytes
    #: True if the broker delivered this message before (a consumer died or gave it back).
    redelivered: bool

    @abc.abstractmethod
    async def ack(self) -> None:
        """Remove the message for good. Call only once its outcome is recorded."""

    @abc.abstractmethod
    async def requeue(self) -> None:
        """Give the message back to the queue, to be delivered again (marked redelivered)."""


DeliveryHandler = Callable[[Delivery], Coroutine[Any, Any, None]]
#: Called in log order, synchronously, for every entry of the event log, with its offset (which
#: increases by one per entry, the same in every process).
LogHandler = Callable[[LogKind, bytes, int], None]
#: Called with the body of a job message the broker dead-lettered, and why.
DeadHandler = Callable[[bytes, str], Awaitable[None]]
#: Called with True when this process becomes the leader (the one that submits the periodic
#: jobs' ticks), and with False as soon as it may no longer be.
LeaderHandler = Callable[[bool], None]


#: Called in offset order for every topic message, live: (offset, topic, data as JSON bytes).
TopicHandler = Callable[[int, str, bytes], None]
#: A retained topic message: (offset, topic, data). Topic None: a marker of aioqueue's own, with
#: no data, that a reader must still count (it moves the tail; see `TopicLog.position`).
TopicEntry = tuple[int, str | None, bytes]


class TopicLog(abc.ABC):
    """The topic messages: one log, every message with an offset that is the same in every
    process and strictly increasing; kept for a retention by age and size."""

    @abc.abstractmethod
    def listen(self, handler: TopicHandler) -> None:
        """Hand every message from now on to `handler`, in offset order (one handler)."""

    @property
    @abc.abstractmethod
    def position(self) -> int | None:
        """The offset the live reader hands on next: every message before it was handed to
        the handler already, or came before this process started reading. None until known."""

    @abc.abstractmethod
    async def wait_position(self) -> int:
        """`position`, once known; BrokerUnavailable if it is not known soon."""

    @abc.abstractmethod
    async def publish(self, topic: str, data: bytes) -> int:
        """Append a message and return its offset, once the broker confirmed it."""

    @abc.abstractmethod
    def lost(self, after: int, first: int) -> bool:
        """Whether a read from `after` that began at `first` missed messages (retention)."""

    @abc.abstractmethod
    def read(self, after: int) -> AsyncGenerator[TopicEntry, None]:
        """The retained messages with an offset above `after`, in order, for as long as the
        caller reads; from the first retained one if those right after `after` are gone.
        Raises BrokerUnavailable if the broker goes away meanwhile."""


class Broker(abc.ABC):
    #: Whether accepted jobs survive a restart of this process.
    durable: bool
    #: The topic messages.
    topics: TopicLog
    #: Whole seconds only (a broker that schedules by TTL), or any float.
    delay_resolution: float

    @abc.abstractmethod
    async def start(
        self,
        queues: Collection[str],
        on_log: LogHandler,
        on_dead: DeadHandler,
        after: int | None = None,
    ) -> None:
        """Connect, declare the topology for `queues`, and start reading the log: after offset
        `after` (the last entry a saved store applied), or from its start.

        Raises `BrokerUnavailable` if the broker cannot be reached at all at start-up; after
        that, the broker reconnects by itself and `problem()` says what is wrong meanwhile.
        """

    @abc.abstractmethod
    async def consume(self, queue: str, handler: DeliveryHandler) -> None:
        """Start consuming `queue` with `handler`, and again after every reconnect."""

    @abc.abstractmethod
    async def lead(self, on_change: LeaderHandler) -> None:
        """Compete to be the leader, from now on and after every reconnect, and tell `on_change`
        whenever this process becomes it or stops being it. At most one process of those that
        share the broker is the leader at a time, as far as the broker can tell: a process cut
        off from the broker may learn that it lost the lead only after another took it, which
        is why a tick's job has an idempotency key. `stop_consuming()` gives the lead up."""

    @abc.abstractmethod
    async def stop_consuming(self) -> None:
        """Stop taking new job messages, and give up the lead; the messages in flight may still
        be acked."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect. Unacked job messages go back to their queues."""

    @abc.abstractmethod
    def problem(self) -> str | None:
        """None if connected, topology declared and every consumer attached; else why not."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether it is connected with its topology declared: publishes can be made."""

    @abc.abstractmethod
    async def inspect(self) -> Inspection:
        """Each priority band of each queue (ready messages, consumers) and the event log's
        newest offset. A few round trips to the broker: callers cache it. Raises
        BrokerUnavailable."""

    @abc.abstractmethod
    async def submit(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        """Publish a new job: to `queue` (after `delay` seconds) and, at once, to the log.

        Of the messages ready in a queue, those of a higher `priority` (0 to 9) come first.
        """

    @abc.abstractmethod
    async def publish(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        """Publish a job message to `queue` (not to the log), after `delay` seconds."""

    @abc.abstractmethod
    async def append(self, body: bytes) -> None:
        """Append one `LogKind.EVENTS` entry to the log."""

    @abc.abstractmethod
    async def dead_letter(self, body: bytes, reason: str) -> None:
        """Keep a job message in the dead-letter queue, with the reason (past the queue's bound,
        the oldest message goes)."""

    # Operations -------------------------------------------------------------------------------

    @abc.abstractmethod
    async def queue_stats(self, queue: str) -> list[BandStats]:
        """Each band of `queue` (in the order of `PRIORITY_BANDS`). Raises BrokerUnavailable."""

    @abc.abstractmethod
    async def dead_letter_count(self) -> int:
        """Messages in the dead-letter queue. Raises BrokerUnavailable."""

    @abc.abstractmethod
    async def drop_dead_letters(self, drop: DropFn) -> int:
        """Remove the messages of the dead-letter queue for which `drop(body)` is true; returns
        how many. The others stay, their age kept. Raises BrokerUnavailable (then some may be
        gone and the others stay)."""

    @abc.abstractmethod
    async def purge_dead_letters(self) -> int:
        """Empty the dead-letter queue; returns how many messages it held."""
