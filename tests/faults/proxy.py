"""A TCP proxy between aioqueue and RabbitMQ that can hang, slow down or cut the link.

`netem` is not available on these machines, so faults of the network are made here:

* `blackhole()`: bytes stop flowing both ways while every socket stays open, as in a partition
  or a hung broker (no RST, no FIN). What was sent meanwhile arrives after `heal()`, as TCP
  retransmission would deliver it.
* `latency = 0.05`: every chunk is held that long before it is forwarded, each way.
* `cut()`: every connection is closed at once (new ones are still accepted).

Usage::

    async with FaultProxy(upstream_port) as proxy:   # listens on proxy.port
        proxy.blackhole(); ...; proxy.heal()
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType

CHUNK = 65536


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: Seconds each chunk is held before it is forwarded.
        self.latency = 0.0
        self.port = 0

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.heal()
        self.cut()
        for link in list(self._links):
            link.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)

    def blackhole(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        link = asyncio.current_task()
        assert link is not None
        self._links.add(link)
        self._writers.add(client_w)
        try:
            await self._flowing.wait()  # a connect during a blackhole hangs, as it would
            up_r, up_w = await asyncio.open_connection(*self._upstream)
        except OSError:
            client_w.transport.abort()
            self._links.discard(link)
            self._writers.discard(client_w)
            return
        self._writers.add(up_w)
        try:
            await asyncio.gather(self._pump(client_r, up_w), self._pump(up_r, client_w))
        finally:
            for writer in (client_w, up_w):
                self._writers.discard(writer)
                writer.transport.abort()
            self._links.discard(link)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Chunks go through a queue so that latency delays each one without slowing the rate.
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def forward() -> None:
            while True:
                due, data = await chunks.get()
                if not data:
                    writer.transport.abort()  # the other side is gone: so is this one
                    return
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()

        forwarder = asyncio.create_task(forward())
        try:
            while not forwarder.done():
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                await chunks.put((time.monotonic() + self.latency, data))
                if not data:
                    break
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await forwarder
        finally:
            forwarder.cancel()
