"""Memory of idle websocket connections: the served process's RSS per connection.

The real `aioqueue serve bench.apps:app` in a subprocess, on a fresh prefix, with its default
settings. This process opens websocket connections to it (`bench/wsclient.py`; it answers the
server's heartbeat pings), each subscribing to one topic channel, `topic:idle.N` (one channel
per connection; `--same-topic`: all on `topic:idle`), and waits for every `subscribed` reply.
At each step of `--steps` it reads the server's VmRSS from /proc/PID/status and reports
(RSS with N connections - RSS before) / N, and the growth since the step before per
connection added. "Before" is read once the server is ready and one connection has come and
gone (the code paths a connection runs are imported and warmed).

Both processes need a file descriptor per connection: the script raises RLIMIT_NOFILE (the
hard limit too, when it may), and the served process inherits it.

    python bench/idle_ws.py                                  # starts a private RabbitMQ node
    python bench/idle_ws.py --url amqp://guest:guest@127.0.0.1:5672/ -n 10000 --steps 2000,5000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("src", "")]

import aiohttp  # noqa: E402

from bench.common import (  # noqa: E402
    ROOT,
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

#: Handshakes in flight at once: under the listen backlog of `aioqueue serve` (aiohttp's 128).
CONNECTING = 100
#: Deadlines, in seconds.
CONNECT_DEADLINE = 30.0
STEP_DEADLINE = 300.0
#: Seconds to wait after a step before reading the RSS.
SETTLE = 2.0
KIB = 1024


def raise_fd_limit(connections: int) -> int:
    """Raise RLIMIT_NOFILE to at least `connections` + 1000; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 1000
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def rss(pid: int) -> int:
    """VmRSS of the process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


class Idle:
    """Connections to one server, each subscribed to one topic channel."""

    def __init__(self, url: str, same_topic: bool, deflate: bool) -> None:
        self.url = url + "/v1/ws"
        self.same_topic = same_topic
        self.deflate = deflate
        self.clients: list[WsClient] = []

    async def open(self, number: int) -> WsClient:
        replied: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def on_frame(payload: bytes, now: float) -> None:
            if not replied.done():
                replied.set_result(payload)

        async with asyncio.timeout(CONNECT_DEADLINE):
            client = await WsClient.connect(self.url, on_frame, deflate=self.deflate)
            channel = "topic:idle" if self.same_topic else f"topic:idle.{number}"
            client.send_json({"op": "subscribe", "channel": channel})
            reply = await replied
        if b'"subscribed"' not in reply:
            raise RuntimeError(f"subscribe refused: {reply[:300]!r}")
        return client

    async def grow(self, total: int) -> None:
        numbers = iter(range(len(self.clients), total))

        async def opener() -> None:
            for number in numbers:
                self.clients.append(await self.open(number))

        async with asyncio.timeout(STEP_DEADLINE):
            await asyncio.gather(*(opener() for _ in range(CONNECTING)))

    def lost(self) -> list[int | None]:
        return [c.close_code for c in self.clients if c.closed.done()]

    def close(self) -> None:
        for client in self.clients:
            client.close()


async def measure(args: argparse.Namespace, url: str, steps: list[int]) -> None:
    prefix = fresh_prefix("idle")
    try:
        with tempfile.NamedTemporaryFile(prefix="aioqueue-serve-", suffix=".log") as log:
            traced = (
                (str(ROOT / "bench" / "traced.py"), args.tracemalloc) if args.tracemalloc else ()
            )
            server = await Server(url, prefix, 32, log, wrapper=traced).start()
            try:
                assert server.proc is not None
                pid = server.proc.pid
                async with aiohttp.ClientSession() as http:
                    await wait_ready(http, server.url)
                idle = Idle(server.url, args.same_topic, args.deflate)
                warm = await idle.open(-1)
                warm.close()
                await warm.closed
                await asyncio.sleep(SETTLE)
                snapshots = [await snapshot(pid, args.tracemalloc)] if args.tracemalloc else []
                before = rss(pid)
                print(f"RSS of the served process, ready and warmed: {before / KIB / KIB:.1f} MiB")
                rows = [("connections", "RSS MiB", "KiB / connection", "KiB / added", "s")]
                last_count, last_rss = 0, before
                for step in steps:
                    began = time.perf_counter()
                    await idle.grow(step)
                    took = time.perf_counter() - began
                    await asyncio.sleep(SETTLE)
                    if lost := idle.lost():
                        raise RuntimeError(f"{len(lost)} connections closed: {lost[:10]}")
                    now = rss(pid)
                    if args.tracemalloc:
                        snapshots.append(await snapshot(pid, args.tracemalloc))
                    rows.append(
                        (
                            f"{step:,}",
                            f"{now / KIB / KIB:.1f}",
                            f"{(now - before) / step / KIB:.1f}",
                            f"{(now - last_rss) / (step - last_count) / KIB:.1f}",
                            f"{took:.1f}",
                        )
                    )
                    last_count, last_rss = step, now
                idle.close()
                print_table(rows, label=False)
                print("KiB / connection: (RSS - RSS before) / connections; KiB / added: the")
                print(
                    "growth since the row before over the connections added; s: time to open them"
                )
                if snapshots:
                    print_allocations(snapshots[0], snapshots[-1], last_count)
            except BaseException:
                print(f"aioqueue serve output:\n{server.output()}", file=sys.stderr)
                raise
            finally:
                await server.stop()
    finally:
        await delete_topology(url, prefix, QUEUES)


async def snapshot(pid: int, prefix: str) -> tracemalloc.Snapshot:
    return await asyncio.to_thread(_snapshot, pid, prefix)


def _snapshot(pid: int, prefix: str) -> tracemalloc.Snapshot:
    """Have the served process (run by bench/traced.py) write a snapshot, and load it."""
    done = sorted(Path(prefix).parent.glob(Path(prefix).name + ".*.done"))
    path = Path(f"{prefix}.{len(done) + 1}")
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + STEP_DEADLINE
    while not Path(f"{path}.done").exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no tracemalloc snapshot {path} after {STEP_DEADLINE} s")
        time.sleep(0.1)
    return tracemalloc.Snapshot.load(str(path))


def print_allocations(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int) -> None:
    """What grew from `before` to `after`, per connection: by file, then the largest sites."""
    print(f"\nallocations traced by tracemalloc, growth per connection ({n:,} connections):")
    top = after.compare_to(before, "filename")
    rows = [("bytes", "blocks", "file")]
    for stat in top[:12]:
        rows.append((f"{stat.size_diff / n:.0f}", f"{stat.count_diff / n:.1f}", _short(stat)))
    print_table(rows, label=False)
    traced = sum(stat.size_diff for stat in top)
    print(f"all traced: {traced / n:.0f} bytes per connection\n")
    for stat in after.compare_to(before, "traceback")[:15]:
        if stat.size_diff < n * 64:
            break
        print(f"{stat.size_diff / n:6.0f} bytes, {stat.count_diff / n:4.1f} blocks per connection:")
        # The most recent frames first, outside asyncio's own code.
        recent = list(reversed(stat.traceback))
        frames = [f for f in recent if "asyncio/" not in f.filename][:4]
        for frame in frames or recent[:2]:
            print(f"    {_path(frame.filename)}:{frame.lineno}")


def _short(stat: tracemalloc.StatisticDiff) -> str:
    return _path(stat.traceback[0].filename)


def _path(filename: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


async def bench(args: argparse.Namespace, url: str, steps: list[int]) -> None:
    limit = raise_fd_limit(steps[-1])
    print(f"{revision()}; RabbitMQ {redact(url)}; {machine()}; on {loop_name()}")
    channels = "all on topic:idle" if args.same_topic else "each on its own topic:idle.N"
    extension = "; the clients offer permessage-deflate" if args.deflate else ""
    print(f"up to {steps[-1]:,} idle connections, {channels}{extension}; fd limit {limit}")
    await measure(args, url, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="AMQP URL of the RabbitMQ to use (default: a private node)")
    parser.add_argument("-n", type=int, default=10_000, help="connections (default 10000)")
    parser.add_argument(
        "--steps", default="2000,5000", help="RSS read also at these counts (default 2000,5000)"
    )
    parser.add_argument("--same-topic", action="store_true", help="every connection on topic:idle")
    parser.add_argument(
        "--tracemalloc",
        metavar="PREFIX",
        help="run the server under tracemalloc (bench/traced.py), its snapshots in PREFIX.N, and"
        " print what grew per connection; its RSS figures then include tracemalloc's own",
    )
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="the clients offer permessage-deflate, as browsers do",
    )
    args = parser.parse_args()
    try:
        steps = sorted({int(s) for s in args.steps.split(",") if s.strip()} | {args.n})
    except ValueError:
        parser.error("--steps: comma-separated whole numbers")
    if steps[0] < 1:
        parser.error("-n and --steps must be at least 1")
    steps = [s for s in steps if s <= args.n]
    on_rabbitmq(args.url, lambda url, _: bench(args, url, steps))


if __name__ == "__main__":
    main()
