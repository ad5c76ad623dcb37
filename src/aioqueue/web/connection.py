"""One websocket client's outgoing side: frames are sent without ever waiting on a slow client.

Each connection has a bounded queue of frames and its own writer task; the hubs only append.
A frame that would not wait is not queued: when nothing is queued or being written and the
transport holds no unsent bytes, `send` writes it at once (the kernel takes it now), which
costs a fan-out a system call per client and not also a task switch and a timer. Frames need
no compression for that (permessage-deflate, which browsers offer, goes through aiohttp's
writer). Progress frames of one job coalesce (the newest replaces one still queued), so
a client that reads slowly sees fewer progress updates, never an older one after a newer one.
A connection is closed with 1013 ("try again later") when its queue is full anyway, or when one
frame has waited `SEND_TIMEOUT` seconds for the client to read (its socket buffers are full):
the client reconnects and resubscribes, and the snapshot it gets then carries everything it
missed (G5).
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
import struct
from collections.abc import Coroutine
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

from aioqueue.auth import Principal
from aioqueue.metrics import WsTally
from aioqueue.ratelimit import TokenBucket

logger = logging.getLogger(__name__)

#: Close code for a client whose send buffer overflowed: "try again later".
CLOSE_SLOW = 1013
#: How long a close handshake may take before the connection is dropped; also how long a close
#: waits for the read loop to finish the frame it is handling.
CLOSE_TIMEOUT = 1.0
#: How long one frame may wait for a client that does not read before it is disconnected.
SEND_TIMEOUT = 5.0
#: A frame longer than this is written apart from its header, not copied behind it (aiohttp's).
COPY_LIMIT = 2**14
_TEXT = 0x80 | WSMsgType.TEXT  # FIN and the opcode: a whole text frame
_LENGTH_16 = struct.Struct("!BBH").pack
_LENGTH_64 = struct.Struct("!BBQ").pack


class Connection:
    """One websocket client: its subscriptions and its bounded outgoing queue."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        send_buffer: int,
        publishes_per_second: int,
        transport: asyncio.Transport | None,
        tally: WsTally,
    ) -> None:
        self.ws = ws
        #: Where frames and closes are counted (the served application's metrics).
        self._tally = tally
        # Frames are written straight to the transport only when they need no compression
        # (permessage-deflate keeps a context per connection, in aiohttp's writer).
        self._transport = None if ws.compress else transport
        self._writing = False  # the writer task is between taking a frame and having sent it
        self.subscriptions: set[str] = set()
        self.publishes = TokenBucket(publishes_per_second)
        #: Who is on the other end; None until it authenticates (with auth on), and again once
        #: its credentials expired.
        self.principal: Principal | None = None
        #: The name of the principal it first authenticated as: the only one it may be.
        self.identity: str | None = None
        #: Closes the connection if it does not authenticate in time, or tells it that its
        #: credentials expire (web/ws.py).
        self.auth_timer: asyncio.TimerHandle | None = None
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

    def has_room(self) -> bool:
        return self._room.is_set()

    async def room(self) -> None:
        """Wait until the queue is less than half full: a sender that can wait (a topic
        catch-up) is paced by the client instead of filling the queue."""
        await self._room.wait()

    def send(self, frame: bytes, coalesce: str | None = None) -> None:
        """Queue a frame; never blocks. Closes the connection if its buffer is full."""
        if self._closing:
            self._tally.dropped += 1
            return
        if coalesce is not None and (slot := self._coalescing.get(coalesce)) is not None:
            slot[0] = frame
            self._tally.coalesced += 1
            return
        if not self._queue and self._write_now(frame):
            return
        if len(self._queue) >= self._limit:
            logger.info("websocket client too slow, %d frames queued: closing", len(self._queue))
            self._tally.closes_full += 1
            self._tally.dropped += 1
            self.close(CLOSE_SLOW, "send buffer full; reconnect and resubscribe")
            return
        slot = [frame, coalesce]
        self._queue.append(slot)
        if coalesce is not None:
            self._coalescing[coalesce] = slot
        if len(self._queue) >= self._pause_at:
            self._room.clear()
        self._wake.set()

    def _write_now(self, frame: bytes) -> bool:
        """Write `frame` at once if nothing is queued (the caller checks) nor being written and
        the transport holds no unsent bytes, so the kernel's buffer has room; True if written.
        A client that does not read fills its kernel buffer, then the transport holds bytes,
        and from then on every frame goes through the queue and the writer task."""
        transport = self._transport
        if transport is None or self._writing or transport.get_write_buffer_size():
            return False
        self._write(transport, frame)
        return True

    def _write(self, transport: asyncio.Transport, frame: bytes) -> None:
        """One whole text frame, in one or two writes, as aiohttp writes its own (pings, the
        close frame), so that frames never interleave."""
        if transport.is_closing() or self.ws.closed:
            self._tally.dropped += 1
            return  # the read loop sees the connection end, and it closes
        self._tally.sent += 1
        length = len(frame)
        if length < 126:
            header = bytes((_TEXT, length))
        elif length < 65536:
            header = _LENGTH_16(_TEXT, 126, length)
        else:
            header = _LENGTH_64(_TEXT, 127, length)
        if length > COPY_LIMIT:
            transport.write(header)
            transport.write(frame)
        else:
            transport.write(header + frame)

    async def _wait_for_room(self, transport: asyncio.Transport) -> None:
        """Return once the transport holds at most its high-water mark of unsent bytes (at
        once, the usual case); TimeoutError if that takes SEND_TIMEOUT. The transport tells
        its protocol (aiohttp's) when it drains, not us: this polls, from 1 ms to 50 ms apart,
        and only while the client is behind."""
        high = transport.get_write_buffer_limits()[1]
        if transport.get_write_buffer_size() <= high:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SEND_TIMEOUT
        delay = 0.001
        while transport.get_write_buffer_size() > high and not transport.is_closing():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            await asyncio.sleep(min(delay, remaining))
            delay = min(2 * delay, 0.05)

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
            self._writing = True  # until it is written: `_write_now` must not overtake it
            try:
                if (transport := self._transport) is not None:
                    await self._wait_for_room(transport)
                    self._write(transport, frame)
                else:  # compressed: aiohttp's writer, which waits for the transport to drain
                    async with asyncio.timeout(SEND_TIMEOUT):
                        await self.ws.send_frame(frame, WSMsgType.TEXT)
                    self._tally.sent += 1
            except TimeoutError:
                logger.info("websocket client has not read for %.0f s: closing", SEND_TIMEOUT)
                self._tally.closes_stalled += 1
                self._tally.dropped += 1
                self.close(CLOSE_SLOW, "not reading; reconnect and resubscribe")
                return
            finally:
                self._writing = False
            del frame  # sent: not kept while the connection waits for the next one

    def close(self, code: int, message: str) -> None:
        """Stop writing and close the websocket in the background (`wait_closed`)."""
        if self._closing:
            return
        self._closing = True
        self._writer.cancel()
        self._tally.dropped += len(self._queue)  # never sent: the client resubscribes
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
        if not self._closing:  # else `close()` counted them
            self._tally.dropped += len(self._queue)
        self._closing = True
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)


_closing_tasks: set[asyncio.Task[None]] = set()


def _cancelling() -> bool:
    """Whether the running task has been asked to stop (not merely handed a CancelledError)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
