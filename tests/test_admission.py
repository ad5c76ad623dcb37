"""Whether a job message runs, exhaustively: every status, run and attempt of the record against
every message, redelivered or not, with or without a first copy here, task known or not, expired
or not. Each answer is checked against the rule that grants it, and each rule in both directions.
"""

from __future__ import annotations

import itertools

import pytest

from aioqueue.admission import Admission, FirstCopy, Message, admit
from aioqueue.jobs import TERMINAL, Job, JobStatus

NOW = 1000.0


def make_job(status: JobStatus, attempt: int = 2, run: int = 1, expired: bool = False) -> Job:
    job = Job(
        id="j1", task="t", queue="default", args={}, max_attempts=5, timeout=5.0, created_at=1.0
    )
    job.status, job.attempt, job.run = status, attempt, run
    job.expires_at = NOW - 1 if expired else None
    return job


CASES = list(
    itertools.product(
        JobStatus,
        [0, 1, 2],  # the message's run; the job is at run 1
        [1, 2, 3],  # the message's attempt; the job is at attempt 2
        [False, True],  # redelivered
        FirstCopy,
        [True, False],  # task known
        [False, True],  # expired
    )
)


@pytest.mark.parametrize(
    ("status", "run", "attempt", "redelivered", "first_copy", "task_known", "expired"), CASES
)
def test_every_message_against_every_record(
    status: JobStatus,
    run: int,
    attempt: int,
    redelivered: bool,
    first_copy: FirstCopy,
    task_known: bool,
    expired: bool,
) -> None:
    job = make_job(status, expired=expired)
    decision = admit(job, Message(run, attempt, redelivered), first_copy, task_known, NOW)
    answer = decision.admission
    assert decision.reason or answer is Admission.RUN
    if run != job.run or status in TERMINAL or attempt < job.attempt:
        assert answer is Admission.SKIP  # a recorded outcome, another run or an older attempt
    elif first_copy is FirstCopy.RUNNING:
        assert answer is Admission.WAIT  # its outcome is this copy's
    elif first_copy is FirstCopy.ENDED:
        # Ended with no outcome (a shutdown stopped it): this copy goes back to run later.
        assert answer is (Admission.REQUEUE if attempt == job.attempt else Admission.SKIP)
    elif attempt == job.attempt and status is JobStatus.RUNNING and not redelivered:
        assert answer is Admission.SKIP  # a second copy: the first runs in another process
    elif expired:
        assert answer is Admission.EXPIRED
    elif not task_known:
        assert answer is Admission.NO_TASK
    else:
        assert answer is Admission.RUN


@pytest.mark.parametrize("first_copy", FirstCopy)
def test_a_message_of_a_job_with_no_record_never_runs(first_copy: FirstCopy) -> None:
    decision = admit(None, Message(0, 1, True), first_copy)
    assert decision.admission is Admission.UNKNOWN


def test_a_terminal_job_is_skipped_before_anything_else() -> None:
    """Even expired, without its task and with a first copy here: its outcome is recorded."""
    for status in TERMINAL:
        job = make_job(status, expired=True)
        decision = admit(job, Message(1, 2, True), FirstCopy.RUNNING, task_known=False, now=NOW)
        assert decision.admission is Admission.SKIP
        assert status.value in decision.reason


def test_a_redelivered_copy_of_the_running_attempt_runs_when_no_copy_runs_here() -> None:
    """Its first copy died with another process (or channel): this one takes over."""
    job = make_job(JobStatus.RUNNING)
    assert admit(job, Message(1, 2, True)).admission is Admission.RUN
    assert admit(job, Message(1, 2, False)).admission is Admission.SKIP
