"""Issue 9, item 2: what one request can make the service keep is bounded, at each bound.

A result (`jobs.max_result_bytes`: the job fails), a progress message (cut), a page of
`GET /v1/jobs` (`http.max_list_bytes`: `next` goes on), the job store (`store.max_bytes`:
finished jobs go first, then submits get 429), the store's cache of decoded jobs, the memory
broker's dead letters, and a log entry. The issue's own probe, against a served process, is
`tests/e2e/test_size_bounds.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from aioqueue import App, Settings
from aioqueue import service as service_module
from aioqueue import store as store_module
from aioqueue.broker import memory
from aioqueue.client import Client as CliClient
from aioqueue.config import BrokerSettings, HttpSettings, JobsSettings, StoreSettings
from aioqueue.eventlog import MAX_BATCH_BYTES, EventLog
from aioqueue.events import JobSpec, Progress, Rejected, Started, Succeeded
from aioqueue.jobs import Job, JobStatus
from aioqueue.runner import MAX_PROGRESS_MESSAGE, _Hooks, kept_result
from aioqueue.store import LOW_WATER, JobStore
from aioqueue.storefile import StoreFile
from aioqueue.web.app import create_app
from aioqueue.web.handlers import list_body
from aioqueue.web.state import STATE
from tests.support import client_ready
from tests.test_store import Clock, spec

pytestmark = pytest.mark.timeout(30)

Client = TestClient[web.Request, web.Application]
JSON = {"Content-Type": "application/json"}


# A result and a progress message ------------------------------------------------------------


def test_a_result_of_max_result_bytes_is_kept_and_one_byte_more_is_not() -> None:
    kept = kept_result("x" * 98, 100)  # 100 bytes of JSON, with the quotes
    assert orjson.dumps({"result": kept}) == b'{"result":"%s"}' % (b"x" * 98)
    error = kept_result("x" * 99, 100)
    assert isinstance(error, dict) and error["type"] == "ResultTooLarge"
    assert "101 bytes of JSON; at most 100" in error["message"]
    assert "jobs.max_result_bytes" in error["message"] and "traceback" not in error
    assert not isinstance(kept_result({"a": [1, 2]}, 11), dict)
    assert isinstance(kept_result({"a": [1, 2]}, 10), dict)
    not_json = kept_result({1, 2}, 100)
    assert isinstance(not_json, dict) and not_json["type"] == "TypeError"


class AppendedLog:
    """Stands in for the event log: keeps what is appended."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    async def append(self, *events: Any) -> None:
        self.events += events


async def test_a_progress_message_is_cut_past_its_limit_with_a_marker() -> None:
    log = AppendedLog()

    async def unused(*args: Any) -> Any:
        raise AssertionError("not called")

    spec = JobSpec("job1", "t", "q", None, 1, 1.0, 0.0)
    hooks = _Hooks(log, unused, unused, spec)  # type: ignore[arg-type]
    await hooks.progress(0.5, "y" * MAX_PROGRESS_MESSAGE)
    await hooks.progress(0.6, "z" * (MAX_PROGRESS_MESSAGE + 1))
    await hooks.progress(0.7, None)
    kept, cut, none = log.events
    assert isinstance(kept, Progress) and kept.message == "y" * MAX_PROGRESS_MESSAGE
    assert cut.message == "z" * MAX_PROGRESS_MESSAGE + " [... 1 characters cut]"
    assert (none.value, none.message) == (0.7, None)


# A page of GET /v1/jobs ---------------------------------------------------------------------


def jobs_with_cursors(count: int, args_chars: int) -> list[tuple[Job, str | None]]:
    jobs = [Job.from_spec(spec(n).replace(args=["a" * args_chars])) for n in range(count)]
    return [(job, f"c{n}" if n + 1 < count else None) for n, job in enumerate(jobs)]


def test_a_page_takes_the_jobs_that_fit_in_max_list_bytes_exactly() -> None:
    page = jobs_with_cursors(3, 500)
    whole = list_body(page, 10**9)
    two = list_body(page[:2], 10**9)  # its `next` is c1, the cursor after the second job
    assert orjson.loads(whole)["next"] is None and orjson.loads(two)["next"] == "c1"

    assert list_body(page, len(whole)) == whole
    at_two = list_body(page, len(whole) - 1)
    assert at_two == two and len(two) <= len(whole) - 1
    assert list_body(page, len(two)) == two
    one = orjson.loads(list_body(page, len(two) - 1))
    assert [job["id"] for job in one["jobs"]] == ["job0"] and one["next"] == "c0"


def test_a_page_has_one_job_whatever_its_size() -> None:
    page = jobs_with_cursors(2, 5000)
    body = orjson.loads(list_body(page, 1024))
    assert [job["id"] for job in body["jobs"]] == ["job0"] and body["next"] == "c0"
    assert orjson.loads(list_body([], 1024)) == {"jobs": [], "next": None}


def test_a_page_stops_reading_jobs_once_it_is_full() -> None:
    """The jobs after the bound are never read from the store, nor decoded."""
    taken: list[str] = []

    def page() -> Iterator[tuple[Job, str | None]]:
        for job, cursor in jobs_with_cursors(100, 1000):
            taken.append(job.id)
            yield job, cursor

    body = orjson.loads(list_body(page(), 5000))
    assert len(body["jobs"]) == 3 and len(taken) == 4  # the one that did not fit, no more


# The job store --------------------------------------------------------------------------------


def stored_bytes(store: JobStore) -> int:
    row = store._db.execute("SELECT coalesce(sum(length(state)), 0) FROM jobs").fetchone()
    return int(row[0])


def big_spec(n: int, chars: int = 1000) -> JobSpec:
    return spec(n).replace(args=["a" * chars])


def finish(store: JobStore, n: int, at: float) -> None:
    store.apply(Started(f"job{n}", 1, at))
    store.apply(Succeeded(f"job{n}", 1, n, at))


def test_the_store_counts_the_bytes_it_keeps_through_every_change(tmp_path: Path) -> None:
    clock = Clock()
    file = StoreFile.claim(str(tmp_path), "s.sqlite3")
    store = file.open(result_ttl=60)
    store._clock = clock
    for n in range(6):
        store.create(big_spec(n))
    store.write(offset=1)
    assert store.kept_bytes == stored_bytes(store) > 6000
    finish(store, 0, 1000.0)
    finish(store, 1, 1100.0)
    store.apply(Progress("job2", 1, 0.5, "p" * 3000))
    store.write(offset=2)
    assert store.kept_bytes == stored_bytes(store)
    store.apply(Rejected("job5"))  # a written job withdrawn
    store.create(big_spec(6))
    store.apply(Rejected("job6"))  # and one never written
    store.write(offset=3)
    assert store.kept_bytes == stored_bytes(store)
    clock.now = 1070.0
    assert store.expire() == 1
    assert store.kept_bytes == stored_bytes(store)
    kept = store.kept_bytes
    store.close()
    file.release()
    again = StoreFile.claim(str(tmp_path), "s.sqlite3").open(result_ttl=60)
    assert again.kept_bytes == kept == stored_bytes(again)
    # A store written before the count was kept counts itself once, when opened.
    with again._db:
        again._db.execute("DELETE FROM meta WHERE key = 'bytes'")
    again.close()
    assert JobStore(60, again.path).kept_bytes == kept


def test_the_store_is_full_at_max_bytes_not_one_byte_before() -> None:
    store = JobStore(result_ttl=60)
    store.create(big_spec(1))
    store.write()
    store.max_bytes = store.kept_bytes + 1
    assert not store.full()
    store.max_bytes = store.kept_bytes
    assert store.full()
    # A job created since the last write counts as it comes, by its message's size.
    store.max_bytes = store.kept_bytes + 100
    store.create(big_spec(2), size=99)
    assert not store.full()
    store.create(big_spec(3), size=1)
    assert store.full()


async def test_room_is_made_from_the_earliest_finished_jobs_never_from_pending_ones() -> None:
    store = JobStore(result_ttl=3600)
    for n in range(10):
        store.create(big_spec(n))
    for at, n in enumerate((3, 1, 4, 0, 2)):  # finished in this order; 5 to 9 are pending
        finish(store, n, 1000.0 + at)
    store.write()
    one = stored_bytes(store) // 10
    store.max_bytes = store.kept_bytes + 1
    assert not store.full() and await store.make_room() == 0
    store.max_bytes = store.kept_bytes  # full: forget down to LOW_WATER of it, earliest first
    assert await store.make_room() == 1
    assert store.get("job3") is None and store.kept_bytes <= LOW_WATER * store.max_bytes
    assert store.kept_bytes == stored_bytes(store) and len(store) == 9
    store.max_bytes = 3 * one  # less than the pending jobs alone
    assert await store.make_room() == 4
    assert [j.id for j in store.list()[0]] == [f"job{n}" for n in range(9, 4, -1)]
    assert store.full()  # what is left is pending: it stays, and new jobs are refused
    assert await store.make_room() == 0


async def test_room_is_made_past_a_chunk_that_holds_the_job_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job `keep` (one being retried) among the earliest finished: the chunk it is in
    forgets one job fewer, and eviction goes on to the next chunk all the same."""
    monkeypatch.setattr(store_module, "EXPIRE_CHUNK", 3)
    store = JobStore(result_ttl=3600)
    for n in range(10):
        store.create(big_spec(n))
        finish(store, n, 1000.0 + n)  # job0 first
    store.write()
    one = stored_bytes(store) // 10
    store.max_bytes = 4 * one  # to LOW_WATER of it: 7 of the 9 that may go
    assert await store.make_room(keep="job0") == 7
    assert store.get("job0") is not None and not store.full()


def test_the_cache_of_decoded_jobs_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "CACHE_BYTES", 50_000)
    store = JobStore(result_ttl=60)
    for n in range(40):
        store.create(big_spec(n, chars=10_000))
        store.write()
    assert store._cache_bytes <= 50_000 and len(store._cache) <= 5
    for n in range(40):  # reads alone do not grow it either
        job = store.get(f"job{n}")
        assert job is not None and job.args == ["a" * 10_000]
        assert store._cache_bytes <= 50_000 + 11_000
    store.apply(Started("job0", 1, 1000.0))  # a changed job stays cached until written
    store.get("job1")
    store.write()
    assert store.get("job0").status is JobStatus.RUNNING  # type: ignore[union-attr]


async def test_the_memory_brokers_dead_letters_are_bounded_in_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "DEAD_LETTER_BYTES", 10_000)
    broker = memory.MemoryBroker(prefetch=1)
    for n in range(10):
        await broker.dead_letter(str(n).encode() * 3000, "failed")
    assert [body[:1] for body, _ in broker.dead_letters] == [b"7", b"8", b"9"]
    await broker.dead_letter(b"x" * 20_000, "failed")  # the newest is kept, whatever its size
    assert [len(body) for body, _ in broker.dead_letters] == [20_000]


async def test_a_log_entry_is_bounded_in_bytes_but_takes_one_append_whatever_its_size() -> None:
    log = EventLog(memory.MemoryBroker(prefetch=1), JobStore(60), 1.0, 1.0)
    third = "r" * (MAX_BATCH_BYTES // 3)
    for n in range(4):
        log.emit(Succeeded(f"job{n}", 1, third))
    log.emit(Succeeded("huge", 1, "h" * MAX_BATCH_BYTES))
    sizes = []
    while log._queue:
        batch, _ = log._take_batch()
        sizes.append(len(batch))
    assert sizes == [2, 2, 1]


# Through the service: HTTP and websocket, on both brokers --------------------------------------


def make_app(release: asyncio.Event) -> App:
    app = App()

    @app.task
    async def hold(text: str = "") -> int:
        await release.wait()
        return len(text)

    @app.task
    async def note(text: str) -> int:
        return len(text)

    @app.task(max_attempts=1)
    async def fail() -> None:
        raise RuntimeError("fails")

    return app


Serve = Callable[..., Awaitable[Client]]


@pytest.fixture
def serve(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]], prefix: str, tmp_path: Path
) -> Serve:
    """A factory: `make_app`'s tasks served on a broker with these bounds, once ready."""

    async def start(app: App, broker_url: str, **bounds: int) -> Client:
        settings = Settings(
            broker=BrokerSettings(url=broker_url, prefix=prefix, confirm_timeout=3.0),
            jobs=JobsSettings(shutdown_grace=0.2, max_args_bytes=bounds.get("args", 4096)),
            http=HttpSettings(max_list_bytes=bounds.get("list", 4 * 2**20)),
            store=StoreSettings(dir=str(tmp_path), max_bytes=bounds.get("store", 2**30)),
        )
        client = await aiohttp_client(create_app(app, settings))
        await client_ready(client)
        return client

    return start


@pytest.fixture
async def release() -> AsyncIterator[asyncio.Event]:
    event = asyncio.Event()
    yield event
    event.set()  # no task is left holding its job at the end


async def post(client: Client, body: Any) -> tuple[int, Any, Any]:
    response = await client.post("/v1/jobs", data=orjson.dumps(body), headers=JSON)
    return response.status, await response.json(), response.headers


async def test_a_full_store_refuses_submits_with_429_while_its_jobs_all_finish(
    serve: Serve, broker_url: str, release: asyncio.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unfinished jobs fill `store.max_bytes`: a retry, a submit over HTTP or the websocket, is
    refused (429, Retry-After; `queue_full`) and leaves nothing; finished jobs are forgotten to
    make room (but the one a retry asks for), unfinished ones never, and each finishes; then
    finished jobs make room, and submits are accepted again."""
    # The store is made room in only by the requests here, not by the check every second.
    monkeypatch.setattr(service_module, "MAKE_ROOM_EVERY", 3600.0)
    client = await serve(make_app(release), broker_url, store=64 * 1024, args=16 * 1024)
    service = client.app[STATE].service
    assert service is not None
    status, failed, _ = await post(client, {"task": "fail"})
    assert status == 202, failed
    done = await client.get(f"/v1/jobs/{failed['id']}", params={"wait": "10"})
    assert (await done.json())["status"] == "failed"
    accepted: list[str] = []
    async with asyncio.timeout(20):
        while not service.store.full():  # then the store has a finished job, and no room
            status, body, _ = await post(client, {"task": "hold", "args": {"text": "t" * 8000}})
            assert status == 202, body
            accepted.append(body["id"])
    assert 7 <= len(accepted) <= 8, len(accepted)  # of 64 KiB, 8.4 KB each

    retry = await client.post(f"/v1/jobs/{failed['id']}/retry")
    assert (retry.status, retry.headers["Retry-After"]) == (429, "1"), await retry.text()
    assert (await (await client.get(f"/v1/jobs/{failed['id']}")).json())["status"] == "failed"
    status, body, headers = await post(client, {"task": "note", "args": {"text": "refused"}})
    assert (status, headers["Retry-After"]) == (429, "1"), body
    assert "store.max_bytes" in body["detail"]
    # That submit made what room there was: the finished job is forgotten, before its
    # result_ttl; every unfinished one is kept.
    assert (await client.get(f"/v1/jobs/{failed['id']}")).status == 404
    async with client.ws_connect("/v1/ws") as ws:
        frame = {"op": "submit", "job": {"task": "note", "args": ["n"]}}
        await ws.send_str(orjson.dumps(frame).decode())
        refused = orjson.loads(await asyncio.wait_for(ws.receive_str(), 10))
        assert refused["code"] == "queue_full", refused
    assert len(service.store) == len(accepted)  # the refused left no record
    release.set()
    for job_id in accepted:
        done = await client.get(f"/v1/jobs/{job_id}", params={"wait": "10"})
        assert (await done.json())["status"] == "succeeded"
    status, body, _ = await post(client, {"task": "note", "args": {"text": "after"}})
    assert status == 202, body
    done = await client.get(f"/v1/jobs/{body['id']}", params={"wait": "10"})
    assert (await done.json())["status"] == "succeeded"
    assert service.store.kept_bytes < 64 * 1024  # room was made from the finished jobs


async def test_paging_through_large_jobs_returns_each_once_in_bounded_pages(
    serve: Serve, release: asyncio.Event
) -> None:
    """`limit=1000` of jobs of 3.9 KB each: pages of 16 KiB at most, and `next` goes on from
    where one stops, through every job exactly once, newest first. The CLI's client follows
    `next` to give `--limit` jobs."""
    release.set()
    client = await serve(make_app(release), "memory://", list=16 * 1024)
    ids = []
    for n in range(40):
        status, body, _ = await post(client, {"task": "note", "args": {"text": f"{n:02d}" * 1950}})
        assert status == 202, body
        ids.append(body["id"])
    listed, sizes, cursor = [], [], None
    while True:
        params = {"limit": "1000"} | ({"cursor": cursor} if cursor else {})
        response = await client.get("/v1/jobs", params=params)
        raw = await response.read()
        page = orjson.loads(raw)
        sizes.append(len(raw))
        listed += [job["id"] for job in page["jobs"]]
        if (cursor := page["next"]) is None:
            break
    assert listed == ids[::-1]
    assert max(sizes) <= 16 * 1024 and len(sizes) >= 10, sizes
    small = orjson.loads(await (await client.get("/v1/jobs", params={"limit": "2"})).read())
    assert [job["id"] for job in small["jobs"]] == ids[:-3:-1]
    async with CliClient(str(client.make_url(""))) as cli:
        table = await cli.list_jobs(None, "note", 10)
    assert [job["id"] for job in table["jobs"]] == ids[:-11:-1] and table["next"]
