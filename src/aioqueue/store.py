"""The queryable job state: every job the event log told of, kept in SQLite until it expires.

Non-terminal jobs are kept however old they are; finished jobs are forgotten `result_ttl` seconds
after they finished (G5), or earlier, the earliest finished first, when the store keeps more than
`max_bytes` of job state (`make_room`); a job that is not finished is never forgotten, so when
those alone fill the store it is `full()` and the producer refuses new jobs (the store itself
never refuses to apply a log entry). A failed or dead job is also forgotten when a `purged`
event of it comes through the log (`POST /v1/dead/purge`). The state lives in SQLite (a file on
RabbitMQ, `:memory:` otherwise), so that memory stays flat however many finished jobs
`result_ttl` holds: a bounded LRU cache of decoded `Job` objects sits in front of it. Changes
wait in memory, where every read finds them, until `write()` (the event log calls it every few
tens of milliseconds), which writes them with the log offset they bring the store to in one
transaction: a store on disk is always the state of some prefix of the log, and resumes from its
`offset` after a restart.

Listing is newest first by creation, paged by an opaque cursor (the creation sequence number of
the last job returned), so pages stay stable while jobs are added or expire. A page is read one
job at a time (`page`), so that a caller that stops early (at a byte bound) never holds the rest.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Collection, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from aioqueue.errors import FieldError, InvalidRequest
from aioqueue.events import JobEvent, JobSpec, Purged, Queued, Rejected
from aioqueue.jobs import DEAD_LETTERS, EventType, IllegalTransition, Job, JobStatus, apply

logger = logging.getLogger(__name__)

#: What the store applies: a job's events, one that creates a job, and two that withdraw one.
StoreEvent = JobEvent | Queued | Rejected | Purged
#: Called after every change with the event's name and the job as it is now.
ChangeListener = Callable[[str, Job], None]

#: The layout of the tables; a store of another version is not opened (it is rebuilt).
SCHEMA_VERSION = 3
#: The versions a store or a checkpoint may have to be opened (older ones are migrated).
READABLE_SCHEMAS = (1, 2, SCHEMA_VERSION)
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,     -- creation order: the order of the log
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    task TEXT NOT NULL,
    finished_at REAL,
    idempotency_key TEXT,        -- scoped to the owner: `scoped_key()`
    owner TEXT,
    queue TEXT NOT NULL,         -- schema 3 on, as error_type
    error_type TEXT,             -- the type of the job's current error, if it has one
    state BLOB NOT NULL          -- Job.to_state(), as JSON
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task, seq);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
-- Each queue's oldest queued job (GET /v1/queues), a lookup however many are queued; and the
-- counts per queue and status, read once at start from the index alone.
CREATE INDEX IF NOT EXISTS jobs_by_queue ON jobs (status, queue, seq);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Jobs that repeated an idempotency key another job held: never recorded, never run.
CREATE TABLE IF NOT EXISTS duplicates (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
#: Decoded jobs kept in memory, beyond those changed since the last write: at most so many, and
#: so many bytes of them (as JSON; decoded, a few times that). By bytes too: 4,096 jobs of
#: `jobs.max_args_bytes` each would be a gigabyte.
CACHE_SIZE = 4096
CACHE_BYTES = 16 * 2**20
#: Rows deleted per statement when expiring, so that no call holds the event loop for long.
EXPIRE_CHUNK = 2000
#: SQLite's own page cache, in KiB (a negative cache_size is KiB).
PAGE_CACHE_KIB = 16 * 1024
#: A store past `max_bytes` forgets finished jobs until it keeps this share of it: room for a
#: while, rather than one job's worth (and a chunk of deletes) at every submit.
LOW_WATER = 0.9
#: The default `max_bytes` (`store.max_bytes`).
MAX_BYTES = 2**30


@dataclass(frozen=True, slots=True)
class JobFilter:
    """Which jobs a listing, a count or a bulk change takes: each field that is set must match."""

    statuses: Collection[JobStatus] = ()
    task: str | None = None
    #: Only this principal's jobs (None: everyone's).
    owner: str | None = None
    #: The type of the job's error.
    error_type: str | None = None
    #: When the job finished: `finished_after` <= finished_at < `finished_before`.
    finished_after: float | None = None
    finished_before: float | None = None

    def matches(self, job: Job) -> bool:
        """Whether the job is one the filter takes (as the store's query would find it)."""
        finished = job.finished_at
        return (
            (not self.statuses or job.status in self.statuses)
            and (self.task is None or job.task == self.task)
            and (self.owner is None or job.owner == self.owner)
            and (self.error_type is None or (job.error or {}).get("type") == self.error_type)
            and (
                self.finished_after is None
                or (finished is not None and finished >= self.finished_after)
            )
            and (
                self.finished_before is None
                or (finished is not None and finished < self.finished_before)
            )
        )

    def where(self, before_seq: int) -> tuple[str, list[Any]]:
        """The WHERE clause (and its parameters) of the jobs it takes created before
        `before_seq`."""
        where: list[str] = ["seq < ?"]
        params: list[Any] = [before_seq]
        for clause, value in (
            ("owner = ?", self.owner),
            ("task = ?", self.task),
            ("error_type = ?", self.error_type),
            ("finished_at >= ?", self.finished_after),
            ("finished_at < ?", self.finished_before),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        if self.statuses:
            where.append(f"status IN ({', '.join('?' * len(self.statuses))})")
            params += [status.value for status in self.statuses]
        return " AND ".join(where), params


#: The filter that takes every job.
EVERY_JOB = JobFilter()


class JobStore:
    def __init__(
        self,
        result_ttl: float,
        path: str = ":memory:",
        clock: Callable[[], float] = time.time,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.result_ttl = result_ttl
        self.path = path
        #: Bytes of job state (`Job.to_state()` as JSON, summed over the jobs) past which finished
        #: jobs are forgotten early, and, if unfinished ones alone keep as much, `full()` holds.
        self.max_bytes = max_bytes
        self._clock = clock
        self._db = connect(path)
        self._cache: collections.OrderedDict[str, Job] = collections.OrderedDict()
        #: The size of each cached job's state as last read or written (none yet for a new one).
        self._cache_sizes: dict[str, int] = {}
        self._cache_bytes = 0
        #: Jobs changed since the last write (an ordered set), and the sequence numbers of those
        #: created since.
        self._dirty: dict[str, None] = {}
        self._seq_of_new: dict[str, int] = {}
        self._forgotten: set[str] = set()
        #: Since the last write: ids that repeated a key (with when), and the keys of new jobs.
        self._new_duplicates: dict[str, float] = {}
        self._new_keys: dict[str, str] = {}
        self._waiters: dict[str, list[tuple[Callable[[Job], bool], asyncio.Future[None]]]] = {}
        self._new_meta: dict[str, Any] = {}
        self._closed = False
        self.listeners: list[ChangeListener] = []
        self._evicting = asyncio.Lock()
        #: The `size` of the jobs created since the last write: a burst of submits between two
        #: writes counts toward `full()` as it comes.
        self._unwritten = 0
        self._read_counters()

    def _read_counters(self) -> None:
        row = self._db.execute("SELECT max(seq), count(*) FROM jobs").fetchone()
        self._next_seq = 0 if row[0] is None else row[0] + 1
        self._count: int = row[1]
        #: The log offset of the last entry applied (written by the next `write()` at the
        #: latest); None before the first.
        self.offset: int | None = self.meta("offset")
        #: Bytes of job state in the database, kept with it (counted once for a store that
        #: predates the count: a scan of every row's length, which SQLite reads from the row's
        #: header without loading the state).
        stored = self.meta("bytes")
        if stored is None:
            stored = self._db.execute("SELECT coalesce(sum(length(state)), 0) FROM jobs").fetchone()
            stored = stored[0]
        self._bytes: int = stored
        #: Jobs written, per (queue, status): `by_queue` answers from it, not from a scan of
        #: what may be a million dead letters at every `GET /v1/queues`.
        self._by_status: collections.Counter[tuple[str, str]] = collections.Counter()
        for queue, status, count in self._db.execute(
            "SELECT queue, status, count(*) FROM jobs GROUP BY status, queue"
        ):
            self._by_status[(queue, status)] = count

    def close(self) -> None:
        """Write what is left, and close the database; later writes are no-ops."""
        if not self._closed:
            self.write()
            self._closed = True
            self._db.close()

    def replace(self, path: str) -> None:
        """Take the database at `path` (a checkpoint's) as this store's, before the store is
        used. Raises `sqlite3.DatabaseError`, and keeps the store as it was, if it is unsound."""
        connect(path).close()
        self._db.close()
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + suffix)
        os.replace(path, self.path)
        self._db = connect(self.path)
        self._cache.clear()
        self._cache_sizes.clear()
        self._cache_bytes = 0
        self._read_counters()

    def meta(self, key: str) -> Any:
        """A value kept with the store (as JSON), written with the next `write()`."""
        if key in self._new_meta:
            return self._new_meta[key]
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self._new_meta[key] = value

    def __len__(self) -> int:
        return self._count

    @property
    def kept_bytes(self) -> int:
        """Bytes of job state kept, as of the last write (changes since wait for the next)."""
        return self._bytes

    def full(self) -> bool:
        """Whether the store keeps `max_bytes` of job state or more (as of the last write, and
        counting the jobs created since)."""
        return self._bytes + self._unwritten >= self.max_bytes

    # Reading --------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        job = self._cache.get(job_id)
        if job is not None:
            self._cache.move_to_end(job_id)
            return job
        if job_id in self._forgotten:
            return None
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        # Room first, so that the job read stays cached at least until the caller changed it
        # (a changed job is kept until written): reads alone must not grow the cache either.
        self._trim_cache()
        return self._cached(Job.from_state(orjson.loads(row[0])), len(row[0]))

    def for_key(self, key: str, owner: str | None) -> Job | None:
        """The job `owner` submitted first with this idempotency key, while it is kept."""
        scoped = scoped_key(owner, key)
        if (job_id := self._new_keys.get(scoped)) is not None:
            return self.get(job_id)
        row = self._db.execute(
            "SELECT id FROM jobs WHERE idempotency_key = ?", (scoped,)
        ).fetchone()
        return None if row is None else self.get(row[0])

    def is_duplicate(self, job_id: str) -> bool:
        """Whether this job repeated an idempotency key another job held (so it never runs)."""
        if job_id in self._new_duplicates:
            return True
        found = self._db.execute("SELECT 1 FROM duplicates WHERE id = ?", (job_id,)).fetchone()
        return found is not None

    def list(
        self, where: JobFilter = EVERY_JOB, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first (as `page`); returns the page and the cursor of the next one."""
        jobs: list[Job] = []
        following: str | None = None
        with contextlib.closing(self.page(where, limit, cursor)) as page:
            for job, after in page:
                jobs.append(job)
                following = after
        return jobs, following

    def page(
        self, where: JobFilter = EVERY_JOB, limit: int = 50, cursor: str | None = None
    ) -> Generator[tuple[Job, str | None], None, None]:
        """Up to `limit` jobs that `where` takes, newest first, each with the cursor of the page
        that follows it (None after the last job there is). Each job is read and decoded as the
        iterator reaches it, so a caller that stops early never holds the rest: iterate without
        awaiting, and close the iterator when done. Raises InvalidRequest at once for a bad
        cursor."""
        self.write()
        before = _decode(cursor) if cursor is not None else self._next_seq
        clause, params = where.where(before)
        query = f"FROM jobs WHERE {clause} ORDER BY seq DESC LIMIT ?"
        if len(where.statuses) > 1:
            # SQLite sorts the rows of several statuses in a temporary B-tree, which would
            # hold every state of the page at once: the ids first, then each state on its own.
            ids = self._db.execute(f"SELECT seq, id {query}", (*params, limit + 1)).fetchall()
            return self._read_page(ids[:limit], more=len(ids) > limit)
        # In the order of an index: SQLite steps through the rows one at a time.
        rows = self._db.execute(f"SELECT seq, id, state {query}", (*params, limit + 1))
        return self._step_page(rows, limit)

    def _step_page(
        self, rows: sqlite3.Cursor, limit: int
    ) -> Generator[tuple[Job, str | None], None, None]:
        try:
            row = rows.fetchone()
            for _ in range(limit):
                if row is None:
                    return
                following = rows.fetchone()  # whether the page has a next one
                seq, job_id, state = row
                job = self._cache.get(job_id) or Job.from_state(orjson.loads(state))
                yield job, None if following is None else _encode(seq)
                row = following
        finally:
            rows.close()

    def _read_page(
        self, ids: Sequence[tuple[int, str]], more: bool
    ) -> Generator[tuple[Job, str | None], None, None]:
        for n, (seq, job_id) in enumerate(ids):
            job = self._cache.get(job_id)
            if job is None:
                found = self._db.execute("SELECT state FROM jobs WHERE seq = ?", (seq,)).fetchone()
                if found is None:  # forgotten since the page's ids were read
                    continue
                job = Job.from_state(orjson.loads(found[0]))
            yield job, _encode(seq) if more or n + 1 < len(ids) else None

    @property
    def next_seq(self) -> int:
        """The creation sequence number the next job gets: a bound of the jobs known now."""
        return self._next_seq

    def oldest_first(
        self, where: JobFilter, after_seq: int, before_seq: int, limit: int
    ) -> Sequence[tuple[int, str]]:
        """(seq, id) of up to `limit` jobs that `where` takes, oldest first, created after
        `after_seq` and before `before_seq`: one chunk of a bulk retry or purge."""
        self.write()
        clause, params = where.where(before_seq)
        query = f"SELECT seq, id FROM jobs WHERE {clause} AND seq > ? ORDER BY seq LIMIT ?"
        return [(row[0], row[1]) for row in self._db.execute(query, (*params, after_seq, limit))]

    def count(self, where: JobFilter = EVERY_JOB) -> int:
        """How many jobs `where` takes."""
        self.write()
        clause, params = where.where(self._next_seq)
        return int(
            self._db.execute(f"SELECT count(*) FROM jobs WHERE {clause}", params).fetchone()[0]
        )

    def by_queue(self, statuses: Collection[JobStatus]) -> dict[tuple[str, JobStatus], int]:
        """How many jobs each queue has in each of `statuses` (none: not in the result)."""
        self.write()
        wanted = {status.value for status in statuses}
        return {
            (queue, JobStatus(status)): count
            for (queue, status), count in self._by_status.items()
            if count and status in wanted
        }

    def oldest_queued(self, queues: Collection[str]) -> dict[str, Job]:
        """Each queue's queued job created first (in the log's order), for those that have one:
        a lookup in an index per queue, however many are queued."""
        self.write()
        oldest: dict[str, Job] = {}
        for queue in queues:
            found = self._db.execute(
                "SELECT id FROM jobs WHERE status = ? AND queue = ? ORDER BY seq LIMIT 1",
                (JobStatus.QUEUED.value, queue),
            ).fetchone()
            job = None if found is None else self.get(found[0])
            if job is not None:
                oldest[queue] = job
        return oldest

    # Waiting --------------------------------------------------------------------------------

    async def wait_for(
        self, job_id: str, condition: Callable[[Job], bool], within: float
    ) -> Job | None:
        """The job once `condition(job)` holds, or as it is after `within` seconds (or None)."""
        job = self.get(job_id)
        if (job is not None and condition(job)) or within <= 0:
            return job
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (condition, waiter)
        self._waiters.setdefault(job_id, []).append(entry)
        try:
            async with asyncio.timeout(within):
                await waiter
        except TimeoutError:
            pass
        finally:
            waiting = self._waiters.get(job_id)
            if waiting and entry in waiting:
                waiting.remove(entry)
                if not waiting:
                    del self._waiters[job_id]
        return self.get(job_id)

    async def wait_known(self, job_id: str, within: float) -> Job | None:
        """The job, once the log has told this store of it, or None after `within` seconds."""
        return await self.wait_for(job_id, lambda job: True, within)

    async def wait_terminal(self, job_id: str, within: float) -> None:
        """Return when the job is terminal or `within` seconds have passed."""
        if self.get(job_id) is not None:
            await self.wait_for(job_id, lambda job: job.terminal, within)

    # Changing -------------------------------------------------------------------------------

    def create(self, spec: JobSpec, size: int = 0) -> Job | None:
        """Add a newly queued job; None (and no change) if the id is known already. `size`: its
        message's bytes, which `full()` counts until the job is written (then its state's)."""
        if self.get(spec.id) is not None or self.is_duplicate(spec.id):
            return None
        key = spec.idempotency_key
        if key is not None and self.for_key(key, spec.owner) is not None:
            self._new_duplicates[spec.id] = self._clock()
            return None
        job = Job.from_spec(spec)
        if key is not None:
            self._new_keys[scoped_key(spec.owner, key)] = job.id
        self._seq_of_new[job.id] = self._next_seq
        self._next_seq += 1
        self._count += 1
        self._unwritten += size
        self._cached(job)
        self._dirty[job.id] = None
        self._changed(job.status.value, job)  # the event is `queued` or `scheduled`
        return job

    def apply(self, event: StoreEvent) -> Job | None:
        """Apply one event; None (and no change) if it does not apply to the job's state."""
        if isinstance(event, Queued):
            return self.create(event.spec)
        if isinstance(event, Rejected):  # its queue refused it: it was never accepted
            self._forget(event.job)
            return None
        if isinstance(event, Purged):
            self._purge(event)
            return None
        job = self.get(event.job)
        if job is None:
            logger.debug("%s for unknown job %s", type(event).__name__, event.job)
            return None
        try:
            kind = apply(job, event)
        except IllegalTransition as exc:
            logger.debug("job %s: ignored event: %s", job.id, exc)
            return None
        self._dirty[job.id] = None
        # A retried job is queued again: subscribers see `queued`, as for a new job.
        self._changed("queued" if kind is EventType.RETRIED else kind.value, job)
        return job

    def _purge(self, event: Purged) -> None:
        """Forget a dead letter, unless it is no longer one: every process applies the log in
        the same order, so every store agrees on what a purge took (a retry of the job written
        before it wins, and a later run of the job that failed again is not this dead letter).
        Listeners are not told, as of an expiry: nothing about the job changed."""
        job = self.get(event.job)
        if job is None or job.run != event.run or job.status not in DEAD_LETTERS:
            logger.debug("purge of job %s ignored: %r", event.job, job)
            return
        self._forget(job.id)

    def applied(self, offset: int) -> None:
        """Note that the changes made since the last write bring the store to log `offset`
        (written with them by the next `write()`)."""
        self.offset = self._new_meta["offset"] = offset

    def write(self, offset: int | None = None) -> None:
        """Write every change since the last write, and the log offset they reach, at once."""
        if offset is not None:
            self.applied(offset)
        if self._closed:
            return
        if not (self._dirty or self._forgotten or self._new_duplicates or self._new_meta):
            return
        db = self._db
        size = self._bytes
        statuses: collections.Counter[tuple[str, str]] = collections.Counter()
        with db:
            if self._forgotten:  # first: a job may be created again under a forgotten id
                size -= self._delete(self._forgotten, statuses)
            stored = self._stored([i for i in self._dirty if i not in self._seq_of_new])
            for job_id in self._dirty:
                job = self._cache[job_id]
                state = orjson.dumps(job.to_state())
                size += len(state)
                self._cached(job, len(state))
                error_type = None if job.error is None else job.error.get("type")
                row = (job.status.value, job.finished_at, error_type, state)
                seq = self._seq_of_new.pop(job_id, None)
                statuses[(job.queue, job.status.value)] += 1
                if seq is None:
                    was_bytes, was_status = stored.get(job_id, (0, ""))
                    size -= was_bytes
                    statuses[(job.queue, was_status)] -= 1
                    db.execute(
                        "UPDATE jobs SET status = ?, finished_at = ?, error_type = ?, state = ?"
                        " WHERE id = ?",
                        (*row, job_id),
                    )
                else:
                    key = job.idempotency_key and scoped_key(job.owner, job.idempotency_key)
                    db.execute(
                        "INSERT INTO jobs (seq, id, task, idempotency_key, owner, queue, status,"
                        " finished_at, error_type, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (seq, job_id, job.task, key, job.owner, job.queue, *row),
                    )
            if self._new_duplicates:
                db.executemany(
                    "INSERT OR IGNORE INTO duplicates (id, at) VALUES (?, ?)",
                    self._new_duplicates.items(),
                )
            self._new_meta["bytes"] = size  # with the rows it counts, in one transaction
            db.executemany(
                "REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(key, orjson.dumps(value)) for key, value in self._new_meta.items()],
            )
        self._bytes = size
        self._by_status.update(statuses)
        self._unwritten = 0
        self._dirty.clear()
        self._new_meta.clear()
        self._forgotten.clear()
        self._new_duplicates.clear()
        self._new_keys.clear()
        self._trim_cache()

    def expire(self) -> int:
        """Forget up to `EXPIRE_CHUNK` jobs that finished more than `result_ttl` ago (and as
        old duplicate ids); returns how many jobs. Call again while it returns `EXPIRE_CHUNK`."""
        self.write()
        horizon = self._clock() - self.result_ttl
        ids = [
            row[0]
            for row in self._db.execute(
                "SELECT id FROM jobs WHERE finished_at < ? LIMIT ?", (horizon, EXPIRE_CHUNK)
            )
        ]
        with self._db:
            self._drop(ids)
            self._db.execute("DELETE FROM duplicates WHERE at < ?", (horizon,))
        return len(ids)

    async def make_room(self, keep: str | None = None) -> int:
        """If the store is `full()`, forget finished jobs, the earliest finished first (but the
        job `keep`), until it keeps less than LOW_WATER of `max_bytes`, or none is left; returns
        how many. One chunk of deletes at a time, with the event loop serving in between; one
        call at a time (a caller that finds one under way waits for it, and finds room made)."""
        if not self.full():
            return 0
        forgotten = 0
        async with self._evicting:
            if not self.full():
                return 0
            while (chunk := self._evict(keep)) == EXPIRE_CHUNK:
                forgotten += chunk
                await asyncio.sleep(0)
            forgotten += chunk
        if forgotten:
            logger.warning(
                "the job store passed store.max_bytes (%d): forgot the %d earliest finished jobs"
                " before their result_ttl; %d bytes kept",
                self.max_bytes,
                forgotten,
                self._bytes,
            )
        return forgotten

    def _evict(self, keep: str | None) -> int:
        """Forget up to EXPIRE_CHUNK finished jobs, the earliest finished first (but `keep`),
        while the store keeps more than LOW_WATER of `max_bytes`; returns how many."""
        self.write()
        excess = self._bytes - int(self.max_bytes * LOW_WATER)
        ids: list[str] = []
        # `keep` is left out by the query: a chunk short of EXPIRE_CHUNK is the last one.
        earliest = self._db.execute(
            "SELECT id, length(state) FROM jobs WHERE finished_at IS NOT NULL AND id IS NOT ?"
            " ORDER BY finished_at LIMIT ?",
            (keep, EXPIRE_CHUNK),
        ).fetchall()
        for job_id, size in earliest:
            if excess <= 0:
                break
            ids.append(job_id)
            excess -= size
        if ids:
            with self._db:
                self._drop(ids)
        return len(ids)

    def _drop(self, ids: Collection[str]) -> None:
        """Delete written jobs, and count them out, in the caller's transaction."""
        self._bytes -= self._delete(ids, self._by_status)
        self._db.execute(
            "REPLACE INTO meta (key, value) VALUES ('bytes', ?)", (orjson.dumps(self._bytes),)
        )
        for job_id in ids:
            self._uncache(job_id)
        self._count -= len(ids)

    def _delete(self, ids: Collection[str], statuses: collections.Counter[tuple[str, str]]) -> int:
        """Delete rows by id (one statement for them all), and count them out of `statuses`;
        returns the bytes of state they held."""
        freed = 0
        for size, queue, status in self._db.execute(
            "DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?))"
            " RETURNING length(state), queue, status",
            (orjson.dumps(list(ids)),),
        ):
            freed += size
            statuses[(queue, status)] -= 1
        return freed

    def _stored(self, ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """The size of each job's stored state, and its stored status (one query for them
        all); a job with no row is left out."""
        if not ids:
            return {}
        rows = self._db.execute(
            "SELECT id, length(state), status FROM jobs WHERE id IN"
            " (SELECT value FROM json_each(?))",
            (orjson.dumps(list(ids)),),
        )
        return {job_id: (int(size), str(status)) for job_id, size, status in rows}

    def _forget(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is None:
            return
        if job.idempotency_key is not None:
            scoped = scoped_key(job.owner, job.idempotency_key)
            if self._new_keys.get(scoped) == job_id:
                del self._new_keys[scoped]
        self._uncache(job_id)
        self._dirty.pop(job_id, None)
        if self._seq_of_new.pop(job_id, None) is None:
            self._forgotten.add(job_id)
        self._count -= 1

    def _cached(self, job: Job, size: int = 0) -> Job:
        self._cache[job.id] = job
        self._cache_bytes += size - self._cache_sizes.get(job.id, 0)
        self._cache_sizes[job.id] = size
        return job

    def _uncache(self, job_id: str) -> None:
        self._cache.pop(job_id, None)
        self._cache_bytes -= self._cache_sizes.pop(job_id, 0)

    def _trim_cache(self) -> None:
        """Drop the least recently used jobs while the cache is over CACHE_SIZE or CACHE_BYTES,
        but none changed since the last write (`write()` reads them from here)."""
        cache = self._cache
        while (len(cache) > CACHE_SIZE or self._cache_bytes > CACHE_BYTES) and len(cache) > len(
            self._dirty
        ):
            oldest = next(iter(cache))
            if oldest in self._dirty:
                cache.move_to_end(oldest)
            else:
                self._uncache(oldest)

    def _changed(self, event: str, job: Job) -> None:
        for listener in self.listeners:
            listener(event, job)
        for condition, waiter in self._waiters.get(job.id, ()):
            if not waiter.done() and condition(job):
                waiter.set_result(None)


def _add_owners(db: sqlite3.Connection) -> None:
    """Schema 1 to 2 (owners, issue 9), in place: a store, or a checkpoint, of an older version
    is read, not rebuilt from a log that may no longer hold its oldest pending jobs. Every job
    of a version-1 store was submitted with auth off: no owner, keys scoped to none."""
    with db:
        db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        keyed = db.execute("SELECT id, idempotency_key FROM jobs WHERE idempotency_key IS NOT NULL")
        db.executemany(
            "UPDATE jobs SET idempotency_key = ? WHERE id = ?",
            [(scoped_key(None, key), job_id) for job_id, key in keyed.fetchall()],
        )


def _add_queues(db: sqlite3.Connection) -> None:
    """Schema 2 to 3 (queues and dead letters, issue 10), in place: each job's queue and the
    type of its error, as columns, read from its state once (SQLite's JSON functions)."""
    with db:
        db.execute("ALTER TABLE jobs ADD COLUMN queue TEXT NOT NULL DEFAULT ''")
        db.execute("ALTER TABLE jobs ADD COLUMN error_type TEXT")
        db.execute(
            "UPDATE jobs SET queue = json_extract(state, '$.queue'),"
            " error_type = json_extract(state, '$.error.type')"
        )


def scoped_key(owner: str | None, key: str) -> str:
    """An idempotency key as the store keeps it: one principal's key never finds another's job.
    As JSON, so that no owner and key can be written to look like another pair."""
    return orjson.dumps([owner, key]).decode()


def connect(path: str) -> sqlite3.Connection:
    """Open (or create) a store's database. Raises `sqlite3.DatabaseError` if it is not one."""
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA cache_size = -{PAGE_CACHE_KIB}")
    if path != ":memory:":
        # WAL: readers (a checkpoint being copied) never block the writer; NORMAL: a power cut
        # may lose the last transactions, never the file's consistency, and the log has them.
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, *READABLE_SCHEMAS):
            raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
        # A file cut short or damaged is refused here, not half-read later.
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        if version == 1:
            _add_owners(db)
        if version in (1, 2):
            _add_queues(db)
        db.executescript(SCHEMA)
    except sqlite3.DatabaseError:
        db.close()
        raise
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return db


def _encode(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def _decode(cursor: str) -> int:
    bad = InvalidRequest("invalid cursor", [FieldError("cursor", "not a cursor this API returned")])
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        seq = int(base64.urlsafe_b64decode(padded.encode("ascii")).decode("ascii"))
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None
    if seq < 0:
        raise bad
    return seq
