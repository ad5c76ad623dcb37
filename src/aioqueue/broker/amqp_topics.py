"""The topic log on RabbitMQ: the stream `P.topics`, its offsets the messages' offsets.

Each message carries its topic in a header; the data is its body, JSON as published. Every
process reads the stream live, on its main connection, from where it stood when it connected
(`position`), and hands each message to the websocket hub.

- **Where the tail is.** A stream tells no reader where its tail is. On each connect the live
  reader attaches at the tail ("next") the first time, else at the last offset it handed on,
  and publishes a probe, a marker message of its own: once a message comes, `position` is
  known. A probe that does not come back within a heartbeat means the stream is not the one the
  process read (deleted and declared again): it starts again at the tail.
- **The offset of a publish.** A confirm does not carry the offset. Each publish carries a mark
  of this process in a header, and the live reader, which sees every message, resolves the
  publish's offset when its mark comes by.
- **Catch-up.** `read(after)` consumes the stream from `after + 1` on a connection of its own
  (`catch-up`), so that a long replay never queues in front of the job path's confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from aioqueue.broker.base import TopicEntry, TopicHandler, TopicLog
from aioqueue.config import BrokerSettings, TopicsSettings
from aioqueue.errors import BrokerUnavailable


class Session(Protocol):
    """What the live reader needs of AmqpBroker's session: whether it ended, and ending it."""

    lost: asyncio.Event

    def end(self, why: str) -> None: ...


class Credit(Protocol):
    """The acks of a stream consumer (AmqpBroker's `StreamCredit`)."""

    def delivered(self, message: DeliveredMessage) -> None: ...

    def cancel(self) -> None: ...


logger = logging.getLogger(__name__)

TOPIC_HEADER = "aq-topic"
#: A publish's or a probe's mark: this process's id, a dot, a counter.
MARK_HEADER = "aq-mark"
LIVE_PREFETCH = 1000
#: Messages a catch-up reads ahead: its memory is at most this many of topics.max_message_bytes.
READ_PREFETCH = 128
#: Offsets with no message at each segment boundary of a stream (measured on RabbitMQ 3.10).
SKIPPED_PER_SEGMENT = 1
#: Publishes (body, headers) to the stream; returns once confirmed, else BrokerUnavailable.
Publish = Callable[[bytes, dict[str, Any]], Coroutine[Any, Any, None]]


class AmqpTopics(TopicLog):
    def __init__(self, settings: BrokerSettings, topics: TopicsSettings, publish: Publish) -> None:
        self.name = f"{settings.prefix}.topics"
        self._settings = settings
        self._publish = publish
        self._retention = topics
        self._next: int | None = None
        self._known = asyncio.Event()
        self._handler: TopicHandler | None = None
        self._me = secrets.token_hex(6)
        self._marks = itertools.count()
        self._waiters: dict[str, asyncio.Future[int]] = {}
        self._credit: Credit | None = None
        self._catch_up: AbstractConnection | None = None
        self._catch_up_lock = asyncio.Lock()
        self._closing: set[asyncio.Future[Any]] = set()

    def arguments(self) -> dict[str, Any]:
        """The stream's arguments. Retention deletes whole segments, the oldest first: a
        segment is an eighth of the bytes kept (at most 8 MB), so about that much more is kept."""
        kept = self._retention.retention_bytes
        return {
            "x-queue-type": "stream",
            "x-max-age": f"{self._retention.retention_seconds}s",
            "x-max-length-bytes": kept,
            "x-stream-max-segment-size-bytes": max(min(kept // 8, 8_000_000), 4096),
        }

    # The live reader ---------------------------------------------------------------------------

    def listen(self, handler: TopicHandler) -> None:
        self._handler = handler

    @property
    def position(self) -> int | None:
        return self._next

    async def wait_position(self) -> int:
        try:
            async with asyncio.timeout(self._settings.heartbeat):
                await self._known.wait()
        except TimeoutError:
            raise BrokerUnavailable("the topic log is not read yet; try again shortly") from None
        assert self._next is not None
        return self._next

    async def attach(self, session: Session, channel: RawChannel, credit: Credit) -> None:
        """Start the live reader on a consumer channel of a new session, then probe the tail."""
        self._credit = credit
        start: int | str = "next" if self._next is None else self._next - 1

        async def on_message(message: DeliveredMessage) -> None:
            self._on_message(credit, message)

        await channel.basic_consume(self.name, on_message, arguments={"x-stream-offset": start})
        probe = self._mark()
        await self._publish(b"", {MARK_HEADER: probe})
        waiter = self._waiters[probe]
        waiter.add_done_callback(lambda _: self._waiters.pop(probe, None))
        loop = asyncio.get_running_loop()
        loop.call_later(self._settings.heartbeat, self._check_probe, session, waiter)

    def _check_probe(self, session: Session, waiter: asyncio.Future[int]) -> None:
        if waiter.done() or session.lost.is_set():
            return
        waiter.cancel()
        logger.error(
            "the topic stream %s has no message after offset %s, the last this process read: it is"
            " a new stream (deleted and declared again?). Reading it from its tail",
            self.name,
            self._next,
        )
        self._next = None
        self._known.clear()
        session.end("the topic stream is not the one this process read: reading it again")

    def _on_message(self, credit: Credit, message: DeliveredMessage) -> None:
        # Synchronous, so messages are handed on in delivery order (aiormq runs each callback
        # in a task of its own, in order).
        credit.delivered(message)
        headers = message.header.properties.headers or {}
        offset = headers.get("x-stream-offset")
        if not isinstance(offset, int) or (self._next is not None and offset < self._next):
            return  # the message it attached at, read before
        self._next = offset + 1
        self._known.set()
        mark = headers.get(MARK_HEADER)
        waiter = None if mark is None else self._waiters.get(_text(mark))
        if waiter is not None and not waiter.done():
            waiter.set_result(offset)
        topic = headers.get(TOPIC_HEADER)
        if topic is not None and self._handler is not None:
            self._handler(offset, _text(topic), message.body)

    def _mark(self) -> str:
        mark = f"{self._me}.{next(self._marks)}"
        self._waiters[mark] = asyncio.get_running_loop().create_future()
        return mark

    # Publishing --------------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> int:
        mark = self._mark()
        waiter = self._waiters[mark]
        try:
            await self._publish(data, {TOPIC_HEADER: topic, MARK_HEADER: mark})
            try:
                async with asyncio.timeout(self._settings.heartbeat):
                    return await waiter
            except TimeoutError:
                raise BrokerUnavailable(
                    "RabbitMQ confirmed the message, but it did not come back to tell its offset:"
                    " it may be published; try again shortly"
                ) from None
        finally:
            self._waiters.pop(mark, None)

    # Catch-up ----------------------------------------------------------------------------------

    def lost(self, after: int, first: int) -> bool:
        # A stream's offsets skip one at each segment boundary (RabbitMQ 3.10: a chunk with no
        # message), so a read may begin one further on with nothing missed. Retention drops
        # whole segments: what it took is at least one message and that boundary, two offsets.
        return first > after + SKIPPED_PER_SEGMENT + 1

    async def read(self, after: int) -> AsyncGenerator[TopicEntry, None]:
        channel = await self._open_channel()
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_close(*_: Any) -> None:
            if not lost.done():
                lost.set_result(None)

        channel.close_callbacks.add(on_close)
        try:
            raw = await channel.get_underlay_channel()
            await raw.basic_qos(prefetch_count=READ_PREFETCH)
            arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
            await raw.basic_consume(
                self.name, arrived.put, arguments={"x-stream-offset": after + 1}
            )
            unacked = 0
            while True:
                message = await _next(arrived, lost)
                unacked += 1
                if unacked >= READ_PREFETCH // 4:
                    unacked = 0
                    tag = getattr(message.delivery, "delivery_tag", 0) or 0
                    await raw.basic_ack(tag, multiple=True)
                headers = message.header.properties.headers or {}
                offset = headers.get("x-stream-offset")
                if not isinstance(offset, int) or offset <= after:
                    continue  # a stream delivers from the start of the chunk holding `after+1`
                after = offset
                topic = headers.get(TOPIC_HEADER)
                yield offset, None if topic is None else _text(topic), message.body
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"topic catch-up: {type(exc).__name__}: {exc}") from exc
        finally:
            # In the background and never cut short: aiormq closes the whole connection when a
            # Channel.Close is cancelled half-way (seen under load, with a timeout here), and
            # every other catch-up on it fails.
            self._spawn(channel.close())

    async def _open_channel(self) -> AbstractChannel:
        connection = await self._catch_up_connection()
        try:
            return await connection.channel()
        except Exception as exc:
            if self._catch_up is connection:  # a connection that cannot open a channel is done
                self._catch_up = None
                self._spawn(connection.close())
            raise BrokerUnavailable(f"topic catch-up: {type(exc).__name__}: {exc}") from exc

    async def _catch_up_connection(self) -> AbstractConnection:
        async with self._catch_up_lock:
            if self._catch_up is None or self._catch_up.is_closed:
                heartbeat = self._settings.heartbeat
                try:
                    self._catch_up = await aio_pika.connect(
                        self._settings.url,
                        timeout=heartbeat,
                        heartbeat=heartbeat,
                        client_properties={
                            "connection_name": f"aioqueue {self._settings.prefix} catch-up"
                        },
                    )
                except Exception as exc:
                    raise BrokerUnavailable(f"topic catch-up: {type(exc).__name__}: {exc}") from exc
            return self._catch_up

    def _spawn(self, closing: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(closing)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(_retrieve)

    async def close(self) -> None:
        for task in self._closing:
            task.cancel()
        if self._credit is not None:
            self._credit.cancel()
        if self._catch_up is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._catch_up.close()


async def _next(
    arrived: asyncio.Queue[DeliveredMessage], lost: asyncio.Future[None]
) -> DeliveredMessage:
    """The next message that arrived; BrokerUnavailable once the channel is closed."""
    if not arrived.empty():
        return arrived.get_nowait()
    getting = asyncio.ensure_future(arrived.get())
    try:
        waits: set[asyncio.Future[Any]] = {getting, lost}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getting.done():
            getting.cancel()
    if getting.done() and not getting.cancelled():
        return getting.result()
    raise BrokerUnavailable("topic catch-up: the connection to RabbitMQ closed")


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a close that failed: the channel or connection is gone anyway


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
