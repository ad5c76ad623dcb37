"""The browser example, examples/topics.html, in a real browser (headless Chromium, driven by
Playwright) against the real `aioqueue serve` on RabbitMQ: it shows every message of its pattern
once and in offset order, across a SIGKILL and restart of the process it follows, and resumes
from localStorage after a reload.

Debian's chromium is used (scripts/test installs it): Playwright downloads no browser of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest
from aiohttp import web
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from tests.conftest import ExternalBroker
from tests.rabbitmq import RabbitNode, free_port
from tests.support import JSON, ROOT, ServeProcess, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

CHROMIUM = Path("/usr/bin/chromium")
#: Flags that work in a container as root with no display, GPU or network: no sandbox (root),
#: and none of the background fetches that would wait for a network there is not.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE = ROOT / "examples" / "topics.html"
PATTERN = "news.#"
WAIT_MS = 15_000  # every wait on the page: a deadline, well inside the test's timeout


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        # As for RabbitMQ (conftest.rabbit): a missing browser fails, it never skips the test.
        pytest.fail(
            f"{CHROMIUM} is missing: run scripts/test once as root, which installs Debian's chromium"
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page_url() -> AsyncIterator[str]:
    """The example page from a static server on its own port: a page of another localhost
    origin than the websocket's, as a developer serves it (`python -m http.server`)."""

    async def topics_html(request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE)

    static = web.Application()
    static.router.add_get("/topics.html", topics_html)
    runner = web.AppRunner(static, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/topics.html"
    finally:
        await runner.cleanup()


async def publish(http: aiohttp.ClientSession, url: str, topic: str, data: Any) -> int:
    async with http.post(f"{url}/v1/topics/{topic}", data=orjson.dumps(data), headers=JSON) as r:
        body = await r.json()
        assert r.status == 202, (r.status, body)
        return int(body["offset"])


async def at_least(page: Page, count: int) -> None:
    """Until the page shows `count` messages or more (a count the publisher may run past)."""
    await page.wait_for_function(
        "count => document.querySelectorAll('ul > li').length >= count", arg=count, timeout=WAIT_MS
    )


async def shown(page: Page) -> list[tuple[int, str, Any]]:
    """The page's list: (offset, topic, data) of each message, in the order shown."""
    items = await page.locator("ul > li").all_text_contents()
    parsed = []
    for item in items:
        offset, topic, data = item.split(" ", 2)
        parsed.append((int(offset), topic, json.loads(data)))
    return parsed


@pytest.mark.amqp
async def test_the_topics_page_shows_every_message_once_in_order_across_a_restart(
    rabbit: RabbitNode | ExternalBroker,
    prefix: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    browser: Browser,
    page_url: str,
) -> None:
    port = free_port()
    # The page follows `followed`, which is killed and started again on the same port; messages
    # are published through `publisher`, which stays up, so that every one of them is known to
    # have been published (a publish cut short by the kill would be neither here nor there).
    followed = ServeProcess(rabbit.url, prefix, {"AIOQUEUE_HTTP__PORT": str(port)})
    publisher = ServeProcess(rabbit.url, prefix)
    servers = [followed, publisher]
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start, tmp_path) for s in servers))
        await asyncio.gather(*(wait_ready(http, s.url) for s in servers))

        page = await browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        ws_url = f"ws://127.0.0.1:{port}/v1/ws"
        await page.goto(f"{page_url}?{urlencode({'ws': ws_url, 'pattern': PATTERN})}")
        status, items = page.locator("p"), page.locator("ul > li")
        # A first visit follows live messages, after the offset the reply gives.
        following = re.compile(r"following topic:news\.# after \d+")
        await expect(status).to_have_text(following, timeout=WAIT_MS)

        # Live: the matching messages show, the others do not.
        expected: list[tuple[int, str, Any]] = []
        for n, topic in enumerate(["news.eu", "sports.eu", "news", "news.eu.paris"]):
            offset = await publish(http, publisher.url, topic, {"n": n})
            if topic.startswith("news"):
                expected.append((offset, topic, {"n": n}))
        await expect(items).to_have_count(len(expected), timeout=WAIT_MS)
        assert await shown(page) == expected

        # A publisher at a steady pace while the followed process is killed and started again.
        stop = asyncio.Event()

        async def publish_steadily() -> None:
            n = 100
            while not stop.is_set() and n < 2100:  # about 50 a second: bounded in time and count
                topic = "sports.eu" if n % 4 == 0 else f"news.{n % 3}"
                offset = await publish(http, publisher.url, topic, {"n": n})
                if topic.startswith("news"):
                    expected.append((offset, topic, {"n": n}))
                n += 1
                await asyncio.sleep(0.02)

        publishing = asyncio.create_task(publish_steadily())
        try:
            before = len(expected)
            await at_least(page, before + 5)
            followed.kill()  # SIGKILL: no close frame, the page sees the connection drop
            killed_at = len(expected)
            await expect(status).to_have_text("disconnected; reconnecting", timeout=WAIT_MS)
            since = (await shown(page))[-1][0]  # nothing more comes until it is back
            restarted = ServeProcess(rabbit.url, prefix, {"AIOQUEUE_HTTP__PORT": str(port)})
            servers.append(restarted)
            await asyncio.to_thread(restarted.start, tmp_path)
            # Published while no process listened on the port: only a catch-up can bring them.
            while_away = len(expected) - killed_at
            await expect(status).to_have_text(
                f"following topic:news.# after {since}", timeout=WAIT_MS
            )
            assert while_away >= 5, f"only {while_away} messages were published while it was away"
            await at_least(page, len(expected) + 10)  # and live ones after the catch-up
        finally:
            stop.set()
            async with asyncio.timeout(10):
                await publishing
        with contextlib.suppress(PlaywrightTimeoutError):  # a shortfall shows in the diff below
            await at_least(page, len(expected))
        page_messages = await shown(page)
        assert page_messages == expected  # every one, once, in the order published
        assert [o for o, *_ in page_messages] == sorted({o for o, *_ in page_messages})
        assert errors == []
        print(
            f"\nthe page showed {len(expected)} messages once each, in order; {while_away} of them"
            f" were published while its process was down, and came in its catch-up after {since}"
        )

        # A reload resumes after the last message shown (localStorage): only newer ones show.
        last = expected[-1][0]
        await page.reload()
        await expect(status).to_have_text(f"following topic:news.# after {last}", timeout=WAIT_MS)
        offset = await publish(http, publisher.url, "news.after.reload", {"n": -1})
        await expect(items).to_have_count(1, timeout=WAIT_MS)
        assert await shown(page) == [(offset, "news.after.reload", {"n": -1})]
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.kill()


async def test_a_page_opened_from_a_file_is_refused_by_the_origin_check(
    prefix: str, tmp_path: Path, browser: Browser
) -> None:
    """As the README says: a file:// page sends `Origin: null`, which the websocket refuses."""
    server = ServeProcess("memory://", prefix)
    try:
        await asyncio.to_thread(server.start, tmp_path)
        page = await browser.new_page()
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_console(message: ConsoleMessage) -> None:
            if "403" in message.text and not refused.done():
                refused.set_result(message.text)

        page.on("console", on_console)
        ws_url = server.url.replace("http://", "ws://") + "/v1/ws"
        await page.goto(f"{PAGE.as_uri()}?{urlencode({'ws': ws_url})}")
        async with asyncio.timeout(WAIT_MS / 1000):
            text = await refused
        assert "handshake" in text, text
        assert "following" not in (await page.locator("p").text_content() or "")
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
