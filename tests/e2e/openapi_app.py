"""The app the schemathesis run serves: every kind of parameter the submit check knows, in tasks
that finish at once whatever their arguments (a fuzzer picks them), on two queues, plus one task
that fails so that there are failed jobs to retry. Nothing here sleeps, loops or exits.
"""

from __future__ import annotations

from typing import Any, Literal

from aioqueue import App, Context, SyncContext

app = App()


@app.task
async def add(a: int, b: int = 0) -> list[int]:
    return [a, b]  # not a + b: two big integers can add up past what JSON takes


@app.task(queue="other")
def scale(ctx: SyncContext, values: list[float], factor: float | None = None) -> int:
    ctx.progress(0.5, "halfway")
    return len(values)


@app.task
async def label(
    ctx: Context,
    name: str,
    tags: dict[str, str] | None = None,
    mode: Literal["fast", "slow", 3, None] = "fast",
    flag: bool = False,
) -> str:
    await ctx.progress(1.0)
    return name


@app.task
async def variadic(first: Any = None, /, *rest: int, **extra: bool) -> int:
    return len(rest) + len(extra)


@app.task
async def keyword_only(*, key: str, values: list[Any] | dict[str, Any] | None = None) -> str:
    return key


@app.task(max_attempts=1)
async def fails(message: str = "boom") -> None:
    raise RuntimeError(message)


@app.task
async def nothing() -> None:
    return None


@app.periodic("0 3 * * *")  # listed by GET /v1/schedules; a tick at 03:00 UTC makes a job, no more
@app.task
async def nightly(days: int = 1) -> int:
    return days
