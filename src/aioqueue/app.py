"""`App`: the task registry users decorate, and their handle on a running service."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from aioqueue.config import Settings
from aioqueue.errors import TaskDefinitionError
from aioqueue.periodic import DEFAULT_GRACE, CatchUp, Periodic, check_policy, schedule_of
from aioqueue.service import Service
from aioqueue.tasks import Task

if TYPE_CHECKING:
    from aiohttp import web

P = ParamSpec("P")
R = TypeVar("R")


class App:
    """Tasks and their options. `aioqueue serve module:app` runs it; so can your own code:

    ```python
    app = App()

    @app.task(max_attempts=5)
    async def resize(ctx: Context, url: str, width: int = 100) -> dict:
        await ctx.progress(0.5, "downloaded")
        return {"url": url, "width": width}

    await app.start(settings)                  # or app.mount(aiohttp_app) before it runs
    job = await app.submit("resize", {"url": "https://x/y.png"})
    await app.stop()
    ```
    """

    def __init__(self) -> None:
        self.tasks: dict[str, Task[Any, Any]] = {}
        #: The periodic tasks' schedules, by task name (`@app.periodic`).
        self.schedules: dict[str, Periodic] = {}
        self.service: Service | None = None

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry_backoff: float | None = None,
        retry_backoff_max: float | None = None,
        priority: int = 0,
        topic: str | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    # mypy cannot match a ParamSpec that only the returned decorator binds (signature 2).
    def task(  # type: ignore[misc]
        self,
        fn: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = "default",
        max_attempts: int | None = None,
        timeout: float | None = None,
        retry_backoff: float | None = None,
        retry_backoff_max: float | None = None,
        priority: int = 0,
        topic: str | None = None,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task: `@app.task` or `@app.task(queue=..., ...)`.

        Options left out take their defaults from `[jobs]` in the config when the job runs.
        With `topic` (e.g. `"albums.{album}.thumbnails"`), every event of its jobs is also
        published to `<topic>.<event>` (see jobtopics.py).
        """

        def register(fn: Callable[P, R]) -> Task[P, R]:
            task = Task(
                fn,
                name=name,
                queue=queue,
                max_attempts=max_attempts,
                timeout=timeout,
                retry_backoff=retry_backoff,
                retry_backoff_max=retry_backoff_max,
                priority=priority,
                topic=topic,
            )
            if task.name in self.tasks:
                raise TaskDefinitionError(f"a task named {task.name!r} is registered already")
            self.tasks[task.name] = task
            return task

        return register if fn is None else register(fn)

    def periodic(
        self,
        cron: str | None = None,
        *,
        every: float | timedelta | None = None,
        catch_up: CatchUp = "once",
        grace: float = DEFAULT_GRACE,
        **task_options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Run a task on a schedule: `@app.periodic("*/5 * * * *")` (cron, in UTC; a sixth
        field first is seconds) or `@app.periodic(every=30.0)` (seconds, or a timedelta).

        Above `@app.task`, or alone on a function (then `task_options` are `@app.task`'s). The
        task must take no required argument: each tick submits one job with no `args`, whose
        idempotency key is `periodic:TASK:TICK_TIME`. One process at a time submits the ticks
        (see scheduler.py). A tick found more than `grace` seconds late (no process ran the
        schedule meanwhile) is dealt with by `catch_up`: `"once"` submits the latest tick due,
        once for all those missed; `"skip"` submits none of them.
        """
        # Checked before anything is registered: a refused schedule leaves no task behind.
        schedule = schedule_of(cron, every)
        check_policy(catch_up, grace)

        def register(fn: Callable[P, R]) -> Task[P, R]:
            if isinstance(fn, Task):
                if task_options:
                    raise TaskDefinitionError(
                        f"task {fn.name!r}: give {sorted(task_options)} to @app.task, below"
                        " @app.periodic"
                    )
                if self.tasks.get(fn.name) is not fn:
                    raise TaskDefinitionError(f"task {fn.name!r} is not a task of this App")
                task: Task[P, R] = fn
            else:
                task = self.task(**task_options)(fn)
            if any(param.required for param in task.signature.params):
                required = [param.name for param in task.signature.params if param.required]
                raise TaskDefinitionError(
                    f"periodic task {task.name!r} has required arguments {required}: a tick"
                    " submits a job with none (give them defaults)"
                )
            if task.name in self.schedules:
                raise TaskDefinitionError(f"task {task.name!r} has a schedule already")
            self.schedules[task.name] = Periodic(task.name, schedule, catch_up, grace)
            return task

        return register

    @property
    def queues(self) -> set[str]:
        return {task.queue for task in self.tasks.values()}

    async def submit(
        self, task: str, args: Any = None, *, owner: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Submit a job from Python; returns its record once the broker confirmed it. `owner`:
        the principal it belongs to (with auth on, who may read and cancel it), e.g. the
        logged-in user of a web view that submits on their behalf."""
        body = {**options, "task": task, "args": args}
        job = await self._running().jobs.submit(body, owner=owner)
        return job.to_dict()

    async def publish(self, topic: str, data: Any = None) -> int:
        """Publish `data` (any JSON value) to `topic`; returns its offset once the broker
        confirmed it."""
        return await self._running().topics.publish(topic, data)

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record of a job, or None."""
        job = self._running().jobs.get(job_id)
        return None if job is None else job.to_dict()

    def mount(self, web_app: web.Application, settings: Settings | None = None) -> None:
        """Serve aioqueue's API and run its consumers inside an existing aiohttp application.

        The application's server is yours: `http.header_timeout`, `keepalive_timeout`,
        `max_connections` and the raised open-files limit are `aioqueue serve`'s alone."""
        from aioqueue.web.app import install

        install(web_app, self, settings or Settings(), bind=self._bind)

    def _bind(self, service: Service | None) -> None:
        self.service = service

    async def start(self, settings: Settings | None = None) -> Service:
        """Start the service (broker, consumers) in this event loop; `stop()` ends it."""
        if self.service is not None:
            raise RuntimeError("this App is running already")
        service = Service(self, settings or Settings())
        await service.start()
        self.service = service
        return service

    async def stop(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            await service.close()

    def _running(self) -> Service:
        if self.service is None:
            raise RuntimeError("the App is not running: start it with `await app.start()` first")
        return self.service
