"""The job state machine, exhaustively: every status against every event."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from aioqueue import events
from aioqueue.events import JobEvent, JobSpec
from aioqueue.jobs import (
    RETRYABLE,
    TARGET,
    TERMINAL,
    EventType,
    IllegalTransition,
    Job,
    JobStatus,
    apply,
)


def make_job(status: JobStatus = JobStatus.QUEUED, attempt: int = 1) -> Job:
    job = Job(
        id="j1", task="t", queue="default", args={}, max_attempts=3, timeout=5.0, created_at=100.0
    )
    job.status = status
    job.attempt = attempt
    return job


def make_event(kind: EventType, attempt: int = 1, **fields: Any) -> JobEvent:
    """The event as the log holds it, decoded as the event log decodes it."""
    base: dict[str, Any] = {"job": "j1", "event": kind.value, "attempt": attempt, "at": 200.0}
    extra: dict[str, dict[str, Any]] = {
        EventType.PROGRESS: {"value": 0.5, "message": "half"},
        EventType.RETRYING: {"error": {"type": "E", "message": "m"}, "scheduled_for": 201.0},
        EventType.SUCCEEDED: {"result": 42},
        EventType.FAILED: {"error": {"type": "E", "message": "m"}},
        EventType.DEAD: {"error": {"type": "DeadLetter", "message": "m"}},
        EventType.RETRIED: {"run": 1},
    }
    event = events.decode({**base, **extra.get(kind, {}), **fields})
    assert not isinstance(
        event, events.Rejected | events.Purged | events.Queued | events.CheckpointNote
    )
    return event


LATER_EVENTS = [kind for kind in EventType if kind not in (EventType.QUEUED, EventType.RETRIED)]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        pytest.param(s, k, id=f"{s.value}-{k.value}")
        for s, k in itertools.product(JobStatus, LATER_EVENTS)
    ],
)
def test_every_event_in_every_status_follows_the_table(status: JobStatus, kind: EventType) -> None:
    """An event of the current attempt applies to any job not terminal, and leads where TARGET says."""
    job = make_job(status)
    if status not in TERMINAL:
        event = make_event(kind)
        assert apply(job, event) is kind
        assert job.status is TARGET[type(event)]
    else:
        before = job.to_dict()
        with pytest.raises(IllegalTransition):
            apply(job, make_event(kind))
        assert job.to_dict() == before


def test_terminal_statuses_accept_no_event() -> None:
    """Once terminal, a job never changes: its outcome is recorded once."""
    for status, kind in itertools.product(TERMINAL, LATER_EVENTS):
        with pytest.raises(IllegalTransition):
            apply(make_job(status), make_event(kind))


@pytest.mark.parametrize(
    "kind", [EventType.PROGRESS, EventType.SUCCEEDED, EventType.FAILED, EventType.RETRYING]
)
def test_an_outcome_of_another_attempt_is_refused(kind: EventType) -> None:
    """A stale runner of attempt 1 cannot record anything once attempt 2 runs."""
    job = make_job(JobStatus.RUNNING, attempt=2)
    with pytest.raises(IllegalTransition):
        apply(job, make_event(kind, attempt=1))
    assert job.status is JobStatus.RUNNING


def test_started_may_repeat_for_a_redelivered_attempt_but_not_go_back() -> None:
    """A redelivered message restarts its attempt; an older attempt's start is refused."""
    job = make_job(JobStatus.RUNNING, attempt=2)
    apply(job, make_event(EventType.STARTED, attempt=2, at=300.0))
    assert (job.status, job.attempt, job.started_at) == (JobStatus.RUNNING, 2, 300.0)
    with pytest.raises(IllegalTransition):
        apply(job, make_event(EventType.STARTED, attempt=1))


def test_a_full_life_with_one_retry() -> None:
    """queued, running, retrying (attempt 2 next), running, succeeded: fields as recorded."""
    job = make_job()
    apply(job, make_event(EventType.STARTED))
    apply(job, make_event(EventType.PROGRESS))
    assert job.progress == {"value": 0.5, "message": "half"}
    apply(job, make_event(EventType.RETRYING))
    assert (job.status, job.attempt, job.scheduled_for) == (JobStatus.RETRYING, 2, 201.0)
    apply(job, make_event(EventType.STARTED, attempt=2))
    assert job.progress is None and job.scheduled_for is None
    apply(job, make_event(EventType.SUCCEEDED, attempt=2))
    record = job.to_dict()
    assert record["status"] == "succeeded" and record["result"] == 42 and record["error"] is None
    assert record["finished_at"] == "1970-01-01T00:03:20.000Z"
    assert job.terminal


def test_an_outcome_without_its_started_event_implies_the_start() -> None:
    """The runner does not wait for `started`; if the log lost it, the outcome still applies."""
    job = make_job(JobStatus.RETRYING, attempt=2)
    apply(job, make_event(EventType.SUCCEEDED, attempt=2, at=500.0))
    assert (job.status, job.started_at, job.finished_at) == (JobStatus.SUCCEEDED, 500.0, 500.0)


@pytest.mark.parametrize("status", list(JobStatus), ids=lambda s: s.value)
def test_only_a_failed_dead_or_cancelled_job_can_be_retried(status: JobStatus) -> None:
    """A retry starts a new run from scratch: attempt 1, nothing of the old run kept."""
    job = make_job(status, attempt=3)
    job.result, job.error, job.finished_at = 1, {"type": "E", "message": "m"}, 150.0
    if status in RETRYABLE:
        apply(job, make_event(EventType.RETRIED))
        assert (job.status, job.attempt, job.run) == (JobStatus.QUEUED, 1, 1)
        record = job.to_dict()
        assert (record["result"], record["error"], record["finished_at"]) == (None, None, None)
        with pytest.raises(IllegalTransition):  # the same run twice
            job.status = status
            apply(job, make_event(EventType.RETRIED))
    else:
        with pytest.raises(IllegalTransition):
            apply(job, make_event(EventType.RETRIED))


def test_cancel_applies_whatever_the_attempt() -> None:
    job = make_job(JobStatus.RETRYING, attempt=2)
    apply(job, make_event(EventType.CANCELLED, attempt=1))
    assert job.status is JobStatus.CANCELLED and job.finished_at == 200.0


@pytest.mark.parametrize(
    "data",
    [
        {"job": "j1", "event": "exploded", "at": 1.0},
        {"job": "j1", "event": "succeeded", "at": 1.0},  # no attempt, no result
        {"event": "started", "attempt": 1},  # no job
        ["started"],
    ],
)
def test_what_is_not_an_event_is_refused_when_decoded(data: Any) -> None:
    with pytest.raises(ValueError):
        events.decode(data)


def test_every_event_survives_its_encoding() -> None:
    for kind in EventType:
        if kind is not EventType.QUEUED:
            event = make_event(kind)
            assert events.decode(orjson.loads(orjson.dumps(events.encode(event)))) == event


def test_spec_round_trips_through_from_spec() -> None:
    """A job message carries what it takes to rebuild the record."""
    job = make_job()
    again = Job.from_spec(job.spec())
    assert again.to_dict() == job.to_dict()
    assert job.spec(attempt=3).attempt == 3
    assert JobSpec.decode(job.spec().encode()) == job.spec()


def test_record_has_the_contract_fields() -> None:
    assert list(make_job().to_dict()) == [
        "id", "task", "queue", "status", "args", "attempt", "max_attempts", "progress",
        "result", "error", "owner", "created_at", "scheduled_for", "started_at", "finished_at",
    ]  # fmt: skip
