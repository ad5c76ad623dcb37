"""The default logging setup of the `aioqueue` command. Libraries only log; this configures.

Two formats (`[log] format`): `text`, one line a record for people; and `json`, one object a
line for a log pipeline, with `job_id`, `task`, `attempt` and `queue` on every line logged while
a job is handled, the task's own lines included: `job_fields()` sets them for the job a delivery
carries (runner.py), and they follow the task into its thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging.config
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

#: The job being handled in this context, as the fields a JSON line gets.
JOB: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("job", default=None)


@contextlib.contextmanager
def job_fields(job_id: str, task: str, attempt: int, queue: str) -> Iterator[None]:
    """Every line logged within (in this task, and the threads it hands work to with the context
    copied) is about this job."""
    token = JOB.set({"job_id": job_id, "task": task, "attempt": attempt, "queue": queue})
    try:
        yield
    finally:
        JOB.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: `time`, `level`, `logger`, `message`, the job's fields if the line
    is about a job, and `exception` (its traceback) if it has one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job = JOB.get()
        if job is not None:
            line.update(job)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


#: Seconds between two log lines about malformed HTTP requests.
MALFORMED_EVERY = 60.0


class MalformedRequests(logging.Filter):
    """aiohttp logs each request it cannot parse at ERROR, with a traceback (about 1 KB): anyone
    could flood the log. One WARNING line per `MALFORMED_EVERY` seconds says how many there
    were and what the last one was; the client got its 400 all the same."""

    def __init__(self) -> None:
        super().__init__()
        self._count = 0
        self._said_at = -MALFORMED_EVERY

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        self._count += 1
        now = time.monotonic()
        if now - self._said_at < MALFORMED_EVERY:
            return False
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.msg = "%d malformed HTTP request(s) refused with 400 (said once a minute); last: %s"
        # What was wrong, not the bytes that were: aiohttp quotes the bad header line after a
        # colon, and it may be an Authorization header.
        described = str(error.message).split(":", 1)[0]
        last = " ".join(described.split())[:100] or type(error).__name__
        record.args = (self._count, last)
        record.exc_info = record.exc_text = None
        self._count, self._said_at = 0, now
        return True


def configure(level: str = "info", format: str = "text") -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"malformed": {"()": MalformedRequests}},
            "formatters": {
                "text": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"},
                "json": {"()": JsonFormatter},
            },
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": format},
            },
            "root": {"handlers": ["stderr"], "level": level.upper()},
            "loggers": {
                # Their reconnect chatter repeats what aioqueue.broker reports once.
                "aio_pika": {"level": "WARNING"},
                "aiormq": {"level": "WARNING"},
                "aiormq.connection": {"level": "CRITICAL"},
                "aiohttp.access": {"level": "WARNING"},
                "aiohttp.server": {"filters": ["malformed"]},
            },
        }
    )
