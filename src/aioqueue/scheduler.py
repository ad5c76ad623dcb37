"""Running the periodic schedules: every process may, one at a time does.

Every process competes for the lead (`Broker.lead`: on RabbitMQ, the single active consumer of
`P.scheduler`; on `memory://`, the one process) and the one that leads submits each schedule's
ticks, as `plan` (periodic.py) decides them. A tick's job has the idempotency key
`periodic:TASK:TICK_TIME`, so that a tick submitted twice (an old leader cut off from the broker
that does not know yet that another took over, or a tick in flight at a failover) is one job:
the event log's order decides which submit made it, in every process alike, and the other is
never run.

Where a new leader starts: each process keeps, with its job store, the latest tick of each
schedule that the log holds a job of (`TickRecord`), built from the log like the store itself
and kept with it (in checkpoints too), so it outlives the jobs' `result_ttl`. A new leader first
reads the log to its end (a barrier), then goes on from that tick: the ticks after it that came
due meanwhile are submitted late, or dealt with by the schedule's catch-up policy. A schedule
with no tick in the log (a new one) starts with the first tick to come.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

from aioqueue.errors import BrokerUnavailable, NotReady, QueueFull, RequestError
from aioqueue.jobs import Job
from aioqueue.periodic import KEY_PREFIX, Periodic, parse_tick, plan, tick_time
from aioqueue.store import JobStore

logger = logging.getLogger(__name__)

#: Submits a body with an idempotency key and an owner: the job, and whether this call made it.
SubmitOnce = Callable[[Any, str | None, str | None], Awaitable[tuple[Job, bool]]]
#: The longest sleep between two looks at the clock: a wall clock set forward or back is noticed
#: within it (ticks are wall-clock times; asyncio sleeps on the monotonic clock).
MAX_SLEEP = 1.0
#: Back-off between failed submits of one tick: the first wait, and the longest.
RETRY_FIRST = 0.25
RETRY_MAX = 5.0
#: Where the store keeps each schedule's latest tick: this, then the task's name.
META_PREFIX = "periodic:"


class LastTicks(Protocol):
    def last(self, task: str) -> tuple[int, str] | None:
        """(tick in ms, job id) of the latest tick of `task` the log holds a job of, or None."""


class TickRecord(LastTicks):
    """The latest tick of each periodic task that the event log holds a job of, and that job's
    id, kept in the job store's metadata: written with the store, from the same log entries, so
    every process has the same record at the same log offset, and it survives restarts and
    `result_ttl` (a weekly schedule's job may be forgotten long before its next tick)."""

    def __init__(self, store: JobStore, tasks: Collection[str]) -> None:
        self._store = store
        self._tasks = frozenset(tasks)
        store.listeners.append(self.on_change)

    def last(self, task: str) -> tuple[int, str] | None:
        """(tick in ms, job id) of the latest tick of `task`, or None."""
        value = self._store.meta(META_PREFIX + task)
        return None if value is None else (int(value[0]), str(value[1]))

    def on_change(self, event: str, job: Job) -> None:
        key = job.idempotency_key
        # Cheap tests first: this runs for every change of every job.
        if key is None or not key.startswith(KEY_PREFIX) or event not in ("queued", "scheduled"):
            return
        task = job.task
        prefix = f"{KEY_PREFIX}{task}:"
        # Only the ticks a leader submits: no owner (a principal's key is its own, whatever it
        # looks like), and not before the tick's time by the submitter's clock. A key written by
        # hand for a time to come would otherwise hold the schedule back until then.
        if job.owner is not None or task not in self._tasks or not key.startswith(prefix):
            return
        tick = parse_tick(key[len(prefix) :])
        if tick is None or tick > job.created_at * 1000 + 1:
            return
        last = self.last(task)
        if last is None or tick > last[0]:
            # A job its queue then refused (429, `Rejected`) stays recorded: its leader tries
            # again, and only a failover in that very moment would leave the tick out.
            self._store.set_meta(META_PREFIX + task, [tick, job.id])


class Scheduler:
    def __init__(
        self,
        schedules: Mapping[str, Periodic],
        submit_once: SubmitOnce,
        barrier: Callable[[], Awaitable[None]],
        record: LastTicks,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schedules = schedules
        self._submit_once = submit_once
        self._barrier = barrier
        self._record = record
        self._clock = clock
        #: Whether this process leads (and so submits the ticks).
        self.leading = False
        self._leading: asyncio.Task[None] | None = None
        #: While leading: per task, the tick up to which its ticks are dealt with.
        self._done: dict[str, int] = {}

    def _now(self) -> int:
        return int(self._clock() * 1000)

    def on_leader_change(self, leading: bool) -> None:
        """The broker's word (`Broker.lead`): start submitting ticks, or stop at once."""
        if leading != self.leading:
            logger.info(
                "this process %s the ticks of the periodic tasks (%s)",
                "now submits" if leading else "no longer submits",
                ", ".join(self.schedules),
            )
        self.leading = leading
        if self._leading is not None:
            self._leading.cancel()
            self._leading = None
        self._done.clear()
        if leading:
            self._leading = asyncio.create_task(self._lead(), name="aioqueue-scheduler")

    async def close(self) -> None:
        self.leading = False
        leading, self._leading = self._leading, None
        if leading is not None:
            leading.cancel()
            await asyncio.gather(leading, return_exceptions=True)

    async def _lead(self) -> None:
        # Every tick an earlier leader submitted is in the log before this barrier, and so in
        # the record after it: none is submitted again but in a race the log's order settles.
        delay = RETRY_FIRST
        while True:
            try:
                await self._barrier()
                break
            except BrokerUnavailable as exc:
                logger.info("leading: reading the event log to its end first (%s)", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        await asyncio.gather(*(self._run_logged(periodic) for periodic in self.schedules.values()))

    async def _run_logged(self, periodic: Periodic) -> None:
        try:
            await self._run(periodic)
        except Exception:  # one schedule's fault stops no other
            logger.exception("periodic task %r: its schedule stopped", periodic.task)

    def _start(self, periodic: Periodic) -> int:
        last = self._record.last(periodic.task)
        return self._now() if last is None else last[0]

    async def _run(self, periodic: Periodic) -> None:
        task = periodic.task
        done = self._start(periodic)
        failures = 0
        while True:
            self._done[task] = done
            now = self._now()
            step = plan(periodic, done, now)
            if step.submit is None:
                if step.missed_from is not None:
                    self._log_missed(periodic, step.missed_from, step.done, None)
                done = step.done
                if step.wake is None:
                    logger.warning("periodic task %r: its schedule has no tick to come", task)
                    return
                await asyncio.sleep(min(MAX_SLEEP, (step.wake - now) / 1000))
                continue
            if await self._submit(periodic, step.submit, failures):
                if step.missed_from is not None:
                    self._log_missed(periodic, step.missed_from, step.done, step.submit)
                done, failures = step.done, 0
            else:
                failures += 1
                await asyncio.sleep(min(RETRY_MAX, RETRY_FIRST * 2 ** (failures - 1)))

    def _log_missed(self, periodic: Periodic, first: int, last: int, submitted: int | None) -> None:
        late = (self._now() - first) / 1000
        what = "skipped" if submitted is None else f"submitted once, as {tick_time(submitted)}"
        logger.warning(
            "periodic task %r: no process ran its schedule for %.0f s; the ticks from %s to %s"
            " were missed (more than grace = %g s late) and, as catch_up = %r, %s",
            periodic.task,
            late,
            tick_time(first),
            tick_time(last),
            periodic.grace,
            periodic.catch_up,
            what,
        )

    async def _submit(self, periodic: Periodic, tick: int, failures: int) -> bool:
        """Submit one tick's job; whether the tick is dealt with (False: try it again)."""
        key = periodic.key(tick)
        try:
            job, created = await self._submit_once({"task": periodic.task}, key, None)
        except (BrokerUnavailable, NotReady, QueueFull) as exc:
            # StoreFull is a QueueFull. Each would pass: try again, and say so once.
            log = logger.warning if failures == 0 else logger.debug
            log("periodic task %r: tick %s not submitted yet: %s", periodic.task, key, exc)
            return False
        except RequestError as exc:
            # A 409 (the key was used by a request with another body) or a 400: no retry would
            # change it. The tick is passed over; say so.
            logger.error("periodic task %r: tick %s passed over: %s", periodic.task, key, exc)
            return True
        except Exception:
            logger.exception("periodic task %r: submitting tick %s failed", periodic.task, key)
            return False
        logger.debug(
            "periodic task %r: tick %s %s job %s",
            periodic.task,
            tick_time(tick),
            "submitted as" if created else "was submitted already, as",
            job.id,
        )
        return True

    def describe(self) -> list[dict[str, Any]]:
        """The schedules as `GET /v1/schedules` lists them."""
        now = self._now()
        described = []
        for periodic in self.schedules.values():
            task = periodic.task
            last = self._record.last(task)
            # The leader's next tick may be due already (being submitted, or retried).
            after = self._done.get(task, now) if self.leading else now
            upcoming = periodic.schedule.next_after(after)
            described.append(
                {
                    "task": task,
                    **periodic.describe(),
                    "next_run_at": None if upcoming is None else tick_time(upcoming),
                    "leader": self.leading,
                    "last_tick_at": None if last is None else tick_time(last[0]),
                    "last_job_id": None if last is None else last[1],
                }
            )
        return described
