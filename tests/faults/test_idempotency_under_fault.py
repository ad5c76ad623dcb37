"""RELIABILITY row 22: 50 simultaneous submits with one key while every connection is dropped."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.rabbitmq import RabbitNode
from tests.support import JSON, ServeProcess, wait_ready, wait_terminal

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(120)]


async def test_one_key_makes_one_job_while_connections_drop(
    rabbit: RabbitNode, prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    task_log = tmp_path / "runs.log"
    server = ServeProcess(rabbit.url, prefix, {"AQ_TEST_TASK_LOG": str(task_log)}).start(tmp_path)
    try:
        await wait_ready(http, server.url)
        body = orjson.dumps({"task": "work", "args": {"ms": 50}})
        headers = {**JSON, "Idempotency-Key": "order-42"}

        async def one(after: float = 0.0) -> tuple[int, str | None]:
            await asyncio.sleep(after)  # spread over the ~1.5 s it takes rabbitmqctl to drop them
            async with http.post(server.url + "/v1/jobs", data=body, headers=headers) as response:
                record = await response.json()
                return response.status, record.get("id")

        drop = asyncio.create_task(asyncio.to_thread(rabbit.close_all_connections))
        answers = await asyncio.gather(*(one(n * 0.04) for n in range(50)))
        await drop
        await wait_ready(http, server.url, deadline=30)
        # One more after the drop settles: it must get the same job as any that was accepted.
        answers.append(await one())
        statuses = collections.Counter(status for status, _ in answers)
        ids = {job_id for status, job_id in answers if status in (200, 202) and job_id}
        print(f"\nstatuses {dict(statuses)}; job ids {len(ids)}")
        assert set(statuses) <= {200, 202, 503}, statuses
        assert statuses[202] <= 1 and len(ids) == 1
        job = await wait_terminal(http, server.url, ids.pop())
        assert job["status"] == "succeeded"
        await asyncio.sleep(1.0)  # time for a duplicate's message to run, were it not skipped
        runs = [line.split()[0] for line in task_log.read_text().splitlines()]
        assert runs == [job["id"]]
    finally:
        server.stop()
