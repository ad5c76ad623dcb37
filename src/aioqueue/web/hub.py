"""Fan-out to websocket connections: job channels, `jobs:*` and `queues` here, topic channels in
`topichub.py`.

`jobs:*` carries every job's events (the dashboard's live list): each event is serialised once
for all its subscribers, who are all allowed every job and its traceback (`jobs:admin`, or
anyone with auth off), and progress coalesces per job as on a job channel. `queues` carries the
report of `GET /v1/queues`, pushed every `QUEUES_INTERVAL` seconds while anyone subscribes:
made once per tick for all of them (and cached by QueueStats), so a dashboard open in many
browsers costs what one costs, and none of them polls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aioqueue import compactjson
from aioqueue.errors import BrokerUnavailable, NotReady
from aioqueue.jobs import Job
from aioqueue.web.connection import Connection
from aioqueue.web.topichub import TopicHub

logger = logging.getLogger(__name__)

#: The channel of every job's events (jobs:admin with auth on).
ALL_JOBS = "jobs:*"
#: The channel of the queues' report (jobs:admin with auth on).
QUEUES = "queues"
#: Seconds between two `queues` frames.
QUEUES_INTERVAL = 2.0


class Hub:
    """Channel name -> connections subscribed to it; topic channels are `topics`'."""

    def __init__(self, max_catch_ups: int = 32, *, tracebacks: bool = True) -> None:
        self.channels: dict[str, set[Connection]] = {}
        self.topics = TopicHub(max_catch_ups)
        #: Whether job frames carry an error's traceback: with auth on only `jobs:admin` may see
        #: one, and a frame is serialised once for every subscriber, so none does.
        self.tracebacks = tracebacks

    def subscribe(self, conn: Connection, channel: str) -> None:
        self.channels.setdefault(channel, set()).add(conn)
        conn.subscriptions.add(channel)

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        if channel.startswith("topic:"):
            self.topics.unsubscribe(conn, channel)
            return
        conn.subscriptions.discard(channel)
        subscribers = self.channels.get(channel)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self.channels[channel]

    def drop(self, conn: Connection) -> None:
        for channel in list(conn.subscriptions):
            self.unsubscribe(conn, channel)

    def on_job_change(self, event: str, job: Job) -> None:
        """Store listener: push the event to the job's channel, serialised once for everyone."""
        channel = "job:" + job.id
        coalesce = channel if event == "progress" else None
        subscribers = self.channels.get(channel)
        if subscribers:
            frame = job_frame(channel, event, job, self.tracebacks)
            for conn in list(subscribers):
                conn.send(frame, coalesce)
        everyone = self.channels.get(ALL_JOBS)
        if everyone:
            # Its subscribers may all see tracebacks. Progress coalesces per job, under a key
            # of its own: a connection subscribed to `job:ID` too gets both frames.
            frame = job_frame(ALL_JOBS, event, job, traceback=True)
            key = None if coalesce is None else ALL_JOBS + coalesce
            for conn in list(everyone):
                conn.send(frame, key)

    async def push_queues(
        self, report: Callable[[], Awaitable[dict[str, Any]]], interval: float = QUEUES_INTERVAL
    ) -> None:
        """Send the queues' report to the `queues` channel every `interval` seconds, for ever
        (the application's lifecycle cancels it); a tick with no subscriber costs nothing."""
        while True:
            await asyncio.sleep(interval)
            if not self.channels.get(QUEUES):
                continue
            try:
                frame = queues_frame(await report())
            except (BrokerUnavailable, NotReady) as exc:
                # The next tick tries again; the page shows the report's age meanwhile.
                logger.debug("no queues report this tick: %s", exc)
                continue
            for conn in list(self.channels.get(QUEUES, ())):
                conn.send(frame, QUEUES)  # a slow reader gets the newest report only


def job_frame(channel: str, event: str, job: Job, traceback: bool = True) -> bytes:
    frame = {"type": "job", "channel": channel, "event": event, "job": job.to_dict(traceback)}
    return compactjson.dumps(frame)


def queues_frame(report: dict[str, Any]) -> bytes:
    return compactjson.dumps({"type": "queues", "channel": QUEUES, **report})
