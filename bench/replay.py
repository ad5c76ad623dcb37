"""How long a restart takes to rebuild the job store from the event log, for N finished jobs.

Writes N finished jobs into a fresh prefix's event log the way aioqueue writes them (each job's
spec as a `job` entry, then its `started` and `succeeded` events in batches of 500 events), then
times `Service.start()`, which returns once the whole log is replayed.

    python bench/replay.py                    # 100,000 jobs, on a private RabbitMQ node
    python bench/replay.py --url amqp://guest:guest@127.0.0.1:5672/ -n 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import aio_pika
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aioqueue.cli import _run as run  # noqa: E402
from aioqueue.config import BrokerSettings, Settings  # noqa: E402
from aioqueue.service import Service  # noqa: E402
from bench.apps import app  # noqa: E402
from tests.rabbitmq import RabbitNode  # noqa: E402

EVENTS_PER_BATCH = 500


async def write_log(url: str, stream: str, count: int) -> int:
    """Publish `count` finished jobs into the stream; returns the number of log entries."""
    connection = await aio_pika.connect(url)
    entries = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True)

        async def publish(body: bytes, kind: str) -> None:
            message = aio_pika.Message(
                body, headers={"aq-kind": kind}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await channel.default_exchange.publish(message, stream)

        now = time.time()
        chunk = EVENTS_PER_BATCH // 2
        for start in range(0, count, chunk):
            ids = [
                f"job-{n:08d}-{secrets.token_hex(6)}"
                for n in range(start, min(count, start + chunk))
            ]
            specs = [
                {"id": job_id, "task": "noop", "queue": "default", "args": {"n": n},
                 "max_attempts": 3, "timeout": 300.0, "created_at": now, "attempt": 1}
                for n, job_id in enumerate(ids, start)
            ]  # fmt: skip
            await asyncio.gather(*(publish(orjson.dumps(spec), "job") for spec in specs))
            events = []
            for job_id in ids:
                events.append({"job": job_id, "event": "started", "attempt": 1, "at": now})
                events.append(
                    {"job": job_id, "event": "succeeded", "attempt": 1, "at": now, "result": 0}
                )
            batch = {"id": secrets.token_hex(8), "events": events}
            await publish(orjson.dumps(batch), "events")
            entries += len(ids) + 1
    return entries


async def main(url: str, count: int) -> int:
    settings = Settings(broker=BrokerSettings(url=url, prefix=f"replay{secrets.token_hex(3)}"))
    first = Service(app, settings)  # declares the topology
    await first.start()
    await first.close()
    stream = f"{settings.broker.prefix}.events"
    started = time.perf_counter()
    entries = await write_log(url, stream, count)
    took = time.perf_counter() - started
    print(f"wrote {count} finished jobs ({entries} log entries) in {took:.1f} s")

    process = psutil.Process()
    rss_before = process.memory_info().rss
    service = Service(app, settings)
    started = time.perf_counter()
    async with asyncio.timeout(600):
        await service.start()
    seconds = time.perf_counter() - started
    rss_after = process.memory_info().rss
    jobs = len(service.store)
    await service.close()
    assert jobs == count, f"replayed {jobs} jobs, wrote {count}"
    print(f"{'jobs':>9}{'entries':>9}{'replay s':>10}{'jobs/s':>10}{'RSS +MiB':>10}")
    grown = (rss_after - rss_before) / 2**20
    print(f"{jobs:9d}{entries:9d}{seconds:10.2f}{jobs / seconds:10.0f}{grown:10.0f}")
    return 0


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="RabbitMQ to use (default: start a private node)")
    parser.add_argument("-n", type=int, default=100_000, help="finished jobs (default 100000)")
    args = parser.parse_args()
    if args.url:
        run(main(args.url, args.n))  # on uvloop, as `aioqueue serve` runs
        return
    with tempfile.TemporaryDirectory(prefix="aioqueue-bench-") as base:
        node = RabbitNode(Path(base), name="aioqueue-bench").start()
        try:
            run(main(node.url, args.n))
        finally:
            node.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
