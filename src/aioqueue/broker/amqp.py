"""RabbitMQ, through aio-pika. Every RabbitMQ detail of aioqueue lives in this module.

Topology, with P the configured prefix (several apps share a vhost by prefix):

    P.submit  (fanout) --> P.events        stream: the event log, its newest log_max_bytes
                       \\-> P.jobs (direct) --[queue name]--> P.q.<queue>   quorum, one per queue
    P.submit-delayed (fanout) --> P.events, and --> aioqueue.delay.27 (below)
    P.q.<queue> --delivery limit--> P.dlx (fanout) --> P.dead-lettered --(recorded `dead`)--> P.dlq
    failed jobs ------------------------------------------------------------------------> P.dlq
    P.dlq: quorum, never consumed, bounded (dead.max_length, oldest dropped; dead.max_age_seconds)

    aioqueue.delay.27 ... aioqueue.delay.0 (topic) --> aioqueue.delay.deliver
                                                       --[#.P.q.<queue>]--> P.q.<queue>

    P.scheduler   quorum, single active consumer: the leader lock (amqp_leader.py), declared
                  by apps with periodic tasks

Delays need no plugin: a message delayed d seconds carries the 28 binary digits of d in its
routing key. Level L's exchange sends it to queue `aioqueue.delay.L` (TTL 2^L s) if digit L is 1,
else straight down to level L-1; each delay queue dead-letters to the level below when its TTL
ends. All messages of one queue have the same TTL, so a long delay never holds back a short one.
This is the NServiceBus scheme; the delay queues are shared by every prefix of the vhost.

Connections: rather than aio-pika's robust connection, one supervisor task owns each
connection's whole life: connect, declare, attach every consumer (each one confirmed by the
broker), then wait for *any* channel or the connection to close, tear everything down and start
again. So `problem()` is None only while every consumer is attached, a stream is never
re-consumed from its original offset (the robust connection's behaviour), and a publish during
an outage fails at once instead of waiting for a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Iterator
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from aioqueue.broker import amqp_dead
from aioqueue.broker.amqp_leader import AmqpLeader
from aioqueue.broker.amqp_settle import settle
from aioqueue.broker.amqp_topics import SKIPPED_PER_SEGMENT, AmqpTopics
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
from aioqueue.config import BrokerSettings, DeadSettings, TopicsSettings
from aioqueue.errors import BrokerUnavailable, QueueFull
from aioqueue.metrics import Metrics

logger = logging.getLogger(__name__)

DELAY_LEVELS = 28
DELAY_MAX = 2**DELAY_LEVELS - 1
DELAY_PREFIX = "aioqueue.delay"
#: Unacked log messages in flight to this process; acked (multiple) every quarter of it.
LOG_PREFETCH = 1000
LOG_ACK_EVERY = LOG_PREFETCH // 4
TOPICS_PREFETCH = 1000
#: Seconds before a quiet log is acked anyway: consumer_timeout applies to a stream's consumer
#: too, and would close its channel (every 30 min, in an idle deployment).
LOG_ACK_IDLE = 1.0
KIND_HEADER = "aq-kind"
RECONNECT_DELAY_MAX = 5.0
#: Quorum queues have no message priorities (RabbitMQ 3.10), so a queue is one quorum queue per
#: band, named and routed with these suffixes: priorities 0-3, 4-6 and 7-9
#: (`base.PRIORITY_BANDS`). Each band has its own consumer; the process starts what they hand it
#: by exact priority (gate.py).
BAND_SUFFIXES = ("", ".p4", ".p7")
#: Seconds an operation on a channel of its own may take in all: `inspect()` (a passive declare
#: per band, and a look at the log), `queue_stats`, `dead_letter_count`, a purge.
OWN_CHANNEL_TIMEOUT = 2.0
#: Seconds a sweep of the dead-letter queue may take, and may wait for another process's.
SWEEP_TIMEOUT = 120.0
SWEEP_LOCK_WAIT = 30.0


def band_suffix(priority: int) -> str:
    return BAND_SUFFIXES[band(priority)]


@contextlib.contextmanager
def translate_errors(action: str) -> Iterator[None]:
    """The one place where client-library errors become `BrokerUnavailable`."""
    try:
        yield
    except BrokerUnavailable:
        raise
    except aiormq.exceptions.PublishError as exc:  # returned: no queue is bound to take it
        raise BrokerUnavailable(f"{action}: RabbitMQ could not route the message") from exc
    except aiormq.exceptions.DeliveryError as exc:
        # Nacked: with x-overflow reject-publish, a queue at its x-max-length refused it.
        raise QueueFull(f"{action}: the queue is full (broker.max_queue_length)") from exc
    except TimeoutError:
        raise BrokerUnavailable(f"{action}: no answer from RabbitMQ in time") from None
    except (
        aiormq.exceptions.AMQPError,
        aio_pika.exceptions.AMQPException,
        ConnectionError,
        OSError,
    ) as exc:
        raise BrokerUnavailable(f"{action}: {type(exc).__name__}: {exc}") from exc
    except RuntimeError as exc:  # aio-pika: "channel closed" and the like
        raise BrokerUnavailable(f"{action}: {exc}") from exc


def delay_routing_key(seconds: int, queue_name: str) -> str:
    digits = format(seconds, f"0{DELAY_LEVELS}b")
    return ".".join(digits) + "." + queue_name


def _headers(message: DeliveredMessage) -> dict[str, Any]:
    return message.header.properties.headers or {}


def _deliver(message: DeliveredMessage) -> aiormq.spec.Basic.Deliver:
    assert isinstance(message.delivery, aiormq.spec.Basic.Deliver)  # a consumer's delivery
    return message.delivery


class AmqpDelivery(Delivery):
    __slots__ = ("_channel", "_tag", "body", "redelivered")

    def __init__(self, channel: RawChannel, message: DeliveredMessage) -> None:
        self._channel = channel
        deliver = _deliver(message)
        self._tag = int(deliver.delivery_tag or 0)
        self.body = message.body
        count = _headers(message).get("x-delivery-count") or 0
        self.redelivered = bool(deliver.redelivered or count)

    async def ack(self) -> None:
        # On a closed channel the ack cannot happen; the broker redelivers the message, and
        # the store then finds its outcome recorded.
        await settle(self._channel.basic_ack(self._tag, wait=False))

    async def requeue(self) -> None:
        await settle(self._channel.basic_nack(self._tag, requeue=True, wait=False))


class StreamCredit:
    """The acks of one stream consumer. On a stream an ack only returns credit, so there is one
    (multiple) for every `every` deliveries, and one once no delivery came for `LOG_ACK_IDLE`
    seconds: consumer_timeout applies to a stream's consumer too, and would close its channel."""

    def __init__(
        self, channel: RawChannel, every: int, spawn: Callable[[Coroutine[Any, Any, None]], None]
    ) -> None:
        self._channel = channel
        self._every = every
        self._spawn = spawn
        self._unacked = 0
        self._last_tag = 0
        self._timer: asyncio.TimerHandle | None = None

    def delivered(self, message: DeliveredMessage) -> None:
        self._unacked += 1
        self._last_tag = int(_deliver(message).delivery_tag or 0)
        if self._unacked >= self._every:
            self._spawn(self._ack())
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LOG_ACK_IDLE, self._on_idle)

    def _on_idle(self) -> None:
        self._timer = None
        self._spawn(self._ack())

    async def _ack(self) -> None:
        if self._unacked:
            self._unacked = 0
            await settle(self._channel.basic_ack(self._last_tag, multiple=True, wait=False))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Session:
    """What one connection holds; thrown away whole when anything in it closes."""

    def __init__(self, connection: AbstractConnection) -> None:
        self.connection = connection
        self.lost = asyncio.Event()
        self.publisher: AbstractChannel | None = None
        self.exchanges: dict[str, AbstractExchange] = {}
        self.consumers: dict[str, tuple[RawChannel, str]] = {}
        #: Why the session ended, when it was not the broker that closed it.
        self.why: str | None = None
        #: Submits answered 503 for want of a confirm, whose confirm has not come since.
        self.overdue = 0

    def watch(self, channel: AbstractChannel) -> None:
        channel.close_callbacks.add(self._on_close)

    def _on_close(self, *_: Any) -> None:
        self.lost.set()

    def watch_consumer(self, channel: RawChannel, queue: str) -> None:
        """End the session when the broker cancels the consumer of `queue` on `channel`.

        RabbitMQ cancels the consumers of a deleted queue (basic.cancel; aiormq calls the
        channel's consumer-cancel callbacks) and leaves their channel open, so nothing else
        would end the session: the process would stay ready with no consumer. The next session
        declares the queue again and attaches every consumer.
        """

        def on_cancel(_: aiormq.spec.Basic.Cancel) -> None:
            self.consumers.pop(queue, None)
            self.end(f"RabbitMQ cancelled the consumer of {queue} (queue deleted?); reconnecting")

        channel.on_consumer_cancel_callbacks.add(on_cancel)

    def end(self, why: str) -> None:
        if not self.lost.is_set():
            self.why = why
            self.lost.set()

    def watch_confirm(self, confirming: asyncio.Future[Any], limit: float) -> None:
        """End the session if the broker does not confirm within `limit` seconds.

        A hung broker or a partition leaves the socket open and silent, and aiormq would notice
        only after three missed heartbeats; a confirm overdue for one heartbeat is proof enough.
        """
        why = f"RabbitMQ did not confirm a publish within {limit:g} s; reconnecting"
        timer = asyncio.get_running_loop().call_later(limit, self.end, why)
        confirming.add_done_callback(lambda _: timer.cancel())

    def count_overdue(self, confirming: asyncio.Future[Any]) -> None:
        self.overdue += 1
        confirming.add_done_callback(self._no_longer_overdue)

    def _no_longer_overdue(self, _: asyncio.Future[Any]) -> None:
        self.overdue -= 1


class AmqpBroker(Broker):
    topics: AmqpTopics
    durable = True
    delay_resolution = 1.0

    def __init__(
        self,
        settings: BrokerSettings,
        log_max_bytes: int,
        topics: TopicsSettings | None = None,
        metrics: Metrics | None = None,
        dead: DeadSettings | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics if metrics is not None else Metrics()
        self._dead = dead or DeadSettings()
        self.topics = AmqpTopics(settings, topics or TopicsSettings(), self._publish_topic_message)
        self._log_max_bytes = log_max_bytes
        prefix = settings.prefix
        self.names = {
            "submit": f"{prefix}.submit",
            "submit-delayed": f"{prefix}.submit-delayed",
            "jobs": f"{prefix}.jobs",
            "events": f"{prefix}.events",
            "dlx": f"{prefix}.dlx",
            "dead": f"{prefix}.dead-lettered",
            "dlq": f"{prefix}.dlq",
            "dlq-sweep": f"{prefix}.dlq.sweep",
        }
        self._queues: Collection[str] = ()
        self._handlers: dict[str, DeliveryHandler] = {}
        self._on_log: LogHandler | None = None
        self._on_dead: DeadHandler | None = None
        self._session: _Session | None = None
        self._problem: str | None = "not connected yet"
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._consuming = True
        # The log offset to read next: resuming there after a reconnect applies nothing twice.
        self._next_offset = 0
        self._log_credit: StreamCredit | None = None
        #: Whether the log consumer got anything since it was last attached.
        self._log_heard = False
        #: Deliveries being handled. Their tasks are this broker's, not aiormq's: aiormq cancels
        #: its callback tasks when their channel closes, and a job must not stop because the
        #: channel it came on did (the broker redelivers it, and the runner waits for this copy).
        self._handling: set[asyncio.Task[None]] = set()
        self._delay_entry: AbstractExchange | None = None
        #: The lock of the process that submits the periodic jobs' ticks (`lead`).
        self.leader = AmqpLeader(
            f"{prefix}.scheduler",
            # A fresh token well before the broker's consumer_timeout would take the one held.
            rotate_every=settings.consumer_timeout / 4,
            publish=self._publish_token,
            spawn=self._spawn,
        )

    def queue_name(self, queue: str, priority: int = 0) -> str:
        """The quorum queue of `queue`'s band for `priority`."""
        return f"{self._settings.prefix}.q.{queue}{band_suffix(priority)}"

    def queue_names(self, queue: str) -> list[str]:
        """The quorum queues of every band of `queue`."""
        return [f"{self._settings.prefix}.q.{queue}{suffix}" for suffix in BAND_SUFFIXES]

    # Life cycle -------------------------------------------------------------------------------

    async def start(
        self,
        queues: Collection[str],
        on_log: LogHandler,
        on_dead: DeadHandler,
        after: int | None = None,
    ) -> None:
        self._queues, self._on_log, self._on_dead = queues, on_log, on_dead
        self._next_offset = 0 if after is None else after + 1
        self._supervisor = asyncio.create_task(self._supervise(), name="aioqueue-amqp")
        await self._connected.wait()

    async def close(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self._log_credit is not None:
            self._log_credit.cancel()
        await self.leader.close()
        await self.topics.close()
        for task in self._handling:
            task.cancel()
        await asyncio.gather(*self._handling, return_exceptions=True)
        self._problem = "closed"

    async def _supervise(self) -> None:
        delay = 0.25
        while True:
            try:
                await self._run_session()
                delay = 0.25
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._problem = f"RabbitMQ unavailable: {type(exc).__name__}: {exc}"
                logger.warning("%s; retrying in %.1f s", self._problem, delay)
            finally:
                await self._end_session()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_MAX)

    async def _run_session(self) -> None:
        connection = await aio_pika.connect(
            self._settings.url,
            timeout=self._settings.heartbeat,
            heartbeat=self._settings.heartbeat,
            client_properties={"connection_name": f"aioqueue {self._settings.prefix}"},
        )
        session = self._session = _Session(connection)
        connection.close_callbacks.add(session._on_close)
        async with asyncio.timeout(self._settings.heartbeat * 2):
            session.publisher = await self._channel(session, on_return_raises=True)
            await self._declare(session)
            await self._consume_log(session)
            await self._consume_topics(session)
            await self._consume_dead_letters(session)
            for queue in list(self._handlers):
                await self._attach(session, queue)
            if self.leader.wanted and self._consuming:
                await self._attach_leader(session)
        self._problem = None
        if self._connected.is_set():  # it is never cleared: this session is not the first
            self._metrics.broker_reconnects.inc()
        self._connected.set()
        logger.info("connected to RabbitMQ at %s", connection.url.host)
        await session.lost.wait()
        self._problem = session.why or "connection to RabbitMQ lost; reconnecting"
        logger.warning(self._problem)

    async def _end_session(self) -> None:
        session, self._session = self._session, None
        # Whatever this process held on that connection, RabbitMQ takes back: it leads no more.
        self.leader.detach()
        if session is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await session.connection.close()

    async def _channel(self, session: _Session, **kwargs: Any) -> AbstractChannel:
        channel = await session.connection.channel(publisher_confirms=True, **kwargs)
        session.watch(channel)
        return channel

    # Topology ---------------------------------------------------------------------------------

    async def _declare(self, session: _Session) -> None:
        channel = session.publisher
        assert channel is not None
        names = self.names
        durable = aio_pika.ExchangeType
        submit = await channel.declare_exchange(names["submit"], durable.FANOUT, durable=True)
        jobs = await channel.declare_exchange(names["jobs"], durable.DIRECT, durable=True)
        await jobs.bind(submit)
        log_arguments = {
            "x-queue-type": "stream",
            # By size, never by age: however long every process was down, the log still
            # reaches back to the newest checkpoint (see checkpointer.py).
            "x-max-length-bytes": self._log_max_bytes,
            "x-stream-max-segment-size-bytes": 8_000_000,
        }
        await self._declare_kept(session, names["events"], log_arguments, STREAM_KEPT)
        events = await channel.declare_queue(names["events"], passive=True)
        await self._declare_kept(session, self.topics.name, self.topics.arguments(), STREAM_KEPT)
        await events.bind(submit)
        delayed = await channel.declare_exchange(
            names["submit-delayed"], durable.FANOUT, durable=True
        )
        await events.bind(delayed)
        dlx = await channel.declare_exchange(names["dlx"], durable.FANOUT, durable=True)
        dead = await channel.declare_queue(names["dead"], durable=True, arguments=_quorum())
        await dead.bind(dlx)
        await self._declare_kept(session, names["dlq"], self._dlq_arguments(), DLQ_KEPT)
        deliver = await self._declare_delays(channel)
        assert self._delay_entry is not None
        await self._delay_entry.bind(delayed)  # keeps the routing key: the delay's digits
        arguments = _quorum(
            {
                "x-delivery-limit": self._settings.delivery_limit,
                "x-dead-letter-exchange": names["dlx"],
            }
        )
        if self._settings.max_queue_length:  # fixed once declared (or use a policy)
            arguments["x-max-length"] = self._settings.max_queue_length
        for queue in self._queues:
            for suffix, name in zip(BAND_SUFFIXES, self.queue_names(queue), strict=True):
                declared = await channel.declare_queue(name, durable=True, arguments=arguments)
                await declared.bind(jobs, routing_key=f"{queue}{suffix}")
                await declared.bind(deliver, routing_key=f"#.{name}")
        assert self._delay_entry is not None
        session.exchanges = {
            "submit": submit,
            "submit-delayed": delayed,
            "jobs": jobs,
            "delay": self._delay_entry,
            "default": channel.default_exchange,
        }

    def _dlq_arguments(self) -> dict[str, Any]:
        # Bounded as the config says, the oldest dropped first (drop-head: a full dead-letter
        # queue must never refuse a job's dead letter). Nothing dead-letters out of it, so it
        # needs none of `_quorum()`'s dead-lettering arguments.
        return {
            "x-queue-type": "quorum",
            "x-max-length": self._dead.max_length,
            "x-message-ttl": self._dead.max_age_seconds * 1000,
            "x-overflow": "drop-head",
        }

    async def _declare_kept(
        self, session: _Session, name: str, arguments: dict[str, Any], warning: str
    ) -> None:
        """Declare a queue, or keep the one there: RabbitMQ refuses a declare with arguments
        other than those the queue was declared with (and closes its channel, hence a channel
        of its own); a policy is how an operator changes them. `warning` says so."""
        channel = await session.connection.channel()
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            logger.warning(warning, name, exc)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def _declare_delays(self, channel: AbstractChannel) -> AbstractExchange:
        topic = aio_pika.ExchangeType.TOPIC
        below = await channel.declare_exchange(f"{DELAY_PREFIX}.deliver", topic, durable=True)
        for level in range(DELAY_LEVELS):
            exchange = await channel.declare_exchange(
                f"{DELAY_PREFIX}.{level}", topic, durable=True
            )
            queue = await channel.declare_queue(
                f"{DELAY_PREFIX}.{level}",
                durable=True,
                arguments=_quorum(
                    {"x-message-ttl": 1000 * 2**level, "x-dead-letter-exchange": below.name}
                ),
            )
            position = "*." * (DELAY_LEVELS - 1 - level)
            await queue.bind(exchange, routing_key=f"{position}1.#")
            await below.bind(exchange, routing_key=f"{position}0.#")
            if level == 0:
                deliver = below
            below = exchange
        self._delay_entry = below
        return deliver

    # Consuming --------------------------------------------------------------------------------

    async def consume(self, queue: str, handler: DeliveryHandler) -> None:
        self._handlers[queue] = handler
        self._consuming = True
        session = self._session
        if session is not None and self._problem is None:
            try:
                await self._attach(session, queue)
            except Exception as exc:
                # The next session attaches every registered consumer again.
                logger.warning("queue %s: could not attach a consumer: %s", queue, exc)
                session.lost.set()

    async def _consumer_channel(self, session: _Session, queue: str, prefetch: int) -> RawChannel:
        # Consumers use aiormq's channel directly: aio-pika's message objects cost more CPU per
        # delivery than the rest of a delivery's handling, on the busiest path.
        channel = await (await self._channel(session)).get_underlay_channel()
        session.watch_consumer(channel, queue)
        await channel.basic_qos(prefetch_count=prefetch)
        await channel.queue_declare(queue, passive=True)
        return channel

    async def _attach(self, session: _Session, queue: str) -> None:
        for name in self.queue_names(queue):
            await self._attach_band(session, queue, name)

    async def _attach_band(self, session: _Session, queue: str, name: str) -> None:
        channel = await self._consumer_channel(session, name, self._settings.prefetch)
        handler = self._handlers[queue]

        async def on_message(message: DeliveredMessage) -> None:
            self._spawn(handler(AmqpDelivery(channel, message)))

        ok = await channel.basic_consume(name, on_message)
        session.consumers[name] = (channel, str(ok.consumer_tag))
        # Verify with the broker, not only with the client, that a consumer is attached.
        check = await channel.queue_declare(name, passive=True)
        if not check.consumer_count:
            raise BrokerUnavailable(f"queue {name}: consumer not attached")

    async def lead(self, on_change: LeaderHandler) -> None:
        self.leader.want(on_change)
        session = self._session
        if session is not None and self._problem is None and self._consuming:
            try:
                await self._attach_leader(session)
            except Exception as exc:
                # The next session attaches it again, as every consumer.
                logger.warning("could not compete for the lead: %s", exc)
                session.lost.set()

    async def _attach_leader(self, session: _Session) -> None:
        # A channel of its own, watched as every consumer's: if the broker closes it, or cancels
        # the consumer (the queue deleted), the session ends and the next one attaches again.
        channel = await (await self._channel(session)).get_underlay_channel()
        session.watch_consumer(channel, self.leader.name)
        await self.leader.attach(channel)

    async def _publish_token(self, body: bytes) -> None:
        await self._publish("default", self.leader.name, body, kind=None)

    async def stop_consuming(self) -> None:
        self._consuming = False
        await self.leader.resign()
        session = self._session
        if session is None:
            return
        for channel, tag in list(session.consumers.values()):
            with contextlib.suppress(Exception):
                await channel.basic_cancel(tag)
        session.consumers.clear()

    async def _consume_log(self, session: _Session) -> None:
        name = self.names["events"]
        channel = await self._consumer_channel(session, name, LOG_PREFETCH)
        # Resume at the last offset applied (which exists) rather than the next one: an offset
        # past the tail would deliver nothing. The repeated entry is skipped below.
        offset: int | str = max(self._next_offset - 1, 0) if self._next_offset else "first"
        if self._log_credit is not None:
            self._log_credit.cancel()
        credit = self._log_credit = StreamCredit(channel, LOG_ACK_EVERY, self._spawn)
        self._log_heard = False

        async def on_message(message: DeliveredMessage) -> None:
            self._on_log_message(credit, message)

        await channel.basic_consume(name, on_message, arguments={"x-stream-offset": offset})
        if isinstance(offset, int):
            # The entry at `offset` (the last one applied) comes at once, or a later one if the
            # retention dropped it. None at all: the log is shorter than the store, which only a
            # new log (deleted and declared again) is, and an offset past the tail delivers
            # nothing ever.
            delay = self._settings.heartbeat
            asyncio.get_running_loop().call_later(delay, self._check_log_heard, session, offset)

    def _check_log_heard(self, session: _Session, offset: int) -> None:
        if self._log_heard or session is not self._session or session.lost.is_set():
            return
        logger.error(
            "the event log has no entry at offset %d, the last this process applied: it is a new"
            " log (deleted and declared again?). Reading it from its start; the jobs the store"
            " knows stay",
            offset,
        )
        self._next_offset = 0
        session.end("the event log is shorter than the job store: reading it from its start")

    def _on_log_message(self, credit: StreamCredit, message: DeliveredMessage) -> None:
        # Applied before the first await: aiormq runs callbacks as tasks in delivery order, and
        # applying synchronously keeps the log in order.
        self._log_heard = True
        headers = _headers(message)
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int) and offset >= self._next_offset:
            if offset > self._next_offset + SKIPPED_PER_SEGMENT:
                # Offsets skip one at each segment boundary (see amqp_topics.py); more than that
                # in between were entries that left the log before this process applied them
                # (see checkpointer.py on retention).
                logger.error(
                    "the event log goes on at offset %d, not %d: the entries in between are"
                    " past its retention (store.log_max_bytes), and the job store misses them",
                    offset,
                    self._next_offset,
                )
            self._next_offset = offset + 1
            assert self._on_log is not None
            kind = (
                LogKind.EVENTS if headers.get(KIND_HEADER) == LogKind.EVENTS.value else LogKind.JOB
            )
            self._on_log(kind, message.body, offset)
        credit.delivered(message)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _consume_topics(self, session: _Session) -> None:
        channel = await self._consumer_channel(session, self.topics.name, TOPICS_PREFETCH)
        credit = StreamCredit(channel, TOPICS_PREFETCH // 4, self._spawn)
        await self.topics.attach(session, channel, credit)

    async def _consume_dead_letters(self, session: _Session) -> None:
        name = self.names["dead"]
        channel = await self._consumer_channel(session, name, 16)

        async def on_message(message: DeliveredMessage) -> None:
            await self._on_dead_letter(AmqpDelivery(channel, message), _headers(message))

        await channel.basic_consume(name, on_message)

    async def _on_dead_letter(self, delivery: AmqpDelivery, headers: dict[str, Any]) -> None:
        # The latest death is first in x-death. (x-first-death-reason is the first ever: for a
        # delayed or retried job, "expired", from its pass through the delay queues.)
        deaths = headers.get("x-death") or []
        latest = deaths[0].get("reason") if deaths and isinstance(deaths[0], dict) else None
        reason = str(latest or headers.get("x-first-death-reason") or "dead-lettered")
        assert self._on_dead is not None
        try:
            await self._on_dead(delivery.body, reason)
            await self.dead_letter(delivery.body, reason)
        except BrokerUnavailable:
            await delivery.requeue()
            return
        await delivery.ack()

    # Publishing -------------------------------------------------------------------------------

    def problem(self) -> str | None:
        if self._problem is not None:
            return self._problem
        session = self._session
        if session is not None and session.lost.is_set():  # ended, not yet torn down
            return session.why or "connection to RabbitMQ lost; reconnecting"
        missing = [
            queue
            for queue in self._handlers
            if session is None or any(n not in session.consumers for n in self.queue_names(queue))
        ]
        if missing and self._consuming:
            return f"not consuming on queue {', '.join(sorted(missing))} yet"
        if session is not None and session.overdue:
            return self._overdue_problem()
        return None

    @property
    def connected(self) -> bool:
        session = self._session
        return session is not None and bool(session.exchanges) and not session.lost.is_set()

    async def inspect(self) -> Inspection:
        """Passive declares of each band's queue, and the event log's newest chunk, on a channel
        of their own: a queue deleted under it closes that channel, not the session's."""
        if not self.connected:
            raise BrokerUnavailable(self._problem or "not connected to RabbitMQ")
        async with self._own_channel("inspect") as channel:
            bands = await self._bands(channel)
            head = await self._log_head(channel)
        return Inspection(bands, head)

    async def _bands(self, channel: RawChannel) -> tuple[QueueBand, ...]:
        bands = []
        for queue in sorted(self._queues):
            declared = await _declared(channel, self.queue_names(queue))
            bands += [
                QueueBand(queue, band_name, ready, consumers)
                for band_name, (ready, consumers) in zip(PRIORITY_BANDS, declared, strict=True)
            ]
        return tuple(bands)

    async def _log_head(self, channel: RawChannel) -> int | None:
        """The offset of the first entry of the event log's newest chunk: a stream's declare-ok
        counts no messages (measured on 3.10.8), and a consumer from `last` gets that entry
        first. Short of the very newest by the entries written in the same chunk as it (a few,
        or a batch under load); None if the log has none."""
        await channel.basic_qos(prefetch_count=1)
        first: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

        async def on_message(message: DeliveredMessage) -> None:
            offset = _headers(message).get("x-stream-offset")
            if not first.done():
                first.set_result(offset if isinstance(offset, int) else None)

        name = self.names["events"]
        ok = await channel.basic_consume(name, on_message, arguments={"x-stream-offset": "last"})
        try:
            # The delivery comes at once if there is any; an empty log delivers nothing.
            async with asyncio.timeout(OWN_CHANNEL_TIMEOUT / 4):
                return await first
        except TimeoutError:
            return None
        finally:
            with contextlib.suppress(Exception):
                await channel.basic_cancel(str(ok.consumer_tag))

    def _overdue_problem(self) -> str:
        return (
            f"RabbitMQ has not confirmed a submit within {self._settings.confirm_timeout:g} s"
            " (a hung broker or a partition?)"
        )

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        kind: LogKind | None = LogKind.JOB,
        headers: dict[str, Any] | None = None,
        submit: bool = False,
    ) -> None:
        """Publish and wait for the confirm: `confirm_timeout` for a submit, whose caller waits
        for an answer (then 503), and up to a `heartbeat` for the process's own writes."""
        session = self._session
        # Publishing needs only the declared topology, not every consumer: redeliveries that
        # arrive while the later consumers attach must be able to record their outcomes.
        if session is None or not session.exchanges or session.lost.is_set():
            raise BrokerUnavailable(self._problem or "not connected to RabbitMQ")
        if submit and session.overdue:
            raise BrokerUnavailable(self._overdue_problem())  # at once, not after a timeout
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={KIND_HEADER: kind.value, **(headers or {})} if kind else headers,
        )
        heartbeat = self._settings.heartbeat
        with translate_errors("publish"):
            confirming = asyncio.ensure_future(
                session.exchanges[exchange].publish(message, routing_key)
            )
            # Every confirm, also one that comes after its caller stopped waiting: the slow
            # ones are what the histogram is for.
            confirming.add_done_callback(functools.partial(self._confirmed, time.monotonic()))
            session.watch_confirm(confirming, heartbeat)
            try:
                # Shielded: a confirm that comes after the timeout still tells that the broker
                # is back (see `overdue`); the session, ended at the latest by `watch_confirm`,
                # takes the future with it.
                async with asyncio.timeout(self._settings.confirm_timeout if submit else heartbeat):
                    confirmation = await asyncio.shield(confirming)
            except TimeoutError:
                if submit:
                    session.count_overdue(confirming)
                raise
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise BrokerUnavailable(f"RabbitMQ refused the message ({type(confirmation).__name__})")

    async def submit(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        await self._to_queue(body, queue, delay, priority, submit=True)

    async def publish(self, body: bytes, queue: str, delay: float = 0.0, priority: int = 0) -> None:
        await self._to_queue(body, queue, delay, priority, submit=False)

    async def _to_queue(
        self, body: bytes, queue: str, delay: float, priority: int, submit: bool
    ) -> None:
        # A submit goes through the submit exchanges: one publish to the log and to the queue
        # (or the delay queues) at once.
        now, later = ("submit", "submit-delayed") if submit else ("jobs", "delay")
        seconds = min(round(delay), DELAY_MAX)
        if seconds <= 0:
            await self._publish(now, f"{queue}{band_suffix(priority)}", body, submit=submit)
        else:
            key = delay_routing_key(seconds, self.queue_name(queue, priority))
            await self._publish(later, key, body, submit=submit)

    async def append(self, body: bytes) -> None:
        await self._publish("default", self.names["events"], body, LogKind.EVENTS)

    async def _publish_topic_message(self, body: bytes, headers: dict[str, Any]) -> None:
        await self._publish("default", self.topics.name, body, None, headers, submit=True)

    async def dead_letter(self, body: bytes, reason: str) -> None:
        headers = {"x-aioqueue-reason": reason, amqp_dead.DEAD_AT_HEADER: amqp_dead.now_ms()}
        try:
            await self._publish("default", self.names["dlq"], body, headers=headers)
        except QueueFull:
            # A dead-letter queue declared by an earlier version (reject-publish) that a policy
            # bounds: its copy of the job is lost, never the job's outcome (the job's record
            # has its error; a raise here would run the job again).
            logger.warning(
                "the dead-letter queue %s is full and refused a message (%s); declared by an"
                " earlier version? see the README's Dead letters",
                self.names["dlq"],
                reason,
            )

    # Operations -------------------------------------------------------------------------------

    async def queue_stats(self, queue: str) -> list[BandStats]:
        async with self._own_channel("queue statistics") as channel:
            declared = await _declared(channel, self.queue_names(queue))
        return [BandStats(messages, consumers) for messages, consumers in declared]

    async def dead_letter_count(self) -> int:
        async with self._own_channel("queue statistics") as channel:
            [(messages, _)] = await _declared(channel, [self.names["dlq"]])
        return messages

    @contextlib.asynccontextmanager
    async def _own_channel(self, action: str) -> AsyncIterator[RawChannel]:
        """A channel of its own for `action`, all within `OWN_CHANNEL_TIMEOUT`: a passive
        declare of a queue that is gone closes that channel, never the session's.
        BrokerUnavailable if there is no connection, or if `action` fails."""
        session = self._session
        if session is None or session.lost.is_set():
            raise BrokerUnavailable(self._problem or "not connected to RabbitMQ")
        with translate_errors(action):
            async with asyncio.timeout(OWN_CHANNEL_TIMEOUT):
                opened = await session.connection.channel(publisher_confirms=False)
                try:
                    yield await opened.get_underlay_channel()
                finally:
                    with contextlib.suppress(Exception):
                        await opened.close()

    async def drop_dead_letters(self, drop: DropFn) -> int:
        with translate_errors("sweep the dead-letter queue"):
            async with asyncio.timeout(SWEEP_TIMEOUT):
                connection = await aio_pika.connect(
                    self._settings.url,
                    timeout=self._settings.heartbeat,
                    client_properties={"connection_name": f"aioqueue {self._settings.prefix} dlq"},
                )
                async with connection:
                    try:
                        return await amqp_dead.sweep(
                            connection,
                            self.names["dlq"],
                            self.names["dlq-sweep"],
                            drop,
                            self._dead.max_age_seconds * 1000,
                            SWEEP_LOCK_WAIT,
                        )
                    except amqp_dead.LockTimeout as exc:
                        raise BrokerUnavailable(str(exc)) from None

    async def purge_dead_letters(self) -> int:
        async with self._own_channel("purge the dead-letter queue") as channel:
            purged = await channel.queue_purge(self.names["dlq"])
        return int(purged.message_count or 0)

    def _confirmed(self, since: float, confirming: asyncio.Future[Any]) -> None:
        # Retrieves the exception too: a confirm nobody waits for any more may fail (the
        # session ended), and that is not an unhandled error.
        if not confirming.cancelled() and confirming.exception() is None:
            self._metrics.broker_confirm_seconds.observe(time.monotonic() - since)


async def _declared(channel: RawChannel, names: list[str]) -> list[tuple[int, int]]:
    """(ready messages, consumers) of each queue, by a passive declare."""
    found = []
    for name in names:
        ok = await channel.queue_declare(name, passive=True)
        found.append((int(ok.message_count or 0), int(ok.consumer_count or 0)))
    return found


STREAM_KEPT = (
    "the stream %s keeps the retention it was declared with, not the config's (%s); change it"
    " with a RabbitMQ policy, or delete the stream"
)
DLQ_KEPT = (
    "the dead-letter queue %s keeps the arguments it was declared with, not the config's [dead]"
    " bound (%s): it was declared by an earlier version, unbounded. Read or move its messages,"
    " then delete it (aioqueue declares it again, bounded); see the README's Dead letters"
)


def _quorum(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    # At-least-once dead-lettering (a quorum queue keeps the message until the target confirmed
    # it) needs reject-publish overflow; the default, at-most-once, can lose dead letters.
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        **(extra or {}),
    }
