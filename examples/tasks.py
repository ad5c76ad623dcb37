"""Example tasks: `aioqueue serve examples.tasks:app` runs them.

Try them with the commands in the README's quickstart.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

from aioqueue import App, Context, SyncContext

app = App()


@app.task
async def add(a: int, b: int) -> int:
    """The smallest task: no context, an answer at once."""
    return a + b


@app.task(timeout=120.0)
async def resize(ctx: Context, url: str, width: int = 100, steps: int = 5) -> dict[str, object]:
    """A long job that reports progress: a client subscribed to it sees every step."""
    for step in range(1, steps + 1):
        await asyncio.sleep(0.2)  # stands in for downloading and resizing
        await ctx.progress(step / steps, f"step {step} of {steps}")
    return {"url": url, "width": width, "thumbnail": f"{url}?w={width}"}


@app.task(max_attempts=4, retry_backoff=0.5, retry_backoff_max=5.0)
async def flaky_call(ctx: Context, endpoint: str, fail_times: int = 2) -> dict[str, object]:
    """Fails its first `fail_times` attempts, as a busy upstream does; retried with back-off."""
    if ctx.attempt <= fail_times:
        raise ConnectionError(f"{endpoint} answered 503 (attempt {ctx.attempt})")
    return {"endpoint": endpoint, "attempts": ctx.attempt}


@app.task(max_attempts=1)
def always_fails(reason: str = "bad input") -> None:
    """Raises on its only attempt: the job ends `failed`, its message in the dead letters."""
    raise ValueError(reason)


@app.task(queue="cpu", timeout=600.0)
def hash_chain(ctx: SyncContext, seed: str, rounds: int = 200_000) -> str:
    """CPU-heavy and synchronous: runs in a thread, so the event loop keeps serving."""
    digest = seed.encode()
    for done in range(1, rounds + 1):
        digest = hashlib.sha256(digest).digest()
        if done % (rounds // 10 or 1) == 0:
            ctx.progress(done / rounds, f"{done} rounds")
    return digest.hex()


@app.task
async def fan_out(ctx: Context, urls: list[str], width: int = 100) -> list[str]:
    """Submits one `resize` job per URL from inside a task; returns their ids."""
    ids = []
    for url in urls:
        job = await ctx.submit(
            "resize", {"url": url, "width": width, "steps": random.randint(2, 5)}
        )
        ids.append(job["id"])
    return ids
