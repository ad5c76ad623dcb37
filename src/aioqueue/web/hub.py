"""Fan-out to websocket connections: job channels here, topic channels in `topichub.py`."""

from __future__ import annotations

from aioqueue import compactjson
from aioqueue.jobs import Job
from aioqueue.web.connection import Connection
from aioqueue.web.topichub import TopicHub


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
        subscribers = self.channels.get(channel)
        if not subscribers:
            return
        frame = job_frame(channel, event, job, self.tracebacks)
        coalesce = channel if event == "progress" else None
        for conn in list(subscribers):
            conn.send(frame, coalesce)


def job_frame(channel: str, event: str, job: Job, traceback: bool = True) -> bytes:
    frame = {"type": "job", "channel": channel, "event": event, "job": job.to_dict(traceback)}
    return compactjson.dumps(frame)
