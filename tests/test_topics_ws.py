"""Topics in-process, on both brokers: publishing (HTTP, websocket, ctx, App), live delivery by
pattern, `since` catch-up with no gap and no duplicate under a publisher at full speed, expired
offsets, and bad input refused with nothing published."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from aioqueue import App, Context, Settings
from aioqueue.config import BrokerSettings, StoreSettings, TopicsSettings, WsSettings
from aioqueue.web.app import create_app
from aioqueue.web.problems import problem_middleware
from aioqueue.web.state import STATE
from tests.support import client_ready, eventually

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}
#: The smallest retention the config takes; a few hundred messages of 1 KB go past it.
SMALL_RETENTION = 65536


def make_app() -> App:
    app = App()

    @app.task
    async def announce(ctx: Context, album: int) -> int:
        return await ctx.publish(f"albums.{album}.ready", {"album": album, "job": ctx.job_id})

    @app.task(topic="albums.{album}.thumbnails")
    async def thumbnails(ctx: Context, album: int | str) -> None:
        await ctx.progress(0.5)

    @app.task
    def announce_sync(ctx: Context, album: int) -> int:
        return ctx.publish(f"albums.{album}.ready", {"album": album})  # type: ignore[return-value]

    return app


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], prefix: str, tmp_path: Path
) -> Callable[..., Awaitable[Client]]:
    async def start(broker_url: str, **topics: Any) -> Client:
        settings = Settings(
            broker=BrokerSettings(url=broker_url, prefix=prefix, confirm_timeout=3.0),
            ws=WsSettings(max_subscriptions=4, max_publishes_per_second=1000, send_buffer=256),
            topics=TopicsSettings(**{"max_message_bytes": 1024, **topics}),
            store=StoreSettings(dir=str(tmp_path)),
        )
        web_app = web.Application(middlewares=[problem_middleware])
        make_app().mount(web_app, settings)  # as create_app does, and App.publish works too
        client = await aiohttp_client(web_app)
        await client_ready(client)
        return client

    return start


@pytest.fixture
async def client(serve: Callable[..., Awaitable[Client]], broker_url: str) -> Client:
    return await serve(broker_url)


async def receive(ws: Any, deadline: float = 5.0) -> dict[str, Any]:
    message = await ws.receive(timeout=deadline)
    assert message.type is WSMsgType.TEXT, message
    return dict(orjson.loads(message.data))


async def post(client: Client, topic: str, data: Any) -> dict[str, Any]:
    response = await client.post(f"/v1/topics/{topic}", data=orjson.dumps(data), headers=JSON)
    assert response.status == 202, await response.text()
    return dict(await response.json())


async def subscribe(ws: Any, pattern: str, since: int | None = None) -> int:
    """Subscribe; the reply's `since`: the offset the messages follow."""
    frame: dict[str, Any] = {"op": "subscribe", "channel": f"topic:{pattern}"}
    if since is not None:
        frame["since"] = since
    await ws.send_json(frame)
    reply = await receive(ws)
    assert reply == {"type": "subscribed", "channel": f"topic:{pattern}", "since": reply["since"]}
    assert since is None or reply["since"] == since
    return int(reply["since"])


async def messages(ws: Any, count: int, deadline: float = 10.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(deadline):
        while len(got) < count:
            frame = await receive(ws, deadline)
            assert frame["type"] == "message", frame
            got.append(frame)
    return got


async def nothing_more(ws: Any, within: float = 0.3) -> None:
    with pytest.raises(TimeoutError):
        frame = await ws.receive(timeout=within)
        pytest.fail(f"unexpected frame {frame.data}")


async def test_a_published_message_reaches_the_patterns_that_match_it(client: Client) -> None:
    star, hash_all, other = [await client.ws_connect("/v1/ws") for _ in range(3)]
    await subscribe(star, "orders.*")
    await subscribe(hash_all, "#")
    await subscribe(other, "orders.eu.*")
    first = await post(client, "orders.eu", {"id": 1})
    second = await post(client, "orders.eu.paid", [1, 2])
    assert first["topic"] == "orders.eu" and second["offset"] > first["offset"]
    [got] = await messages(star, 1)
    assert got == {
        "type": "message",
        "channel": "topic:orders.*",
        "topic": "orders.eu",
        "offset": first["offset"],
        "data": {"id": 1},
    }
    assert [m["data"] for m in await messages(hash_all, 2)] == [{"id": 1}, [1, 2]]
    [paid] = await messages(other, 1)
    assert paid["topic"] == "orders.eu.paid" and paid["offset"] == second["offset"]
    for ws in (star, hash_all, other):
        await nothing_more(ws, 0.1)


async def test_publish_over_the_websocket_from_a_task_and_from_the_app(client: Client) -> None:
    ws = await client.ws_connect("/v1/ws")
    await subscribe(ws, "albums.#")
    await ws.send_json({"op": "publish", "topic": "albums.7.ready", "data": None, "id": 3})
    # The message may come before the reply: both are sent once the broker has it.
    got, published = sorted([await receive(ws), await receive(ws)], key=lambda f: f["type"])
    assert published["type"] == "published" and published["id"] == 3
    assert got["type"] == "message"
    assert got["offset"] == published["offset"] and got["data"] is None
    app = client.app[STATE].registry
    assert isinstance(app, App)
    offset = await app.publish("albums.8.ready", "from the app")
    assert (await messages(ws, 1))[0]["offset"] == offset > published["offset"]
    for task in ("announce", "announce_sync"):
        body = orjson.dumps({"task": task, "args": {"album": 9}})
        response = await client.post("/v1/jobs", data=body, headers=JSON)
        job = await response.json()
        assert response.status == 202, job
        job = await (await client.get(f"/v1/jobs/{job['id']}?wait=10")).json()
        assert job["status"] == "succeeded", job
        [got] = await messages(ws, 1)
        assert got["topic"] == "albums.9.ready" and got["offset"] == job["result"]


async def test_since_sends_the_retained_messages_then_live_ones(client: Client) -> None:
    offsets = [(await post(client, f"news.{i % 2}", i))["offset"] for i in range(10)]
    ws = await client.ws_connect("/v1/ws")
    await subscribe(ws, "news.0", since=offsets[3])
    caught_up = await messages(ws, 3)  # 4, 6, 8: the even ones after the fourth
    assert [m["data"] for m in caught_up] == [4, 6, 8]
    assert [m["offset"] for m in caught_up] == [offsets[4], offsets[6], offsets[8]]
    live = await post(client, "news.0", "live")
    [got] = await messages(ws, 1)
    assert got["offset"] == live["offset"] and got["data"] == "live"
    await nothing_more(ws)


async def test_a_live_subscription_says_after_which_offset_its_messages_come(
    client: Client,
) -> None:
    ws = await client.ws_connect("/v1/ws")
    last = (await post(client, "a", 0))["offset"]
    assert await subscribe(ws, "b.#") == last  # where a reconnect resumes without a gap
    await nothing_more(ws, 0.1)
    after = (await post(client, "b.c", 1))["offset"]
    assert [m["offset"] for m in await messages(ws, 1)] == [after]


async def test_since_from_the_start_and_from_the_newest(client: Client) -> None:
    offsets = [(await post(client, "a", i))["offset"] for i in range(3)]
    everything, newest = await client.ws_connect("/v1/ws"), await client.ws_connect("/v1/ws")
    await subscribe(everything, "a", since=-1)
    assert [m["data"] for m in await messages(everything, 3)] == [0, 1, 2]
    await subscribe(newest, "a", since=offsets[-1])
    await nothing_more(newest)
    after = await post(client, "a", 3)
    for ws in (everything, newest):
        assert [m["offset"] for m in await messages(ws, 1)] == [after["offset"]]


async def test_catch_up_under_a_publisher_at_full_speed_has_no_gap_and_no_duplicate(
    client: Client,
) -> None:
    """Subscribers join with `since` one after another while 20 publishers run flat out; each
    gets exactly the published offsets after its `since`, in order, up to the last one."""
    topics = client.app[STATE].topics()
    total, joins = 6000, 8
    published: list[int] = []

    async def publisher(n: int) -> None:
        while len(published) < total:
            published.append(await topics.publish(f"load.{n % 3}", n))

    async def read(ws: Any, got: list[int]) -> None:
        while True:
            got.extend(m["offset"] for m in await messages(ws, 1, deadline=30))

    publishers = [asyncio.create_task(publisher(n)) for n in range(20)]
    subscribers: list[tuple[int, list[int], asyncio.Task[None]]] = []
    async with asyncio.timeout(60):
        for join in range(1, joins + 1):
            await eventually(lambda: len(published) >= join * total // (joins + 2), 30)  # noqa: B023
            since = sorted(published)[len(published) // 2]  # half way back
            ws = await client.ws_connect("/v1/ws")
            await subscribe(ws, "load.*", since=since)
            got: list[int] = []
            subscribers.append((since, got, asyncio.create_task(read(ws, got))))
        assert len(published) < total, "the publishers were done before the last subscriber came"
        await asyncio.gather(*publishers)
        last = max(published)
        await eventually(lambda: all(got and got[-1] >= last for _, got, _ in subscribers), 30)
        await asyncio.sleep(0.1)  # for any duplicate
        for _, _, reader in subscribers:
            reader.cancel()
    for since, got, _ in subscribers:
        expected = sorted(offset for offset in published if offset > since)
        assert got == expected, (since, len(got), len(expected))


async def test_a_since_past_the_retention_says_so_and_goes_on_from_the_first_kept(
    serve: Callable[..., Awaitable[Client]], broker_url: str
) -> None:
    client = await serve(broker_url, retention_bytes=SMALL_RETENTION)
    blob = "x" * 1000
    first = (await post(client, "big", blob))["offset"]
    for _ in range(300):  # 300 KB: several times the retention
        last = (await post(client, "big", blob))["offset"]
    ws = await client.ws_connect("/v1/ws")
    deadline = time.monotonic() + 20
    while True:  # RabbitMQ applies retention when a segment fills up, not at once
        await subscribe(ws, "big", since=first)
        error = await receive(ws)
        if error["type"] == "error" or time.monotonic() > deadline:
            break
        await ws.send_json({"op": "unsubscribe", "channel": "topic:big"})
        while (await receive(ws))["type"] != "unsubscribed":
            pass
        await post(client, "big", blob)
    assert error["code"] == "offset_expired", error
    assert error["channel"] == "topic:big" and first + 1 < error["first"] <= last
    kept = await messages(ws, 1)
    assert kept[0]["offset"] == error["first"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/topics/orders..eu", b"1", 400),
        ("/v1/topics/orders.*", b"1", 400),
        ("/v1/topics/" + "a" * 256, b"1", 400),
        ("/v1/topics/orders", b"{", 400),
        ("/v1/topics/orders", b'"' + b"x" * 2000 + b'"', 413),
        ("/v1/topics/orders?x=1", b"1", 400),
    ],
)
async def test_a_bad_publish_gets_a_problem_and_publishes_nothing(
    client: Client, path: str, body: bytes, status: int
) -> None:
    ws = await client.ws_connect("/v1/ws")
    await subscribe(ws, "#")
    response = await client.post(path, data=body, headers=JSON)
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    await nothing_more(ws, 0.2)
    response = await client.post("/v1/topics/orders", data=b"1")
    assert response.status == 415


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"op": "publish", "topic": "a..b", "data": 1}, "bad_frame"),
        ({"op": "publish", "topic": 5, "data": 1}, "bad_frame"),
        ({"op": "publish", "topic": "a"}, "bad_frame"),
        ({"op": "publish", "topic": "a", "data": "x" * 2000}, "too_large"),
        ({"op": "subscribe", "channel": "topic:a.b*"}, "bad_frame"),
        ({"op": "subscribe", "channel": "topic:"}, "bad_frame"),
        ({"op": "subscribe", "channel": "topic:a", "since": "5"}, "bad_frame"),
        ({"op": "subscribe", "channel": "topic:a", "since": True}, "bad_frame"),
        ({"op": "subscribe", "channel": "topic:a", "since": -2}, "bad_frame"),
        ({"op": "subscribe", "channel": "job:x", "since": 1}, "bad_frame"),
        ({"op": "subscribe", "channel": "queue:a"}, "bad_frame"),
    ],
)
async def test_a_bad_topic_frame_gets_an_error_and_changes_nothing(
    client: Client, frame: dict[str, Any], code: str
) -> None:
    ws = await client.ws_connect("/v1/ws")
    await subscribe(ws, "#")
    await ws.send_json({**frame, "id": "x"})
    error = await receive(ws)
    assert error["type"] == "error" and error["code"] == code and error["id"] == "x", error
    await nothing_more(ws, 0.2)
    await ws.send_json({"op": "ping"})
    assert await receive(ws) == {"type": "pong"}


async def test_unsubscribe_stops_messages_and_topic_channels_count_toward_the_limit(
    client: Client,
) -> None:
    ws = await client.ws_connect("/v1/ws")
    for pattern in ("a", "b", "c", "d"):
        await subscribe(ws, pattern)
    await ws.send_json({"op": "subscribe", "channel": "topic:e"})
    assert (await receive(ws))["code"] == "too_many_subscriptions"
    await ws.send_json({"op": "unsubscribe", "channel": "topic:a"})
    assert (await receive(ws))["type"] == "unsubscribed"
    await post(client, "a", 1)
    await nothing_more(ws)
    await subscribe(ws, "e")
    hub = client.app[STATE].hub.topics
    await ws.close()
    await eventually(lambda: not hub.channels, 5)  # a closed connection's subscriptions go


async def test_publishes_per_connection_are_rate_limited(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], tmp_path: Path
) -> None:
    settings = Settings(ws=WsSettings(max_publishes_per_second=5))
    client = await aiohttp_client(create_app(make_app(), settings))
    await eventually(lambda: client.app[STATE].service is not None, 5)
    await eventually(lambda: client.app[STATE].service.problem() is None, 30)  # type: ignore[union-attr]
    ws, other = await client.ws_connect("/v1/ws"), await client.ws_connect("/v1/ws")
    await subscribe(other, "#")
    for i in range(6):
        await ws.send_json({"op": "publish", "topic": "t", "data": i})
    replies = [await receive(ws) for _ in range(6)]
    assert [r["type"] for r in replies] == ["published"] * 5 + ["error"]
    assert replies[-1]["code"] == "rate_limited" and 0 < replies[-1]["retry_after"] <= 0.2
    assert [m["data"] for m in await messages(other, 5)] == [0, 1, 2, 3, 4]
    await nothing_more(other, 0.1)
    await asyncio.sleep(replies[-1]["retry_after"])
    await ws.send_json({"op": "publish", "topic": "t", "data": 5})
    assert (await receive(ws))["type"] == "published"


async def test_catch_ups_beyond_the_limit_wait_for_their_turn(
    serve: Callable[..., Awaitable[Client]],
) -> None:
    """topics.max_catch_ups = 2: six clients catching up at once are served two at a time (a
    read of the log is open for at most two), and each gets everything."""
    client = await serve("memory://", max_catch_ups=2)
    topics = client.app[STATE].topics()
    blob = "x" * 900  # 2.7 MB for each client: more than its socket takes at once
    offsets = [await topics.publish("bulk", blob) for _ in range(3000)]
    reading, most = 0, 0
    read = topics.log.read

    async def counted(after: int) -> AsyncGenerator[Any, None]:
        nonlocal reading, most
        reading += 1
        most = max(most, reading)
        try:
            async for entry in read(after):
                yield entry
        finally:
            reading -= 1

    topics.log.read = counted  # type: ignore[method-assign]
    clients = [await client.ws_connect("/v1/ws") for _ in range(6)]
    for ws in clients:
        await subscribe(ws, "bulk", since=-1)
    got = await asyncio.gather(*(messages(ws, len(offsets), deadline=30) for ws in clients))
    assert all([m["offset"] for m in each] == offsets for each in got)
    assert most == 2


async def test_a_client_that_does_not_read_gives_its_catch_up_slot_back(
    serve: Callable[..., Awaitable[Client]],
) -> None:
    """topics.max_catch_ups = 1, taken by a client that stops reading: the next client's
    catch-up runs all the same, once the first has had no room for HOLD_ROOM seconds."""
    client = await serve("memory://", max_catch_ups=1)
    topics = client.app[STATE].topics()
    blob = "x" * 900
    offsets = [await topics.publish("bulk", blob) for _ in range(3000)]  # megabytes to send
    stuck = await client.ws_connect("/v1/ws")
    await subscribe(stuck, "bulk", since=-1)  # and never read: its catch-up runs out of room
    await asyncio.sleep(0.3)
    waiting = await client.ws_connect("/v1/ws")
    await subscribe(waiting, "bulk", since=offsets[-4])
    assert [m["offset"] for m in await messages(waiting, 3, deadline=2)] == offsets[-3:]
    await stuck.close()


async def test_a_catch_up_across_stream_segments_reports_nothing_lost(
    serve: Callable[..., Awaitable[Client]], broker_url: str
) -> None:
    """A RabbitMQ stream skips an offset at each segment boundary: that is no lost message,
    and a catch-up across several boundaries says nothing of the kind."""
    client = await serve(broker_url, retention_bytes=4 * 2**20, max_message_bytes=2048)
    topics = client.app[STATE].topics()
    blob = "x" * 900
    offsets = []
    for _ in range(12):  # 2.2 MB: four segments of 512 KB
        offsets += await asyncio.gather(*(topics.publish("seg", [n, blob]) for n in range(200)))
    offsets.sort()
    ws = await client.ws_connect("/v1/ws")
    await subscribe(ws, "seg", since=offsets[0])
    got = await messages(ws, len(offsets) - 1, deadline=30)  # fails on an error frame
    assert [m["offset"] for m in got] == offsets[1:]
    # From right before each boundary: the read begins past the skipped offset.
    boundaries = [i for i in range(len(offsets) - 1) if offsets[i + 1] != offsets[i] + 1]
    assert len(boundaries) >= (3 if broker_url.startswith("amqp") else 0)
    for i in boundaries:
        await subscribe(ws, "seg", since=offsets[i])
        assert [m["offset"] for m in await messages(ws, 1)] == [offsets[i + 1]]
        await messages(ws, len(offsets) - i - 2, deadline=30)
    await nothing_more(ws)
