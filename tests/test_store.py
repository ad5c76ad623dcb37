"""The job store: listing, paging, expiry and waiting, with a fake clock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import orjson
import pytest

from aioqueue.errors import InvalidRequest
from aioqueue.events import Failed, JobSpec, Purged, Rejected, Retried, Started, Succeeded
from aioqueue.jobs import Job, JobStatus
from aioqueue.store import JobFilter, JobStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(n: int) -> JobSpec:
    task = "even" if n % 2 == 0 else "odd"
    return JobSpec(
        f"job{n}", task, "default", [n], max_attempts=1, timeout=1.0, created_at=1000 + n
    )


def finish(store: JobStore, n: int, at: float) -> None:
    store.apply(Started(f"job{n}", 1, at))
    store.apply(Succeeded(f"job{n}", 1, n, at))


def test_creating_a_known_job_again_changes_nothing() -> None:
    store = JobStore(result_ttl=60)
    assert store.create(spec(1)) is not None
    finish(store, 1, 1001.0)
    assert store.create(spec(1)) is None
    assert store.get("job1").status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


def test_pages_are_newest_first_and_stable_while_jobs_are_added() -> None:
    store = JobStore(result_ttl=60)
    for n in range(10):
        store.create(spec(n))
    page, cursor = store.list(limit=4)
    assert [j.id for j in page] == ["job9", "job8", "job7", "job6"]
    store.create(spec(10))  # a new job does not shift the next page
    page, cursor = store.list(limit=4, cursor=cursor)
    assert [j.id for j in page] == ["job5", "job4", "job3", "job2"]
    page, cursor = store.list(limit=4, cursor=cursor)
    assert ([j.id for j in page], cursor) == (["job1", "job0"], None)


def test_filters_combine() -> None:
    store = JobStore(result_ttl=60)
    for n in range(6):
        store.create(spec(n))
    finish(store, 2, 1010.0)
    finish(store, 3, 1010.0)
    page, _ = store.list(JobFilter({JobStatus.SUCCEEDED}, "even"))
    assert [j.id for j in page] == ["job2"]
    page, _ = store.list(JobFilter({JobStatus.QUEUED, JobStatus.SUCCEEDED}, "odd"))
    assert [j.id for j in page] == ["job5", "job3", "job1"]


def test_finished_jobs_are_forgotten_after_result_ttl_and_pending_ones_kept() -> None:
    clock = Clock()
    store = JobStore(result_ttl=60, clock=clock)
    for n in range(3):
        store.create(spec(n))
    finish(store, 0, 1000.0)
    finish(store, 1, 1050.0)
    clock.now = 1070.0
    assert store.expire() == 1
    assert store.get("job0") is None and store.get("job1") is not None
    assert [j.id for j in store.list()[0]] == ["job2", "job1"]


def test_expiry_goes_in_bounded_chunks_and_cursors_still_work() -> None:
    clock = Clock()
    store = JobStore(result_ttl=1, clock=clock)
    for n in range(3000):
        store.create(spec(n))
        if n < 2900:
            finish(store, n, 1000.0)
    _, cursor = store.list(limit=50)
    clock.now = 2000.0
    assert (store.expire(), store.expire(), store.expire()) == (2000, 900, 0)
    assert len(store) == 100
    rest, _ = store.list(limit=1000, cursor=cursor)
    assert [j.id for j in rest] == [f"job{n}" for n in range(2949, 2899, -1)]


@pytest.mark.parametrize("cursor", ["", "!!", "LTE", "bm9wZQ"])
def test_a_bad_cursor_is_a_400(cursor: str) -> None:
    with pytest.raises(InvalidRequest):
        JobStore(result_ttl=1).list(cursor=cursor or "=")


async def test_wait_terminal_returns_when_the_job_finishes() -> None:
    store = JobStore(result_ttl=60)
    store.create(spec(1))
    waiter = asyncio.create_task(store.wait_terminal("job1", within=5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    finish(store, 1, 1001.0)
    await asyncio.wait_for(waiter, 1)


async def test_wait_terminal_gives_up_after_its_time() -> None:
    store = JobStore(result_ttl=60)
    store.create(spec(1))
    await asyncio.wait_for(store.wait_terminal("job1", within=0.05), 1)
    assert store._waiters == {}


#: The layout of a store before owners (schema 1), as aioqueue 0.1 wrote it.
SCHEMA_1 = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    task TEXT NOT NULL, finished_at REAL, idempotency_key TEXT, state BLOB NOT NULL);
CREATE UNIQUE INDEX jobs_by_key ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE TABLE duplicates (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def named(job_id: str) -> JobSpec:
    return JobSpec(job_id, "t", "default", [], max_attempts=1, timeout=1.0, created_at=1000)


def test_a_store_of_schema_1_is_migrated_in_place_not_rebuilt(tmp_path: Path) -> None:
    """Its pending jobs may be older than the log's retention: they are kept, ownerless."""
    path = str(tmp_path / "old.sqlite")
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_1)
    for seq, (job_id, key) in enumerate([("a", "k1"), ("b", None)]):
        state = Job.from_spec(named(job_id).replace(idempotency_key=key)).to_state()
        del state["owner"]
        old.execute(
            "INSERT INTO jobs VALUES (?, ?, 'queued', 't', NULL, ?, ?)",
            (seq, job_id, key, orjson.dumps(state)),
        )
    old.execute("""INSERT INTO meta VALUES ('offset', '41')""")
    old.commit()
    old.close()

    store = JobStore(60, path)
    assert store.offset == 41 and len(store) == 2
    found = store.for_key("k1", None)
    assert found is not None and found.id == "a" and found.owner is None
    assert store.for_key("k1", "alice") is None
    assert [job.id for job in store.list(JobFilter(owner=None))[0]] == ["b", "a"]
    assert store.list(JobFilter(owner="alice"))[0] == []
    store.create(named("c").replace(owner="alice", idempotency_key="k1"))
    store.write()
    assert [job.id for job in store.list(JobFilter(owner="alice"))[0]] == ["c"]
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


def fail(store: JobStore, n: int, error: str, at: float) -> None:
    store.apply(Started(f"job{n}", 1, at))
    store.apply(Failed(f"job{n}", 1, {"type": error, "message": "m"}, at))


def test_a_purge_forgets_a_dead_letter_of_its_run_only(tmp_path: Path) -> None:
    """As every store applies it: a job retried since (or retried and failed again: a later
    run) is not the dead letter the purge was for."""
    store = JobStore(60, str(tmp_path / "store.sqlite"))
    for n in range(4):
        store.create(spec(n))
    for n in (0, 1, 2):
        fail(store, n, "E", 1001.0)
    store.apply(Retried("job1", 1))  # queued again
    store.apply(Retried("job2", 1))
    fail(store, 2, "E", 1002.0)  # run 1 failed too
    for n in range(4):
        store.apply(Purged(f"job{n}", 0))
    assert store.get("job0") is None and len(store) == 3
    assert store.get("job1").status is JobStatus.QUEUED  # type: ignore[union-attr]
    assert store.get("job2").status is JobStatus.FAILED  # type: ignore[union-attr]
    assert store.get("job3").status is JobStatus.QUEUED  # type: ignore[union-attr]
    store.apply(Purged("job2", 1))
    store.close()
    again = JobStore(60, str(tmp_path / "store.sqlite"))
    assert [job.id for job in again.list()[0]] == ["job3", "job1"]


def test_listings_filter_by_error_type_and_finish_time_within_an_owner() -> None:
    store = JobStore(60)
    for n in range(4):
        store.create(spec(n).replace(owner="alice" if n < 3 else "bob"))
    fail(store, 0, "ValueError", 1010.0)
    fail(store, 1, "KeyError", 1020.0)
    fail(store, 3, "ValueError", 1030.0)

    def ids(**filters: Any) -> list[str]:
        where = JobFilter(**filters)
        found = [job.id for job in store.list(where)[0]]
        # The filter's own test agrees with the store's query, and so does the count.
        assert found == [job.id for job in store.list()[0] if where.matches(job)]
        assert store.count(where) == len(found)
        return found

    assert ids(error_type="ValueError") == ["job3", "job0"]
    assert ids(error_type="ValueError", owner="alice") == ["job0"]
    assert ids(finished_after=1020.0) == ["job3", "job1"]
    assert ids(finished_before=1020.0) == ["job0"]
    assert ids(finished_after=1010.0, finished_before=1030.0, owner="alice") == ["job1", "job0"]


def test_counts_by_queue_and_each_queues_oldest_queued_job() -> None:
    store = JobStore(60)
    for n, queue in enumerate(["a", "a", "b", "a", "b"]):
        store.create(spec(n).replace(queue=queue))
    fail(store, 0, "E", 1010.0)
    store.apply(Started("job2", 1, 1010.0))
    assert store.by_queue((JobStatus.FAILED, JobStatus.RUNNING, JobStatus.DEAD)) == {
        ("a", JobStatus.FAILED): 1,
        ("b", JobStatus.RUNNING): 1,
    }
    oldest = store.oldest_queued(["a", "b", "c"])
    assert {queue: job.id for queue, job in oldest.items()} == {"a": "job1", "b": "job4"}


#: The layout of a store before queues and error types (schema 2), as aioqueue 0.1 wrote it.
SCHEMA_2 = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    task TEXT NOT NULL, finished_at REAL, idempotency_key TEXT, owner TEXT, state BLOB NOT NULL);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE TABLE duplicates (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
PRAGMA user_version = 2;
"""


def test_a_store_of_schema_2_is_migrated_in_place_with_queues_and_error_types(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "old.sqlite")
    old = sqlite3.connect(path)
    old.executescript(SCHEMA_2)
    failed = Job.from_spec(named("a").replace(queue="slow"))
    failed.status, failed.error = JobStatus.FAILED, {"type": "KeyError", "message": "k"}
    failed.finished_at = 1001.0
    queued = Job.from_spec(named("b"))
    for seq, job in enumerate([failed, queued]):
        old.execute(
            "INSERT INTO jobs VALUES (?, ?, ?, 't', ?, NULL, NULL, ?)",
            (seq, job.id, job.status.value, job.finished_at, orjson.dumps(job.to_state())),
        )
    old.commit()
    old.close()

    store = JobStore(60, path)
    assert [job.id for job in store.list(JobFilter(error_type="KeyError"))[0]] == ["a"]
    assert store.by_queue((JobStatus.FAILED,)) == {("slow", JobStatus.FAILED): 1}
    assert {q: job.id for q, job in store.oldest_queued(["default"]).items()} == {"default": "b"}
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3


def test_the_counts_by_queue_follow_every_change_and_survive_a_reopen(tmp_path: Path) -> None:
    """Kept as rows change (written, forgotten, expired, evicted, purged), not counted anew at
    each report: they always equal a count of the rows."""
    clock = Clock()
    path = str(tmp_path / "store.sqlite")
    store = JobStore(60, path, clock=clock)

    def counted() -> dict[tuple[str, JobStatus], int]:
        store.write()
        rows = store._db.execute("SELECT queue, status, count(*) FROM jobs GROUP BY 1, 2")
        return {(queue, JobStatus(status)): n for queue, status, n in rows}

    for n in range(12):
        store.create(spec(n).replace(queue="ab"[n % 2]))
    for n in range(6):
        fail(store, n, "E", 1000.0 + n)
    store.apply(Started("job6", 1, 1001.0))
    store.apply(Rejected("job7"))  # forgotten before it was ever written
    store.write()
    store.apply(Rejected("job8"))  # forgotten once written
    store.apply(Purged("job0", 0))
    assert store.by_queue(list(JobStatus)) == counted()
    clock.now = 1062.5
    assert store.expire() == 2  # job1 and job2
    assert store.by_queue(list(JobStatus)) == counted()
    assert store.by_queue([JobStatus.FAILED]) == {
        ("a", JobStatus.FAILED): 1,
        ("b", JobStatus.FAILED): 2,
    }
    store.close()
    again = JobStore(60, path, clock=clock)
    assert again.by_queue(list(JobStatus)) == {
        ("a", JobStatus.FAILED): 1,
        ("b", JobStatus.FAILED): 2,
        ("a", JobStatus.RUNNING): 1,
        ("a", JobStatus.QUEUED): 1,
        ("b", JobStatus.QUEUED): 2,
    }
