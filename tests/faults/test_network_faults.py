"""G3 on a bad network (RELIABILITY rows 4 and 5), through a fault proxy in front of RabbitMQ.

A partition leaves every socket open and silent: nothing fails, things only stop answering, so
aioqueue must bound each wait itself. Latency must change the speed only, never the outcome.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from tests.faults.harness import (
    HEADER,
    Report,
    count_executions,
    count_outcomes,
    drain,
    run_load,
)
from tests.faults.proxy import FaultProxy
from tests.rabbitmq import RabbitNode
from tests.support import ServeProcess, wait_ready

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(240)]

CONCURRENCY = 50


def job(n: int) -> dict[str, object]:
    return {"task": "work", "args": {"ms": 20}}


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else 0.0


@asynccontextmanager
async def served_through(
    proxy: FaultProxy, prefix: str, tmp_path: Path, **env: str
) -> AsyncIterator[ServeProcess]:
    """`aioqueue serve` whose only way to RabbitMQ is the proxy, at default timeouts."""
    server = ServeProcess(
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
        prefix,
        {
            "AQ_TEST_TASK_LOG": str(tmp_path / "runs.log"),
            "AIOQUEUE_BROKER__CONFIRM_TIMEOUT": "1",  # the default, which ServeProcess lowers
            **env,
        },
    ).start(tmp_path)
    try:
        yield server
    finally:
        server.kill()


async def account(
    http: aiohttp.ClientSession,
    url: str,
    report: Report,
    rabbit: RabbitNode,
    prefix: str,
    task_log: Path,
) -> None:
    await drain(http, lambda: [url], report, deadline=90)
    count_executions(task_log, report)
    await count_outcomes(rabbit.url, prefix, report)
    print(f"\n{HEADER}\n{report.row()}")
    assert report.lost == [], f"{len(report.lost)} accepted jobs never finished"
    assert report.outcomes_twice == [], "a job's outcome was recorded more than once"
    assert set(report.statuses) == {"succeeded"}, report.errors


@pytest.mark.parametrize("how", ["blackhole", "sigstop"])
async def test_a_silent_broker_mid_load_means_503_within_a_second_and_nothing_lost(
    rabbit: RabbitNode, prefix: str, tmp_path: Path, http: aiohttp.ClientSession, how: str
) -> None:
    """Row 4: RabbitMQ goes silent for 10 s at submit 700, the link open (no RST, no FIN): the
    proxy blackholes it (a partition), or the node is SIGSTOPped (a hung broker)."""
    async with (
        FaultProxy(rabbit.port) as proxy,
        # A confirm overdue for a heartbeat ends the connection: within these 10 s.
        served_through(proxy, prefix, tmp_path, AIOQUEUE_BROKER__HEARTBEAT="4") as server,
    ):
        silence: Callable[[], None] = proxy.blackhole
        speak: Callable[[], None] = proxy.heal
        if how == "sigstop":
            silence = functools.partial(os.kill, rabbit.pid, signal.SIGSTOP)
            speak = functools.partial(os.kill, rabbit.pid, signal.SIGCONT)
        try:
            await silent_broker_under_load(
                http, server, silence, speak, how, rabbit, prefix, tmp_path
            )
        finally:
            speak()  # whatever happened: the node and the link serve the next tests


async def silent_broker_under_load(
    http: aiohttp.ClientSession,
    server: ServeProcess,
    silence: Callable[[], None],
    speak: Callable[[], None],
    how: str,
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
) -> None:
    await wait_ready(http, server.url)
    watcher = await http.ws_connect(server.url + "/v1/ws")
    during: dict[str, tuple[int, str]] = {}

    async def fault(mark: Callable[[], None]) -> None:
        silence()
        mark()
        await asyncio.sleep(2)
        async with http.get(server.url + "/readyz") as ready:
            during["2 s in"] = (ready.status, (await ready.json())["detail"])
        await asyncio.sleep(6)
        async with http.get(server.url + "/readyz") as ready:
            during["8 s in"] = (ready.status, (await ready.json())["detail"])
        await asyncio.sleep(2)
        speak()

    report = Report(f"RabbitMQ silent 10 s ({how})")
    await run_load(http, lambda: [server.url], report, 2000, CONCURRENCY, 700, fault, job)
    await wait_ready(http, server.url, deadline=60)
    await account(http, server.url, report, rabbit, prefix, tmp_path / "runs.log")
    ran_unaccepted = len(set(report.executions) - set(report.accepted))
    print(
        f"slowest refusal {report.slowest_refusal:.2f} s; /readyz during: {during}; "
        f"jobs that ran without a 202 (refused, yet confirmed late): {ran_unaccepted}"
    )
    assert report.rejected, "the partition was not seen by any submit"
    assert set(report.rejected) <= {"503"}, report.rejected
    assert report.bad_refusals == [], report.bad_refusals[:5]
    assert report.slowest_refusal < 1.5, "a submit waited past confirm_timeout"
    for status, detail in during.values():
        assert status == 503 and "RabbitMQ" in detail, during
    await watcher.send_str('{"op": "ping"}')  # the websocket stayed open through it
    assert (await watcher.receive(timeout=5)).json() == {"type": "pong"}
    await watcher.close()


async def test_latency_slows_jobs_down_but_changes_no_outcome(
    rabbit: RabbitNode, prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Row 5: 50 ms each way on every byte between aioqueue and RabbitMQ, at default settings."""
    rates: dict[float, float] = {}
    async with FaultProxy(rabbit.port) as proxy, served_through(proxy, prefix, tmp_path) as server:
        await wait_ready(http, server.url)
        for latency in (0.0, 0.05):
            proxy.latency = latency
            report = Report(f"latency {latency * 1000:.0f} ms")
            started = time.monotonic()
            await run_load(http, lambda: [server.url], report, 500, CONCURRENCY, 0, None, job)
            await drain(http, lambda: [server.url], report, deadline=60)
            rates[latency] = len(report.accepted) / (time.monotonic() - started)
            print(
                f"\nlatency {latency * 1000:.0f} ms: {rates[latency]:.0f} jobs/s submitted to"
                f" done, submit p99 {p99(report.latencies) * 1000:.0f} ms, {report.statuses}"
            )
            assert report.rejected == {}, report.reasons  # no timeout at the defaults
            assert report.lost == [] and set(report.statuses) == {"succeeded"}
        print(f"throughput with 50 ms / without: {rates[0.05] / rates[0.0]:.2f}")
        count_executions(tmp_path / "runs.log", report)
        assert not [j for j, n in report.executions.items() if n > 1], "a job ran twice"
