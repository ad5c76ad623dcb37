"""What the schemathesis run (tests/e2e/test_openapi_fuzz.py, RELIABILITY row 16), the websocket
fuzz (tests/e2e/test_ws_fuzz.py) and the hand cases beside them found in the HTTP layer, pinned
in-process so that each stays fixed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from aioqueue import Settings
from aioqueue.web.app import create_app
from aioqueue.web.state import STATE
from tests.e2e.openapi_app import app as served_app

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(aiohttp_client: Callable[[web.Application], Awaitable[Client]]) -> Client:
    test_client = await aiohttp_client(create_app(served_app, Settings()))
    deadline = time.monotonic() + 10
    while (await test_client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "not ready in time"
        await asyncio.sleep(0.01)
    return test_client


@pytest.mark.parametrize("method", ["PUT", "PATCH", "TRACE", "OPTIONS"])
async def test_a_405_says_which_methods_the_resource_takes(client: Client, method: str) -> None:
    """The problem document used to drop aiohttp's `Allow` header (RFC 9110 requires it)."""
    response = await client.request(method, "/v1/jobs")
    assert (response.status, response.content_type) == (405, "application/problem+json")
    assert set(response.headers["Allow"].split(",")) >= {"GET", "POST"}


@pytest.mark.parametrize(
    ("limit", "status"),
    [
        pytest.param("²", 400, id="superscript-two-was-a-500"),
        pytest.param("٥", 400, id="arabic-indic-five-was-read-as-5"),
        pytest.param("9" * 5000, 400, id="past-int-digit-limit-was-a-500"),
        pytest.param("0050", 200, id="leading-zeros"),
    ],
)
async def test_limit_takes_ascii_digits_only(client: Client, limit: str, status: int) -> None:
    response = await client.get("/v1/jobs", params={"limit": limit})
    assert response.status == status, await response.text()


@pytest.mark.parametrize(
    ("value", "status"),
    [
        pytest.param("", 400, id="empty-was-ignored"),
        pytest.param("queued,", 400, id="trailing-comma-was-ignored"),
        pytest.param("queued, running", 400, id="padded-name-was-stripped"),
        pytest.param("queued,running", 200, id="names"),
    ],
)
async def test_status_takes_exactly_status_names(client: Client, value: str, status: int) -> None:
    response = await client.get("/v1/jobs", params={"status": value})
    assert response.status == status, await response.text()


async def test_an_idempotency_key_header_that_is_not_utf8_is_a_400(client: Client) -> None:
    """aiohttp keeps such bytes as lone surrogates; storing the key with the job was a 500."""
    body = b'{"task": "nothing"}'
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(
        b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: k\xff\xfe\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, document = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"application/problem+json" in head and b'"field":"Idempotency-Key"' in document
    service = client.app[STATE].service
    assert service is not None and len(service.store) == 0


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


async def test_args_nested_too_deep_are_refused_and_listings_keep_working(client: Client) -> None:
    """orjson reads 1024 levels but writes 254. Args nested more than 253 levels were a 500 on
    submit; 252 or 253 levels were accepted, and then every listing that showed the job was a
    500 (it carries them three levels down) for `result_ttl`. Found by tests/e2e/test_ws_fuzz.py."""
    headers = {"Content-Type": "application/json"}
    for depth in (128, 252, 300):  # args = {"key": ..., "values": <depth>}: one level more
        body = '{"task": "keyword_only", "args": {"key": "k", "values": ' + nested(depth) + "}}"
        response = await client.post("/v1/jobs", data=body, headers=headers)
        problem = await response.json()
        assert response.status == 400, problem
        assert [error["field"] for error in problem["errors"]] == ["args"], problem
    body = '{"task": "keyword_only", "args": {"key": "k", "values": ' + nested(127) + "}}"
    response = await client.post("/v1/jobs", data=body, headers=headers)
    assert response.status == 202, await response.text()
    job_id = (await response.json())["id"]
    response = await client.get("/v1/jobs")
    assert response.status == 200 and job_id in {
        job["id"] for job in (await response.json())["jobs"]
    }
    async with client.ws_connect("/v1/ws") as ws:
        job = '{"task": "keyword_only", "args": {"key": "k", "values": ' + nested(300) + "}}"
        await ws.send_str('{"op": "submit", "job": ' + job + "}")
        refused = (await ws.receive(timeout=5)).json()
        assert refused["code"] == "invalid_job" and refused["errors"][0]["field"] == "args"
        await ws.send_str('{"op": "subscribe", "channel": "job:' + job_id + '"}')
        assert (await ws.receive(timeout=5)).json()["type"] == "subscribed"
        snapshot = (await ws.receive(timeout=5)).json()
        assert snapshot["job"]["args"]["values"] == orjson.loads(nested(127))
