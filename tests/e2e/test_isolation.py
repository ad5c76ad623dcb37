"""Isolation across processes (issue 9; RELIABILITY row 21 after restarts): principals A and B,
two `aioqueue serve` processes with `[auth] mode = "token"` on one RabbitMQ.

A submits a job on process 1, and publishes to its own topic. B, on process 2, tries to read,
long-poll, list, cancel, retry and subscribe to A's job, to subscribe to A's topic and to every
topic, and to reuse A's idempotency key: each attempt fails as the policy says, and B's websocket
receives no frame about A's job or A's topic. Then both processes restart, and it all holds again:
ownership is in the event log, not in a process's memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.support import JSON, ServeProcess, wait_ready

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(150)]

TOKENS = {
    "alice": "alice-token-4b1d9e0c7a2f",
    "bob": "bob-token-8c3e5a1f6d0b",
}
SCOPES = ["jobs:submit", "jobs:read"]
ENV = {
    "AIOQUEUE_AUTH__MODE": "token",
    "AIOQUEUE_AUTH__TOKENS": json.dumps(
        [
            {
                "token": token,
                "principal": name,
                "scopes": [*SCOPES, f"topics:publish:{name}.#", f"topics:subscribe:{name}.#"],
            }
            for name, token in TOKENS.items()
        ]
    ),
}


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}", **JSON}


@pytest.fixture
def processes(amqp_url: str, prefix: str, tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for process in started:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()


async def start(
    processes: list[ServeProcess], amqp_url: str, prefix: str, tmp_path: Path, http: Any
) -> tuple[str, str]:
    for store in ("one", "two"):  # each process its own job store
        env = {**ENV, "AIOQUEUE_STORE__DIR": str(tmp_path / store)}
        processes.append(ServeProcess(amqp_url, prefix, env).start(tmp_path))
    for process in processes[-2:]:
        await wait_ready(http, process.url)
    return processes[-2].url, processes[-1].url


async def call(
    http: aiohttp.ClientSession, method: str, url: str, who: str, body: Any = None
) -> tuple[int, Any]:
    data = None if body is None else orjson.dumps(body)
    async with http.request(method, url, data=data, headers=auth(who)) as response:
        return response.status, await response.json()


async def frames_until_quiet(ws: aiohttp.ClientWebSocketResponse, quiet: float) -> list[str]:
    got: list[str] = []
    while True:
        try:
            message = await ws.receive(timeout=quiet)
        except TimeoutError:
            return got
        assert message.type is aiohttp.WSMsgType.TEXT, message
        got.append(message.data)


async def bob_tries_everything(
    http: aiohttp.ClientSession, url: str, job_id: str, finished: bool
) -> None:
    """Every way B could reach A's job, on process `url`; each refused."""
    assert (await call(http, "GET", f"{url}/v1/jobs/{job_id}", "bob"))[0] == 404
    assert (await call(http, "GET", f"{url}/v1/jobs/{job_id}?wait=0.2", "bob"))[0] == 404
    status, listed = await call(http, "GET", f"{url}/v1/jobs?limit=1000", "bob")
    assert status == 200 and job_id not in {job["id"] for job in listed["jobs"]}
    assert (await call(http, "DELETE", f"{url}/v1/jobs/{job_id}", "bob"))[0] == 404
    assert (await call(http, "POST", f"{url}/v1/jobs/{job_id}/retry", "bob"))[0] == 404
    status, _ = await call(http, "POST", f"{url}/v1/topics/alice.news", "bob", {"x": 1})
    assert status == 403
    key = {"task": "echo", "args": {"value": "b"}, "idempotency_key": "shared-key"}
    status, own = await call(http, "POST", f"{url}/v1/jobs", "bob", key)
    assert status in (200, 202) and own["id"] != job_id and own["owner"] == "bob"
    if finished:  # A's finished job is 404 to B's retry too, not a 409 that would tell it exists
        assert (await call(http, "POST", f"{url}/v1/jobs/{job_id}/retry", "bob"))[0] == 404


async def bobs_socket(http: aiohttp.ClientSession, url: str, job_id: str) -> Any:
    ws = await http.ws_connect(url + "/v1/ws")
    await ws.send_json({"op": "auth", "token": TOKENS["bob"]})
    assert (await ws.receive_json(timeout=10))["principal"] == "bob"
    refusals = {
        f"job:{job_id}": "not_found",
        "topic:alice.#": "forbidden",
        "topic:#": "forbidden",
        "topic:*.news": "forbidden",
    }
    for channel, code in refusals.items():
        await ws.send_json({"op": "subscribe", "channel": channel})
        reply = await ws.receive_json(timeout=10)
        assert (reply["type"], reply.get("code")) == ("error", code), (channel, reply)
    await ws.send_json({"op": "subscribe", "channel": "topic:bob.#"})
    assert (await ws.receive_json(timeout=10))["type"] == "subscribed"
    return ws


async def alice_works(http: aiohttp.ClientSession, one: str, two: str, key: str) -> str:
    """A's job (on process 1, with progress for a second) and messages to A's topic."""
    body = {"task": "ticker", "args": {"steps": 10, "interval": 0.1}, "idempotency_key": key}
    status, job = await call(http, "POST", f"{one}/v1/jobs", "alice", body)
    assert status == 202 and job["owner"] == "alice"
    for n in range(5):
        status, _ = await call(http, "POST", f"{one}/v1/topics/alice.news", "alice", {"n": n})
        assert status == 202
    return str(job["id"])


async def test_b_never_reaches_a_job_or_topic_on_any_process_before_and_after_restarts(
    processes: list[ServeProcess],
    amqp_url: str,
    prefix: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    one, two = await start(processes, amqp_url, prefix, tmp_path, http)
    job_id = await alice_works(http, one, two, "shared-key")
    ws = await bobs_socket(http, two, job_id)
    await bob_tries_everything(http, two, job_id, finished=False)
    await bob_tries_everything(http, one, job_id, finished=False)
    status, done = await call(http, "GET", f"{two}/v1/jobs/{job_id}?wait=20", "alice")
    assert status == 200 and done["status"] == "succeeded"  # A sees it on either process
    leaked = [frame for frame in await frames_until_quiet(ws, 1.0) if "alice" in frame]
    leaked += [frame for frame in await frames_until_quiet(ws, 0.1) if job_id in frame]
    assert leaked == []
    await ws.close()

    for process in processes:
        assert process.stop() == 0
    one, two = await start(processes, amqp_url, prefix, tmp_path, http)
    ws = await bobs_socket(http, one, job_id)
    for url in (one, two):
        await bob_tries_everything(http, url, job_id, finished=True)
        status, record = await call(http, "GET", f"{url}/v1/jobs/{job_id}", "alice")
        assert (status, record["owner"], record["status"]) == (200, "alice", "succeeded")
    second = await alice_works(http, two, one, "shared-key-2")
    status, _ = await call(http, "GET", f"{one}/v1/jobs/{second}?wait=20", "alice")
    assert status == 200
    frames = await frames_until_quiet(ws, 1.0)
    assert [f for f in frames if "alice" in f or job_id in f or second in f] == []
    await ws.close()
    for process in processes[-2:]:
        assert "unexpected error" not in process.log(), process.log()[-3000:]
    await asyncio.sleep(0)
