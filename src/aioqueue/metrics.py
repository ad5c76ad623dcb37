"""What `GET /metrics` counts, in one `CollectorRegistry` per service (prometheus-client).

Counters and histograms are updated where things happen, and cost one prometheus-client call
each (a dict lookup for the labelled child, then a locked add); the busiest path, websocket
frames, is counted in plain integers (`WsTally`) read at scrape time. Values that already exist
somewhere (queue depths, open websockets, stuck threads) are read at scrape time by collectors
(`gauges.py`, `web/metrics.py`), never kept up to date on every change.

Counts are this process's own, as Prometheus counters are per process: the jobs it accepted,
ran, and the outcomes it recorded. Each outcome is recorded by exactly one process (the state
machine refuses a second one), so `sum()` over the processes gives the deployment's totals.

Label values are bounded: a task label is a registered task's name or `other`, a queue is one of
the app's, a status or a reason is one of a fixed set; never a job id or a raw path.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from aioqueue.jobs import WAITING, Job

if TYPE_CHECKING:
    from aioqueue.store import ChangeListener

#: The task label of a job whose task this app does not register (a message of another app).
OTHER = "other"
#: Terminal statuses, as the store names the events that lead to them.
FINISHED = ("succeeded", "failed", "dead", "cancelled")
#: Why a job message went to the dead-letter queue (`runner.py`; the broker's own reasons).
DEAD_LETTER_REASONS = frozenset(
    {
        "failed",  # its last attempt failed (or its result could not be kept)
        "expired",  # not started within its ttl
        "unknown_task",  # no task of that name in this app
        "unknown_job",  # no record of the job (finished and forgotten, or a lost state)
        "undecodable",  # not a job message at all
        "delivery_limit",  # requeued past broker.delivery_limit (the broker's own)
    }
)
#: Seconds: from 10 ms (a quick async task) to an hour (RabbitMQ's consumer_timeout is 30 min by
#: default; a queue wait can be longer). 16 buckets per task, for each of the two histograms.
JOB_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
#: Seconds a publish waits for RabbitMQ's confirm: a millisecond on a quiet local broker, up to
#: `broker.confirm_timeout` (1 s) and `broker.heartbeat` (10 s) when it is in trouble.
CONFIRM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Children(dict[tuple[str, ...], Any]):
    """A family's labelled children by their label values, each made on first use: a dict
    lookup, cheaper than prometheus-client's own `labels()` (a lock, a tuple) on every count."""

    def __init__(self, family: Any) -> None:
        super().__init__()
        self._family = family

    def __missing__(self, values: tuple[str, ...]) -> Any:
        child = self[values] = self._family.labels(*values)
        return child

    def make(self, *values: str) -> None:
        """Make the child now: a series that appears only at its first increment hides that
        increment from rate(), and the families are complete from the start."""
        self[values]  # __missing__ makes it


class WsTally:
    """Websocket frames and closes, in plain integers: a fan-out sends a frame to every
    subscriber, and a prometheus-client counter (a lock per increment) would cost more there than
    the rest of the send. Only the event loop's thread touches them; `web/metrics.py` reads them.
    """

    __slots__ = ("closes_full", "closes_stalled", "coalesced", "dropped", "sent")

    def __init__(self) -> None:
        #: Frames written to a client's socket.
        self.sent = 0
        #: Progress frames replaced, still queued, by a newer one of the same job.
        self.coalesced = 0
        #: Frames for a connection that was closing: queued and never sent, or sent after.
        self.dropped = 0
        #: Clients closed with 1013: their send buffer was full, or they had stopped reading.
        self.closes_full = 0
        self.closes_stalled = 0


class Metrics:
    """The registry of one service (or one served application) and what is counted into it.

    Not the global default registry: several apps, or tests, in one process each have their own.
    """

    def __init__(self, tasks: Collection[str] = ()) -> None:
        self.registry = CollectorRegistry()
        #: The app's task names: kept as given (an App's own dict), so that a task registered
        #: after the application was mounted is counted by its name too.
        self.tasks = tasks
        registry = self.registry
        self.jobs_submitted = Counter(
            "aioqueue_jobs_submitted",
            "Jobs this process accepted (HTTP, websocket, App.submit, ctx.submit); not repeats of"
            " an idempotency key, nor POST /v1/jobs/{id}/retry",
            ["task"],
            registry=registry,
        )
        self.jobs_started = Counter(
            "aioqueue_jobs_started",
            "Attempts this process started running",
            ["task"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            "aioqueue_jobs_finished",
            "Jobs that ended (succeeded, failed, dead, cancelled), counted by the process that"
            " recorded the outcome",
            ["task", "status"],
            registry=registry,
        )
        self.job_retries = Counter(
            "aioqueue_job_retries",
            "Failed attempts this process recorded with another attempt to come",
            ["task"],
            registry=registry,
        )
        self.jobs_dead_lettered = Counter(
            "aioqueue_jobs_dead_lettered",
            "Job messages this process kept in the dead-letter queue, by why",
            ["task", "reason"],
            registry=registry,
        )
        self.job_run_seconds = Histogram(
            "aioqueue_job_run_seconds",
            "Seconds each attempt this process ran took, until it returned, raised, timed out or"
            " was cancelled",
            ["task"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.job_wait_seconds = Histogram(
            "aioqueue_job_wait_seconds",
            "Seconds from when an attempt was due (submitted, or its delay or back-off over) to"
            " its start in this process",
            ["task"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )
        self.broker_confirm_seconds = Histogram(
            "aioqueue_broker_confirm_seconds",
            "Seconds from a publish to RabbitMQ's confirm of it (none on memory://)",
            buckets=CONFIRM_BUCKETS,
            registry=registry,
        )
        self.broker_reconnects = Counter(
            "aioqueue_broker_reconnects",
            "Times the connection to RabbitMQ was made again after it was lost",
            registry=registry,
        )
        self.ws = WsTally()
        self._submitted = _Children(self.jobs_submitted)
        self._started = _Children(self.jobs_started)
        self._retries = _Children(self.job_retries)
        self._run = _Children(self.job_run_seconds)
        self._wait = _Children(self.job_wait_seconds)
        self._finished = _Children(self.jobs_finished)
        for task in (*tasks, OTHER):
            for children in (self._submitted, self._started, self._retries, self._run, self._wait):
                children.make(task)
            for status in FINISHED:
                self._finished.make(task, status)

    def task(self, name: str) -> str:
        """The task label of `name`: itself if this app registers it, else `other`."""
        return name if name in self.tasks else OTHER

    def submitted(self, task: str) -> None:
        self._submitted[(self.task(task),)].inc()

    def started(self, task: str, waited: float | None) -> None:
        """An attempt starts here, after waiting `waited` seconds (None: unknown, see `waited`)."""
        label = (self.task(task),)
        self._started[label].inc()
        if waited is not None:
            self._wait[label].observe(waited)

    def ran(self, task: str, seconds: float) -> None:
        self._run[(self.task(task),)].observe(seconds)

    def dead_lettered(self, task: str, reason: str) -> None:
        """A job message put in the dead-letter queue; `reason` as the runner or broker says it
        (`unknown task`, `undecodable: ...`), reduced to one of `DEAD_LETTER_REASONS`."""
        label = reason.partition(":")[0].strip().replace(" ", "_")
        reason = label if label in DEAD_LETTER_REASONS else OTHER
        self.jobs_dead_lettered.labels(self.task(task), reason).inc()

    def outcome_listener(self, own: Callable[[], bool]) -> ChangeListener:
        """A job store listener that counts outcomes and retries; `own()` says whether the change
        being applied is one this process wrote (`EventLog.applying_own`).

        Counted as the store applies them, not where they are written: only an event the state
        machine accepted reaches a listener, so a refused one (a success after a cancel, a second
        dead letter) is never counted, and each outcome is counted once in the deployment.
        """
        finished, retries = self._finished, self._retries

        def on_change(event: str, job: Job) -> None:
            if event == "retrying":
                if own():
                    retries[(self.task(job.task),)].inc()
            elif event in FINISHED and own():
                finished[self.task(job.task), event].inc()

        return on_change


def waited(job: Job, now: float) -> float | None:
    """Seconds the attempt about to start has waited since it was due, or None if its record does
    not say: a job run again by `POST /v1/jobs/{id}/retry` keeps no time of that, and an attempt
    that had started already (a redelivery) is not waiting. At least 0: `created_at` is the
    submitting process's clock."""
    if job.status not in WAITING:
        return None
    if job.scheduled_for is not None:  # a delayed job, or a retry after its back-off
        due = job.scheduled_for
    elif job.run == 0:
        due = job.created_at
    else:
        return None
    return max(0.0, now - due)
