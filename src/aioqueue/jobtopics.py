"""Job events on topics: a task declared with `topic=` has every event of its jobs published to
a topic, so that a page can follow every job of a kind without subscribing to each job.

    @app.task(topic="albums.{album}.thumbnails")
    async def make_thumbnails(ctx: Context, album: int) -> None: ...

A job of it with `{"album": 42}` publishes `{"event": "started", "job": record}` to
`albums.42.thumbnails.started`, then `.progress`, `.succeeded` and so on: subscribe to
`albums.42.thumbnails.*` for one album, `albums.*.thumbnails.succeeded` for every finished one.
`{name}` takes the value of the job's argument `name`, which must be a word (letters, digits,
`_`, `-`; an int is one); a job whose arguments do not make a topic name publishes nothing, and
the log says so once per task.

Each event is published by the process that recorded it, once, after the event log has it: so
a topic message never tells of an event the job record does not have. It is best effort, as a
websocket push is: a process killed between the two, or a broker away at that moment, loses the
topic message (a warning says so); the job record never loses the event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from aioqueue.errors import AioqueueError, PayloadTooLarge

if TYPE_CHECKING:
    from aioqueue.jobs import Job
    from aioqueue.publisher import Topics
    from aioqueue.tasks import Task

logger = logging.getLogger(__name__)

#: Publishes of job events in flight at most; beyond it they are dropped (and said once).
MAX_IN_FLIGHT = 1000


class JobEvents:
    """A job store listener: publishes the events this process recorded, of tasks with a topic."""

    def __init__(
        self,
        tasks: Mapping[str, Task[Any, Any]],
        topics: Topics,
        recorded_here: Callable[[], bool],
        tracebacks: bool = True,
    ) -> None:
        self._templates = {
            name: task.topic for name, task in tasks.items() if task.topic is not None
        }
        self._topics = topics
        #: Whether the change being applied comes from a log entry this process wrote.
        self._recorded_here = recorded_here
        #: With auth on, only `jobs:admin` sees tracebacks, and a topic's subscribers may not.
        self._tracebacks = tracebacks
        self._in_flight: set[asyncio.Task[None]] = set()
        self._unmade: set[str] = set()
        self._failing = False

    def __bool__(self) -> bool:
        return bool(self._templates)

    def on_change(self, event: str, job: Job) -> None:
        template = self._templates.get(job.task)
        if template is None or not self._recorded_here():
            return
        topic = template.render(job.args, event)
        if topic is None:
            self._warn_once(job, f"its arguments do not make a topic of {template.template!r}")
            return
        if len(self._in_flight) >= MAX_IN_FLIGHT:  # before the work of encoding it
            self._warn_once(job, f"{MAX_IN_FLIGHT} publishes are in flight already")
            return
        try:
            data = self._topics.encode({"event": event, "job": job.to_dict(self._tracebacks)})
        except PayloadTooLarge as exc:
            self._warn_once(job, exc.detail)
            return
        task = asyncio.create_task(self._publish(topic, data))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def _warn_once(self, job: Job, why: str) -> None:
        if job.task not in self._unmade:
            self._unmade.add(job.task)
            logger.warning(
                "task %s: an event of job %s is not published to its topic: %s (said once per"
                " task)",
                job.task,
                job.id,
                why,
            )

    async def _publish(self, topic: str, data: bytes) -> None:
        try:
            await self._topics.log.publish(topic, data)
        except AioqueueError as exc:
            if not self._failing:
                logger.warning("job events are not published to topics for now: %s", exc)
            self._failing = True
            return
        if self._failing:
            logger.info("job events are published to topics again")
        self._failing = False

    async def close(self) -> None:
        for task in self._in_flight:
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
