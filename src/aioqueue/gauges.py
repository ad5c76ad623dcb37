"""A service's metrics that are read when scraped, not counted as they happen: queue depths and
consumers, stuck threads, the broker's connection, the event log's lag, the checkpoint's age.

Queue depths come from the broker (`Broker.inspect`: on RabbitMQ a passive declare per queue and
band, and a look at the log's newest chunk). A scrape awaits `refresh()` first, which asks the
broker at most once every `MAX_AGE` seconds, however many scrapes come, and all waiting for one
answer share it; prometheus-client's `collect()` then only reads what is there. A value the broker
could not give is left out of the scrape rather than shown stale.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aioqueue.broker.base import Inspection
from aioqueue.errors import BrokerUnavailable

if TYPE_CHECKING:
    from prometheus_client import Metric

    from aioqueue.broker.base import Broker
    from aioqueue.checkpointer import Checkpointer
    from aioqueue.eventlog import EventLog
    from aioqueue.runner import Runner
    from aioqueue.store import JobStore
    from aioqueue.tasks import Registry

logger = logging.getLogger(__name__)

#: Seconds an inspection of the broker is used for before the next scrape asks again.
MAX_AGE = 2.0


class Observed(Protocol):
    """What the gauges read of a service (`service.Service` is one): a protocol, so that this
    module needs no import of the service, which imports it."""

    broker: Broker
    runner: Runner
    registry: Registry
    store: JobStore
    log: EventLog
    checkpointer: Checkpointer | None


class ServiceGauges(Collector):
    def __init__(self, service: Observed) -> None:
        self._service = service
        self._inspection: Inspection | None = None
        #: Messages in the dead-letter queue, as the broker last counted them.
        self._dead_letters: int | None = None
        self._inspected_at = -MAX_AGE
        self._inspecting: asyncio.Task[None] | None = None

    async def refresh(self) -> None:
        """Ask the broker again if the last answer is older than `MAX_AGE` seconds."""
        if time.monotonic() - self._inspected_at < MAX_AGE:
            return
        if self._inspecting is None:
            self._inspecting = asyncio.create_task(self._inspect())
        # Shielded: a scrape that gives up does not cancel the others' answer.
        await asyncio.shield(self._inspecting)

    async def _inspect(self) -> None:
        broker = self._service.broker
        try:
            self._inspection = await broker.inspect()
            self._dead_letters = await broker.dead_letter_count()
        except BrokerUnavailable as exc:
            logger.debug("metrics: the broker could not be inspected: %s", exc)
            self._inspection = self._dead_letters = None
        except Exception:  # a bug: the scrape goes on without the broker's figures
            logger.exception("metrics: inspecting the broker failed")
            self._inspection = self._dead_letters = None
        finally:
            # A failure is remembered as long as an answer: a broker that is away is not asked
            # again by every scrape.
            self._inspected_at = time.monotonic()
            self._inspecting = None

    def describe(self) -> Iterator[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        return self._families(read=True)

    def _families(self, read: bool = False) -> Iterator[Metric]:
        """Each family, with its samples when `read` (else for `describe`: names only)."""
        service = self._service
        inspection = self._inspection if read else None
        depth = GaugeMetricFamily(
            "aioqueue_queue_depth",
            "Job messages ready in each priority band of each queue, as the broker counts them"
            " (the same from every process): not those delivered and unacked, nor delayed ones",
            labels=["queue", "band"],
        )
        consumers = GaugeMetricFamily(
            "aioqueue_queue_consumers",
            "Consumers on each priority band of each queue, every process's",
            labels=["queue", "band"],
        )
        for band in inspection.bands if inspection is not None else ():
            depth.add_metric([band.queue, band.band], band.ready)
            consumers.add_metric([band.queue, band.band], band.consumers)
        yield depth
        yield consumers
        dead = GaugeMetricFamily(
            "aioqueue_dead_letter_queue_messages",
            "Messages in the dead-letter queue (every process's), bounded by [dead] max_length"
            " and max_age_seconds",
        )
        if read and self._dead_letters is not None:
            dead.add_metric([], self._dead_letters)
        yield dead
        stuck = GaugeMetricFamily(
            "aioqueue_stuck_threads",
            "Sync tasks' threads still running after their attempt ended, each holding a slot of"
            " its queue in this process",
            labels=["queue"],
        )
        if read:
            by_queue = service.runner.stuck_threads_by_queue
            for queue in sorted(set(service.registry.queues) | set(by_queue)):
                stuck.add_metric([queue], by_queue.get(queue, 0))
        yield stuck
        connected = GaugeMetricFamily(
            "aioqueue_broker_connected",
            "1 while connected to the broker with the topology declared, else 0",
        )
        if read:
            connected.add_metric([], int(service.broker.connected))
        yield connected
        yield from self._log_families(inspection, read)

    def _log_families(self, inspection: Inspection | None, read: bool) -> Iterator[Metric]:
        service = self._service
        lag = GaugeMetricFamily(
            "aioqueue_event_log_lag",
            "Event log entries (offsets) this process has yet to apply: from the newest the"
            " broker tells of (on RabbitMQ, the first of the log's newest chunk) to the last"
            " applied",
        )
        if inspection is not None and inspection.log_head is not None:
            applied = service.store.offset
            behind = inspection.log_head - (-1 if applied is None else applied)
            lag.add_metric([], max(0, behind))
        yield lag
        applied_total = CounterMetricFamily(
            "aioqueue_event_log_entries_applied",
            "Event log entries this process applied to its job store (every process's writes)",
        )
        if read:
            applied_total.add_metric([], service.log.entries_applied)
        yield applied_total
        age = GaugeMetricFamily(
            "aioqueue_checkpoint_age_seconds",
            "Seconds since the newest checkpoint was written (RabbitMQ only; absent before the"
            " first)",
        )
        checkpointer = service.checkpointer
        newest = checkpointer.newest_at if read and checkpointer is not None else None
        if newest is not None:
            age.add_metric([], max(0.0, time.time() - newest))
        yield age
