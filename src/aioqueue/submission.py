"""Checking a submit body (HTTP, websocket or Python API alike) and turning it into a job spec.

One place for every rule, so that no entry point accepts what another refuses. A body with any
fault raises before anything is published: a rejected job leaves no trace.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import orjson

from aioqueue.config import JobsSettings
from aioqueue.errors import FieldError, InvalidRequest, NotFound, PayloadTooLarge
from aioqueue.events import JobSpec
from aioqueue.tasks import PRIORITIES, Task

FIELDS = frozenset(
    {
        "task",
        "args",
        "queue",
        "priority",
        "delay",
        "run_at",
        "max_attempts",
        "timeout",
        "ttl",
        "idempotency_key",
    }
)
MAX_KEY_LENGTH = 255
MAX_TIMEOUT = 30 * 86400.0
#: A date-time of RFC 3339 (section 5.6), which must have a zone.
RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)
#: The longest delay the broker's delay queues can hold (28 binary levels of seconds).
MAX_DELAY = float(2**28 - 1)
#: How deep a job's args may nest arrays and objects. Records, events, frames and listings carry
#: them a few levels down, and orjson writes 254 levels at most (it reads 1024): deeper args were
#: accepted, then failed every listing that showed the job (a 500) for `result_ttl`.
MAX_ARGS_DEPTH = 128


def new_job_id() -> str:
    """128 random bits, URL-safe: unguessable, and opaque to clients."""
    return secrets.token_urlsafe(16)


def build_spec(
    body: object,
    tasks: Mapping[str, Task[Any, Any]],
    defaults: JobsSettings,
    now: float,
    idempotency_key: str | None = None,
    max_timeout: float = MAX_TIMEOUT,
) -> JobSpec:
    """Check a submit body and return the job's spec; raises InvalidRequest or NotFound."""
    if not isinstance(body, dict):
        raise InvalidRequest(
            "the submit body must be a JSON object", [FieldError("body", "expected an object")]
        )
    name = body.get("task")
    if not isinstance(name, str):
        raise InvalidRequest(
            "the task to run is missing", [FieldError("task", "required, a task name (string)")]
        )
    task = tasks.get(name)
    if task is None:
        raise NotFound(f"there is no task named {name[:200]!r}; GET /v1/tasks lists them")

    errors = [FieldError(key, "unknown field") for key in body if key not in FIELDS]
    queue = _queue(body, task, {t.queue for t in tasks.values()}, errors)
    max_attempts = _max_attempts(body, task, defaults, errors)
    priority = _priority(body, task, errors)
    timeout = _timeout(body, task, defaults, errors, max_timeout)
    delay = _delay(body, now, errors)
    ttl = _ttl(body, errors)
    key = _idempotency_key(body, idempotency_key, errors)
    args = body.get("args")
    try:
        task.signature.bind(args)
    except InvalidRequest as exc:
        errors += exc.errors
    if deeper_than(args, MAX_ARGS_DEPTH):
        errors.append(
            FieldError("args", f"nested more than {MAX_ARGS_DEPTH} levels of arrays and objects")
        )
    if errors:
        raise InvalidRequest(f"the job for task {name!r} is invalid", errors)
    size = len(orjson.dumps(args))
    if size > defaults.max_args_bytes:
        # Kept with the job for result_ttl after it finished, in every process.
        raise PayloadTooLarge(
            f"the job's args are {size} bytes as JSON; at most {defaults.max_args_bytes}"
            " (jobs.max_args_bytes)"
        )
    fingerprint = None
    if key is not None:
        # What "the same body" means for a repeated key: the request, less the key itself.
        request = {k: v for k, v in body.items() if k != "idempotency_key"}
        fingerprint = hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return JobSpec(
        id=new_job_id(),
        task=name,
        queue=queue,
        args=args,
        max_attempts=max_attempts,
        timeout=timeout,
        created_at=now,
        scheduled_for=now + delay if delay > 0 else None,
        priority=priority,
        # Not started by then, the job is `dead` (counted from when it is due).
        expires_at=None if ttl is None else now + delay + ttl,
        idempotency_key=key,
        fingerprint=fingerprint,
    )


def deeper_than(value: Any, levels: int) -> bool:
    """Whether `value` nests arrays and objects more than `levels` deep, level by level (no
    recursion, and each value looked at once)."""
    level = [value]
    for _ in range(levels):
        level = [
            child
            for item in level
            if isinstance(item, list | dict)
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if not level:
            return False
    return any(isinstance(item, list | dict) for item in level)


def _queue(
    body: dict[str, Any], task: Task[Any, Any], queues: set[str], errors: list[FieldError]
) -> str:
    queue = body.get("queue")
    if queue is None:
        return task.queue
    if not isinstance(queue, str) or queue not in queues:
        errors.append(FieldError("queue", f"expected one of the app's queues: {sorted(queues)}"))
        return task.queue
    return queue


def _max_attempts(
    body: dict[str, Any], task: Task[Any, Any], defaults: JobsSettings, errors: list[FieldError]
) -> int:
    value = body.get("max_attempts")
    if value is None:
        return task.max_attempts or defaults.max_attempts
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
        errors.append(FieldError("max_attempts", "expected an integer from 1 to 1000"))
        return 1
    return value


def _priority(body: dict[str, Any], task: Task[Any, Any], errors: list[FieldError]) -> int:
    value = body.get("priority")
    if value is None:
        return task.priority
    if isinstance(value, bool) or not isinstance(value, int) or value not in PRIORITIES:
        errors.append(FieldError("priority", "expected an integer from 0 (default) to 9 (first)"))
        return 0
    return value


def _timeout(
    body: dict[str, Any],
    task: Task[Any, Any],
    defaults: JobsSettings,
    errors: list[FieldError],
    most: float,
) -> float:
    value = body.get("timeout")
    if value is None:
        return task.timeout or defaults.timeout
    if not _positive_seconds(value, most):
        errors.append(FieldError("timeout", f"expected seconds, above 0 and at most {most:g}"))
        return 1.0
    return float(value)


def _positive_seconds(value: object, most: float) -> bool:
    """A JSON number of seconds above 0 and at most `most` (not a boolean, not NaN)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and 0 < value <= most
    )


def _delay(body: dict[str, Any], now: float, errors: list[FieldError]) -> float:
    """Seconds from now until the job is due, from `delay` or `run_at` (not both)."""
    delay, run_at = body.get("delay"), body.get("run_at")
    if delay is not None and run_at is not None:
        errors.append(FieldError("run_at", "give delay or run_at, not both"))
        return 0.0
    if run_at is not None:
        return _run_at(run_at, now, errors)
    if delay is None:
        return 0.0
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay <= MAX_DELAY:
        errors.append(FieldError("delay", f"expected seconds, from 0 to {MAX_DELAY:.0f}"))
        return 0.0
    return float(delay)


def _ttl(body: dict[str, Any], errors: list[FieldError]) -> float | None:
    value = body.get("ttl")
    if value is None:
        return None
    if not _positive_seconds(value, MAX_DELAY):
        errors.append(FieldError("ttl", f"expected seconds, above 0 and at most {MAX_DELAY:.0f}"))
        return None
    return float(value)


#: What a time field that is not RFC 3339 is told.
RFC3339_EXPECTED = "expected an RFC 3339 time with a zone, like 2026-12-01T00:00:00Z"


def parse_time(value: object) -> float:
    """An RFC 3339 date-time with a zone, as a POSIX timestamp; ValueError if it is not one."""
    # fromisoformat alone takes more than RFC 3339 (week dates, "20261201T000000Z", no zone)
    # and less (a lower-case "t" or "z").
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValueError(RFC3339_EXPECTED)
    return datetime.fromisoformat(value.upper().replace("Z", "+00:00")).timestamp()


def _run_at(value: object, now: float, errors: list[FieldError]) -> float:
    try:
        moment = parse_time(value)
    except ValueError:
        errors.append(FieldError("run_at", RFC3339_EXPECTED))
        return 0.0
    delay = moment - now
    if delay > MAX_DELAY:
        errors.append(FieldError("run_at", f"at most {MAX_DELAY:.0f} seconds from now"))
        return 0.0
    return max(0.0, delay)  # a time in the past means now


def _idempotency_key(
    body: dict[str, Any], header: str | None, errors: list[FieldError]
) -> str | None:
    key = body.get("idempotency_key")
    if key is not None and header is not None and key != header:
        errors.append(FieldError("idempotency_key", "differs from the Idempotency-Key header"))
        return None
    key = key if key is not None else header
    if key is None:
        return None
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH:
        errors.append(
            FieldError("idempotency_key", f"expected a string of 1 to {MAX_KEY_LENGTH} characters")
        )
        return None
    return key
