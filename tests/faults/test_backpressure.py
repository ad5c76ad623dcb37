"""RELIABILITY row 23: backpressure. A queue at `broker.max_queue_length` refuses submits.

Slow jobs, few at a time, and a load that submits much faster than they run: the queue fills,
and the submits it cannot take get 429 with `Retry-After` and a problem document. A refused job
leaves no trace (not in the store, never run); every accepted one runs to its end. On RabbitMQ
the limit is the quorum queue's `x-max-length` with `reject-publish` (a nacked publish is never a
202); the memory broker counts its own queue.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.harness import (
    HEADER,
    Report,
    count_executions,
    count_outcomes,
    drain,
    run_load,
    sample_depth,
)
from tests.support import ServeProcess, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

LIMIT, SUBMITS, CONCURRENCY = 50, 400, 50
#: Jobs of 300 ms, 4 at a time: about 13 jobs/s, far below the submit rate.
JOB_MS, PREFETCH = 300, 4


def job(n: int) -> dict[str, Any]:
    return {"task": "work", "args": {"ms": JOB_MS}}


async def stored_ids(http: aiohttp.ClientSession, url: str) -> list[str]:
    """Every job id in the store, page after page."""
    ids: list[str] = []
    params = {"limit": "1000"}
    for _ in range(100):
        async with http.get(f"{url}/v1/jobs", params=params) as response:
            assert response.status == 200, await response.text()
            page = await response.json()
        ids += [record["id"] for record in page["jobs"]]
        if page["next"] is None:
            return ids
        params["cursor"] = page["next"]
    raise AssertionError("more than 100 pages of jobs")


async def test_a_full_queue_answers_429_and_keeps_no_trace_of_the_refused_jobs(
    broker_url: str, prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    amqp = broker_url.startswith("amqp")
    task_log = tmp_path / "runs.log"
    env = {
        "AQ_TEST_TASK_LOG": str(task_log),
        "AIOQUEUE_BROKER__MAX_QUEUE_LENGTH": str(LIMIT),
        "AIOQUEUE_BROKER__PREFETCH": str(PREFETCH),
    }
    server = ServeProcess(broker_url, prefix, env).start(tmp_path)
    report = Report(f"backpressure, {'RabbitMQ' if amqp else 'memory'}, max_queue_length {LIMIT}")
    try:
        await wait_ready(http, server.url)
        async with contextlib.AsyncExitStack() as stack:
            if amqp:  # the default queue of priority 0 (the band without a suffix)
                depth = sample_depth(broker_url, f"{prefix}.q.default", report)
                await stack.enter_async_context(depth)
            await run_load(
                http,
                lambda: [server.url],
                report,
                total=SUBMITS,
                concurrency=CONCURRENCY,
                fault_at=0,
                fault=None,
                body=job,
                max_submits=SUBMITS,
            )
        await drain(http, lambda: [server.url], report, deadline=60)
        count_executions(task_log, report)
        if amqp:
            await count_outcomes(broker_url, prefix, report)
        in_store = await stored_ids(http, server.url)
    finally:
        server.stop()
    peak = "-" if report.peak_depth is None else f"{report.peak_depth} ready"
    print(f"\n{HEADER}\n{report.row()}")
    print(
        f"accepted {len(report.accepted)}, 429 {report.rejected['429']} of {report.submitted}; "
        f"peak queue depth {peak} (limit {LIMIT}); jobs in the store {len(in_store)}; "
        f"reasons {dict(report.reasons)}"
    )
    assert report.submitted == SUBMITS
    assert report.rejected["429"] > 0, "the queue never filled: no 429"
    assert set(report.rejected) == {"429"}, report.rejected  # no 503, no lost connection
    assert report.bad_refusals == [], report.bad_refusals[:5]
    assert all("the queue is full" in reason for reason in report.reasons), report.reasons
    assert len(report.accepted) + report.rejected["429"] == SUBMITS
    # A refused job is nowhere: the store holds exactly the accepted jobs, and only they ran.
    assert sorted(in_store) == sorted(report.accepted)
    assert set(report.executions) <= set(report.accepted)
    # Every accepted job ran, once, to success, and its outcome was recorded once.
    assert report.lost == [], f"{len(report.lost)} accepted jobs never finished"
    assert report.statuses == {"succeeded": len(report.accepted)}, report.errors
    assert report.executed_twice == 0 and report.outcomes_twice == []
    if amqp:
        assert set(report.outcomes) == set(report.accepted)
        # The queue filled up. A quorum queue overshoots its limit by the publishes already on
        # their way when it turns them away (measured: 52 ready for a limit of 50), never more.
        assert report.peak_depth is not None
        assert LIMIT <= report.peak_depth <= LIMIT + CONCURRENCY, report.peak_depth
