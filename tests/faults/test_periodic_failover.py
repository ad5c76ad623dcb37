"""Periodic jobs across a failover (issue 10): two `aioqueue serve` processes share a schedule,
and the leader is SIGKILLed mid-run. The other takes over within a few seconds, and over the run
no tick is missed and none runs twice.

The issue asks for 2 minutes of a 5-second schedule (24 ticks, the kill in the middle). Made fast
by configuration: a 0.5 s schedule for about 20 s (about 40 ticks), the kill after 10 s. That is
a harder test of the same thing: a takeover of a few hundred milliseconds already leaves ticks
to submit late, which a 5 s schedule would hide. The issue's own run is
`AQ_FAILOVER_PERIOD=5 AQ_FAILOVER_SECONDS=120 pytest -s tests/faults/test_periodic_failover.py`.

Accounting, through the HTTP API and the task log:
- every tick from the first to the last one submitted has its job: a submit with the tick's
  idempotency key (`periodic:beat:TICK_TIME`) answers 200 with the existing job, never 202 (a
  202 would be a tick missed, whose job this very probe just made);
- `GET /v1/jobs?task=beat` lists exactly one job per tick: no tick has two jobs;
- every job succeeds, and the task log (O_APPEND, survives the SIGKILL) has one run per job; a
  second run is allowed only for a job the killed process was running (a redelivery: at-least-
  once execution, G2), and reported;
- the survivor keeps ticking while this is counted: every run in the task log is of a job its
  store holds once it stopped, one job per tick key, later ticks' jobs included.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from aioqueue.periodic import parse_tick, tick_key
from aioqueue.store import JobFilter, JobStore
from aioqueue.storefile import file_name
from tests.rabbitmq import RabbitNode
from tests.support import JSON, ServeProcess, wait_ready, wait_terminal

PERIOD = float(os.environ.get("AQ_FAILOVER_PERIOD", "0.5"))
#: The whole run, the kill in its middle.
SECONDS = float(os.environ.get("AQ_FAILOVER_SECONDS", "20"))
BEFORE_KILL = AFTER_KILL = SECONDS / 2

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(SECONDS + 130)]
#: The takeover the issue asks for: "within a few seconds".
TAKEOVER_LIMIT = 3.0


async def schedule(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/v1/schedules") as response:
        assert response.status == 200, await response.text()
        (found,) = (await response.json())["schedules"]
        return dict(found)


async def beat_jobs(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"task": "beat", "limit": "1000", **({"cursor": cursor} if cursor else {})}
        async with http.get(url + "/v1/jobs", params=params) as response:
            assert response.status == 200, await response.text()
            page = await response.json()
        jobs += page["jobs"]
        if (cursor := page["next"]) is None:
            return jobs


async def probe(http: aiohttp.ClientSession, url: str, tick: int) -> tuple[int, str]:
    """Submit the tick's own request, with its key: (status, job id)."""
    headers = {**JSON, "Idempotency-Key": tick_key("beat", tick)}
    async with http.post(
        url + "/v1/jobs", data=orjson.dumps({"task": "beat"}), headers=headers
    ) as r:
        return r.status, str((await r.json())["id"])


async def test_a_killed_leader_is_replaced_and_no_tick_is_missed_or_run_twice(
    rabbit: RabbitNode, prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    task_log = tmp_path / "runs.log"
    env = {
        "AIOQUEUE_APP": "tests.periodic_apps:app",
        "AQ_TEST_PERIOD": str(PERIOD),
        "AQ_TEST_TASK_LOG": str(task_log),
    }
    servers = {
        name: ServeProcess(rabbit.url, prefix, {**env, "AIOQUEUE_STORE__DIR": str(tmp_path / name)})
        for name in ("a", "b")
    }
    try:
        for server in servers.values():
            server.start(tmp_path)
            await wait_ready(http, server.url)
        leading = {name: (await schedule(http, s.url))["leader"] for name, s in servers.items()}
        assert sorted(leading.values()) == [False, True], leading
        leader = next(name for name, lead in leading.items() if lead)
        survivor_name = "b" if leader == "a" else "a"
        survivor = servers[survivor_name]
        killed = servers[leader]
        assert killed.proc is not None
        killed_pid = killed.proc.pid

        await asyncio.sleep(BEFORE_KILL)
        killed_at = time.monotonic()
        killed.kill()
        deadline = killed_at + 10
        while not (await schedule(http, survivor.url))["leader"]:
            assert time.monotonic() < deadline, "nobody took over"
            await asyncio.sleep(0.01)
        takeover = time.monotonic() - killed_at
        await asyncio.sleep(AFTER_KILL)

        url = survivor.url
        last = parse_tick((await schedule(http, url))["last_tick_at"])
        listed = await beat_jobs(http, url)
        ticks_by_job: dict[str, int] = {}
        created = {job["id"]: parse_tick(job["created_at"]) or 0 for job in listed}
        period_ms = round(PERIOD * 1000)
        # The first tick: the one whose job was created first, a few milliseconds after it.
        first = min(created.values()) // period_ms * period_ms
        assert last is not None
        # Every tick from the first job's to the last one submitted, probed by its key.
        missed, tick = [], first
        while tick <= last:
            status, job_id = await probe(http, url, tick)
            if status == 202:
                missed.append(tick)
            else:
                assert status == 200, status
                ticks_by_job[job_id] = tick
            tick += period_ms
        expected = len(ticks_by_job) + len(missed)
        statuses = collections.Counter(
            [(await wait_terminal(http, url, job_id))["status"] for job_id in ticks_by_job]
        )
        lateness = max(created[job_id] - tick for job_id, tick in ticks_by_job.items())
    finally:
        for server in servers.values():
            if server.proc is not None and server.proc.poll() is None:
                server.stop()  # SIGTERM: the store is written as it stops
    survivor_store = JobStore(60, str(tmp_path / survivor_name / file_name(rabbit.url, prefix)))
    kept = survivor_store.list(JobFilter(task="beat"), 10_000)[0]
    survivor_store.close()

    runs: collections.Counter[str] = collections.Counter()
    by_killed: set[str] = set()
    for line in task_log.read_text().splitlines():
        job_id, _attempt, pid = line.split()
        runs[job_id] += 1
        if int(pid) == killed_pid:
            by_killed.add(job_id)
    twice = {job_id for job_id, count in runs.items() if count > 1}
    print(
        f"\nperiodic failover: every {PERIOD} s, leader SIGKILLed after {BEFORE_KILL:g} s;"
        f" takeover {takeover * 1000:.0f} ms; ticks {expected}, missed {len(missed)},"
        f" jobs listed {len(listed)}, statuses {dict(statuses)}, run twice {len(twice)}"
        f" ({len(twice & by_killed)} after the kill); latest tick submitted"
        f" {lateness} ms after its time; {len(kept) - expected} later ticks while counting"
    )
    assert takeover < TAKEOVER_LIMIT
    assert expected >= (BEFORE_KILL + AFTER_KILL) / PERIOD * 0.8
    assert not missed, [tick_key("beat", tick) for tick in missed]
    # One job per tick: the listing has no job beyond the ticks' own.
    assert len(listed) == expected and {job["id"] for job in listed} == set(ticks_by_job)
    assert statuses == {"succeeded": expected}
    keys = collections.Counter(job.idempotency_key for job in kept)
    assert max(keys.values()) == 1, "a tick has two jobs"
    assert set(ticks_by_job) <= set(runs) <= {job.id for job in kept}
    assert twice <= by_killed, "a tick ran twice without the kill to explain it"
    assert len(twice) <= 1  # at most the one job the killed process was running
