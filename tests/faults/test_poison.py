"""A job that kills the process every time it runs is dead-lettered after its delivery limit."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from tests.rabbitmq import RabbitNode
from tests.support import ServeProcess, submit, wait_ready, wait_terminal

pytestmark = [pytest.mark.amqp, pytest.mark.slow, pytest.mark.timeout(120)]
LIMIT = 2


async def test_a_job_that_crashes_the_process_is_dead_after_its_delivery_limit(
    rabbit: RabbitNode, prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    task_log = tmp_path / "runs.log"
    env = {"AIOQUEUE_BROKER__DELIVERY_LIMIT": str(LIMIT), "AQ_TEST_TASK_LOG": str(task_log)}
    servers = [ServeProcess(rabbit.url, prefix, env).start(tmp_path)]
    try:
        await wait_ready(http, servers[-1].url)
        # Due while the poison job crashes one process after another.
        healthy = await submit(
            http, servers[-1].url, {"task": "echo", "args": {"value": "fine"}, "delay": 2}
        )
        # Delayed too, so that its 202 is sent before it first kills the process.
        poison = await submit(http, servers[-1].url, {"task": "crash", "delay": 1})
        # The supervisor: start aioqueue again whenever the poison job kills it.
        restarts = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            process = servers[-1].proc
            assert process is not None
            try:
                process.wait(timeout=4)
            except subprocess.TimeoutExpired:
                break  # it stays up: the poison job is gone
            restarts += 1
            servers.append(ServeProcess(rabbit.url, prefix, env).start(tmp_path))
        await wait_ready(http, servers[-1].url)
        dead = await wait_terminal(http, servers[-1].url, poison["id"], deadline=30)
        fine = await wait_terminal(http, servers[-1].url, healthy["id"])
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.kill()
    runs = [line.split()[0] for line in task_log.read_text().splitlines()]
    print(
        f"\npoison job: {runs.count(poison['id'])} deliveries, {restarts} crashes, then {dead['status']}"
    )
    assert dead["status"] == "dead"
    assert dead["error"]["message"] == "dead-lettered by the broker: delivery_limit"
    assert runs.count(poison["id"]) == LIMIT + 1 == restarts  # measured: limit N -> N + 1 runs
    assert fine["status"] == "succeeded" and fine["result"] == "fine"
