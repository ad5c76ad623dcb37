"""Tasks the end-to-end tests serve (`aioqueue serve tests.apps:app`)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from aioqueue import App, Context, SyncContext

app = App()


def _record(ctx: Context | SyncContext, note: str = "") -> None:
    """Append (job id, attempt, pid[, note]) to $AQ_TEST_TASK_LOG: executions across crashes."""
    path = os.environ.get("AQ_TEST_TASK_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(
                fd, f"{ctx.job_id} {ctx.attempt} {os.getpid()} {note}".strip().encode() + b"\n"
            )
        finally:
            os.close(fd)


@app.task
async def echo(ctx: Context, value: Any = None) -> Any:
    _record(ctx)
    return value


@app.task
def square(ctx: SyncContext, x: int) -> int:
    _record(ctx)
    ctx.progress(0.5, "halfway")
    return x * x


@app.task(timeout=60.0)
async def ticker(ctx: Context, steps: int = 5, interval: float = 0.05) -> int:
    for step in range(1, steps + 1):
        await asyncio.sleep(interval)
        await ctx.progress(step / steps, f"step {step}")
    return steps


@app.task(max_attempts=3, retry_backoff=0.2, retry_backoff_max=1.0)
async def always_fail(ctx: Context, message: str = "boom") -> None:
    _record(ctx)
    raise RuntimeError(f"{message} (attempt {ctx.attempt})")


@app.task(max_attempts=3, retry_backoff=0.2)
async def big_result(ctx: Context, size: int) -> str:
    """Returns `size` characters: over `jobs.max_result_bytes`, the job fails at once."""
    _record(ctx)
    return "x" * size


@app.task(max_attempts=3, retry_backoff=0.2)
async def fail_then_succeed(ctx: Context, failures: int = 1) -> int:
    if ctx.attempt <= failures:
        raise ConnectionError(f"attempt {ctx.attempt} fails")
    return ctx.attempt


@app.task(max_attempts=1)
def fails_until(ctx: SyncContext, flag: str) -> str:
    """Fails until the file `flag` exists: dead letters, to retry once it does."""
    healed = os.path.exists(flag)
    _record(ctx, "ok" if healed else "failed")
    if not healed:
        raise RuntimeError("not healed yet")
    return "ok"


@app.task(max_attempts=1, timeout=0.3)
async def sleeper(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "woke"


@app.task(queue="other")
async def other_queue(n: int = 0) -> int:
    return n + 1


@app.task(topic="albums.{album}.thumbnails")
async def thumbnails(ctx: Context, album: int | str) -> str:
    """Its job events are published to albums.<album>.thumbnails.<event> too."""
    await ctx.progress(0.5, "half")
    return f"album {album}"


@app.task
async def spawn(ctx: Context, value: int) -> str:
    job = await ctx.submit("echo", {"value": value})
    return str(job["id"])


@app.task
async def work(ctx: Context, ms: int = 20) -> int:
    """A short job for the fault tests: in flight long enough to be caught by a fault."""
    await asyncio.sleep(ms / 1000)
    _record(ctx)
    return ms


@app.task(timeout=60.0)
async def long_job(ctx: Context, seconds: float) -> float:
    """Sleeps; notes in the task log when it is cancelled (a shutdown past its grace)."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        _record(ctx, "cancelled")
        raise
    _record(ctx)
    return seconds


@app.task(timeout=120.0)
async def chatter(ctx: Context, seconds: float, interval: float = 0.01) -> int:
    """Reports progress every `interval` seconds for `seconds`: a firehose for slow clients."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    sent = 0
    while loop.time() < end:
        sent += 1
        await ctx.progress(min(1.0, 1 - (end - loop.time()) / seconds), f"tick {sent} " + "x" * 200)
        await asyncio.sleep(interval)
    return sent


@app.task(timeout=120.0)
def block(ctx: SyncContext, seconds: float) -> float:
    """Holds its delivery for `seconds` in a thread, which nothing can stop: outlives a short
    consumer_timeout of the broker. Noted when it starts (an execution) and when it ends."""
    _record(ctx)
    time.sleep(seconds)
    _record(ctx, "finished")
    return seconds


@app.task
async def crash(ctx: Context) -> None:
    """A poison job: kills the whole process every time it runs."""
    _record(ctx)
    os._exit(1)


@app.task
async def says(ctx: Context, text: str) -> str:
    """Logs `text` from the task (its own logger), then a line from a thread of its sync kin."""
    logging.getLogger("tests.apps").warning("async says %s", text)
    return text


@app.task
def says_sync(ctx: SyncContext, text: str) -> str:
    logging.getLogger("tests.apps").warning("sync says %s", text)
    return text
