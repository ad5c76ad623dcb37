"""A registered task: the user's function, its options, and its checked signature."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from aioqueue.config import JobsSettings
from aioqueue.errors import TaskDefinitionError
from aioqueue.periodic import Periodic
from aioqueue.signature import Signature
from aioqueue.topics import TopicTemplate

P = ParamSpec("P")
R = TypeVar("R")

QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
TASK_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
#: Job priorities, highest runs first; 0 is the default (as in RabbitMQ and Celery).
PRIORITIES = range(10)


class Task(Generic[P, R]):
    """A function registered with `@app.task`. Calling it calls the function directly."""

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry_backoff: float | None = None,
        retry_backoff_max: float | None = None,
        priority: int = 0,
        topic: str | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.queue = queue
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self.priority = priority
        #: Where its jobs' events are published too, if anywhere (see jobtopics.py).
        self.topic = None if topic is None else TopicTemplate(topic, self.name)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = Signature.of(fn)
        self._check_options()

    def _check_options(self) -> None:
        where = f"task {self.name!r}"
        if not TASK_NAME.fullmatch(self.name):
            raise TaskDefinitionError(f"{where}: a name is 1-200 of A-Z a-z 0-9 _ . : -")
        if not QUEUE_NAME.fullmatch(self.queue):
            raise TaskDefinitionError(
                f"{where}: queue {self.queue!r} is not 1-64 of A-Z a-z 0-9 _ -"
            )
        if self.max_attempts is not None and not 1 <= self.max_attempts <= 1000:
            raise TaskDefinitionError(f"{where}: max_attempts must be from 1 to 1000")
        if isinstance(self.priority, bool) or self.priority not in PRIORITIES:
            raise TaskDefinitionError(f"{where}: priority must be an integer from 0 to 9")
        for option in ("timeout", "retry_backoff", "retry_backoff_max"):
            value = getattr(self, option)
            if value is not None and not value >= (0 if option != "timeout" else 1e-3):
                raise TaskDefinitionError(f"{where}: {option} must be a positive number of seconds")

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue}>"

    def backoff(self, defaults: JobsSettings) -> tuple[float, float]:
        """Base and cap of the exponential back-off between attempts, in seconds."""
        base = defaults.retry_backoff if self.retry_backoff is None else self.retry_backoff
        cap = (
            defaults.retry_backoff_max if self.retry_backoff_max is None else self.retry_backoff_max
        )
        return base, cap

    def describe(self, defaults: JobsSettings) -> dict[str, Any]:
        """The task as `GET /v1/tasks` shows it."""
        return {
            "name": self.name,
            "queue": self.queue,
            "params": self.signature.describe(),
            "max_attempts": self.max_attempts or defaults.max_attempts,
            "timeout": self.timeout or defaults.timeout,
        }


class Registry(Protocol):
    """What a service needs of an `App`: its tasks by name, the queues they use, and the
    schedules of its periodic tasks."""

    @property
    def tasks(self) -> Mapping[str, Task[Any, Any]]: ...

    @property
    def schedules(self) -> Mapping[str, Periodic]: ...

    @property
    def queues(self) -> set[str]: ...
