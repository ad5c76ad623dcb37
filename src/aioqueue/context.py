"""What a running task sees of aioqueue: `Context` for async tasks, `SyncContext` for plain ones.

A task asks for it by naming its first parameter `ctx`, or by annotating the first parameter with
either class. Plain `def` tasks run in a thread and always get a `SyncContext`, whose methods
block until the event loop has done the work, so they are called without `await`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class JobHooks(Protocol):
    """The runner's side of a context: what a task may ask of the service while it runs."""

    async def progress(self, value: float, message: str | None) -> None: ...

    async def submit(self, task: str, args: Any, options: dict[str, Any]) -> dict[str, Any]: ...

    async def publish(self, topic: str, data: Any) -> int: ...


def _check_progress(value: float, message: str | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ValueError(f"progress value must be a number from 0 to 1, not {value!r}")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"progress message must be a str or None, not {type(message).__name__}")


class _BaseContext:
    __slots__ = ("_hooks", "attempt", "job_id", "task")

    def __init__(self, job_id: str, task: str, attempt: int, hooks: JobHooks) -> None:
        #: The job's id, as returned by the submit.
        self.job_id = job_id
        #: The task's registered name.
        self.task = task
        #: The attempt this run is, starting at 1.
        self.attempt = attempt
        self._hooks = hooks

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} job_id={self.job_id} task={self.task} attempt={self.attempt}>"
        )


class Context(_BaseContext):
    """The context of an `async def` task."""

    __slots__ = ()

    async def progress(self, value: float, message: str | None = None) -> None:
        """Record progress (0 to 1) and push it to the job's subscribers."""
        _check_progress(value, message)
        await self._hooks.progress(float(value), message)

    async def submit(self, task: str, args: Any = None, **options: Any) -> dict[str, Any]:
        """Enqueue another job; returns its record. Options are those of the submit body."""
        return await self._hooks.submit(task, args, options)

    async def publish(self, topic: str, data: Any = None) -> int:
        """Publish `data` (any JSON value) to `topic`; returns its offset once the broker
        confirmed it. Every websocket subscribed to a pattern that matches the topic gets it."""
        return await self._hooks.publish(topic, data)


class SyncContext(_BaseContext):
    """The context of a plain `def` task: the same methods, called without `await`."""

    __slots__ = ("_loop",)

    def __init__(
        self, job_id: str, task: str, attempt: int, hooks: JobHooks, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(job_id, task, attempt, hooks)
        self._loop = loop

    def progress(self, value: float, message: str | None = None) -> None:
        """Record progress (0 to 1) and push it to the job's subscribers; blocks until recorded."""
        _check_progress(value, message)
        asyncio.run_coroutine_threadsafe(
            self._hooks.progress(float(value), message), self._loop
        ).result()

    def submit(self, task: str, args: Any = None, **options: Any) -> dict[str, Any]:
        """Enqueue another job and return its record; blocks until the broker confirmed it."""
        return asyncio.run_coroutine_threadsafe(
            self._hooks.submit(task, args, options), self._loop
        ).result()

    def publish(self, topic: str, data: Any = None) -> int:
        """Publish `data` to `topic` and return its offset; blocks until the broker confirmed."""
        return asyncio.run_coroutine_threadsafe(
            self._hooks.publish(topic, data), self._loop
        ).result()


CONTEXT_TYPES = (Context, SyncContext)
