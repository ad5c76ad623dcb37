"""A minimal websocket client for the topic benchmarks, cheap per frame.

The fan-out and catch-up benchmarks receive hundreds of thousands of frames in one client
process. aiohttp's client spends tens of µs on each (a reader, a queue, a future, a task
wake-up), so the client process, not the server, would set the pace, and every server would
look alike. This one is an `asyncio.Protocol` that parses the frames of each chunk the loop
hands it in one loop and calls `on_frame(payload, now)` for each text frame; `now` is the
`perf_counter` at which the chunk arrived. It answers pings (aiohttp's heartbeat) and the close
handshake, and inflates what the server compressed when it offered permessage-deflate (as
browsers do) and the server accepted. The same code measures every server a benchmark compares.

Server frames are never masked; a client's always are (RFC 6455 §5.3).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import zlib
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import orjson

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
#: The extension header a browser sends; with it the server compresses every frame it sends.
DEFLATE = "permessage-deflate; client_max_window_bits"

OnFrame = Callable[[bytes, float], None]


def _masked(opcode: int, payload: bytes) -> bytes:
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    if not payload:
        return header + mask
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "big")
    body = (int.from_bytes(payload, "big") ^ key).to_bytes(length, "big")
    return header + mask + body


class WsClient(asyncio.Protocol):
    """One websocket connection. `connect()` returns once the handshake is done."""

    def __init__(self, on_frame: OnFrame | None = None) -> None:
        self.on_frame = on_frame
        self.transport: asyncio.Transport | None = None
        self.frames = 0  # text and binary frames received
        self.close_code: int | None = None  # the server's close code, once it closed
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self._upgraded = False
        #: Set when the server accepted permessage-deflate: it compresses what it sends.
        self._inflate: Any = None

    @classmethod
    async def connect(
        cls, url: str, on_frame: OnFrame | None = None, *, deflate: bool = False
    ) -> WsClient:
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        transport, client = await loop.create_connection(lambda: cls(on_frame), host, port)
        client.transport = transport  # uvloop calls connection_made() a little later
        key = base64.b64encode(os.urandom(16)).decode()
        extension = f"Sec-WebSocket-Extensions: {DEFLATE}\r\n" if deflate else ""
        client.transport.write(
            (
                f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extension}\r\n"
            ).encode()
        )
        try:
            await client._handshake
        except BaseException:
            client.transport.abort()
            raise
        return client

    def send_json(self, frame: Any) -> None:
        assert self.transport is not None
        self.transport.write(_masked(TEXT, orjson.dumps(frame)))

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked(CLOSE, code.to_bytes(2, "big")))
            self.transport.close()

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass of it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._handshake.done():
            self._handshake.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            status = head[: head.find(b"\r\n")]
            del buffer[: end + 4]
            if b" 101 " not in status:
                self._handshake.set_exception(ConnectionError(f"handshake refused: {status!r}"))
                return
            if b"permessage-deflate" in head:
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            self._upgraded = True
            self._handshake.set_result(None)
        self._frames(buffer)

    def _frames(self, buffer: bytearray) -> None:
        now = time.perf_counter()
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            compressed = buffer[pos] & 0x40  # RSV1: a permessage-deflate message
            opcode, length = buffer[pos] & 0x0F, buffer[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
            end = pos + head + length
            if end > size:
                break
            payload = bytes(buffer[pos + head : end])
            pos = end
            if compressed and self._inflate is not None:
                payload = self._inflate.decompress(payload + b"\x00\x00\xff\xff")
            if opcode in (TEXT, BINARY):
                self.frames += 1
                if self.on_frame is not None:
                    self.on_frame(payload, now)
            elif opcode == PING and self.transport is not None:
                self.transport.write(_masked(PONG, payload))
            elif opcode == CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if payload else 1005
                self.close(self.close_code)
        del buffer[:pos]
