"""The service in-process, on both brokers: submit, run, retry, fail, dedup, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from aioqueue import App, Conflict, Context, InvalidRequest, NotFound, Settings, SyncContext, runner
from aioqueue.broker.base import Delivery
from aioqueue.config import BrokerSettings, JobsSettings, StoreSettings
from aioqueue.errors import BrokerUnavailable, QueueFull
from aioqueue.events import JobSpec
from aioqueue.jobs import Job, JobStatus
from aioqueue.service import Service
from tests.support import eventually

TERMINAL = {"succeeded", "failed", "dead", "cancelled"}


def make_app(runs: list[tuple[str, int]]) -> App:
    app = App()

    @app.task
    async def add(ctx: Context, a: int, b: int = 0) -> int:
        runs.append((ctx.job_id, ctx.attempt))
        await ctx.progress(0.5, "adding")
        return a + b

    @app.task
    def square(ctx: SyncContext, x: int) -> int:
        runs.append((ctx.job_id, ctx.attempt))
        ctx.progress(1.0, "squared")
        return x * x

    @app.task(max_attempts=3, retry_backoff=0.0)
    async def broken(ctx: Context) -> None:
        runs.append((ctx.job_id, ctx.attempt))
        raise RuntimeError(f"broken on attempt {ctx.attempt}")

    @app.task(max_attempts=1, timeout=0.2)
    async def sleepy(seconds: float) -> None:
        await asyncio.sleep(seconds)

    @app.task(max_attempts=1)
    async def unserialisable() -> object:
        return object()

    @app.task
    async def parent(ctx: Context) -> str:
        child = await ctx.submit("add", {"a": 2, "b": 3})
        return str(child["id"])

    return app


@pytest.fixture
async def make_service(
    broker_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Service] = []

    async def make(app: App, broker: dict[str, Any] | None = None, **jobs: Any) -> Service:
        settings = Settings(
            broker=BrokerSettings(
                url=broker_url, prefix=prefix, confirm_timeout=3.0, **(broker or {})
            ),
            jobs=dataclasses.replace(JobsSettings(), **jobs),
            store=StoreSettings(dir=str(tmp_path)),
        )
        service = Service(app, settings)
        async with asyncio.timeout(30):
            await service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        await service.close()


async def until_terminal(service: Service, job_id: str, deadline: float = 15.0) -> Job:
    await service.store.wait_terminal(job_id, deadline)
    job = service.store.get(job_id)
    assert job is not None and job.terminal, job
    return job


async def test_a_job_runs_and_its_result_is_recorded(make_service: Any) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    events: list[str] = []
    service.store.listeners.append(lambda event, job: events.append(event))
    job = await service.jobs.submit({"task": "add", "args": {"a": 1, "b": 2}})
    assert job.status.value == "queued"
    done = await until_terminal(service, job.id)
    assert done.to_dict()["result"] == 3 and done.status.value == "succeeded"
    assert done.progress == {"value": 0.5, "message": "adding"}
    assert events == ["queued", "started", "progress", "succeeded"]
    assert runs == [(job.id, 1)]


async def test_a_sync_task_runs_in_a_thread_with_blocking_progress(make_service: Any) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    job = await service.jobs.submit({"task": "square", "args": [7]})
    done = await until_terminal(service, job.id)
    assert (done.status.value, done.result, done.progress) == (
        "succeeded",
        49,
        {"value": 1.0, "message": "squared"},
    )


async def test_a_failing_task_is_retried_then_failed_and_dead_lettered(make_service: Any) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    job = await service.jobs.submit({"task": "broken"})
    done = await until_terminal(service, job.id)
    assert done.status.value == "failed"
    assert done.attempt == 3
    assert done.error is not None and done.error["message"] == "broken on attempt 3"
    assert "RuntimeError" in done.error["traceback"]
    assert runs == [(job.id, 1), (job.id, 2), (job.id, 3)]
    assert await dead_letter_ids(service) == [job.id]


async def dead_letter_ids(service: Service) -> list[str]:
    """Ids of the job messages in the dead-letter queue (read without consuming them)."""
    broker: Any = service.broker
    if hasattr(broker, "dead_letters"):
        return [orjson.loads(body)["id"] for body, _ in broker.dead_letters]
    import aio_pika

    connection = await aio_pika.connect(service.settings.broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(broker.names["dlq"], passive=True)
        ids = []
        while (message := await queue.get(fail=False, no_ack=False)) is not None:
            ids.append(orjson.loads(message.body)["id"])
        return ids  # the channel closes unacked: the messages stay in the queue


async def test_a_job_requeued_past_the_delivery_limit_is_recorded_dead(
    make_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every requeue counts toward broker.delivery_limit, on memory:// as on RabbitMQ: a job
    whose outcome can never be recorded runs limit + 1 times, then is `dead`, dead-lettered."""
    monkeypatch.setattr(runner, "REQUEUE_AFTER", 0.05)
    app = App()
    runs: list[int] = []

    @app.task
    async def unrecordable(ctx: Context) -> None:
        runs.append(ctx.attempt)
        # What a task meets when the broker goes away under it (in ctx.submit, say): no outcome
        # can be recorded, so the runner gives the message back.
        raise BrokerUnavailable("the broker went away")

    service = await make_service(app, broker={"delivery_limit": 2})
    job = await service.jobs.submit({"task": "unrecordable"})
    done = await until_terminal(service, job.id)
    assert done.status.value == "dead" and done.error is not None
    assert done.error["message"] == "dead-lettered by the broker: delivery_limit"
    assert runs == [1, 1, 1]
    # RabbitMQ keeps the message in the DLQ just after the job is recorded dead.
    async with asyncio.timeout(10):
        while job.id not in await dead_letter_ids(service):  # noqa: ASYNC110 - polls the broker
            await asyncio.sleep(0.1)


async def test_per_job_max_attempts_overrides_the_task(make_service: Any) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    job = await service.jobs.submit({"task": "broken", "max_attempts": 1})
    done = await until_terminal(service, job.id)
    assert (done.status.value, len(runs)) == ("failed", 1)


async def test_a_task_past_its_timeout_is_cancelled_and_failed(make_service: Any) -> None:
    service = await make_service(make_app([]))
    started = time.monotonic()
    job = await service.jobs.submit({"task": "sleepy", "args": {"seconds": 30}})
    done = await until_terminal(service, job.id)
    assert done.status.value == "failed" and done.error is not None
    assert done.error["type"] == "TimeoutError"
    assert "timed out after 0.2 s" in done.error["message"]
    assert time.monotonic() - started < 5


async def test_a_result_that_is_not_json_fails_the_job_without_a_retry(make_service: Any) -> None:
    """The task ran to its end: another attempt would only repeat its work and its value."""
    service = await make_service(make_app([]))
    job = await service.jobs.submit({"task": "unserialisable", "max_attempts": 3})
    done = await until_terminal(service, job.id)
    assert (done.status.value, done.attempt) == ("failed", 1) and done.error is not None
    assert done.error["type"] == "TypeError"
    assert done.error["message"].startswith("the task returned a value that is not JSON")
    assert await dead_letter_ids(service) == [job.id]


async def test_a_result_over_max_result_bytes_fails_the_job_at_once(make_service: Any) -> None:
    """jobs.max_result_bytes: a result of exactly that many bytes of JSON is kept; one byte
    more, and the job fails at once (ResultTooLarge, no retry: the task would run again, side
    effects and all, to return as much), its result kept nowhere."""
    app = App()
    runs: list[int] = []

    @app.task(max_attempts=3, retry_backoff=0.0)
    async def sized(ctx: Context, size: int) -> str:
        runs.append(ctx.attempt)
        return "x" * (size - 2)  # a JSON string: its quotes are 2 bytes

    service = await make_service(app, max_result_bytes=1024)
    fits = await service.jobs.submit({"task": "sized", "args": [1024]})
    done = await until_terminal(service, fits.id)
    assert (done.status.value, len(done.result)) == ("succeeded", 1022)
    over = await service.jobs.submit({"task": "sized", "args": [1025]})
    done = await until_terminal(service, over.id)
    assert (done.status.value, done.attempt, done.result) == ("failed", 1, None)
    assert done.error == {
        "type": "ResultTooLarge",
        "message": "the task returned 1025 bytes of JSON; at most 1024 are kept"
        " (jobs.max_result_bytes): return a reference to the data (a URL, a key), not the data",
    }
    assert runs == [1, 1]
    assert await dead_letter_ids(service) == [over.id]


async def test_a_task_can_submit_another_job(make_service: Any) -> None:
    service = await make_service(make_app([]))
    job = await service.jobs.submit({"task": "parent"})
    done = await until_terminal(service, job.id)
    child = await until_terminal(service, done.result)
    assert (child.task, child.result) == ("add", 5)


async def test_a_copy_of_a_finished_jobs_message_is_acked_without_running(
    make_service: Any,
) -> None:
    """At-most-once outcome: a second delivery of a recorded job does not run it again."""
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    job = await service.jobs.submit({"task": "add", "args": {"a": 1}})
    done = await until_terminal(service, job.id)
    await service.broker.publish(orjson.dumps(done.spec(attempt=1)), "default")
    stale = await service.jobs.submit({"task": "add", "args": {"a": 2}})  # runs after the copy
    await until_terminal(service, stale.id)
    assert runs == [(job.id, 1), (stale.id, 1)]
    assert service.store.get(job.id).result == 1


@pytest.mark.parametrize(
    ("body", "error"),
    [
        pytest.param({"task": "add", "args": {"a": "1"}}, InvalidRequest, id="ill-typed"),
        pytest.param({"task": "add", "args": {}}, InvalidRequest, id="missing"),
        pytest.param({"task": "add", "args": {"a": 1, "c": 2}}, InvalidRequest, id="unknown-arg"),
        pytest.param({"task": "add", "args": [1, 2, 3]}, InvalidRequest, id="too-many"),
        pytest.param({"task": "add", "args": "1"}, InvalidRequest, id="args-not-container"),
        pytest.param({"task": "nope"}, NotFound, id="unknown-task"),
        pytest.param({"task": "add", "args": [1], "queue": "q2"}, InvalidRequest, id="bad-queue"),
        pytest.param({"task": "add", "args": [1], "extra": 1}, InvalidRequest, id="unknown-field"),
        pytest.param({"task": "add", "args": [1], "ttl": 0}, InvalidRequest, id="ttl-zero"),
        pytest.param(
            {"task": "add", "args": [1], "priority": 10}, InvalidRequest, id="priority-10"
        ),
        pytest.param(
            {"task": "add", "args": [1], "priority": True}, InvalidRequest, id="priority-bool"
        ),
        pytest.param(
            {"task": "add", "args": [1], "delay": -1}, InvalidRequest, id="negative-delay"
        ),
        pytest.param(
            {"task": "add", "args": [1], "delay": 1, "run_at": "2030-01-01T00:00:00Z"},
            InvalidRequest,
            id="delay-and-run-at",
        ),
        pytest.param(
            {"task": "add", "args": [1], "run_at": "2030-01-01T00:00:00"},
            InvalidRequest,
            id="run-at-no-zone",
        ),
        pytest.param(
            {"task": "add", "args": [1], "run_at": "soon"}, InvalidRequest, id="run-at-not-a-time"
        ),
        pytest.param(
            {"task": "add", "args": [1], "run_at": "20301201T000000Z"},
            InvalidRequest,
            id="run-at-basic-iso-format",
        ),
        pytest.param(
            {"task": "add", "args": [1], "run_at": "2030-W01-1T00:00:00Z"},
            InvalidRequest,
            id="run-at-week-date",
        ),
        pytest.param({"task": "add", "args": [1], "timeout": -1}, InvalidRequest, id="timeout"),
        pytest.param([1, 2], InvalidRequest, id="not-an-object"),
    ],
)
async def test_a_bad_submit_is_refused_and_leaves_no_trace(
    make_service: Any, body: Any, error: type[Exception]
) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    with pytest.raises(error):
        await service.jobs.submit(body)
    await service.log.barrier()
    assert len(service.store) == 0
    good = await service.jobs.submit({"task": "add", "args": [1]})
    await until_terminal(service, good.id)
    assert runs == [(good.id, 1)]  # nothing of the bad submit was queued ahead of it


async def test_state_survives_a_restart_on_a_durable_broker(
    make_service: Any, broker_url: str
) -> None:
    """Jobs finished before a restart are still there after it (RabbitMQ: the event log)."""
    app = make_app([])
    first = await make_service(app)
    job = await first.jobs.submit({"task": "add", "args": {"a": 20, "b": 22}})
    await until_terminal(first, job.id)
    await first.close()
    second = await make_service(app)
    again = second.store.get(job.id)
    if broker_url.startswith("memory"):
        assert again is None  # the embedded broker keeps nothing, as it says at start-up
    else:
        assert again is not None and again.to_dict() == first.store.get(job.id).to_dict()


async def test_a_job_of_a_task_this_app_lacks_is_dead_and_dead_lettered(make_service: Any) -> None:
    """A message this process cannot run (no such task here) is recorded `dead`, not lost."""
    service = await make_service(make_app([]))
    spec = JobSpec("ghost-job", "ghost", "default", None, 1, 1.0, time.time())
    events: list[str] = []
    service.store.listeners.append(lambda event, job: events.append(event))
    await service.log.submit(spec)  # as a process with that task would have
    done = await until_terminal(service, "ghost-job")
    assert done.status.value == "dead" and done.error is not None
    assert done.error["type"] == "UnknownTask"
    assert events == ["queued", "dead"]
    assert await dead_letter_ids(service) == ["ghost-job"]


async def test_a_delayed_job_is_scheduled_then_runs_when_due(make_service: Any) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    events: list[str] = []
    service.store.listeners.append(lambda event, job: events.append(event))
    job = await service.jobs.submit({"task": "add", "args": [1], "delay": 2})
    assert job.status.value == "scheduled"
    assert job.scheduled_for == pytest.approx(job.created_at + 2)
    done = await until_terminal(service, job.id)
    assert done.status.value == "succeeded" and done.started_at is not None
    assert 1.5 <= done.started_at - done.created_at < 4.0  # whole seconds on RabbitMQ
    assert events[:2] == ["scheduled", "started"]


async def test_a_long_delay_never_holds_back_a_short_one(make_service: Any) -> None:
    service = await make_service(make_app([]))
    later = await service.jobs.submit({"task": "add", "args": [1], "delay": 3600})
    soon = await service.jobs.submit({"task": "add", "args": [2], "delay": 1})
    done = await until_terminal(service, soon.id)
    assert done.started_at is not None and done.started_at - done.created_at < 3.0
    assert service.store.get(later.id).status.value == "scheduled"


async def test_run_at_in_the_past_runs_now(make_service: Any) -> None:
    service = await make_service(make_app([]))
    job = await service.jobs.submit({"task": "add", "args": [1], "run_at": "2000-01-01T00:00:00Z"})
    assert job.status.value == "queued"
    assert (await until_terminal(service, job.id)).status.value == "succeeded"


async def test_a_queued_job_cancelled_never_runs(make_service: Any) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    job = await service.jobs.submit({"task": "add", "args": [1], "delay": 1})
    cancelled = await service.jobs.cancel(job.id)
    assert cancelled.status.value == "cancelled"
    after = await service.jobs.submit(
        {"task": "add", "args": [2], "delay": 2}
    )  # due after the first
    await until_terminal(service, after.id)
    assert runs == [(after.id, 1)]


async def test_a_running_job_cancelled_is_stopped_and_its_cancel_path_runs(
    make_service: Any,
) -> None:
    app = make_app([])
    stopped: list[str] = []
    cancelled_path_ran = asyncio.Event()

    @app.task
    async def forever(ctx: Context) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.append(ctx.job_id)
            cancelled_path_ran.set()
            raise

    service = await make_service(app)
    job = await service.jobs.submit({"task": "forever"})
    await service.store.wait_for(job.id, lambda j: j.status.value == "running", 10)
    await service.jobs.cancel(job.id)
    await asyncio.wait_for(cancelled_path_ran.wait(), 10)
    assert stopped == [job.id]
    assert service.store.get(job.id).status.value == "cancelled"
    with pytest.raises(Conflict):
        await service.jobs.cancel(job.id)


async def test_a_failed_job_retried_runs_again_from_attempt_one(make_service: Any) -> None:
    runs: list[tuple[str, int]] = []
    service = await make_service(make_app(runs))
    job = await service.jobs.submit({"task": "broken", "max_attempts": 1})
    await until_terminal(service, job.id)
    with pytest.raises(Conflict):
        await service.jobs.retry((await service.jobs.submit({"task": "add", "args": [1]})).id)
    retried = await service.jobs.retry(job.id)
    assert (retried.status.value, retried.attempt, retried.error) == ("queued", 1, None)
    done = await until_terminal(service, job.id)
    assert (done.status.value, done.run, done.attempt) == ("failed", 1, 1)
    assert [run for run in runs if run[0] == job.id] == [(job.id, 1), (job.id, 1)]


@pytest.mark.parametrize(
    "broker_url", [pytest.param("amqp", marks=pytest.mark.amqp)], indirect=True
)
async def test_one_key_submitted_to_two_processes_at_once_makes_one_job(make_service: Any) -> None:
    """Across processes the log decides: the first `queued` entry with a key wins everywhere."""
    runs: list[tuple[str, int]] = []
    app = make_app(runs)
    first, second = await make_service(app), await make_service(app)
    body = {"task": "add", "args": [1], "idempotency_key": "once"}
    results = await asyncio.gather(
        *(service.jobs.submit_once(body) for service in [first, second] * 10)
    )
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    job_id = results[0][0].id
    await until_terminal(first, job_id)
    await asyncio.sleep(1.0)  # time for a duplicate's message to run, were it not skipped
    assert runs == [(job_id, 1)]
    assert len(first.store) == len(second.store) == 1


async def test_a_full_queue_refuses_with_429_and_keeps_no_trace(make_service: Any) -> None:
    """Backpressure: past broker.max_queue_length a submit is QueueFull and not accepted."""
    app = make_app([])
    release = asyncio.Event()

    @app.task(queue="narrow")
    async def blocker() -> None:
        await release.wait()

    service = await make_service(app, broker={"max_queue_length": 2, "prefetch": 1})
    running = await service.jobs.submit({"task": "blocker"})
    await service.store.wait_for(running.id, lambda j: j.status.value == "running", 10)
    waiting: list[Job] = []
    with pytest.raises(QueueFull):  # a quorum queue takes one past its limit
        for _ in range(5):
            waiting.append(await service.jobs.submit({"task": "blocker"}))
    assert 2 <= len(waiting) <= 3
    with pytest.raises(QueueFull):
        await service.jobs.submit({"task": "blocker", "idempotency_key": "refused"})
    await service.log.barrier()
    assert len(service.store) == 1 + len(waiting)  # the refused jobs left no record
    assert service.store.for_key("refused", None) is None
    release.set()
    for job in [running, *waiting]:
        assert (await until_terminal(service, job.id)).status.value == "succeeded"
    accepted = await service.jobs.submit({"task": "blocker", "idempotency_key": "refused"})
    assert (await until_terminal(service, accepted.id)).status.value == "succeeded"


async def test_a_retry_that_meets_a_full_queue_waits_and_keeps_its_attempts(
    make_service: Any,
) -> None:
    """A full queue refuses a retry's publish as it refuses a submit: the retry then waits for
    room (through the delay queues), rather than the same attempt running again and again
    until the delivery limit makes the job dead."""
    app = make_app([])
    fail_first = asyncio.Event()
    attempts: list[int] = []

    @app.task(queue="narrow", max_attempts=3, retry_backoff=0.0)
    async def flaky(ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            await fail_first.wait()  # fails once the queue behind it is full
        raise RuntimeError(f"attempt {ctx.attempt}")

    @app.task(queue="narrow")
    async def quick() -> None:
        pass

    service = await make_service(
        app, broker={"max_queue_length": 1, "prefetch": 1, "delivery_limit": 1}
    )
    job = await service.jobs.submit({"task": "flaky"})
    await service.store.wait_for(job.id, lambda j: j.status is JobStatus.RUNNING, 10)
    waiting: list[Job] = []
    with pytest.raises(QueueFull):  # a quorum queue takes one past its limit
        for _ in range(3):
            waiting.append(await service.jobs.submit({"task": "quick"}))
    fail_first.set()
    done = await until_terminal(service, job.id, deadline=30)
    assert (done.status, done.attempt) == (JobStatus.FAILED, 3), done.error
    assert done.error is not None and done.error["message"] == "attempt 3"
    assert attempts == [1, 2, 3]
    for other in waiting:
        assert (await until_terminal(service, other.id)).status is JobStatus.SUCCEEDED


async def test_higher_priorities_start_before_a_backlog_of_lower_ones(make_service: Any) -> None:
    """Priority holds within a queue: 3 urgent jobs submitted behind 20 others overtake them.

    The memory broker orders its queue exactly; RabbitMQ has one queue per priority band and the
    process picks by exact priority among what its band consumers hold, so an urgent job waits
    at most for the jobs already in the process's hands.
    """
    app = make_app([])
    release = asyncio.Event()
    started: list[str] = []

    @app.task(queue="ordered")
    async def blocker() -> None:
        await release.wait()

    @app.task(queue="ordered", priority=2)
    async def record(label: str) -> None:
        started.append(label)

    service = await make_service(app, broker={"prefetch": 1})
    first = await service.jobs.submit({"task": "blocker"})
    await service.store.wait_for(first.id, lambda j: j.status.value == "running", 10)
    jobs = [await service.jobs.submit({"task": "record", "args": [f"low{n}"]}) for n in range(20)]
    for n in range(3):
        job = await service.jobs.submit({"task": "record", "args": [f"high{n}"], "priority": 9})
        assert job.priority == 9
        jobs.append(job)
    assert jobs[0].priority == 2  # the task's default
    release.set()
    for job in jobs:
        assert (await until_terminal(service, job.id)).status.value == "succeeded"
    highs = [started.index(f"high{n}") for n in range(3)]
    assert highs == sorted(highs)  # in their own submit order
    assert max(highs) < started.index("low9"), started
    lows = [label for label in started if label.startswith("low")]
    assert lows == [f"low{n}" for n in range(20)]  # one band keeps its order


async def test_a_task_that_always_raises_retries_on_schedule_then_fails_once(
    make_service: Any,
) -> None:
    """RELIABILITY row 11: exactly max_attempts attempts, each retry within ±1 s of the time
    its `retrying` event gave, then `failed`, recorded once."""
    app = make_app([])
    starts: list[tuple[int, float]] = []

    @app.task(max_attempts=4, retry_backoff=1.0, retry_backoff_max=2.0)
    async def always_raises(ctx: Context) -> None:
        starts.append((ctx.attempt, time.time()))
        raise RuntimeError(f"attempt {ctx.attempt}")

    service = await make_service(app)
    due: list[float] = []
    outcomes: list[str] = []

    def on_change(event: str, job: Job) -> None:
        if job.task == "always_raises" and event == "retrying":
            assert job.scheduled_for is not None
            due.append(job.scheduled_for)
        elif job.task == "always_raises" and event in TERMINAL:
            outcomes.append(event)

    service.store.listeners.append(on_change)
    job = await service.jobs.submit({"task": "always_raises"})
    done = await until_terminal(service, job.id, deadline=30)
    assert done.status.value == "failed" and done.attempt == 4
    assert [attempt for attempt, _ in starts] == [1, 2, 3, 4]
    assert len(due) == 3
    for (_, started), scheduled in zip(starts[1:], due, strict=True):
        assert abs(started - scheduled) <= 1.0, (started, scheduled)
    await service.log.barrier()  # every event written so far is applied
    assert outcomes == ["failed"]


async def test_a_job_not_started_within_its_ttl_is_dead_and_never_runs(make_service: Any) -> None:
    app = make_app([])
    release = asyncio.Event()
    ran: list[str] = []

    @app.task(queue="slow")
    async def blocker() -> None:
        await release.wait()

    @app.task(queue="slow")
    async def note(label: str) -> None:
        ran.append(label)

    service = await make_service(app, broker={"prefetch": 1})
    first = await service.jobs.submit({"task": "blocker"})
    await service.store.wait_for(first.id, lambda j: j.status.value == "running", 10)
    stale = await service.jobs.submit({"task": "note", "args": ["stale"], "ttl": 0.5})
    fresh = await service.jobs.submit({"task": "note", "args": ["fresh"], "ttl": 600})
    await asyncio.sleep(1.0)  # the stale job's ttl runs out while it waits behind the blocker
    release.set()
    dead = await until_terminal(service, stale.id)
    assert dead.status.value == "dead" and dead.error is not None
    assert dead.error["type"] == "Expired"
    assert (await until_terminal(service, fresh.id)).status.value == "succeeded"
    assert ran == ["fresh"]
    assert stale.id in await dead_letter_ids(service)
    retried = await service.jobs.retry(stale.id)  # a retry is a new run, with no ttl
    assert retried.expires_at is None
    assert (await until_terminal(service, stale.id)).status.value == "succeeded"


@pytest.mark.parametrize(
    "broker_url", [pytest.param("amqp", marks=pytest.mark.amqp)], indirect=True
)
async def test_a_shutdown_gives_back_the_jobs_waiting_for_a_slot_and_they_run_later(
    make_service: Any,
) -> None:
    """On RabbitMQ a process holds more jobs than it runs (one consumer per priority band):
    past the grace period, those that never started go back to the broker, unrun."""
    app = make_app([])
    ran: list[str] = []

    @app.task(queue="one")
    async def hold(label: str, seconds: float) -> None:
        ran.append(label)
        await asyncio.sleep(seconds)

    first = await make_service(app, broker={"prefetch": 1})
    long = await first.jobs.submit({"task": "hold", "args": ["long", 60]})
    await first.store.wait_for(long.id, lambda j: j.status.value == "running", 10)
    urgent = await first.jobs.submit({"task": "hold", "args": ["urgent", 0], "priority": 9})
    await asyncio.sleep(0.5)  # delivered to the band consumer: it waits in the gate
    waiting = first.store.get(urgent.id)
    assert waiting is not None and waiting.status.value == "queued"
    assert await first.shutdown(grace=0.2) == 1  # the long job, cancelled and given back
    await first.close()
    assert ran == ["long"]  # the urgent job never started here
    second = await make_service(app, broker={"prefetch": 1})
    await second.jobs.cancel(long.id)  # it would hold the one slot here for a minute again
    assert (await until_terminal(second, long.id)).status.value == "cancelled"
    assert (await until_terminal(second, urgent.id)).status.value == "succeeded"
    assert ran.count("urgent") == 1


@pytest.mark.parametrize(
    "broker_url", [pytest.param("amqp", marks=pytest.mark.amqp)], indirect=True
)
async def test_a_consumer_cancelled_by_the_broker_is_noticed_and_the_service_recovers(
    make_service: Any,
) -> None:
    """RabbitMQ cancels the consumer of a deleted queue (basic.cancel) and leaves its channel
    open. The service must not stay ready with no consumer: problem() says so at once, then the
    service declares the queue again, attaches its consumer, and runs jobs."""
    import aio_pika

    service = await make_service(make_app([]))
    assert service.problem() is None
    name = service.broker.queue_name("default")
    async with await aio_pika.connect(service.settings.broker.url) as connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
        await eventually(lambda: service.problem() is not None, deadline=5)
        assert name in (service.problem() or "")
        await eventually(lambda: service.problem() is None, deadline=30)
        queue = await channel.declare_queue(name, passive=True)  # raises if not declared
        assert queue.declaration_result.consumer_count == 1
    job = await service.jobs.submit({"task": "add", "args": [1]})
    assert (await until_terminal(service, job.id)).status is JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    "run_at", ["2000-01-01t00:00:00z", "2000-01-01T00:00:00.5+02:00", "2000-01-01 00:00:00Z"]
)
async def test_run_at_takes_every_rfc3339_form(make_service: Any, run_at: str) -> None:
    service = await make_service(make_app([]))
    job = await service.jobs.submit({"task": "add", "args": [1], "run_at": run_at})
    assert (await until_terminal(service, job.id)).status.value == "succeeded"


class RedeliveredCopy(Delivery):
    """A second copy of a job's message, as the broker redelivers it when a channel closes
    under the first (RabbitMQ's consumer_timeout, say); says how the runner settled it."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.redelivered = True
        self.settled: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def ack(self) -> None:
        self.settled.set_result("acked")

    async def requeue(self) -> None:
        self.settled.set_result("requeued")


def stubborn_app(release: asyncio.Event, runs: list[int]) -> App:
    app = App()

    @app.task(max_attempts=1, timeout=0.2)
    async def stubborn(ctx: Context) -> str:
        """Runs until released, past its timeout too: a task that swallows its cancellation."""
        runs.append(ctx.attempt)
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()
        return "released"

    return app


async def copy_of_running_job(service: Service) -> tuple[Job, RedeliveredCopy]:
    job = await service.jobs.submit({"task": "stubborn"})
    await service.store.wait_for(job.id, lambda j: j.status is JobStatus.RUNNING, 10)
    copy = RedeliveredCopy(orjson.dumps(job.spec(attempt=1)))
    return job, copy


async def test_a_copy_redelivered_while_the_job_runs_here_waits_for_its_outcome(
    make_service: Any,
) -> None:
    release, runs = asyncio.Event(), list[int]()
    service = await make_service(stubborn_app(release, runs))
    job, copy = await copy_of_running_job(service)
    handling = asyncio.create_task(service.runner.on_delivery(copy))
    try:
        await asyncio.sleep(0.5)
        assert not copy.settled.done()  # waiting for the first copy
    finally:
        release.set()
    async with asyncio.timeout(10):
        assert await copy.settled == "acked"
        await handling
    assert (await until_terminal(service, job.id)).result == "released"
    assert runs == [1]


async def test_a_copy_waits_for_a_stuck_first_copy_only_so_long_then_goes_back(
    make_service: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A first copy still running well past its timeout is a bug; the copy must not hold its
    slot for ever: it is requeued, and the log says where the first copy waits."""
    monkeypatch.setattr(runner, "FIRST_COPY_MARGIN", 0.5)
    release, runs = asyncio.Event(), list[int]()
    service = await make_service(stubborn_app(release, runs))
    job, copy = await copy_of_running_job(service)
    try:
        async with asyncio.timeout(10):
            await service.runner.on_delivery(copy)
        assert copy.settled.result() == "requeued"
        assert "its first copy is still running" in caplog.text and "stubborn" in caplog.text
    finally:
        release.set()
    assert (await until_terminal(service, job.id)).status is JobStatus.SUCCEEDED
    assert runs == [1]
