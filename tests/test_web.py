"""The HTTP API and websocket protocol in-process: answers and bad input.

What goes through the job path (submit, get, list, cancel, retry, subscribe) runs on both brokers
(`job_client`); input refused before it reaches a broker runs on memory:// only (`client`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from aioqueue import App, Context, Settings
from aioqueue.config import BrokerSettings, HttpSettings, JobsSettings, StoreSettings, WsSettings
from aioqueue.web import ws as ws_module
from aioqueue.web.app import create_app
from aioqueue.web.state import STATE

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}


def make_app() -> App:
    app = App()

    @app.task
    async def add(a: int, b: int = 0) -> int:
        return a + b

    @app.task(timeout=10)
    async def ticker(ctx: Context, steps: int = 3, interval: float = 0.02) -> str:
        for step in range(1, steps + 1):
            await asyncio.sleep(interval)
            await ctx.progress(step / steps, f"step {step}")
        return "done"

    @app.task(max_attempts=2, retry_backoff=0.0)
    async def broken() -> None:
        raise ValueError("nope")

    @app.task(max_attempts=1)
    async def shout(text: str) -> None:
        raise ValueError(text)

    return app


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], prefix: str, tmp_path: Path
) -> Callable[[str], Awaitable[Client]]:
    """A factory: the app served on a broker, once /readyz says so."""

    async def start(broker_url: str) -> Client:
        settings = Settings(
            broker=BrokerSettings(url=broker_url, prefix=prefix, confirm_timeout=3.0),
            jobs=JobsSettings(shutdown_grace=0.2, max_args_bytes=1024, max_error_bytes=256),
            http=HttpSettings(max_body_bytes=4096, body_timeout=0.5),
            ws=WsSettings(
                max_subscriptions=3, max_frame_bytes=2048, allowed_origins=("https://app.example",)
            ),
            store=StoreSettings(dir=str(tmp_path)),
        )
        test_client = await aiohttp_client(create_app(make_app(), settings))
        deadline = time.monotonic() + 30
        while (await test_client.get("/readyz")).status != 200:
            assert time.monotonic() < deadline, "not ready in time"
            await asyncio.sleep(0.01)
        return test_client

    return start


@pytest.fixture
async def client(serve: Callable[[str], Awaitable[Client]]) -> Client:
    """The app on memory://: for input that is answered before it reaches a broker."""
    return await serve("memory://")


@pytest.fixture
async def job_client(serve: Callable[[str], Awaitable[Client]], broker_url: str) -> Client:
    """The app on each broker in turn: for what goes through the job path."""
    return await serve(broker_url)


def job_count(client: Client) -> int:
    service = client.app[STATE].service
    assert service is not None
    return len(service.store)


async def submit(client: Client, body: Any) -> dict[str, Any]:
    response = await client.post("/v1/jobs", data=orjson.dumps(body), headers=JSON)
    assert response.status == 202, await response.text()
    return dict(await response.json())


async def test_submit_then_long_poll_until_succeeded(job_client: Client) -> None:
    job = await submit(job_client, {"task": "add", "args": {"a": 2, "b": 3}})
    assert job["status"] == "queued" and len(job["id"]) >= 21
    response = await job_client.get(f"/v1/jobs/{job['id']}", params={"wait": "5"})
    record = await response.json()
    assert (response.status, record["status"], record["result"]) == (200, "succeeded", 5)


async def test_wait_returns_after_its_time_when_the_job_is_not_done(job_client: Client) -> None:
    job = await submit(job_client, {"task": "ticker", "args": {"steps": 50, "interval": 0.1}})
    started = time.monotonic()
    response = await job_client.get(f"/v1/jobs/{job['id']}", params={"wait": "0.3"})
    assert response.status == 200 and (await response.json())["status"] != "succeeded"
    assert 0.25 < time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        pytest.param(b"{", JSON, 400, "body", id="bad-json"),
        pytest.param(b"", JSON, 400, "body", id="empty"),
        pytest.param(b'{"task": "add", "args": [1]}', {"Content-Type": "text/plain"}, 415, None, id="text"),
        pytest.param(b'{"task": "add"}', {}, 415, None, id="no-content-type"),
        pytest.param(b"[1]", JSON, 400, "body", id="array"),
        pytest.param(b'{"args": [1]}', JSON, 400, "task", id="no-task"),
        pytest.param(b'{"task": "nope"}', JSON, 404, None, id="unknown-task"),
        pytest.param(b'{"task": "add", "args": {"a": true}}', JSON, 400, "args.a", id="bool-for-int"),
        pytest.param(b'{"task": "add", "args": {"a": 1.0}}', JSON, 400, "args.a", id="float-for-int"),
        pytest.param(b'{"task": "add", "args": {}}', JSON, 400, "args.a", id="missing-arg"),
        pytest.param(b'{"task": "add", "args": {"a": 1, "z": 1}}', JSON, 400, "args.z", id="unknown-arg"),
        pytest.param(b'{"task": "add", "args": [1], "max_attempts": 0}', JSON, 400, "max_attempts", id="attempts"),
        pytest.param(b'{"task": "add", "args": [1], "run_at": "2030-01-01T00:00:00"}', JSON, 400, "run_at", id="run-at-no-zone"),
        pytest.param(b'{"task": "add", "args": [1], "ttl": "1h"}', JSON, 400, "ttl", id="ttl-string"),
        pytest.param(b'{"a": "\xff"}', JSON, 400, "body", id="invalid-utf8"),
        pytest.param(b'{"a": "\\ud800"}', JSON, 400, "body", id="lone-surrogate"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, JSON, 413, None, id="deep-and-too-large"),
        pytest.param(b"[" * 1000 + b"]" * 1000, JSON, 400, "body", id="deep-nesting"),
        pytest.param(b'{"task": "add", "args": [1], "pad": "' + b"x" * 5000 + b'"}', JSON, 413, None, id="too-large"),
    ],
)  # fmt: skip
async def test_a_bad_submit_gets_a_precise_problem_and_changes_nothing(
    client: Client, body: bytes, headers: dict[str, str], status: int, field: str | None
) -> None:
    response = await client.post("/v1/jobs", data=body, headers=headers)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    problem = await response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert "Traceback" not in await response.text()
    if field is not None:
        assert field in [error["field"] for error in problem["errors"]]
    assert job_count(client) == 0


async def test_every_bad_field_is_reported_at_once(client: Client) -> None:
    body = {"task": "add", "args": {"a": "x", "b": None}, "timeout": 0}
    response = await client.post("/v1/jobs", data=orjson.dumps(body), headers=JSON)
    fields = sorted(error["field"] for error in (await response.json())["errors"])
    assert (response.status, fields) == (400, ["args.a", "args.b", "timeout"])


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/v1/jobs/unknown", 404, id="unknown-job"),
        pytest.param("/v1/jobs/x?wait=abc", 400, id="wait-not-a-number"),
        pytest.param("/v1/jobs/x?wait=-1", 400, id="wait-negative"),
        pytest.param("/v1/jobs/x?wait=1_0", 400, id="wait-underscore"),
        pytest.param("/v1/jobs/x?wait=\u0661", 400, id="wait-arabic-indic-digit"),
        pytest.param("/v1/jobs?limit=0", 400, id="limit-0"),
        pytest.param("/v1/jobs?limit=1001", 400, id="limit-too-big"),
        pytest.param("/v1/jobs?limit=x", 400, id="limit-nan"),
        pytest.param("/v1/jobs?status=done", 400, id="unknown-status"),
        pytest.param("/v1/jobs?cursor=!!", 400, id="bad-cursor"),
        pytest.param("/v1/jobs?colour=red", 400, id="unknown-param"),
        pytest.param("/v1/nothing", 404, id="unknown-route"),
    ],
)
async def test_bad_queries_get_problems(client: Client, path: str, status: int) -> None:
    response = await client.get(path)
    assert (response.status, response.content_type) == (status, "application/problem+json")


async def test_wrong_method_is_a_405_problem(client: Client) -> None:
    response = await client.put("/v1/jobs")
    assert (response.status, response.content_type) == (405, "application/problem+json")


async def test_list_is_newest_first_filtered_and_paged(job_client: Client) -> None:
    ids = [(await submit(job_client, {"task": "add", "args": [n]}))["id"] for n in range(5)]
    failed = await submit(job_client, {"task": "broken"})
    await job_client.get(f"/v1/jobs/{failed['id']}", params={"wait": "5"})
    for job_id in ids:
        await job_client.get(f"/v1/jobs/{job_id}", params={"wait": "5"})
    page = await (await job_client.get("/v1/jobs", params={"task": "add", "limit": "3"})).json()
    assert [job["id"] for job in page["jobs"]] == ids[::-1][:3]
    rest = await (
        await job_client.get("/v1/jobs", params={"task": "add", "cursor": page["next"]})
    ).json()
    assert [job["id"] for job in rest["jobs"]] == ids[::-1][3:] and rest["next"] is None
    dead = await (await job_client.get("/v1/jobs", params={"status": "failed,dead"})).json()
    assert [job["id"] for job in dead["jobs"]] == [failed["id"]]


async def test_tasks_are_described(client: Client) -> None:
    tasks = {task["name"]: task for task in (await (await client.get("/v1/tasks")).json())["tasks"]}
    assert tasks["add"] == {
        "name": "add",
        "queue": "default",
        "params": [
            {"name": "a", "type": "int", "required": True, "default": None},
            {"name": "b", "type": "int", "required": False, "default": 0},
        ],
        "max_attempts": 3,
        "timeout": 300.0,
    }


async def test_health_and_readiness(job_client: Client) -> None:
    assert (await job_client.get("/healthz")).status == 200
    assert await (await job_client.get("/readyz")).json() == {"status": "ready", "stuck_threads": 0}


# Websocket ----------------------------------------------------------------------------------


async def receive(ws: Any, deadline: float = 5.0) -> dict[str, Any]:
    message = await ws.receive(timeout=deadline)
    assert message.type is WSMsgType.TEXT, message
    return dict(orjson.loads(message.data))


async def test_subscribe_gets_a_snapshot_then_every_event(job_client: Client) -> None:
    async with job_client.ws_connect("/v1/ws") as ws:
        await ws.send_str(
            '{"op": "submit", "id": 7, "job": {"task": "ticker", "args": {"interval": 0.1}}}'
        )
        submitted = await receive(ws)
        assert (submitted["type"], submitted["id"]) == ("submitted", 7)
        channel = f"job:{submitted['job']['id']}"
        await ws.send_str(orjson.dumps({"op": "subscribe", "channel": channel}).decode())
        assert await receive(ws) == {"type": "subscribed", "channel": channel}
        events: list[str] = []
        while not events or events[-1] != "succeeded":
            frame = await receive(ws)
            assert frame["type"] == "job" and frame["channel"] == channel
            events.append(frame["event"])
        assert events[0] == "snapshot" and events[-1] == "succeeded"
        assert "progress" in events
        assert frame["job"]["result"] == "done"


async def test_subscribing_after_the_end_still_gets_the_result(job_client: Client) -> None:
    job = await submit(job_client, {"task": "add", "args": [40, 2]})
    await job_client.get(f"/v1/jobs/{job['id']}", params={"wait": "5"})
    async with job_client.ws_connect("/v1/ws") as ws:
        await ws.send_str(orjson.dumps({"op": "subscribe", "channel": f"job:{job['id']}"}).decode())
        await receive(ws)
        snapshot = await receive(ws)
        assert (snapshot["event"], snapshot["job"]["result"]) == ("snapshot", 42)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param("not json", "bad_frame", id="not-json"),
        pytest.param("[1]", "bad_frame", id="not-object"),
        pytest.param('{"op": "dance"}', "unknown_op", id="unknown-op"),
        pytest.param('{"no": "op"}', "unknown_op", id="no-op"),
        pytest.param('{"op": "subscribe"}', "bad_frame", id="no-channel"),
        pytest.param('{"op": "subscribe", "channel": "job:nope"}', "not_found", id="unknown-job"),
        pytest.param('{"op": "subscribe", "channel": "room:1"}', "bad_frame", id="unknown-channel"),
        pytest.param('{"op": "submit", "job": {"task": "add", "args": {"a": "x"}}}', "invalid_job", id="bad-job"),
        pytest.param('{"op": "submit", "job": {"task": "nope"}}', "not_found", id="unknown-task"),
        pytest.param('{"op": "submit", "job": 5}', "invalid_job", id="job-not-object"),
        pytest.param("[" * 100 + "]" * 100, "bad_frame", id="deep-nesting"),
        pytest.param('{"a": "\\ud800"}', "bad_frame", id="lone-surrogate"),
    ],
)  # fmt: skip
async def test_a_bad_frame_gets_an_error_and_the_connection_stays(
    client: Client, frame: str, code: str
) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_str(frame)
        error = await receive(ws)
        assert (error["type"], error["code"]) == ("error", code) and error["message"]
        await ws.send_str('{"op": "ping", "id": "p"}')
        assert await receive(ws) == {"type": "pong", "id": "p"}
    assert job_count(client) == 0


async def test_binary_frames_are_refused(client: Client) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_bytes(b'{"op": "ping"}')
        assert (await receive(ws))["code"] == "bad_frame"


async def test_too_many_subscriptions(job_client: Client) -> None:
    ids = [(await submit(job_client, {"task": "add", "args": [n]}))["id"] for n in range(4)]
    async with job_client.ws_connect("/v1/ws") as ws:
        for job_id in ids:
            await ws.send_str(
                orjson.dumps({"op": "subscribe", "channel": f"job:{job_id}"}).decode()
            )
        frames = [await receive(ws) for _ in range(7)]
        assert [f["type"] for f in frames].count("subscribed") == 3
        assert frames[-1]["code"] == "too_many_subscriptions"


async def test_a_frame_over_the_limit_closes_with_1009(client: Client) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_str('{"op": "ping", "pad": "' + "x" * 4096 + '"}')
        message = await ws.receive(timeout=5)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert ws.close_code == 1009


async def test_a_frame_of_the_limit_is_answered_and_one_byte_more_closes(client: Client) -> None:
    """aiohttp refuses a frame of its `max_msg_size` too: one of exactly `ws.max_frame_bytes`
    (2048 here) closed with 1009, where only a larger one should (found by test_ws_fuzz.py)."""
    frame = '{"op": "ping", "pad": "' + "x" * (2048 - 25) + '"}'
    assert len(frame) == 2048
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_str(frame)
        assert await receive(ws) == {"type": "pong"}
        await ws.send_str(frame[:-2] + 'x"}')
        message = await ws.receive(timeout=5)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert ws.close_code == 1009


async def test_unsubscribe_stops_events(job_client: Client) -> None:
    job = await submit(job_client, {"task": "ticker", "args": {"steps": 20, "interval": 0.02}})
    async with job_client.ws_connect("/v1/ws") as ws:
        channel = f"job:{job['id']}"
        await ws.send_str(orjson.dumps({"op": "subscribe", "channel": channel}).decode())
        await ws.send_str(orjson.dumps({"op": "unsubscribe", "channel": channel}).decode())
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] != "unsubscribed":
            frames.append(await receive(ws))
        await job_client.get(f"/v1/jobs/{job['id']}", params={"wait": "5"})
        await ws.send_str('{"op": "ping"}')
        assert await receive(ws) == {"type": "pong"}  # no job frame came in between


async def send_while_reading(ws: Any, frames: list[str], replies: int) -> list[dict[str, Any]]:
    """Send `frames` back to back while another task reads; the replies read, until `replies`
    came or the server closed the connection."""
    received: list[dict[str, Any]] = []

    async def read() -> None:
        while len(received) < replies:
            message = await ws.receive(timeout=10)
            if message.type is not WSMsgType.TEXT:
                return
            received.append(orjson.loads(message.data))

    reader = asyncio.create_task(read())
    for frame in frames:
        await ws.send_str(frame)
    await reader
    return received


async def test_pipelined_pings_to_a_client_that_reads_all_get_pongs(client: Client) -> None:
    """Frames sent back to back wait on the server while the client's send queue is full: a client
    that reads is never closed as slow (2,000 pings got 932 pongs, then 1013)."""
    async with client.ws_connect("/v1/ws") as ws:
        replies = await send_while_reading(ws, ['{"op": "ping"}'] * 2000, 2000)
        assert (len(replies), ws.close_code) == (2000, None)
        assert all(reply == {"type": "pong"} for reply in replies)


async def test_pipelined_subscribes_to_a_client_that_reads_all_get_replies(
    job_client: Client,
) -> None:
    """500 subscribes to one job back to back: 500 `subscribed` and 500 snapshots (was 1013)."""
    job = await submit(job_client, {"task": "add", "args": [1]})
    await job_client.get(f"/v1/jobs/{job['id']}", params={"wait": "5"})  # no events but the replies
    subscribe = orjson.dumps({"op": "subscribe", "channel": f"job:{job['id']}"}).decode()
    async with job_client.ws_connect("/v1/ws") as ws:
        replies = await send_while_reading(ws, [subscribe] * 500, 1000)
        assert ws.close_code is None
    kinds = [reply.get("event", reply["type"]) for reply in replies]
    assert (kinds.count("subscribed"), kinds.count("snapshot"), len(kinds)) == (500, 500, 1000)


async def test_cancel_and_retry_over_http(job_client: Client) -> None:
    job = await submit(job_client, {"task": "ticker", "args": {"steps": 100, "interval": 0.05}})
    assert (await job_client.delete("/v1/jobs/nope")).status == 404
    cancelled = await job_client.delete(f"/v1/jobs/{job['id']}")
    assert (cancelled.status, (await cancelled.json())["status"]) == (202, "cancelled")
    again = await job_client.delete(f"/v1/jobs/{job['id']}")
    assert (again.status, again.content_type) == (409, "application/problem+json")
    retried = await job_client.post(f"/v1/jobs/{job['id']}/retry")
    assert (retried.status, (await retried.json())["status"]) == (202, "queued")
    assert (await job_client.post(f"/v1/jobs/{job['id']}/retry")).status == 409  # not finished
    assert (await job_client.post("/v1/jobs/nope/retry")).status == 404


async def test_fifty_simultaneous_submits_with_one_key_make_one_job(job_client: Client) -> None:
    body = orjson.dumps({"task": "add", "args": [1, 2]})
    headers = {**JSON, "Idempotency-Key": "order-42"}
    responses = await asyncio.gather(
        *(job_client.post("/v1/jobs", data=body, headers=headers) for _ in range(50))
    )
    statuses = sorted(response.status for response in responses)
    ids = {(await response.json())["id"] for response in responses}
    assert statuses == [200] * 49 + [202]
    assert len(ids) == 1 and job_count(job_client) == 1
    in_body = {"task": "add", "args": [1, 2], "idempotency_key": "order-42"}
    again = await job_client.post("/v1/jobs", data=orjson.dumps(in_body), headers=JSON)
    assert (again.status, (await again.json())["id"]) == (200, ids.pop())


async def test_a_key_reused_with_another_body_is_a_409(job_client: Client) -> None:
    headers = {**JSON, "Idempotency-Key": "k1"}
    first = await job_client.post(
        "/v1/jobs", data=orjson.dumps({"task": "add", "args": [1]}), headers=headers
    )
    other = await job_client.post(
        "/v1/jobs", data=orjson.dumps({"task": "add", "args": [2]}), headers=headers
    )
    assert (first.status, other.status) == (202, 409)
    mismatch = {"task": "add", "args": [1], "idempotency_key": "k2"}
    response = await job_client.post("/v1/jobs", data=orjson.dumps(mismatch), headers=headers)
    assert response.status == 400
    assert job_count(job_client) == 1


async def test_a_body_that_stops_arriving_is_a_408_not_a_hang(client: Client) -> None:
    """A client that promises 100 bytes and sends 5 is answered once http.body_timeout passes."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        head = (
            "POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n"
        )
        writer.write(head.encode() + b'{"tas')
        await writer.drain()
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(4096), 5)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"application/problem+json" in answer
        assert time.monotonic() - started < 3
    finally:
        writer.close()
    assert job_count(client) == 0


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),  # not a browser
        ("http://localhost:3000", True),
        ("http://127.0.0.1:5173", True),
        ("http://[::1]:8000", True),
        ("https://app.example", True),  # ws.allowed_origins
        ("HTTPS://APP.EXAMPLE:443", True),  # the same origin, written otherwise
        ("https://app.example:8443", False),  # another port is another origin
        ("https://evil.example", False),
        ("https://app.example.evil.example", False),
        ("null", False),  # a sandboxed page or a file: not an origin
        ("https://app.example/path", False),
    ],
)
async def test_a_browser_may_open_the_websocket_only_from_an_allowed_origin(
    client: Client, origin: str | None, allowed: bool
) -> None:
    """Cross-site websocket hijacking: a page elsewhere must not open it with the user's
    cookies. Browsers always send Origin and cannot forge it; other clients send none."""
    headers = {} if origin is None else {"Origin": origin}
    response = await client.get("/v1/ws", headers={**headers, **UPGRADE})
    if allowed:
        assert response.status == 101
        response.close()
    else:
        assert response.status == 403
        document = await response.json(content_type="application/problem+json")
        assert document["status"] == 403
        assert "not allowed" in document["detail"] or "not an origin" in document["detail"]


async def test_the_websocket_is_open_to_its_own_origin(client: Client) -> None:
    own = f"http://{client.host}:{client.port}"
    response = await client.get("/v1/ws", headers={"Origin": own, **UPGRADE})
    assert response.status == 101
    response.close()


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


async def test_a_peer_that_stops_answering_pings_is_closed_and_one_that_answers_is_not(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    """Half-open connections (a peer gone without a FIN) must not pile up: the server pings
    every ws.heartbeat seconds and drops a peer with no pong within half of it."""
    settings = Settings(ws=WsSettings(heartbeat=0.4))
    client = await aiohttp_client(create_app(make_app(), settings))
    state = client.app[STATE]
    silent = await client.ws_connect("/v1/ws", autoping=False)  # never answers a ping
    alive = await client.ws_connect("/v1/ws")  # answers each ping it reads
    replies: asyncio.Queue[Any] = asyncio.Queue()

    async def read(ws: Any) -> None:
        async for message in ws:
            await replies.put(message.json())

    reader = asyncio.create_task(read(alive))
    pings = 0
    async with asyncio.timeout(5):
        while (message := await silent.receive()).type is WSMsgType.PING:
            pings += 1
    assert pings >= 1 and message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    for _ in range(100):  # the server lets go of it too
        if len(state.connections) == 1:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.2)  # three heartbeats more for the one that answers
    await alive.send_json({"op": "ping"})
    async with asyncio.timeout(2):
        assert (await replies.get())["type"] == "pong"
    assert len(state.connections) == 1
    await alive.close()
    await reader


async def test_the_server_header_names_no_versions(client: Client) -> None:
    for path in ("/healthz", "/v1/jobs/unknown", "/openapi.json"):
        response = await client.get(path)
        assert response.headers["Server"] == "aioqueue", path


async def test_a_websocket_submit_says_whether_it_created_the_job(job_client: Client) -> None:
    """As HTTP's 202 and 200: a repeated idempotency key answers the first job, created false."""
    body = {"task": "add", "args": [1, 2], "idempotency_key": "ws-order-7"}
    async with job_client.ws_connect("/v1/ws") as ws:
        replies = []
        for _ in range(2):
            await ws.send_str(orjson.dumps({"op": "submit", "job": body}).decode())
            replies.append(await receive(ws))
    assert [r["created"] for r in replies] == [True, False]
    assert replies[0]["job"]["id"] == replies[1]["job"]["id"]


async def test_a_frame_id_comes_back_exactly_or_is_refused(client: Client) -> None:
    async with client.ws_connect("/v1/ws") as ws:
        for raw, echoed in [("9007199254740993", 9007199254740993), ('"x"', "x"), ("[1]", [1])]:
            await ws.send_str('{"op": "ping", "id": ' + raw + "}")
            assert await receive(ws) == {"type": "pong", "id": echoed}
        await ws.send_str('{"op": "ping", "id": 18446744073709551616}')  # read as a float
        refused = await receive(ws)
        assert refused["code"] == "bad_frame" and "id" not in refused


async def test_an_id_nested_too_deep_is_refused_and_the_connection_stays(client: Client) -> None:
    """orjson reads 1024 levels but writes 254: an `id` that a reply could not carry back
    failed the reply, and the websocket with it (found by test_ws_fuzz.py)."""
    async with client.ws_connect("/v1/ws") as ws:
        deepest = "[" * 253 + "]" * 253  # the reply puts it one level down
        await ws.send_str('{"op": "ping", "id": ' + deepest + "}")
        assert (await receive(ws))["id"] == orjson.loads(deepest)
        for id_ in ("[" * 254 + "]" * 254, '{"a":' * 300 + "1" + "}" * 300):
            await ws.send_str('{"op": "ping", "id": ' + id_ + "}")
            refused = await receive(ws)
            assert refused["code"] == "bad_frame" and "id" not in refused, refused
        await ws.send_str('{"op": "ping", "id": "p"}')
        assert await receive(ws) == {"type": "pong", "id": "p"}


@pytest.mark.parametrize(
    ("op", "named"),
    [
        pytest.param("[" * 1000 + "]" * 1000, "of type array", id="nested-past-python-recursion"),
        pytest.param('{"a": {"b": 1}}', "of type object", id="object"),
        pytest.param('"' + "o" * 1500 + '"', "'" + "o" * 100 + "'", id="long-string-cut"),
        pytest.param("null", "None", id="none"),
    ],
)
async def test_an_unknown_op_of_any_type_is_named_briefly(
    client: Client, op: str, named: str
) -> None:
    """The message showed the op's repr: one nested 1000 deep raised RecursionError, which
    failed the websocket (found by test_ws_fuzz.py); a long one came back whole."""
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_str('{"op": ' + op + ', "id": 7}')
        error = await receive(ws)
        assert (error["code"], error["id"]) == ("unknown_op", 7)
        assert error["message"].startswith(f"unknown op {named}; ops are"), error["message"]
        await ws.send_str('{"op": "ping"}')
        assert await receive(ws) == {"type": "pong"}


async def test_an_unexpected_error_in_an_op_closes_the_websocket_with_1011(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a 500 written into the websocket's stream, which the client read as a frame with
    reserved bits set (a protocol error), and not the traceback either."""

    async def broken(*args: Any) -> list[Any]:
        raise RuntimeError("a bug")

    monkeypatch.setitem(ws_module.OPS, "ping", broken)
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_str('{"op": "ping"}')
        message = await ws.receive(timeout=5)
        assert message.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING), message
        assert ws.close_code == 1011
        assert "Traceback" not in (message.extra or "")
    assert "unexpected error on a websocket" in caplog.text


async def test_a_get_that_is_no_handshake_is_a_400_not_an_unexpected_error(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a failure while the websocket is served is closed with 1011: aiohttp's refusal of
    a request that is no handshake goes on to the problem middleware, as before."""
    response = await client.get("/v1/ws")
    assert (response.status, response.content_type) == (400, "application/problem+json")
    assert "unexpected error" not in caplog.text


async def test_args_over_the_limit_are_a_413_and_leave_no_job(job_client: Client) -> None:
    before = job_count(job_client)
    body = orjson.dumps({"task": "add", "args": {"a": 1, "b": 2, "c": "x" * 1100}})
    response = await job_client.post("/v1/jobs", data=body, headers=JSON)
    assert response.status == 400  # an unknown argument: the args are checked first
    body = orjson.dumps({"task": "shout", "args": {"text": "x" * 1100}})
    response = await job_client.post("/v1/jobs", data=body, headers=JSON)
    assert response.status == 413, await response.text()
    assert "jobs.max_args_bytes" in (await response.json())["detail"]
    async with job_client.ws_connect("/v1/ws") as ws:
        await ws.send_str(orjson.dumps({"op": "submit", "job": orjson.loads(body)}).decode())
        assert (await receive(ws))["code"] == "too_large"
    assert job_count(job_client) == before


async def test_an_error_is_kept_cut_to_the_limit(job_client: Client) -> None:
    job = await submit(job_client, {"task": "shout", "args": {"text": "y" * 1000}})
    done = await (await job_client.get(f"/v1/jobs/{job['id']}?wait=10")).json()
    error = done["error"]
    assert done["status"] == "failed" and error["type"] == "ValueError"
    assert error["message"] == "y" * 256 + " [... 744 characters cut]"
    assert error["traceback"].startswith("[...") and len(error["traceback"]) < 256 + 40
    assert error["traceback"].endswith("y" * 50 + "\n")
