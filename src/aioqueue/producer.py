"""The producer side of a running service: submit, get, list, wait, cancel and retry jobs.

This is what the HTTP handlers, the websocket, a task's `Context` and `App.submit` call. It never
consumes a queue (the worker side, `runner.py`, does): it writes to the event log and reads the
job store that the log builds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Generator
from typing import Any

from aioqueue.broker.base import Broker
from aioqueue.config import Settings
from aioqueue.errors import Conflict, NotFound, StoreFull
from aioqueue.eventlog import EventLog
from aioqueue.events import Cancelled, JobSpec, Retried
from aioqueue.jobs import RETRYABLE, Job
from aioqueue.metrics import Metrics
from aioqueue.store import EVERY_JOB, ChangeListener, JobFilter, JobStore, scoped_key
from aioqueue.submission import build_spec
from aioqueue.tasks import Registry


class Jobs:
    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        broker: Broker,
        log: EventLog,
        store: JobStore,
        max_timeout: float,
        check_open: Callable[[bool], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._registry = registry
        self._metrics = metrics if metrics is not None else Metrics(registry.tasks)
        self._settings = settings
        self._broker = broker
        self._log = log
        self._store = store
        #: The longest `timeout` a job may have (what a broker's consumer_timeout allows).
        self.max_timeout = max_timeout
        #: Raises NotReady (503) while the store is incomplete, or, given True, while the
        #: service stops too (no new work then).
        self._check_open = check_open
        self._submitting: dict[str, asyncio.Future[None]] = {}

    # Reading ----------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        self._check_open(False)
        return self._store.get(job_id)

    def known(self, job_id: str) -> Job:
        """The job; NotFound (404) if the store does not know it."""
        job = self.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id[:100]!r}")
        return job

    def list(
        self, where: JobFilter = EVERY_JOB, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """A page of the jobs `where` takes, newest first (`JobStore.list`)."""
        self._check_open(False)
        return self._store.list(where, limit, cursor)

    def page(
        self, where: JobFilter = EVERY_JOB, limit: int = 50, cursor: str | None = None
    ) -> Generator[tuple[Job, str | None], None, None]:
        """As `list`, one job at a time, each with the cursor after it (`JobStore.page`)."""
        self._check_open(False)
        return self._store.page(where, limit, cursor)

    async def wait_terminal(self, job_id: str, within: float) -> Job:
        """The job once it is terminal, or as it is after `within` seconds; NotFound if unknown
        (or forgotten meanwhile)."""
        self.known(job_id)
        await self._store.wait_terminal(job_id, within)
        return self.known(job_id)

    def on_change(self, listener: ChangeListener) -> None:
        """Call `listener(event, job)` after every change of any job, in log order."""
        self._store.listeners.append(listener)

    # Writing ----------------------------------------------------------------------------------

    async def submit(
        self, body: Any, idempotency_key: str | None = None, owner: str | None = None
    ) -> Job:
        """Check and publish a job; returns its record once the broker confirmed it."""
        job, _ = await self.submit_once(body, idempotency_key, owner)
        return job

    async def submit_once(
        self, body: Any, idempotency_key: str | None = None, owner: str | None = None
    ) -> tuple[Job, bool]:
        """As `submit`, and whether this call created the job: a repeated idempotency key (of
        the same `owner`) returns the first job (True only for the first); the same key with
        another body is 409.
        """
        now = time.time()
        tasks, defaults = self._registry.tasks, self._settings.jobs
        spec = build_spec(body, tasks, defaults, now, idempotency_key, self.max_timeout)
        spec = spec if owner is None else spec.replace(owner=owner)
        self._check_open(True)
        if spec.idempotency_key is None:
            job = await self._publish(spec)
            self._metrics.submitted(spec.task)
            return job, True
        key = scoped_key(owner, spec.idempotency_key)
        # Concurrent repeats in this process wait for the first; across processes, the log's
        # order decides (`JobStore.create`).
        while (pending := self._submitting.get(key)) is not None:
            await asyncio.shield(pending)
        first = self._first_for(spec)
        if first is not None:
            return first, False
        self._submitting[key] = asyncio.get_running_loop().create_future()
        try:
            await self._publish(spec)
        finally:
            self._submitting.pop(key).set_result(None)
        first = self._first_for(spec)
        assert first is not None
        created = first.id == spec.id  # else another process's first submit of the key won
        if created:
            self._metrics.submitted(spec.task)
        return first, created

    async def _publish(self, spec: JobSpec) -> Job:
        await self._make_room()
        await self._log.submit(spec)  # BrokerUnavailable at once if the broker is unreachable
        job = self._store.get(spec.id)
        if job is None and spec.idempotency_key is not None:
            job = self._store.for_key(spec.idempotency_key, spec.owner)
        assert job is not None, "a submitted job is in the store once submit() returns"
        return job

    def _retryable(self, job_id: str) -> Job:
        job = self.known(job_id)
        if job.status not in RETRYABLE:
            raise Conflict(
                f"the job is {job.status.value}; only failed, dead or cancelled jobs retry"
            )
        return job

    async def _make_room(self, keep: str | None = None) -> None:
        """StoreFull (429) if the job store keeps `store.max_bytes` of jobs that are not finished
        (or the job `keep`, about to be run again).

        Checked here, where a job is refused before anything is written, and not where the log
        is applied: every process applies every entry, whatever its store holds. Finished jobs
        make room first, the earliest finished first, before their result_ttl: a store full of
        old results would otherwise refuse all new work for up to result_ttl (a day by default).
        """
        store = self._store
        if store.full():
            await store.make_room(keep)
        if store.full():
            raise StoreFull(
                f"the job store keeps {store.kept_bytes} bytes of jobs that are not finished, at"
                f" most {store.max_bytes} (store.max_bytes): not accepted, try again once some"
                " finish"
            )

    def _first_for(self, spec: JobSpec) -> Job | None:
        key = spec.idempotency_key
        if key is None:
            return None
        first = self._store.for_key(key, spec.owner)
        if first is not None and first.fingerprint != spec.fingerprint:
            raise Conflict(
                f"idempotency key {key[:100]!r} was used for another request (job {first.id})"
            )
        return first

    async def cancel(self, job_id: str) -> Job:
        """Record a cancel; the process running the job (if any) stops it. 409 if finished."""
        job = self.known(job_id)
        if job.terminal:
            raise Conflict(f"the job is {job.status.value} already; only unfinished jobs cancel")
        await self._log.append(Cancelled(job_id, job.attempt))
        return self._store.get(job_id) or job

    async def retry(self, job_id: str) -> Job:
        """Run a failed, dead or cancelled job again: same id, a new run from attempt 1."""
        job = self._retryable(job_id)
        self._check_open(True)
        if self._store.full():
            await self._make_room(keep=job_id)  # it will not be finished: it makes no room
            job = self._retryable(job_id)  # retried meanwhile, from another request
        run = job.run + 1
        # The message first: a `retried` event is only written once the job can run. The
        # runner waits for the event when it gets a message of a newer run.
        spec = job.spec(attempt=1).replace(run=run, scheduled_for=None, expires_at=None)
        await self._broker.publish(spec.encode(), job.queue, priority=job.priority)
        await self._log.append(Retried(job_id, run))
        return self._store.get(job_id) or job
