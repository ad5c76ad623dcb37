"""The default logging setup of the `aioqueue` command. Libraries only log; this configures."""

from __future__ import annotations

import logging.config
import time

from aiohttp.http_exceptions import HttpProcessingError

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


def configure(level: str = "info") -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"malformed": {"()": MalformedRequests}},
            "formatters": {
                "plain": {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"},
            },
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "formatter": "plain"},
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
