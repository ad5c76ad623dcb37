"""Dead letters, managed: the failed and dead jobs that match a filter, retried or purged at once
(`POST /v1/dead/retry`, `POST /v1/dead/purge`, `aioqueue retry --all`, `aioqueue purge`).

A filter is `task`, `error_type` and `before` (finished before that time), each optional and
all of those given applying. One of them at least, or `"all": true`: a body that names nothing
must not purge everything by mistake. `dry_run` counts the jobs that match and changes nothing.

- **Retry**: each job through `Jobs.retry`, as `POST /v1/jobs/{id}/retry` does it, oldest first,
  `RETRY_CONCURRENCY` at once. A full queue or job store, or the broker away, stops it: what was
  retried stays retried, and the caller is told how many are left.
- **Purge**: the dead-letter queue first loses the messages of the jobs that match, then every
  process's store forgets the jobs: a `purged` event each, through the log, so that every
  process agrees (a job retried meanwhile is not purged anywhere). In that order so that a purge
  cut short (the broker away) can be run again with the same filter: the jobs are still there
  to match. A message whose job no store knows any more (forgotten `result_ttl` after it
  finished) cannot be matched by a filter: `all` without another field empties the whole queue.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from aioqueue.broker.base import Broker
from aioqueue.errors import (
    BrokerUnavailable,
    Conflict,
    FieldError,
    InvalidRequest,
    NotFound,
    NotReady,
    QueueFull,
)
from aioqueue.eventlog import EventLog
from aioqueue.events import Purged
from aioqueue.jobs import DEAD_LETTERS
from aioqueue.producer import Jobs
from aioqueue.store import JobFilter, JobStore
from aioqueue.submission import RFC3339_EXPECTED, parse_time

logger = logging.getLogger(__name__)

#: Jobs read from the store at a time (and events in one log entry, under its 512).
CHUNK = 500
#: Retries in flight at once: each waits for its message's confirm and its event's echo.
RETRY_CONCURRENCY = 16
FIELDS = frozenset({"task", "error_type", "before", "all", "dry_run"})
#: The longest task name or error type a filter takes.
MAX_NAME = 200
#: What stops a bulk retry: trying the next job would meet the same.
STOPS = (QueueFull, BrokerUnavailable, NotReady)


@dataclass(frozen=True, slots=True)
class DeadFilter:
    task: str | None = None
    error_type: str | None = None
    #: Jobs that finished before this POSIX time.
    before: float | None = None
    #: Every dead letter (with no other field), or those the other fields match.
    all: bool = False
    dry_run: bool = False

    @property
    def everything(self) -> bool:
        return self.task is None and self.error_type is None and self.before is None

    @property
    def jobs(self) -> JobFilter:
        """The dead letters it takes, as the store filters them."""
        return JobFilter(DEAD_LETTERS, self.task, None, self.error_type, None, self.before)

    def describe(self) -> str:
        named = [f"{key}={value}" for key, value in self._fields().items() if value is not None]
        return ", ".join(named) or "all"

    def _fields(self) -> dict[str, Any]:
        return {"task": self.task, "error_type": self.error_type, "before": self.before}


def parse_filter(body: Any) -> DeadFilter:
    """The filter of a request body; InvalidRequest (400) naming each bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("expected a JSON object", [FieldError("body", "not an object")])
    errors = [FieldError(key, "unknown field") for key in body if key not in FIELDS]
    text: dict[str, str | None] = {}
    for key in ("task", "error_type"):
        value = body.get(key)
        # A field is given or absent: null is no value (as /openapi.json says).
        if key in body and not (isinstance(value, str) and 1 <= len(value) <= MAX_NAME):
            errors.append(FieldError(key, f"expected a string of 1 to {MAX_NAME} characters"))
            value = None
        text[key] = value
    before = None
    if "before" in body:
        try:
            before = parse_time(body["before"])
        except ValueError:
            errors.append(FieldError("before", RFC3339_EXPECTED))
    flags = {}
    for key in ("all", "dry_run"):
        flags[key] = body.get(key, False)
        if not isinstance(flags[key], bool):
            errors.append(FieldError(key, "expected true or false"))
    if errors:
        raise InvalidRequest("invalid dead-letter filter", errors)
    found = DeadFilter(text["task"], text["error_type"], before, flags["all"], flags["dry_run"])
    if found.everything and not found.all:
        message = 'name task, error_type or before; or send "all": true for every dead letter'
        raise InvalidRequest("an empty filter", [FieldError("all", message)])
    return found


class DeadLetters:
    def __init__(
        self,
        jobs: Jobs,
        store: JobStore,
        log: EventLog,
        broker: Broker,
        check_open: Callable[[bool], None],
    ) -> None:
        self._jobs = jobs
        self._store = store
        self._log = log
        self._broker = broker
        #: NotReady (503) while the store is incomplete or the service stops (`Service`).
        self._check_open = check_open
        #: One bulk change at a time in this process: two purges would sweep the queue twice.
        self._busy = asyncio.Lock()

    def count(self, flt: DeadFilter) -> int:
        """How many dead letters match."""
        self._check_open(False)
        return self._store.count(flt.jobs)

    def _chunks(self, flt: DeadFilter) -> Iterator[list[str]]:
        """Chunks of the ids of the dead letters that match, oldest first, of the jobs known
        now: a job created later (or one retried here that fails again) is not taken."""
        after, before = -1, self._store.next_seq
        while chunk := self._store.oldest_first(flt.jobs, after, before, CHUNK):
            after = chunk[-1][0]
            yield [job_id for _, job_id in chunk]

    async def retry(self, flt: DeadFilter) -> tuple[int, int]:
        """Retry every dead letter that matches; (how many were, how many are left). Raises
        what stopped it (a full queue or store: 429; the broker: 503) if it retried none."""
        self._check_open(True)
        async with self._busy:
            retried = 0
            for ids in self._chunks(flt):
                done, stop = await self._retry_chunk(ids)
                retried += done
                if stop is not None:
                    if not retried:
                        raise stop
                    left = self.count(flt)
                    logger.warning(
                        "retry of dead letters (%s) stopped after %d, %d left: %s",
                        flt.describe(),
                        retried,
                        left,
                        stop,
                    )
                    return retried, left
            logger.info("retried %d dead letters (%s)", retried, flt.describe())
            return retried, 0

    async def _retry_chunk(self, ids: list[str]) -> tuple[int, Exception | None]:
        room = asyncio.Semaphore(RETRY_CONCURRENCY)

        async def one(job_id: str) -> bool:
            async with room:
                try:
                    await self._jobs.retry(job_id)
                except (Conflict, NotFound):  # retried, purged or forgotten meanwhile
                    return False
            return True

        outcomes = await asyncio.gather(*(one(job_id) for job_id in ids), return_exceptions=True)
        stop = None
        for outcome in outcomes:
            if isinstance(outcome, STOPS):
                stop = outcome
            elif isinstance(outcome, BaseException):
                raise outcome
        return sum(outcome is True for outcome in outcomes), stop

    async def purge(self, flt: DeadFilter) -> tuple[int, int]:
        """Purge every dead letter that matches; (jobs forgotten by every store, messages
        taken out of the dead-letter queue)."""
        self._check_open(True)
        async with self._busy:
            if flt.everything:
                removed = await self._broker.purge_dead_letters()
            else:
                removed = await self._broker.drop_dead_letters(self._of_matching_job(flt))
            purged, matching = 0, flt.jobs
            for ids in self._chunks(flt):
                jobs = [job for job in map(self._store.get, ids) if job and matching.matches(job)]
                if jobs:  # (an append of nothing would be a barrier)
                    await self._log.append(*(Purged(job.id, job.run) for job in jobs))
                purged += sum(self._store.get(job.id) is None for job in jobs)
            logger.info(
                "purged %d dead letters (%s); %d messages taken out of the dead-letter queue",
                purged,
                flt.describe(),
                removed,
            )
            return purged, removed

    def _of_matching_job(self, flt: DeadFilter) -> Callable[[bytes], bool]:
        matching = flt.jobs

        def drop(body: bytes) -> bool:
            try:
                job_id = orjson.loads(body).get("id")
            except (orjson.JSONDecodeError, AttributeError):
                return False  # not a job's message: kept for an operator to read
            job = self._store.get(job_id) if isinstance(job_id, str) else None
            return job is not None and matching.matches(job)

        return drop
