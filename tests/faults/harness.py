"""The fault harness: load with a fault in the middle, then an account of every job.

Accounting (RELIABILITY.md): every 202 is an accepted job that must reach a terminal status;
the task log (O_APPEND, survives SIGKILL) counts executions; the event log counts recorded
outcomes, which must be exactly one per job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from tests.support import JSON, TERMINAL, eventually

#: Injects the fault; calls `mark()` at the moment the fault takes effect.
Fault = Callable[[Callable[[], None]], Coroutine[Any, Any, None]]


@dataclass
class Report:
    scenario: str
    submitted: int = 0
    accepted: list[str] = field(default_factory=list)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The error messages of jobs that did not succeed, counted.
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Why submits were refused: "<status> <problem detail>", counted.
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Refusals that broke the contract: no problem document, or a 429/503 without Retry-After.
    bad_refusals: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    #: Executions per job, from the task log (`count_executions`).
    executions: collections.Counter[str] = field(default_factory=collections.Counter)
    executed_twice: int = 0
    #: Terminal events per job, from the event log (`count_outcomes`).
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes_twice: list[str] = field(default_factory=list)
    #: The most ready messages seen in the sampled queue (`sample_depth`), if sampled.
    peak_depth: int | None = None
    #: Seconds from each submit to its answer, whatever the answer.
    latencies: list[float] = field(default_factory=list)
    #: The slowest answer to a submit sent after the fault and refused, in seconds.
    slowest_refusal: float = 0.0
    fault_at: float | None = None
    first_accept_after_fault: float | None = None
    drained_at: float | None = None

    @property
    def recovery(self) -> str:
        if self.fault_at is None or self.first_accept_after_fault is None:
            return "-"
        to_202 = self.first_accept_after_fault - self.fault_at  # a submit sent after the fault
        drained = (self.drained_at or self.fault_at) - self.fault_at
        return f"{to_202:.1f} s to a 202, {drained:.1f} s to drain"

    def row(self) -> str:
        terminal = sum(self.statuses.values())
        rejected = ", ".join(f"{n} {why}" for why, n in sorted(self.rejected.items())) or "0"
        return (
            f"| {self.scenario} | {self.submitted} | {len(self.accepted)} | {rejected} | {terminal} "
            f"| {len(self.lost)} | {self.executed_twice} | {len(self.outcomes_twice)} | {self.recovery} |"
        )


HEADER = (
    "| scenario | submitted | accepted | rejected | terminal | lost | executed >1 "
    "| outcomes >1 | recovery |\n|---|---|---|---|---|---|---|---|---|"
)


async def run_load(
    http: aiohttp.ClientSession,
    urls: Callable[[], list[str]],
    report: Report,
    total: int,
    concurrency: int,
    fault_at: int,
    fault: Fault | None,
    body: Callable[[int], dict[str, Any]],
    max_submits: int | None = None,
) -> None:
    """Submit until `total` jobs are accepted (or `max_submits` submits were made, or 90 s
    pass), `concurrency` at a time, and inject `fault` (if any) once `fault_at` submits were
    made. The load spans the fault: it goes on until the fault is over and a submit sent after
    it was accepted, however long the fault takes. Rejected submits are counted, with their
    reasons, not retried."""
    counter = itertools.count()
    fault_task: asyncio.Task[None] | None = None
    give_up = time.monotonic() + 90

    def mark() -> None:
        report.fault_at = time.monotonic()

    def done() -> bool:
        if len(report.accepted) < total:
            return False
        if fault_task is None:  # no fault, or (as fault_at < total) never reached
            return True
        return fault_task.done() and report.first_accept_after_fault is not None

    async def submitter(slot: int) -> None:
        nonlocal fault_task
        while not done() and time.monotonic() < give_up:
            n = next(counter)
            if max_submits is not None and n >= max_submits:
                return
            if fault is not None and n == fault_at:
                fault_task = asyncio.create_task(fault(mark))
            live = urls()
            url = live[n % len(live)]
            await submit_one(http, url, orjson.dumps(body(n)), report)

    await asyncio.gather(*(submitter(slot) for slot in range(concurrency)))
    if fault_task is not None:
        await fault_task


async def submit_one(http: aiohttp.ClientSession, url: str, data: bytes, report: Report) -> None:
    """One submit, counted in `report`; after a refusal, a pause while the service recovers."""
    report.submitted += 1
    sent = time.monotonic()
    try:
        async with http.post(url + "/v1/jobs", data=data, headers=JSON) as response:
            report.latencies.append(time.monotonic() - sent)
            if response.status == 202:
                report.accepted.append((await response.json())["id"])
                faulted = report.fault_at
                if faulted is not None and sent > faulted:
                    first = report.first_accept_after_fault
                    report.first_accept_after_fault = min(first or sent, sent)
                return
            refusal = await response.read()
            report.rejected[str(response.status)] += 1
            if report.fault_at is not None and sent > report.fault_at:
                took = time.monotonic() - sent
                report.slowest_refusal = max(report.slowest_refusal, took)
            check_refusal(response.status, response.headers, refusal, report)
    except (TimeoutError, aiohttp.ClientError):
        report.rejected["no connection"] += 1
    await asyncio.sleep(0.2)  # back off while the service is unavailable


def check_refusal(status: int, headers: Mapping[str, str], body: bytes, report: Report) -> None:
    """Count the refusal's reason; note it in `bad_refusals` if it breaks the contract: every
    refusal a problem document (RFC 9457), every 429 and 503 with a `Retry-After`."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    faults = []
    media_type = headers.get("Content-Type", "").split(";")[0].strip()
    if (
        media_type != "application/problem+json"
        or not isinstance(document, dict)
        or document.get("status") != status
        or not document.get("title")
    ):
        faults.append(f"not a problem document ({media_type}: {body[:100]!r})")
    if status in (429, 503) and not headers.get("Retry-After", "").isdigit():
        faults.append(f"Retry-After {headers.get('Retry-After')!r}")
    detail = document.get("detail") if isinstance(document, dict) else None
    report.reasons[f"{status} {detail}"] += 1
    if faults:
        report.bad_refusals.append(f"{status}: {'; '.join(faults)}")


@contextlib.asynccontextmanager
async def sample_depth(
    amqp_url: str, queue: str, report: Report, every: float = 0.05
) -> AsyncIterator[None]:
    """While the block runs, sample the ready messages of `queue` (a passive declare's message
    count) every `every` seconds; the most seen goes to `report.peak_depth`."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        report.peak_depth = 0

        async def sample() -> None:
            while True:
                async with asyncio.timeout(10):
                    declared = await channel.declare_queue(queue, passive=True)
                count = declared.declaration_result.message_count or 0
                report.peak_depth = max(report.peak_depth or 0, count)
                await asyncio.sleep(every)

        sampler = asyncio.create_task(sample())
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler  # raises what stopped the sampler early, if anything did


async def drain(
    http: aiohttp.ClientSession, urls: Callable[[], list[str]], report: Report, deadline: float
) -> None:
    """Wait for every accepted job to be terminal; the ones that are not by `deadline` are lost."""
    end = time.monotonic() + deadline
    pending = list(report.accepted)

    async def final_status(job_id: str) -> dict[str, Any] | None:
        while time.monotonic() < end:
            url = urls()[0]
            wait = max(0.1, min(10.0, end - time.monotonic()))
            try:
                async with http.get(f"{url}/v1/jobs/{job_id}", params={"wait": str(wait)}) as r:
                    if r.status == 200:
                        record: dict[str, Any] = await r.json()
                        if record["status"] in TERMINAL:
                            return record
                        continue
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.2)
        return None

    semaphore = asyncio.Semaphore(50)

    async def account(job_id: str) -> None:
        async with semaphore:
            record = await final_status(job_id)
        if record is None:
            report.lost.append(job_id)
            return
        report.statuses[record["status"]] += 1
        if record["error"] is not None:
            report.errors[record["error"]["message"]] += 1

    await asyncio.gather(*(account(job_id) for job_id in pending))
    report.drained_at = time.monotonic()


def count_executions(task_log: Path, report: Report) -> None:
    lines = [line.split() for line in task_log.read_text().splitlines()]
    runs = collections.Counter(words[0] for words in lines if len(words) == 3)  # no note
    report.executions = runs
    report.executed_twice = sum(1 for job_id in report.accepted if runs[job_id] > 1)


async def count_outcomes(amqp_url: str, prefix: str, report: Report) -> None:
    """Read the whole event log and count the terminal events recorded for each job."""
    outcomes: collections.Counter[str] = collections.Counter()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        stream = await channel.declare_queue(f"{prefix}.events", passive=True)
        arrived = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if (message.headers or {}).get("aq-kind") == "events":
                for event in orjson.loads(message.body)["events"]:
                    if event.get("event") in TERMINAL:  # (checkpoint notes have none)
                        outcomes[event["job"]] += 1
            arrived.set()
            await message.ack()

        await stream.consume(on_message, arguments={"x-stream-offset": "first"})
        async with asyncio.timeout(120):  # read until the stream is quiet for 2 s
            while True:
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), 2.0)
                except TimeoutError:
                    break
    report.outcomes = outcomes
    report.outcomes_twice = [job_id for job_id, n in outcomes.items() if n > 1]


# Topics: a publisher and followers, then an account of every confirmed message ---------------


@dataclass
class TopicReport:
    scenario: str
    published: int = 0
    #: The offsets of the publishes answered 202: the messages every follower must get.
    confirmed: list[int] = field(default_factory=list)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    followers: list[Follower] = field(default_factory=list)

    def row(self) -> str:
        lost = sum(len(f.missing(self.confirmed)) for f in self.followers)
        duplicated = sum(f.duplicates for f in self.followers)
        disorder = sum(f.out_of_order for f in self.followers)
        reconnects = sum(f.reconnects for f in self.followers)
        rejected = ", ".join(f"{n} {why}" for why, n in sorted(self.rejected.items())) or "0"
        return (
            f"| {self.scenario} | {self.published} | {len(self.confirmed)} | {rejected} "
            f"| {len(self.followers)} | {reconnects} | {lost} | {duplicated} | {disorder} |"
        )


TOPIC_HEADER = (
    "| scenario | published | confirmed | rejected | followers | reconnects | lost | duplicated "
    "| out of order |\n|---|---|---|---|---|---|---|---|---|"
)


class Follower:
    """A websocket client that follows a topic pattern as the README says a client should: it
    keeps the offset of the last message it got and, whenever its connection ends, connects
    again (to whichever server is up) and resubscribes with `since` = that offset."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        urls: Callable[[], list[str]],
        pattern: str,
        since: int,
        turn: int = 0,
    ) -> None:
        self._http = http
        self._urls = urls
        self.channel = f"topic:{pattern}"
        self.last = since
        self.offsets: list[int] = []
        self._seen: set[int] = set()
        self.duplicates = 0
        self.out_of_order = 0
        self.reconnects = -1  # the first connect is not one
        self.expired: list[dict[str, Any]] = []
        self._turn = itertools.count(turn)  # which of `urls` to connect to next

    def missing(self, confirmed: list[int]) -> set[int]:
        return set(confirmed) - self._seen

    async def run(self) -> None:
        """Follow until cancelled."""
        while True:
            self.reconnects += 1
            urls = self._urls()
            url = urls[next(self._turn) % len(urls)]
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with self._http.ws_connect(url + "/v1/ws", heartbeat=None) as ws:
                    await ws.send_json(
                        {"op": "subscribe", "channel": self.channel, "since": self.last}
                    )
                    async for message in ws:
                        if message.type is not aiohttp.WSMsgType.TEXT:
                            break
                        self._on_frame(orjson.loads(message.data))
            await asyncio.sleep(0.2)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "message":
            offset = frame["offset"]
            if offset in self._seen:
                self.duplicates += 1
            elif offset < self.last:
                self.out_of_order += 1
            self.offsets.append(offset)
            self._seen.add(offset)
            self.last = max(self.last, offset)
        elif frame.get("code") == "offset_expired":
            self.expired.append(frame)


async def publish_load(
    http: aiohttp.ClientSession,
    urls: Callable[[], list[str]],
    report: TopicReport,
    total: int,
    concurrency: int,
    fault_at: int,
    fault: Fault,
) -> None:
    """POST messages to topics `load.<n % 5>` until `total` are confirmed (or 90 s pass),
    `concurrency` at a time, and inject `fault` after `fault_at` publishes. The load spans the
    fault: it goes on until the fault is over and a publish after it was confirmed."""
    counter = itertools.count()
    give_up = time.monotonic() + 90
    fault_task: asyncio.Task[None] | None = None
    faulted: list[float] = []
    confirmed_after: list[float] = []

    def done() -> bool:
        if len(report.confirmed) < total:
            return False
        return fault_task is not None and fault_task.done() and bool(confirmed_after)

    async def publisher() -> None:
        nonlocal fault_task
        while not done() and time.monotonic() < give_up:
            n = next(counter)
            if n == fault_at:
                fault_task = asyncio.create_task(fault(lambda: faulted.append(time.monotonic())))
            live = urls()
            sent = time.monotonic()
            report.published += 1
            try:
                async with http.post(
                    f"{live[n % len(live)]}/v1/topics/load.{n % 5}",
                    data=orjson.dumps({"n": n}),
                    headers=JSON,
                ) as response:
                    if response.status == 202:
                        report.confirmed.append((await response.json())["offset"])
                        if faulted and sent > faulted[0]:
                            confirmed_after.append(sent)
                        continue
                    report.rejected[str(response.status)] += 1
            except (TimeoutError, aiohttp.ClientError):
                report.rejected["no connection"] += 1
            await asyncio.sleep(0.2)  # back off while the service is unavailable

    await asyncio.gather(*(publisher() for _ in range(concurrency)))
    if fault_task is not None:
        await fault_task


async def caught_up(report: TopicReport, deadline: float) -> None:
    """Wait until every follower got past the last confirmed offset, or `deadline` seconds."""
    last = max(report.confirmed)
    with contextlib.suppress(TimeoutError):  # the account says what is missing
        await eventually(lambda: all(f.last >= last for f in report.followers), deadline)
    await asyncio.sleep(0.3)  # for a late duplicate
