"""State that outlives `result_ttl` (RELIABILITY row 28), on both brokers.

A job that is not terminal is never forgotten, however old; a finished one is forgotten
`result_ttl` after it finished, and a message of a job forgotten since never runs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from aioqueue import Context
from aioqueue.jobs import JobStatus
from aioqueue.store import JobFilter
from tests.test_service import dead_letter_ids, make_app, make_service, until_terminal

__all__ = ["make_service"]  # a fixture, used by name

THIRTY_DAYS = 30 * 86400


async def test_a_cancelled_delayed_job_never_runs_after_its_record_expired(
    make_service: Any,
) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs), result_ttl=2)
    job = await service.jobs.submit({"task": "add", "args": [1], "delay": 4})
    assert (await service.jobs.cancel(job.id)).status is JobStatus.CANCELLED
    await asyncio.sleep(1)
    service.store.expire()  # as the service's own expiry does, every second here
    assert service.store.get(job.id).status is JobStatus.CANCELLED  # kept for result_ttl
    await asyncio.sleep(1.5)
    service.store.expire()
    assert service.store.get(job.id) is None
    # When it comes due, its message finds no record: it is kept as a dead letter, not run.
    deadline = time.monotonic() + 10
    while job.id not in await dead_letter_ids(service):
        assert time.monotonic() < deadline, "the message of the cancelled job never came due"
        await asyncio.sleep(0.2)
    assert runs == []
    assert service.store.get(job.id) is None


async def test_a_job_waiting_longer_than_result_ttl_is_kept_until_it_ends(
    make_service: Any,
) -> None:
    app = make_app([])
    release = asyncio.Event()

    @app.task
    async def blocker(ctx: Context) -> None:
        async with asyncio.timeout(20):
            await release.wait()

    service = await make_service(app, broker={"prefetch": 1}, result_ttl=1)
    first = await service.jobs.submit({"task": "blocker"})
    await service.store.wait_for(first.id, lambda j: j.status is JobStatus.RUNNING, 10)
    waiting = await service.jobs.submit({"task": "blocker"})
    behind = await service.jobs.submit({"task": "add", "args": [2]})  # queued behind both
    await asyncio.sleep(1.5)
    service.store.expire()
    assert service.store.get(behind.id).status is JobStatus.QUEUED
    page, _ = service.store.list(JobFilter({JobStatus.QUEUED}))
    assert {j.id for j in page} == {waiting.id, behind.id}
    release.set()
    assert (await until_terminal(service, behind.id)).status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    "broker_url", [pytest.param("amqp", marks=pytest.mark.amqp)], indirect=True
)
async def test_a_thirty_day_delay_survives_restarts_and_is_cancelled_after_one(
    make_service: Any,
) -> None:
    """On RabbitMQ (memory:// keeps nothing across a restart, as it says at start-up)."""
    app = make_app([])
    first = await make_service(app, result_ttl=2)
    job = await first.jobs.submit({"task": "add", "args": [1], "delay": THIRTY_DAYS})
    entries = first.log.entries_applied
    await first.close()

    second = await make_service(app, result_ttl=2)
    # It resumed from its saved store: it applied only what came after (its start-up barrier).
    assert second.log.entries_applied <= 2 < entries + 2
    again = second.store.get(job.id)
    assert again is not None and again.status is JobStatus.SCHEDULED
    assert again.scheduled_for == pytest.approx(job.created_at + THIRTY_DAYS, abs=1)
    await asyncio.sleep(2.5)
    second.store.expire()
    assert (await second.jobs.cancel(job.id)).status is JobStatus.CANCELLED
    await second.close()

    third = await make_service(app, result_ttl=2)
    assert third.store.get(job.id).status is JobStatus.CANCELLED
