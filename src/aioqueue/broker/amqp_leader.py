"""The leader lock on RabbitMQ: the single active consumer of the quorum queue `P.scheduler`,
and the token message it holds.

A queue with `x-single-active-consumer` delivers to one of its consumers at a time, whatever
the others, and moves on to the next one as soon as that one's channel closes (its process died,
and the kernel closed its socket; or it was cut off, and missed two heartbeats) or it cancels.
RabbitMQ tells a consumer that it is the active one only by delivering to it, so the queue keeps
a token message, which the active consumer holds unacked: holding the token is leading. When the
leader's channel closes, RabbitMQ gives the token back to the queue, and so to the next consumer,
which leads from then on, within milliseconds of a SIGKILL (measured: 3 ms). No lease renewed
against a clock, no second store, nothing to clean up after a crash; and the queue is a quorum
queue, so the lock lives on when a node of a cluster dies.

- **At least one token, and soon only one.** Every process that attaches publishes a token if
  the queue has none ready (the leader's is not ready: so each process that joins adds one).
  More tokens are harmless: the queue hands all of them to its one active consumer, which keeps
  the newest and acks the one it held (prefetch 2, so that a second one reaches it). A token is
  only ever acked by a leader holding a newer one, so there is never none; a queue deleted with
  its token is declared again, with a new token, by the reconnect its deletion forces (RabbitMQ
  cancels its consumers).
- **consumer_timeout.** RabbitMQ closes the channel of a consumer that holds a delivery longer
  than its consumer_timeout (30 min by default; per queue only from 3.11.15), which would cost
  the leader its connection every 30 minutes. The leader publishes a fresh token every quarter
  of `broker.consumer_timeout`; the queue delivers it to the leader, which acks the old one.
- **The delivery limit.** A quorum queue counts the returns of a message (one per failover) and
  RabbitMQ 4 dead-letters it after 20 by default: the queue is declared with a limit no
  failover count reaches, and each fresh token starts at 0.
- **Giving the lead up.** On a graceful shutdown, the leader cancels its consumer (the queue
  activates the next one) and then gives its token back, which goes to that one: a handover at
  once, not after the shutdown's grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiormq
import orjson
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage

from aioqueue.broker.amqp_settle import settle
from aioqueue.broker.base import LeaderHandler
from aioqueue.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
    # A token comes back to the queue at every failover; none must ever be dead-lettered.
    "x-delivery-limit": 1_000_000_000,
}
#: The token held, and one more: a fresh or surplus token has to reach the leader to be seen.
PREFETCH = 2

#: Publishes a token to the queue; returns once RabbitMQ confirmed it, else BrokerUnavailable.
PublishToken = Callable[[bytes], Awaitable[None]]


class AmqpLeader:
    def __init__(
        self,
        name: str,
        rotate_every: float,
        publish: PublishToken,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        #: The queue: `P.scheduler`.
        self.name = name
        self._rotate_every = rotate_every
        self._publish = publish
        self._spawn = spawn
        self._on_change: LeaderHandler | None = None
        #: Whether this process holds a token (and so leads).
        self.leading = False
        self._channel: RawChannel | None = None
        self._consumer_tag: str | None = None
        #: The delivery tag of the token held.
        self._held: int | None = None
        self._rotating: asyncio.Task[None] | None = None

    @property
    def wanted(self) -> bool:
        """Whether this process competes for the lead (`want`, until `resign`)."""
        return self._on_change is not None

    def want(self, on_change: LeaderHandler) -> None:
        self._on_change = on_change

    async def attach(self, channel: RawChannel) -> None:
        """Declare the queue, see that it has a token, and consume it on `channel` (a channel of
        its own, which the caller watches: its closing ends the session, and `detach` follows)."""
        await channel.basic_qos(prefetch_count=PREFETCH)
        declared = await channel.queue_declare(self.name, durable=True, arguments=QUEUE_ARGUMENTS)
        if not declared.message_count:
            await self._publish(token())
        self._channel = channel
        consuming = await channel.basic_consume(self.name, self._on_message)
        self._consumer_tag = str(consuming.consumer_tag)

    async def _on_message(self, message: DeliveredMessage) -> None:
        # Settled before the first await: callbacks run in delivery order.
        if message.channel is not self._channel:
            return  # from a channel given up already: RabbitMQ requeues it
        assert isinstance(message.delivery, aiormq.spec.Basic.Deliver)
        older, self._held = self._held, int(message.delivery.delivery_tag or 0)
        if older is not None:
            # The newest token is kept: it is the one whose consumer_timeout clock is youngest.
            self._spawn(settle(message.channel.basic_ack(older)))
        if not self.leading:
            self._tell(True)

    def detach(self) -> None:
        """The channel is gone (the session ended): whatever this process held, it holds no
        more; RabbitMQ requeued it for the next consumer."""
        self._channel, self._consumer_tag, self._held = None, None, None
        if self.leading:
            self._tell(False)

    async def resign(self) -> None:
        """Give the lead up for good (a graceful shutdown), handing the token on at once."""
        channel, tag, held = self._channel, self._consumer_tag, self._held
        self.detach()
        self._on_change = None
        if channel is None:
            return
        # The consumer first: while it is the active one, a token it gives back comes back to it.
        if tag is not None:
            await settle(channel.basic_cancel(tag))
        if held is not None:
            await settle(channel.basic_nack(held, requeue=True))

    async def close(self) -> None:
        self.detach()
        self._on_change = None
        rotating = self._stop_rotating()
        if rotating is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await rotating

    def _tell(self, leading: bool) -> None:
        self.leading = leading
        if leading:
            logger.debug("holding a token of %s", self.name)
            self._stop_rotating()
            self._rotating = asyncio.create_task(self._rotate(), name="aioqueue-leader-token")
        else:
            logger.debug("holding no token of %s", self.name)
            self._stop_rotating()
        if self._on_change is not None:
            try:
                self._on_change(leading)
            except Exception:  # the lock must not break with its listener
                logger.exception("the leader's listener failed")

    def _stop_rotating(self) -> asyncio.Task[None] | None:
        rotating, self._rotating = self._rotating, None
        if rotating is not None:
            rotating.cancel()
        return rotating

    async def _rotate(self) -> None:
        """A fresh token every `rotate_every` seconds, before consumer_timeout takes the old."""
        while True:
            await asyncio.sleep(self._rotate_every)
            try:
                await self._publish(token())
            except BrokerUnavailable as exc:
                # The session is likely ending; the next leader's tokens are its own.
                logger.warning("could not publish a fresh leader token: %s", exc)


def token() -> bytes:
    """A token's body: nothing reads it, but an operator looking at the queue may."""
    return orjson.dumps(
        {
            "token": "aioqueue leader",
            "from": f"{socket.gethostname()}:{os.getpid()}",
            "at": time.time(),
        }
    )
