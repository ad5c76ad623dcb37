"""Row 27: topic catch-up across faults. A publisher at full speed and 50 followers (websocket
clients that resubscribe with `since` = their last offset whenever their connection ends);
RabbitMQ is SIGKILLed, or one of two aioqueue processes is. Every confirmed message must reach
every follower exactly once, in offset order. Run with `-s` to see the report's rows."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.faults.harness import TOPIC_HEADER, Follower, TopicReport, caught_up, publish_load
from tests.faults.test_load_faults import QUORUM_SETTLE, servers, start  # noqa: F401 (fixture)
from tests.rabbitmq import RabbitNode
from tests.support import JSON, ServeProcess, wait_ready

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(240)]

TOTAL, CONCURRENCY, FAULT_AT, FOLLOWERS = 3000, 10, 1000, 50


async def start_followers(
    http: aiohttp.ClientSession, urls: Callable[[], list[str]], report: TopicReport
) -> list[asyncio.Task[None]]:
    """50 followers of `load.*` and `#`, from the offset of a message published before."""
    async with http.post(urls()[0] + "/v1/topics/load.start", data=b"0", headers=JSON) as response:
        assert response.status == 202, await response.text()
        since = (await response.json())["offset"]
    report.followers = [
        Follower(http, urls, "load.*" if n % 2 else "#", since, turn=n) for n in range(FOLLOWERS)
    ]
    return [asyncio.create_task(f.run()) for f in report.followers]


async def finish(report: TopicReport, followers: list[asyncio.Task[None]]) -> None:
    await caught_up(report, deadline=60)
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    print(f"\n{TOPIC_HEADER}\n{report.row()}")
    assert len(report.confirmed) >= TOTAL
    for follower in report.followers:
        assert not follower.missing(report.confirmed), "a confirmed message was lost"
        assert follower.duplicates == 0 and follower.out_of_order == 0
        assert not follower.expired


async def test_rabbitmq_sigkilled_under_a_publisher_and_50_followers(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],  # noqa: F811
    http: aiohttp.ClientSession,
) -> None:
    server = start(rabbit, prefix, tmp_path, servers)
    await wait_ready(http, server.url)
    await asyncio.sleep(QUORUM_SETTLE)  # see test_load_faults
    report = TopicReport("RabbitMQ SIGKILL, restart")
    followers = await start_followers(http, lambda: [server.url], report)

    async def fault(mark: Callable[[], None]) -> None:
        rabbit.kill()
        mark()
        await asyncio.sleep(1)
        await asyncio.to_thread(rabbit.restart)

    await publish_load(http, lambda: [server.url], report, TOTAL, CONCURRENCY, FAULT_AT, fault)
    await finish(report, followers)
    assert report.rejected, "the outage was not seen by any publish"
    assert set(report.rejected) <= {"503"}, report.rejected


async def test_one_of_two_processes_sigkilled_its_followers_resume_on_the_other(
    rabbit: RabbitNode,
    prefix: str,
    tmp_path: Path,
    servers: list[ServeProcess],  # noqa: F811
    http: aiohttp.ClientSession,
) -> None:
    a = start(rabbit, prefix, tmp_path, servers)
    b = start(rabbit, prefix, tmp_path, servers)
    await wait_ready(http, a.url)
    await wait_ready(http, b.url)
    live = [a.url, b.url]
    report = TopicReport("one of two aioqueue processes SIGKILLed")
    followers = await start_followers(http, lambda: list(live), report)

    async def fault(mark: Callable[[], None]) -> None:
        live.remove(a.url)
        a.kill()
        mark()

    await publish_load(http, lambda: list(live), report, TOTAL, CONCURRENCY, FAULT_AT, fault)
    await finish(report, followers)
    assert sum(f.reconnects for f in report.followers) >= FOLLOWERS // 2 - 1
