"""The session's private RabbitMQ node is a working broker for what aioqueue relies on."""

from __future__ import annotations

import aio_pika
import pytest
from pamqp.commands import Basic

from tests.conftest import ExternalBroker
from tests.rabbitmq import RabbitNode


@pytest.mark.amqp
async def test_node_keeps_a_confirmed_persistent_message_in_a_quorum_queue(
    rabbit: RabbitNode | ExternalBroker, prefix: str
) -> None:
    """A persistent message published with confirms to a durable quorum queue can be got back."""
    connection = await aio_pika.connect(rabbit.url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            f"{prefix}.node-check", durable=True, arguments={"x-queue-type": "quorum"}
        )
        body = f"hello from {prefix}".encode()
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
            timeout=10,
        )
        assert isinstance(confirmation, Basic.Ack)  # the broker took responsibility
        message = await queue.get(timeout=10, fail=False)
        assert message is not None
        assert message.body == body
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        await message.ack()
        await queue.delete(if_unused=False, if_empty=False)  # quorum: if_empty is a 540
