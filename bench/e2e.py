"""aioqueue end to end against raw aio-pika, in one run on the same RabbitMQ.

(a) the ceiling, raw aio-pika: publish a small persistent message with publisher confirms to a
    durable quorum queue, consume it on another channel (prefetch P), ack. Latency: from just
    before the publish to the consumer receiving the message.
(b) aioqueue: the real `aioqueue serve bench.apps:app` in a subprocess, on a fresh prefix. Each
    client coroutine keeps one websocket; per job it POSTs /v1/jobs (one shared HTTP session),
    subscribes to job:ID and waits for the job's `succeeded` frame (or a snapshot that already
    says succeeded). Latency: from just before the POST to that frame.

Both keep C jobs in flight (C client coroutines, each one job at a time), run a warm-up that is
not counted, then N counted jobs. CPU per job is measured with psutil for the client (this
process), the aioqueue serve process and, where it can be found, the RabbitMQ node.

    python bench/e2e.py                                  # starts a private RabbitMQ node
    python bench/e2e.py --url amqp://guest:guest@127.0.0.1:5672/ -n 3000 -c 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("src", "")]

import aio_pika  # noqa: E402
import aiohttp  # noqa: E402
import aiormq  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402
from aio_pika.abc import AbstractIncomingMessage  # noqa: E402

from bench.common import (  # noqa: E402
    ROOT,
    CpuMeter,
    broker_process,
    delete_topology,
    fresh_prefix,
    loop_name,
    machine,
    on_rabbitmq,
    percentile,
    redact,
    revision,
)

APP = "bench.apps:app"
QUEUES = ("default",)
SERVING = re.compile(r"aioqueue serving \S+ on (http://\S+)")
JSON = {"Content-Type": "application/json"}
FAILED = {"failed", "dead", "cancelled"}

#: Deadlines, in seconds. Each job, each start-up and each shutdown step has one.
JOB_DEADLINE = 30.0
START_DEADLINE = 60.0
STOP_GRACE = 10.0
#: A measured window may take this long at least, plus 50 ms per job (20 jobs/s).
WINDOW_DEADLINE = 120.0


@dataclass
class Measured:
    name: str
    jobs: int
    seconds: float
    latencies: list[float]
    client_cpu: float
    server_cpu: float | None = None
    broker_cpu: float | None = None
    other_cpu: float = 0.0
    client_syscalls: float | None = None
    server_syscalls: float | None = None
    busiest: tuple[tuple[float, str], ...] = ()

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def measured(
    name: str, count: int, seconds: float, latencies: list[float], meter: CpuMeter
) -> Measured:
    return Measured(
        name,
        count,
        seconds,
        latencies,
        client_cpu=meter.used("client") or 0.0,
        server_cpu=meter.used("server"),
        broker_cpu=meter.used("broker"),
        other_cpu=meter.others(),
        client_syscalls=meter.used("client syscalls"),
        server_syscalls=meter.used("server syscalls"),
        busiest=tuple(meter.busiest),
    )


One = Callable[[int, int], Awaitable[float]]


async def run_window(count: int, concurrency: int, one: One) -> tuple[float, list[float]]:
    """`one(slot, i)` for i in range(count) from `concurrency` coroutines: (seconds, latencies).

    `one` returns the arrival time (perf_counter) of its job; latency is from just before it.
    """
    latencies: list[float] = []
    indexes = iter(range(count))

    async def worker(slot: int) -> None:
        for i in indexes:
            started = time.perf_counter()
            arrived = await one(slot, i)
            latencies.append(arrived - started)

    started = time.perf_counter()
    async with asyncio.timeout(WINDOW_DEADLINE + 0.05 * count):
        await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    return time.perf_counter() - started, latencies


# (a) raw aio-pika ---------------------------------------------------------------------------


async def raw_round_trips(
    url: str, count: int, warmup: int, concurrency: int, prefetch: int, meter: CpuMeter
) -> Measured:
    connection = await aio_pika.connect(url, timeout=START_DEADLINE)
    async with connection:
        publisher = await connection.channel(publisher_confirms=True)
        consumer = await connection.channel()
        await consumer.set_qos(prefetch_count=prefetch)
        name = fresh_prefix("raw")
        queue = await consumer.declare_queue(
            name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            waiting: dict[str, asyncio.Future[float]] = {}

            async def on_message(message: AbstractIncomingMessage) -> None:
                arrived = time.perf_counter()
                future = waiting.pop(message.message_id or "", None)
                if future is not None and not future.done():
                    future.set_result(arrived)
                await message.ack()

            tag = await queue.consume(on_message)
            loop = asyncio.get_running_loop()
            exchange = publisher.default_exchange
            sent = 0

            async def one(slot: int, i: int) -> float:
                nonlocal sent
                sent += 1
                message_id = str(sent)
                arrival: asyncio.Future[float] = loop.create_future()
                waiting[message_id] = arrival
                message = aio_pika.Message(
                    orjson.dumps({"task": "noop", "args": {"n": i}}),
                    message_id=message_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                )
                try:
                    async with asyncio.timeout(JOB_DEADLINE):
                        confirmation = await exchange.publish(message, name)
                        if not isinstance(confirmation, aiormq.spec.Basic.Ack):
                            raise RuntimeError(f"message not confirmed: {confirmation!r}")
                        return await arrival
                finally:
                    waiting.pop(message_id, None)

            await run_window(warmup, concurrency, one)
            meter.start()
            seconds, latencies = await run_window(count, concurrency, one)
            meter.stop()
            await queue.cancel(tag, timeout=JOB_DEADLINE)
            return measured("raw aio-pika", count, seconds, latencies, meter)
        finally:
            with contextlib.suppress(Exception):
                await queue.delete(if_unused=False, if_empty=False, timeout=JOB_DEADLINE)


# (b) aioqueue -------------------------------------------------------------------------------


class Server:
    """`aioqueue serve bench.apps:app` in a subprocess, configured through its environment."""

    def __init__(
        self,
        url: str,
        prefix: str,
        prefetch: int,
        log: IO[bytes],
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_")}
        #: Its job store's folder, removed with it (not .aioqueue in the repository).
        self.store_dir = tempfile.mkdtemp(prefix="aioqueue-bench-store-")
        self.env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            AIOQUEUE_STORE__DIR=self.store_dir,
            AIOQUEUE_APP=APP,
            AIOQUEUE_BROKER__URL=url,
            AIOQUEUE_BROKER__PREFIX=prefix,
            AIOQUEUE_BROKER__PREFETCH=str(prefetch),
            AIOQUEUE_HTTP__PORT="0",
        )
        self.env.update(env or {})  # more settings, for the other benchmarks
        #: What runs `-m aioqueue serve`, between the interpreter and it: `-m cProfile -o FILE`
        #: profiles the served process, `bench/traced.py PREFIX` traces its allocations.
        self.wrapper = tuple(wrapper)
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.stdout: list[str] = []
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> Server:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self.wrapper,
            "-m",
            "aioqueue",
            "serve",
            APP,
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
        )
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(START_DEADLINE):
                while not self.url:
                    line = (await self.proc.stdout.readline()).decode(errors="replace")
                    if not line:
                        raise RuntimeError("aioqueue serve exited before it was listening")
                    self.stdout.append(line)
                    if match := SERVING.search(line):
                        self.url = match.group(1)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"aioqueue serve did not start: {exc!r}\n{self.output()}") from exc
        self._drain = asyncio.create_task(self._read_stdout(self.proc.stdout))
        return self

    async def _read_stdout(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.stdout.append(line.decode(errors="replace"))

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, errors="replace") as log:
            stderr = log.read()
        return "".join(self.stdout) + stderr[-4000:]

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_GRACE seconds; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                print("aioqueue serve did not stop on SIGTERM; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, STOP_GRACE)
        shutil.rmtree(self.store_dir, ignore_errors=True)
        return proc.returncode


async def wait_ready(http: aiohttp.ClientSession, url: str) -> None:
    last = ""
    try:
        async with asyncio.timeout(START_DEADLINE):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(url + "/readyz") as response:
                        if response.status == 200:
                            return
                        last = f"{response.status} {await response.text()}"
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise RuntimeError(f"{url}/readyz not 200 after {START_DEADLINE} s: {last}") from None


async def await_result(ws: aiohttp.ClientWebSocketResponse, channel: str, frame_id: int) -> float:
    """Read frames until this job's result arrives; its arrival time (perf_counter)."""
    while True:
        message = await ws.receive(timeout=JOB_DEADLINE)
        arrived = time.perf_counter()
        if message.type is not aiohttp.WSMsgType.TEXT:
            raise RuntimeError(f"websocket: {message.type.name} {message.data!r} {message.extra}")
        frame = orjson.loads(message.data)
        kind = frame.get("type")
        if kind == "error" and frame.get("id") == frame_id:
            raise RuntimeError(f"subscribe to {channel} refused: {frame}")
        if kind != "job" or frame.get("channel") != channel:
            continue  # `subscribed`, `unsubscribed` of an earlier job, and the like
        status = frame["job"]["status"]
        if status == "succeeded":
            return arrived
        if status in FAILED:
            raise RuntimeError(f"job {channel} ended {status}: {frame['job'].get('error')}")


async def aioqueue_round_trips(
    url: str,
    prefix: str,
    count: int,
    warmup: int,
    concurrency: int,
    prefetch: int,
    broker: psutil.Process | None,
    log: IO[bytes],
    profile: Path | None = None,
) -> Measured:
    server = await Server(url, prefix, prefetch, log).start()
    try:
        assert server.proc is not None
        meter = CpuMeter(psutil.Process(server.proc.pid), broker)
        connector = aiohttp.TCPConnector(limit=concurrency * 2)
        timeout = aiohttp.ClientTimeout(total=JOB_DEADLINE)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            await wait_ready(http, server.url)
            sockets = [
                await http.ws_connect(server.url + "/v1/ws", max_msg_size=0)
                for _ in range(concurrency)
            ]
            submit_url = server.url + "/v1/jobs"

            async def one(slot: int, i: int) -> float:
                body = orjson.dumps({"task": "noop", "args": {"n": i}})
                async with http.post(submit_url, data=body, headers=JSON) as response:
                    answer = await response.read()
                    if response.status != 202:
                        raise RuntimeError(f"POST /v1/jobs: {response.status} {answer!r}")
                channel = "job:" + orjson.loads(answer)["id"]
                ws = sockets[slot]
                await ws.send_str(
                    orjson.dumps({"op": "subscribe", "channel": channel, "id": i}).decode()
                )
                arrived = await await_result(ws, channel, i)
                # At most ws.max_subscriptions per connection: drop it. Its reply is skipped.
                await ws.send_str(orjson.dumps({"op": "unsubscribe", "channel": channel}).decode())
                return arrived

            await run_window(warmup, concurrency, one)
            spy = await start_py_spy(server.proc.pid, profile, log) if profile else None
            meter.start()
            try:
                seconds, latencies = await run_window(count, concurrency, one)
            finally:
                meter.stop()
                if spy is not None:
                    await stop_py_spy(spy)
            result = measured("aioqueue end to end", count, seconds, latencies, meter)
            for ws in sockets:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), STOP_GRACE)
    except BaseException:
        print(f"aioqueue serve output:\n{server.output()}", file=sys.stderr)
        raise
    finally:
        code = await server.stop()
    if code != 0:
        tail = "".join(server.output().splitlines(keepends=True)[-20:])
        print(f"aioqueue serve exited with {code} after SIGTERM; its output:\n{tail}")
    return result


async def start_py_spy(pid: int, output: Path, log: IO[bytes]) -> asyncio.subprocess.Process:
    """Sample the serve process with py-spy (collapsed stacks, `--format raw`) from now on."""
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError("--py-spy: no py-spy on PATH nor beside this Python; pip install py-spy")
    spy = await asyncio.create_subprocess_exec(
        found,
        *("record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--format", "raw"),
        *("--output", str(output)),
        stdout=log,
        stderr=log,
    )
    await asyncio.sleep(0.5)  # py-spy attaches
    return spy


async def stop_py_spy(spy: asyncio.subprocess.Process) -> None:
    """SIGINT makes py-spy write its output and exit."""
    with contextlib.suppress(ProcessLookupError):
        spy.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(spy.wait(), STOP_GRACE)
    except TimeoutError:
        spy.kill()
        await asyncio.wait_for(spy.wait(), STOP_GRACE)


# Report -------------------------------------------------------------------------------------


def _per_job(count: float | None, jobs: int) -> str:
    return "n/a" if count is None else f"{count / jobs:.1f}"


def _us_per_job(seconds: float | None, jobs: int) -> str:
    return "n/a" if seconds is None else f"{1e6 * seconds / jobs:.0f}"


def report(raw: Measured, ours: Measured) -> None:
    header = ("", "jobs", "jobs/s", "p50 ms", "p99 ms", "client", "serve", "RabbitMQ", "others")
    rows: list[tuple[str, ...]] = [header]
    for m in (raw, ours):
        rows.append(
            (
                m.name,
                str(m.jobs),
                f"{m.rate:.0f}",
                f"{1000 * percentile(m.latencies, 50):.1f}",
                f"{1000 * percentile(m.latencies, 99):.1f}",
                _us_per_job(m.client_cpu, m.jobs),
                "-" if m is raw else _us_per_job(m.server_cpu, m.jobs),
                _us_per_job(m.broker_cpu, m.jobs),
                f"{100 * m.other_cpu / m.seconds:.0f}%",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))
    print("client, serve, RabbitMQ: CPU µs per job (user + system) over the measured window;")
    print("others: CPU of every other process then, in % of one core (a busy machine skews all)")
    print(
        "read + write system calls per job: "
        f"raw client {_per_job(raw.client_syscalls, raw.jobs)}, "
        f"aioqueue client {_per_job(ours.client_syscalls, ours.jobs)}, "
        f"serve {_per_job(ours.server_syscalls, ours.jobs)}"
    )
    for m in (raw, ours):
        if m.other_cpu > 0.1 * m.seconds:
            busy = ", ".join(f"{name} {100 * cpu / m.seconds:.0f}%" for cpu, name in m.busiest)
            print(f"  WARNING: the machine was busy during {m.name}. Busiest of the processes")
            print(f"  alive throughout: {busy or 'none'}; the rest came and went meanwhile.")
    print(f"aioqueue/raw throughput ratio: {ours.rate / raw.rate:.2f}")


async def bench(args: argparse.Namespace, url: str, broker_pid: int | None) -> None:
    broker = broker_process(url, broker_pid)
    warmup = min(args.warmup, args.n)
    print(f"{revision()}; RabbitMQ {redact(url)}; {machine()}")
    node = f"RabbitMQ process {broker.pid}" if broker else "RabbitMQ process not found"
    print(f"client and serve on {loop_name()}; {node}")
    print(f"N={args.n} counted jobs (+{warmup} warm-up), C={args.c} in flight, P={args.prefetch}")
    # A last resort: every step has its own deadline, and the whole run has this one.
    deadline = 4 * (WINDOW_DEADLINE + 0.05 * (args.n + warmup) + START_DEADLINE)
    async with asyncio.timeout(deadline):
        meter = CpuMeter(None, broker)
        raw = await raw_round_trips(url, args.n, warmup, args.c, args.prefetch, meter)
        prefix = fresh_prefix("e2e")
        with tempfile.NamedTemporaryFile(prefix="aioqueue-serve-", suffix=".log") as log:
            try:
                ours = await aioqueue_round_trips(
                    url, prefix, args.n, warmup, args.c, args.prefetch, broker, log, args.py_spy
                )
            finally:
                await delete_topology(url, prefix, QUEUES)
    report(raw, ours)
    if args.py_spy:
        print(f"py-spy samples of the serve process (collapsed stacks): {args.py_spy}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="AMQP URL of the RabbitMQ to use (default: a private node)")
    parser.add_argument("-n", type=int, default=3000, help="counted jobs per side (default 3000)")
    parser.add_argument("-c", type=int, default=50, help="jobs in flight (default 50)")
    parser.add_argument("--prefetch", type=int, default=32, help="consumer prefetch (default 32)")
    parser.add_argument("--warmup", type=int, default=200, help="uncounted jobs first (200)")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="profile the serve process with py-spy over the measured window, into FILE "
        "(collapsed stacks); the profiler's own CPU then weighs on the figures",
    )
    args = parser.parse_args()
    if args.n < 1 or args.c < 1 or args.prefetch < 1:
        parser.error("-n, -c and --prefetch must be at least 1")
    on_rabbitmq(args.url, lambda url, pid: bench(args, url, pid))


if __name__ == "__main__":
    main()
