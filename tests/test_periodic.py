"""Periodic schedules as pure code: ticks of `every` and of cron (UTC), the tick's key, which tick
comes next (`plan`: on time, late within grace, missed with each catch-up policy), and what
`@app.periodic` refuses at declaration."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from aioqueue import App, Context, TaskDefinitionError
from aioqueue.periodic import (
    Cron,
    Every,
    Periodic,
    Step,
    parse_tick,
    plan,
    schedule_of,
    tick_key,
    tick_time,
)


def ms(text: str) -> int:
    """An RFC 3339 time (UTC) as milliseconds since the epoch."""
    return round(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


# Every -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("every", "period_ms"),
    [(30, 30_000), (30.0, 30_000), (0.5, 500), (0.001, 1), (timedelta(minutes=5), 300_000)],
)
def test_every_takes_seconds_or_a_timedelta(every: float | timedelta, period_ms: int) -> None:
    assert Every.of(every).period_ms == period_ms


@pytest.mark.parametrize(
    "every", [0, -1, 0.0005, 1.0005, float("nan"), float("inf"), True, "5", timedelta(0)]
)
def test_every_must_be_positive_whole_milliseconds(every: object) -> None:
    with pytest.raises(TaskDefinitionError, match="every must be"):
        Every.of(every)  # type: ignore[arg-type]


def test_every_ticks_at_multiples_of_the_period_since_the_epoch() -> None:
    # Every process computes the same ticks, whenever it started.
    every = Every.of(30)
    assert every.next_after(ms("2026-03-01T10:00:07")) == ms("2026-03-01T10:00:30")
    assert every.next_after(ms("2026-03-01T10:00:30")) == ms("2026-03-01T10:01:00")  # strictly
    assert every.latest_at_or_before(ms("2026-03-01T10:00:30")) == ms("2026-03-01T10:00:30")
    assert every.latest_at_or_before(ms("2026-03-01T10:00:29.999")) == ms("2026-03-01T10:00:00")
    assert Every.of(0.5).next_after(ms("2026-03-01T10:00:00.499")) == ms("2026-03-01T10:00:00.5")


# Cron --------------------------------------------------------------------------------------------


def test_cron_ticks_in_utc() -> None:
    cron = Cron.of("*/5 * * * *")
    assert cron.next_after(ms("2026-03-01T10:03:00")) == ms("2026-03-01T10:05:00")
    assert cron.next_after(ms("2026-03-01T10:05:00")) == ms("2026-03-01T10:10:00")  # strictly
    assert cron.next_after(ms("2026-03-01T10:04:59.999")) == ms("2026-03-01T10:05:00")
    assert cron.latest_at_or_before(ms("2026-03-01T10:05:00")) == ms("2026-03-01T10:05:00")
    assert cron.latest_at_or_before(ms("2026-03-01T10:05:00.001")) == ms("2026-03-01T10:05:00")
    assert cron.latest_at_or_before(ms("2026-03-01T10:04:59.999")) == ms("2026-03-01T10:00:00")


def test_cron_in_utc_knows_no_daylight_saving_time() -> None:
    # 2026-03-29 01:00 UTC is when Europe moves its clocks on: UTC ticks stay an hour apart.
    hourly = Cron.of("0 * * * *")
    start = ms("2026-03-29T00:00:00")
    ticks = [start]
    for _ in range(3):
        after = hourly.next_after(ticks[-1])
        assert after is not None
        ticks.append(after)
    assert [b - a for a, b in itertools.pairwise(ticks)] == [3_600_000] * 3


def test_cron_takes_seconds_as_a_sixth_field_first_and_the_shorthands() -> None:
    assert Cron.of("*/15 * * * * *").next_after(ms("2026-03-01T10:00:01")) == ms(
        "2026-03-01T10:00:15"
    )
    assert Cron.of("@hourly").next_after(ms("2026-03-01T10:00:01")) == ms("2026-03-01T11:00:00")
    assert Cron.of("@daily").latest_at_or_before(ms("2026-03-01T10:00:00")) == ms(
        "2026-03-01T00:00:00"
    )
    assert Cron.of("0 9 * * MON").next_after(ms("2026-03-01T10:00:00")) == ms(  # a Sunday
        "2026-03-02T09:00:00"
    )


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("61 * * * *", "Bad minute"),
        ("* * * *", "Wrong number of fields"),
        ("0 0 30 2 *", "Bad day-of-month"),
        ("@sometimes", "Wrong number of fields"),
        ("* * */20 * 1L", "no time in the next 50 years"),
    ],
)
def test_a_bad_cron_expression_is_refused_at_declaration(expression: str, why: str) -> None:
    with pytest.raises(TaskDefinitionError, match=why):
        Cron.of(expression)


def test_a_schedule_is_cron_or_every_not_both_nor_neither() -> None:
    assert schedule_of("* * * * *", None).describe() == {"cron": "* * * * *"}
    assert schedule_of(None, 2.5).describe() == {"every": 2.5}
    for cron, every in (("* * * * *", 1.0), (None, None)):
        with pytest.raises(TaskDefinitionError, match="exactly one of cron= and every="):
            schedule_of(cron, every)


# The tick's key ----------------------------------------------------------------------------------


def test_the_key_names_the_task_and_the_tick_time_in_rfc3339_utc() -> None:
    tick = ms("2026-03-01T10:05:00")
    assert tick_time(tick) == "2026-03-01T10:05:00.000Z"
    assert tick_key("reports:daily", tick) == "periodic:reports:daily:2026-03-01T10:05:00.000Z"
    assert tick_key("beat", tick + 500) == "periodic:beat:2026-03-01T10:05:00.500Z"


def test_a_tick_time_reads_back_only_as_written() -> None:
    tick = ms("2026-03-01T10:05:00.250")
    assert parse_tick(tick_time(tick)) == tick
    # Other spellings of the same instant are not that tick's key (one tick, one key).
    for other in (
        "2026-03-01T10:05:00.25Z",
        "2026-03-01T10:05:00.250+00:00",
        "2026-03-01 10:05:00.250Z",
        "2026-03-01T10:05:00.250z",
        "2026-02-30T10:05:00.000Z",
        "tomorrow",
    ):
        assert parse_tick(other) is None, other


# Which tick next ---------------------------------------------------------------------------------

EVERY_5 = Every.of(5)


def periodic(catch_up: str = "once", grace: float = 60.0) -> Periodic:
    return Periodic("beat", EVERY_5, catch_up, grace)  # type: ignore[arg-type]


T = ms("2026-03-01T10:00:00")  # a tick


def test_nothing_due_waits_for_the_next_tick() -> None:
    assert plan(periodic(), T, T + 4_999) == Step(None, T, wake=T + 5_000)


def test_a_tick_due_is_submitted() -> None:
    assert plan(periodic(), T, T + 5_000) == Step(T + 5_000, T + 5_000)
    assert plan(periodic(), T, T + 5_003) == Step(T + 5_000, T + 5_000)


def test_ticks_late_within_grace_are_each_submitted_in_order() -> None:
    """A failover: the leader died after T, another leads at T + 23 s. Each of the four ticks
    it missed is submitted, oldest first, then it is on time again."""
    now, done, submitted = T + 23_000, T, []
    while (step := plan(periodic(), done, now)).submit is not None:
        submitted.append(step.submit)
        done = step.done
    assert submitted == [T + 5_000, T + 10_000, T + 15_000, T + 20_000]
    assert step == Step(None, T + 20_000, wake=T + 25_000)


def test_missed_ticks_past_grace_run_once_with_catch_up_once() -> None:
    """Every process was down from T to T + 10 min: one job, for the latest tick due."""
    now = T + 600_000 + 2_000
    step = plan(periodic("once"), T, now)
    assert step == Step(T + 600_000, T + 600_000, missed_from=T + 5_000)
    assert plan(periodic("once"), step.done, now) == Step(None, T + 600_000, wake=T + 605_000)


def test_missed_ticks_past_grace_are_skipped_with_catch_up_skip() -> None:
    now = T + 600_000 + 2_000
    assert plan(periodic("skip"), T, now) == Step(
        None, T + 600_000, wake=T + 605_000, missed_from=T + 5_000
    )


def test_grace_is_how_late_the_oldest_tick_due_may_be() -> None:
    # The oldest tick due is 20 s late: with grace 20 it is submitted, with 19.999 it is missed.
    assert plan(periodic("skip", grace=20), T, T + 25_000).submit == T + 5_000
    assert plan(periodic("skip", grace=19.999), T, T + 25_000).submit is None
    # Grace 0: a tick not submitted at its very millisecond counts as missed.
    assert plan(periodic("once", grace=0), T, T + 5_001) == Step(
        T + 5_000, T + 5_000, missed_from=T + 5_000
    )


def test_a_cron_schedule_plans_the_same_way() -> None:
    cron = Periodic("report", Cron.of("0 * * * *"), "once", 60.0)
    hour = 3_600_000
    assert plan(cron, T, T + hour + 30_000) == Step(T + hour, T + hour)
    assert plan(cron, T, T + 5 * hour + 1) == Step(T + 5 * hour, T + 5 * hour, missed_from=T + hour)


# Declaring ---------------------------------------------------------------------------------------


def test_periodic_on_a_task_or_alone_on_a_function() -> None:
    app = App()

    @app.periodic("*/5 * * * *")
    @app.task(queue="reports")
    async def report(ctx: Context, days: int = 1) -> int:
        return days

    @app.periodic(every=timedelta(seconds=30), catch_up="skip", grace=5, queue="beats")
    def heartbeat() -> None:
        return None

    assert app.tasks["report"] is report and app.tasks["heartbeat"] is heartbeat
    assert heartbeat.queue == "beats"
    assert app.schedules["report"].describe() == {
        "cron": "*/5 * * * *",
        "catch_up": "once",
        "grace": 60.0,
    }
    assert app.schedules["heartbeat"].describe() == {"every": 30.0, "catch_up": "skip", "grace": 5}


def test_a_periodic_task_takes_no_required_argument() -> None:
    app = App()
    with pytest.raises(TaskDefinitionError, match=r"required arguments \['url'\]"):

        @app.periodic(every=1)
        async def fetch(ctx: Context, url: str, retries: int = 1) -> None:
            return None


@pytest.mark.parametrize(
    ("options", "why"),
    [
        ({"every": 1, "catch_up": "all"}, "catch_up must be 'once' or 'skip'"),
        ({"every": 1, "grace": -1}, "grace must be seconds, 0 or more"),
        ({"every": 1, "grace": float("inf")}, "grace must be a finite"),
        ({"every": 0}, "every must be"),
        ({"cron": "* * * * *", "every": 1}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_bad_schedule_options_are_refused(options: dict[str, object], why: str) -> None:
    app = App()

    def tidy() -> None:
        return None

    with pytest.raises(TaskDefinitionError, match=why):
        app.periodic(**options)(tidy)  # type: ignore[arg-type]
    assert not app.schedules and not app.tasks


def test_a_task_gets_one_schedule_and_only_of_its_own_app() -> None:
    app, other = App(), App()

    @other.task
    async def elsewhere() -> None:
        return None

    with pytest.raises(TaskDefinitionError, match="not a task of this App"):
        app.periodic(every=1)(elsewhere)

    @app.periodic(every=1)
    async def once() -> None:
        return None

    with pytest.raises(TaskDefinitionError, match="has a schedule already"):
        app.periodic(every=2)(once)
    with pytest.raises(TaskDefinitionError, match=r"to @app.task"):
        app.periodic(every=2, queue="q")(app.task(name="lam")(lambda: None))
