"""The dashboard's files as served (in-process, memory://): media types, the security and cache
headers, `[dashboard] path` and `enabled`; and the hub's `jobs:*` channel, whose frames are made
once for every subscriber and whose progress coalesces per job. The page itself, in a browser:
tests/e2e/test_dashboard.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from aioqueue import Settings
from aioqueue.config import DashboardSettings, load
from aioqueue.errors import ConfigError
from aioqueue.jobs import Job
from aioqueue.web.hub import ALL_JOBS, Hub
from tests.apps import app as served_app
from tests.support import serve_in_process

Client = TestClient[web.Request, web.Application]
Factory = Callable[[web.Application], Awaitable[Client]]


async def served(aiohttp_client: Factory, **dashboard: Any) -> Client:
    return await serve_in_process(
        aiohttp_client, served_app, Settings(dashboard=DashboardSettings(**dashboard))
    )


async def test_the_page_and_its_files_come_with_their_types_and_a_strict_policy(
    aiohttp_client: Factory,
) -> None:
    client = await served(aiohttp_client)
    for path, media in [
        ("/dashboard", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ]:
        response = await client.get(path)
        assert (response.status, response.content_type) == (200, media), path
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert "unsafe-inline" not in policy
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-cache"
        # Unchanged since the browser's copy: 304, and no body.
        again = await client.get(path, headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304 and await again.read() == b""
    page = await (await client.get("/dashboard")).text()
    assert '<script src="/dashboard/app.js" defer>' in page
    assert "<script>" not in page and " style=" not in page  # nothing inline: the CSP refuses it
    for missing in ("/dashboard/index.html", "/dashboard/../config.toml", "/dashboard/nope.js"):
        response = await client.get(missing)
        assert response.status == 404, missing


def test_nothing_in_the_page_comes_from_elsewhere() -> None:
    """No CDN: every URL the page's files name is of this service (no scheme, no host)."""
    here = Path(__file__).resolve().parent.parent / "src" / "aioqueue" / "web" / "dashboard"
    for name in ("index.html", "app.js", "style.css"):
        text = (here / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, name
        assert "@import" not in text and "url(" not in text, name


async def test_the_path_is_configurable_and_the_dashboard_can_be_off(
    aiohttp_client: Factory,
) -> None:
    client = await served(aiohttp_client, path="/ops/board")
    response = await client.get("/ops/board")
    assert response.status == 200
    assert '<script src="/ops/board/app.js" defer>' in await response.text()
    assert (await client.get("/ops/board/style.css")).status == 200
    assert (await client.get("/dashboard")).status == 404
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    assert {"/ops/board", "/ops/board/{asset}"} <= set(paths)

    off = await served(aiohttp_client, enabled=False)
    assert (await off.get("/dashboard")).status == 404
    paths = (await (await off.get("/openapi.json")).json())["paths"]
    assert not any(path.startswith("/dashboard") for path in paths)


@pytest.mark.parametrize("path", ["/v1/board", "/v1", "dashboard", "/board/", "/a b", ""])
def test_a_bad_path_is_refused(path: str) -> None:
    with pytest.raises(ConfigError, match=r"dashboard\.path"):
        load(environ={}, overrides={"dashboard.path": path})


class Recorder:
    """A connection that keeps what it is sent (the hub only calls `send`)."""

    def __init__(self) -> None:
        self.subscriptions: set[str] = set()
        self.sent: list[tuple[bytes, str | None]] = []

    def send(self, frame: bytes, coalesce: str | None = None) -> None:
        self.sent.append((frame, coalesce))


def test_jobs_star_gets_every_job_once_serialised_with_its_traceback() -> None:
    hub = Hub(tracebacks=False)  # auth on: job channels' frames carry no traceback
    first, second = Recorder(), Recorder()
    for conn in (first, second):
        hub.subscribe(conn, ALL_JOBS)  # type: ignore[arg-type]
    job, other = make_job("failed"), make_job("other")
    job.error = {"type": "ValueError", "message": "nope", "traceback": "Traceback ..."}
    hub.on_job_change("failed", job)
    hub.on_job_change("progress", other)
    assert [frame for frame, _ in first.sent] == [frame for frame, _ in second.sent]
    assert first.sent[0][0] is second.sent[0][0]  # made once for both
    failed = orjson.loads(first.sent[0][0])
    assert (failed["channel"], failed["event"]) == (ALL_JOBS, "failed")
    assert failed["job"]["error"]["traceback"] == "Traceback ..."  # only admins subscribe
    # Progress coalesces per job (a key of the job's own), the other events never.
    assert [key for _, key in first.sent] == [None, "jobs:*job:other"]


def make_job(job_id: str) -> Job:
    return Job(
        id=job_id, task="t", queue="default", args={}, max_attempts=1, timeout=1, created_at=0
    )


async def test_jobs_star_takes_no_since_and_stops_on_unsubscribe(aiohttp_client: Factory) -> None:
    client = await served(aiohttp_client)
    ws = await client.ws_connect("/v1/ws")
    await ws.send_json({"op": "subscribe", "channel": "jobs:*", "since": 0})
    refused = await ws.receive_json(timeout=5)
    assert (refused["type"], refused["code"]) == ("error", "bad_frame")
    await ws.send_json({"op": "subscribe", "channel": "jobs:*"})
    assert await ws.receive_json(timeout=5) == {"type": "subscribed", "channel": "jobs:*"}
    response = await client.post("/v1/jobs", json={"task": "echo", "args": {"value": 1}})
    job_id = (await response.json())["id"]
    frame = await ws.receive_json(timeout=5)
    assert (frame["channel"], frame["job"]["id"]) == ("jobs:*", job_id)
    await ws.send_json({"op": "unsubscribe", "channel": "jobs:*"})
    # Events of the job may still come before the reply; none after it.
    while (frame := await ws.receive_json(timeout=5))["type"] == "job":
        pass
    assert frame == {"type": "unsubscribed", "channel": "jobs:*"}
    second = await client.post("/v1/jobs", json={"task": "echo", "args": {"value": 2}})
    # Once it finished, its every event was handed to the hub: a frame would precede the pong.
    done = await client.get(f"/v1/jobs/{(await second.json())['id']}", params={"wait": "5"})
    assert (await done.json())["status"] == "succeeded"
    await ws.send_json({"op": "ping"})
    assert await ws.receive_json(timeout=5) == {"type": "pong"}  # and no job frame before it
    await ws.close()
