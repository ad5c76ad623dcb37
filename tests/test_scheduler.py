"""The scheduler: what the leader submits, from where it goes on, what it does when a submit
fails, and that it stops the moment it no longer leads. First with a fake submit and record (the
clock is real: schedules of a tenth of a second), then served in-process on memory://, where the
one process leads: ticks submitted with their keys, the record of the latest tick, and
`GET /v1/schedules`."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import jsonschema_rs
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from aioqueue import App, Conflict, Settings
from aioqueue.errors import BrokerUnavailable
from aioqueue.jobs import Job
from aioqueue.periodic import Every, Periodic, parse_tick, tick_key
from aioqueue.scheduler import Scheduler
from aioqueue.store import JobFilter
from aioqueue.web.app import create_app
from aioqueue.web.state import STATE
from tests.support import eventually

Client = TestClient[web.Request, web.Application]


class Record:
    """A fake `TickRecord`: the latest tick per task, set by the test."""

    def __init__(self, **last: int) -> None:
        self.ticks = last

    def last(self, task: str) -> tuple[int, str] | None:
        tick = self.ticks.get(task)
        return None if tick is None else (tick, f"job-{tick}")


class Submits:
    """A fake `Jobs.submit_once`: records each call's key, and fails while `failures` says."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.calls: list[tuple[Any, str | None, str | None]] = []
        self.failures: list[Exception] = []

    async def __call__(self, body: Any, key: str | None, owner: str | None) -> tuple[Job, bool]:
        self.calls.append((body, key, owner))
        if self.failures:
            raise self.failures.pop(0)
        assert key is not None
        self.keys.append(key)
        job = Job(id=key, task=body["task"], queue="default", args=None, max_attempts=1,
                  timeout=1.0, created_at=time.time())  # fmt: skip
        return job, True

    def ticks(self, task: str = "beat") -> list[int]:
        prefix = f"periodic:{task}:"
        found = [parse_tick(key.removeprefix(prefix)) for key in self.keys]
        assert None not in found
        return found  # type: ignore[return-value]


def now_ms() -> int:
    return int(time.time() * 1000)


def scheduler(
    submits: Submits,
    record: Record,
    *periodics: Periodic,
    barrier: Callable[[], Awaitable[None]] | None = None,
) -> Scheduler:
    async def no_wait() -> None:
        return None

    schedules = {p.task: p for p in periodics or (Periodic("beat", Every.of(0.1)),)}
    return Scheduler(schedules, submits, barrier or no_wait, record)


async def lead_until(runner: Scheduler, submits: Submits, count: int, within: float = 3.0) -> None:
    """Lead until the runner has submitted `count` ticks (or fail after `within` s), then close
    it."""
    runner.on_leader_change(True)
    try:
        await eventually(lambda: len(submits.keys) >= count, within)
    finally:
        await runner.close()


def consecutive(ticks: list[int], period: int) -> bool:
    return all(b - a == period for a, b in itertools.pairwise(ticks))


async def test_a_new_schedule_starts_with_the_next_tick_and_misses_none() -> None:
    submits = Submits()
    runner = scheduler(submits, Record())
    started = now_ms()
    await lead_until(runner, submits, 5)
    ticks = submits.ticks()
    assert started < ticks[0] <= started + 100  # the first tick after it began to lead
    assert consecutive(ticks, 100), ticks
    # The body is the task alone (so that two leaders' submits are the same request), no owner.
    assert {(str(body), owner) for body, _, owner in submits.calls} == {("{'task': 'beat'}", None)}


async def test_a_new_leader_reads_the_log_to_its_end_before_it_submits() -> None:
    submits, order = Submits(), []

    async def barrier() -> None:
        order.append(f"barrier after {len(submits.calls)} submits")
        if len(order) < 3:
            raise BrokerUnavailable("the broker is away")

    runner = scheduler(submits, Record(), barrier=barrier)
    await lead_until(runner, submits, 1)
    assert order == ["barrier after 0 submits"] * 3


async def test_ticks_missed_by_a_failover_are_each_submitted_late_then_on_time() -> None:
    """The log says the last tick was 2 s ago (the old leader died): the 20 ticks since are
    submitted at once, in order, and the schedule goes on."""
    submits = Submits()
    last = now_ms() // 100 * 100 - 2_000
    runner = scheduler(submits, Record(beat=last))
    await lead_until(runner, submits, 25)
    ticks = submits.ticks()
    assert ticks[0] == last + 100
    assert consecutive(ticks, 100), ticks


@pytest.mark.parametrize("catch_up", ["once", "skip"])
async def test_ticks_missed_past_grace_follow_the_catch_up_policy(catch_up: str) -> None:
    """Every process was down for 10 minutes (grace is 60 s)."""
    submits = Submits()
    beat = Periodic("beat", Every.of(0.5), catch_up)  # type: ignore[arg-type]
    runner = scheduler(submits, Record(beat=now_ms() // 500 * 500 - 600_000), beat)
    began = now_ms()
    await lead_until(runner, submits, 3)
    ticks = submits.ticks()
    if catch_up == "once":
        # The latest tick due, at once: one job for the ten minutes.
        assert ticks[0] == began // 500 * 500 and ticks[0] <= began
    else:
        assert ticks[0] > began  # none of them: the next tick to come
    assert consecutive(ticks, 500), ticks


async def test_a_tick_whose_submit_fails_is_tried_again_and_none_is_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("aioqueue.scheduler.RETRY_FIRST", 0.05)
    submits = Submits()
    submits.failures = [BrokerUnavailable("no confirm in time")] * 4
    runner = scheduler(submits, Record())
    await lead_until(runner, submits, 8, within=5)
    # The first tick was tried five times (0.05 + 0.1 + 0.2 + 0.4 s of back-off), then it and
    # the ticks that came due meanwhile went through, in order.
    assert [key for _, key, _ in submits.calls[:5]] == [submits.keys[0]] * 5
    assert consecutive(submits.ticks(), 100)


async def test_a_tick_that_can_never_be_submitted_is_passed_over() -> None:
    submits = Submits()
    submits.failures = [Conflict("idempotency key used for another request")]
    runner = scheduler(submits, Record())
    await lead_until(runner, submits, 2)
    refused = submits.calls[0][1]
    assert refused is not None and refused not in submits.keys
    assert submits.ticks()[0] == parse_tick(refused.removeprefix("periodic:beat:")) + 100  # type: ignore[operator]


async def test_a_process_that_no_longer_leads_submits_nothing_more() -> None:
    submits = Submits()
    record = Record()
    runner = scheduler(submits, record)
    runner.on_leader_change(True)
    await eventually(lambda: len(submits.keys) >= 2, 3)
    runner.on_leader_change(False)
    count = len(submits.calls)
    await asyncio.sleep(0.35)
    assert len(submits.calls) == count
    assert runner.describe()[0]["leader"] is False
    # Leading again, it goes on from the latest tick the log holds, not from its own memory.
    record.ticks["beat"] = submits.ticks()[-1]
    await lead_until(runner, submits, count + 4)
    assert consecutive(submits.ticks(), 100)


async def test_each_schedule_runs_on_its_own() -> None:
    """One schedule's failing submits hold back no other."""
    fast = Periodic("fast", Every.of(0.1))
    slow = Periodic("stuck", Every.of(0.1))
    submits = Submits()

    async def submit_once(body: Any, key: str | None, owner: str | None) -> tuple[Job, bool]:
        if body["task"] == "stuck":
            raise BrokerUnavailable("its queue's node is away")
        return await submits(body, key, owner)

    async def no_wait() -> None:
        return None

    runner = Scheduler({"fast": fast, "stuck": slow}, submit_once, no_wait, Record())
    await lead_until(runner, submits, 5)
    assert consecutive(submits.ticks("fast"), 100)


# Served, on memory:// ----------------------------------------------------------------------------


def make_app(every: float = 0.2) -> App:
    app = App()

    @app.periodic(every=every)
    async def beat(n: int = 1) -> int:
        return n

    @app.task
    async def plain(n: int) -> int:
        return n

    return app


async def serve(aiohttp_client: Callable[[web.Application], Awaitable[Client]], app: App) -> Client:
    client = await aiohttp_client(create_app(app, Settings()))
    await eventually(
        lambda: (service := client.app[STATE].service) is not None and service.problem() is None,
        10,
    )
    return client


async def test_served_ticks_submit_jobs_with_their_keys_and_the_jobs_run(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    client = await serve(aiohttp_client, make_app(every=0.2))
    service = client.app[STATE].service
    assert service is not None
    await eventually(lambda: len(service.jobs.list(JobFilter(task="beat"))[0]) >= 4, 5)
    jobs = service.jobs.list(JobFilter(task="beat"))[0][::-1]
    ticks = [parse_tick(str(job.idempotency_key).removeprefix("periodic:beat:")) for job in jobs]
    assert None not in ticks
    assert consecutive(ticks, 200), ticks  # type: ignore[arg-type]
    for job, tick in zip(jobs, ticks, strict=True):
        assert job.idempotency_key == tick_key("beat", tick)  # type: ignore[arg-type]
        assert job.owner is None and job.args is None
        assert job.created_at * 1000 >= tick  # type: ignore[operator]
    await eventually(lambda: service.jobs.known(jobs[0].id).status == "succeeded", 5)

    response = await client.get("/v1/schedules")
    assert response.status == 200
    (schedule,) = (await response.json())["schedules"]
    last = service.jobs.list(JobFilter(task="beat"))[0][0]
    assert schedule["task"] == "beat" and schedule["every"] == 0.2 and "cron" not in schedule
    assert schedule["leader"] is True
    assert (schedule["catch_up"], schedule["grace"]) == ("once", 60.0)
    assert schedule["last_job_id"] == last.id
    assert "periodic:beat:" + schedule["last_tick_at"] == last.idempotency_key
    next_tick = parse_tick(schedule["next_run_at"])
    assert next_tick is not None and next_tick > now_ms() - 200
    assert (await client.get("/v1/schedules?task=beat")).status == 400


async def test_the_schedules_answer_as_openapi_json_describes_it(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    app = make_app(every=3600)

    @app.periodic("30 4 * * MON", catch_up="skip", grace=5)
    async def weekly() -> None:
        return None

    client = await serve(aiohttp_client, app)
    document = await (await client.get("/openapi.json")).json()
    body = await (await client.get("/v1/schedules")).json()
    schemas = document["components"]["schemas"]
    # The one reference it has, inlined: a validator of the schema alone.
    schema = {**schemas["ScheduleList"], "$defs": {"Schedule": schemas["Schedule"]}}
    schema["properties"]["schedules"]["items"] = {"$ref": "#/$defs/Schedule"}
    jsonschema_rs.Draft202012Validator(schema).validate(body)
    assert [(s["task"], s.get("cron"), s.get("every")) for s in body["schedules"]] == [
        ("beat", None, 3600.0),
        ("weekly", "30 4 * * MON", None),
    ]
    next_run = parse_tick(body["schedules"][1]["next_run_at"])
    assert next_run is not None
    assert datetime.fromtimestamp(next_run / 1000, UTC).strftime("%a %H:%M") == "Mon 04:30"
    responses = document["paths"]["/v1/schedules"]["get"]["responses"]
    assert set(responses) == {"200", "400", "503"}


async def test_the_record_keeps_only_ticks_a_leader_could_have_submitted(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    client = await serve(aiohttp_client, make_app(every=3600))  # no tick during the test
    service = client.app[STATE].service
    assert service is not None and service.scheduler is not None
    record = service.scheduler._record
    hour = 3_600_000
    past, future = now_ms() // hour * hour - hour, now_ms() // hour * hour + 24 * hour
    # A key of a time to come (it would hold the schedule back until then), and one of a
    # principal's (its keys are its own, whatever they look like): neither is recorded.
    await service.jobs.submit({"task": "beat"}, tick_key("beat", future))
    await service.jobs.submit({"task": "beat"}, tick_key("beat", past), owner="alice")
    await service.jobs.submit({"task": "plain", "args": {"n": 1}}, tick_key("plain", past))
    assert record.last("beat") is None and record.last("plain") is None
    job = await service.jobs.submit({"task": "beat"}, tick_key("beat", past))
    assert record.last("beat") == (past, job.id)
    # An older tick later does not move it back.
    await service.jobs.submit({"task": "beat"}, tick_key("beat", past - hour))
    assert record.last("beat") == (past, job.id)


async def test_an_app_without_periodic_tasks_lists_none(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    app = App()

    @app.task
    async def plain() -> None:
        return None

    client = await serve(aiohttp_client, app)
    assert client.app[STATE].service.scheduler is None  # type: ignore[union-attr]
    response = await client.get("/v1/schedules")
    assert (response.status, await response.json()) == (200, {"schedules": []})


async def test_a_stopping_process_gives_up_the_lead(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    client = await serve(aiohttp_client, make_app(every=0.1))
    service = client.app[STATE].service
    assert service is not None and service.scheduler is not None
    assert service.scheduler.leading
    await service.shutdown(0.1)
    assert not service.scheduler.leading
    count = len(service.jobs.list(JobFilter(task="beat"), 1000)[0])
    await asyncio.sleep(0.3)
    assert len(service.jobs.list(JobFilter(task="beat"), 1000)[0]) == count
