"""RabbitMQ misbehaving under a running `aioqueue serve`: dropped connections, silent broker."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.rabbitmq import RabbitNode
from tests.support import JSON, ServeProcess, submit, wait_ready, wait_terminal

pytestmark = pytest.mark.amqp


@pytest.fixture
def server(rabbit: RabbitNode, prefix: str, tmp_path: Path) -> Iterator[ServeProcess]:
    process = ServeProcess(rabbit.url, prefix).start(tmp_path)
    yield process
    process.kill()


async def test_consumers_come_back_by_themselves_after_connections_are_dropped(
    rabbit: RabbitNode, server: ServeProcess, http: aiohttp.ClientSession
) -> None:
    await wait_ready(http, server.url)
    before = await submit(http, server.url, {"task": "echo", "args": {"value": "before"}})
    await wait_terminal(http, server.url, before["id"])
    rabbit.close_all_connections()
    dropped = time.monotonic()
    await wait_ready(http, server.url, deadline=15)
    after = await submit(http, server.url, {"task": "echo", "args": {"value": "after"}})
    assert (await wait_terminal(http, server.url, after["id"]))["result"] == "after"
    assert time.monotonic() - dropped < 10
    log = server.log()
    assert "connection to RabbitMQ lost" in log
    assert len(re.findall(r"connected to RabbitMQ", log)) >= 2  # and re-attached


async def test_a_confirm_that_never_comes_is_a_503_never_a_202(
    rabbit: RabbitNode, server: ServeProcess, http: aiohttp.ClientSession
) -> None:
    """The broker freezes (SIGSTOP): a submit answers 503 within the confirm timeout (3 s)."""
    await wait_ready(http, server.url)
    os.kill(rabbit.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        body = orjson.dumps({"task": "echo", "args": {"value": 1}})
        async with http.post(server.url + "/v1/jobs", data=body, headers=JSON) as response:
            elapsed = time.monotonic() - started
            problem = await response.json()
            assert response.status == 503, problem
            assert response.headers["Retry-After"] == "1"
        assert elapsed < 3 + 1.5, elapsed
        assert "no answer from RabbitMQ in time" in problem["detail"]
    finally:
        os.kill(rabbit.pid, signal.SIGCONT)
    await wait_ready(http, server.url, deadline=30)
    job = await submit(http, server.url, {"task": "echo", "args": {"value": 2}})
    assert (await wait_terminal(http, server.url, job["id"]))["status"] == "succeeded"
