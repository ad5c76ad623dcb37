"""The broker contract, on both brokers: delays, requeue, the log's order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest

from aioqueue.broker import amqp
from aioqueue.broker.base import Broker, Delivery, LogKind
from aioqueue.config import BrokerSettings
from aioqueue.errors import BrokerUnavailable, QueueFull
from aioqueue.service import make_broker
from tests.rabbitmq import RabbitNode


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple[LogKind, bytes]] = []
        self.offsets: list[int] = []
        self.deliveries: list[tuple[float, bytes, bool]] = []
        self.arrived = asyncio.Event()
        self.logged = asyncio.Event()
        self.requeue_first = False
        self.requeue_all = False
        #: When set: every delivery is held (unacked) until this event is.
        self.hold: asyncio.Event | None = None
        self.dead: list[tuple[bytes, str]] = []
        self.died = asyncio.Event()

    def on_log(self, kind: LogKind, body: bytes, offset: int) -> None:
        self.log.append((kind, body))
        self.offsets.append(offset)
        self.logged.set()

    async def on_dead(self, body: bytes, reason: str) -> None:
        self.dead.append((body, reason))
        self.died.set()

    async def on_delivery(self, delivery: Delivery) -> None:
        self.deliveries.append((time.monotonic(), delivery.body, delivery.redelivered))
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.requeue_all or (self.requeue_first and len(self.deliveries) == 1):
            await delivery.requeue()
        else:
            await delivery.ack()

    async def wait_for(self, count: int, deadline: float) -> None:
        async with asyncio.timeout(deadline):
            while len(self.deliveries) < count:
                self.arrived.clear()
                await self.arrived.wait()


@pytest.fixture
async def started(broker_url: str, prefix: str) -> AsyncIterator[Callable[..., Any]]:
    brokers: list[Broker] = []

    async def start(recorder: Recorder, **settings: Any) -> Broker:
        broker = make_broker(BrokerSettings(url=broker_url, prefix=prefix, **settings))
        async with asyncio.timeout(30):
            await broker.start({"q"}, recorder.on_log, recorder.on_dead)
            await broker.consume("q", recorder.on_delivery)
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        await broker.close()


async def test_a_delayed_message_arrives_after_its_delay(started: Any) -> None:
    recorder = Recorder()
    broker = await started(recorder)
    sent = time.monotonic()
    await broker.publish(b"later", "q", delay=2.0)
    await broker.publish(b"now", "q")
    await recorder.wait_for(2, deadline=10)
    (t_now, first, _), (t_later, second, _) = recorder.deliveries
    assert (first, second) == (b"now", b"later")
    assert t_now - sent < 1.0
    assert 1.9 <= t_later - sent < 3.5


async def test_a_long_delay_never_holds_back_a_short_one(started: Any) -> None:
    recorder = Recorder()
    broker = await started(recorder)
    sent = time.monotonic()
    await broker.publish(b"in an hour", "q", delay=3600.0)
    await broker.publish(b"in a second", "q", delay=1.0)
    await recorder.wait_for(1, deadline=10)
    (arrived, body, _), *_ = recorder.deliveries
    assert body == b"in a second" and arrived - sent < 3.0


async def test_a_requeued_message_comes_back_marked_redelivered(started: Any) -> None:
    recorder = Recorder()
    recorder.requeue_first = True
    broker = await started(recorder)
    await broker.publish(b"again", "q")
    await recorder.wait_for(2, deadline=10)
    assert [(body, again) for _, body, again in recorder.deliveries] == [
        (b"again", False),
        (b"again", True),
    ]


async def test_a_message_requeued_past_the_delivery_limit_is_dead_lettered(started: Any) -> None:
    """As RabbitMQ's x-delivery-limit (measured on 3.10.8): with limit N the message is
    delivered N + 1 times, then dead-lettered, and the broker's dead handler hears why."""
    recorder = Recorder()
    recorder.requeue_all = True
    broker = await started(recorder, delivery_limit=2)
    await broker.publish(b"poison", "q")
    await recorder.wait_for(3, deadline=10)
    async with asyncio.timeout(10):
        await recorder.died.wait()
    assert recorder.dead == [(b"poison", "delivery_limit")]
    await asyncio.sleep(0.5)  # time for a fourth delivery, were there one
    assert [(body, again) for _, body, again in recorder.deliveries] == [
        (b"poison", False),
        (b"poison", True),
        (b"poison", True),
    ]


async def fill(broker: Broker, recorder: Recorder) -> list[bytes]:
    """Fill queue q (max_queue_length 1, prefetch 1) behind a message its consumer holds;
    returns the bodies accepted."""
    recorder.hold = asyncio.Event()
    await broker.publish(b"held", "q")
    await recorder.wait_for(1, deadline=10)  # held by the consumer: no longer in the queue
    accepted = [b"held"]
    with pytest.raises(QueueFull):
        for n in range(3):
            await broker.publish(b"ready%d" % n, "q")
            accepted.append(b"ready%d" % n)
    assert len(accepted) in (2, 3)  # a quorum queue takes one past its limit
    return accepted


async def test_a_full_queue_refuses_every_publish_but_the_delay_queues_take_them(
    started: Any,
) -> None:
    """As x-max-length with reject-publish: any publish into a full queue is QueueFull (a retry
    too, not only a submit), while the delay queues take delayed ones, delivered when due."""
    recorder = Recorder()
    broker = await started(recorder, max_queue_length=1, prefetch=1)
    accepted = await fill(broker, recorder)
    with pytest.raises(QueueFull):
        await broker.submit(b"refused", "q")
    await broker.publish(b"retry", "q", delay=1.0)
    await broker.submit(b"submitted", "q", delay=1.0)
    # Room before they are due: RabbitMQ retries a message its queue refused only every 180 s.
    assert recorder.hold is not None
    recorder.hold.set()
    await recorder.wait_for(len(accepted) + 2, deadline=15)
    await asyncio.sleep(0.5)  # time for a refused message to arrive, were it not refused
    bodies = [body for _, body, _ in recorder.deliveries]
    assert sorted(bodies) == sorted([*accepted, b"retry", b"submitted"])


@pytest.mark.parametrize("broker_url", ["memory"], indirect=True)
async def test_a_delayed_message_due_at_a_full_queue_waits_for_room(started: Any) -> None:
    """memory:// keeps a due message its full queue refuses until there is room, as RabbitMQ's
    at-least-once dead-lettering out of the delay queues does. (RabbitMQ retries it only every
    dead_letter_worker_publisher_confirm_timeout, 180 s: measured on 3.10.8, too slow to test.)"""
    recorder = Recorder()
    broker = await started(recorder, max_queue_length=1, prefetch=1)
    accepted = await fill(broker, recorder)
    await broker.publish(b"later", "q", delay=0.2)
    await asyncio.sleep(0.5)  # due, and its queue is full
    with pytest.raises(QueueFull):  # it waits outside the queue, which stays full
        await broker.publish(b"refused", "q")
    assert recorder.hold is not None
    recorder.hold.set()
    await recorder.wait_for(len(accepted) + 1, deadline=10)
    await asyncio.sleep(0.2)
    assert [body for _, body, _ in recorder.deliveries] == [*accepted, b"later"]


async def test_the_log_is_read_back_in_append_order(started: Any) -> None:
    recorder = Recorder()
    broker = await started(recorder)
    for n in range(50):
        await broker.append(b'{"id": "%d", "events": []}' % n)
    async with asyncio.timeout(10):
        while len(recorder.log) < 50:
            recorder.logged.clear()
            await recorder.logged.wait()
    assert [body for _, body in recorder.log] == [
        b'{"id": "%d", "events": []}' % n for n in range(50)
    ]
    assert {kind for kind, _ in recorder.log} == {LogKind.EVENTS}


@pytest.mark.amqp
async def test_a_quiet_log_is_acked_so_consumer_timeout_never_fires(
    rabbit: RabbitNode, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Log entries are acked many at a time, and also after a second of quiet: an entry left
    unacked would let RabbitMQ's consumer_timeout close the channel of an idle deployment."""
    # Long enough for one rabbitmqctl call on a busy machine, so that the unacked entry is seen.
    idle = 10.0
    monkeypatch.setattr(amqp, "LOG_ACK_IDLE", idle)
    recorder = Recorder()
    broker = make_broker(BrokerSettings(url=rabbit.url, prefix=prefix))
    async with asyncio.timeout(30):
        await broker.start({"q"}, recorder.on_log, recorder.on_dead)
    try:
        ours = await asyncio.to_thread(connections_of, rabbit, prefix)
        await broker.append(b'{"id": "0", "events": []}')
        async with asyncio.timeout(10):
            await recorder.logged.wait()
        logged = time.monotonic()
        seen = await asyncio.to_thread(unacked, rabbit, ours)
        assert time.monotonic() - logged < idle, "rabbitmqctl too slow to see the entry unacked"
        assert seen > 0  # else the test proves nothing
        await asyncio.sleep(logged + idle + 1.0 - time.monotonic())
        assert await asyncio.to_thread(unacked, rabbit, ours) == 0
    finally:
        await broker.close()


def connections_of(rabbit: RabbitNode, prefix: str) -> set[str]:
    """The pids of the connections that aioqueue named for `prefix`."""
    connections = rabbit.ctl("list_connections", "pid", "client_properties").splitlines()
    return {row.split("\t")[0] for row in connections if f"aioqueue {prefix}" in row}


def unacked(rabbit: RabbitNode, connections: set[str]) -> int:
    """Messages unacked on the channels of `connections`."""
    channels = rabbit.ctl("list_channels", "connection", "messages_unacknowledged").splitlines()
    rows = [row.split("\t") for row in channels]
    return sum(int(row[1]) for row in rows if len(row) == 2 and row[0] in connections)


async def test_a_publish_to_an_unknown_queue_is_unavailable_not_a_full_queue(
    started: Any,
) -> None:
    """RabbitMQ returns a message no queue is bound to take (mandatory): that is no 429, and
    the embedded broker says the same rather than raise a KeyError."""
    broker = await started(Recorder())
    with pytest.raises(BrokerUnavailable, match="could not route"):  # QueueFull is not one
        await broker.publish(b"{}", "no-such-queue")


@pytest.mark.amqp
async def test_streams_declared_with_other_retention_are_kept_with_a_warning(
    rabbit: RabbitNode, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ refuses to declare a stream again with other arguments; a changed retention in
    the config must not stop every connect: the streams keep theirs, and the log says so."""
    connection = await aio_pika.connect(rabbit.url)
    async with connection:
        channel = await connection.channel()
        for name in (f"{prefix}.events", f"{prefix}.topics"):
            arguments: dict[str, Any] = {"x-queue-type": "stream", "x-max-length-bytes": 1234567}
            await channel.declare_queue(name, durable=True, arguments=arguments)
    broker = make_broker(BrokerSettings(url=rabbit.url, prefix=prefix))
    recorder = Recorder()
    async with asyncio.timeout(30):
        await broker.start({"q"}, recorder.on_log, recorder.on_dead)
    try:
        assert broker.problem() is None
        offset = await broker.topics.publish("a.b", b"1")
        assert offset >= 0
        kept = [r.getMessage() for r in caplog.records if "keeps the retention" in r.getMessage()]
        assert len(kept) == 2, kept
    finally:
        await broker.close()
