"""How long a process takes to be ready, with N finished and M pending jobs in the event log.

1. A first `Service` on a fresh prefix declares the topology.
2. N finished jobs and M pending ones (delayed 30 days) go into that prefix's event log
   `P.events` the way aioqueue writes them: each job's spec (`aioqueue.submission.build_spec`) as
   an `aq-kind: job` entry, and the finished ones' `started` and `succeeded` events
   (`aioqueue.events`) as `aq-kind: events` entries of B events each. The specs are
   published straight into the stream by the default exchange, so no job message is queued; a
   batch of events is published only once the specs it refers to are confirmed.
3. Three starts, each timed in a process of its own (`Service.start()`, which returns once the
   store is complete and every consumer attached; building the Service, which opens and checks
   its store file, included), with its RSS:
   - **whole log**: no store of its own and no checkpoint, so it reads the whole log (the only
     way before checkpoints; its store then writes the first checkpoint);
   - **restart**: the same process again, on the same disk: it resumes from its store's offset;
   - **fresh process**: a new host, no disk: it loads the newest checkpoint, then the log after it.
   Each must hold exactly the N + M jobs.

    python bench/replay.py                               # starts a private RabbitMQ node
    python bench/replay.py --url amqp://guest:guest@127.0.0.1:5672/ -n 100000 --pending 10000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import secrets
import subprocess
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

from aioqueue import events  # noqa: E402
from aioqueue.broker.amqp import KIND_HEADER, AmqpBroker  # noqa: E402
from aioqueue.broker.base import LogKind  # noqa: E402
from aioqueue.config import BrokerSettings, Settings, StoreSettings  # noqa: E402
from aioqueue.events import Event, JobSpec, Started, Succeeded  # noqa: E402
from aioqueue.service import Service  # noqa: E402
from aioqueue.submission import build_spec  # noqa: E402
from bench.apps import app  # noqa: E402
from bench.common import (  # noqa: E402
    delete_names,
    delete_topology,
    fresh_prefix,
    loop_name,
    machine,
    on_rabbitmq,
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
THIRTY_DAYS = 30 * 86400


def settings(url: str, prefix: str, folder: Path) -> Settings:
    return Settings(
        broker=BrokerSettings(url=url, prefix=prefix), store=StoreSettings(dir=str(folder))
    )


async def write_log(
    url: str, stream: str, config: Settings, finished: int, pending: int, batch: int
) -> int:
    """Publish the jobs into the stream; returns how many log entries that made."""
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
        pending_events: list[Event] = []  # events of the jobs published last round
        total = finished + pending
        for first in range(0, total, jobs_per_batch):
            numbers = range(first, min(total, first + jobs_per_batch))
            specs = [_spec(config, n, delayed=n >= finished) for n in numbers]
            # This round's specs, with the events of the last round's jobs: those are confirmed.
            writes = [publish(spec.encode(), LogKind.JOB) for spec in specs]
            if pending_events:
                writes.append(publish(_batch(pending_events), LogKind.EVENTS))
            await asyncio.gather(*writes)
            entries += len(writes)
            pending_events = []
            for spec, n in zip(specs, numbers, strict=True):
                if n < finished:
                    pending_events.append(Started(spec.id, 1))
                    pending_events.append(Succeeded(spec.id, 1, n))
        if pending_events:
            await publish(_batch(pending_events), LogKind.EVENTS)
            entries += 1
    return entries


def _spec(config: Settings, n: int, delayed: bool) -> JobSpec:
    body: dict[str, Any] = {"task": "noop", "args": {"n": n}}
    if delayed:
        body["delay"] = THIRTY_DAYS
    return build_spec(body, app.tasks, config.jobs, time.time())


def _batch(batch: list[Event]) -> bytes:
    # As EventLog._write: {"id": batch_id, "events": [...]}.
    return orjson.dumps({"id": secrets.token_hex(8), "events": [events.encode(e) for e in batch]})


async def measure_start(url: str, prefix: str, folder: Path, checkpoint: bool) -> dict[str, Any]:
    """Start a Service (in this process, which does nothing else) and report on it."""
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    service = Service(app, settings(url, prefix, folder))  # opens (and checks) its store file
    try:
        async with asyncio.timeout(REPLAY_DEADLINE):
            await service.start()
        seconds = time.perf_counter() - started
        rss = process.memory_info().rss
        result: dict[str, Any] = {
            "seconds": seconds,
            "rss_mib": rss / MIB,
            "rss_delta_mib": (rss - rss_before) / MIB,
            "jobs": len(service.store),
            "entries": service.log.entries_applied,
        }
        if checkpoint:
            assert service.checkpointer is not None
            began = time.perf_counter()
            record = await service.checkpointer.write()
            assert record is not None
            result["checkpoint"] = {
                "seconds": time.perf_counter() - began,
                "mb": record["bytes"] / 1e6,
                "chunks": record["chunks"],
            }
    finally:
        async with asyncio.timeout(START_DEADLINE):
            await service.close()
    return result


def start_in_a_process(url: str, prefix: str, folder: Path, checkpoint: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--url", url, "--measure", prefix, str(folder)]
    if checkpoint:
        command.append("--checkpoint")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=REPLAY_DEADLINE + 60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"the measured start failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def bench(url: str, finished: int, pending: int, batch: int) -> None:
    prefix = fresh_prefix("replay")
    print(f"{revision()}; RabbitMQ {redact(url)}; {machine()}; on {loop_name()}")
    with tempfile.TemporaryDirectory(prefix="aioqueue-bench-stores-") as base:
        folders = Path(base)
        first = Service(app, settings(url, prefix, folders / "setup"))
        try:
            async with asyncio.timeout(START_DEADLINE):
                await first.start()  # declares the topology
            assert isinstance(first.broker, AmqpBroker), "replay.py needs an amqp:// URL"
            stream = first.broker.names["events"]
        finally:
            async with asyncio.timeout(START_DEADLINE):
                await first.close()
        try:
            started = time.perf_counter()
            config = settings(url, prefix, folders / "setup")
            async with asyncio.timeout(WRITE_DEADLINE + (finished + pending) * 0.005):
                written = await write_log(url, stream, config, finished, pending, batch)
            took = time.perf_counter() - started
            print(
                f"wrote {finished:,} finished and {pending:,} pending jobs as {written:,} log"
                f" entries in {took:.1f} s"
            )
            cases = [
                ("whole log (no store, no checkpoint)", folders / "host-a", True),
                ("restart (its own store)", folders / "host-a", False),
                ("fresh process (newest checkpoint)", folders / "host-b", False),
            ]
            results = []
            for name, folder, checkpoint in cases:
                result = await asyncio.to_thread(
                    start_in_a_process, url, prefix, folder, checkpoint
                )
                assert result["jobs"] == finished + pending, (name, result)
                results.append((name, result))
        finally:
            await delete_topology(url, prefix, sorted(app.queues))
            await delete_names(url, [f"{prefix}.checkpoint.{n}" for n in _checkpoints(folders)])
    _report(results)


def _checkpoints(folders: Path) -> list[str]:
    """Ids of the checkpoints written, as the stores recorded them (for the clean-up)."""
    import sqlite3

    ids = []
    for path in folders.rglob("*.sqlite3"):
        db = sqlite3.connect(path)
        row = db.execute("SELECT value FROM meta WHERE key = 'checkpoints'").fetchone()
        db.close()
        if row is not None:
            ids += [entry["stream"].rsplit(".checkpoint.", 1)[1] for entry in orjson.loads(row[0])]
    return sorted(set(ids))


def _report(results: list[tuple[str, dict[str, Any]]]) -> None:
    width = max(len(name) for name, _ in results)
    print(f"{'start':<{width}}  {'ready s':>8}  {'entries':>8}  {'RSS MiB':>8}  {'+RSS':>6}")
    for name, r in results:
        print(
            f"{name:<{width}}  {r['seconds']:>8.2f}  {r['entries']:>8,}  {r['rss_mib']:>8.0f}"
            f"  {r['rss_delta_mib']:>6.0f}"
        )
    written = results[0][1]["checkpoint"]
    print(
        f"checkpoint written after the first start: {written['mb']:.1f} MB in"
        f" {written['chunks']} chunks, {written['seconds']:.2f} s"
    )
    print("(ready s: Service() and its start() in a process of its own, which imported aioqueue;")
    print(" entries: log entries applied; +RSS: the start's own growth of the process's RSS)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="AMQP URL of the RabbitMQ to use (default: a private node)")
    parser.add_argument("-n", type=int, default=100_000, help="finished jobs (default 100000)")
    parser.add_argument("--pending", type=int, default=10_000, help="pending jobs (10000)")
    parser.add_argument("--batch", type=int, default=500, help="events per log entry (500)")
    parser.add_argument("--measure", nargs=2, metavar=("PREFIX", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.n < 1 or args.pending < 0 or args.batch < 2:
        parser.error("-n must be at least 1, --pending at least 0 and --batch at least 2")
    logging.basicConfig(level=logging.WARNING)
    if args.measure:
        prefix, folder = args.measure
        print(json.dumps(run(measure_start(args.url, prefix, Path(folder), args.checkpoint))))
        return
    on_rabbitmq(args.url, lambda url, _: bench(url, args.n, args.pending, args.batch))


if __name__ == "__main__":
    os.environ.pop("AIOQUEUE_CONFIG", None)
    main()
