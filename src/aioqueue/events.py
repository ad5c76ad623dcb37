"""What the event log carries: a job's spec, and one type per event, each with its encoding.

`JobSpec` is a submitted job as its messages carry it: enough to run it and to rebuild its
record. Every later state change is one of the event classes below; `jobs.apply` and the job
store take only these. `encode()` and `decode()` turn them into the JSON objects the log holds
(`{"event": NAME, "job": ID, ...}`), and `decode()` refuses anything else with ValueError.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

#: The fields a spec must have; the others have defaults (older specs lack some of them).
REQUIRED = ("id", "task", "queue", "args", "max_attempts", "timeout", "created_at")


@dataclass(frozen=True, slots=True)
class JobSpec:
    id: str
    task: str
    queue: str
    args: Any
    max_attempts: int
    timeout: float
    created_at: float
    #: The attempt this message is for, from 1.
    attempt: int = 1
    #: 0, then one more for each retry of a finished job (`POST /v1/jobs/{id}/retry`).
    run: int = 0
    #: When a delayed job is due.
    scheduled_for: float | None = None
    #: 0 to 9, highest first.
    priority: int = 0
    #: Not started by then, the job is `dead` (its `ttl`).
    expires_at: float | None = None
    #: The submit's idempotency key, and a digest of the rest of its body.
    idempotency_key: str | None = None
    fingerprint: str | None = None
    #: The principal that submitted it (None with auth off): who may see and change it.
    owner: str | None = None

    @property
    def delay(self) -> float:
        """Seconds from its creation until it is due."""
        return 0.0 if self.scheduled_for is None else max(0.0, self.scheduled_for - self.created_at)

    def replace(self, **changes: Any) -> JobSpec:
        return dataclasses.replace(self, **changes)

    def encode(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def decode(cls, data: bytes | dict[str, Any]) -> JobSpec:
        """A spec from a message body or a decoded one; ValueError if it is not one."""
        fields = orjson.loads(data) if isinstance(data, bytes) else data
        if not isinstance(fields, dict) or any(key not in fields for key in REQUIRED):
            raise ValueError("not a job spec")
        known = {key: value for key, value in fields.items() if key in SPEC_FIELDS}
        try:
            return cls(**known)
        except TypeError as exc:
            raise ValueError(f"not a job spec: {exc}") from None


SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(JobSpec))


def _now() -> float:
    return time.time()


@dataclass(frozen=True, slots=True)
class Started:
    job: str
    attempt: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Progress:
    job: str
    attempt: int
    value: float
    message: str | None
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Retrying:
    job: str
    attempt: int
    error: dict[str, Any]
    #: When the next attempt is due.
    scheduled_for: float
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Succeeded:
    job: str
    attempt: int
    result: Any
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Failed:
    job: str
    attempt: int
    error: dict[str, Any]
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Dead:
    job: str
    attempt: int
    error: dict[str, Any]
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Cancelled:
    job: str
    attempt: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Retried:
    """`POST /v1/jobs/{id}/retry`: a failed, dead or cancelled job starts over as run `run`."""

    job: str
    run: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Rejected:
    """Its queue refused the job (full): it was never accepted, and leaves no record."""

    job: str


@dataclass(frozen=True, slots=True)
class Purged:
    """A dead letter purged (`POST /v1/dead/purge`): every store forgets the job, if it is still
    failed or dead in run `run` (a retry written before it in the log wins)."""

    job: str
    run: int
    at: float = field(default_factory=_now)


@dataclass(frozen=True, slots=True)
class Queued:
    """A job recorded again by a runner of an earlier version (logs written before 0.2)."""

    spec: JobSpec


@dataclass(frozen=True, slots=True)
class CheckpointNote:
    """A checkpoint's life in the log: begun, done or deleted (see checkpointer.py)."""

    fields: dict[str, Any]


#: A job event that `jobs.apply` applies.
JobEvent = Started | Progress | Retrying | Succeeded | Failed | Dead | Cancelled | Retried
Event = JobEvent | Rejected | Purged | Queued | CheckpointNote

NAMES: dict[type[Any], str] = {
    Started: "started",
    Progress: "progress",
    Retrying: "retrying",
    Succeeded: "succeeded",
    Failed: "failed",
    Dead: "dead",
    Cancelled: "cancelled",
    Retried: "retried",
    Rejected: "rejected",
    Purged: "purged",
    Queued: "queued",
}
_BY_NAME = {name: kind for kind, name in NAMES.items()}


def encode(event: Event) -> dict[str, Any]:
    """The JSON object the log holds for `event`."""
    if isinstance(event, CheckpointNote):
        return event.fields
    if isinstance(event, Queued):
        return {"event": "queued", "job": event.spec.id, "spec": event.spec}
    return {"event": NAMES[type(event)], **{f: getattr(event, f) for f in event.__slots__}}


def decode(data: Any) -> Event:
    """The event a JSON object of the log holds; ValueError if it holds none."""
    if not isinstance(data, dict):
        raise ValueError(f"not an event: {data!r:.100}")
    if "checkpoint" in data:
        return CheckpointNote(data)
    kind = _BY_NAME.get(data.get("event"))  # type: ignore[arg-type]
    if kind is None:
        raise ValueError(f"unknown event {data.get('event')!r:.100}")
    if kind is Queued:
        return Queued(JobSpec.decode(data.get("spec")))  # type: ignore[arg-type]
    fields = {f.name: data[f.name] for f in dataclasses.fields(kind) if f.name in data}
    try:
        event: Event = kind(**fields)
    except TypeError as exc:
        raise ValueError(f"a {NAMES[kind]} event is missing a field: {exc}") from None
    return event
