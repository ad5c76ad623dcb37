"""Checkpoints of the job store, kept in RabbitMQ streams.

    P.checkpoints          stream, small: one record per finished checkpoint, and readers' probes
    P.checkpoint.<id>      stream: one checkpoint's chunks, at offsets 0 .. n-1

A checkpoint has a stream of its own, so its chunks sit at known offsets, any number of
processes can read it at once, and a writer killed half-way leaves an orphan stream (deleted
later), never a damaged index: its record is written only once every chunk is confirmed. A
reader finds the records by publishing a probe to the index and reading it from the start up to
its probe, since a stream tells neither its length nor where its tail is. The index keeps about
1 MB of records (by size, never by age: however long every process was down, the newest record
is still there).

Every call uses a connection of its own: a checkpoint's megabytes never queue up in front of the
job path's confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import Any

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from aioqueue.broker.amqp import translate_errors
from aioqueue.errors import BrokerUnavailable
from aioqueue.snapshots import Snapshot

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
#: Chunks read ahead, or published before their confirms are awaited.
WINDOW = 8
INDEX_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "stream",
    "x-max-length-bytes": 1_000_000,
    "x-stream-max-segment-size-bytes": 200_000,
}
CHUNK_HEADER = "aq-chunk"


class CheckpointStreams:
    def __init__(self, url: str, prefix: str, timeout: float) -> None:
        self._url = url
        self._prefix = prefix
        #: Seconds any one call may take.
        self._timeout = timeout
        self.index = f"{prefix}.checkpoints"

    async def records(self) -> list[dict[str, Any]]:
        """The records of every finished checkpoint the index holds, oldest first."""
        probe = secrets.token_hex(8)
        records: list[dict[str, Any]] = []
        async with self._channel() as channel:
            await self._declare_index(channel)
            await self._publish(channel, self.index, orjson.dumps({"probe": probe}))
            async with contextlib.aclosing(self._read(channel, self.index)) as entries:
                async for body, _ in entries:
                    entry = orjson.loads(body)
                    if entry.get("probe") == probe:
                        return records
                    if "checkpoint" in entry:
                        records.append(entry["checkpoint"])
        raise AssertionError("unreachable: _read ends only by a timeout")

    async def fetch(self, record: dict[str, Any]) -> bytes:
        """A checkpoint's compressed data, as its record describes it; ValueError if a chunk is
        not where it should be (the caller checks the digest)."""
        chunks: list[bytes] = []
        async with self._channel() as channel:
            try:
                await channel.declare_queue(record["stream"], passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise ValueError(f"its stream {record['stream']} is gone") from None
            async with contextlib.aclosing(self._read(channel, record["stream"])) as messages:
                async for body, headers in messages:
                    if headers.get(CHUNK_HEADER) != len(chunks):
                        raise ValueError(f"chunk {len(chunks)} is missing in {record['stream']}")
                    chunks.append(body)
                    if len(chunks) == record["chunks"]:
                        return b"".join(chunks)
        raise AssertionError("unreachable: _read ends only by a timeout")

    def stream_name(self, checkpoint: str) -> str:
        return f"{self._prefix}.checkpoint.{checkpoint}"

    async def save(self, snapshot: Snapshot, checkpoint: str) -> dict[str, Any]:
        """Write a checkpoint: its chunks to a new stream, then its record to the index."""
        stream = self.stream_name(checkpoint)
        data = snapshot.data
        pieces = [data[at : at + CHUNK_BYTES] for at in range(0, len(data), CHUNK_BYTES)]
        async with self._channel() as channel:
            await channel.declare_queue(stream, durable=True, arguments={"x-queue-type": "stream"})
            for first in range(0, len(pieces), WINDOW):
                # Published in this order on one channel, so offset i holds chunk i.
                await asyncio.gather(
                    *(
                        self._publish(channel, stream, piece, {CHUNK_HEADER: first + i})
                        for i, piece in enumerate(pieces[first : first + WINDOW])
                    )
                )
            record = {
                "id": checkpoint,
                "stream": stream,
                "chunks": len(pieces),
                "bytes": len(data),
                "sha256": snapshot.sha256,
                "offset": snapshot.offset,
                "jobs": snapshot.jobs,
                "schema": snapshot.schema,
                "at": time.time(),
            }
            await self._declare_index(channel)
            await self._publish(channel, self.index, orjson.dumps({"checkpoint": record}))
        return record

    async def delete(self, streams: Iterable[str]) -> None:
        """Delete the streams of checkpoints no longer needed (missing ones are no error)."""
        async with self._channel() as channel:
            for stream in streams:
                await channel.queue_delete(stream)

    # Plumbing ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _channel(self) -> AsyncIterator[AbstractChannel]:
        """A connection and a confirming channel for one call, all within its timeout;
        client-library errors come out as BrokerUnavailable."""
        with translate_errors("checkpoint"):
            async with asyncio.timeout(self._timeout):
                connection = await aio_pika.connect(
                    self._url, client_properties={"connection_name": "aioqueue checkpoints"}
                )
                try:
                    yield await connection.channel(publisher_confirms=True)
                finally:
                    with contextlib.suppress(Exception):
                        await connection.close()

    async def _declare_index(self, channel: AbstractChannel) -> None:
        await channel.declare_queue(self.index, durable=True, arguments=INDEX_ARGUMENTS)

    @staticmethod
    async def _publish(
        channel: AbstractChannel, stream: str, body: bytes, headers: dict[str, Any] | None = None
    ) -> None:
        message = aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers or {}
        )
        confirmation = await channel.default_exchange.publish(message, stream)
        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
            raise BrokerUnavailable(f"RabbitMQ refused a message to {stream}")

    @staticmethod
    async def _read(
        channel: AbstractChannel, stream: str
    ) -> AsyncGenerator[tuple[bytes, dict[str, Any]], None]:
        """The messages of a stream from its start, as (body, headers), for as long as the
        caller reads (the call's own timeout ends it otherwise)."""
        raw = await channel.get_underlay_channel()
        await raw.basic_qos(prefetch_count=WINDOW)
        arrived: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        await raw.basic_consume(stream, arrived.put, arguments={"x-stream-offset": "first"})
        while True:
            message = await arrived.get()
            yield message.body, message.header.properties.headers or {}
            tag = getattr(message.delivery, "delivery_tag", None)
            await raw.basic_ack(tag or 0)  # on a stream, an ack only returns credit
