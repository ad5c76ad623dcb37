"""The dashboard (`/dashboard`) in a real browser: headless Chromium (Debian's), driven by
Playwright, against the real `aioqueue serve`.

On RabbitMQ: a job submitted over HTTP appears and its progress bar moves; cancel and retry from
the page change the job over HTTP; the dead letters of a task are retried from the page; a job
submitted from the form generated from /openapi.json exists, and a bad value is marked at its
field; after the service restarts, the page reconnects by itself and shows a job that finished
while it was away (only its resync can bring that one). With auth on (token mode): the page asks
for a token, refuses a principal without jobs:admin, and works with one.

Set DASHBOARD_SCREENSHOT=path to save the README's screenshot from the first test.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from playwright.async_api import Browser, Page, expect

from tests.conftest import ExternalBroker
from tests.e2e.test_browser import browser, chromium  # noqa: F401 - fixtures, reused
from tests.rabbitmq import RabbitNode, free_port
from tests.support import JSON, ServeProcess, submit, wait_ready, wait_terminal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WAIT_MS = 15_000  # every wait on the page: a deadline, well inside the test's timeout


async def get_job(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/jobs/{job_id}") as response:
        assert response.status == 200, await response.text()
        return dict(await response.json())


async def until(check: Any, deadline: float = WAIT_MS / 1000) -> None:
    """Until the coroutine function `check` returns true; TimeoutError at the deadline."""
    async with asyncio.timeout(deadline):
        while not await check():  # noqa: ASYNC110 - the state is the server's: no event to wait on
            await asyncio.sleep(0.05)


def row(page: Page, job_id: str) -> Any:
    return page.locator(f'#jobs tr[data-id="{job_id}"]')


async def open_dashboard(launched: Browser, url: str) -> tuple[Page, list[str]]:
    page = await launched.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url + "/dashboard")
    return page, errors


@pytest.mark.amqp
async def test_the_dashboard_follows_and_acts_on_jobs_and_survives_a_restart(
    rabbit: RabbitNode | ExternalBroker,
    prefix: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    browser: Browser,  # noqa: F811
) -> None:
    started = time.monotonic()
    port = free_port()
    env = {"AIOQUEUE_HTTP__PORT": str(port)}
    # The page follows `followed`, which is stopped and started again on the same port; `other`
    # stays up, and runs a job while `followed` is away.
    followed = ServeProcess(rabbit.url, prefix, env)
    other = ServeProcess(rabbit.url, prefix)
    servers = [followed, other]
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start, tmp_path) for s in servers))
        await asyncio.gather(*(wait_ready(http, s.url) for s in servers))
        url = followed.url
        page, errors = await open_dashboard(browser, url)
        status = page.locator("#status")
        await expect(status).to_have_text("connected", timeout=WAIT_MS)
        await expect(page.locator("#auth-off")).to_be_visible()
        await expect(page.locator("#auth-off")).to_contain_text("anyone who reaches this port")

        # A job submitted over HTTP appears, and its progress bar rises as it runs.
        ticking = await submit(
            http, url, {"task": "ticker", "args": {"steps": 20, "interval": 0.1}}
        )
        bar = row(page, ticking["id"]).locator("progress")
        await expect(bar).to_have_count(1, timeout=WAIT_MS)
        values: list[float] = []
        async with asyncio.timeout(WAIT_MS / 1000):
            while len(set(values)) < 3:  # three different values, rising
                value = float(await bar.evaluate("bar => bar.value"))
                if not values or value != values[-1]:
                    values.append(value)
                await asyncio.sleep(0.05)
        assert values == sorted(values) and values[-1] > 0, values
        await expect(row(page, ticking["id"]).locator(".status")).to_have_text(
            "succeeded", timeout=WAIT_MS
        )

        # Cancel from the page: a job waiting for its delay.
        waiting = await submit(http, url, {"task": "echo", "args": {"value": 1}, "delay": 60})
        await row(page, waiting["id"]).click(timeout=WAIT_MS)
        await expect(page.locator("#detail-id")).to_have_text(waiting["id"])
        await page.locator("#cancel").click()
        await expect(page.locator("#action-result")).to_have_text("202: cancelled", timeout=WAIT_MS)
        assert (await get_job(http, url, waiting["id"]))["status"] == "cancelled"
        await expect(row(page, waiting["id"]).locator(".status")).to_have_text("cancelled")

        # Retry from the page: a job that failed (a timeout on its only attempt), whose record
        # shows its error; the retry runs it again, which HTTP sees.
        sleeping = await submit(http, url, {"task": "sleeper", "args": {"seconds": 5}})
        failed = await wait_terminal(http, url, sleeping["id"])
        assert failed["status"] == "failed"
        await row(page, sleeping["id"]).click(timeout=WAIT_MS)
        await expect(page.locator("#detail-status")).to_have_text("failed", timeout=WAIT_MS)
        await expect(page.locator("#detail-error")).to_contain_text("Timeout")
        await expect(page.locator("#detail-args")).to_contain_text('"seconds": 5')
        await page.locator("#retry").click()
        # The answer's record is as the job stands when it comes: queued, or running already.
        answered = re.compile(r"^202: (queued|running)$")
        await expect(page.locator("#action-result")).to_have_text(answered, timeout=WAIT_MS)

        async def run_again() -> bool:
            job = await get_job(http, url, sleeping["id"])
            return bool(job["status"] != "failed" or job["finished_at"] != failed["finished_at"])

        await until(run_again)

        # The dead letters of a task, retried from the page: both failed jobs run again.
        doomed = [
            await submit(http, url, {"task": "always_fail", "args": {"message": f"m{n}"}})
            for n in range(2)
        ]
        before = [await wait_terminal(http, url, job["id"]) for job in doomed]
        assert [job["status"] for job in before] == ["failed", "failed"]
        await page.locator("#dead-task").select_option("always_fail")
        await page.locator("#dead-retry").click()
        await expect(page.locator("#dead-result")).to_have_text("retried 2", timeout=WAIT_MS)
        for job in before:
            after = await get_job(http, url, job["id"])
            assert after["status"] != "failed" or after["finished_at"] != job["finished_at"]

        # Submit from the form generated from /openapi.json: a bad value is marked at its field
        # by the server's problem; a good one makes a job.
        await page.locator("#submit-task").select_option("square")
        await expect(page.locator('label[for="arg-x"]')).to_have_class("required")
        await page.locator("#arg-x").fill("1.5")
        await page.locator("#submit-form button[type=submit]").click()
        problem = page.locator('[data-field="args.x"] .problem')
        await expect(problem).to_contain_text("expected", timeout=WAIT_MS)
        await page.locator("#arg-x").fill("7")
        await page.locator("#submit-form button[type=submit]").click()
        result = page.locator("#submit-result")
        await expect(result).to_have_text(re.compile(r"submitted \S+"), timeout=WAIT_MS)
        squared_id = (await result.text_content() or "").split()[-1]
        assert (await wait_terminal(http, url, squared_id))["result"] == 49

        # The queues' report is pushed: the table has the tasks' queues, and the chart points.
        await expect(page.locator('#queues tr[data-queue="default"]')).to_have_count(
            1, timeout=WAIT_MS
        )
        await expect(row(page, squared_id).locator(".status")).to_have_text(
            "succeeded", timeout=WAIT_MS
        )
        shot = os.environ.get("DASHBOARD_SCREENSHOT")
        if shot:
            await row(page, sleeping["id"]).click()
            await page.screenshot(path=shot)  # the viewport: the top of a long traceback

        # The service restarts: the page reconnects by itself, and its resync shows a job that
        # ran on the other process while this one was away.
        assert followed.stop() == 0
        await expect(status).to_contain_text("reconnecting", timeout=WAIT_MS)
        meanwhile = await submit(http, other.url, {"task": "echo", "args": {"value": "away"}})
        assert (await wait_terminal(http, other.url, meanwhile["id"]))["status"] == "succeeded"
        restarted = ServeProcess(rabbit.url, prefix, env)
        servers.append(restarted)
        await asyncio.to_thread(restarted.start, tmp_path)
        await expect(status).to_have_text("connected", timeout=WAIT_MS)
        await expect(row(page, meanwhile["id"]).locator(".status")).to_have_text(
            "succeeded", timeout=WAIT_MS
        )
        await expect(row(page, squared_id)).to_have_count(1)  # the earlier ones are back too
        # And live again: a new job's events arrive.
        live = await submit(http, restarted.url, {"task": "echo", "args": {"value": "back"}})
        await expect(row(page, live["id"]).locator(".status")).to_have_text(
            "succeeded", timeout=WAIT_MS
        )
        assert errors == []
        print(f"\nthe dashboard test took {time.monotonic() - started:.1f} s")
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.kill()


ADMIN = "admin-token-0123456789abcdef"
READER = "reader-token-0123456789abcdef"
TOKENS = [
    {"token": ADMIN, "principal": "root", "scopes": ["jobs:admin"]},
    {"token": READER, "principal": "alice", "scopes": ["jobs:submit", "jobs:read"]},
]


async def test_with_auth_on_the_dashboard_asks_for_a_token_and_needs_jobs_admin(
    prefix: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    browser: Browser,  # noqa: F811
) -> None:
    env = {"AIOQUEUE_AUTH__MODE": "token", "AIOQUEUE_AUTH__TOKENS": orjson.dumps(TOKENS).decode()}
    server = ServeProcess("memory://", prefix, env)
    try:
        await asyncio.to_thread(server.start, tmp_path)
        await wait_ready(http, server.url)
        # The page itself is served to anyone, under its security headers.
        async with http.get(server.url + "/dashboard") as response:
            assert response.status == 200
            assert "script-src 'self'" in response.headers["Content-Security-Policy"]
            assert response.headers["X-Content-Type-Options"] == "nosniff"

        # Without a token it asks for one, and shows nothing else; it is not "open".
        page, errors = await open_dashboard(browser, server.url)
        await expect(page.locator("#token-form")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#main")).to_be_hidden()
        await expect(page.locator("#auth-off")).to_be_hidden()

        # A principal without jobs:admin: the websocket refuses `jobs:*`, and the page says so.
        await page.locator("#token").fill(READER)
        await page.locator("#token-form button").click()
        await expect(page.locator("#auth-error")).to_contain_text("jobs:admin", timeout=WAIT_MS)

        # With an admin token (a new tab: sessionStorage is per tab) it works.
        page, errors = await open_dashboard(browser, server.url)
        await page.locator("#token").fill(ADMIN)
        await page.locator("#token-form button").click()
        await expect(page.locator("#status")).to_have_text("connected", timeout=WAIT_MS)
        headers = {**JSON, "Authorization": "Bearer " + ADMIN}
        async with http.post(
            server.url + "/v1/jobs",
            data=orjson.dumps({"task": "echo", "args": {"value": 1}}),
            headers=headers,
        ) as response:
            assert response.status == 202
            job_id = (await response.json())["id"]
        await expect(row(page, job_id).locator(".status")).to_have_text(
            "succeeded", timeout=WAIT_MS
        )
        await expect(page.locator("#auth-error")).to_be_hidden()
        assert errors == []
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
