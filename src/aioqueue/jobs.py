"""The job record and its legal state changes. Pure code: no I/O, no clock, no broker.

Every state change is an *event* (one of the types of `events.py`). `apply()` moves a
`Job` by one event, or raises `IllegalTransition` and leaves it untouched. The event log can hold
duplicates (a redelivered job, a publish retried after a lost confirm) and events of a stale
attempt; refusing them here is what keeps each job's recorded outcome single.

The `attempt` field counts runs, starting at 1: while a job waits (`queued`, `retrying`) it names
the attempt that runs next; while it runs, the attempt that is running. Each job message carries
the attempt it is for, so a runner can tell a stale copy from the current one.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from aioqueue.events import (
    NAMES,
    SPEC_FIELDS,
    Cancelled,
    Dead,
    Failed,
    JobEvent,
    JobSpec,
    Progress,
    Retried,
    Retrying,
    Started,
    Succeeded,
)


class JobStatus(StrEnum):
    #: Waiting in its queue for a consumer.
    QUEUED = "queued"
    #: Waiting for its delay or `run_at` to pass.
    SCHEDULED = "scheduled"
    #: A consumer is running its task.
    RUNNING = "running"
    #: The last attempt failed; waiting for its back-off before the next one.
    RETRYING = "retrying"
    #: The task returned; `result` holds what it returned.
    SUCCEEDED = "succeeded"
    #: The task raised or timed out on its last attempt; the message is in the dead-letter queue.
    FAILED = "failed"
    #: The broker dead-lettered the message before the task could finish.
    DEAD = "dead"
    #: Cancelled before it finished.
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD, JobStatus.CANCELLED})
WAITING = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.RETRYING})
#: The dead letters: jobs whose message is in the dead-letter queue (CONTRACT §2).
DEAD_LETTERS = frozenset({JobStatus.FAILED, JobStatus.DEAD})


class EventType(StrEnum):
    QUEUED = "queued"  # or `scheduled`: a job's creation, not one of `apply()`'s events
    STARTED = "started"
    PROGRESS = "progress"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    #: `POST /v1/jobs/{id}/retry`: a failed, dead or cancelled job starts over (a new run).
    RETRIED = "retried"


#: Events that apply whatever the attempt: they come from outside the runner.
ANY_ATTEMPT = (Dead, Cancelled)
#: The statuses a job can be retried from.
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.DEAD, JobStatus.CANCELLED})

#: The status each event after `queued` leads to. Each applies to any job that is not terminal,
#: if it is of the current attempt: progress and outcomes apply to a waiting job too, because the
#: runner does not wait for its `started` event to be confirmed, so the log can lack it (a write
#: lost in a broker outage); an outcome of the current attempt implies that it started.
TARGET: dict[type[JobEvent], JobStatus] = {
    Started: JobStatus.RUNNING,
    Progress: JobStatus.RUNNING,
    Retrying: JobStatus.RETRYING,
    Succeeded: JobStatus.SUCCEEDED,
    Failed: JobStatus.FAILED,
    Dead: JobStatus.DEAD,
    Cancelled: JobStatus.CANCELLED,
    Retried: JobStatus.QUEUED,
}


class IllegalTransition(Exception):
    """An event that does not apply to the job in its current state (a duplicate or stale one)."""


@functools.lru_cache(maxsize=8192)  # the same few timestamps are rendered on every event
def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Job:
    """One job's state, as rebuilt from its events. `spec()` is what its messages carry."""

    __slots__ = (
        "args",
        "attempt",
        "created_at",
        "error",
        "expires_at",
        "fingerprint",
        "finished_at",
        "id",
        "idempotency_key",
        "max_attempts",
        "owner",
        "priority",
        "progress",
        "queue",
        "result",
        "run",
        "scheduled_for",
        "started_at",
        "status",
        "task",
        "timeout",
    )

    def __init__(
        self,
        *,
        id: str,
        task: str,
        queue: str,
        args: Any,
        max_attempts: int,
        timeout: float,
        created_at: float,
        attempt: int = 1,
        scheduled_for: float | None = None,
        run: int = 0,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        priority: int = 0,
        expires_at: float | None = None,
        owner: str | None = None,
    ) -> None:
        self.id = id
        self.task = task
        self.queue = queue
        self.args = args
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.created_at = created_at
        self.attempt = attempt
        #: Starts at 0; each retry of a finished job is a new run, and older runs' messages are
        #: stale.
        self.run = run
        #: The submit's idempotency key, and a digest of the rest of its body.
        self.idempotency_key = idempotency_key
        self.fingerprint = fingerprint
        #: 0 to 9, highest first (see gate.py and the brokers).
        self.priority = priority
        #: A job not started by then is `dead` (its `ttl`); None: no limit.
        self.expires_at = expires_at
        #: The principal that submitted it; None with auth off.
        self.owner = owner
        #: When a delayed job is due; then its status is `scheduled` until it starts.
        self.scheduled_for = scheduled_for
        self.status = JobStatus.QUEUED if scheduled_for is None else JobStatus.SCHEDULED
        self.progress: dict[str, Any] | None = None
        self.result: Any = None
        self.error: dict[str, Any] | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None

    @classmethod
    def from_spec(cls, spec: JobSpec) -> Job:
        """Build the record of a newly queued job from its message (see `spec()`)."""
        return cls(**{name: getattr(spec, name) for name in SPEC_FIELDS})

    def spec(self, attempt: int | None = None) -> JobSpec:
        """What a job message carries: enough to run the job and to rebuild its record."""
        fields = {name: getattr(self, name) for name in SPEC_FIELDS}
        return JobSpec(**{**fields, "attempt": self.attempt if attempt is None else attempt})

    def to_state(self) -> dict[str, Any]:
        """Every field, as JSON can hold it (what the job store keeps)."""
        return {name: getattr(self, name) for name in Job.__slots__}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Job:
        job = cls.__new__(cls)
        for name in Job.__slots__:
            # `owner` is not in the states of a store of schema 1 (before owners, issue 9).
            setattr(job, name, state.get(name) if name == "owner" else state[name])
        job.status = JobStatus(job.status)
        return job

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def expired(self, now: float) -> bool:
        """Never started, and past its `ttl`."""
        return self.expires_at is not None and self.started_at is None and now > self.expires_at

    def to_dict(self, traceback: bool = True) -> dict[str, Any]:
        """The public job record (CONTRACT §2); with `traceback=False`, its error's traceback is
        null (with auth on, only `jobs:admin` sees tracebacks: they show the server's paths)."""
        error = self.error
        if not traceback and error is not None and error.get("traceback") is not None:
            error = {**error, "traceback": None}
        return {
            "id": self.id,
            "task": self.task,
            "queue": self.queue,
            "status": self.status.value,
            "args": self.args,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
            "progress": self.progress,
            "result": self.result,
            "error": error,
            "owner": self.owner,
            "created_at": rfc3339(self.created_at),
            "scheduled_for": rfc3339(self.scheduled_for),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at),
        }

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.task} {self.status.value} attempt={self.attempt}>"


def apply(job: Job, event: JobEvent) -> EventType:
    """Move `job` by one event (`queued`, which creates a job, is `Job.from_spec`).

    Returns the event's type. Raises `IllegalTransition` and changes nothing if the event does
    not apply: a job that is terminal, an attempt older than the current one, a duplicate.
    """
    name = EventType(NAMES[type(event)])
    if isinstance(event, Retried):
        if job.status not in RETRYABLE or event.run <= job.run:
            raise IllegalTransition(f"retried in status {job.status.value}, run {job.run}")
    elif job.terminal:
        raise IllegalTransition(f"{name.value} in status {job.status.value}")
    elif isinstance(event, Started):
        if event.attempt < job.attempt:
            raise IllegalTransition(f"started attempt {event.attempt} after attempt {job.attempt}")
    elif not isinstance(event, ANY_ATTEMPT) and event.attempt != job.attempt:
        current = f"current is {job.attempt}"
        raise IllegalTransition(f"{name.value} of attempt {event.attempt}, {current}")
    _record(job, event)
    job.status = TARGET[type(event)]
    return name


def _record(job: Job, event: JobEvent) -> None:
    if isinstance(event, Retried):
        job.run = event.run
        job.attempt = 1
        job.progress = job.result = job.error = None
        job.started_at = job.finished_at = job.scheduled_for = job.expires_at = None
        return
    if job.status in WAITING and not isinstance(event, ANY_ATTEMPT):
        job.started_at = event.at  # an implied start, if `started` itself is missing
        job.progress = None
        job.scheduled_for = None
    match event:
        case Started():
            job.attempt = event.attempt
            job.started_at = event.at
            job.progress = None
            job.scheduled_for = None
        case Progress():
            job.progress = {"value": event.value, "message": event.message}
        case Retrying():
            job.attempt += 1
            job.error = event.error
            job.scheduled_for = event.scheduled_for
        case Succeeded():
            job.result = event.result
            job.error = None
            job.finished_at = event.at
        case Cancelled():
            job.finished_at = event.at
        case Failed() | Dead():
            job.error = event.error
            job.finished_at = event.at
