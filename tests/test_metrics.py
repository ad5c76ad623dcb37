"""`GET /metrics` (issue 10): parsed with prometheus-client's own parser, every family checked to
move when the thing it counts happens, on both brokers where the figure comes from the broker.

Served in-process with one slot per queue (`broker.prefetch = 1`), so that jobs can be held
in their queue on purpose. Each test waits with a deadline (`eventually`, `settled`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from aioqueue import App, Context, Settings, SyncContext, gauges
from aioqueue.broker.base import Inspection
from aioqueue.config import (
    AuthSettings,
    BrokerSettings,
    JobsSettings,
    MetricsSettings,
    StoreSettings,
    WsSettings,
)
from aioqueue.events import JobSpec
from aioqueue.jobs import Job, JobStatus
from aioqueue.metrics import Metrics, waited
from aioqueue.service import Service
from aioqueue.web.app import create_app
from aioqueue.web.state import STATE
from tests.rabbitmq import RabbitNode
from tests.support import client_ready

Client = TestClient[web.Request, web.Application]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
JSON = {"Content-Type": "application/json"}
DEADLINE = 15.0

#: Every family /metrics serves, with its type: the README's list.
FAMILIES = {
    "aioqueue_jobs_submitted": "counter",
    "aioqueue_jobs_started": "counter",
    "aioqueue_jobs_finished": "counter",
    "aioqueue_job_retries": "counter",
    "aioqueue_jobs_dead_lettered": "counter",
    "aioqueue_job_run_seconds": "histogram",
    "aioqueue_job_wait_seconds": "histogram",
    "aioqueue_queue_depth": "gauge",
    "aioqueue_queue_consumers": "gauge",
    "aioqueue_dead_letter_queue_messages": "gauge",
    "aioqueue_stuck_threads": "gauge",
    "aioqueue_broker_connected": "gauge",
    "aioqueue_broker_reconnects": "counter",
    "aioqueue_broker_confirm_seconds": "histogram",
    "aioqueue_event_log_lag": "gauge",
    "aioqueue_event_log_entries_applied": "counter",
    "aioqueue_checkpoint_age_seconds": "gauge",
    "aioqueue_ws_connections": "gauge",
    "aioqueue_ws_subscriptions": "gauge",
    "aioqueue_ws_frames_sent": "counter",
    "aioqueue_ws_frames_coalesced": "counter",
    "aioqueue_ws_frames_dropped": "counter",
    "aioqueue_ws_slow_closes": "counter",
    "aioqueue_http_requests": "counter",
}


class Gates:
    """What the test's tasks wait for, set by the test."""

    def __init__(self) -> None:
        self.hold = asyncio.Event()
        self.report = asyncio.Event()
        self.unstick = threading.Event()

    def release(self) -> None:
        self.hold.set()
        self.report.set()
        self.unstick.set()


def make_app(gates: Gates) -> App:
    app = App()

    @app.task
    async def add(a: int, b: int = 0) -> int:
        return a + b

    @app.task(max_attempts=2, retry_backoff=0.0)
    async def broken() -> None:
        raise ValueError("nope")

    @app.task(timeout=20.0)
    async def hold() -> str:
        await gates.hold.wait()
        return "released"

    @app.task(timeout=20.0)
    async def report(ctx: Context, steps: int) -> int:
        await gates.report.wait()
        for step in range(steps):
            await ctx.progress(step / steps, f"step {step}")
        return steps

    @app.task(queue="sync", timeout=0.2, max_attempts=1)
    def stuck(ctx: SyncContext) -> None:
        """Runs on past its timeout, until the test releases it (10 s at most)."""
        gates.unstick.wait(10.0)

    return app


Serve = Callable[..., Awaitable[Client]]


@pytest.fixture
async def gates() -> AsyncIterator[Gates]:
    made = Gates()
    yield made
    made.release()  # no task or thread outlives a failed test


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    prefix: str,
    tmp_path: Path,
    gates: Gates,
) -> Serve:
    """A factory: the test app served on a broker, once /readyz says so."""

    async def start(broker_url: str = "memory://", **sections: Any) -> Client:
        settings = Settings(
            broker=BrokerSettings(url=broker_url, prefix=prefix, confirm_timeout=3.0, prefetch=1),
            jobs=JobsSettings(shutdown_grace=0.2),
            store=StoreSettings(dir=str(tmp_path)),
            **sections,
        )
        client = await aiohttp_client(create_app(make_app(gates), settings))
        await client_ready(client)
        return client

    return start


@pytest.fixture(autouse=True)
def fresh_inspections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scrape asks the broker (the 2 s cache has a test of its own)."""
    monkeypatch.setattr(gauges, "MAX_AGE", 0.0)


async def scrape(client: Client, **headers: str) -> Samples:
    response = await client.get("/metrics", headers=headers)
    text = await response.text()
    assert response.status == 200, text
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; KeyError if it is not served."""
    return samples[name, frozenset(labels.items())]


async def settled(client: Client, check: Callable[[Samples], bool]) -> Samples:
    """Scrape until `check` holds (figures counted as the log is applied come a moment later)."""
    deadline = time.monotonic() + DEADLINE
    while not check(samples := await scrape(client)):
        assert time.monotonic() < deadline, f"/metrics never got there; last: {samples}"
        await asyncio.sleep(0.05)
    return samples


async def submit(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post("/v1/jobs", data=orjson.dumps(body), headers=JSON)
    assert response.status == 202, await response.text()
    return dict(await response.json())


async def finished(client: Client, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/jobs/{job_id}", params={"wait": "10"})
    job = dict(await response.json())
    assert job["status"] in ("succeeded", "failed", "dead", "cancelled"), job
    return job


def service_of(client: Client) -> Service:
    service = client.app[STATE].service
    assert service is not None
    return service


# What every process serves -------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_every_family_is_served_and_labels_are_bounded(serve: Serve) -> None:
    client = await serve()
    job = await submit(client, {"task": "add", "args": {"a": 1}})
    await finished(client, job["id"])
    response = await client.get("/metrics")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    assert {name: families[name].type for name in FAMILIES if name in families} == FAMILIES
    labels = {
        key: value
        for family in families.values()
        for sample in family.samples
        for key, value in sample.labels.items()
    }
    assert job["id"] not in set(labels.values())  # no job ids, ever
    tasks = {s.labels["task"] for s in families["aioqueue_jobs_submitted"].samples}
    assert tasks == {"add", "broken", "hold", "report", "stuck", "other"}
    # The application's registry, not prometheus-client's global one: no process_* or python_*.
    assert not [name for name in families if not name.startswith("aioqueue_")]
    # Nor prometheus-client's `_created` series, which 0.0.4 can only show as families apart.
    assert not [name for name in families if name.endswith("_created")]


@pytest.mark.timeout(60)
async def test_a_job_moves_submitted_started_finished_and_both_histograms(
    serve: Serve, broker_url: str
) -> None:
    client = await serve(broker_url)
    before = await scrape(client)
    job = await submit(client, {"task": "add", "args": {"a": 2, "b": 3}})
    assert (await finished(client, job["id"]))["result"] == 5
    after = await settled(
        client,
        lambda s: value(s, "aioqueue_jobs_finished_total", task="add", status="succeeded") == 1,
    )

    def delta(name: str, **labels: str) -> float:
        # A labelled HTTP series appears at its first request: 0 before.
        return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0)

    assert delta("aioqueue_jobs_submitted_total", task="add") == 1
    assert delta("aioqueue_jobs_started_total", task="add") == 1
    assert delta("aioqueue_job_run_seconds_count", task="add") == 1
    assert delta("aioqueue_job_wait_seconds_count", task="add") == 1
    assert 0 < delta("aioqueue_job_run_seconds_sum", task="add") < 5
    for status in ("failed", "dead", "cancelled"):
        assert delta("aioqueue_jobs_finished_total", task="add", status=status) == 0
    assert delta("aioqueue_jobs_submitted_total", task="hold") == 0
    assert value(after, "aioqueue_broker_connected") == 1
    assert delta("aioqueue_event_log_entries_applied_total") >= 2  # queued, then its outcome
    assert value(after, "aioqueue_event_log_lag") == 0  # caught up
    confirms = delta("aioqueue_broker_confirm_seconds_count")
    # RabbitMQ confirmed the submit and the outcome's write; memory:// has no confirms.
    assert confirms >= 2 if broker_url.startswith("amqp") else confirms == 0
    # HTTP, by route template and status: the submit and the long poll.
    route = {"route": "/v1/jobs/{id}", "method": "GET", "status": "200"}
    assert delta("aioqueue_http_requests_total", **route) == 1
    assert delta("aioqueue_http_requests_total", route="/v1/jobs", method="POST", status="202") == 1


@pytest.mark.timeout(60)
async def test_a_failing_job_moves_retries_failed_and_dead_lettered(
    serve: Serve, broker_url: str
) -> None:
    client = await serve(broker_url)
    job = await submit(client, {"task": "broken"})
    assert (await finished(client, job["id"]))["status"] == "failed"
    after = await settled(
        client,
        lambda s: value(s, "aioqueue_jobs_finished_total", task="broken", status="failed") == 1,
    )
    assert value(after, "aioqueue_job_retries_total", task="broken") == 1
    assert value(after, "aioqueue_jobs_started_total", task="broken") == 2  # two attempts
    assert value(after, "aioqueue_job_run_seconds_count", task="broken") == 2
    # The second attempt waited from the end of its back-off: observed too.
    assert value(after, "aioqueue_job_wait_seconds_count", task="broken") == 2
    dead_lettered = {"task": "broken", "reason": "failed"}
    assert value(after, "aioqueue_jobs_dead_lettered_total", **dead_lettered) == 1
    assert value(after, "aioqueue_jobs_finished_total", task="broken", status="succeeded") == 0
    # The dead-letter queue holds its message (RabbitMQ counts it once it is routed there).
    await settled(client, lambda s: value(s, "aioqueue_dead_letter_queue_messages") == 1)


@pytest.mark.timeout(60)
async def test_queue_depth_and_consumers_by_band_a_cancel_and_an_expiry(
    serve: Serve, broker_url: str, gates: Gates
) -> None:
    client = await serve(broker_url)
    held = await submit(client, {"task": "hold"})  # takes the queue's one slot
    await settled(client, lambda s: value(s, "aioqueue_jobs_started_total", task="hold") == 1)
    for priority in (0, 0, 0, 8, 8):
        await submit(client, {"task": "hold", "priority": priority})
    delayed = await submit(client, {"task": "add", "args": {"a": 1}, "delay": 600})
    # Not started within its ttl, behind the holds: dead when a consumer gets to it.
    expiring = await submit(client, {"task": "add", "args": {"a": 2}, "ttl": 0.05, "priority": 1})

    def band(samples: Samples, band: str, name: str = "aioqueue_queue_depth") -> float:
        return value(samples, name, queue="default", band=band)

    # On RabbitMQ each band has a consumer that holds one message while it waits for the slot;
    # memory:// has one consumer for the queue, and the slot's credit is the running job's.
    high = 1 if broker_url.startswith("amqp") else 2
    samples = await settled(client, lambda s: (band(s, "0-3"), band(s, "7-9")) == (4, high))
    assert band(samples, "4-6") == 0  # and the delayed job waits elsewhere, in no band
    for name in ("0-3", "4-6", "7-9"):
        assert band(samples, name, "aioqueue_queue_consumers") == 1
    assert value(samples, "aioqueue_queue_depth", queue="sync", band="0-3") == 0

    cancel = await client.delete(f"/v1/jobs/{delayed['id']}")
    assert cancel.status == 202
    await asyncio.sleep(0.1)  # past the expiring job's ttl
    gates.hold.set()
    assert (await finished(client, held["id"]))["status"] == "succeeded"
    samples = await settled(
        client,
        lambda s: (
            value(s, "aioqueue_jobs_finished_total", task="hold", status="succeeded") == 6
            and band(s, "0-3") + band(s, "7-9") == 0
        ),
    )
    assert value(samples, "aioqueue_jobs_finished_total", task="add", status="cancelled") == 1
    assert (await finished(client, expiring["id"]))["status"] == "dead"
    samples = await settled(
        client, lambda s: value(s, "aioqueue_jobs_finished_total", task="add", status="dead") == 1
    )
    assert value(samples, "aioqueue_jobs_dead_lettered_total", task="add", reason="expired") == 1
    assert value(samples, "aioqueue_jobs_started_total", task="add") == 0  # it never ran


# What this process holds ---------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_stuck_threads_by_queue(serve: Serve, gates: Gates) -> None:
    client = await serve()
    samples = await scrape(client)
    assert value(samples, "aioqueue_stuck_threads", queue="sync") == 0
    job = await submit(client, {"task": "stuck"})
    assert (await finished(client, job["id"]))["status"] == "failed"  # its timeout
    samples = await settled(client, lambda s: value(s, "aioqueue_stuck_threads", queue="sync") == 1)
    assert value(samples, "aioqueue_stuck_threads", queue="default") == 0
    gates.unstick.set()
    await settled(client, lambda s: value(s, "aioqueue_stuck_threads", queue="sync") == 0)


@pytest.mark.timeout(30)
async def test_http_requests_count_route_templates_and_unmatched_paths(serve: Serve) -> None:
    client = await serve()
    for path in ("/v1/jobs/abc", "/v1/jobs/def", "/nowhere/123"):
        await client.get(path)
    await client.put("/v1/jobs")  # 405
    await client.request("PROPFIND", "/v1/jobs")  # WebDAV's: a method, counted as other
    counts = {
        (labels["route"], labels["method"], labels["status"]): count
        for (name, pairs), count in (await scrape(client)).items()
        if name == "aioqueue_http_requests_total"
        for labels in [dict(pairs)]
    }
    assert counts == {
        ("/readyz", "GET", "200"): 1,  # the fixture's
        ("/v1/jobs/{id}", "GET", "404"): 2,  # by template, never the path
        ("unmatched", "GET", "404"): 1,
        ("unmatched", "PUT", "405"): 1,
        ("unmatched", "other", "405"): 1,
    }


@pytest.mark.timeout(30)
async def test_under_mount_only_aioqueues_own_routes_are_counted(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], gates: Gates
) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    web_app = web.Application()
    web_app.router.add_get("/hello", hello)
    app = make_app(gates)
    app.mount(web_app)

    @app.task
    async def late() -> str:
        """Registered after the mount: counted by its name all the same."""
        return "late"

    client = await aiohttp_client(web_app)
    await client.get("/hello")
    await client.get("/missing")
    await client_ready(client, 10)
    job = await submit(client, {"task": "late"})
    await finished(client, job["id"])
    samples = await scrape(client)
    counted = {
        dict(labels)["route"]
        for (name, labels) in samples
        if name == "aioqueue_http_requests_total"
    }
    # Not /hello, nor the 404 of /missing: the application's own. (A scrape is counted once it
    # is answered.)
    assert counted == {"/readyz", "/v1/jobs", "/v1/jobs/{id}"}
    assert value(samples, "aioqueue_jobs_submitted_total", task="late") == 1
    assert value(samples, "aioqueue_jobs_finished_total", task="late", status="succeeded") == 1


# Websockets ----------------------------------------------------------------------------------


def masked_text_frame(payload: bytes) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def slow_websocket(client: Client, *frames: dict[str, Any]) -> socket.socket:
    """A websocket on a plain socket with a 4 KiB receive buffer, that sends `frames` and then
    never reads (tests/faults/test_slow_clients.py has 200 of them)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    host, port = "127.0.0.1", client.server.port
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await loop.sock_recv(sock, 1024)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    for frame in frames:
        await loop.sock_sendall(sock, masked_text_frame(orjson.dumps(frame)))
    return sock


@pytest.mark.timeout(30)
async def test_websockets_connections_subscriptions_and_frames(serve: Serve) -> None:
    client = await serve()
    job = await submit(client, {"task": "add", "args": {"a": 1}})
    async with client.ws_connect("/v1/ws") as ws:
        await ws.send_json({"op": "subscribe", "channel": f"job:{job['id']}"})
        await ws.send_json({"op": "subscribe", "channel": "topic:news.#"})
        for _ in range(3):  # subscribed, the snapshot, subscribed
            await ws.receive_json(timeout=5)
        samples = await scrape(client)
        assert value(samples, "aioqueue_ws_connections") == 1
        assert value(samples, "aioqueue_ws_subscriptions", kind="job") == 1
        assert value(samples, "aioqueue_ws_subscriptions", kind="topic") == 1
        assert value(samples, "aioqueue_ws_frames_sent_total") == 3
        assert (
            value(
                samples, "aioqueue_http_requests_total", route="/v1/ws", method="GET", status="101"
            )
            == 1
        )
    samples = await settled(client, lambda s: value(s, "aioqueue_ws_connections") == 0)
    assert value(samples, "aioqueue_ws_subscriptions", kind="job") == 0
    assert value(samples, "aioqueue_ws_subscriptions", kind="topic") == 0


@pytest.mark.timeout(30)
async def test_a_slow_client_moves_coalesced_dropped_and_slow_closes(
    serve: Serve, gates: Gates
) -> None:
    client = await serve(ws=WsSettings(send_buffer=8))
    service = service_of(client)
    job = await submit(client, {"task": "report", "args": {"steps": 20}})
    subscribe_job = {"op": "subscribe", "channel": f"job:{job['id']}"}
    sock = await slow_websocket(client, subscribe_job, {"op": "subscribe", "channel": "topic:big"})
    try:
        await settled(client, lambda s: value(s, "aioqueue_ws_subscriptions", kind="topic") == 1)
        # Big messages fill the kernel's buffers (128 KiB for the server, 4 KiB for the client)
        # until frames wait in the connection's queue; then progress frames coalesce there.
        big = "x" * 60_000
        for _ in range(6):
            await service.topics.publish("big", big)
        gates.report.set()
        samples = await settled(
            client,
            lambda s: (
                value(s, "aioqueue_jobs_finished_total", task="report", status="succeeded") == 1
            ),
        )
        assert value(samples, "aioqueue_ws_frames_coalesced_total") >= 10
        assert value(samples, "aioqueue_ws_slow_closes_total", reason="send_buffer") == 0
        for _ in range(10):  # past ws.send_buffer: closed with 1013
            await service.topics.publish("big", big)
        samples = await settled(
            client, lambda s: value(s, "aioqueue_ws_slow_closes_total", reason="send_buffer") == 1
        )
        assert value(samples, "aioqueue_ws_frames_dropped_total") >= 1
        assert value(samples, "aioqueue_ws_slow_closes_total", reason="send_timeout") == 0
        await settled(client, lambda s: value(s, "aioqueue_ws_connections") == 0)
    finally:
        sock.close()


# Access ----------------------------------------------------------------------------------------

TOKENS = (
    {"token": "reader-token-0123456789", "principal": "alice", "scopes": ["jobs:read"]},
    {"token": "admin-token-0123456789", "principal": "ops", "scopes": ["jobs:admin"]},
)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("require_admin", "expected"),
    [(False, (200, 200, 200)), (True, (401, 403, 200))],
)
async def test_require_admin_asks_for_jobs_admin(
    serve: Serve, require_admin: bool, expected: tuple[int, int, int]
) -> None:
    client = await serve(
        auth=AuthSettings(mode="token", tokens=TOKENS),
        metrics=MetricsSettings(require_admin=require_admin),
    )
    answers = []
    for token in (None, "reader-token-0123456789", "admin-token-0123456789"):
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        answers.append((await client.get("/metrics", headers=headers)).status)
    assert tuple(answers) == expected
    document = await (await client.get("/openapi.json")).json()
    responses = document["paths"]["/metrics"]["get"]["responses"]
    assert ("401" in responses, "403" in responses) == (require_admin, require_admin)
    if require_admin:
        refused = await client.get("/metrics")
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert refused.content_type == "application/problem+json"


# The broker's figures ------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_scrapes_ask_the_broker_at_most_once_per_max_age(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await serve()
    monkeypatch.setattr(gauges, "MAX_AGE", 30.0)
    service = service_of(client)
    asked = 0
    inspect = service.broker.inspect

    async def counted() -> Inspection:
        nonlocal asked
        asked += 1
        await asyncio.sleep(0.05)  # scrapes that come meanwhile share the answer
        return await inspect()

    monkeypatch.setattr(service.broker, "inspect", counted)
    service.gauges._inspected_at = -30.0  # the fixture's scrapes made it fresh
    await asyncio.gather(*(scrape(client) for _ in range(5)))
    await scrape(client)
    assert asked == 1


@pytest.mark.timeout(30)
async def test_the_lag_is_the_log_head_less_what_was_applied(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await serve()
    service = service_of(client)
    applied = service.store.offset
    assert applied is not None

    async def ahead() -> Inspection:
        return Inspection((), applied + 7)

    monkeypatch.setattr(service.broker, "inspect", ahead)
    assert value(await scrape(client), "aioqueue_event_log_lag") == 7

    async def unknown() -> Inspection:
        return Inspection((), None)

    monkeypatch.setattr(service.broker, "inspect", unknown)
    samples = await scrape(client)
    assert not [name for name, _ in samples if name == "aioqueue_event_log_lag"]


@pytest.mark.amqp
@pytest.mark.timeout(60)
async def test_rabbitmq_reconnects_log_head_and_checkpoint_age(
    serve: Serve, rabbit: RabbitNode, amqp_url: str
) -> None:
    client = await serve(amqp_url)
    service = service_of(client)
    samples = await scrape(client)
    assert value(samples, "aioqueue_broker_reconnects_total") == 0
    assert not [name for name, _ in samples if name == "aioqueue_checkpoint_age_seconds"]
    # On a quiet log the newest chunk is the last entry alone: the head is what was applied.
    await service.log.barrier()
    inspection = await service.broker.inspect()
    assert inspection.log_head == service.store.offset
    job = await submit(client, {"task": "add", "args": {"a": 1}})
    await finished(client, job["id"])
    assert service.checkpointer is not None
    assert await service.checkpointer.write() is not None
    samples = await settled(client, lambda s: ("aioqueue_checkpoint_age_seconds", frozenset()) in s)
    assert 0 <= value(samples, "aioqueue_checkpoint_age_seconds") < 10

    rabbit.close_all_connections()
    await settled(client, lambda s: value(s, "aioqueue_broker_reconnects_total") == 1)
    samples = await settled(client, lambda s: value(s, "aioqueue_broker_connected") == 1)
    assert value(samples, "aioqueue_queue_consumers", queue="default", band="0-3") == 1


# Pure parts --------------------------------------------------------------------------------------


def test_waited_counts_from_when_the_attempt_was_due() -> None:
    spec = JobSpec("j", "add", "default", {}, max_attempts=3, timeout=1.0, created_at=100.0)
    job = Job.from_spec(spec)
    assert waited(job, 103.0) == 3.0
    assert waited(job, 99.0) == 0.0  # another host's clock ahead of ours
    job.scheduled_for = 200.0  # a delay, or a retry's back-off
    job.status = JobStatus.SCHEDULED
    assert waited(job, 201.5) == 1.5
    job.scheduled_for, job.run = None, 1  # run again by POST /retry: no time of that is kept
    job.status = JobStatus.QUEUED
    assert waited(job, 300.0) is None
    job.status, job.run = JobStatus.RUNNING, 0  # a redelivery of an attempt that started
    assert waited(job, 300.0) is None


def test_label_values_are_bounded() -> None:
    metrics = Metrics(["add"])
    assert metrics.task("add") == "add"
    assert metrics.task("someone-elses-task") == "other"
    metrics.dead_lettered("add", "undecodable: unexpected character at line 1")
    metrics.dead_lettered("nope", "some new reason from the broker")
    reasons = {
        (sample.labels["task"], sample.labels["reason"])
        for family in metrics.registry.collect()
        if family.name == "aioqueue_jobs_dead_lettered"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert reasons == {("add", "undecodable"), ("other", "other")}
