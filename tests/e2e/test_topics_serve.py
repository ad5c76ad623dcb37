"""End to end, topics across processes and restarts: the real `aioqueue serve` processes on one
RabbitMQ, real HTTP and websocket clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support import JSON, ServeProcess, wait_ready

pytestmark = [pytest.mark.amqp, pytest.mark.timeout(120)]


@pytest.fixture
def started(amqp_url: str, prefix: str, tmp_path: Path) -> Iterator[list[ServeProcess]]:
    processes: list[ServeProcess] = []
    yield processes
    for process in processes:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()


async def serve(
    started: list[ServeProcess], amqp_url: str, prefix: str, tmp_path: Path, http: Any
) -> ServeProcess:
    process = ServeProcess(amqp_url, prefix).start(tmp_path)
    started.append(process)
    await wait_ready(http, process.url)
    return process


async def publish(http: aiohttp.ClientSession, url: str, topic: str, data: Any) -> int:
    async with http.post(f"{url}/v1/topics/{topic}", data=orjson.dumps(data), headers=JSON) as r:
        assert r.status == 202, await r.text()
        return int((await r.json())["offset"])


async def follow(ws: aiohttp.ClientWebSocketResponse, pattern: str, since: int | None) -> None:
    frame: dict[str, Any] = {"op": "subscribe", "channel": f"topic:{pattern}"}
    if since is not None:
        frame["since"] = since
    await ws.send_json(frame)
    assert (await ws.receive_json(timeout=10))["type"] == "subscribed"


async def offsets(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[int]:
    got = []
    for _ in range(count):
        frame = await ws.receive_json(timeout=10)
        assert frame["type"] == "message", frame
        got.append(frame["offset"])
    return got


async def test_a_message_published_on_one_process_reaches_subscribers_on_the_other(
    started: list[ServeProcess],
    amqp_url: str,
    prefix: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    a = await serve(started, amqp_url, prefix, tmp_path, http)
    b = await serve(started, amqp_url, prefix, tmp_path, http)
    async with http.ws_connect(b.url + "/v1/ws") as on_b, http.ws_connect(a.url + "/v1/ws") as on_a:
        await follow(on_b, "orders.#", None)
        await follow(on_a, "orders.#", None)
        from_a = await publish(http, a.url, "orders.eu", {"n": 1})
        await on_b.send_json({"op": "publish", "topic": "orders.us", "data": {"n": 2}})
        # The reply and the two messages, in whichever order they come.
        frames = [await on_b.receive_json(timeout=10) for _ in range(3)]
        [from_b] = [f["offset"] for f in frames if f["type"] == "published"]
        got_b = [f["offset"] for f in frames if f["type"] == "message"]
        assert got_b == await offsets(on_a, 2) == sorted([from_a, from_b])


async def test_a_client_resuming_with_its_offset_after_restarts_misses_nothing_and_gets_nothing_twice(
    started: list[ServeProcess],
    amqp_url: str,
    prefix: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """The client follows B. B restarts while A publishes; then every process restarts. Each
    time the client reconnects with the offset of the last message it got."""
    a = await serve(started, amqp_url, prefix, tmp_path, http)
    b = await serve(started, amqp_url, prefix, tmp_path, http)
    published = [await publish(http, a.url, "news", n) for n in range(3)]
    async with http.ws_connect(b.url + "/v1/ws") as ws:
        await follow(ws, "news", -1)
        got = await offsets(ws, 3)
    b.stop()
    published += [await publish(http, a.url, "news", n) for n in range(3, 6)]  # B is down
    b = await serve(started, amqp_url, prefix, tmp_path, http)
    async with http.ws_connect(b.url + "/v1/ws") as ws:
        await follow(ws, "news", got[-1])
        got += await offsets(ws, 3)
        published.append(await publish(http, b.url, "news", 6))  # live, after the catch-up
        got += await offsets(ws, 1)
    a.stop()
    b.stop()
    c = await serve(started, amqp_url, prefix, tmp_path, http)  # every process restarted
    published.append(await publish(http, c.url, "news", 7))
    async with http.ws_connect(c.url + "/v1/ws") as ws:
        await follow(ws, "news", got[-1])
        got += await offsets(ws, 1)
        with pytest.raises(TimeoutError):
            await ws.receive_json(timeout=0.5)
    assert got == published and len(set(got)) == 8


async def test_each_job_event_reaches_the_task_topic_once_whichever_process_records_it(
    started: list[ServeProcess],
    amqp_url: str,
    prefix: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Ten jobs submitted to A run on A or B; a subscriber on each process gets each event of
    each job once: the process that recorded it published it, the other did not."""
    a = await serve(started, amqp_url, prefix, tmp_path, http)
    b = await serve(started, amqp_url, prefix, tmp_path, http)
    async with http.ws_connect(a.url + "/v1/ws") as on_a, http.ws_connect(b.url + "/v1/ws") as on_b:
        for ws in (on_a, on_b):
            await follow(ws, "albums.#", None)
        ids = []
        for album in range(10):
            body = orjson.dumps({"task": "thumbnails", "args": {"album": album}})
            async with http.post(a.url + "/v1/jobs", data=body, headers=JSON) as response:
                ids.append((await response.json())["id"])
        expected = sorted(
            (i, e) for i in ids for e in ("queued", "started", "progress", "succeeded")
        )
        for ws in (on_a, on_b):
            got = []
            for _ in expected:
                frame = await ws.receive_json(timeout=10)
                got.append((frame["data"]["job"]["id"], frame["data"]["event"]))
            assert sorted(got) == expected
            with pytest.raises(TimeoutError):
                await ws.receive_json(timeout=0.5)
