"""The queryable job state: every job of the event log's retention, rebuilt by applying it.

Listing is newest first by creation, paged by an opaque cursor (the creation sequence number of
the last job returned), so pages stay stable while jobs are added or expire. Finished jobs are
forgotten `result_ttl` seconds after they finished (G5).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

from aioqueue.errors import FieldError, InvalidRequest
from aioqueue.jobs import EventType, IllegalTransition, Job, JobStatus, apply

logger = logging.getLogger(__name__)

#: Called after every change with the event's name and the job as it is now.
ChangeListener = Callable[[str, Job], None]


class JobStore:
    def __init__(self, result_ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.result_ttl = result_ttl
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._seq_of: dict[str, int] = {}
        # Creation order, for listing: parallel ascending sequence numbers and ids. Entries of
        # expired jobs stay until `_compact()`; readers skip them.
        self._seqs: list[int] = []
        self._ids: list[str] = []
        self._next_seq = 0
        self._waiters: dict[str, list[tuple[Callable[[Job], bool], asyncio.Future[None]]]] = {}
        self.listeners: list[ChangeListener] = []
        # Idempotency keys of the jobs kept, and the ids of later jobs that repeated a key: the
        # first job in log order wins, in every process alike.
        self._by_key: dict[str, str] = {}
        self.duplicates: set[str] = set()

    def for_key(self, key: str) -> Job | None:
        """The job submitted first with this idempotency key, while it is kept."""
        job_id = self._by_key.get(key)
        return None if job_id is None else self._jobs.get(job_id)

    def __len__(self) -> int:
        return len(self._jobs)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    async def wait_for(
        self, job_id: str, condition: Callable[[Job], bool], within: float
    ) -> Job | None:
        """The job once `condition(job)` holds, or as it is after `within` seconds (or None)."""
        job = self._jobs.get(job_id)
        if (job is not None and condition(job)) or within <= 0:
            return job
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (condition, waiter)
        self._waiters.setdefault(job_id, []).append(entry)
        try:
            async with asyncio.timeout(within):
                await waiter
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(job_id)
            if waiting and entry in waiting:
                waiting.remove(entry)
                if not waiting:
                    del self._waiters[job_id]
        return self._jobs.get(job_id)

    async def wait_known(self, job_id: str, within: float) -> Job | None:
        """The job, once the log has told this store of it, or None after `within` seconds."""
        return await self.wait_for(job_id, lambda job: True, within)

    async def wait_terminal(self, job_id: str, within: float) -> None:
        """Return when the job is terminal or `within` seconds have passed."""
        if job_id in self._jobs:
            await self.wait_for(job_id, lambda job: job.terminal, within)

    def create(self, spec: dict[str, Any]) -> Job | None:
        """Add a newly queued job; None (and no change) if the id is known already."""
        if spec["id"] in self._jobs or spec["id"] in self.duplicates:
            return None
        key = spec.get("idempotency_key")
        if key is not None:
            if self.for_key(key) is not None:
                self.duplicates.add(spec["id"])
                return None
            self._by_key[key] = spec["id"]
        job = Job.from_spec(spec)
        self._jobs[job.id] = job
        self._seq_of[job.id] = self._next_seq
        self._seqs.append(self._next_seq)
        self._ids.append(job.id)
        self._next_seq += 1
        self._changed(job.status.value, job)  # the event is `queued` or `scheduled`
        return job

    def apply(self, event: dict[str, Any]) -> Job | None:
        """Apply one event; None (and no change) if it does not apply to the job's state."""
        if event["event"] == "queued":  # a job recorded again by its runner (see runner.py)
            return self.create(event["spec"])
        if event["event"] == "rejected":  # its queue refused it: it was never accepted
            self._forget(event["job"])
            return None
        job = self._jobs.get(event["job"])
        if job is None:
            logger.debug("event %s for unknown job %s", event["event"], event["job"])
            return None
        try:
            kind = apply(job, event)
        except IllegalTransition as exc:
            logger.debug("job %s: ignored event: %s", job.id, exc)
            return None
        # A retried job is queued again: subscribers see `queued`, as for a new job.
        self._changed("queued" if kind is EventType.RETRIED else kind.value, job)
        return job

    def _changed(self, event: str, job: Job) -> None:
        for listener in self.listeners:
            listener(event, job)
        for condition, waiter in self._waiters.get(job.id, ()):
            if not waiter.done() and condition(job):
                waiter.set_result(None)

    def list(
        self,
        statuses: Collection[JobStatus] = (),
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, filtered; returns the page and the cursor of the next one."""
        end = len(self._seqs) if cursor is None else bisect.bisect_left(self._seqs, _decode(cursor))
        page: list[Job] = []
        for index in range(end - 1, -1, -1):
            job = self._jobs.get(self._ids[index])
            if job is None or (statuses and job.status not in statuses):
                continue
            if task is not None and job.task != task:
                continue
            if len(page) == limit:
                return page, _encode(self._seq_of[page[-1].id])
            page.append(job)
        return page, None

    def expire(self) -> int:
        """Forget jobs that finished more than `result_ttl` ago; returns how many."""
        horizon = self._clock() - self.result_ttl
        expired = [
            job.id
            for job in self._jobs.values()
            if job.finished_at is not None and job.finished_at < horizon
        ]
        for job_id in expired:
            self._forget(job_id)
        if len(self._ids) > 2 * len(self._jobs) + 1024:
            self._compact()
        return len(expired)

    def _forget(self, job_id: str) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        del self._seq_of[job_id]
        if job.idempotency_key is not None and self._by_key.get(job.idempotency_key) == job_id:
            del self._by_key[job.idempotency_key]

    def _compact(self) -> None:
        kept = [(s, i) for s, i in zip(self._seqs, self._ids, strict=True) if i in self._jobs]
        self._seqs = [s for s, _ in kept]
        self._ids = [i for _, i in kept]


def _encode(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def _decode(cursor: str) -> int:
    bad = InvalidRequest("invalid cursor", [FieldError("cursor", "not a cursor this API returned")])
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        seq = int(base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii"))
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None
    if seq < 0:
        raise bad
    return seq
