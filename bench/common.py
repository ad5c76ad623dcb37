"""What the benchmarks share: names of a prefix's topology, its clean-up, a CPU meter, helpers.

The scripts put the repository and its `src/` on `sys.path` themselves, so they run as
`python bench/e2e.py` from a checkout with no install.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import secrets
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aio_pika
import psutil

from aioqueue.broker.amqp import AmqpBroker
from aioqueue.config import BrokerSettings

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
#: Deadline of one AMQP clean-up step (connect, delete).
CLEANUP_TIMEOUT = 15.0


def fresh_prefix(tag: str) -> str:
    """A prefix no earlier run used: a fresh, empty event log and fresh queues."""
    return f"bench-{tag}-{secrets.token_hex(4)}"


def topology(url: str, prefix: str, queues: Sequence[str]) -> list[str]:
    """The queues and exchanges aioqueue declares for `prefix`, named by aioqueue's own code.

    The delay exchanges and queues (`aioqueue.delay.*`) are shared by every prefix of the vhost
    and are left alone.
    """
    broker = AmqpBroker(BrokerSettings(url=url, prefix=prefix), log_max_bytes=2**20)
    return [
        *broker.names.values(),
        broker.topics.name,
        f"{prefix}.checkpoints",
        *(name for queue in queues for name in broker.queue_names(queue)),
    ]


async def delete_topology(url: str, prefix: str, queues: Sequence[str]) -> None:
    """Delete a prefix's queues and exchanges (best effort: a missing one is no error)."""
    async with asyncio.timeout(4 * CLEANUP_TIMEOUT):
        await delete_names(url, topology(url, prefix, queues))


async def delete_names(url: str, names: Sequence[str]) -> None:
    """Delete each name as a queue and as an exchange: deleting what is not there is no error."""
    connection = await aio_pika.connect(url, timeout=CLEANUP_TIMEOUT)
    async with connection:
        for name in names:
            for kind in ("queue", "exchange"):
                # A failed delete closes the channel: one channel per delete.
                with contextlib.suppress(Exception):
                    channel = await connection.channel()
                    if kind == "queue":
                        await channel.queue_delete(name, timeout=CLEANUP_TIMEOUT)
                    else:
                        await channel.exchange_delete(name, timeout=CLEANUP_TIMEOUT)
                    await channel.close()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q < 100) by linear interpolation."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 10) - 1]


def print_table(rows: Sequence[Sequence[str]], *, label: bool = True) -> None:
    """Rows of cells as aligned columns: numbers to the right, the first column to the left
    when it is a label."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.rjust(width) for cell, width in zip(row, widths, strict=True)]
        if label:
            cells[0] = row[0].ljust(widths[0])
        print("  ".join(cells))


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def broker_process(url: str, pid: int | None = None) -> psutil.Process | None:
    """The RabbitMQ node's OS process: `pid` if known, else the one listening on the URL's port."""
    if pid is not None:
        with contextlib.suppress(psutil.Error):
            return psutil.Process(pid)
        return None
    port = urlsplit(url).port or 5672
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN
            if listening and getattr(conn.laddr, "port", None) == port and conn.pid is not None:
                return psutil.Process(conn.pid)
    return None


class CpuMeter:
    """CPU seconds used over a window by the client, the serve process, the broker, and the
    rest of the machine (other processes: a busy machine skews the figures)."""

    def __init__(self, server: psutil.Process | None, broker: psutil.Process | None) -> None:
        self.processes = {"client": psutil.Process(), "server": server, "broker": broker}
        self._start: dict[str, float] = {}
        self._used: dict[str, float] = {}
        self._start_all: dict[int, float] = {}
        self.busiest: list[tuple[float, str]] = []  # (CPU s, command) of other processes

    def _snapshot(self) -> dict[str, float]:
        times = psutil.cpu_times()
        snapshot = {"machine": float(times.user + times.system + times.nice)}
        for name, process in self.processes.items():
            if process is not None:
                with contextlib.suppress(psutil.Error):
                    snapshot[name] = cpu_seconds(process)
                    if name != "broker":  # read and write system calls (sockets included)
                        io = process.io_counters()
                        snapshot[name + " syscalls"] = io.read_count + io.write_count
        return snapshot

    @staticmethod
    def _every_process() -> dict[int, tuple[float, str]]:
        found: dict[int, tuple[float, str]] = {}
        for process in psutil.process_iter(["name", "cpu_times"]):
            times = process.info["cpu_times"]
            if times is not None:
                found[process.pid] = (times.user + times.system, process.info["name"] or "?")
        return found

    def start(self) -> None:
        self._start_all = {pid: cpu for pid, (cpu, _) in self._every_process().items()}
        self._start = self._snapshot()

    def stop(self) -> None:
        end = self._snapshot()
        self._used = {name: end[name] - self._start[name] for name in end if name in self._start}
        ours = {p.pid for p in self.processes.values() if p is not None}
        others = [
            (cpu - self._start_all.get(pid, 0.0), f"{name}[{pid}]")
            for pid, (cpu, name) in self._every_process().items()
            if pid not in ours
        ]
        self.busiest = sorted((o for o in others if o[0] > 0), reverse=True)[:3]

    def used(self, name: str) -> float | None:
        return self._used.get(name)

    def others(self) -> float:
        """CPU seconds of every other process over the window."""
        ours = sum(v for name, v in self._used.items() if name in self.processes)
        return max(0.0, self._used.get("machine", 0.0) - ours)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({cpu}), load {load:.2f}, Python {platform.python_version()}"


def redact(url: str) -> str:
    from aioqueue.cli import redact as cli_redact

    return cli_redact(url)


def loop_name() -> str:
    try:
        return f"uvloop {importlib.metadata.version('uvloop')}"
    except importlib.metadata.PackageNotFoundError:
        return "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed, as `aioqueue serve` does (`aioqueue.cli`)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def on_rabbitmq(
    url: str | None, bench: Callable[[str, int | None], Coroutine[Any, Any, Any]]
) -> None:
    """Run `bench(url, pid)` on the RabbitMQ at `url`, or, with none, on a private node started
    for it (`tests/rabbitmq.py`; its pid is known then, else None) and stopped after."""
    if url:
        run(bench(url, None))
        return
    from tests.rabbitmq import RabbitNode

    with tempfile.TemporaryDirectory(prefix="aioqueue-bench-rabbit-") as base:
        print("starting a private RabbitMQ node ...", flush=True)
        node = RabbitNode(Path(base)).start()
        try:
            run(bench(node.url, node.pid))
        finally:
            node.stop()


def revision() -> str:
    """The checkout's commit, `+changes` if src/ has uncommitted changes (read-only git)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"aioqueue {head}{' +changes' if dirty else ''}"
