"""Checkpoints: a process with no store of its own (or an older one) starts from the newest.

Every process on RabbitMQ checks now and then whether a checkpoint is due: `checkpoint_interval`
seconds (times a jitter of this process's own, so that processes seldom race) after the newest
one, or once the log grew by a quarter of its retention (`store.log_max_bytes`) since it, and
only if a job changed since (an idle deployment writes none). The
first to find one due writes it; the others learn of it from the log, where its life is recorded
(`begin`, `done`, `deleted`), and wait for the next. So the log must reach back to the newest
checkpoint only, which its retention by size does, with room for four.

At start, a process loads the newest checkpoint that is newer than its own store and sound (its
digest, then SQLite's own check); if none is, it keeps its store, or reads the log from its start.
Only the newest two finished checkpoints are kept; the writer of a newer one deletes the rest,
with those a writer killed half-way left behind.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from aioqueue import snapshots
from aioqueue.errors import BrokerUnavailable
from aioqueue.eventlog import EventLog
from aioqueue.events import CheckpointNote
from aioqueue.store import READABLE_SCHEMAS, JobStore

if TYPE_CHECKING:
    from aioqueue.broker.checkpoints import CheckpointStreams

logger = logging.getLogger(__name__)

#: Finished checkpoints kept: the newest, and one to fall back on.
KEEP = 2
#: Seconds between checks whether a checkpoint is due, at most.
CHECK_EVERY = 10.0
RETRY_AFTER_MAX = 5.0


class Checkpointer:
    def __init__(
        self,
        streams: CheckpointStreams,
        store: JobStore,
        log: EventLog,
        interval: float,
        log_max_bytes: int,
    ) -> None:
        self._streams = streams
        self._store = store
        self._log = log
        self._interval = interval * random.uniform(1.0, 1.25)
        self._max_bytes = log_max_bytes // 4
        self._since = time.time()
        self._bytes_then = 0
        self._changes_then = 0
        log.on_checkpoint = self._noted

    # What the log says -------------------------------------------------------------------------

    @property
    def known(self) -> list[dict[str, Any]]:
        """The checkpoints the log told of and that are not deleted, oldest first."""
        return list(self._store.meta("checkpoints") or [])

    @property
    def newest_at(self) -> float | None:
        """When the newest finished checkpoint the log told of was written; None if none."""
        done = [entry["at"] for entry in self.known if entry["checkpoint"] == "done"]
        return done[-1] if done else None

    def _noted(self, event: dict[str, Any]) -> None:
        known = self.known
        phase = event["checkpoint"]
        if phase == "deleted":
            gone = set(event["streams"])
            known = [entry for entry in known if entry["stream"] not in gone]
        else:
            known = [entry for entry in known if entry["stream"] != event["stream"]] + [event]
        if phase == "done":
            self._since = event["at"]
            self._bytes_then = self._log.bytes_applied
            self._changes_then = self._log.changes_applied
        self._store.set_meta("checkpoints", known)

    def due(self) -> bool:
        if self._log.changes_applied == self._changes_then and any(
            entry["checkpoint"] == "done" for entry in self.known
        ):
            return False  # no job changed since the newest: an idle log stays idle
        grown = self._log.bytes_applied - self._bytes_then >= self._max_bytes
        return grown or time.time() - self._since >= self._interval

    # Loading ----------------------------------------------------------------------------------

    async def restore_newest(self) -> bool:
        """Load the newest sound checkpoint newer than the store; whether one was loaded."""
        records = await self._records()
        for record in reversed(records):
            if self._store.offset is not None and self._store.offset >= record["offset"]:
                break  # the store is as new: it resumes from itself
            if record.get("schema") not in READABLE_SCHEMAS:
                continue
            started = time.monotonic()
            try:
                data = await self._streams.fetch(record)
                path = self._store.path + ".checkpoint"
                await asyncio.to_thread(snapshots.restore, data, record["sha256"], path)
                self._store.replace(path)
            except (ValueError, BrokerUnavailable, sqlite3.DatabaseError) as exc:
                logger.warning("checkpoint %s not loaded, it is not sound: %s", record["id"], exc)
                continue
            logger.info(
                "loaded checkpoint %s: %d jobs as of log offset %d (%.1f MB) in %.2f s",
                record["id"],
                len(self._store),
                record["offset"],
                record["bytes"] / 1e6,
                time.monotonic() - started,
            )
            return True
        return False

    async def _records(self) -> list[dict[str, Any]]:
        delay = 0.25
        while True:
            try:
                return await self._streams.records()
            except BrokerUnavailable as exc:
                logger.warning("cannot read the checkpoint index yet: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_AFTER_MAX)

    # Writing ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Write a checkpoint whenever one is due, for ever."""
        while True:
            await asyncio.sleep(min(self._interval / 4, CHECK_EVERY))
            if not self.due():
                continue
            try:
                await self.write()
            except BrokerUnavailable as exc:
                logger.warning("checkpoint not written: %s", exc)
            except Exception:  # a bug: log it, and try again next time
                logger.exception("checkpoint not written")

    async def write(self) -> dict[str, Any] | None:
        """Write a checkpoint of the store now; returns its record (None: nothing to save)."""
        started = time.monotonic()
        self._store.write()  # what it applied and holds in memory yet (eventlog.FLUSH_EVERY)
        snapshot = await asyncio.to_thread(snapshots.take, self._store.path)
        if snapshot is None:
            return None
        checkpoint = f"{snapshot.offset}-{secrets.token_hex(4)}"
        stream = self._streams.stream_name(checkpoint)
        begun = {
            "checkpoint": "begin",
            "stream": stream,
            "offset": snapshot.offset,
            "at": time.time(),
        }
        await self._log.append(CheckpointNote(begun))
        record = await self._streams.save(snapshot, checkpoint)
        await self._log.append(CheckpointNote({**record, "checkpoint": "done"}))
        logger.info(
            "wrote checkpoint %s: %d jobs as of log offset %d (%.1f MB) in %.2f s",
            checkpoint,
            snapshot.jobs,
            snapshot.offset,
            len(snapshot.data) / 1e6,
            time.monotonic() - started,
        )
        await self._delete_old()
        return record

    async def _delete_old(self) -> None:
        known = self.known
        done = [entry for entry in known if entry["checkpoint"] == "done"]
        if len(done) <= KEEP:
            return
        oldest_kept = done[-KEEP]["offset"]
        # Older ones, and any begun before the oldest kept one (a writer died half-way).
        old = [entry["stream"] for entry in known if entry["offset"] < oldest_kept]
        await self._streams.delete(old)
        await self._log.append(
            CheckpointNote({"checkpoint": "deleted", "streams": old, "at": time.time()})
        )
