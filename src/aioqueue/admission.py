"""Whether a job message runs: a pure decision on the job's record, next to `jobs.apply`.

The runner catches up first (waits until the store knows the job, and for a barrier when the
message is redelivered or ahead of the store), then asks `admit()`, then acts on its answer. No
I/O and no clock here: every answer is a function of its inputs, and `tests/test_admission.py`
checks every combination of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from aioqueue.jobs import Job, JobStatus


class Admission(Enum):
    #: Run the task.
    RUN = "run"
    #: Ack without running: its outcome is recorded, or the message is stale or a second copy.
    SKIP = "skip"
    #: Redelivered while its first copy still runs in this process: wait for that copy's outcome.
    WAIT = "wait"
    #: Give it back to its queue: its first copy here ended with no outcome (a shutdown).
    REQUEUE = "requeue"
    #: No record of the job: a finished job forgotten since, or a lost state. Never run it; keep
    #: the message as a dead letter.
    UNKNOWN = "unknown"
    #: Not started within its `ttl`: dead, never run.
    EXPIRED = "expired"
    #: This app has no task of that name: dead.
    NO_TASK = "no-task"


class FirstCopy(Enum):
    """A copy of the same attempt in this process, when this one arrives."""

    NONE = "none"
    RUNNING = "running"
    #: It was running when this copy arrived, and has ended since.
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class Message:
    """What the decision needs of a job message."""

    run: int
    attempt: int
    redelivered: bool


@dataclass(frozen=True, slots=True)
class Decision:
    admission: Admission
    #: Why, for the log line.
    reason: str


def admit(
    job: Job | None,
    message: Message,
    first_copy: FirstCopy = FirstCopy.NONE,
    task_known: bool = True,
    now: float = 0.0,
) -> Decision:
    """What to do with a job message, given the job's record once the store caught up."""
    if job is None:
        return Decision(Admission.UNKNOWN, "no record of the job")
    if message.run != job.run:
        return Decision(Admission.SKIP, f"a message of run {message.run}, the job is at {job.run}")
    if job.terminal:
        return Decision(Admission.SKIP, f"the job is {job.status.value} already")
    if message.attempt < job.attempt:
        return Decision(Admission.SKIP, f"stale, the job is at attempt {job.attempt}")
    if first_copy is FirstCopy.RUNNING:
        return Decision(Admission.WAIT, "redelivered while its first copy runs here")
    if first_copy is FirstCopy.ENDED:
        if message.attempt == job.attempt:
            return Decision(Admission.REQUEUE, "its first copy here ended with no outcome")
        return Decision(Admission.SKIP, "its first copy ran here")
    running = job.status is JobStatus.RUNNING
    if message.attempt == job.attempt and running and not message.redelivered:
        return Decision(Admission.SKIP, "a second copy of a running attempt")
    if job.expired(now):
        return Decision(Admission.EXPIRED, "its ttl ran out before it could start")
    if not task_known:
        return Decision(Admission.NO_TASK, f"no task {job.task!r} in this app")
    return Decision(Admission.RUN, "")
