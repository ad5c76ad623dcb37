"""The queryable job state: every job the event log told of, kept in SQLite until it expires.

Non-terminal jobs are kept however old they are; finished jobs are forgotten `result_ttl` seconds
after they finished (G5). The state lives in SQLite (a file on RabbitMQ, `:memory:` otherwise),
so that memory stays flat however many finished jobs `result_ttl` holds: a bounded LRU cache of
decoded `Job` objects sits in front of it. Changes wait in memory, where every read finds them,
until `write()` (the event log calls it every few tens of milliseconds), which writes them with the
log offset they bring the store to in one transaction: a store on disk is always the state of
some prefix of the log, and resumes from its `offset` after a restart.

Listing is newest first by creation, paged by an opaque cursor (the creation sequence number of
the last job returned), so pages stay stable while jobs are added or expire.
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
from collections.abc import Callable, Collection
from typing import Any

import orjson

from aioqueue.errors import FieldError, InvalidRequest
from aioqueue.events import JobEvent, JobSpec, Queued, Rejected
from aioqueue.jobs import EventType, IllegalTransition, Job, JobStatus, apply

logger = logging.getLogger(__name__)

#: What the store applies: a job's events, and two that create or withdraw a job.
StoreEvent = JobEvent | Queued | Rejected
#: Called after every change with the event's name and the job as it is now.
ChangeListener = Callable[[str, Job], None]

#: The layout of the tables; a store of another version is not opened (it is rebuilt).
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,     -- creation order: the order of the log
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    task TEXT NOT NULL,
    finished_at REAL,
    idempotency_key TEXT,        -- scoped to the owner: `scoped_key()`
    owner TEXT,
    state BLOB NOT NULL          -- Job.to_state(), as JSON
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_task ON jobs (task, seq);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_by_finish ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_key ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- Jobs that repeated an idempotency key another job held: never recorded, never run.
CREATE TABLE IF NOT EXISTS duplicates (id TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""
#: Decoded jobs kept in memory, beyond those changed since the last write.
CACHE_SIZE = 4096
#: Rows deleted per statement when expiring, so that no call holds the event loop for long.
EXPIRE_CHUNK = 2000
#: SQLite's own page cache, in KiB (a negative cache_size is KiB).
PAGE_CACHE_KIB = 16 * 1024


class JobStore:
    def __init__(
        self, result_ttl: float, path: str = ":memory:", clock: Callable[[], float] = time.time
    ) -> None:
        self.result_ttl = result_ttl
        self.path = path
        self._clock = clock
        self._db = connect(path)
        self._cache: collections.OrderedDict[str, Job] = collections.OrderedDict()
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
        self._read_counters()

    def _read_counters(self) -> None:
        row = self._db.execute("SELECT max(seq), count(*) FROM jobs").fetchone()
        self._next_seq = 0 if row[0] is None else row[0] + 1
        self._count: int = row[1]
        #: The log offset of the last entry applied (written by the next `write()` at the
        #: latest); None before the first.
        self.offset: int | None = self.meta("offset")

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

    # Reading --------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        job = self._cache.get(job_id)
        if job is not None:
            self._cache.move_to_end(job_id)
            return job
        if job_id in self._forgotten:
            return None
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else self._cached(Job.from_state(orjson.loads(row[0])))

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
        self,
        statuses: Collection[JobStatus] = (),
        task: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        owner: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """Jobs newest first, filtered (by `owner` too, unless None); returns the page and the
        cursor of the next one."""
        self.write()
        where, params = ["seq < ?"], [_decode(cursor) if cursor is not None else self._next_seq]
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            params += [status.value for status in statuses]
        if task is not None:
            where.append("task = ?")
            params.append(task)
        rows = self._db.execute(
            f"SELECT seq, id, state FROM jobs WHERE {' AND '.join(where)}"
            " ORDER BY seq DESC LIMIT ?",
            (*params, limit + 1),
        ).fetchall()
        page = [self._cache.get(i) or Job.from_state(orjson.loads(state)) for _, i, state in rows]
        if len(page) > limit:
            return page[:limit], _encode(rows[limit - 1][0])
        return page, None

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

    def create(self, spec: JobSpec) -> Job | None:
        """Add a newly queued job; None (and no change) if the id is known already."""
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
        with db:
            if self._forgotten:  # first: a job may be created again under a forgotten id
                db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in self._forgotten])
            for job_id in self._dirty:
                job = self._cache[job_id]
                row = (
                    job.status.value,
                    job.finished_at,
                    orjson.dumps(job.to_state()),
                )
                seq = self._seq_of_new.pop(job_id, None)
                if seq is None:
                    db.execute(
                        "UPDATE jobs SET status = ?, finished_at = ?, state = ? WHERE id = ?",
                        (*row, job_id),
                    )
                else:
                    key = job.idempotency_key and scoped_key(job.owner, job.idempotency_key)
                    db.execute(
                        "INSERT INTO jobs (seq, id, task, idempotency_key, owner, status,"
                        " finished_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (seq, job_id, job.task, key, job.owner, *row),
                    )
            if self._new_duplicates:
                db.executemany(
                    "INSERT OR IGNORE INTO duplicates (id, at) VALUES (?, ?)",
                    self._new_duplicates.items(),
                )
            db.executemany(
                "REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(key, orjson.dumps(value)) for key, value in self._new_meta.items()],
            )
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
            self._db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
            self._db.execute("DELETE FROM duplicates WHERE at < ?", (horizon,))
        for job_id in ids:
            self._cache.pop(job_id, None)
        self._count -= len(ids)
        return len(ids)

    def _forget(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is None:
            return
        if job.idempotency_key is not None:
            scoped = scoped_key(job.owner, job.idempotency_key)
            if self._new_keys.get(scoped) == job_id:
                del self._new_keys[scoped]
        self._cache.pop(job_id, None)
        self._dirty.pop(job_id, None)
        if self._seq_of_new.pop(job_id, None) is None:
            self._forgotten.add(job_id)
        self._count -= 1

    def _cached(self, job: Job) -> Job:
        self._cache[job.id] = job
        return job

    def _trim_cache(self) -> None:
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _changed(self, event: str, job: Job) -> None:
        for listener in self.listeners:
            listener(event, job)
        for condition, waiter in self._waiters.get(job.id, ()):
            if not waiter.done() and condition(job):
                waiter.set_result(None)


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
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
        # A file cut short or damaged is refused here, not half-read later.
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
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
