"""G1 to G3 under load: faults injected for real while 2,000 jobs are submitted at concurrency 50.

Each test accounts for every job (see harness.py) and prints its row of the report; run with
`-s` to see them. Invariants: nothing accepted is lost; one recorded outcome per job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.faults.harness import HEADER, Report, count_executions, count_outcomes, drain, run_load
from tests.rabbitmq import RabbitNode
from tests.support import ServeProcess, wait_ready

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(240)]

TOTAL, CONCURRENCY, FAULT_AT = 2000, 50, 700
#: Seconds a freshly declared topology is given before its node is SIGKILLed.
QUORUM_SETTLE = 3.0


@pytest.fixture
def servers(rabbit: RabbitNode, prefix: str, tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


def start(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],
    env: dict[str, str] | None = None,
) -> ServeProcess:
    """`aioqueue serve` with the task log the accounting reads, and `env` besides."""
    env = {"AQ_TEST_TASK_LOG": str(tmp_path / "runs.log"), **(env or {})}
    server = ServeProcess(rabbit.url, prefix, env).start(tmp_path)
    servers.append(server)
    return server


def job(n: int) -> dict[str, object]:
    return {"task": "work", "args": {"ms": 20}}


async def account(
    http: aiohttp.ClientSession,
    report: Report,
    urls: object,
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
) -> None:
    await drain(http, urls, report, deadline=90)  # type: ignore[arg-type]
    count_executions(tmp_path / "runs.log", report)
    await count_outcomes(rabbit.url, prefix, report)
    print(f"\n{HEADER}\n{report.row()}")
    assert report.lost == [], f"{len(report.lost)} accepted jobs never finished"
    assert report.outcomes_twice == [], "a job's outcome was recorded more than once"
    assert len(report.accepted) >= TOTAL, "the service did not recover in time"
    assert sum(report.statuses.values()) == len(report.accepted)
    assert set(report.statuses) == {"succeeded"}, report.errors


@pytest.mark.parametrize("how", ["sigkill", "stop_app"])
async def test_broker_down_and_back_mid_load(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],
    http: aiohttp.ClientSession,
    how: str,
) -> None:
    """Rows 2 and 1: the node is SIGKILLed and started again, or stopped gracefully
    (`rabbitmqctl stop_app`, which closes every connection) and started again."""
    server = start(rabbit, prefix, tmp_path, servers)
    await wait_ready(http, server.url)
    if how == "sigkill":
        # RabbitMQ 3.10: a quorum queue declared less than about a second before a SIGKILL of
        # its node comes back without a leader, and consuming it hangs for good (measured; see
        # RabbitNode.kill). The load reaches its fault within a second of a fresh start.
        await asyncio.sleep(QUORUM_SETTLE)
    watcher = await http.ws_connect(server.url + "/v1/ws")
    outage: dict[str, tuple[int, str]] = {}

    async def fault(mark: Callable[[], None]) -> None:
        if how == "sigkill":
            rabbit.kill()  # returns once the node is gone
        else:
            await asyncio.to_thread(rabbit.ctl, "stop_app")
        mark()
        await asyncio.sleep(1)
        async with http.get(server.url + "/readyz") as ready:
            outage["readyz"] = (ready.status, (await ready.json())["detail"])
        if how == "sigkill":
            await asyncio.to_thread(rabbit.restart)
        else:
            await asyncio.to_thread(rabbit.ctl, "start_app")

    report = Report(f"RabbitMQ {'SIGKILL, restart' if how == 'sigkill' else 'stop_app, start_app'}")
    await run_load(http, lambda: [server.url], report, TOTAL, CONCURRENCY, FAULT_AT, fault, job)
    await wait_ready(http, server.url, deadline=60)
    await account(http, report, lambda: [server.url], rabbit, prefix, tmp_path)
    print(f"slowest refusal {report.slowest_refusal:.2f} s; /readyz during the outage: {outage}")
    assert report.rejected, "the outage was not seen by any submit"
    assert set(report.rejected) <= {"503"}, report.rejected
    assert report.slowest_refusal < 1.0  # G3: no hang
    status, reason = outage["readyz"]
    assert status == 503 and "RabbitMQ" in reason
    await watcher.send_str('{"op": "ping"}')  # the websocket stayed open through the outage
    assert (await watcher.receive(timeout=5)).json() == {"type": "pong"}
    await watcher.close()


async def test_all_connections_closed_mid_load(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],
    http: aiohttp.ClientSession,
) -> None:
    server = start(rabbit, prefix, tmp_path, servers)
    await wait_ready(http, server.url)

    async def fault(mark: Callable[[], None]) -> None:
        await asyncio.to_thread(rabbit.close_all_connections)
        mark()

    report = Report("close_all_connections")
    await run_load(http, lambda: [server.url], report, TOTAL, CONCURRENCY, FAULT_AT, fault, job)
    await account(http, report, lambda: [server.url], rabbit, prefix, tmp_path)
    assert set(report.rejected) <= {"503"}, report.rejected


async def test_an_instance_sigkilled_and_restarted_mid_load(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],
    http: aiohttp.ClientSession,
) -> None:
    """Two instances share the queues; one dies with jobs in flight, the other takes them over."""
    a = start(rabbit, prefix, tmp_path, servers)
    b = start(rabbit, prefix, tmp_path, servers)
    await wait_ready(http, a.url)
    await wait_ready(http, b.url)
    live = [a.url, b.url]

    async def fault(mark: Callable[[], None]) -> None:
        live.remove(a.url)
        a.kill()
        mark()
        await asyncio.sleep(2)
        restarted = await asyncio.to_thread(start, rabbit, prefix, tmp_path, servers)
        await wait_ready(http, restarted.url)
        live.append(restarted.url)

    report = Report("aioqueue SIGKILL, restart")
    await run_load(http, lambda: list(live), report, TOTAL, CONCURRENCY, FAULT_AT, fault, job)
    await account(http, report, lambda: list(live), rabbit, prefix, tmp_path)


async def test_a_new_host_joins_mid_load_from_a_checkpoint_and_takes_over(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],
    http: aiohttp.ClientSession,
) -> None:
    """Row 28 under load: a process with no disk of its own joins from the newest checkpoint
    (written every second here), then the first one is SIGKILLed: the newcomer answers for every
    job, those accepted before it joined included, and runs the rest."""
    often = {"AIOQUEUE_STORE__CHECKPOINT_INTERVAL": "1"}
    a = start(rabbit, prefix, tmp_path, servers, often)
    await wait_ready(http, a.url)
    live = [a.url]
    joined: list[ServeProcess] = []

    for _ in range(100):  # a first checkpoint, due 1 to 1.25 s after the start
        if "wrote checkpoint" in a.log():
            break
        await asyncio.sleep(0.1)

    async def fault(mark: Callable[[], None]) -> None:
        fresh = {**often, "AIOQUEUE_STORE__DIR": str(tmp_path / "new-host")}
        newcomer = await asyncio.to_thread(start, rabbit, prefix, tmp_path, servers, fresh)
        joined.append(newcomer)
        await wait_ready(http, newcomer.url)
        live.append(newcomer.url)
        live.remove(a.url)
        a.kill()
        mark()

    report = Report("a new host joins from a checkpoint, the first SIGKILLed")
    await run_load(http, lambda: list(live), report, TOTAL, CONCURRENCY, FAULT_AT, fault, job)
    await account(http, report, lambda: list(live), rabbit, prefix, tmp_path)
    assert report.first_accept_after_fault is not None, "the load ended before the fault"
    log = joined[0].log()
    assert "loaded checkpoint" in log, "the newcomer did not start from a checkpoint"
    assert "(after offset None)" not in log


async def test_a_memory_alarm_blocks_publishers_mid_load_and_submits_fail_fast(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],
    http: aiohttp.ClientSession,
) -> None:
    """G3 with RabbitMQ's memory alarm for 5 s: it blocks every publishing connection (it stops
    reading from them) while they stay open. Submits answer 503 within broker.confirm_timeout,
    never hang, never a 202 without a confirm; once it clears, nothing accepted is lost."""
    server = start(rabbit, prefix, tmp_path, servers, {"AIOQUEUE_BROKER__CONFIRM_TIMEOUT": "1"})
    await wait_ready(http, server.url)
    during: dict[str, tuple[int, str]] = {}

    async def fault(mark: Callable[[], None]) -> None:
        await asyncio.to_thread(rabbit.ctl, "set_vm_memory_high_watermark", "0.0000001")
        mark()
        try:
            await asyncio.sleep(3)
            async with http.get(server.url + "/readyz") as ready:
                during["readyz"] = (ready.status, (await ready.json())["detail"])
            await asyncio.sleep(2)
        finally:
            await asyncio.to_thread(rabbit.ctl, "set_vm_memory_high_watermark", "0.4")

    report = Report("RabbitMQ memory alarm 5 s")
    await run_load(http, lambda: [server.url], report, TOTAL, CONCURRENCY, FAULT_AT, fault, job)
    await wait_ready(http, server.url, deadline=60)
    await account(http, report, lambda: [server.url], rabbit, prefix, tmp_path)
    print(f"slowest refusal {report.slowest_refusal:.2f} s; /readyz during the alarm: {during}")
    assert report.rejected, "the alarm was not seen by any submit"
    assert set(report.rejected) <= {"503"}, report.rejected
    assert report.slowest_refusal < 1.5  # confirm_timeout 1 s: no hang
    assert during["readyz"][0] == 503
