"""One running aioqueue: broker, event log, job store and runner, wired and started in order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from aioqueue import storefile, submission
from aioqueue.broker.base import Broker
from aioqueue.broker.memory import MemoryBroker
from aioqueue.checkpointer import Checkpointer
from aioqueue.config import BrokerSettings, Settings, StoreSettings
from aioqueue.errors import BrokerUnavailable, ConfigError, Conflict, NotFound, NotReady
from aioqueue.eventlog import EventLog
from aioqueue.jobs import RETRYABLE, Job
from aioqueue.runner import Runner, event
from aioqueue.store import EXPIRE_CHUNK, JobStore
from aioqueue.storefile import StoreFile
from aioqueue.submission import build_spec

if TYPE_CHECKING:
    from aioqueue.app import App

logger = logging.getLogger(__name__)

#: Seconds one checkpoint call (find, fetch, write) may take.
CHECKPOINT_CALL_TIMEOUT = 120.0


def make_broker(
    settings: BrokerSettings, log_max_bytes: int = StoreSettings().log_max_bytes
) -> Broker:
    if settings.url.startswith("memory:"):
        return MemoryBroker(settings.prefetch, settings.max_queue_length, settings.delivery_limit)
    from aioqueue.broker.amqp import AmqpBroker  # aio-pika is imported only when used

    return AmqpBroker(settings, log_max_bytes)


def check_timeouts(app: App, settings: Settings) -> None:
    """Refuse, at start-up, a task that RabbitMQ's consumer_timeout would cut off.

    The broker closes the channel of a consumer that holds a delivery longer than its
    consumer_timeout (30 min by default), and the job then runs twice. aioqueue does not extend
    leases; a task that may run longer needs the broker's setting raised, and
    `broker.consumer_timeout` set to match.
    """
    if settings.broker.url.startswith("memory:"):
        return
    limit = settings.broker.consumer_timeout
    for task in app.tasks.values():
        timeout = task.timeout or settings.jobs.timeout
        if timeout > limit:
            raise ConfigError(
                f"task {task.name!r} may run {timeout:g} s, longer than RabbitMQ's consumer_timeout"
                f" (broker.consumer_timeout = {limit:g} s), after which the broker would take the"
                " job back and run it twice: shorten the timeout, or raise consumer_timeout on the"
                " broker and broker.consumer_timeout with it"
            )


class Service:
    def __init__(self, app: App, settings: Settings) -> None:
        check_timeouts(app, settings)
        self.app = app
        self.settings = settings
        self.broker = make_broker(settings.broker, settings.store.log_max_bytes)
        self.store_file: StoreFile | None = None
        if self.broker.durable:
            name = storefile.file_name(settings.broker.url, settings.broker.prefix)
            self.store_file = StoreFile.claim(settings.store.dir, name)
            self.store = self.store_file.open(settings.jobs.result_ttl)
        else:
            self.store = JobStore(settings.jobs.result_ttl)
        self.log = EventLog(
            self.broker,
            self.store,
            submit_timeout=settings.broker.confirm_timeout,
            write_timeout=settings.broker.heartbeat,
        )
        self.checkpointer: Checkpointer | None = None
        if self.store_file is not None:
            from aioqueue.broker.checkpoints import CheckpointStreams  # aio-pika: only when used

            streams = CheckpointStreams(
                settings.broker.url, settings.broker.prefix, CHECKPOINT_CALL_TIMEOUT
            )
            self.checkpointer = Checkpointer(
                streams,
                self.store,
                self.log,
                settings.store.checkpoint_interval,
                settings.store.log_max_bytes,
            )
        queues = app.queues
        self.runner = Runner(
            app.tasks,
            settings.jobs,
            self.log,
            self.broker,
            self.store,
            submit=self.submit,
            threads=max(4, settings.broker.prefetch * len(queues)),
            concurrency=settings.broker.prefetch,
            # Lower priorities are delayed, not held until the broker's consumer_timeout.
            max_wait=settings.broker.consumer_timeout / 4,
        )
        self._replayed = False
        self._stopping = False
        self._submitting: dict[str, asyncio.Future[None]] = {}
        #: The longest `timeout` a job may have (what a broker's consumer_timeout allows).
        self.max_timeout = (
            settings.broker.consumer_timeout if self.broker.durable else submission.MAX_TIMEOUT
        )
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect, replay the event log into the store, then start consuming jobs."""
        started = time.monotonic()
        if self.checkpointer is not None:
            await self.checkpointer.restore_newest()
        resumed = self.store.offset
        await self.broker.start(self.app.queues, self.log.on_log, self.runner.on_dead, resumed)
        self.log.start()
        await self._replay()
        logger.info(
            "job store ready: %d jobs, %d log entries applied (after offset %s) in %.2f s",
            len(self.store),
            self.log.entries_applied,
            resumed,
            time.monotonic() - started,
        )
        for queue in sorted(self.app.queues):
            await self.broker.consume(queue, self.runner.on_delivery)
        self._background.append(asyncio.create_task(self._expire_forever(), name="aioqueue-expiry"))
        if self.checkpointer is not None:
            self._background.append(
                asyncio.create_task(self.checkpointer.run(), name="aioqueue-checkpoints")
            )

    async def _replay(self) -> None:
        # The barrier's echo comes back after every older entry is applied. A long log takes
        # longer than one echo timeout to replay, and the broker may be away: try again.
        while True:
            try:
                await self.log.barrier()
            except BrokerUnavailable as exc:
                logger.info(
                    "replaying the event log: %d entries so far (%s)", self.log.entries_applied, exc
                )
                await asyncio.sleep(0.2)
                continue
            self._replayed = True
            return

    async def shutdown(self, grace: float) -> int:
        """G4: refuse new jobs (503), stop consuming, give running jobs `grace` seconds, and
        give the rest back to their queues. Returns how many were given back."""
        self._stopping = True
        with contextlib.suppress(Exception):
            await self.broker.stop_consuming()
        return await self.runner.drain(grace)

    async def close(self) -> None:
        self._stopping = True
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.broker.stop_consuming()
        await self.log.close()
        await self.broker.close()
        self.runner.close()
        self.store.close()
        if self.store_file is not None:
            self.store_file.release()

    def problem(self) -> str | None:
        """None when ready to serve; else why not (for /readyz and 503s)."""
        if self._stopping:
            return "shutting down"
        if not self._replayed:
            return self.broker.problem() or "replaying the event log"
        return self.broker.problem()

    def check_replayed(self) -> None:
        """NotReady (503) while the store is being rebuilt."""
        if not self._replayed:
            raise NotReady("replaying the event log")

    async def submit(self, body: Any, idempotency_key: str | None = None) -> Job:
        """Check and publish a job; returns its record once the broker confirmed it."""
        job, _ = await self.submit_once(body, idempotency_key)
        return job

    async def submit_once(self, body: Any, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """As `submit`, and whether this call created the job: a repeated idempotency key
        returns the first job (True only for the first); the same key with another body is 409.
        """
        now = time.time()
        spec = build_spec(
            body, self.app.tasks, self.settings.jobs, now, idempotency_key, self.max_timeout
        )
        self.check_replayed()
        if self._stopping:
            raise NotReady("shutting down")
        key = spec.get("idempotency_key")
        if key is None:
            return await self._publish(spec), True
        # Concurrent repeats in this process wait for the first; across processes, the log's
        # order decides (`JobStore.create`).
        while (pending := self._submitting.get(key)) is not None:
            await asyncio.shield(pending)
        first = self._first_for(key, spec)
        if first is not None:
            return first, False
        self._submitting[key] = asyncio.get_running_loop().create_future()
        try:
            await self._publish(spec)
        finally:
            self._submitting.pop(key).set_result(None)
        first = self._first_for(key, spec)
        assert first is not None
        return first, first.id == spec["id"]

    async def _publish(self, spec: dict[str, Any]) -> Job:
        await self.log.submit(spec)  # BrokerUnavailable at once if the broker is unreachable
        job = self.store.get(spec["id"]) or self.store.for_key(spec.get("idempotency_key") or "")
        assert job is not None, "a submitted job is in the store once submit() returns"
        return job

    def _first_for(self, key: str, spec: dict[str, Any]) -> Job | None:
        first = self.store.for_key(key)
        if first is not None and first.fingerprint != spec["fingerprint"]:
            raise Conflict(
                f"idempotency key {key[:100]!r} was used for another request (job {first.id})"
            )
        return first

    def _known(self, job_id: str) -> Job:
        self.check_replayed()
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id[:100]!r}")
        return job

    async def cancel(self, job_id: str) -> Job:
        """Record a cancel; the process running the job (if any) stops it. 409 if finished."""
        job = self._known(job_id)
        if job.terminal:
            raise Conflict(f"the job is {job.status.value} already; only unfinished jobs cancel")
        await self.log.append(event(job_id, "cancelled", job.attempt))
        return self.store.get(job_id) or job

    async def retry(self, job_id: str) -> Job:
        """Run a failed, dead or cancelled job again: same id, a new run from attempt 1."""
        job = self._known(job_id)
        if job.status not in RETRYABLE:
            raise Conflict(
                f"the job is {job.status.value}; only failed, dead or cancelled jobs retry"
            )
        if self._stopping:
            raise NotReady("shutting down")
        run = job.run + 1
        # The message first: a `retried` event is only written once the job can run. The
        # runner waits for the event when it gets a message of a newer run.
        spec = {**job.spec(attempt=1), "run": run, "scheduled_for": None, "expires_at": None}
        await self.broker.publish(orjson.dumps(spec), job.queue, priority=job.priority)
        await self.log.append({"job": job_id, "event": "retried", "run": run, "at": time.time()})
        return self.store.get(job_id) or job

    async def _expire_forever(self) -> None:
        period = min(60.0, max(1.0, self.settings.jobs.result_ttl / 10))
        while True:
            await asyncio.sleep(period)
            expired = 0
            while (chunk := self.store.expire()) == EXPIRE_CHUNK:
                expired += chunk
                await asyncio.sleep(0)  # let the loop serve meanwhile
            expired += chunk
            if expired:
                logger.info("forgot %d jobs finished more than result_ttl ago", expired)
