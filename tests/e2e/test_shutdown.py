"""G4, graceful shutdown, with the real `aioqueue serve` on RabbitMQ and a restart after it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.rabbitmq import RabbitNode
from tests.support import JSON, ServeProcess, submit, wait_ready, wait_terminal

pytestmark = pytest.mark.amqp
GRACE = 1.5


async def wait_running(http: aiohttp.ClientSession, url: str, job_id: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = await (await http.get(f"{url}/v1/jobs/{job_id}")).json()
        if job["status"] == "running":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} not running in time")


async def test_sigterm_finishes_short_jobs_requeues_long_ones_and_exits_0(
    rabbit: RabbitNode, prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    task_log = tmp_path / "runs.log"
    env = {"AIOQUEUE_JOBS__SHUTDOWN_GRACE": str(GRACE), "AQ_TEST_TASK_LOG": str(task_log)}
    first = ServeProcess(rabbit.url, prefix, env).start(tmp_path)
    try:
        await wait_ready(http, first.url)
        long = await submit(http, first.url, {"task": "long_job", "args": {"seconds": 3}})
        short = [
            await submit(http, first.url, {"task": "long_job", "args": {"seconds": 0.5}})
            for _ in range(3)
        ]
        await wait_running(http, first.url, long["id"])
        stopped_at = time.monotonic()
        first.signal(signal.SIGTERM)
        while True:  # the signal takes a moment to arrive; then /readyz says so at once
            async with http.get(first.url + "/readyz") as ready:
                if ready.status == 503:
                    assert "shutting down" in (await ready.json())["detail"]
                    break
            assert time.monotonic() - stopped_at < 1.0, "still ready 1 s after SIGTERM"
            await asyncio.sleep(0.02)
        body = orjson.dumps({"task": "echo"})
        async with http.post(first.url + "/v1/jobs", data=body, headers=JSON) as refused:
            assert refused.status == 503 and refused.headers["Retry-After"]
        assert first.proc is not None
        assert first.proc.wait(timeout=GRACE + 5) == 0
        assert time.monotonic() - stopped_at < GRACE + 2
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within the grace period:\n{first.log()}") from None
    finally:
        if first.proc is not None and first.proc.poll() is None:
            first.kill()

    second = ServeProcess(rabbit.url, prefix, env).start(tmp_path)
    try:
        await wait_ready(http, second.url)
        for job in short:
            assert (await wait_terminal(http, second.url, job["id"]))["status"] == "succeeded"
        done = await wait_terminal(http, second.url, long["id"])
        assert (done["status"], done["result"]) == ("succeeded", 3)
    finally:
        second.stop()
    lines = [line.split() for line in task_log.read_text().splitlines()]
    long_runs = [words[3:] for words in lines if words[0] == long["id"]]
    assert long_runs == [["cancelled"], []]  # cancelled at the grace, then run in full
    assert sum(1 for words in lines if words[0] in {job["id"] for job in short}) == 3
