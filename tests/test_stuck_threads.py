"""Sync tasks that run on past their attempt (issue 9, item 4): the thread, which cannot be
stopped, keeps a slot of its queue until it returns, and /readyz counts it.

Each stuck task here loops until its test sets a `threading.Event`, and for `SPIN_LIMIT` seconds
at most, so that no thread outlives a failed test for long.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from aioqueue import App, Settings, SyncContext
from aioqueue.broker.base import Delivery
from aioqueue.config import BrokerSettings, JobsSettings, StoreSettings
from aioqueue.jobs import Job, JobStatus
from aioqueue.service import Service
from aioqueue.web.app import create_app
from aioqueue.web.state import STATE
from tests.support import client_ready, eventually

Client = TestClient[web.Request, web.Application]
Serve = Callable[..., Awaitable[Client]]
SPIN_LIMIT = 20.0


def stuck_app(release: threading.Event, ran: list[str], timeout: float = 0.3) -> App:
    app = App()

    @app.task(queue="narrow", timeout=timeout, max_attempts=2, retry_backoff=0.0)
    def spin(ctx: SyncContext) -> int:
        """Ignores its timeout: runs until released (a loop that never checks a deadline)."""
        ran.append(f"spin {ctx.attempt}")
        end = time.monotonic() + SPIN_LIMIT
        while not release.wait(0.01) and time.monotonic() < end:
            pass
        return ctx.attempt

    @app.task(queue="narrow", timeout=1.0)  # within the consumer_timeout of the last test
    def narrow(label: str) -> str:
        ran.append(label)
        return label

    @app.task(queue="other", timeout=1.0)
    def other(label: str) -> str:
        ran.append(label)
        return label

    return app


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], prefix: str, tmp_path: Path
) -> Serve:
    """A factory: `app` served on a broker with one slot per queue, once /readyz says so."""

    async def start(app: App, broker_url: str, **broker: Any) -> Client:
        settings = Settings(
            broker=BrokerSettings(
                url=broker_url, prefix=prefix, confirm_timeout=3.0, prefetch=1, **broker
            ),
            jobs=JobsSettings(shutdown_grace=0.2),
            store=StoreSettings(dir=str(tmp_path)),
        )
        client = await aiohttp_client(create_app(app, settings))
        await client_ready(client)
        return client

    return start


def service_of(client: Client) -> Service:
    service = client.app[STATE].service
    assert service is not None
    return service


async def until_terminal(service: Service, job_id: str, deadline: float = 15.0) -> Job:
    await service.store.wait_terminal(job_id, deadline)
    job = service.store.get(job_id)
    assert job is not None and job.terminal, job
    return job


def status(service: Service, job: Job) -> JobStatus:
    record = service.store.get(job.id)
    assert record is not None
    return record.status


async def readiness(client: Client) -> Any:
    response = await client.get("/readyz")
    assert response.status == 200
    return await response.json()


async def test_a_timed_out_sync_task_keeps_its_queues_slot_until_its_thread_returns(
    serve: Serve, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aioqueue.runner")
    release, ran = threading.Event(), list[str]()
    client = await serve(stuck_app(release, ran), broker_url)
    service = service_of(client)
    try:
        job = await service.jobs.submit({"task": "spin"})
        retrying = await service.store.wait_for(
            job.id, lambda j: j.status is JobStatus.RETRYING, 10
        )
        # Attempt 1 recorded failed at its timeout (attempt 2 is next), while its thread runs on.
        assert retrying is not None and retrying.error is not None
        assert (retrying.attempt, retrying.error["type"]) == (2, "TimeoutError")
        assert service.runner.stuck_threads == 1
        assert service.runner.stuck_threads_by_queue == {"narrow": 1}
        behind = await service.jobs.submit({"task": "narrow", "args": ["narrow"]})
        # Time for attempt 2 and the job behind it to start, were the slot free: attempt 2
        # would be stuck too, and take the pool's last thread.
        await asyncio.sleep(0.5)
        assert ran == ["spin 1"]
        assert status(service, job) is JobStatus.RETRYING  # attempt 2 waits for the slot
        assert status(service, behind) is JobStatus.QUEUED
        # The pool has a thread for each slot of each queue (two here): the other queue's is free.
        elsewhere = await service.jobs.submit({"task": "other", "args": ["other"]})
        assert (await until_terminal(service, elsewhere.id)).status is JobStatus.SUCCEEDED
        assert await readiness(client) == {"status": "ready", "stuck_threads": 1}
        stuck = [r for r in caplog.records if r.levelno == logging.WARNING and job.id in r.message]
        assert len(stuck) == 1 and "(task spin)" in stuck[0].message
        assert "holding a slot of queue narrow" in stuck[0].message
    finally:
        release.set()
    done = await until_terminal(service, job.id)
    assert (done.status, done.attempt, done.result) == (JobStatus.SUCCEEDED, 2, 2)
    assert (await until_terminal(service, behind.id)).status is JobStatus.SUCCEEDED
    assert ran == ["spin 1", "other", "spin 2", "narrow"]
    assert service.runner.stuck_threads == 0 and service.runner.stuck_threads_by_queue == {}
    assert await readiness(client) == {"status": "ready", "stuck_threads": 0}
    back = [
        r for r in caplog.records if r.levelno == logging.INFO and "thread returned" in r.message
    ]
    assert len(back) == 1 and job.id in back[0].message


class Recorded(Delivery):
    """A job message handed to the runner by hand: says how the runner settled it."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.redelivered = False
        self.settled: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def ack(self) -> None:
        self.settled.set_result("acked")

    async def requeue(self) -> None:
        self.settled.set_result("requeued")


async def test_a_cancelled_sync_job_keeps_its_slot_and_a_shutdown_gives_back_those_behind_it(
    serve: Serve,
) -> None:
    """A cancel stops the job, not its thread: the slot stays taken. A shutdown then waits for
    no stuck thread, and gives back at once the jobs waiting for a slot that may never come."""
    release, ran = threading.Event(), list[str]()
    client = await serve(stuck_app(release, ran, timeout=30), "memory://")
    service = service_of(client)
    try:
        job = await service.jobs.submit({"task": "spin"})
        await eventually(lambda: ran == ["spin 1"], deadline=10)
        cancelled = await service.jobs.cancel(job.id)
        assert cancelled.status is JobStatus.CANCELLED
        await eventually(lambda: service.runner.stuck_threads == 1, deadline=5)
        behind = await service.jobs.submit({"task": "narrow", "args": ["narrow"]})
        waiting = Recorded(orjson.dumps(behind.spec(attempt=1)))
        handling = asyncio.create_task(service.runner.on_delivery(waiting))
        await asyncio.sleep(0.3)
        assert not waiting.settled.done() and ran == ["spin 1"]
        started = time.monotonic()
        async with asyncio.timeout(5):
            assert await service.shutdown(grace=10) == 0
            assert await waiting.settled == "requeued"
            await handling
        assert time.monotonic() - started < 2  # not the grace: nothing runs but a stuck thread
        assert ran == ["spin 1"] and service.runner.stuck_threads == 1
    finally:
        release.set()
    await eventually(lambda: service.runner.stuck_threads == 0, deadline=5)


@pytest.mark.parametrize(
    "broker_url", [pytest.param("amqp", marks=pytest.mark.amqp)], indirect=True
)
async def test_on_rabbitmq_a_job_behind_only_stuck_threads_goes_back_to_the_broker(
    serve: Serve, broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Held here for ever, it would be taken back by RabbitMQ's consumer_timeout, closing its
    channel; given back after a quarter of it (0.5 s here), another process may run it."""
    release, ran = threading.Event(), list[str]()
    # Each give-back counts toward the delivery limit: room for the test's few.
    client = await serve(
        stuck_app(release, ran), broker_url, consumer_timeout=2.0, delivery_limit=100
    )
    service = service_of(client)
    try:
        job = await service.jobs.submit({"task": "spin", "max_attempts": 1})
        assert (await until_terminal(service, job.id)).status is JobStatus.FAILED
        behind = await service.jobs.submit({"task": "narrow", "args": ["narrow"]})
        given_back = f"job {behind.id}: queue narrow: all 1 slots are held by stuck work"
        await eventually(lambda: given_back in caplog.text, deadline=10)
        assert ran == ["spin 1"]
    finally:
        release.set()
    assert (await until_terminal(service, behind.id)).status is JobStatus.SUCCEEDED
    assert ran == ["spin 1", "narrow"]
