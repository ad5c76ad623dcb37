"""The producer side of topics: publish a message, checked, and get its offset.

This is what `POST /v1/topics/{topic}`, the websocket's `publish`, a task's `ctx.publish` and
`App.publish` call. Subscribing is the websocket hub's (`web/topichub.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from aioqueue.broker.base import TopicLog
from aioqueue.errors import FieldError, InvalidRequest, PayloadTooLarge
from aioqueue.topics import check_topic


class Topics:
    def __init__(
        self, log: TopicLog, max_message_bytes: int, check_open: Callable[[bool], None]
    ) -> None:
        self.log = log
        self.max_message_bytes = max_message_bytes
        #: Raises NotReady (503) unless the service takes new work.
        self._check_open = check_open

    def encode(self, data: Any) -> bytes:
        """`data` as the JSON a message carries; InvalidRequest if it is not JSON, and
        PayloadTooLarge past `topics.max_message_bytes`."""
        try:
            body = orjson.dumps(data)
        except TypeError as exc:
            error = FieldError("data", str(exc))
            raise InvalidRequest(f"data is not JSON: {exc}", [error]) from None
        if len(body) > self.max_message_bytes:
            raise PayloadTooLarge(
                f"the message is {len(body)} bytes as JSON; at most {self.max_message_bytes}"
                " (topics.max_message_bytes)"
            )
        return body

    async def publish(self, topic: str, data: Any) -> int:
        """Publish `data` to `topic`; its offset, once the broker confirmed it."""
        if not isinstance(topic, str):
            raise InvalidRequest("'topic' must be a string", [FieldError("topic", "not a string")])
        check_topic(topic)
        body = self.encode(data)
        self._check_open(True)
        return await self.log.publish(topic, body)
