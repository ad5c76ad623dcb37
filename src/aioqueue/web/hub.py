"""Fan-out of job events to websocket connections, without ever waiting on a slow client.

Each connection has a bounded queue of frames and its own writer task; the hub only appends.
Progress frames of one job coalesce (the newest replaces one still queued), so a client that
reads slowly sees fewer progress updates, never an older one after a newer one. A connection is
closed with 1013 ("try again later") when its queue is full anyway, or when one frame has waited
`SEND_TIMEOUT` seconds for the client to read (its socket buffers are full): the client
reconnects and resubscribes, and the snapshot it gets then carries everything it missed (G5).
The client's own frames are read only while the queue is less than half full: one that sends
faster than it reads the replies is slowed down, and only a client that does not read fills it.

The read loop runs in a task of the connection's own (`serve`), so that a close started here can
stop it while it waits for the client: aiohttp's `close()` called beside a waiting `receive()`
drops the connection at once, before the client's close frame (RFC 6455 §7.1.1), and an aiohttp
client then reports 1006 instead of the code it was sent.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

from aioqueue.jobs import Job
from aioqueue.ratelimit import TokenBucket
from aioqueue.web.topichub import TopicHub, compact_dumps

logger = logging.getLogger(__name__)

#: Close code for a client whose send buffer overflowed: "try again later".
CLOSE_SLOW = 1013
#: How long a close handshake may take before the connection is dropped; also how long a close
#: waits for the read loop to finish the frame it is handling.
CLOSE_TIMEOUT = 1.0
#: How long one frame may wait for a client that does not read before it is disconnected.
SEND_TIMEOUT = 5.0


class Connection:
    """One websocket client: its subscriptions and its bounded outgoing queue."""

    def __init__(
        self, ws: web.WebSocketResponse, send_buffer: int, publishes_per_second: int = 100
    ) -> None:
        self.ws = ws
        self.subscriptions: set[str] = set()
        self.publishes = TokenBucket(publishes_per_second)
        self._limit = send_buffer
        # Each slot is [frame, coalesce key]; `_coalescing` points at the slot still queued
        # for a key, so a newer frame for it replaces the frame in place.
        self._queue: collections.deque[list[bytes | str | None]] = collections.deque()
        self._coalescing: dict[str, list[bytes | str | None]] = {}
        self._wake = asyncio.Event()
        # Set while the queue is less than half full. The replies to one frame are one or two
        # frames, and the other half is left for the hub's events.
        self._room = asyncio.Event()
        self._room.set()
        self._pause_at = max(1, send_buffer // 2)
        self._closing = False
        self._closed: asyncio.Task[None] | None = None  # the close handshake, once begun
        self._reader: asyncio.Task[None] | None = None
        self._idle = False  # the read loop waits for the client: safe to stop
        self._writer = asyncio.create_task(self._write_forever(), name="aioqueue-ws-writer")

    async def serve(self, read_loop: Coroutine[Any, Any, None]) -> None:
        """Run the read loop until either side closes, then wait for the close handshake.

        The handler must not return before that: aiohttp drops the connection when it does.
        """
        self._reader = asyncio.create_task(read_loop, name="aioqueue-ws-reader")
        try:
            await self._reader
        except asyncio.CancelledError:
            if _cancelling():  # the handler itself is stopped (the HTTP server shuts down)
                raise
            # else close() stopped the read loop while it waited for the client
        finally:
            self._reader.cancel()
        await self.wait_closed()

    async def receive(self) -> WSMessage | None:
        """The client's next message for the read loop, once the queue has room for its
        replies; None once the connection closes."""
        if self._closing:
            return None
        self._idle = True
        try:
            # aiohttp hands out frames already buffered without yielding, so without this wait
            # a burst of pipelined frames would fill the queue before the writer ever ran.
            await self._room.wait()
            return await self.ws.receive()
        finally:
            self._idle = False

    async def room(self) -> None:
        """Wait until the queue is less than half full: a sender that can wait (a topic
        catch-up) is paced by the client instead of filling the queue."""
        await self._room.wait()

    def send(self, frame: bytes, coalesce: str | None = None) -> None:
        """Queue a frame; never blocks. Closes the connection if its buffer is full."""
        if self._closing:
            return
        if coalesce is not None and (slot := self._coalescing.get(coalesce)) is not None:
            slot[0] = frame
            return
        if len(self._queue) >= self._limit:
            logger.info("websocket client too slow, %d frames queued: closing", len(self._queue))
            self.close(CLOSE_SLOW, "send buffer full; reconnect and resubscribe")
            return
        slot = [frame, coalesce]
        self._queue.append(slot)
        if coalesce is not None:
            self._coalescing[coalesce] = slot
        if len(self._queue) >= self._pause_at:
            self._room.clear()
        self._wake.set()

    async def _write_forever(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            frame, key = self._queue.popleft()
            if key is not None:
                del self._coalescing[key]  # type: ignore[arg-type]
            if len(self._queue) < self._pause_at:
                self._room.set()
            assert isinstance(frame, bytes)
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await self.ws.send_frame(frame, WSMsgType.TEXT)
            except TimeoutError:
                logger.info("websocket client has not read for %.0f s: closing", SEND_TIMEOUT)
                self.close(CLOSE_SLOW, "not reading; reconnect and resubscribe")
                return
            del frame  # sent: not kept while the connection waits for the next one

    def close(self, code: int, message: str) -> None:
        """Stop writing and close the websocket in the background (`wait_closed`)."""
        if self._closing:
            return
        self._closing = True
        self._writer.cancel()
        if self._idle and self._reader is not None:
            self._reader.cancel()
        self._closed = task = asyncio.create_task(self._close(code, message))
        _closing_tasks.add(task)
        task.add_done_callback(_closing_tasks.discard)

    async def wait_closed(self) -> None:
        """Wait for the close begun by `close()`, if any; it is bounded, and never raises."""
        if self._closed is not None:
            await asyncio.wait({self._closed})

    async def _close(self, code: int, message: str) -> None:
        try:
            await self._stop_reading()
            # With no receive() waiting, close() sends the close frame and then reads until the
            # client's close frame comes back.
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=message.encode())
        except asyncio.CancelledError:
            # When the writer's send timeout fired, it cancelled the drain waiter that aiohttp
            # shares between writes, and close() raises CancelledError at once: that is a
            # failed close. Only a cancellation of this task itself goes on up.
            if _cancelling():
                raise
        except Exception as exc:  # timed out, or the connection broke: the socket goes anyway
            logger.debug("websocket close handshake failed: %r", exc)
        finally:
            # Whatever happened, the socket is released now. A client that does not read holds
            # the close frame in a full send buffer, where transport.close() would wait for
            # ever; after a completed handshake the transport is closed and this does nothing.
            self._abort()

    async def _stop_reading(self) -> None:
        """Let the read loop finish the frame it handles (a submit waiting for its confirm)."""
        reader = self._reader
        if reader is None or reader.done():
            return
        _, pending = await asyncio.wait({reader}, timeout=CLOSE_TIMEOUT)
        if pending:
            reader.cancel()
            await asyncio.wait({reader})

    def _abort(self) -> None:
        transport = self.ws._req.transport if self.ws._req is not None else None
        if transport is not None:
            transport.abort()

    async def drain(self) -> None:
        """Stop the writer (the websocket is closing)."""
        self._closing = True
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)


_closing_tasks: set[asyncio.Task[None]] = set()


def _cancelling() -> bool:
    """Whether the running task has been asked to stop (not merely handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Hub:
    """Channel name -> connections subscribed to it; topic channels are `topics`'."""

    def __init__(self) -> None:
        self.channels: dict[str, set[Connection]] = {}
        self.topics = TopicHub()

    def subscribe(self, conn: Connection, channel: str) -> None:
        self.channels.setdefault(channel, set()).add(conn)
        conn.subscriptions.add(channel)

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        if channel.startswith("topic:"):
            self.topics.unsubscribe(conn, channel)
            return
        conn.subscriptions.discard(channel)
        subscribers = self.channels.get(channel)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self.channels[channel]

    def drop(self, conn: Connection) -> None:
        for channel in list(conn.subscriptions):
            self.unsubscribe(conn, channel)

    def on_job_change(self, event: str, job: Job) -> None:
        """Store listener: push the event to the job's channel, serialised once for everyone."""
        channel = "job:" + job.id
        subscribers = self.channels.get(channel)
        if not subscribers:
            return
        frame = job_frame(channel, event, job)
        coalesce = channel if event == "progress" else None
        for conn in list(subscribers):
            conn.send(frame, coalesce)


def job_frame(channel: str, event: str, job: Job) -> bytes:
    frame = {"type": "job", "channel": channel, "event": event, "job": job.to_dict()}
    return compact_dumps(frame)
