"""Dead letters retried in bulk while the link to RabbitMQ is cut (issue 10; G1, G3).

`POST /v1/dead/retry` retries each matching job in turn: its message first, then its `retried`
event. A cut in the middle stops the bulk retry (503, or a count with some `left`); the operator
asks again. Every dead letter must come out of it retried once and run to its end: none left
behind as a dead letter, none stuck between its message and its event, one outcome per run
(G2). A job may run twice only if its message was delivered before the cut: it runs, its outcome
cannot be recorded on the lost link, and the message is redelivered (at-least-once execution).
So at most `broker.prefetch` jobs run twice.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from aioqueue.config import BrokerSettings
from tests.faults.harness import Report, count_outcomes
from tests.faults.proxy import FaultProxy
from tests.faults.test_network_faults import served_through
from tests.rabbitmq import RabbitNode
from tests.support import JSON, wait_ready, wait_terminal

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(180)]

JOBS = 300


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(url, data=orjson.dumps(body), headers=JSON) as response:
        return response.status, await response.json()


async def test_a_bulk_retry_cut_off_mid_way_loses_no_dead_letter_and_records_one_outcome_per_run(
    rabbit: RabbitNode, prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    flag = tmp_path / "healed"
    async with FaultProxy(rabbit.port) as proxy, served_through(proxy, prefix, tmp_path) as server:
        url = server.url
        await wait_ready(http, url)
        job = {"task": "fails_until", "args": {"flag": str(flag)}}
        ids = [(await post(http, url + "/v1/jobs", job))[1]["id"] for _ in range(JOBS)]
        first = [await wait_terminal(http, url, job_id, 60) for job_id in ids]
        assert {j["status"] for j in first} == {"failed"}
        flag.touch()

        log = tmp_path / "runs.log"

        async def cut_when_some_ran() -> None:
            deadline = time.monotonic() + 30
            while b" ok" not in log.read_bytes():
                assert time.monotonic() < deadline, "no retried job ran"
                await asyncio.sleep(0.001)
            proxy.cut()

        cutter = asyncio.create_task(cut_when_some_ran())
        answers: list[tuple[int, Any]] = []
        deadline = time.monotonic() + 90
        while True:
            answer = await post(http, url + "/v1/dead/retry", {"task": "fails_until"})
            answers.append(answer)
            status, body = answer
            if status == 200 and body["count"] == 0 and body["left"] == 0:
                break
            assert status in (200, 503), answer
            assert time.monotonic() < deadline, answers[-5:]
            await asyncio.sleep(0.2 if status == 503 else 0)
        await cutter
        last = {job_id: await wait_terminal(http, url, job_id, 60) for job_id in ids}
    report = Report("bulk retry")
    await count_outcomes(rabbit.url, prefix, report)

    runs = collections.Counter(
        words[0] for words in map(str.split, log.read_text().splitlines()) if words[3] == "ok"
    )
    twice = [job_id for job_id, n in runs.items() if n > 1]
    statuses = collections.Counter(job["status"] for job in last.values())
    retried = sum(body["count"] for status, body in answers if status == 200)
    print(
        f"\nbulk retry of {JOBS} dead letters, link cut mid-way: answers"
        f" {collections.Counter(status for status, _ in answers)}, {retried} retried in all,"
        f" statuses {dict(statuses)}; ran twice {len(twice)}"
    )
    assert any(status == 503 or body.get("left") for status, body in answers), (
        "the cut stopped no retry: it came too late to test anything"
    )
    assert statuses == {"succeeded": JOBS}
    assert retried == JOBS
    # One outcome per run: `failed`, then `succeeded`.
    assert {report.outcomes[job_id] for job_id in ids} == {2}, report.outcomes_twice[:5]
    assert set(runs) == set(ids) and max(runs.values()) <= 2
    assert len(twice) <= BrokerSettings().prefetch, "more jobs ran twice than were delivered"
