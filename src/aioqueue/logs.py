"""The default logging setup of the `aioqueue` command. Libraries only log; this configures."""

from __future__ import annotations

import logging.config


def configure(level: str = "info") -> None:
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
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
            },
        }
    )
