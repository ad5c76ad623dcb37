"""The dead-letter queue on RabbitMQ, `P.dlq`: taking some of its messages out.

AMQP removes messages from a queue's head only, never by content. So a sweep takes the messages
the queue holds when it starts, in order, and for each one either acks it (it goes) or publishes
a copy to the queue's tail and acks it once the copy is confirmed (it stays): the messages kept
come back in their order, behind the dead letters that came meanwhile. A copy keeps the
original's headers and its age: each dead letter carries the time it was first kept
(`DEAD_AT_HEADER`), and its copy expires when it would have (`expiration`), not a whole
`dead.max_age_seconds` later. A message without that header (kept by an earlier version) starts
its age again at its first sweep.

One sweep at a time over every process: a sweep first declares an exclusive queue, `P.dlq.sweep`,
which RabbitMQ lets one connection hold at a time and deletes with it. (An exclusive consumer
would not do: quorum queues accept several, measured on 3.10.8.) Another sweep waits for it.

Each sweep has a connection of its own, so that its traffic never queues up in front of the job
path's confirms. It raises aio-pika's and aiormq's errors: the broker translates them. A
connection lost mid-sweep returns its unacked messages to the queue: a message that was to go
may stay (a sweep again takes it), and one that stays may be there twice (its copy was confirmed
and its ack lost); none is lost.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage

from aioqueue.broker.base import DropFn
from aioqueue.errors import BrokerUnavailable

#: When a message was first dead-lettered, in integer milliseconds since the epoch (pamqp sends
#: Python floats as 32-bit floats).
DEAD_AT_HEADER = "x-aioqueue-dead-at"
#: Messages handled between two acks, and held unacked at most.
BATCH = 200
#: Seconds a sweep waits for its next message before it takes the queue to be done: messages it
#: counted may have expired, or been dropped at the queue's length bound, meanwhile.
IDLE = 1.0
#: Seconds between two tries to take the lock while another process sweeps.
LOCK_RETRY = 0.2
#: Headers the broker sets on a delivery, which a copy must not carry as its own.
BROKER_HEADERS = frozenset({"x-delivery-count"})


class LockTimeout(Exception):
    """Another process's sweep held the lock for longer than the caller would wait."""


def now_ms() -> int:
    return int(time.time() * 1000)


async def sweep(
    connection: AbstractConnection,
    queue: str,
    lock: str,
    drop: DropFn,
    max_age_ms: int,
    lock_wait: float,
) -> int:
    """Take out of `queue` the messages for which `drop(body)` is true; returns how many."""
    await _take_lock(connection, lock, lock_wait)
    channel = await connection.channel(publisher_confirms=True)
    raw = await channel.get_underlay_channel()
    declared = await raw.queue_declare(queue, passive=True)
    count = int(declared.message_count or 0)
    if not count:
        return 0
    await raw.basic_qos(prefetch_count=BATCH)
    deliveries: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

    async def on_message(message: DeliveredMessage) -> None:
        deliveries.put_nowait(message)

    await raw.basic_consume(queue, on_message)
    dropped = handled = 0
    copies: list[asyncio.Future[Any]] = []
    last: DeliveredMessage | None = None  # handled, not yet acked
    while handled < count:
        if deliveries.empty() and last is not None:
            # Nothing more in hand: settle now rather than hold the messages handled while
            # waiting (the broker sends no more than BATCH unacked).
            await _settle(raw, last, copies)
            last, copies = None, []
        try:
            message = await asyncio.wait_for(deliveries.get(), IDLE)
        except TimeoutError:
            break
        handled += 1
        if drop(message.body):
            dropped += 1
        elif (copy := _copy(message, max_age_ms)) is not None:
            copies.append(asyncio.ensure_future(channel.default_exchange.publish(copy, queue)))
        last = message
        if handled % BATCH == 0:
            await _settle(raw, last, copies)
            last, copies = None, []
    if last is not None:
        await _settle(raw, last, copies)
    # Deliveries past `count` (copies, and dead letters that came meanwhile) go back with the
    # connection, unacked.
    return dropped


async def _settle(
    raw: aiormq.abc.AbstractChannel, last: DeliveredMessage, copies: list[asyncio.Future[Any]]
) -> None:
    """Ack every message up to `last`, once the copies of those kept are confirmed."""
    confirmations = await asyncio.gather(*copies)
    if not all(isinstance(done, aiormq.spec.Basic.Ack) for done in confirmations):
        # Ack nothing: the messages go back with the connection.
        raise BrokerUnavailable("the dead-letter queue refused a copy of a message it keeps")
    assert isinstance(last.delivery, aiormq.spec.Basic.Deliver)
    await raw.basic_ack(int(last.delivery.delivery_tag or 0), multiple=True)


def _copy(message: DeliveredMessage, max_age_ms: int) -> aio_pika.Message | None:
    """The copy of a message that stays, or None if its age is up (it goes)."""
    properties = message.header.properties
    headers = {
        key: value for key, value in (properties.headers or {}).items() if key not in BROKER_HEADERS
    }
    dead_at = headers.get(DEAD_AT_HEADER)
    if not isinstance(dead_at, int):
        dead_at = headers[DEAD_AT_HEADER] = now_ms()
    left = dead_at + max_age_ms - now_ms()
    if left <= 0:
        return None
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=properties.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=left / 1000,
    )


async def _take_lock(connection: AbstractConnection, name: str, wait: float) -> None:
    """Hold the exclusive queue `name` for as long as `connection` lives."""
    deadline = time.monotonic() + wait
    while True:
        # A refused declare closes its channel: a channel per try.
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, exclusive=True, auto_delete=True)
            return
        except aiormq.exceptions.ChannelLockedResource:
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"another process has been sweeping the dead-letter queue for {wait:g} s"
                ) from None
        await asyncio.sleep(LOCK_RETRY)
