"""Topic fan-out: one topic, W websocket clients, M messages; aioqueue against raw aiohttp.

(a) raw aiohttp, the ceiling: a few lines of aiohttp in a subprocess. `POST /v1/topics/{topic}`
    builds the same `message` frame aioqueue sends and writes it to every websocket that
    subscribed (awaiting each `send_frame`), then answers 202.
(b) aioqueue: the real `aioqueue serve bench.apps:app` in a subprocess, on a fresh prefix.
    `POST /v1/topics/{topic}` publishes to the stream `P.topics` and answers once RabbitMQ
    confirmed it and the process read its offset back; the live reader hands it to the hub,
    which queues the frame on every subscribed connection, whose writer task sends it.

The same client code measures both (`bench/wsclient.py`, a minimal websocket protocol, so the
client process is not what limits the figures): W connections subscribe to `topic:TOPIC`; then
C coroutines POST the M messages, each `{"i": i, "t": perf_counter()}`, one at a time each,
after an uncounted warm-up. Reported: deliveries/s, W x M over the time from the first POST to
the last frame received; p50 and p99 of publish-to-receive latency (each frame's arrival minus
the `t` in its data) over all W x M deliveries; CPU per delivery of this process, the server
and RabbitMQ. Every client must receive every message once, in order (checked).

With `--deflate` the clients offer permessage-deflate, as browsers do; both servers accept it
(aiohttp's default), so every frame is compressed once per client. `--profile FILE` runs the
aioqueue server under cProfile.

    python bench/fanout.py                                  # starts a private RabbitMQ node
    python bench/fanout.py --url amqp://guest:guest@127.0.0.1:5672/ -w 200 -m 2000 -c 20
    python bench/fanout.py --deflate
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("src", "")]

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
from aiohttp import WSMsgType, web  # noqa: E402

from bench.common import (  # noqa: E402
    CpuMeter,
    broker_process,
    delete_topology,
    fresh_prefix,
    loop_name,
    machine,
    on_rabbitmq,
    percentile,
    print_table,
    redact,
    revision,
    run,
)
from bench.e2e import QUEUES, Server, wait_ready  # noqa: E402
from bench.wsclient import WsClient  # noqa: E402

TOPIC = "bench.fanout"
CHANNEL = "topic:" + TOPIC
JSON = {"Content-Type": "application/json"}
#: Deadlines, in seconds.
START_DEADLINE = 60.0
STOP_GRACE = 10.0
#: A measured window may take this long, plus 1 ms per delivery.
WINDOW_DEADLINE = 60.0


@dataclass
class Measured:
    name: str
    deliveries: int
    seconds: float
    latencies: list[float]
    meter: CpuMeter

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds

    def us_per_delivery(self, process: str) -> str:
        used = self.meter.used(process)
        return "n/a" if used is None else f"{1e6 * used / self.deliveries:.1f}"


class Subscriber:
    """One client: the counted messages it received, checked for order, gaps and duplicates."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.subscribed = False
        self.counted = 0  # counted messages received
        self.last_offset = -1
        self.warm = 0  # warm-up messages received
        self.client: WsClient | None = None

    def on_frame(self, payload: bytes, now: float) -> None:
        frame = orjson.loads(payload)
        kind = frame.get("type")
        if kind == "subscribed":
            self.subscribed = True
            self.fleet.changed()
            return
        if kind != "message":
            self.fleet.problem(f"unexpected frame {payload[:200]!r}")
            return
        offset, data = frame["offset"], frame["data"]
        if offset <= self.last_offset:
            self.fleet.problem(f"offset {offset} after {self.last_offset}: out of order or twice")
        self.last_offset = offset
        if "w" in data:
            self.warm += 1
            self.fleet.changed()
            return
        self.fleet.latencies.append(now - data["t"])
        self.fleet.last_arrival = now
        self.counted += 1
        self.fleet.delivered += 1
        if self.fleet.delivered == self.fleet.target:
            self.fleet.changed()


class Fleet:
    """W subscribers of one websocket server."""

    def __init__(self, url: str, count: int, deflate: bool) -> None:
        self.url = url
        self.count = count
        self.deflate = deflate
        self.subscribers = [Subscriber(self) for _ in range(count)]
        self.latencies: list[float] = []
        self.delivered = 0
        self.target = -1
        self.last_arrival = 0.0
        self.problems: list[str] = []
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    def problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)
        self._changed.set()

    async def until(self, condition: str, test: Callable[[], bool]) -> None:
        while not test():
            closed = [c.close_code for c in self.clients() if c.closed.done()]
            if self.problems or closed:
                raise RuntimeError(
                    f"waiting for {condition}: {self.problems}; clients closed: {closed[:10]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)

    async def connect(self) -> None:
        for number, sub in enumerate(self.subscribers):
            sub.client = await WsClient.connect(
                self.url + "/v1/ws", sub.on_frame, deflate=self.deflate
            )
            sub.client.send_json({"op": "subscribe", "channel": CHANNEL, "id": number})
        await self.until("subscribed", lambda: all(s.subscribed for s in self.subscribers))

    def clients(self) -> list[WsClient]:
        return [s.client for s in self.subscribers if s.client is not None]

    def close(self) -> None:
        for client in self.clients():
            client.close()


async def publish_all(
    http: aiohttp.ClientSession, url: str, count: int, concurrency: int, warm: bool
) -> None:
    indexes = iter(range(count))

    async def publisher() -> None:
        for i in indexes:
            data = {"w": i} if warm else {"i": i, "t": time.perf_counter()}
            async with http.post(url, data=orjson.dumps(data), headers=JSON) as response:
                answer = await response.read()
                if response.status != 202:
                    raise RuntimeError(f"POST {url}: {response.status} {answer[:300]!r}")

    await asyncio.gather(*(publisher() for _ in range(concurrency)))


async def measure(
    name: str,
    url: str,
    args: argparse.Namespace,
    server: psutil.Process,
    broker: psutil.Process | None,
) -> Measured:
    fleet = Fleet(url, args.w, args.deflate)
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=args.c)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await fleet.connect()
        try:
            post = f"{url}/v1/topics/{TOPIC}"
            async with asyncio.timeout(WINDOW_DEADLINE):
                await publish_all(http, post, args.warmup, args.c, warm=True)
                await fleet.until(
                    "the warm-up", lambda: all(s.warm == args.warmup for s in fleet.subscribers)
                )
            fleet.target = args.w * args.m
            meter = CpuMeter(server, broker)
            meter.start()
            started = time.perf_counter()
            async with asyncio.timeout(WINDOW_DEADLINE + 0.001 * fleet.target):
                await publish_all(http, post, args.m, args.c, warm=False)
                await fleet.until("every delivery", lambda: fleet.delivered >= fleet.target)
            seconds = fleet.last_arrival - started
            meter.stop()
            await asyncio.sleep(0.2)  # a duplicate would come now
            if fleet.problems or fleet.delivered != fleet.target:
                raise RuntimeError(f"{name}: {fleet.delivered} deliveries: {fleet.problems}")
            short = [s for s in fleet.subscribers if s.counted != args.m]
            if short:
                raise RuntimeError(f"{name}: {len(short)} clients did not get every message")
        finally:
            fleet.close()
    return Measured(name, fleet.target, seconds, fleet.latencies, meter)


# (a) raw aiohttp ----------------------------------------------------------------------------


async def raw_serve() -> None:
    """The baseline server: subscribe on the websocket, POST broadcasts the same frame."""
    subscribers: set[web.WebSocketResponse] = set()
    offsets = itertools.count()

    async def websocket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    frame = orjson.loads(message.data)
                    if frame.get("op") == "subscribe":
                        subscribers.add(ws)
                        reply = {"type": "subscribed", "channel": frame["channel"]}
                        await ws.send_frame(orjson.dumps(reply), WSMsgType.TEXT)
        finally:
            subscribers.discard(ws)
        return ws

    async def publish(request: web.Request) -> web.StreamResponse:
        topic, data, offset = request.match_info["topic"], await request.read(), next(offsets)
        frame = b'{"type":"message","channel":%b,"topic":%b,"offset":%d,"data":%b}' % (
            orjson.dumps("topic:" + topic),
            orjson.dumps(topic),
            offset,
            data,
        )
        for ws in list(subscribers):
            await ws.send_frame(frame, WSMsgType.TEXT)
        return web.json_response({"topic": topic, "offset": offset}, status=202)

    app = web.Application()
    app.router.add_get("/v1/ws", websocket)
    app.router.add_post("/v1/topics/{topic}", publish)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    print(f"raw serving on http://{host}:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


class RawServer:
    """`raw_serve` in a subprocess: this script with `--raw-server`."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self) -> RawServer:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--raw-server", stdout=asyncio.subprocess.PIPE
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(START_DEADLINE):
            line = (await self.proc.stdout.readline()).decode()
        if not line.startswith("raw serving on "):
            raise RuntimeError(f"the raw server did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_GRACE)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def measure_raw(args: argparse.Namespace, broker: psutil.Process | None) -> Measured:
    server = await RawServer().start()
    try:
        assert server.proc is not None
        process = psutil.Process(server.proc.pid)
        return await measure("raw aiohttp", server.url, args, process, broker)
    finally:
        await server.stop()


# (b) aioqueue -------------------------------------------------------------------------------


async def measure_aioqueue(
    args: argparse.Namespace, url: str, broker: psutil.Process | None
) -> Measured:
    prefix = fresh_prefix("fanout")
    try:
        with tempfile.NamedTemporaryFile(prefix="aioqueue-serve-", suffix=".log") as log:
            profiler = ("-m", "cProfile", "-o", str(args.profile)) if args.profile else ()
            server = await Server(url, prefix, 32, log, wrapper=profiler).start()
            try:
                assert server.proc is not None
                async with aiohttp.ClientSession() as http:
                    await wait_ready(http, server.url)
                process = psutil.Process(server.proc.pid)
                return await measure("aioqueue", server.url, args, process, broker)
            except BaseException:
                print(f"aioqueue serve output:\n{server.output()}", file=sys.stderr)
                raise
            finally:
                await server.stop()
    finally:
        await delete_topology(url, prefix, QUEUES)


# Report -------------------------------------------------------------------------------------


def report(sides: list[Measured]) -> None:
    header = "", "deliveries", "s", "deliveries/s", "p50 ms", "p99 ms", "client", "server"
    rows: list[tuple[str, ...]] = [(*header, "RabbitMQ", "others")]
    for m in sides:
        rows.append(
            (
                m.name,
                str(m.deliveries),
                f"{m.seconds:.2f}",
                f"{m.rate:,.0f}",
                f"{1000 * percentile(m.latencies, 50):.1f}",
                f"{1000 * percentile(m.latencies, 99):.1f}",
                m.us_per_delivery("client"),
                m.us_per_delivery("server"),
                m.us_per_delivery("broker"),
                f"{100 * m.meter.others() / m.seconds:.0f}%",
            )
        )
    print_table(rows)
    print("client, server, RabbitMQ: CPU µs per delivery (user + system) over the measured window;")
    print("others: CPU of every other process then, in % of one core (a busy machine skews all)")
    for m in sides:
        if m.meter.others() > 0.1 * m.seconds:
            busy = ", ".join(f"{n} {100 * cpu / m.seconds:.0f}%" for cpu, n in m.meter.busiest)
            print(f"  WARNING: the machine was busy during {m.name}: {busy or 'unknown'}")
    raw, ours = sides
    print(f"aioqueue/raw deliveries/s ratio: {ours.rate / raw.rate:.2f}")


async def bench(args: argparse.Namespace, url: str, broker_pid: int | None) -> None:
    broker = broker_process(url, broker_pid)
    print(f"{revision()}; RabbitMQ {redact(url)}; {machine()}; on {loop_name()}")
    print(
        f"W={args.w} clients on {CHANNEL}, M={args.m} counted messages (+{args.warmup} warm-up),"
        f" C={args.c} POSTs in flight{'; permessage-deflate' if args.deflate else ''}"
    )
    raw = await measure_raw(args, broker)
    ours = await measure_aioqueue(args, url, broker)
    report([raw, ours])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="AMQP URL of the RabbitMQ to use (default: a private node)")
    parser.add_argument("-w", type=int, default=200, help="websocket clients (default 200)")
    parser.add_argument("-m", type=int, default=2000, help="counted messages (default 2000)")
    parser.add_argument("-c", type=int, default=20, help="POSTs in flight (default 20)")
    parser.add_argument("--warmup", type=int, default=100, help="uncounted messages first (100)")
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="the clients offer permessage-deflate, as browsers do (both servers accept it)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run aioqueue serve under cProfile, its stats (pstats) into FILE; slows it down",
    )
    parser.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        run(raw_serve())
        return
    if min(args.w, args.m, args.c) < 1 or args.warmup < 0:
        parser.error("-w, -m and -c must be at least 1, --warmup at least 0")
    on_rabbitmq(args.url, lambda url, pid: bench(args, url, pid))


if __name__ == "__main__":
    main()
