"""`GET /v1/queues`: each queue's depth per priority band, consumers, rates, oldest waiting job
and dead letters, from three sources, each the whole cluster's as seen from any process:

- the broker: the messages ready in each band's queue, and the consumers attached to it (on
  RabbitMQ, a passive declare of each, whose counts are the broker's);
- the event log, which every process applies whole: `Rates` counts, over a sliding minute, the
  jobs and attempts sent to each queue (`queued`, `scheduled` and `retrying` events: in) and
  those started (`started`: out). Counting what this process publishes and consumes would see
  one process's share; the log holds every process's events, at no cost beyond a counter;
- the job store: each queue's oldest `queued` job, its running jobs and its dead letters (failed
  and dead jobs), each read from an index.

A report is kept for `CACHE_SECONDS`: a dashboard open in many browsers costs the broker one
round of passive declares a second at most.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any

from aioqueue.broker.base import PRIORITY_BANDS, BandStats, Broker
from aioqueue.config import DeadSettings
from aioqueue.errors import BrokerUnavailable
from aioqueue.jobs import Job, JobStatus
from aioqueue.store import JobStore

#: Seconds the rates are taken over.
WINDOW = 60
#: Store events that send a job or an attempt to its queue (now or when due), and that take one.
IN_EVENTS = frozenset({"queued", "scheduled", "retrying"})
OUT_EVENTS = frozenset({"started"})
#: Seconds a report is served again before it is made anew.
CACHE_SECONDS = 1.0


class Rates:
    """Events per queue per second over the last `WINDOW` seconds, counted as the log is applied
    (a store listener), in one-second buckets: memory stays flat whatever the rate."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        #: Per (queue, direction): counts per bucket, and the second each bucket counts.
        self._buckets: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def start(self) -> None:
        """Count from now: the entries a process applies as it starts (its replay of the log)
        are older than they look, so the service starts the rates once it is ready."""
        self._since = self._clock()
        self._buckets.clear()

    def on_change(self, event: str, job: Job) -> None:
        if event in IN_EVENTS:
            self.count(job.queue, "in")
        elif event in OUT_EVENTS:
            self.count(job.queue, "out")

    def count(self, queue: str, direction: str) -> None:
        second = int(self._clock())
        counts, seconds = self._buckets.setdefault(
            (queue, direction), ([0] * WINDOW, [-1] * WINDOW)
        )
        slot = second % WINDOW
        if seconds[slot] != second:
            seconds[slot], counts[slot] = second, 0
        counts[slot] += 1

    def per_second(self, queue: str, direction: str) -> float:
        """Events per second over the last minute, or since `start()` if that is less (at
        least a second)."""
        now = self._clock()
        found = self._buckets.get((queue, direction))
        if found is None:
            return 0.0
        counts, seconds = found
        second = int(now)
        total = sum(n for n, at in zip(counts, seconds, strict=True) if second - at < WINDOW)
        return total / min(WINDOW, max(1.0, now - self._since))


class QueueStats:
    """The report of `GET /v1/queues` (and the figures a metrics exporter reads)."""

    def __init__(
        self,
        queues: Collection[str],
        broker: Broker,
        store: JobStore,
        rates: Rates,
        dead: DeadSettings,
        check_open: Callable[[bool], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._queues = sorted(queues)
        #: NotReady (503) while the store is incomplete (`Service`).
        self._check_open = check_open
        self._broker = broker
        self._store = store
        self._rates = rates
        self._dead = dead
        self._clock = clock
        self._report: dict[str, Any] | None = None
        self._made_at = -CACHE_SECONDS
        self._making = asyncio.Lock()

    async def report(self) -> dict[str, Any]:
        """`{"queues": [...], "dead_letter_queue": {...}}`, at most `CACHE_SECONDS` old."""
        self._check_open(False)
        async with self._making:  # concurrent callers share one report
            if self._report is None or time.monotonic() - self._made_at >= CACHE_SECONDS:
                self._report = await self._make()
                self._made_at = time.monotonic()
            return self._report

    async def _make(self) -> dict[str, Any]:
        bands = await asyncio.gather(*(self._bands(queue) for queue in self._queues))
        counts = self._store.by_queue((JobStatus.RUNNING, JobStatus.FAILED, JobStatus.DEAD))
        oldest = self._store.oldest_queued(self._queues)
        now = self._clock()
        queues = []
        for queue, found in zip(self._queues, bands, strict=True):
            first = oldest.get(queue)
            queues.append(
                {
                    "name": queue,
                    "depth": None if found is None else sum(band.depth for band in found),
                    "bands": None if found is None else _bands(found),
                    "consumers": None if found is None else min(b.consumers for b in found),
                    "running": counts.get((queue, JobStatus.RUNNING), 0),
                    "in_per_s": round(self._rates.per_second(queue, "in"), 3),
                    "out_per_s": round(self._rates.per_second(queue, "out"), 3),
                    # Clocks of processes differ a little: never a negative age.
                    "oldest_age_s": None
                    if first is None
                    else round(max(0.0, now - first.created_at), 3),
                    "dead": counts.get((queue, JobStatus.FAILED), 0)
                    + counts.get((queue, JobStatus.DEAD), 0),
                }
            )
        try:
            messages: int | None = await self._broker.dead_letter_count()
        except BrokerUnavailable:
            messages = None
        dead_letter_queue = {
            "messages": messages,
            "max_length": self._dead.max_length,
            "max_age_seconds": self._dead.max_age_seconds,
        }
        return {"queues": queues, "dead_letter_queue": dead_letter_queue}

    async def _bands(self, queue: str) -> list[BandStats] | None:
        # The broker away: the figures of the log and the store still stand; the broker's are
        # null rather than the whole answer a 503.
        try:
            return await self._broker.queue_stats(queue)
        except BrokerUnavailable:
            return None


def _bands(found: list[BandStats]) -> dict[str, dict[str, int]]:
    return {
        name: {"depth": band.depth, "consumers": band.consumers}
        for name, band in zip(PRIORITY_BANDS, found, strict=True)
    }
