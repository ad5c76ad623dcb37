"""aioqueue end to end against raw aio-pika, in one run on the same RabbitMQ.

(a) the ceiling: publish with confirms to a quorum queue, consume (prefetch 32), ack;
(b) aioqueue: HTTP submit of a no-op job -> its `succeeded` event on a websocket.
Both keep C jobs in flight; latency is from just before the publish/POST to the arrival.

    python bench/e2e.py                 # starts a private RabbitMQ node (needs rabbitmq-server)
    python bench/e2e.py --url amqp://guest:guest@127.0.0.1:5672/ -n 5000 -c 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.rabbitmq import RabbitNode  # noqa: E402
from tests.support import ServeProcess, wait_ready  # noqa: E402


@dataclass
class Result:
    name: str
    jobs: int
    seconds: float
    latencies: list[float]
    server_cpu: float = 0.0

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_window(count: int, concurrency: int, one: Any) -> tuple[float, list[float]]:
    """Run `one(i)` `count` times with `concurrency` in flight; (seconds, latencies)."""
    latencies: list[float] = []
    next_index = iter(range(count))

    async def worker(slot: int) -> None:
        for i in next_index:
            started = time.perf_counter()
            await one(slot, i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with asyncio.timeout(600):
        await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    return time.perf_counter() - started, latencies


async def raw_round_trips(url: str, count: int, concurrency: int, prefetch: int) -> Result:
    connection = await aio_pika.connect(url)
    async with connection:
        publisher = await connection.channel(publisher_confirms=True)
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=prefetch)
        name = f"bench.raw.{secrets.token_hex(4)}"
        queue = await consumer.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        waiting: dict[str, asyncio.Future[None]] = {}

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            future = waiting.pop(message.message_id or "", None)
            if future is not None:
                future.set_result(None)

        tag = await queue.consume(on_message)
        loop = asyncio.get_running_loop()

        async def one(slot: int, i: int) -> None:
            message_id = f"{slot}-{i}"
            arrived = waiting[message_id] = loop.create_future()
            body = orjson.dumps({"task": "noop", "args": {"n": i}})
            message = aio_pika.Message(
                body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await publisher.default_exchange.publish(message, name)
            await arrived

        await run_window(min(200, count), concurrency, one)  # warm-up
        seconds, latencies = await run_window(count, concurrency, one)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
    return Result("raw aio-pika", count, seconds, latencies)


async def aioqueue_round_trips(server: ServeProcess, count: int, concurrency: int) -> Result:
    limits = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=limits) as http:
        await wait_ready(http, server.url)
        sockets = [await http.ws_connect(server.url + "/v1/ws") for _ in range(concurrency)]
        headers = {"Content-Type": "application/json"}

        async def one(slot: int, i: int) -> None:
            body = orjson.dumps({"task": "noop", "args": {"n": i}})
            async with http.post(server.url + "/v1/jobs", data=body, headers=headers) as response:
                assert response.status == 202, await response.text()
                job_id = (await response.json())["id"]
            ws = sockets[slot]
            channel = f"job:{job_id}"
            await ws.send_str(orjson.dumps({"op": "subscribe", "channel": channel}).decode())
            while True:
                frame = orjson.loads((await ws.receive(timeout=30)).data)
                if frame.get("type") == "job" and frame["job"]["status"] == "succeeded":
                    break
            await ws.send_str(orjson.dumps({"op": "unsubscribe", "channel": channel}).decode())

        assert server.proc is not None
        process = psutil.Process(server.proc.pid)
        await run_window(min(200, count), concurrency, one)  # warm-up
        cpu_before = sum(process.cpu_times()[:2])
        seconds, latencies = await run_window(count, concurrency, one)
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        for ws in sockets:
            await ws.close()
    return Result("aioqueue end to end", count, seconds, latencies, server_cpu=cpu)


def report(raw: Result, ours: Result) -> None:
    print(f"{'':22}{'jobs':>7}{'jobs/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for result in (raw, ours):
        print(
            f"{result.name:22}{result.jobs:7d}{result.rate:10.0f}"
            f"{result.percentile(0.5):9.1f}{result.percentile(0.99):9.1f}"
        )
    print(f"aioqueue server CPU per job: {1e6 * ours.server_cpu / ours.jobs:.0f} µs")
    print(f"aioqueue/raw throughput ratio: {ours.rate / raw.rate:.2f}")


async def main(url: str, count: int, concurrency: int, prefetch: int) -> None:
    raw = await raw_round_trips(url, count, concurrency, prefetch)
    prefix = f"bench{secrets.token_hex(3)}"
    env = {"AIOQUEUE_APP": "bench.apps:app", "AIOQUEUE_BROKER__PREFETCH": str(prefetch)}
    with tempfile.TemporaryDirectory() as logs:
        server = ServeProcess(url, prefix, env).start(Path(logs))
        try:
            ours = await aioqueue_round_trips(server, count, concurrency)
        finally:
            server.signal(signal.SIGTERM)
            server.stop()
    report(raw, ours)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="RabbitMQ to use (default: start a private node)")
    parser.add_argument("-n", type=int, default=3000, help="jobs per side (default 3000)")
    parser.add_argument("-c", type=int, default=50, help="jobs in flight (default 50)")
    parser.add_argument("--prefetch", type=int, default=32)
    args = parser.parse_args()
    if args.url:
        asyncio.run(main(args.url, args.n, args.c, args.prefetch))
        return
    with tempfile.TemporaryDirectory(prefix="aioqueue-bench-") as base:
        node = RabbitNode(Path(base), name="aioqueue-bench").start()
        try:
            asyncio.run(main(node.url, args.n, args.c, args.prefetch))
        finally:
            node.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
