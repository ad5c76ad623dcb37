"""Topic catch-up: a client subscribes with `since: -1` to N retained messages; against a raw
aio-pika stream consumer reading the same messages from the same stream.

1. The real `aioqueue serve bench.apps:app` starts in a subprocess on a fresh prefix (it
   declares the stream `P.topics`).
2. N messages on the topic `bench.catchup` go into the stream as aioqueue writes them (the body
   the JSON data, the topic in the `aq-topic` header), published straight into it by this
   process, B at a time in flight, each confirmed. A last `POST /v1/topics/bench.end` answers
   once the server's live reader has read past them all.
3. (a) raw aio-pika, the ceiling: a consumer of the stream from its first offset, prefetch 512
   and a multiple ack every 128 messages (what aioqueue's catch-up reader uses), counting the
   messages whose topic header is `bench.catchup`, until it has N.
   (b) aioqueue: a websocket client (`bench/wsclient.py`) subscribes to `topic:bench.catchup`
   with `since: -1` and counts `message` frames until it has N, each once and in order of
   offset (checked).
   Each is timed from its subscribe to its N-th message; messages/s is N over that time.

    python bench/catchup.py                                 # starts a private RabbitMQ node
    python bench/catchup.py --url amqp://guest:guest@127.0.0.1:5672/ -n 100000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("src", "")]

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402
import aiormq  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
from aio_pika.abc import AbstractIncomingMessage  # noqa: E402

from aioqueue.broker.amqp_topics import READ_PREFETCH, TOPIC_HEADER  # noqa: E402
from bench.common import (  # noqa: E402
    CpuMeter,
    broker_process,
    delete_topology,
    fresh_prefix,
    loop_name,
    machine,
    on_rabbitmq,
    print_table,
    redact,
    revision,
)
from bench.e2e import QUEUES, Server, wait_ready  # noqa: E402
from bench.wsclient import WsClient  # noqa: E402

TOPIC = "bench.catchup"
JSON = {"Content-Type": "application/json"}
#: Deadlines, in seconds.
START_DEADLINE = 60.0
PUBLISH_DEADLINE = 30.0
#: A measured read may take this long, plus 1 ms a message.
READ_DEADLINE = 60.0


@dataclass
class Measured:
    name: str
    messages: int
    seconds: float
    meter: CpuMeter

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def us_per_message(self, process: str) -> str:
        used = self.meter.used(process)
        return "n/a" if used is None else f"{1e6 * used / self.messages:.1f}"


async def fill(url: str, stream: str, count: int, in_flight: int, size: int) -> float:
    """Publish `count` messages on TOPIC into the stream; returns the seconds it took."""
    padding = "x" * max(0, size - 20)
    connection = await aio_pika.connect(url, timeout=START_DEADLINE)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange

        async def publish(i: int) -> None:
            # As AmqpTopics.publish writes a message (its mark header only tells a publisher
            # its offset).
            message = aio_pika.Message(
                orjson.dumps({"i": i, "pad": padding}),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={TOPIC_HEADER: TOPIC},
            )
            confirmation = await exchange.publish(message, stream, timeout=PUBLISH_DEADLINE)
            if not isinstance(confirmation, aiormq.spec.Basic.Ack):
                raise RuntimeError(f"RabbitMQ refused message {i}: {confirmation!r}")

        began = time.perf_counter()
        for first in range(0, count, in_flight):
            await asyncio.gather(*(publish(i) for i in range(first, min(count, first + in_flight))))
        return time.perf_counter() - began


# (a) raw aio-pika ---------------------------------------------------------------------------


async def raw_read(
    url: str, stream: str, count: int, server: psutil.Process | None, broker: psutil.Process | None
) -> Measured:
    connection = await aio_pika.connect(url, timeout=START_DEADLINE)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=READ_PREFETCH)
        queue = await channel.get_queue(stream, ensure=True)
        done = asyncio.get_running_loop().create_future()
        seen = 0
        unacked = 0
        last = 0.0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen, unacked, last
            unacked += 1
            if unacked >= READ_PREFETCH // 4:
                unacked = 0
                await message.ack(multiple=True)
            headers = message.headers or {}
            topic = headers.get(TOPIC_HEADER)
            if isinstance(topic, bytes):
                topic = topic.decode()
            if topic == TOPIC:
                seen += 1
                if seen == count:
                    last = time.perf_counter()
                    if not done.done():
                        done.set_result(None)

        meter = CpuMeter(server, broker)
        meter.start()
        began = time.perf_counter()
        tag = await queue.consume(on_message, arguments={"x-stream-offset": "first"})
        async with asyncio.timeout(READ_DEADLINE + 0.001 * count):
            await done
        meter.stop()
        await queue.cancel(tag)
    return Measured("raw aio-pika", count, last - began, meter)


# (b) aioqueue -------------------------------------------------------------------------------


async def aioqueue_read(
    url: str, count: int, server: psutil.Process, broker: psutil.Process | None
) -> Measured:
    done = asyncio.get_running_loop().create_future()
    received = bytearray(count)  # 1 where message i came
    state = {"seen": 0, "offset": -1}
    expired: list[tuple[int, int]] = []  # (since, first) of each offset_expired frame
    problems: list[str] = []
    last = 0.0

    def fail(text: str) -> None:
        problems.append(text)
        if not done.done():
            done.set_exception(RuntimeError(text))

    def on_frame(payload: bytes, now: float) -> None:
        nonlocal last
        frame = orjson.loads(payload)
        kind = frame.get("type")
        if kind == "subscribed":
            return
        if kind == "error" and frame.get("code") == "offset_expired":
            expired.append((state["offset"], frame["first"]))
            return
        if kind != "message" or frame["offset"] <= state["offset"]:
            fail(f"unexpected frame: {payload[:300].decode(errors='replace')}")
            return
        state["offset"] = frame["offset"]
        i = frame["data"]["i"]
        if received[i]:
            fail(f"message {i} twice")
        received[i] = 1
        state["seen"] += 1
        if state["seen"] == count:
            last = now
            done.set_result(None)

    client = await WsClient.connect(url + "/v1/ws", on_frame)
    try:
        meter = CpuMeter(server, broker)
        meter.start()
        began = time.perf_counter()
        client.send_json({"op": "subscribe", "channel": "topic:" + TOPIC, "since": -1})
        async with asyncio.timeout(READ_DEADLINE + 0.001 * count):
            await done
        meter.stop()
        await asyncio.sleep(0.2)  # a duplicate would come now
        if problems or state["seen"] != count or not all(received):
            raise RuntimeError(f"aioqueue catch-up: {state['seen']} messages; {problems[:3]}")
    finally:
        client.close()
    if expired:
        # Every message came, so none was past the retention: see bench/README.md.
        print(
            f"aioqueue sent {len(expired)} offset_expired frames though no message was missing"
            f" (after offset -> first): {', '.join(f'{a} -> {b}' for a, b in expired[:8])}"
        )
    return Measured("aioqueue since=-1", count, last - began, meter)


# Report -------------------------------------------------------------------------------------


def report(sides: list[Measured]) -> None:
    header = "", "messages", "s", "messages/s", "client", "server", "RabbitMQ", "others"
    rows: list[tuple[str, ...]] = [header]
    for m in sides:
        rows.append(
            (
                m.name,
                f"{m.messages:,}",
                f"{m.seconds:.2f}",
                f"{m.rate:,.0f}",
                m.us_per_message("client"),
                m.us_per_message("server") if m.name.startswith("aioqueue") else "-",
                m.us_per_message("broker"),
                f"{100 * m.meter.others() / m.seconds:.0f}%",
            )
        )
    print_table(rows)
    print("client, server, RabbitMQ: CPU µs per message (user + system) over the measured read;")
    print("others: CPU of every other process then, in % of one core (a busy machine skews all)")
    for m in sides:
        if m.meter.others() > 0.1 * m.seconds:
            busy = ", ".join(f"{n} {100 * cpu / m.seconds:.0f}%" for cpu, n in m.meter.busiest)
            print(f"  WARNING: the machine was busy during {m.name}: {busy or 'unknown'}")
    raw = [m.rate for m in sides if not m.name.startswith("aioqueue")]
    ours = [m.rate for m in sides if m.name.startswith("aioqueue")]
    each = "" if len(raw) == 1 else f" (of the means of {len(raw)} rounds)"
    print(f"aioqueue/raw messages/s ratio{each}: {sum(ours) / sum(raw):.2f}")


async def bench(args: argparse.Namespace, url: str, broker_pid: int | None) -> None:
    broker = broker_process(url, broker_pid)
    print(f"{revision()}; RabbitMQ {redact(url)}; {machine()}; on {loop_name()}")
    prefix = fresh_prefix("catchup")
    stream = f"{prefix}.topics"
    try:
        with tempfile.NamedTemporaryFile(prefix="aioqueue-serve-", suffix=".log") as log:
            server = await Server(url, prefix, 32, log).start()
            try:
                assert server.proc is not None
                process = psutil.Process(server.proc.pid)
                async with aiohttp.ClientSession() as http:
                    await wait_ready(http, server.url)
                    seconds = await fill(url, stream, args.n, args.batch, args.size)
                    print(
                        f"published {args.n:,} messages of {args.size} bytes into {stream} in"
                        f" {seconds:.1f} s ({args.n / seconds:,.0f}/s, {args.batch} in flight)"
                    )
                    async with http.post(
                        f"{server.url}/v1/topics/bench.end", data=b"{}", headers=JSON
                    ) as response:
                        end = await response.json()
                        assert response.status == 202, end
                print(f"the stream holds offsets up to {end['offset']:,}")
                sides = []
                for _ in range(args.rounds):
                    sides.append(await raw_read(url, stream, args.n, process, broker))
                    sides.append(await aioqueue_read(server.url, args.n, process, broker))
                report(sides)
            except BaseException:
                print(f"aioqueue serve output:\n{server.output()}", file=sys.stderr)
                raise
            finally:
                await server.stop()
    finally:
        await delete_topology(url, prefix, QUEUES)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="AMQP URL of the RabbitMQ to use (default: a private node)")
    parser.add_argument("-n", type=int, default=100_000, help="messages (default 100000)")
    parser.add_argument("--batch", type=int, default=1000, help="publishes in flight (1000)")
    parser.add_argument("--size", type=int, default=100, help="bytes of JSON a message (100)")
    parser.add_argument("--rounds", type=int, default=1, help="reads of each kind (default 1)")
    args = parser.parse_args()
    if min(args.n, args.batch, args.size, args.rounds) < 1:
        parser.error("-n, --batch, --size and --rounds must be at least 1")
    on_rabbitmq(args.url, lambda url, pid: bench(args, url, pid))


if __name__ == "__main__":
    main()
