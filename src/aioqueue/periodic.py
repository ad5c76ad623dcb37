"""Periodic jobs: their schedules, and the pure decision of which tick to submit next.

A schedule is a cron expression (5 fields, or 6 with seconds first, evaluated in UTC) or a fixed
period (`every`). Its ticks are instants every process computes alike, whole milliseconds since
the Unix epoch: a period's ticks are its multiples since the epoch (every=30 ticks at :00 and
:30 of each minute, whichever process started when), a cron expression's are its matches. The
tick is what makes a periodic job unique: its job is submitted with the idempotency key
`periodic:TASK:TICK_TIME` (`tick_key`), so that two processes that both think they lead submit
one job per tick, never two (see scheduler.py for who submits).

Which tick comes next (`plan`) depends on what was dealt with last (`done`) and the time:

- a tick due now is submitted;
- ticks that came due while no leader was there, found **within `grace`** of their time, are each
  submitted, in order, late: a failover (the leader died, another took over a few seconds later)
  misses no tick;
- once the oldest tick not dealt with is **more than `grace`** late, nothing ran the schedule for
  a while (every process was down, or the broker away): the schedule's `catch_up` policy applies
  to the whole backlog at once. `"once"` submits the latest tick due (one job for all of them;
  Celery beat and APScheduler's `coalesce` do the same), `"skip"` submits none of them; either
  way the schedule goes on with the next tick to come.

Cron expressions are parsed by cronsim (by the author of Healthchecks, a cron monitoring
service that depends on it): it matches Debian's cron, is typed, has no dependencies, and
iterates backwards as well as forwards (the latest tick due, without walking every missed one).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from cronsim import CronSim, CronSimError

from aioqueue.errors import TaskDefinitionError
from aioqueue.jobs import rfc3339

#: What a schedule does with ticks that came due while nothing ran it (see the module's doc).
CatchUp = Literal["once", "skip"]
CATCH_UPS: tuple[CatchUp, ...] = ("once", "skip")
#: The default `grace`, in seconds: a failover takes well under this (a killed leader's
#: connection closes at once; a partitioned one is dropped after two missed heartbeats).
DEFAULT_GRACE = 60.0
#: The prefix of every periodic job's idempotency key.
KEY_PREFIX = "periodic:"
#: The shorthands of cron(8) that cronsim does not read itself.
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: A tick time as `rfc3339()` writes it (UTC, milliseconds).
TICK_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", re.ASCII)


class Schedule(Protocol):
    """When a periodic task's ticks are, as whole milliseconds since the Unix epoch."""

    def next_after(self, ms: int) -> int | None:
        """The first tick strictly after `ms`; None if there is none (in 50 years, for cron)."""

    def latest_at_or_before(self, ms: int) -> int | None:
        """The last tick at or before `ms`; None if there is none."""

    def describe(self) -> dict[str, Any]:
        """`{"cron": EXPRESSION}` or `{"every": SECONDS}`, as `GET /v1/schedules` shows it."""


@dataclass(frozen=True)
class Every:
    """Every `period_ms` milliseconds, at the multiples of it since the Unix epoch."""

    period_ms: int

    @classmethod
    def of(cls, every: float | timedelta) -> Every:
        seconds = every.total_seconds() if isinstance(every, timedelta) else every
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise TaskDefinitionError(f"every must be seconds or a timedelta, not {every!r}")
        period = round(seconds * 1000) if math.isfinite(seconds) else 0
        # Whole milliseconds: a tick's time, in its key, must name one tick and only one.
        if period < 1 or abs(period - seconds * 1000) > 1e-6:
            raise TaskDefinitionError(
                f"every must be a positive number of seconds in whole milliseconds, not {every!r}"
            )
        return cls(period)

    def next_after(self, ms: int) -> int:
        return (ms // self.period_ms + 1) * self.period_ms

    def latest_at_or_before(self, ms: int) -> int:
        return ms // self.period_ms * self.period_ms

    def describe(self) -> dict[str, Any]:
        return {"every": self.period_ms / 1000}


@dataclass(frozen=True)
class Cron:
    """The matches of a cron expression, in UTC (no daylight saving time to trip over)."""

    expression: str

    @classmethod
    def of(cls, expression: str) -> Cron:
        if not isinstance(expression, str):
            raise TaskDefinitionError(f"cron must be a string, not {expression!r}")
        cron = cls(expression)
        try:
            cron._iterate(0, reverse=False)
        except CronSimError as exc:
            raise TaskDefinitionError(f"cron {expression!r}: {exc}") from None
        if cron.next_after(_now_ms()) is None:
            raise TaskDefinitionError(f"cron {expression!r} matches no time in the next 50 years")
        return cron

    def _iterate(self, ms: int, reverse: bool) -> CronSim:
        expression = CRON_ALIASES.get(self.expression.strip().lower(), self.expression)
        return CronSim(expression, datetime.fromtimestamp(ms / 1000, UTC), reverse=reverse)

    def next_after(self, ms: int) -> int | None:
        # cronsim drops the fraction of a second, then goes strictly past the whole second:
        # every tick is a whole second, so that is strictly after `ms`.
        return _ms(next(self._iterate(ms, reverse=False), None))

    def latest_at_or_before(self, ms: int) -> int | None:
        # Backwards, cronsim takes a start with a fraction of a second as its own first match
        # if that whole second matches: one millisecond past `ms` makes `ms` itself count.
        return _ms(next(self._iterate(ms + 1, reverse=True), None))

    def describe(self) -> dict[str, Any]:
        return {"cron": self.expression}


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1000)


def _now_ms() -> int:
    return math.floor(datetime.now(UTC).timestamp() * 1000)


@dataclass(frozen=True)
class Periodic:
    """A task run on a schedule (`@app.periodic`)."""

    task: str
    schedule: Schedule
    catch_up: CatchUp = "once"
    #: Seconds a tick may be late and still be submitted on its own (see the module's doc).
    grace: float = DEFAULT_GRACE

    def __post_init__(self) -> None:
        check_policy(self.catch_up, self.grace)

    @property
    def grace_ms(self) -> int:
        return round(self.grace * 1000)

    def key(self, tick: int) -> str:
        return tick_key(self.task, tick)

    def describe(self) -> dict[str, Any]:
        return {**self.schedule.describe(), "catch_up": self.catch_up, "grace": self.grace}


def check_policy(catch_up: str, grace: float) -> None:
    """`catch_up` and `grace` of `@app.periodic`; TaskDefinitionError if either is bad."""
    if catch_up not in CATCH_UPS:
        raise TaskDefinitionError(f"catch_up must be 'once' or 'skip', not {catch_up!r}")
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
        raise TaskDefinitionError(f"grace must be seconds, 0 or more, not {grace!r}")
    if not math.isfinite(grace):
        raise TaskDefinitionError("grace must be a finite number of seconds")


def schedule_of(cron: str | None, every: float | timedelta | None) -> Schedule:
    """The schedule of `@app.periodic`: exactly one of `cron` and `every`."""
    if cron is not None and every is None:
        return Cron.of(cron)
    if every is not None and cron is None:
        return Every.of(every)
    raise TaskDefinitionError("a periodic task needs exactly one of cron= and every=")


def tick_time(tick: int) -> str:
    """A tick as RFC 3339 UTC with milliseconds, as every time in the API is written."""
    text = rfc3339(tick / 1000)
    assert text is not None
    return text


def parse_tick(text: str) -> int | None:
    """The tick `tick_time` wrote as `text`; None for any other text (so one tick has one key)."""
    if not TICK_TIME.fullmatch(text):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    tick = round(moment.timestamp() * 1000)
    return tick if tick_time(tick) == text else None


def tick_key(task: str, tick: int) -> str:
    """The idempotency key of a tick's job (CONTRACT §6): `periodic:TASK:TICK_TIME`."""
    return f"{KEY_PREFIX}{task}:{tick_time(tick)}"


@dataclass(frozen=True)
class Step:
    """What a schedule's leader does next (`plan`)."""

    #: The tick to submit now, or None.
    submit: int | None
    #: What is dealt with once `submit` is submitted (or at once, if there is nothing to submit).
    done: int
    #: When the next tick is due, if nothing is due now; None if none ever is.
    wake: int | None = None
    #: The first tick of a backlog that the catch-up policy dealt with (with `done`, the last).
    missed_from: int | None = None


def plan(periodic: Periodic, done: int, now: int) -> Step:
    """The next step of a schedule whose ticks up to `done` are dealt with, at time `now` (both
    in ms since the epoch)."""
    schedule = periodic.schedule
    first = schedule.next_after(done)
    if first is None or first > now:
        return Step(None, done, wake=first)
    if now - first <= periodic.grace_ms:
        return Step(first, first)  # late by less than grace (a failover): each tick runs
    latest = schedule.latest_at_or_before(now)
    assert latest is not None and latest >= first, "a tick due after `done` is at or before now"
    if periodic.catch_up == "once":
        return Step(latest, latest, missed_from=first)
    return Step(None, latest, wake=schedule.next_after(latest), missed_from=first)
