"""Acks, nacks and cancels, bounded: each may fail or, worse, hang. On the channel of a connection
given up for dead (a frozen broker), aiormq's bounded write queue never drains; a delivery whose
ack hangs would hold its slot in the runner for ever, and no job of its queue would start. Either
way RabbitMQ redelivers the message (or requeues the leader's token), so giving up is safe."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

#: Seconds an ack, a nack or a cancel may take to be written before it is given up.
SETTLE_TIMEOUT = 1.0


async def settle(written: Awaitable[Any]) -> None:
    """Await an ack, a nack or a cancel for `SETTLE_TIMEOUT` at most; its errors are dropped."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(SETTLE_TIMEOUT):
            await written
