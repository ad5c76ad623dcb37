"""Dead letters, managed: listing by error type and time, retry and purge of all that match, the
dead-letter queue's bound, and `GET /v1/queues`; on both brokers, in-process (the HTTP API) and
through the CLI against a served process."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jsonschema_rs
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from aioqueue import App, Context, Settings
from aioqueue.config import BrokerSettings, DeadSettings, JobsSettings, StoreSettings
from aioqueue.events import JobSpec
from aioqueue.jobs import Job, rfc3339
from aioqueue.queues import WINDOW, Rates
from aioqueue.service import Service
from aioqueue.web.app import create_app
from aioqueue.web.state import STATE
from tests.support import (
    ROOT,
    ServeProcess,
    client_ready,
    eventually,
    submit,
    wait_ready,
    wait_terminal,
)

Client = TestClient[web.Request, web.Application]
T = TypeVar("T")
JSON = {"Content-Type": "application/json"}
#: Keys of the jobs of `flaky` that run to success from now on.
HEALED: set[str] = set()
#: What `hold` jobs wait for (an event of the running test's loop: `make_app` makes it).
RELEASE = asyncio.Event()


def make_app() -> App:
    global RELEASE
    RELEASE = asyncio.Event()
    app = App()

    @app.task(max_attempts=1)
    async def fail(kind: str = "value") -> None:
        raise {"value": ValueError, "key": KeyError}[kind](kind)

    @app.task(max_attempts=1)
    async def flaky(key: str) -> str:
        if key not in HEALED:
            raise RuntimeError(f"{key} is not healed")
        return key

    @app.task(queue="slow", timeout=30)
    async def hold(ctx: Context) -> None:
        await RELEASE.wait()

    return app


def settings(broker_url: str, prefix: str, store: Path, **dead: int) -> Settings:
    return Settings(
        broker=BrokerSettings(url=broker_url, prefix=prefix, confirm_timeout=3.0, prefetch=1),
        jobs=JobsSettings(shutdown_grace=0.2),
        store=StoreSettings(dir=str(store)),
        dead=DeadSettings(**dead),
    )


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], prefix: str, tmp_path: Path
) -> Callable[..., Awaitable[Client]]:
    """A factory: the app served on a broker, once /readyz says so."""

    async def start(broker_url: str, **dead: int) -> Client:
        HEALED.clear()
        client = await aiohttp_client(
            create_app(make_app(), settings(broker_url, prefix, tmp_path, **dead))
        )
        await client_ready(client)
        return client

    return start


@pytest.fixture
async def client(serve: Callable[..., Awaitable[Client]], broker_url: str) -> Client:
    return await serve(broker_url)


def service_of(client: Client) -> Service:
    service = client.app[STATE].service
    assert service is not None
    return service


async def dead_jobs(client: Client, *bodies: dict[str, Any]) -> list[str]:
    """Submit each job and wait for it to be failed; their ids."""
    ids = []
    for body in bodies:
        response = await client.post("/v1/jobs", data=orjson.dumps(body), headers=JSON)
        assert response.status == 202, await response.text()
        ids.append((await response.json())["id"])
    for job_id in ids:
        response = await client.get(f"/v1/jobs/{job_id}", params={"wait": "10"})
        assert (await response.json())["status"] == "failed"
    return ids


async def post(client: Client, path: str, body: Any, status: int = 200) -> Any:
    response = await client.post(path, data=orjson.dumps(body), headers=JSON)
    assert response.status == status, await response.text()
    return await response.json()


async def dlq_ids(service: Service) -> list[str]:
    """The job ids of the dead-letter queue's messages, in order, read without taking them."""
    broker: Any = service.broker
    if hasattr(broker, "dead_letters"):
        return [orjson.loads(body)["id"] for body, _ in broker.dead_letters]
    import aio_pika

    connection = await aio_pika.connect(service.settings.broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(broker.names["dlq"], passive=True)
        ids = []
        while (message := await queue.get(fail=False, no_ack=False)) is not None:
            ids.append(orjson.loads(message.body)["id"])
        return ids  # the channel closes unacked: the messages stay in the queue


async def ids_listed(client: Client, **query: str) -> list[str]:
    response = await client.get("/v1/jobs", params=query)
    assert response.status == 200, await response.text()
    return [job["id"] for job in (await response.json())["jobs"]]


@pytest.mark.timeout(30)
async def test_purge_takes_the_matching_jobs_out_of_the_state_and_the_queue(
    client: Client,
) -> None:
    service = service_of(client)
    values = await dead_jobs(client, *[{"task": "fail", "args": {"kind": "value"}}] * 3)
    keys = await dead_jobs(client, *[{"task": "fail", "args": {"kind": "key"}}] * 2)
    assert sorted(await dlq_ids(service)) == sorted(values + keys)
    assert await post(client, "/v1/dead/purge", {"error_type": "ValueError", "dry_run": True}) == {
        "count": 3
    }
    assert sorted(await dlq_ids(service)) == sorted(values + keys)  # a dry run changes nothing

    purged = await post(client, "/v1/dead/purge", {"error_type": "ValueError"})
    assert purged == {"count": 3, "removed": 3}
    for job_id in values:
        assert (await client.get(f"/v1/jobs/{job_id}")).status == 404
    assert sorted(await dlq_ids(service)) == sorted(keys)
    assert sorted(await ids_listed(client, status="failed,dead")) == sorted(keys)

    assert await post(client, "/v1/dead/purge", {"all": True}) == {"count": 2, "removed": 2}
    assert await dlq_ids(service) == []
    assert await ids_listed(client, status="failed,dead") == []
    assert await post(client, "/v1/dead/purge", {"all": True}) == {"count": 0, "removed": 0}


@pytest.mark.timeout(30)
async def test_retry_all_that_match_runs_them_again_and_leaves_the_others(client: Client) -> None:
    flaky = await dead_jobs(client, *[{"task": "flaky", "args": {"key": k}} for k in "abcd"])
    [other] = await dead_jobs(client, {"task": "fail"})
    HEALED.update("abcd")
    body = {"task": "flaky", "error_type": "RuntimeError"}
    assert await post(client, "/v1/dead/retry", {**body, "dry_run": True}) == {"count": 4}
    assert await post(client, "/v1/dead/retry", body) == {"count": 4, "left": 0}
    for job_id in flaky:
        response = await client.get(f"/v1/jobs/{job_id}", params={"wait": "10"})
        job = await response.json()
        assert (job["status"], job["attempt"]) == ("succeeded", 1)
    assert await ids_listed(client, status="failed,dead") == [other]
    assert await post(client, "/v1/dead/retry", body) == {"count": 0, "left": 0}


@pytest.mark.timeout(30)
async def test_retry_all_with_a_time_bound_takes_only_the_earlier_ones(client: Client) -> None:
    early = await dead_jobs(client, {"task": "flaky", "args": {"key": "early"}})
    await asyncio.sleep(0.05)
    middle = time.time()
    await asyncio.sleep(0.05)
    late = await dead_jobs(client, {"task": "flaky", "args": {"key": "late"}})
    before = rfc3339(middle)
    assert before is not None
    assert await ids_listed(client, finished_before=before) == early
    assert await ids_listed(client, finished_after=before, error_type="RuntimeError") == late
    assert await ids_listed(client, error_type="ValueError") == []
    HEALED.add("early")
    assert await post(client, "/v1/dead/retry", {"before": before}) == {"count": 1, "left": 0}
    response = await client.get(f"/v1/jobs/{early[0]}", params={"wait": "10"})
    assert (await response.json())["status"] == "succeeded"
    assert await ids_listed(client, status="failed") == late


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({}, "all", id="empty"),
        pytest.param({"all": False}, "all", id="all-false"),
        pytest.param({"dry_run": True}, "all", id="only-dry-run"),
        pytest.param({"task": None}, "task", id="task-null"),
        pytest.param({"task": ""}, "task", id="task-empty"),
        pytest.param({"error_type": 3}, "error_type", id="error-type-number"),
        pytest.param({"before": "yesterday"}, "before", id="before-not-a-time"),
        pytest.param({"before": "2026-12-01T00:00:00"}, "before", id="before-no-zone"),
        pytest.param({"all": "yes"}, "all", id="all-string"),
        pytest.param({"task": "fail", "dry_run": 1}, "dry_run", id="dry-run-number"),
        pytest.param({"task": "fail", "queue": "default"}, "queue", id="unknown-field"),
        pytest.param([], "body", id="array"),
    ],
)
@pytest.mark.parametrize("action", ["retry", "purge"])
async def test_a_filter_must_name_something_and_be_well_formed(
    serve: Callable[..., Awaitable[Client]], action: str, body: Any, field: str
) -> None:
    """An empty filter would act on every dead letter: that takes `"all": true`."""
    client = await serve("memory://")
    await dead_jobs(client, {"task": "fail"})
    problem = await post(client, f"/v1/dead/{action}", body, status=400)
    assert field in [error["field"] for error in problem["errors"]], problem
    assert await post(client, f"/v1/dead/{action}", {"all": True, "dry_run": True}) == {"count": 1}


async def test_a_bad_time_in_a_listing_is_a_400(serve: Callable[..., Awaitable[Client]]) -> None:
    client = await serve("memory://")
    response = await client.get("/v1/jobs", params={"finished_before": "now"})
    assert response.status == 400
    assert [e["field"] for e in (await response.json())["errors"]] == ["finished_before"]


@pytest.mark.timeout(30)
async def test_the_dead_letter_queue_keeps_its_bound_in_length_and_age(
    serve: Callable[..., Awaitable[Client]], broker_url: str
) -> None:
    """At `max_length` the oldest go first; a sweep at the bound keeps the others in order; each
    goes `max_age_seconds` after it was first kept, a sweep's copy included."""
    client = await serve(broker_url, max_length=3, max_age_seconds=2)
    service = service_of(client)
    broker = service.broker
    first_kept = time.monotonic()
    for n in range(5):
        await broker.dead_letter(spec(f"job{n}").encode(), "failed")
    assert await broker.dead_letter_count() == 3
    assert await dlq_ids(service) == ["job2", "job3", "job4"]
    await asyncio.sleep(1.0)
    assert await broker.drop_dead_letters(lambda body: b'"job3"' in body) == 1
    assert await dlq_ids(service) == ["job2", "job4"]

    # Gone 2 s after they were first kept, not 2 s after the sweep.
    await poll(broker.dead_letter_count, lambda n: n == 0, first_kept + 2.9 - time.monotonic())
    assert time.monotonic() - first_kept >= 2.0  # and not before their time either


async def poll(fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], deadline: float) -> T:
    """Fetch every 50 ms until `done(value)`; TimeoutError at the deadline (in seconds)."""
    async with asyncio.timeout(deadline):
        while not done(value := await fetch()):  # noqa: ASYNC110 - polls the broker and the API
            await asyncio.sleep(0.05)
    return value


def spec(job_id: str) -> JobSpec:
    return JobSpec(job_id, "fail", "default", {}, max_attempts=1, timeout=1.0, created_at=1.0)


@pytest.mark.timeout(40)
async def test_queues_report_depth_per_band_consumers_rates_the_oldest_job_and_dead_letters(
    client: Client,
) -> None:
    """prefetch = 1: one `hold` job runs and holds the slow queue's only slot; of the others,
    each band's consumer holds one (waiting for the slot), and the rest are in the broker."""
    await dead_jobs(client, {"task": "fail"}, {"task": "fail"})
    submitted_at = time.time()
    for priority in (0, 0, 0, 0, 8, 8):
        body = {"task": "hold", "priority": priority}
        await post(client, "/v1/jobs", body, status=202)

    async def slow() -> dict[str, Any]:
        report = await (await client.get("/v1/queues")).json()
        return dict(next(queue for queue in report["queues"] if queue["name"] == "slow"))

    # RabbitMQ's prefetch is per band (each band's consumer holds one p8 job too); memory://'s
    # one consumer per queue holds the running job only.
    held = 1 if service_of(client).broker.durable else 0
    expected_bands = {
        "0-3": {"depth": 3, "consumers": 1},
        "4-6": {"depth": 0, "consumers": 1},
        "7-9": {"depth": 2 - held, "consumers": 1},
    }
    queue = await poll(slow, lambda found: found["bands"] == expected_bands, 10)
    assert (queue["depth"], queue["consumers"], queue["running"], queue["dead"]) == (
        5 - held,
        1,
        1,
        0,
    )
    assert 0 < queue["oldest_age_s"] <= time.time() - submitted_at + 1
    assert (
        queue["in_per_s"] > 0 and queue["out_per_s"] > 0 and queue["out_per_s"] < queue["in_per_s"]
    )
    report = await (await client.get("/v1/queues")).json()
    default = {queue["name"]: queue for queue in report["queues"]}["default"]
    assert (default["depth"], default["running"], default["dead"]) == (0, 0, 2)
    assert default["oldest_age_s"] is None
    assert report["dead_letter_queue"] == {
        "messages": 2,
        "max_length": 10_000,
        "max_age_seconds": 7 * 86400,
    }
    RELEASE.set()
    queue = await poll(slow, lambda found: not (found["running"] or found["depth"]), 10)
    assert queue["oldest_age_s"] is None


def test_rates_count_each_queue_and_direction_over_a_sliding_minute() -> None:
    now = [1000.0]
    rates = Rates(clock=lambda: now[0])
    rates.start()
    job = Job.from_spec(spec("j").replace(queue="q"))
    for event in ("queued", "scheduled", "retrying", "started", "progress", "succeeded"):
        rates.on_change(event, job)
    now[0] += 0.5
    assert rates.per_second("q", "in") == 3.0  # over a second at least
    assert rates.per_second("q", "out") == 1.0 and rates.per_second("other", "in") == 0.0
    now[0] = 1030.0
    rates.on_change("queued", job)
    assert rates.per_second("q", "in") == 4 / 30  # since start, under a minute
    now[0] = 1000.0 + WINDOW + 1
    assert rates.per_second("q", "in") == 1 / WINDOW  # the first second's have left the window
    now[0] = 1030.0 + WINDOW + 1
    assert rates.per_second("q", "in") == 0.0


async def test_responses_are_the_ones_described(serve: Callable[..., Awaitable[Client]]) -> None:
    client = await serve("memory://")
    await dead_jobs(client, {"task": "fail"})
    document = await (await client.get("/openapi.json")).json()

    def validator(name: str) -> Any:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        return jsonschema_rs.Draft202012Validator(schema)

    filters = validator("DeadFilter")
    assert filters.is_valid({"all": True}) and filters.is_valid({"task": "x", "all": False})
    assert not filters.is_valid({}) and not filters.is_valid({"all": False})
    assert not filters.is_valid({"task": None})
    assert validator("QueueList").is_valid(await (await client.get("/v1/queues")).json())
    retried = await post(client, "/v1/dead/retry", {"task": "fail"})
    assert validator("DeadRetried").is_valid(retried) and retried["count"] == 1
    purged = await post(client, "/v1/dead/purge", {"all": True})
    assert validator("DeadPurged").is_valid(purged) and purged["count"] == 1
    params = {p["name"] for p in document["paths"]["/v1/jobs"]["get"]["parameters"]}
    assert {"error_type", "finished_after", "finished_before"} <= params


# On RabbitMQ: every process, and a dead-letter queue of an earlier version ------------------


@pytest.fixture
async def services(amqp_url: str, prefix: str, tmp_path: Path) -> AsyncIterator[list[Service]]:
    """Two services on one RabbitMQ log, each with its own job store (two processes' worth)."""
    HEALED.clear()
    started: list[Service] = []
    for name in ("a", "b"):
        service = Service(make_app(), settings(amqp_url, prefix, tmp_path / name))
        async with asyncio.timeout(30):
            await service.start()
        started.append(service)
    yield started
    for service in started:
        await service.close()


async def failed_jobs(service: Service, *bodies: dict[str, Any]) -> list[str]:
    jobs = [await service.jobs.submit(body) for body in bodies]
    for job in jobs:
        await service.store.wait_terminal(job.id, 10)
        assert service.store.get(job.id).status == "failed"  # type: ignore[union-attr]
    return [job.id for job in jobs]


@pytest.mark.amqp
@pytest.mark.timeout(40)
async def test_a_purge_is_applied_by_every_process_and_loses_to_a_retry_before_it(
    services: list[Service],
) -> None:
    first, second = services
    from aioqueue.deadletters import DeadFilter

    purged = await failed_jobs(first, *[{"task": "fail", "args": {"kind": "value"}}] * 3)
    [kept] = await failed_jobs(first, {"task": "fail", "args": {"kind": "key"}})
    await eventually(lambda: all(second.store.get(i) is not None for i in [*purged, kept]), 10)
    counted = await second.queue_stats.report()
    assert {q["name"]: q["dead"] for q in counted["queues"]}["default"] == 4
    assert counted["dead_letter_queue"]["messages"] == 4
    # The second process purges, the first forgets: a `purged` event each, through the log.
    assert await second.dead_letters.purge(DeadFilter(error_type="ValueError")) == (3, 3)
    await eventually(lambda: all(first.store.get(i) is None for i in purged), 10)
    assert first.store.get(kept) is not None and await dlq_ids(first) == [kept]
    assert len(first.store) == len(second.store) == 1

    # A retry written to the log before a purge of the same job wins in every store.
    HEALED.clear()
    [flaky] = await failed_jobs(first, {"task": "flaky", "args": {"key": "x"}})
    await eventually(lambda: second.store.get(flaky) is not None, 10)
    job = second.store.get(flaky)
    assert job is not None
    await first.jobs.retry(flaky)  # its `retried` event is in the log before the purge's
    from aioqueue.events import Purged

    await second.log.append(Purged(flaky, job.run))
    await first.log.barrier()  # the purge is applied in both stores now
    for service in services:
        assert service.store.get(flaky) is not None


@pytest.mark.amqp
@pytest.mark.timeout(40)
async def test_an_unbounded_dead_letter_queue_of_an_earlier_version_is_kept_and_swept(
    amqp_url: str, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import aio_pika

    from aioqueue.broker.amqp import _quorum

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(f"{prefix}.dlq", durable=True, arguments=_quorum())
    service = Service(make_app(), settings(amqp_url, prefix, tmp_path, max_length=1))
    caplog.set_level(logging.WARNING, logger="aioqueue.broker.amqp")
    async with asyncio.timeout(30):
        await service.start()
    try:
        assert "keeps the arguments it was declared with" in caplog.text
        ids = await failed_jobs(service, *[{"task": "fail"}] * 2)
        assert sorted(await dlq_ids(service)) == sorted(ids)  # unbounded: both kept
        from aioqueue.deadletters import DeadFilter

        assert await service.dead_letters.purge(DeadFilter(task="fail")) == (2, 2)
        assert await dlq_ids(service) == []
    finally:
        await service.close()


# The CLI, against `aioqueue serve` ----------------------------------------------------------


def cli(url: str, *args: str, answer: str = "") -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "aioqueue", *args, "--url", url],
        cwd=ROOT,
        input=answer,
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


@pytest.mark.timeout(40)
async def test_the_cli_lists_queues_and_dead_letters_and_retries_and_purges_on_confirmation(
    prefix: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = ServeProcess("memory://", prefix).start(tmp_path)
    try:
        await wait_ready(http, server.url)
        url = server.url
        ids = [
            (await submit(http, url, body))["id"]
            for body in [{"task": "always_fail", "max_attempts": 1}] * 2
            + [{"task": "big_result", "args": {"size": 2**21}}]
        ]
        for job_id in ids:
            assert (await wait_terminal(http, url, job_id))["status"] == "failed"
        await asyncio.to_thread(check_cli, url, ids)
    finally:
        server.stop()


def check_cli(url: str, ids: list[str]) -> None:
    failing, big = ids[:2], ids[2]
    queues = cli(url, "queues")
    assert queues.returncode == 0, queues.stderr
    header, *rows, last = queues.stdout.splitlines()
    assert header.split() == [
        "QUEUE",
        "DEPTH",
        "0-3",
        "4-6",
        "7-9",
        "CONSUMERS",
        "RUNNING",
        "IN/S",
        "OUT/S",
        "OLDEST",
        "DEAD",
    ]
    default = next(row.split() for row in rows if row.startswith("default "))
    assert default[:7] == ["default", "0", "0", "0", "0", "1", "0"] and default[9:] == ["-", "3"]
    assert last.startswith("dead-letter queue: 3 messages")

    dead = cli(url, "dead", "--task", "always_fail")
    assert dead.returncode == 0, dead.stderr
    lines = dead.stdout.splitlines()
    assert lines[0].split() == ["ID", "TASK", "STATUS", "ERROR", "FINISHED", "MESSAGE"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(failing)
    assert all(line.split()[1:4] == ["always_fail", "failed", "RuntimeError"] for line in lines[1:])

    no = cli(url, "purge", "--task", "always_fail", answer="n\n")
    assert no.returncode == 1 and "purge 2 dead letters (task always_fail)? [y/N]" in no.stderr
    assert len(cli(url, "dead").stdout.splitlines()) == 4  # the header and three, all still there

    yes = cli(url, "purge", "--task", "always_fail", answer="y\n")
    assert yes.returncode == 0, yes.stderr
    assert "purged 2 dead letters (task always_fail); 2 messages taken out" in yes.stdout
    assert [line.split()[0] for line in cli(url, "dead").stdout.splitlines()[1:]] == [big]

    retried = cli(url, "retry", "--all", "--error-type", "ResultTooLarge", "--yes")
    assert retried.returncode == 0, retried.stderr
    assert "retried 1 dead letters (error_type ResultTooLarge)" in retried.stdout
    assert "[y/N]" not in retried.stderr
    deadline = time.monotonic() + 10  # it runs again, and fails again
    while big not in cli(url, "dead", "--error-type", "ResultTooLarge").stdout:
        assert time.monotonic() < deadline, "the retried job did not fail again in time"
    one = cli(url, "retry", big)  # one job, as before
    assert one.returncode == 0 and orjson.loads(one.stdout)["status"] == "queued", one.stderr
    nothing = cli(url, "purge", "--task", "nosuch")
    assert (nothing.returncode, nothing.stdout.strip()) == (
        0,
        "no dead letters (task nosuch) to purge",
    )

    for usage in (["purge"], ["retry"], ["retry", big, "--all"]):
        wrong = cli(url, *usage)
        assert wrong.returncode == 2 and "usage:" in wrong.stderr, usage


def test_a_filter_matches_what_the_store_selects() -> None:
    """`DeadFilter.matches` (what a sweep drops) and the store's query (what a purge forgets)
    agree, field by field."""
    from aioqueue.deadletters import DeadFilter
    from aioqueue.events import Failed, Started
    from aioqueue.store import JobStore

    store = JobStore(60)
    for n, (task, error, at) in enumerate(
        [("a", "E", 10.0), ("a", "F", 20.0), ("b", "E", 30.0), ("b", "F", 40.0)]
    ):
        store.create(spec(f"j{n}").replace(task=task))
        store.apply(Started(f"j{n}", 1, at))
        store.apply(Failed(f"j{n}", 1, {"type": error, "message": "m"}, at))
    store.create(spec("running").replace(task="a"))
    for flt in [
        DeadFilter(task="a"),
        DeadFilter(error_type="E"),
        DeadFilter(before=30.0),
        DeadFilter(task="b", error_type="F", before=40.5),
        DeadFilter(all=True),
    ]:
        selected = {job_id for _, job_id in store.oldest_first(flt.jobs, -1, store.next_seq, 100)}
        matched = {job.id for job in store.list(limit=100)[0] if flt.jobs.matches(job)}
        assert selected == matched and selected, flt
        assert store.count(flt.jobs) == len(selected)
