"""Writing to the event log and reading it back into the job store.

Every process applies every log entry, its own included, in log order: the store is a function
of the log alone. A write therefore returns only once the broker confirmed it *and* it came back
through the log and was applied, so that a process reads its own writes (a job is visible to
`GET` as soon as its 202 is sent) and an outcome is in the store before its message is acked.

Events are written in batches, one log message each: every message costs the client about
120 µs of CPU and the broker more, so a batch takes whatever was appended while earlier ones
were in flight. Two batches may be in flight at once, so that a write waits for at most one
confirm before its own; they are published in order on one channel, so the log keeps the
append order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import orjson

from aioqueue import compactjson, events
from aioqueue.broker.base import Broker, LogKind
from aioqueue.errors import BrokerUnavailable, QueueFull
from aioqueue.events import CheckpointNote, Event, JobSpec, Rejected
from aioqueue.events import encode as encode_event
from aioqueue.store import JobStore

logger = logging.getLogger(__name__)

#: Events per log message at most; a batch also takes whole `append()` calls only.
MAX_BATCH = 512
#: Bytes of events per log message, at most (but one `append()` call's, whatever their size).
#: An event may carry a result of `jobs.max_result_bytes`: 512 of them would pass RabbitMQ's
#: `max_message_size` (128 MiB on 3.10), which refuses the message and closes the channel.
MAX_BATCH_BYTES = 8 * 2**20
#: Batches published and not yet confirmed and echoed, at most.
MAX_IN_FLIGHT = 2
#: Seconds between writes of the job store (its changes wait in memory meanwhile).
FLUSH_EVERY = 0.05


class EventLog:
    def __init__(
        self, broker: Broker, store: JobStore, submit_timeout: float, write_timeout: float
    ) -> None:
        self._broker = broker
        self._store = store
        #: How long a submit waits for its echo once confirmed; then the job is recorded here.
        self._submit_timeout = submit_timeout
        #: How long other writes wait for their echo; then they fail (BrokerUnavailable).
        self._write_timeout = write_timeout
        self._echoes: dict[str, asyncio.Future[None]] = {}
        #: Appended and not yet taken into a batch: each call's events, encoded, and its waiter.
        self._queue: list[tuple[list[bytes], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._writes: set[asyncio.Task[None]] = set()
        #: Log entries applied so far (all processes' writes), and their bytes.
        self.entries_applied = 0
        self.bytes_applied = 0
        #: Of those, the entries that changed a job (not barriers, not checkpoint notes).
        self.changes_applied = 0
        self._flush_due = False
        #: True while an entry this process wrote is applied (its store listeners may ask).
        self.applying_own = False
        #: Called with each checkpoint record the log holds (see checkpointer.py).
        self.on_checkpoint: Callable[[dict[str, Any]], None] | None = None

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_batches(), name="aioqueue-eventlog")

    async def close(self) -> None:
        for task in [self._writer, *self._writes]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._writes, return_exceptions=True)
        for _, waiter in self._queue:
            if not waiter.done():
                waiter.set_exception(BrokerUnavailable("shutting down"))

    # Reading --------------------------------------------------------------------------------

    def on_log(self, kind: LogKind, body: bytes, offset: int) -> None:
        """Apply one log entry; called by the broker in log order."""
        try:
            if kind is LogKind.JOB:
                spec = JobSpec.decode(body)
                key = spec.id
                self.applying_own = key in self._echoes
                self._store.create(spec, len(body))
                self.changes_applied += 1
            else:
                entry = orjson.loads(body)
                key = entry["id"]
                self.applying_own = key in self._echoes
                changes = [self._apply(item) for item in entry["events"]]
                self.changes_applied += any(changes)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.exception("skipping a log entry that cannot be applied: %.200r", body)
            return
        finally:
            self.applying_own = False
            self._store.applied(offset)
            if not self._flush_due:
                # One write for the entries of FLUSH_EVERY seconds: a transaction per entry cost
                # a fifth of the throughput (bench/e2e.py). Readers see the changes at once (the
                # store keeps them until written); a crash loses none, the log has them.
                self._flush_due = True
                asyncio.get_running_loop().call_later(FLUSH_EVERY, self._flush)
        self.entries_applied += 1
        self.bytes_applied += len(body)
        echo = self._echoes.pop(key, None)
        if echo is not None and not echo.done():
            echo.set_result(None)

    def _flush(self) -> None:
        self._flush_due = False
        self._store.write()

    def _apply(self, item: Any) -> bool:
        """Apply one event of an entry; whether it was a job's."""
        try:
            event = events.decode(item)
        except ValueError as exc:  # one bad event spoils none of the others
            logger.error("skipping an event that cannot be applied: %s", exc)
            return False
        if not isinstance(event, CheckpointNote):
            self._store.apply(event)
            return True
        if self.on_checkpoint is not None:
            self.on_checkpoint(event.fields)
        return False

    # Writing --------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> None:
        """Publish a new job (to its queue and the log); returns once it is in the store."""
        echo = self._expect(spec.id)
        try:
            try:
                await self._broker.submit(spec.encode(), spec.queue, spec.delay, spec.priority)
            except QueueFull:
                # The log took the job, its queue did not: take it back out of every store
                # (waiting for that, so that a refused job leaves a record only if this fails).
                try:
                    await self.append(Rejected(spec.id))
                except BrokerUnavailable as exc:
                    logger.warning("job %s refused, yet left queued in the log: %s", spec.id, exc)
                raise
            try:
                async with asyncio.timeout(self._submit_timeout):
                    await echo
            except TimeoutError:
                # The broker confirmed it, so the job is accepted: record it here rather than
                # answer 503 for a job that will run. The late echo is then a no-op.
                logger.warning("job %s confirmed but not echoed by the log in time", spec.id)
                self._store.create(spec)
                self._store.write()
        finally:
            self._echoes.pop(spec.id, None)

    async def append(self, *events: Event) -> None:
        """Append events; returns once they are confirmed and applied. Raises BrokerUnavailable."""
        await self.emit(*events)

    def emit(self, *events: Event) -> asyncio.Future[None]:
        """Append events without waiting; the future says when (and whether) they are applied."""
        waiter = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(_retrieve)
        # Encoded now, so that a batch knows its bytes before it is written; each in a bytes
        # object of its own size (orjson's buffer is 4 KiB at least), since appends pile up
        # while the broker is away.
        self._queue.append(([compactjson.dumps(encode_event(event)) for event in events], waiter))
        self._wake.set()
        return waiter

    async def barrier(self) -> None:
        """Return once every entry that was in the log before this call has been applied here."""
        await self.append()

    def _expect(self, key: str) -> asyncio.Future[None]:
        echo = asyncio.get_running_loop().create_future()
        self._echoes[key] = echo
        return echo

    def _take_batch(self) -> tuple[list[bytes], list[asyncio.Future[None]]]:
        batch: list[bytes] = []
        waiters: list[asyncio.Future[None]] = []
        taken = size = 0
        for batch_events, waiter in self._queue:
            grown = size + sum(len(event) + 1 for event in batch_events)
            if batch and (len(batch) + len(batch_events) > MAX_BATCH or grown > MAX_BATCH_BYTES):
                break
            batch.extend(batch_events)
            waiters.append(waiter)
            taken, size = taken + 1, grown
        del self._queue[:taken]
        return batch, waiters

    async def _write_batches(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._slots.acquire()
                batch, waiters = self._take_batch()
                # Tasks start in creation order and publish under aiormq's FIFO channel lock
                # before their first real suspension: batches reach the log in this order.
                task = asyncio.create_task(self._write_and_settle(batch, waiters))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)

    async def _write_and_settle(
        self, batch: list[bytes], waiters: list[asyncio.Future[None]]
    ) -> None:
        # Whatever ends the write (a cancellation too), its waiters are settled: an unsettled
        # one would hang the job whose outcome it is.
        error: BrokerUnavailable | None = BrokerUnavailable("the write was interrupted")
        try:
            error = await self._write(batch)
        finally:
            self._slots.release()
            for waiter in waiters:
                if waiter.done():
                    continue
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    async def _write(self, batch: list[bytes]) -> BrokerUnavailable | None:
        """Write encoded events as one log entry: `{"id": ..., "events": [...]}`."""
        batch_id = secrets.token_hex(8)
        echo = self._expect(batch_id)
        try:
            body = b'{"id":"%s","events":[%s]}' % (batch_id.encode(), b",".join(batch))
            await self._broker.append(body)
            async with asyncio.timeout(self._write_timeout):
                await echo
        except BrokerUnavailable as exc:
            return exc
        except TimeoutError:
            return BrokerUnavailable("the event log did not echo a confirmed write in time")
        except Exception as exc:  # never let the writer die: every later append would hang
            logger.exception("writing to the event log failed")
            return BrokerUnavailable(f"writing to the event log failed: {exc}")
        finally:
            self._echoes.pop(batch_id, None)
        return None


def _retrieve(future: asyncio.Future[None]) -> None:
    # An emitted write nobody awaits may fail; that is expected, not an unhandled error.
    if not future.cancelled():
        future.exception()
