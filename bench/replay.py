"""How long a restart takes to rebuild the job store from the event log of N finished jobs.

1. A first `Service` on a fresh prefix declares the topology (and writes its start-up barrier).
2. N finished jobs go into that prefix's event log `P.events` the way aioqueue writes them: each
   job's spec (`aioqueue.submission.build_spec`) as an `aq-kind: job` entry, and their `started`
   and `succeeded` events (`aioqueue.runner.event`) as `aq-kind: events` entries of B events each.
   The specs are published straight into the stream by the default exchange rather than through
   `P.submit`, so no job message is queued; a batch of events is published only once the specs
   it refers to are confirmed, so the log holds every spec before its events.
3. Timed: `Service.start()` in this process, which returns once the whole log is replayed. Then
   the store must hold exactly the N jobs, all succeeded.

    python bench/replay.py                               # starts a private RabbitMQ node
    python bench/replay.py --url amqp://guest:guest@127.0.0.1:5672/ -n 100000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("src", "")]

import aio_pika  # noqa: E402
import aiormq  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402

from aioqueue.broker.amqp import KIND_HEADER, AmqpBroker  # noqa: E402
from aioqueue.broker.base import LogKind  # noqa: E402
from aioqueue.config import BrokerSettings, Settings  # noqa: E402
from aioqueue.jobs import JobStatus  # noqa: E402
from aioqueue.runner import event  # noqa: E402
from aioqueue.service import Service  # noqa: E402
from aioqueue.submission import build_spec  # noqa: E402
from bench.apps import app  # noqa: E402
from bench.common import (  # noqa: E402
    CpuMeter,
    broker_process,
    delete_topology,
    fresh_prefix,
    loop_name,
    machine,
    redact,
    revision,
    run,
)

#: Deadlines, in seconds.
START_DEADLINE = 60.0
PUBLISH_DEADLINE = 30.0
REPLAY_DEADLINE = 900.0
#: Writing the log may take this, plus 5 ms a job.
WRITE_DEADLINE = 300.0
MIB = 2**20


async def write_log(url: str, stream: str, settings: Settings, count: int, batch: int) -> int:
    """Publish `count` finished jobs into the stream; returns how many log entries that made."""
    connection = await aio_pika.connect(url, timeout=START_DEADLINE)
    entries = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True)

        async def publish(body: bytes, kind: LogKind) -> None:
            # As AmqpBroker._publish builds its messages.
            message = aio_pika.Message(
                body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={KIND_HEADER: kind.value},
            )
            async with asyncio.timeout(PUBLISH_DEADLINE):
                confirmation = await channel.default_exchange.publish(message, stream)
            if not isinstance(confirmation, aiormq.spec.Basic.Ack):
                raise RuntimeError(f"RabbitMQ refused a log entry: {confirmation!r}")

        jobs_per_batch = max(1, batch // 2)  # a started and a succeeded event per job
        pending: list[dict[str, Any]] = []  # events of the jobs published in the last round
        for first in range(0, count, jobs_per_batch):
            numbers = range(first, min(count, first + jobs_per_batch))
            specs = [
                build_spec(
                    {"task": "noop", "args": {"n": n}}, app.tasks, settings.jobs, time.time()
                )
                for n in numbers
            ]
            # This round's specs, with the events of the last round's jobs: those are confirmed.
            writes = [publish(orjson.dumps(spec), LogKind.JOB) for spec in specs]
            if pending:
                writes.append(publish(_batch(pending), LogKind.EVENTS))
            await asyncio.gather(*writes)
            entries += len(writes)
            pending = []
            for spec, n in zip(specs, numbers, strict=True):
                pending.append(event(spec["id"], "started", 1))
                pending.append(event(spec["id"], "succeeded", 1, result=n))
        if pending:
            await publish(_batch(pending), LogKind.EVENTS)
            entries += 1
    return entries


def _batch(events: list[dict[str, Any]]) -> bytes:
    # As EventLog._write: {"id": batch_id, "events": [...]}.
    return orjson.dumps({"id": secrets.token_hex(8), "events": events})


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


async def bench(url: str, count: int, batch: int, broker_pid: int | None) -> None:
    prefix = fresh_prefix("replay")
    settings = Settings(broker=BrokerSettings(url=url, prefix=prefix))
    print(f"{revision()}; RabbitMQ {redact(url)}; {machine()}; on {loop_name()}")
    try:
        first = Service(app, settings)  # declares the topology
        started = time.perf_counter()
        try:
            async with asyncio.timeout(START_DEADLINE):
                await first.start()
            empty = time.perf_counter() - started
        finally:
            async with asyncio.timeout(START_DEADLINE):
                await first.close()

        started = time.perf_counter()
        assert isinstance(first.broker, AmqpBroker), "replay.py needs an amqp:// URL"
        stream = first.broker.names["events"]
        async with asyncio.timeout(WRITE_DEADLINE + count * 0.005):
            written = await write_log(url, stream, settings, count, batch)
        took = time.perf_counter() - started
        print(f"wrote {count:,} finished jobs as {written:,} log entries in {took:.1f} s")

        process = psutil.Process()
        service = Service(app, settings)
        gc.collect()
        rss_before = process.memory_info().rss
        meter = CpuMeter(None, broker_process(url, broker_pid))
        meter.start()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(REPLAY_DEADLINE):
                await service.start()
            seconds = time.perf_counter() - started
            meter.stop()
            gc.collect()
            rss_after = process.memory_info().rss
            jobs = len(service.store)
            entries = service.log.entries_applied
            page, _ = service.store.list(limit=count + 1)
            succeeded = sum(job.status is JobStatus.SUCCEEDED for job in page)
        finally:
            async with asyncio.timeout(START_DEADLINE):
                await service.close()
    finally:
        await delete_topology(url, prefix, sorted(app.queues))

    assert jobs == count, f"the store holds {jobs} jobs after the replay; {count} were written"
    assert succeeded == count, f"{succeeded} of {count} replayed jobs are succeeded"
    rows = [
        ("jobs", f"{jobs:,}"),
        ("log entries", f"{entries:,}"),
        ("replay seconds", f"{seconds:.2f}"),
        ("(start on the empty log s)", f"{empty:.2f}"),
        ("jobs/s replayed", f"{jobs / seconds:,.0f}"),
        ("log entries/s", f"{entries / seconds:,.0f}"),
        ("CPU s, this process", f"{meter.used('client') or 0:.2f}"),
        ("CPU s, RabbitMQ", _seconds(meter.used("broker"))),
        ("CPU s, other processes", f"{meter.others():.2f}"),
        ("RSS before MiB", f"{rss_before / MIB:.0f}"),
        ("RSS after MiB", f"{rss_after / MIB:.0f}"),
        ("RSS delta MiB", f"{(rss_after - rss_before) / MIB:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")
    print("(entries applied include the empty start-up barriers: one per Service.start, and one")
    print(" more each time the replay outlasts broker.heartbeat, when Service retries it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="AMQP URL of the RabbitMQ to use (default: a private node)")
    parser.add_argument("-n", type=int, default=100_000, help="finished jobs (default 100000)")
    parser.add_argument("--batch", type=int, default=500, help="events per log entry (500)")
    args = parser.parse_args()
    if args.n < 1 or args.batch < 2:
        parser.error("-n must be at least 1 and --batch at least 2")
    logging.basicConfig(level=logging.WARNING)
    if args.url:
        run(bench(args.url, args.n, args.batch, None))
        return
    from tests.rabbitmq import RabbitNode

    with tempfile.TemporaryDirectory(prefix="aioqueue-bench-rabbit-") as base:
        print("starting a private RabbitMQ node ...", flush=True)
        node = RabbitNode(Path(base)).start()
        try:
            run(bench(node.url, args.n, args.batch, node.pid))
        finally:
            node.stop()


if __name__ == "__main__":
    main()
