"""`GET /asyncapi.json` in-process: valid by the official AsyncAPI 3.0.0 JSON Schema (vendored in
tests/schemas), every op, frame, error code and job event described, and the frames a real
websocket session sends valid by the document's own payload schemas."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

import jsonschema_rs
import orjson
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from aioqueue import Settings
from aioqueue.config import TopicsSettings, WsSettings
from aioqueue.jobs import EventType
from aioqueue.web.app import create_app
from aioqueue.web.asyncapi import OPS_DESCRIBED
from aioqueue.web.protocol import ERRORS, JOB_EVENTS, ErrorCode
from aioqueue.web.topichub import offset_expired
from aioqueue.web.ws import CODES_BY_ERROR, OPS
from tests.e2e.openapi_app import app as served_app
from tests.support import client_ready

Client = TestClient[web.Request, web.Application]
ROOT = Path(__file__).resolve().parent.parent
SCHEMA = Path(__file__).resolve().parent / "schemas" / "asyncapi-3.0.0.json"
#: Where the codes of `error` frames are sent from.
SENDERS = ("ws.py", "topichub.py")
DRAFT_07 = "http://json-schema.org/draft-07/schema#"
#: Small limits, so that the session below can run into `too_large` and `rate_limited`.
SETTINGS = Settings(
    ws=WsSettings(max_publishes_per_second=3), topics=TopicsSettings(max_message_bytes=64)
)


@pytest.fixture
async def client(aiohttp_client: Callable[[web.Application], Awaitable[Client]]) -> Client:
    return await aiohttp_client(create_app(served_app, SETTINGS))


async def fetch(client: Client, path: str = "/asyncapi.json") -> dict[str, Any]:
    response = await client.get(path)
    assert (response.status, response.content_type) == (200, "application/json")
    return dict(await response.json())


def official_validator() -> jsonschema_rs.Validator:
    # offline: every `$ref` of the file is to a definition inside it; nothing may be fetched.
    return jsonschema_rs.Draft7Validator(json.loads(SCHEMA.read_text()), offline=True)


def payload_validator(document: dict[str, Any], message: str) -> jsonschema_rs.Validator:
    """A validator of one message's payload, its `$ref`s resolved within the document (draft-07
    ignores the keywords beside a `$ref`: the document's own keys are only there to be found)."""
    root = {**document, "$ref": f"#/components/messages/{message}/payload"}
    return jsonschema_rs.Draft7Validator(root, offline=True)


async def test_it_is_valid_asyncapi_3_0_0_with_the_openapi_version(client: Client) -> None:
    document = await fetch(client)
    errors = [
        f"{e.instance_path}: {e.message[:300]}" for e in official_validator().iter_errors(document)
    ]
    assert not errors, errors
    assert document["asyncapi"] == "3.0.0"
    assert document["info"]["version"] == (await fetch(client, "/openapi.json"))["info"]["version"]


def test_the_official_schema_refuses_what_it_should() -> None:
    """The vendored schema is the one for 3.0.0, and it does look inside payloads."""
    validator = official_validator()

    def document(payload: Any) -> dict[str, Any]:
        messages = {"m": {"payload": payload}}
        return {
            "asyncapi": "3.0.0",
            "info": {"title": "t", "version": "1"},
            "channels": {"c": {"address": "a", "messages": messages}},
        }

    assert validator.is_valid(document({"type": "object"}))
    assert not validator.is_valid({**document({}), "asyncapi": "2.6.0"})
    assert not validator.is_valid({**document({}), "info": {"title": "no version"}})
    assert not validator.is_valid(document({"type": "bogus"}))
    assert not validator.is_valid(document({"type": "object", "required": "op"}))


async def test_every_schema_in_it_is_valid_draft_07_and_its_refs_resolve(client: Client) -> None:
    document = await fetch(client)
    components = document["components"]
    schemas = [*components["schemas"].values()]
    schemas += [message["payload"] for message in components["messages"].values()]
    for schema in schemas:
        assert jsonschema_rs.meta.is_valid({**schema, "$schema": DRAFT_07}), schema
    for name in components["messages"]:
        payload_validator(document, name)  # raises if a `$ref` does not resolve


async def test_every_op_and_its_reply_is_described(client: Client) -> None:
    assert set(OPS_DESCRIBED) == set(OPS)  # else the document cannot be built (a 500)
    document = await fetch(client)
    received = {
        name
        for name, operation in document["operations"].items()
        if operation["action"] == "receive"
    }
    assert received == set(OPS)
    messages = document["components"]["messages"]
    for op in OPS:
        assert messages[op]["payload"]["properties"]["op"] == {"const": op}
        reply = OPS_DESCRIBED[op].reply
        assert messages[reply]["payload"]["properties"]["type"] == {"const": reply}
        refs = [m["$ref"] for m in document["operations"][op]["reply"]["messages"]]
        assert refs == [f"#/channels/socket/messages/{reply}", "#/channels/socket/messages/error"]
    pushed = {"job", "message", "error", "queues"}
    replies = {op.reply for op in OPS_DESCRIBED.values()}
    assert set(messages) == set(OPS) | replies | pushed
    assert {"job:{id}", "topic:{pattern}"} <= {c["address"] for c in document["channels"].values()}


async def test_every_example_is_valid_by_its_payload_and_a_bad_frame_is_not(
    client: Client,
) -> None:
    document = await fetch(client)
    examples = 0
    for name, message in document["components"]["messages"].items():
        for example in message.get("examples", []):
            assert payload_validator(document, name).is_valid(example["payload"]), (name, example)
            examples += 1
    assert examples >= len(OPS) - 1  # all but submit's, which depends on the app
    # The payloads do refuse: an unknown code, and a job record without its fields (via $ref).
    error = payload_validator(document, "error")
    assert error.is_valid({"type": "error", "code": "bad_frame", "message": "m"})
    assert not error.is_valid({"type": "error", "code": "no_such_code", "message": "m"})
    frame = {"type": "job", "channel": "job:x", "event": "queued", "job": {"id": "x"}}
    assert not payload_validator(document, "job").is_valid(frame)


def _meanings(schema: dict[str, Any]) -> dict[str, str]:
    return {branch["const"]: branch["description"] for branch in schema["oneOf"]}


async def test_every_error_code_and_job_event_is_described_with_its_meaning(
    client: Client,
) -> None:
    document = await fetch(client)
    messages = document["components"]["messages"]
    assert _meanings(messages["error"]["payload"]["properties"]["code"]) == ERRORS
    assert _meanings(messages["job"]["payload"]["properties"]["event"]) == JOB_EVENTS


def test_the_error_codes_sent_are_the_table() -> None:
    """Each code the server sends is in ERRORS, and each code in ERRORS is sent somewhere."""
    assert set(ERRORS) == set(get_args(ErrorCode))
    sent: set[str] = set()
    for name in SENDERS:
        source = (ROOT / "src" / "aioqueue" / "web" / name).read_text()
        sent |= set(re.findall(r'(?:_error|FrameError)\(\s*"(\w+)"', source))
        sent |= set(re.findall(r'code: ErrorCode = "(\w+)"', source))
        # A code written any other way would be missed above: there is none.
        assert not re.findall(r'"code":\s*"', source), name
    assert len(sent) >= 10  # the patterns still find them
    sent |= set(CODES_BY_ERROR.values())  # the service's refusals, by their type
    assert sent == set(ERRORS)


def test_the_job_events_are_the_stores() -> None:
    """A `job` frame's event is a store event (`retried` is sent as `queued`), `scheduled` (a
    delayed job's creation) or `snapshot`."""
    store = {kind.value for kind in EventType} - {"retried"}
    assert set(JOB_EVENTS) == store | {"scheduled", "snapshot"}


async def receive(ws: Any) -> dict[str, Any]:
    message = await ws.receive(timeout=5)
    assert message.type is WSMsgType.TEXT, message
    return dict(orjson.loads(message.data))


async def test_the_frames_of_a_session_are_valid_by_their_messages(client: Client) -> None:
    """A session that gets every reply, a job's frames up to `succeeded`, a topic message and most
    error codes: each frame is valid by the payload of the message its `type` names, and has no
    field that payload does not describe."""
    await client_ready(client)
    document = await fetch(client)
    ws = await client.ws_connect("/v1/ws")
    frames: list[dict[str, Any]] = []

    async def send(frame: Any, replies: int = 1) -> dict[str, Any]:
        """Send `frame`, keep the `replies` frames that come back, return the last."""
        await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))
        for _ in range(replies):
            frames.append(await receive(ws))
        return frames[-1]

    await send({"op": "ping", "id": "p"})
    await send({"op": "auth", "token": "any: auth is off"})
    # Delayed, so that it is subscribed to before it runs.
    submit = {"task": "add", "args": {"a": 1}, "delay": 0.3}
    job = (await send({"op": "submit", "job": submit}))["job"]
    await send({"op": "subscribe", "channel": "job:" + job["id"], "id": [1]}, replies=2)
    while frames[-1]["job"]["status"] != "succeeded":  # each frame waits at most 5 s
        frames.append(await receive(ws))
    await send({"op": "subscribe", "channel": "topic:orders.#"})
    # The message may come before the reply: both are kept, in either order.
    await send({"op": "publish", "topic": "orders.eu", "data": {"n": 1}, "id": 2}, replies=2)
    await send({"op": "unsubscribe", "channel": "topic:orders.#"})
    errors = [
        await send("not JSON"),
        await send({"op": "teleport", "id": 3}),
        await send({"op": "subscribe", "channel": "job:no-such-job"}),
        await send({"op": "submit", "job": {"task": "add", "args": {"a": "x"}}}),
        await send({"op": "publish", "topic": "big", "data": "x" * 100}),
    ]
    # ws.max_publishes_per_second is 3: one of these bursts past it.
    for _ in range(5):
        if (await send({"op": "publish", "topic": "a", "data": 1}))["type"] == "error":
            errors.append(frames[-1])
            break
    await ws.close()
    frames.append(orjson.loads(offset_expired("topic:a.#", 3, 9)))

    codes = [error["code"] for error in errors]
    assert codes == [
        "bad_frame",
        "unknown_op",
        "not_found",
        "invalid_job",
        "too_large",
        "rate_limited",
    ]
    events = [frame["event"] for frame in frames if frame["type"] == "job"]
    assert events[0] == "snapshot" and events[-1] == "succeeded", events
    seen = {frame["type"] for frame in frames}
    assert seen == {op.reply for op in OPS_DESCRIBED.values()} | {"job", "message", "error"}
    validators = {name: payload_validator(document, name) for name in seen}
    messages = document["components"]["messages"]
    for frame in frames:
        kind = frame["type"]
        invalid = [e.message for e in validators[kind].iter_errors(frame)]
        assert not invalid, (frame, invalid)
        described = set(messages[kind]["payload"]["properties"])
        assert set(frame) <= described, (frame, set(frame) - described)


async def test_the_frames_of_jobs_star_and_queues_are_valid_by_their_messages(
    client: Client,
) -> None:
    """`jobs:*` gets a job submitted over HTTP, every event of it with its channel, and `queues`
    the report at once and again a tick later; each frame valid by its message, with no field
    it does not describe."""
    await client_ready(client)
    document = await fetch(client)
    ws = await client.ws_connect("/v1/ws")
    for channel in ("jobs:*", "queues"):
        await ws.send_json({"op": "subscribe", "channel": channel})
        assert await receive(ws) == {"type": "subscribed", "channel": channel}
    frames = [await receive(ws)]  # the current report
    assert frames[0]["type"] == "queues"
    response = await client.post("/v1/jobs", json={"task": "add", "args": {"a": 2}})
    job_id = (await response.json())["id"]
    reports, succeeded = 1, False
    async with asyncio.timeout(15):
        while reports < 2 or not succeeded:
            frames.append(await receive(ws))  # each waits at most 5 s: a tick is 2 s
            reports += frames[-1]["type"] == "queues"
            succeeded |= frames[-1].get("event") == "succeeded"
    jobs = [frame for frame in frames if frame["type"] == "job"]
    assert {frame["job"]["id"] for frame in jobs} == {job_id}
    assert {frame["channel"] for frame in jobs} == {"jobs:*"}
    assert [frame["event"] for frame in jobs][-1] == "succeeded"
    await ws.close()
    messages = document["components"]["messages"]
    for frame in frames:
        kind = frame["type"]
        invalid = [e.message for e in payload_validator(document, kind).iter_errors(frame)]
        assert not invalid, (frame, invalid)
        assert set(frame) <= set(messages[kind]["payload"]["properties"]), frame
