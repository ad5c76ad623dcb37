"""Memory and query latency of a served process whose store holds N finished jobs.

1. A job store file with N finished jobs (a tenth `failed`, the rest `succeeded`, over three
   tasks) is built with the store's own code (`JobStore.create`, `apply`, `write`) at the path
   the served process will use.
2. `aioqueue serve` starts on RabbitMQ with it (a fresh prefix: an empty log, no checkpoint).
3. Sequential HTTP requests from this process: `GET /v1/jobs/{id}` of random jobs, and listings
   (first pages with and without filters, a page deep behind a cursor). Reported: p50 and p99 of
   each, and the served process's RSS after start and after the requests.

    python bench/store.py                        # 1,000,000 jobs; starts a private RabbitMQ node
    python bench/store.py --url amqp://guest:guest@127.0.0.1:5672/ -n 100000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / p) for p in ("src", "")]

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from aioqueue.events import Failed, JobSpec, Started, Succeeded  # noqa: E402
from aioqueue.store import JobStore  # noqa: E402
from aioqueue.storefile import file_name  # noqa: E402
from bench.common import (  # noqa: E402
    ROOT,
    delete_topology,
    fresh_prefix,
    machine,
    on_rabbitmq,
    percentile,
    redact,
    revision,
)

TASKS = ("resize", "email", "report")
MIB = 2**20
START_DEADLINE = 300.0
SERVING = re.compile(r"aioqueue serving \S+ on (http://\S+)")


def build_store(path: str, count: int) -> tuple[list[str], int]:
    """Write `count` finished jobs to a store at `path`; returns their ids and its size."""
    store = JobStore(result_ttl=86400, path=path)
    now = time.time()
    ids = []
    for n in range(count):
        job_id = f"{n:08d}-{os.urandom(8).hex()}"
        args = {"n": n, "url": f"https://example.com/{n}.png"}
        store.create(JobSpec(job_id, TASKS[n % 3], "default", args, 3, 300.0, now - 600))
        store.apply(Started(job_id, 1, now - 500))
        if n % 10 == 0:
            error = {"type": "ValueError", "message": "bad input", "traceback": "Traceback..."}
            store.apply(Failed(job_id, 1, error, now - 400))
        else:
            store.apply(Succeeded(job_id, 1, {"n": n, "size": [100, 100]}, now))
        ids.append(job_id)
        if n % 5000 == 4999:
            store.write()
    store.write()
    store.close()
    return ids, os.path.getsize(path)


def spawn(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "aioqueue", "serve"], env=env, stdout=out, stderr=out
        )


async def timed(session: aiohttp.ClientSession, url: str, times: int) -> tuple[float, float]:
    """p50 and p99, in ms, of `times` sequential GETs of `url`."""
    took = []
    for _ in range(times):
        began = time.perf_counter()
        async with session.get(url) as response:
            await response.read()
            assert response.status == 200, (url, response.status)
        took.append((time.perf_counter() - began) * 1000)
    return percentile(took, 50), percentile(took, 99)


async def bench(url: str, count: int) -> None:
    prefix = fresh_prefix("store")
    print(f"{revision()}; RabbitMQ {redact(url)}; {machine()}")
    with tempfile.TemporaryDirectory(prefix="aioqueue-bench-store-") as folder:
        path = os.path.join(folder, file_name(url, prefix))
        began = time.perf_counter()
        ids, size = await asyncio.to_thread(build_store, path, count)
        print(f"built a store of {count:,} finished jobs: {size / MIB:.0f} MiB on disk,", end=" ")
        print(f"{time.perf_counter() - began:.0f} s")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIOQUEUE_")}
        env |= {
            "AIOQUEUE_BROKER__URL": url,
            "AIOQUEUE_BROKER__PREFIX": prefix,
            "AIOQUEUE_STORE__DIR": folder,
            "AIOQUEUE_HTTP__PORT": "0",
            "AIOQUEUE_APP": "bench.apps:app",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        }
        log = Path(folder) / "serve.log"
        server = spawn(env, log)
        try:
            began = time.perf_counter()
            base = await _ready(server, log)
            print(f"aioqueue serve ready in {time.perf_counter() - began:.1f} s (from exec)")
            process = psutil.Process(server.pid)
            rss_ready = process.memory_info().rss
            rows = []
            timeout = aiohttp.ClientTimeout(total=30)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                picks = random.sample(ids, 2000)
                took = []
                for job_id in picks:
                    began = time.perf_counter()
                    async with session.get(f"{base}/v1/jobs/{job_id}") as response:
                        await response.read()
                        assert response.status == 200
                    took.append((time.perf_counter() - began) * 1000)
                rows.append(("GET /v1/jobs/{id}, 2000 random", *_p(took)))
                async with session.get(f"{base}/v1/jobs?status=failed&limit=50") as response:
                    page = await response.json()
                for _ in range(19):  # 20 pages deep
                    async with session.get(
                        f"{base}/v1/jobs?status=failed&limit=50&cursor={page['next']}"
                    ) as response:
                        page = await response.json()
                deep = page["next"]
                for name, query, times in [
                    ("first page, status=failed", "status=failed", 500),
                    ("first page, no filter", "", 500),
                    ("first page, task=email", "task=email", 500),
                    ("first page, status=failed&task=email", "status=failed&task=email", 500),
                    ("page 21, status=failed (cursor)", f"status=failed&cursor={deep}", 500),
                    ("limit=1000, status=succeeded", "status=succeeded&limit=1000", 50),
                    ("status=dead (no such job)", "status=dead", 200),
                ]:
                    rows.append((name, *await timed(session, f"{base}/v1/jobs?{query}", times)))
            rss_after = process.memory_info().rss
        finally:
            server.terminate()
            server.wait(30)
            await delete_topology(url, prefix, ["default"])
    width = max(len(row[0]) for row in rows)
    print(f"{'request':<{width}}  {'p50 ms':>7}  {'p99 ms':>7}")
    for name, p50, p99 in rows:
        print(f"{name:<{width}}  {p50:>7.2f}  {p99:>7.2f}")
    print(f"RSS of the served process: {rss_ready / MIB:.0f} MiB when ready,", end=" ")
    print(f"{rss_after / MIB:.0f} MiB after the requests")


def _p(took: list[float]) -> tuple[float, float]:
    return percentile(took, 50), percentile(took, 99)


async def _ready(server: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + START_DEADLINE
    base = ""
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            text = log.read_bytes().decode(errors="replace")  # noqa: ASYNC240 - a small file
            assert server.poll() is None, text
            if not base and (match := SERVING.search(text)):
                base = match.group(1)
            if base:
                try:
                    async with session.get(f"{base}/readyz") as response:
                        if response.status == 200:
                            return base
                except aiohttp.ClientError:
                    pass
            await asyncio.sleep(0.1)
    raise RuntimeError("aioqueue serve not ready in time; its log: " + str(log))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--url", help="AMQP URL of the RabbitMQ to use (default: a private node)")
    parser.add_argument("-n", type=int, default=1_000_000, help="finished jobs (1000000)")
    args = parser.parse_args()
    if args.n < 2000:
        parser.error("-n must be at least 2000")
    on_rabbitmq(args.url, lambda url, _: bench(url, args.n))


if __name__ == "__main__":
    main()
