"""Issue 9, item 2: memory grew without bound, per request. The issue's probe, against the real
served process (`aioqueue serve`, memory://, whose job store is SQLite in RAM).

As reported: 60 jobs of a task that always fails, each with a 1 MB argument, took the RSS from
64 to 371 MiB (args, error message, traceback and dead letter, all kept for result_ttl), and
`GET /v1/jobs?limit=1000` then built a 181 MiB body, peaked at 752 MiB and held `/healthz` for
350 ms. Here args of 1 MB are let in (`jobs.max_args_bytes`), and the job store is bounded
(`store.max_bytes`, 16 MiB): the finished jobs past it are forgotten, the earliest first, and
what every other structure keeps is bounded too. Three jobs return a result over
`jobs.max_result_bytes`: they fail at once, unretried, and their result is never kept.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from tests.support import ServeProcess, submit, wait_ready, wait_terminal

pytestmark = pytest.mark.timeout(60)

JOBS, ARG_CHARS = 60, 1_000_000
STORE_MAX_BYTES = 16 * 2**20
#: The defaults of `http.max_list_bytes` and `jobs.max_result_bytes`.
MAX_LIST_BYTES = 4 * 2**20
MAX_RESULT_BYTES = 2**20
#: The ceiling this test holds the process to: RSS over its idle value, after the jobs and at
#: its peak while every job is listed. Measured: +66 and +86 MiB; before the bounds, +195 and
#: +347 MiB with a list body of 62 MiB.
RSS_GROWTH_LIMIT = 128 * 2**20
#: The slowest `/healthz` answer allowed while large pages are built (the issue: 350 ms).
HEALTHZ_LIMIT = 0.5


@pytest.fixture
def server(tmp_path: Path, prefix: str) -> Iterator[ServeProcess]:
    env = {
        "AIOQUEUE_JOBS__MAX_ARGS_BYTES": str(2**20),
        "AIOQUEUE_STORE__MAX_BYTES": str(STORE_MAX_BYTES),
    }
    process = ServeProcess("memory://", prefix, env).start(tmp_path)
    yield process
    process.kill()


class PeakRss:
    """The highest RSS of a process, sampled every 5 ms in a thread while in use."""

    def __init__(self, process: psutil.Process) -> None:
        self._process = process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def test_the_issues_probe_stays_within_its_memory_bound(
    server: ServeProcess, http: aiohttp.ClientSession
) -> None:
    await wait_ready(http, server.url)
    assert server.proc is not None
    process = psutil.Process(server.proc.pid)
    idle = process.memory_info().rss
    ids = []
    with PeakRss(process) as during_jobs:
        for n in range(JOBS):
            message = f"{n:03d}" + "x" * ARG_CHARS
            body = {"task": "always_fail", "args": {"message": message}, "max_attempts": 1}
            job = await submit(http, server.url, body)
            # One at a time: each is finished, and may be forgotten, before the next comes.
            done = await wait_terminal(http, server.url, job["id"])
            assert done["status"] == "failed", done["error"]
            ids.append(job["id"])
        for _ in range(3):
            body = {"task": "big_result", "args": {"size": 4 * MAX_RESULT_BYTES}}
            job = await submit(http, server.url, body)
            done = await wait_terminal(http, server.url, job["id"])
            assert (done["status"], done["attempt"], done["result"]) == ("failed", 1, None)
            assert done["error"]["type"] == "ResultTooLarge"
            ids.append(job["id"])
    after_jobs = process.memory_info().rss

    latencies: list[float] = []
    listed: list[str] = []
    sizes: list[int] = []
    listing_done = asyncio.Event()

    async def poll_healthz() -> None:
        while not listing_done.is_set():
            started = time.monotonic()
            async with http.get(server.url + "/healthz") as response:
                assert response.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.005)

    with PeakRss(process) as during_list:
        healthz = asyncio.create_task(poll_healthz())
        cursor = None
        async with asyncio.timeout(30):
            while True:
                params = {"limit": "1000"} | ({"cursor": cursor} if cursor else {})
                async with http.get(server.url + "/v1/jobs", params=params) as response:
                    assert response.status == 200
                    raw = await response.read()
                page = orjson.loads(raw)
                sizes.append(len(raw))
                listed += [job["id"] for job in page["jobs"]]
                assert all(job["status"] == "failed" for job in page["jobs"])
                if (cursor := page["next"]) is None:
                    break
        listing_done.set()
        await healthz

    report = (
        f"RSS idle {idle / 2**20:.0f} MiB, +{(after_jobs - idle) / 2**20:.0f} after the jobs"
        f" (peak +{(during_jobs.peak - idle) / 2**20:.0f}), peak +"
        f"{(during_list.peak - idle) / 2**20:.0f} while listing; {len(sizes)} pages, largest"
        f" {max(sizes) / 2**20:.1f} MiB; {len(listed)} of {len(ids)} jobs kept; slowest"
        f" /healthz {max(latencies) * 1000:.0f} ms"
    )
    print(report)
    assert max(during_jobs.peak, after_jobs, during_list.peak) - idle < RSS_GROWTH_LIMIT, report
    assert max(sizes) <= MAX_LIST_BYTES and len(sizes) > 1, report
    assert latencies and max(latencies) < HEALTHZ_LIMIT, report
    # Kept: the jobs that finished last, each listed once, newest first; forgotten: the
    # earliest finished, as many as the store's bound needed.
    assert listed == ids[::-1][: len(listed)], report
    assert 10 <= len(listed) < len(ids), report
