"""Issue 9, item 1: idle connections were never timed out. The probes, run against the real
`aioqueue serve`: connections that send nothing or half a request's headers, kept-alive ones
that idle, more connections than `http.max_connections`, and the open-files limit.

Before the fix, 500 such connections were all still open after 30 s (single ones after 900 s:
aiohttp's keep-alive timeout was 3,630 s), and with a 256 fd limit 300 of them locked every
other client out for as long as they were held. The broker plays no part: memory:// throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from tests.support import JSON, ServeProcess, submit, wait_ready

PROBES = 500  # as many as the probe: half idle, half with half-sent headers
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: "
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
EARLY = 0.25  # how much earlier than its timer a close may be seen (clocks, uvloop's cached time)


class Probe:
    """A raw TCP connection to the served process, timed from just before its connect (which
    is no later than the server's accept)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, t0: float
    ) -> None:
        self.reader, self.writer, self.started = reader, writer, t0

    async def response(self) -> bytes:
        """One response: its head and its body (by Content-Length)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def closed(self, deadline: float) -> tuple[float, bytes]:
        """Seconds from `started` until the server closed the connection, and what it sent."""
        data = b""
        try:
            async with asyncio.timeout(deadline):
                data = await self.reader.read()  # to EOF
        except ConnectionResetError:
            pass  # closed with our request unread: a reset
        except TimeoutError:
            raise AssertionError(f"still open after {deadline} s") from None
        return time.monotonic() - self.started, data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Connect = Callable[..., Awaitable[Probe]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Opens probes (`await connect(server, first_bytes)`); closes them all at the end."""
    opened: list[Probe] = []

    async def open_probe(server: ServeProcess, send: bytes = b"") -> Probe:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        t0 = time.monotonic()
        reader, writer = await asyncio.open_connection(host, int(port))
        if send:
            writer.write(send)
        opened.append(Probe(reader, writer, t0))
        return opened[-1]

    yield open_probe
    await asyncio.gather(*(probe.close() for probe in opened))


@pytest.fixture
def serve(prefix: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    started: list[ServeProcess] = []

    def start(nofile: tuple[int, int] | None = None, **env: str) -> ServeProcess:
        keys = {f"AIOQUEUE_HTTP__{key.upper()}": value for key, value in env.items()}
        started.append(ServeProcess("memory://", prefix, keys, nofile=nofile).start(tmp_path))
        return started[-1]

    yield start
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps no connection open between requests: the counts below are the
    probes' alone, and no pooled connection races the server's keep-alive close."""
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        yield session


async def served(server: ServeProcess) -> int:
    """The served process's ESTABLISHED TCP sockets on its HTTP port: its clients."""
    assert server.proc is not None
    process = psutil.Process(server.proc.pid)
    port = int(server.url.rsplit(":", 1)[1])

    def count() -> int:
        return sum(
            1
            for conn in process.net_connections(kind="tcp")
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
        )

    return await asyncio.to_thread(count)


async def served_becomes(
    server: ServeProcess, check: Callable[[int], bool], deadline: float
) -> int:
    end = time.monotonic() + deadline
    while not check(count := await served(server)):
        assert time.monotonic() < end, f"{count} connections after {deadline} s"
        await asyncio.sleep(0.1)
    return count


@pytest.mark.slow
async def test_idle_and_half_sent_headers_are_closed_after_header_timeout(
    serve: Callable[..., ServeProcess], connect: Connect, client: aiohttp.ClientSession
) -> None:
    """The issue's probe: 250 idle connections and 250 with half-sent headers. Each is closed,
    unanswered, header_timeout after its connect (not at once, and not at the keep-alive
    timeout, 15 s), and a normal client is served while they are held."""
    timeout = 3.0
    server = serve(header_timeout=str(timeout))
    await wait_ready(client, server.url)
    probes: list[Probe] = []
    for _ in range(PROBES // 50):  # in batches: the listen backlog is 128
        batch = [connect(server, HALF_SENT if n % 2 else b"") for n in range(50)]
        probes += await asyncio.gather(*batch)
    async with client.get(server.url + "/healthz") as response:
        assert response.status == 200
    assert await served(server) >= PROBES  # all still held while it was served
    closes = await asyncio.gather(*(probe.closed(timeout + 10) for probe in probes))
    assert {data for _, data in closes} == {b""}  # nothing sent: no response to half a request
    lifetimes = sorted(seconds for seconds, _ in closes)
    assert timeout - EARLY <= lifetimes[0] and lifetimes[-1] <= timeout + 5, lifetimes
    await served_becomes(server, lambda count: count == 0, 5)
    assert "a connection closed: request headers not complete in 3 s" in server.log()


@pytest.mark.slow
async def test_keep_alive_idles_keepalive_timeout_and_each_request_has_header_timeout(
    serve: Callable[..., ServeProcess], connect: Connect, client: aiohttp.ClientSession
) -> None:
    """Between requests a connection may idle keepalive_timeout (longer than header_timeout
    here), then it is closed; a request begun on it must have its headers in header_timeout."""
    header_timeout, keepalive = 1.0, 3.0
    server = serve(header_timeout=str(header_timeout), keepalive_timeout=str(keepalive))
    await wait_ready(client, server.url)

    async def idles_then_closed() -> None:
        probe = await connect(server, HEALTHZ)
        assert (await probe.response()).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(header_timeout + 0.5)  # idle past header_timeout: still open
        probe.writer.write(HEALTHZ)
        assert (await probe.response()).startswith(b"HTTP/1.1 200 ")
        probe.started = time.monotonic()
        seconds, data = await probe.closed(keepalive + 10)
        assert data == b"" and keepalive - EARLY <= seconds <= keepalive + 5, seconds

    async def stalls_mid_headers() -> None:
        probe = await connect(server, HEALTHZ)
        assert (await probe.response()).startswith(b"HTTP/1.1 200 ")
        await asyncio.sleep(0.2)
        probe.started = time.monotonic()
        probe.writer.write(HALF_SENT)
        seconds, data = await probe.closed(keepalive + 10)
        # Closed by the header timer from the request's first byte; the keep-alive timer
        # would have waited until 2.8 s after it.
        assert data == b"" and header_timeout - EARLY <= seconds < keepalive - 0.5, seconds

    await asyncio.gather(idles_then_closed(), stalls_mid_headers())


@pytest.mark.slow
async def test_long_poll_slow_body_and_websocket_outlast_both_timeouts(
    serve: Callable[..., ServeProcess], connect: Connect, client: aiohttp.ClientSession
) -> None:
    """Once a request's headers are in, neither timer applies: a websocket that idles, a long
    poll and a body that arrives slowly (but within body_timeout) all take 2.5 s, past both."""
    hold = 2.5
    server = serve(header_timeout="1", keepalive_timeout="1")
    await wait_ready(client, server.url)
    job = await submit(client, server.url, {"task": "long_job", "args": {"seconds": 30}})

    async def websocket() -> None:
        async with client.ws_connect(server.url + "/v1/ws") as ws:
            await asyncio.sleep(hold)
            await ws.send_str('{"op": "ping"}')
            assert orjson.loads((await ws.receive(timeout=5)).data)["type"] == "pong"

    async def long_poll() -> None:
        started = time.monotonic()
        url = f"{server.url}/v1/jobs/{job['id']}"
        async with client.get(url, params={"wait": str(hold)}) as response:
            assert response.status == 200 and (await response.json())["status"] == "running"
        assert time.monotonic() - started >= hold - EARLY

    async def slow_body() -> None:
        body = orjson.dumps({"task": "echo", "args": {"value": "x" * 100}})
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: {JSON['Content-Type']}"
        probe = await connect(server, f"{head}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        pieces = 6
        for n in range(pieces):
            await asyncio.sleep(hold / pieces)
            probe.writer.write(body[n * len(body) // pieces : (n + 1) * len(body) // pieces])
        assert (await probe.response()).startswith(b"HTTP/1.1 202 ")

    await asyncio.gather(websocket(), long_poll(), slow_body())


async def test_connections_over_max_connections_are_closed_on_accept(
    serve: Callable[..., ServeProcess], connect: Connect, client: aiohttp.ClientSession
) -> None:
    """At max_connections (a websocket among them) the next connection is closed at once,
    unanswered, and the open ones are unaffected; once one closes, a new one is served."""
    server = serve(max_connections="20", header_timeout="60")
    await wait_ready(client, server.url)
    async with client.ws_connect(server.url + "/v1/ws") as ws:
        held = [await connect(server) for _ in range(19)]
        await served_becomes(server, lambda count: count == 20, 5)
        over = await connect(server, HEALTHZ)
        seconds, data = await over.closed(5)
        assert data == b"" and seconds < 2
        await ws.send_str('{"op": "ping"}')
        assert orjson.loads((await ws.receive(timeout=5)).data)["type"] == "pong"
        await held.pop().close()
        await served_becomes(server, lambda count: count == 19, 5)
        async with client.get(server.url + "/healthz") as response:
            assert response.status == 200
    assert "connection closed on accept: http.max_connections (20) are open" in server.log()
    assert await asyncio.to_thread(server.stop) == 0  # SIGTERM: listener closed, then the rest


def test_the_soft_fd_limit_is_raised_to_the_hard_one(
    serve: Callable[..., ServeProcess],
) -> None:
    """The child gets a hard limit of its own, so that the test runs whatever this machine's is:
    lowering a hard limit needs no privilege."""
    hard = 1024
    server = serve(nofile=(256, hard))
    assert server.proc is not None
    assert psutil.Process(server.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (hard, hard)
    assert f"INFO    aioqueue.cli: open files limit: {hard} (raised from 256)" in server.log()


async def test_max_connections_is_lowered_to_fit_the_fd_limit(
    serve: Callable[..., ServeProcess], connect: Connect, client: aiohttp.ClientSession
) -> None:
    """The issue's 256-fd case, at 200: 4,096 connections cannot fit, so the cap is lowered to
    100 (half of a small limit stays for the broker and the store) and a WARNING says so; the
    101st connection is closed at once rather than the process running out of descriptors."""
    server = serve(nofile=(200, 200), header_timeout="60")
    assert (
        "WARNING aioqueue.cli: http.max_connections = 4096 is more than the open files limit"
        " (200) allows: at most 100 connections at once"
    ) in server.log()
    await wait_ready(client, server.url)
    for _ in range(2):
        await asyncio.gather(*(connect(server) for _ in range(50)))
    await served_becomes(server, lambda count: count == 100, 5)
    seconds, data = await (await connect(server, HEALTHZ)).closed(5)
    assert data == b"" and seconds < 2
    assert await asyncio.to_thread(server.stop) == 0  # SIGTERM with 100 connections held
