"""One running aioqueue: broker, event log, job store, checkpoints, the producer side (`jobs`,
`topics`), the worker side (`runner`) and the periodic schedules (`scheduler`), wired and started
in order, with one state (`ServiceState`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import StrEnum
from typing import Any

from aioqueue import storefile, submission
from aioqueue.broker.base import Broker
from aioqueue.broker.memory import MemoryBroker
from aioqueue.checkpointer import Checkpointer
from aioqueue.config import BrokerSettings, DeadSettings, Settings, StoreSettings, TopicsSettings
from aioqueue.deadletters import DeadLetters
from aioqueue.errors import BrokerUnavailable, ConfigError, NotReady
from aioqueue.eventlog import EventLog
from aioqueue.gauges import ServiceGauges
from aioqueue.jobtopics import JobEvents
from aioqueue.metrics import Metrics
from aioqueue.producer import Jobs
from aioqueue.publisher import Topics
from aioqueue.queues import QueueStats, Rates
from aioqueue.runner import Runner
from aioqueue.scheduler import Scheduler, TickRecord
from aioqueue.store import EXPIRE_CHUNK, JobStore
from aioqueue.storefile import StoreFile
from aioqueue.tasks import Registry

logger = logging.getLogger(__name__)

#: Seconds one checkpoint call (find, fetch, write) may take.
CHECKPOINT_CALL_TIMEOUT = 120.0
#: Seconds between checks that the job store is under store.max_bytes (a comparison, unless
#: it is not: then it forgets the earliest finished jobs).
MAKE_ROOM_EVERY = 1.0


def make_broker(
    settings: BrokerSettings,
    log_max_bytes: int = StoreSettings().log_max_bytes,
    topics: TopicsSettings | None = None,
    metrics: Metrics | None = None,
    dead: DeadSettings | None = None,
) -> Broker:
    if settings.url.startswith("memory:"):
        return MemoryBroker(
            settings.prefetch, settings.max_queue_length, settings.delivery_limit, topics, dead
        )
    from aioqueue.broker.amqp import AmqpBroker  # aio-pika is imported only when used

    return AmqpBroker(settings, log_max_bytes, topics, metrics, dead)


def check_timeouts(registry: Registry, settings: Settings) -> None:
    """Refuse, at start-up, a task that RabbitMQ's consumer_timeout would cut off.

    The broker closes the channel of a consumer that holds a delivery longer than its
    consumer_timeout (30 min by default), and the job then runs twice. aioqueue does not extend
    leases; a task that may run longer needs the broker's setting raised, and
    `broker.consumer_timeout` set to match.
    """
    if settings.broker.url.startswith("memory:"):
        return
    limit = settings.broker.consumer_timeout
    for task in registry.tasks.values():
        timeout = task.timeout or settings.jobs.timeout
        if timeout > limit:
            raise ConfigError(
                f"task {task.name!r} may run {timeout:g} s, longer than RabbitMQ's consumer_timeout"
                f" (broker.consumer_timeout = {limit:g} s), after which the broker would take the"
                " job back and run it twice: shorten the timeout, or raise consumer_timeout on the"
                " broker and broker.consumer_timeout with it"
            )


def claim_store_file(settings: Settings) -> StoreFile:
    """The file of this process's job store on RabbitMQ: one per log, locked to this process."""
    name = storefile.file_name(settings.broker.url, settings.broker.prefix)
    return StoreFile.claim(settings.store.dir, name)


def make_checkpointer(settings: Settings, store: JobStore, log: EventLog) -> Checkpointer:
    from aioqueue.broker.checkpoints import CheckpointStreams  # aio-pika: only when used

    streams = CheckpointStreams(
        settings.broker.url, settings.broker.prefix, CHECKPOINT_CALL_TIMEOUT
    )
    interval, log_max_bytes = settings.store.checkpoint_interval, settings.store.log_max_bytes
    return Checkpointer(streams, store, log, interval, log_max_bytes)


class ServiceState(StrEnum):
    """Where a service is in its life; `/readyz` is 200 only when READY and the broker is well."""

    #: Built; connecting to the broker.
    STARTING = "starting"
    #: Connected; loading a checkpoint and reading the log until the store is complete.
    REPLAYING = "replaying"
    #: Serving and consuming (the broker may be away meanwhile: `problem()` says so).
    READY = "ready"
    #: Shutting down: no new jobs, running ones get their grace.
    STOPPING = "stopping"


class Service:
    """One running aioqueue: the producer side (`jobs`), the worker side (`runner`), and what
    both stand on (broker, event log, job store, checkpoints), started and stopped in order."""

    def __init__(
        self, registry: Registry, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        """`metrics`: where to count (a served application's, which counts HTTP and websockets
        into it too); by default a registry of the service's own, `self.metrics.registry`."""
        check_timeouts(registry, settings)
        self.registry = registry
        self.settings = settings
        self.state = ServiceState.STARTING
        self.metrics = metrics if metrics is not None else Metrics(registry.tasks)
        self.broker = make_broker(
            settings.broker,
            settings.store.log_max_bytes,
            settings.topics,
            self.metrics,
            settings.dead,
        )
        self.store_file = claim_store_file(settings) if self.broker.durable else None
        result_ttl, max_bytes = settings.jobs.result_ttl, settings.store.max_bytes
        self.store = (
            JobStore(result_ttl, max_bytes=max_bytes)
            if self.store_file is None
            else self.store_file.open(result_ttl, max_bytes)
        )
        self.log = EventLog(
            self.broker,
            self.store,
            submit_timeout=settings.broker.confirm_timeout,
            write_timeout=settings.broker.heartbeat,
        )
        self.checkpointer = (
            None if self.store_file is None else make_checkpointer(settings, self.store, self.log)
        )
        max_timeout = (
            settings.broker.consumer_timeout if self.broker.durable else submission.MAX_TIMEOUT
        )
        self.jobs = Jobs(
            registry,
            settings,
            self.broker,
            self.log,
            self.store,
            max_timeout,
            self._check_open,
            self.metrics,
        )
        self.topics = Topics(
            self.broker.topics, settings.topics.max_message_bytes, self._check_open
        )
        self.dead_letters = DeadLetters(
            self.jobs, self.store, self.log, self.broker, self._check_open
        )
        self.rates = Rates()
        self.queue_stats = QueueStats(
            registry.queues, self.broker, self.store, self.rates, settings.dead, self._check_open
        )
        self.job_events = JobEvents(
            registry.tasks,
            self.topics,
            lambda: self.log.applying_own,
            tracebacks=settings.auth.mode == "none",
        )
        if self.job_events:
            self.store.listeners.append(self.job_events.on_change)
        self.runner = Runner(
            registry.tasks,
            settings.jobs,
            self.log,
            self.broker,
            self.store,
            submit=lambda body, owner: self.jobs.submit(body, owner=owner),
            publish=self.topics.publish,
            concurrency=settings.broker.prefetch,
            # Lower priorities are delayed, not held until the broker's consumer_timeout.
            max_wait=settings.broker.consumer_timeout / 4,
            # Nor are jobs behind a queue whose every slot is held by a stuck thread: RabbitMQ
            # would close their channel (a reconnect), and another process may have room. On
            # memory:// there is no other process, and no consumer_timeout: they wait.
            give_back_after=settings.broker.consumer_timeout / 4 if self.broker.durable else None,
            metrics=self.metrics,
        )
        self.store.listeners.append(self.metrics.outcome_listener(lambda: self.log.applying_own))
        #: What a scrape reads of this service (queues, broker, log); `refresh()` it first.
        self.gauges = ServiceGauges(self)
        self.metrics.registry.register(self.gauges)
        #: Submits the periodic tasks' ticks while this process leads (None: the app has none).
        self.scheduler: Scheduler | None = None
        if registry.schedules:
            # Before the log is read: the record of the latest ticks is built from it.
            record = TickRecord(self.store, registry.schedules)
            self.scheduler = Scheduler(
                registry.schedules, self.jobs.submit_once, self.log.barrier, record
            )
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Connect, complete the store (checkpoint, then the log), then start consuming jobs."""
        started = time.monotonic()
        if self.checkpointer is not None:
            await self.checkpointer.restore_newest()
        resumed = self.store.offset
        queues = self.registry.queues
        await self.broker.start(queues, self.log.on_log, self.runner.on_dead, resumed)
        self._enter(ServiceState.REPLAYING)
        self.log.start()
        await self._replay()
        logger.info(
            "job store ready: %d jobs, %d log entries applied (after offset %s) in %.2f s",
            len(self.store),
            self.log.entries_applied,
            resumed,
            time.monotonic() - started,
        )
        for queue in sorted(queues):
            await self.broker.consume(queue, self.runner.on_delivery)
        self._enter(ServiceState.READY)
        # From now on: what the replay applied is not of the last minute.
        self.rates.start()
        self.store.listeners.append(self.rates.on_change)
        if self.scheduler is not None:
            # Once ready, when ticks can be submitted; the lead is given up by stop_consuming().
            await self.broker.lead(self.scheduler.on_leader_change)
        self._background.append(asyncio.create_task(self._expire_forever(), name="aioqueue-expiry"))
        if self.checkpointer is not None:
            checkpoints = self.checkpointer.run()
            self._background.append(asyncio.create_task(checkpoints, name="aioqueue-checkpoints"))

    def _enter(self, state: ServiceState) -> None:
        if self.state is not ServiceState.STOPPING:  # stopping is for good
            self.state = state

    async def _replay(self) -> None:
        # The barrier's echo comes back after every older entry is applied. A long log takes
        # longer than one echo timeout to replay, and the broker may be away: try again.
        while True:
            try:
                await self.log.barrier()
            except BrokerUnavailable as exc:
                logger.info(
                    "reading the event log: %d entries so far (%s)", self.log.entries_applied, exc
                )
                await asyncio.sleep(0.2)
                continue
            return

    async def shutdown(self, grace: float) -> int:
        """G4: refuse new jobs (503), stop consuming, give running jobs `grace` seconds, and
        give the rest back to their queues. Returns how many were given back."""
        self.state = ServiceState.STOPPING
        with contextlib.suppress(Exception):
            await self.broker.stop_consuming()
        return await self.runner.drain(grace)

    async def close(self) -> None:
        self.state = ServiceState.STOPPING
        # The registry may outlive the service (a served application's): it reads no closed store.
        with contextlib.suppress(KeyError):  # closed twice
            self.metrics.registry.unregister(self.gauges)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.broker.stop_consuming()
        if self.scheduler is not None:
            await self.scheduler.close()
        await self.job_events.close()
        await self.log.close()
        await self.broker.close()
        self.runner.close()
        self.store.close()
        if self.store_file is not None:
            self.store_file.release()

    def schedules(self) -> list[dict[str, Any]]:
        """The periodic schedules as `GET /v1/schedules` lists them; NotReady (503) until the
        store (and with it the record of the latest ticks) is complete."""
        self._check_open(False)
        return [] if self.scheduler is None else self.scheduler.describe()

    def problem(self) -> str | None:
        """None when ready to serve; else why not (for /readyz and 503s)."""
        if self.state is ServiceState.STOPPING:
            return "shutting down"
        if self.state is ServiceState.STARTING:
            return self.broker.problem() or "starting"
        if self.state is ServiceState.REPLAYING:
            return self.broker.problem() or "reading the event log"
        return self.broker.problem()

    def _check_open(self, new_work: bool) -> None:
        """NotReady (503) until the store is complete; with `new_work`, also once stopping."""
        if self.state in (ServiceState.STARTING, ServiceState.REPLAYING):
            raise NotReady(self.problem() or self.state.value)
        if new_work and self.state is ServiceState.STOPPING:
            raise NotReady("shutting down")

    async def _expire_forever(self) -> None:
        period = min(60.0, max(1.0, self.settings.jobs.result_ttl / 10))
        loop = asyncio.get_running_loop()
        due = loop.time() + period
        while True:
            # Every process applies every entry of the log, submits or not: each keeps its own
            # store under store.max_bytes, checked more often than result_ttl's expiry is due.
            await self.store.make_room()
            await asyncio.sleep(MAKE_ROOM_EVERY)
            if loop.time() < due:
                continue
            due = loop.time() + period
            expired = 0
            while (chunk := self.store.expire()) == EXPIRE_CHUNK:
                expired += chunk
                await asyncio.sleep(0)  # let the loop serve meanwhile
            expired += chunk
            if expired:
                logger.info("forgot %d jobs finished more than result_ttl ago", expired)
