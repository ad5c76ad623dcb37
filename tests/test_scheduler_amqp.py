"""The leader lock on RabbitMQ (broker/amqp_leader.py), with two services in one process on the
session's node: one leads at a time, the lead moves when the leader stops, when connections drop
and when the lock's queue is deleted, the tokens converge to one, and the leader replaces its
token before consumer_timeout. Throughout, the ticks of a 0.2 s schedule run once each, none
missed. (Two served processes and a SIGKILL: tests/faults/test_periodic_failover.py.)"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from aioqueue import App, Context, Settings
from aioqueue.config import BrokerSettings, JobsSettings, StoreSettings
from aioqueue.periodic import parse_tick
from aioqueue.service import Service
from tests.rabbitmq import RabbitNode
from tests.support import eventually

pytestmark = pytest.mark.amqp

PERIOD_MS = 200


class Pair:
    """Two services of one app on one prefix, each with its own store, and the ticks run."""

    def __init__(self, url: str, prefix: str, tmp_path: Path, **broker: Any) -> None:
        self.url, self.prefix, self.tmp_path, self.broker = url, prefix, tmp_path, broker
        #: (job id, tick) of each execution, in either service.
        self.runs: list[tuple[str, int]] = []
        self.apps: dict[str, App] = {}
        #: Every change of the lead: (service name, leading, monotonic time).
        self.changes: list[tuple[str, bool, float]] = []

    def make_app(self) -> App:
        app = App()
        runs = self.runs

        @app.periodic(every=PERIOD_MS / 1000)
        async def beat(ctx: Context) -> None:
            service = app.service
            assert service is not None
            job = service.store.get(ctx.job_id)
            assert job is not None and job.idempotency_key is not None
            tick = parse_tick(job.idempotency_key.removeprefix("periodic:beat:"))
            assert tick is not None
            runs.append((ctx.job_id, tick))

        return app

    async def start(self, name: str) -> Service:
        app = self.apps[name] = self.make_app()
        settings = Settings(
            broker=BrokerSettings(
                url=self.url, prefix=self.prefix, confirm_timeout=3.0, **self.broker
            ),
            jobs=JobsSettings(timeout=1.0, shutdown_grace=0.5),
            store=StoreSettings(dir=str(self.tmp_path / name)),
        )
        service = await app.start(settings)
        assert service.scheduler is not None
        on_change = service.scheduler.on_leader_change

        def noted(leading: bool) -> None:
            self.changes.append((name, leading, time.monotonic()))
            on_change(leading)

        service.scheduler.on_leader_change = noted  # type: ignore[method-assign]
        # The broker was told of the method before it was wrapped: tell it of the wrapper.
        service.broker.leader.want(noted)  # type: ignore[attr-defined]
        if service.scheduler.leading:
            self.changes.append((name, True, time.monotonic()))
        return service

    def service(self, name: str) -> Service:
        service = self.apps[name].service
        assert service is not None
        return service

    def leaders(self) -> list[str]:
        return [
            name
            for name, app in self.apps.items()
            if app.service is not None and app.service.scheduler is not None
            and app.service.scheduler.leading
        ]  # fmt: skip

    async def stop(self) -> None:
        for name, app in self.apps.items():
            if app.service is not None:
                await self.stop_one(name)

    async def stop_one(self, name: str) -> None:
        """As SIGTERM does: the lead given up, running jobs finished, then closed."""
        await self.service(name).shutdown(1.0)
        await self.apps[name].stop()

    def gaps(self) -> list[tuple[int, int]]:
        ticks = sorted({tick for _, tick in self.runs})
        return [(a, b) for a, b in itertools.pairwise(ticks) if b - a != PERIOD_MS]

    async def check_ticks(self, at_least: int) -> None:
        """Every tick ran, once, and they are consecutive: none missed, none twice. (A tick's
        job may run after later ones: one given back by a stopping process runs elsewhere.)"""
        try:
            await eventually(lambda: not self.gaps(), 10)
        except TimeoutError:
            raise AssertionError(f"ticks missed between {self.gaps()}") from None
        ticks = sorted(tick for _, tick in self.runs)
        assert len(ticks) >= at_least, ticks
        assert len(set(ticks)) == len(ticks), f"a tick ran twice: {ticks}"


def tokens(rabbit: RabbitNode, prefix: str) -> tuple[int, int]:
    """(ready, unacked) messages of the lock's queue: its tokens."""
    listed = rabbit.ctl(
        "list_queues", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged"
    )
    for line in listed.splitlines():
        name, ready, unacked = line.split("\t")
        if name == f"{prefix}.scheduler":
            return int(ready), int(unacked)
    raise AssertionError(f"no queue {prefix}.scheduler in {listed}")


async def ticks_after(pair: Pair, count: int, deadline: float = 10) -> None:
    seen = len(pair.runs)
    await eventually(lambda: len(pair.runs) >= seen + count, deadline)


@pytest.fixture
async def pair(amqp_url: str, prefix: str, tmp_path: Path) -> Pair:
    return Pair(amqp_url, prefix, tmp_path)


async def test_one_leads_and_a_graceful_stop_hands_the_lead_over_at_once(
    pair: Pair, rabbit: RabbitNode
) -> None:
    try:
        await pair.start("a")
        await pair.start("b")
        assert pair.leaders() == ["a"]
        # b's start added a token; a, the leader, kept the newest and acked the other.
        await eventually(lambda: tokens(rabbit, pair.prefix) == (0, 1), 10)
        await ticks_after(pair, 5)
        stopped = time.monotonic()
        await pair.stop_one("a")
        await eventually(lambda: pair.leaders() == ["b"], 5)
        took = next(at for name, leading, at in pair.changes if (name, leading) == ("b", True))
        assert took - stopped < 1.0
        await ticks_after(pair, 5)
        assert [(n, lead) for n, lead, _ in pair.changes] == [
            ("a", True),
            ("a", False),
            ("b", True),
        ]
        await pair.check_ticks(10)
    finally:
        await pair.stop()
    # Nobody leads, and the token waits in the queue for the next process.
    await eventually(lambda: tokens(rabbit, pair.prefix) == (1, 0), 10)


async def test_the_lead_moves_on_when_connections_drop(pair: Pair, rabbit: RabbitNode) -> None:
    try:
        await pair.start("a")
        await pair.start("b")
        await ticks_after(pair, 3)
        rabbit.close_all_connections()
        # Both reconnect; the leader's token went back to the queue, and one of them has it.
        await eventually(lambda: len(pair.changes) >= 3 and len(pair.leaders()) == 1, 15)
        await ticks_after(pair, 5)
        assert len(pair.leaders()) == 1
        await eventually(lambda: tokens(rabbit, pair.prefix) == (0, 1), 10)
        await pair.check_ticks(8)
    finally:
        await pair.stop()


async def test_a_deleted_lock_queue_comes_back_with_a_token(pair: Pair, rabbit: RabbitNode) -> None:
    try:
        await pair.start("a")
        await pair.start("b")
        await ticks_after(pair, 3)
        rabbit.ctl("delete_queue", f"{pair.prefix}.scheduler")
        # RabbitMQ cancels the consumers of a deleted queue: each process reconnects, declares it
        # again with a token, and one of them leads.
        await eventually(lambda: ("a", False) in [(n, lead) for n, lead, _ in pair.changes], 10)
        await eventually(lambda: len(pair.leaders()) == 1, 15)
        await ticks_after(pair, 5)
        await eventually(lambda: tokens(rabbit, pair.prefix) == (0, 1), 10)
        await pair.check_ticks(8)
    finally:
        await pair.stop()


async def test_the_leader_replaces_its_token_before_consumer_timeout(
    amqp_url: str, prefix: str, tmp_path: Path, rabbit: RabbitNode
) -> None:
    """With broker.consumer_timeout = 2 s a fresh token every 0.5 s: the lead never changes, and
    the leader holds one token (it acked each one it replaced)."""
    pair = Pair(amqp_url, prefix, tmp_path, consumer_timeout=2.0)
    try:
        await pair.start("a")
        await pair.start("b")
        leader = pair.service("a").broker.leader  # type: ignore[attr-defined]
        held = []
        for _ in range(6):
            await ticks_after(pair, 2)
            held.append(leader._held)
        assert len(set(held)) >= 4  # each half second, another token
        assert [(n, lead) for n, lead, _ in pair.changes] == [("a", True)]
        await eventually(lambda: tokens(rabbit, pair.prefix) == (0, 1), 10)
        await pair.check_ticks(10)
    finally:
        await pair.stop()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_the_lead_outlives_the_brokers_consumer_timeout(
    amqp_url: str, prefix: str, tmp_path: Path, rabbit: RabbitNode
) -> None:
    """The node's consumer_timeout at 5 s, checked every second (RabbitMQ's channels check it
    once a minute by default): the leader, told of it (`broker.consumer_timeout`), replaces its
    token every 1.25 s, so the broker never closes its channel and the lead never moves in 15 s.
    Held unacked, the one token would have been taken back within about 6 s."""
    logged = len(rabbit.log_tail(1_000_000).splitlines())
    pair = Pair(amqp_url, prefix, tmp_path, consumer_timeout=5.0)
    # Before the services start: each channel reads both when it is opened.
    with rabbit.consumer_timeout(5000, check_every_ms=1000):
        try:
            await pair.start("a")
            await pair.start("b")
            await ticks_after(pair, 75, deadline=30)  # 15 s
            assert [(n, lead) for n, lead, _ in pair.changes] == [("a", True)]
            assert pair.service("a").broker.problem() is None
            await pair.check_ticks(75)
        finally:
            await pair.stop()
    since = rabbit.log_tail(1_000_000).splitlines()[logged:]
    timed_out = [line for line in since if "timed out" in line]
    assert not timed_out, timed_out
