"""G5: websocket clients that never read cannot grow the server's memory; they are disconnected.

200 raw-socket clients (handshake, one subscribe frame, then never a read, with a 4 KiB receive
buffer) follow jobs that report progress every 10 ms for 30 s, beside one client that reads.
Disconnected means released: the served process's file descriptors and ESTABLISHED sockets
return to their level before the clients came, while the clients still hold their ends.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from aioqueue.web.connection import CLOSE_TIMEOUT, SEND_TIMEOUT
from tests.support import JSON, ServeProcess, submit, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SLOW_CLIENTS, JOBS, SECONDS = 200, 10, 30.0
#: The ceiling stated in the README: RSS may grow at most this much over its idle value.
RSS_GROWTH_LIMIT = 100 * 2**20
#: Seconds after a slow client's close is due for its socket to be gone from the served process.
RELEASE_DEADLINE = 20.0
#: Descriptors and sockets over the level before the test that still count as that level: the
#: client that reads, and a keep-alive HTTP connection, may be open or not when we look.
SLACK = 4


def masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def slow_client(host: str, port: int, channel: str) -> socket.socket:
    """Handshake and subscribe, then never read again."""
    sock = await raw_websocket(host, port)
    subscribe = orjson.dumps({"op": "subscribe", "channel": channel})
    await asyncio.get_running_loop().sock_sendall(sock, masked_text_frame(subscribe))
    return sock


async def raw_websocket(host: str, port: int) -> socket.socket:
    """A websocket handshake on a plain socket with a 4 KiB receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await loop.sock_recv(sock, 1024)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Read what is buffered: True if the server closed the connection (EOF or reset)."""
    sock.setblocking(True)
    sock.settimeout(2.0)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def open_sockets(process: psutil.Process) -> tuple[int, int]:
    """The process's open file descriptors, and its TCP sockets in state ESTABLISHED."""
    connections = process.net_connections(kind="tcp")
    established = sum(1 for conn in connections if conn.status == psutil.CONN_ESTABLISHED)
    return process.num_fds(), established


async def wait_released(
    process: psutil.Process, level: tuple[int, int], deadline: float
) -> tuple[float, tuple[int, int]]:
    """Poll until fds and ESTABLISHED sockets are back within SLACK of `level`, or the
    deadline (monotonic) passes; the time it happened and the last count."""
    while True:
        now = time.monotonic()
        count = await asyncio.to_thread(open_sockets, process)
        if all(n <= base + SLACK for n, base in zip(count, level, strict=True)) or now > deadline:
            return now, count
        await asyncio.sleep(0.5)


@pytest.fixture
def server(tmp_path: Path, prefix: str) -> Iterator[ServeProcess]:
    process = ServeProcess("memory://", prefix).start(tmp_path)
    yield process
    process.kill()


async def test_slow_clients_are_disconnected_and_memory_stays_bounded(
    server: ServeProcess, http: aiohttp.ClientSession
) -> None:
    await wait_ready(http, server.url)
    assert server.proc is not None
    process = psutil.Process(server.proc.pid)
    idle_rss = process.memory_info().rss
    jobs = [
        await submit(http, server.url, {"task": "chatter", "args": {"seconds": SECONDS}})
        for _ in range(JOBS)
    ]
    host, port = server.url.removeprefix("http://").split(":")
    before = open_sockets(process)
    sockets = [
        await slow_client(host, int(port), f"job:{jobs[n % JOBS]['id']}")
        for n in range(SLOW_CLIENTS)
    ]
    during = open_sockets(process)
    # The last client subscribed just now: its close is due once a frame waited SEND_TIMEOUT
    # and the close handshake had its CLOSE_TIMEOUT.
    close_due = time.monotonic() + SEND_TIMEOUT + CLOSE_TIMEOUT
    released = asyncio.create_task(wait_released(process, before, close_due + RELEASE_DEADLINE))
    gaps: list[float] = []
    peak = idle_rss
    async with http.ws_connect(server.url + "/v1/ws") as fast:
        await fast.send_str(
            orjson.dumps({"op": "subscribe", "channel": f"job:{jobs[0]['id']}"}).decode()
        )
        last = time.monotonic()
        end = last + SECONDS - 2
        while time.monotonic() < end:
            frame = orjson.loads((await fast.receive(timeout=5)).data)
            now = time.monotonic()
            if frame.get("event") == "progress":
                gaps.append(now - last)
                last = now
            if len(gaps) % 50 == 0:
                peak = max(peak, process.memory_info().rss)
    # Counted before the clients read or close anything: their ends are all still open.
    released_at, after = await released
    closed = sum(await asyncio.gather(*(asyncio.to_thread(closed_by_server, s) for s in sockets)))
    for sock in sockets:
        sock.close()
    growth = peak - idle_rss
    p99 = statistics.quantiles(gaps, n=100)[98]
    print(
        f"\nslow clients {SLOW_CLIENTS}: disconnected {closed}; RSS idle {idle_rss / 2**20:.0f} MiB, "
        f"peak {peak / 2**20:.0f} MiB (+{growth / 2**20:.0f}); fast client p99 gap {1000 * p99:.0f} ms"
        f"\nserved process fds/ESTABLISHED: before {before[0]}/{before[1]}, "
        f"with the clients {during[0]}/{during[1]}, "
        f"{released_at - close_due:+.1f} s after their close was due {after[0]}/{after[1]}"
    )
    assert during[1] >= before[1] + SLOW_CLIENTS  # the count sees the clients at all
    assert after[0] <= before[0] + SLACK and after[1] <= before[1] + SLACK
    assert growth < RSS_GROWTH_LIMIT
    assert closed == SLOW_CLIENTS
    assert p99 < 0.1


async def test_a_client_that_sends_but_never_reads_is_still_closed(
    server: ServeProcess, http: aiohttp.ClientSession
) -> None:
    """The server stops reading a client's frames while their replies are queued; that must not
    spare a client that never reads: 4 MB of pings with nothing read is closed all the same."""
    await wait_ready(http, server.url)
    host, port = server.url.removeprefix("http://").split(":")
    sock = await raw_websocket(host, int(port))
    ping = masked_text_frame(b'{"op": "ping"}')
    loop = asyncio.get_running_loop()
    # May stall once the server stops reading, and fails when the server resets the connection.
    sending = asyncio.create_task(loop.sock_sendall(sock, ping * 200_000))
    try:
        deadline = time.monotonic() + SEND_TIMEOUT + 10
        while not re.search(r"websocket client (has not read|too slow).*: closing", server.log()):
            assert time.monotonic() < deadline, "the client that does not read is still served"
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(closed_by_server, sock)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        sock.close()


async def test_topic_subscribers_that_do_not_read_are_closed_and_a_reader_gets_every_message(
    server: ServeProcess, http: aiohttp.ClientSession
) -> None:
    """Topic messages are never coalesced: 50 live subscribers and 50 catching up (`since`)
    that never read are closed and their sockets released, while a client that reads gets
    every message once, in order."""
    await wait_ready(http, server.url)
    # Ten connections at most: the socket counts must not hinge on keep-alive connections.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=10)) as publisher:
        await slow_topic_clients_beside_a_reader(server, http, publisher)


async def slow_topic_clients_beside_a_reader(
    server: ServeProcess, http: aiohttp.ClientSession, publisher: aiohttp.ClientSession
) -> None:
    assert server.proc is not None
    process = psutil.Process(server.proc.pid)
    host, port = server.url.removeprefix("http://").split(":")
    published: list[int] = []

    async def publish(n: int) -> None:
        body = orjson.dumps({"n": n, "pad": "x" * 500})
        url = f"{server.url}/v1/topics/feed.{n % 3}"
        async with publisher.post(url, data=body, headers=JSON) as r:
            assert r.status == 202, await r.text()
            published.append((await r.json())["offset"])

    for batch in range(20):  # 2,000 retained messages, 1 MB, for the ones catching up
        await asyncio.gather(*(publish(batch * 100 + n) for n in range(100)))
    before = open_sockets(process)
    live = [await slow_client(host, int(port), "topic:feed.#") for _ in range(50)]
    catching_up = [await slow_topic_client(host, int(port), "topic:#", since=-1) for _ in range(50)]
    during = open_sockets(process)
    close_due = time.monotonic() + SEND_TIMEOUT + CLOSE_TIMEOUT
    released = asyncio.create_task(wait_released(process, before, close_due + RELEASE_DEADLINE))
    got: list[int] = []
    async with http.ws_connect(server.url + "/v1/ws") as reader:
        await reader.send_json({"op": "subscribe", "channel": "topic:feed.*", "since": -1})
        end = time.monotonic() + SEND_TIMEOUT + 3
        n = len(published)
        while time.monotonic() < end:  # a publisher, beside the clients
            await asyncio.gather(*(publish(n + k) for k in range(20)))
            n += 20
            while len(got) < len(published) - 200:
                frame = await reader.receive_json(timeout=5)
                if frame["type"] == "message":
                    got.append(frame["offset"])
        while len(got) < len(published):
            frame = await reader.receive_json(timeout=5)
            if frame["type"] == "message":
                got.append(frame["offset"])
    released_at, after = await released
    sockets = live + catching_up
    closed = sum(await asyncio.gather(*(asyncio.to_thread(closed_by_server, s) for s in sockets)))
    for sock in sockets:
        sock.close()
    print(
        f"\n{len(published)} topic messages; slow topic clients closed {closed} of {len(sockets)};"
        f" fds/ESTABLISHED before {before}, {released_at - close_due:+.1f} s after due {after}"
    )
    assert got == sorted(published)
    assert during[1] >= before[1] + len(sockets)  # the count sees the clients at all
    assert closed == len(sockets)
    assert after[0] <= before[0] + SLACK and after[1] <= before[1] + SLACK


async def slow_topic_client(host: str, port: int, channel: str, since: int) -> socket.socket:
    sock = await raw_websocket(host, port)
    frame = orjson.dumps({"op": "subscribe", "channel": channel, "since": since})
    await asyncio.get_running_loop().sock_sendall(sock, masked_text_frame(frame))
    return sock
