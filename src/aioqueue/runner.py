"""Runs job messages: delivery -> checks -> task under its timeout -> outcome recorded -> ack.

The order of each step is what makes an outcome single (DESIGN G2):

* An outcome is written to the event log, and any message it implies (the next attempt, or the
  dead letter) is published, *before* the delivery is acked. A process killed in between gets the
  message redelivered.
* A redelivered message, or one the store does not know yet, waits for a log barrier so that
  every outcome written before it is applied here; then the store decides: a terminal job, a
  stale attempt, or a second copy of a running attempt is acked without running.
* The next attempt's message is published before the `retrying` event, so a recorded retry
  always has its message; a crash in between at worst leaves a second copy, which the store
  rejects when it arrives.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import orjson

from aioqueue import logs
from aioqueue.admission import Admission, Decision, FirstCopy, Message, admit
from aioqueue.broker.base import Broker, Delivery
from aioqueue.config import JobsSettings
from aioqueue.context import Context, SyncContext
from aioqueue.errors import BrokerUnavailable, QueueFull
from aioqueue.eventlog import EventLog
from aioqueue.events import Dead, Failed, JobSpec, Progress, Retrying, Started, Succeeded
from aioqueue.gate import NoSlot, PriorityGate, Slot
from aioqueue.jobs import Job, JobStatus
from aioqueue.metrics import Metrics, waited
from aioqueue.store import JobStore
from aioqueue.tasks import Task

logger = logging.getLogger(__name__)

#: Submits a job body for an owner (a task's child jobs belong to the task's job's owner).
SubmitFn = Callable[[dict[str, Any], str | None], Awaitable[Job]]
#: Publishes (topic, data) and returns the message's offset (`publisher.Topics.publish`).
PublishFn = Callable[[str, Any], Awaitable[int]]
#: How long a message of a job the store does not know waits for the log to catch up.
KNOWN_WITHIN = 1.0
#: Seconds before a message whose outcome could not be recorded goes back to its queue.
REQUEUE_AFTER = 1.0
#: Seconds past its timeout that a redelivered copy waits for a first copy running here: time
#: for the first copy to record its outcome (each write waits a heartbeat at most) and settle.
FIRST_COPY_MARGIN = 60.0
#: Seconds at least that a retry refused by its full queue waits in the delay queues, which
#: always take it; when due, it waits there for room. (RabbitMQ's delays are whole seconds.)
FULL_QUEUE_RETRY_DELAY = 1.0
#: Characters of a progress message kept; the rest is cut, with a marker.
MAX_PROGRESS_MESSAGE = 1024
#: What a message that dies before it runs is recorded as: error type, dead-letter reason.
DEATHS = {
    Admission.EXPIRED: ("Expired", "expired"),
    Admission.NO_TASK: ("UnknownTask", "unknown task"),
}


class _Hooks:
    """A running job's way back into the service (see `context.JobHooks`)."""

    __slots__ = ("_attempt", "_job_id", "_log", "_owner", "_publish", "_submit")

    def __init__(self, log: EventLog, submit: SubmitFn, publish: PublishFn, spec: JobSpec) -> None:
        self._log = log
        self._submit = submit
        self._publish = publish
        self._job_id = spec.id
        self._attempt = spec.attempt
        self._owner = spec.owner

    async def progress(self, value: float, message: str | None) -> None:
        # Each report is a log entry, pushed to every subscriber and kept with the job: a
        # status line, not a payload (which is what the result is for).
        if message is not None:
            message = _cut(message, MAX_PROGRESS_MESSAGE, keep="start")
        await self._log.append(Progress(self._job_id, self._attempt, value, message))

    async def submit(self, task: str, args: Any, options: dict[str, Any]) -> dict[str, Any]:
        job = await self._submit({**options, "task": task, "args": args}, self._owner)
        return job.to_dict()

    async def publish(self, topic: str, data: Any) -> int:
        return await self._publish(topic, data)


def error_record(
    exc: BaseException, message: str | None = None, limit: int = 16384
) -> dict[str, Any]:
    """The error of a failed attempt, its message and traceback cut to `limit` characters each
    (`jobs.max_error_bytes`): a message may repeat a caller's args, and is kept for result_ttl."""
    return {
        "type": type(exc).__name__,
        "message": _cut(message or str(exc), limit, keep="start"),
        "traceback": _cut("".join(traceback.format_exception(exc)), limit, keep="end"),
    }


def _cut(text: str, limit: int, keep: str) -> str:
    """`text` if it fits, else its start (or end: a traceback's last frames and its exception)
    with a marker of what was cut."""
    if len(text) <= limit:
        return text
    cut = len(text) - limit
    marker = f" [... {cut} characters cut]"
    if keep == "start":
        return text[:limit] + marker
    return marker.strip() + "\n" + text[-limit:]


class Runner:
    def __init__(
        self,
        tasks: Mapping[str, Task[Any, Any]],
        defaults: JobsSettings,
        log: EventLog,
        broker: Broker,
        store: JobStore,
        submit: SubmitFn,
        publish: PublishFn,
        concurrency: int,
        max_wait: float,
        give_back_after: float | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`concurrency` jobs of each queue run at once; a job waiting for a slot goes first
        after `max_wait` seconds, and, with `give_back_after`, goes back to the broker after that
        long if every slot of its queue is held by a stuck thread (see `stuck_threads`)."""
        self._tasks = tasks
        self._metrics = metrics if metrics is not None else Metrics(tasks)
        self._defaults = defaults
        self._log = log
        self._broker = broker
        self._store = store
        self._submit = submit
        self._publish = publish
        # A sync job's thread, stuck or not, holds a slot of its queue (`_in_thread`), so a
        # thread for every slot of every queue with a sync task is enough, and a queue whose
        # threads are all stuck can never take the threads of another.
        sync_queues = {task.queue for task in tasks.values() if not task.is_async}
        threads = max(1, concurrency * len(sync_queues))
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="aioqueue-task")
        #: The jobs running in this process, by id.
        self.running: dict[str, asyncio.Task[Any]] = {}
        #: Sync tasks still running in a thread (a thread cannot be stopped), stuck or not.
        self.busy_threads = 0
        #: Per queue: which of the jobs this process holds starts next, `concurrency` at once.
        self._gates: collections.defaultdict[str, PriorityGate] = collections.defaultdict(
            lambda: PriorityGate(concurrency, max_wait, give_back_after)
        )
        self._stopping = False
        self._draining = False
        store.listeners.append(self._on_change)

    @property
    def stuck_threads(self) -> int:
        """Threads of sync tasks whose attempt is over (timed out, cancelled, or cut off by a
        shutdown) but that still run. Each holds a slot of its job's queue until it returns: a
        queue with as many as `broker.prefetch` runs nothing more in this process. Read by
        /readyz (and metrics); only a restart reclaims a thread that never returns."""
        return sum(gate.kept for gate in self._gates.values())

    @property
    def stuck_threads_by_queue(self) -> dict[str, int]:
        """`stuck_threads` by queue, for the queues that have any."""
        return {queue: gate.kept for queue, gate in self._gates.items() if gate.kept}

    def _on_change(self, event: str, job: Job) -> None:
        """A cancel, from whichever process, stops the job if it runs here."""
        if event == "cancelled" and (task := self.running.get(job.id)) is not None:
            logger.info("job %s cancelled while running: stopping it", job.id)
            task.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def drain(self, grace: float) -> int:
        """Let running jobs finish for `grace` seconds; cancel and requeue the rest."""
        self._stopping = True  # jobs waiting for a slot go back rather than start
        for gate in self._gates.values():
            # At once, not as slots come free: slots kept by stuck threads may never be.
            gate.shut()
        running = list(self.running.values())
        if not running:
            return 0
        logger.info("waiting up to %.1f s for %d running jobs", grace, len(running))
        _, pending = await asyncio.wait(running, timeout=grace)
        self._draining = True
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            logger.warning("%d jobs still running after the grace period: requeued", len(pending))
        return len(pending)

    async def on_delivery(self, delivery: Delivery) -> None:
        try:
            spec = JobSpec.decode(delivery.body)
        except ValueError as exc:  # orjson's JSONDecodeError is a ValueError
            logger.error("dead-lettering an undecodable job message: %s", exc)
            await self._dead_letter(delivery.body, f"undecodable: {exc}", task="")
            await delivery.ack()
            return
        try:
            with logs.job_fields(spec.id, spec.task, spec.attempt, spec.queue):
                async with self._gates[spec.queue].slot(spec.priority) as slot:
                    if self._stopping:
                        await delivery.requeue()
                        return
                    await self._settle(delivery, spec, slot)
        except NoSlot as exc:
            if not self._stopping:
                # Every slot of the queue is held by a stuck thread: RabbitMQ's consumer_timeout
                # would close the channel under this message; another process may run it.
                logger.warning(
                    "job %s: queue %s: %s; given back to the broker", spec.id, spec.queue, exc
                )
            await delivery.requeue()

    async def _settle(self, delivery: Delivery, spec: JobSpec, slot: Slot) -> None:
        """Handle a job message, and ack or requeue it whatever happens."""
        try:
            await self._handle(delivery, spec, slot)
        except asyncio.CancelledError:
            job = self._store.get(spec.id)
            if job is not None and job.status is JobStatus.CANCELLED:
                await delivery.ack()  # cancelled by a user: its outcome is recorded
                return
            if not self._draining:
                raise
            # Shutting down past the grace period: the job runs again, here after a restart
            # or on another process. (A requeue counts toward the queue's delivery limit.)
            await delivery.requeue()
        except BrokerUnavailable as exc:
            # The outcome is not recorded: give the message back to run it again (or to find
            # the outcome recorded after all, if only the confirm was lost). Not at once: every
            # requeue counts toward the queue's delivery limit, and the broker needs a moment.
            logger.warning("job %s: outcome not recorded, requeued: %s", spec.id, exc)
            await asyncio.sleep(REQUEUE_AFTER)
            await delivery.requeue()
        except Exception:
            # A bug, not the task's fault (that is caught in _run). Requeued, the message is
            # dead-lettered by the broker after its delivery limit if the fault persists.
            logger.exception("job %s: unexpected error, requeued", spec.id)
            await delivery.requeue()

    async def on_dead(self, body: bytes, reason: str) -> None:
        """Record `dead` for a job message the broker dead-lettered (delivery limit, expiry)."""
        try:
            spec = JobSpec.decode(body)
        except ValueError:
            return
        error = {"type": "DeadLetter", "message": f"dead-lettered by the broker: {reason}"}
        await self._log.append(Dead(spec.id, spec.attempt, error))
        self._metrics.dead_lettered(spec.task, reason)

    async def _dead_letter(self, body: bytes, reason: str, task: str) -> None:
        """Keep a job message in the dead-letter queue, and count it."""
        await self._broker.dead_letter(body, reason)
        self._metrics.dead_lettered(task, reason)

    async def _handle(self, delivery: Delivery, spec: JobSpec, slot: Slot) -> None:
        """Catch up with the log, decide (`admission.admit`), act."""
        job_id = spec.id
        if self._store.is_duplicate(job_id):
            logger.info("job %s repeated an idempotency key another job holds: not run", job_id)
            await delivery.ack()
            return
        message = Message(spec.run, spec.attempt, delivery.redelivered)
        job = await self._catch_up(job_id, message)
        first = self.running.get(job_id)
        task_known = spec.task in self._tasks
        copy = FirstCopy.NONE if first is None else FirstCopy.RUNNING
        decision = admit(job, message, copy, task_known, time.time())
        if decision.admission is Admission.WAIT:
            assert first is not None
            if not await self._first_copy_ended(first, spec):
                await delivery.requeue()
                return
            job = self._store.get(job_id)
            decision = admit(job, message, FirstCopy.ENDED, task_known, time.time())
        if decision.admission is Admission.RUN:
            assert job is not None  # admit() runs only a job it has the record of
            self._metrics.started(spec.task, waited(job, time.time()))
        await self._act(decision, delivery, spec, slot)

    async def _catch_up(self, job_id: str, message: Message) -> Job | None:
        """The job's record once the store has applied what the message implies it knows."""
        # A new job's message can arrive before its `queued` entry comes through the log, which
        # holds it already: wait for that rather than publish a barrier.
        job = await self._store.wait_known(job_id, KNOWN_WITHIN)
        if job is not None and message.run > job.run:
            # A retried job's message can come before its `retried` event: wait for that.
            job = await self._store.wait_for(job_id, lambda j: j.run >= message.run, KNOWN_WITHIN)
        if message.redelivered or job is None or message.attempt > job.attempt:
            await self._log.barrier()
            job = self._store.get(job_id)
        return job

    async def _first_copy_ended(self, running: asyncio.Task[Any], spec: JobSpec) -> bool:
        """Wait for a first copy of the job running here (the broker closed the channel under
        it: consumer_timeout, say); False if it outlives its timeout plus a margin."""
        job_id, attempt = spec.id, spec.attempt
        logger.info("job %s attempt %d: redelivered while it runs here: waiting", job_id, attempt)
        done, _ = await asyncio.wait([running], timeout=spec.timeout + FIRST_COPY_MARGIN)
        if not done:
            # A bug (every step of a run is bounded): rather than hold this slot for ever, this
            # copy goes back, to find the outcome or run after its delivery limit.
            logger.error(
                "job %s attempt %d: its first copy is still running, requeued; it waits at:\n%s",
                job_id,
                attempt,
                _stack(running),
            )
        return bool(done)

    async def _act(self, decision: Decision, delivery: Delivery, spec: JobSpec, slot: Slot) -> None:
        job_id, attempt = spec.id, spec.attempt
        admission = decision.admission
        if admission is Admission.RUN:
            # Not awaited: the outcome, which is, implies the start (see jobs.TARGET).
            self._log.emit(Started(job_id, attempt))
            await self._run(self._tasks[spec.task], spec, delivery.body, slot)
        elif admission is Admission.REQUEUE:
            logger.info("job %s attempt %d: requeued, %s", job_id, attempt, decision.reason)
            await delivery.requeue()
            return
        elif admission is Admission.UNKNOWN:
            # The store keeps every job until it is terminal, and then for result_ttl: this is
            # a finished job forgotten since (cancelled while its message waited), or a lost
            # state. Never run it; keep the message where an operator can look.
            logger.warning("job %s: %s: kept as a dead letter, not run", job_id, decision.reason)
            await self._dead_letter(delivery.body, "unknown job", spec.task)
        elif admission in DEATHS:
            error_type, dead_letter_reason = DEATHS[admission]
            await self._dead_letter(delivery.body, dead_letter_reason, spec.task)
            error = {"type": error_type, "message": decision.reason}
            await self._log.append(Dead(job_id, attempt, error))
        else:
            logger.info("job %s attempt %d: not run, %s", job_id, attempt, decision.reason)
        await delivery.ack()

    async def _run(self, task: Task[Any, Any], spec: JobSpec, body: bytes, slot: Slot) -> None:
        job_id, attempt = spec.id, spec.attempt
        current = asyncio.current_task()
        assert current is not None
        self.running[job_id] = current
        try:
            result = await self._call(task, spec, slot)
        except (asyncio.CancelledError, BrokerUnavailable):
            raise
        except Exception as exc:
            message = _timeout_message(exc, spec) if isinstance(exc, TimeoutError) else None
            error = error_record(exc, message, self._defaults.max_error_bytes)
            await self._failed(task, spec, body, error)
        else:
            kept = kept_result(result, self._defaults.max_result_bytes)
            if isinstance(kept, orjson.Fragment):
                await self._log.append(Succeeded(job_id, attempt, kept))
            else:
                # The task ran to its end, side effects and all: another attempt would do it
                # all again to return the same kind of value. So the job fails now, as Celery
                # fails a task whose result cannot be encoded (EncodeError), whatever is left
                # of its attempts.
                await self._failed(task, spec, body, kept, last=True)
        finally:
            self.running.pop(job_id, None)

    async def _call(self, task: Task[Any, Any], spec: JobSpec, slot: Slot) -> Any:
        """The attempt's task called, and the time it took counted, however it ended: a
        timeout or a cancel is time the attempt took too."""
        began = time.monotonic()
        try:
            return await self._call_task(task, spec, slot)
        finally:
            self._metrics.ran(task.name, time.monotonic() - began)

    async def _call_task(self, task: Task[Any, Any], spec: JobSpec, slot: Slot) -> Any:
        positional, keyword = task.signature.bind(spec.args)
        hooks = _Hooks(self._log, self._submit, self._publish, spec)
        loop = asyncio.get_running_loop()
        if task.signature.takes_context:
            ctx: Context | SyncContext = (
                Context(spec.id, task.name, spec.attempt, hooks)
                if task.is_async
                else SyncContext(spec.id, task.name, spec.attempt, hooks, loop)
            )
            positional.insert(0, ctx)
        async with asyncio.timeout(spec.timeout):
            if task.is_async:
                return await task.fn(*positional, **keyword)
            call = functools.partial(self._count_busy, task.fn, positional, keyword)
            return await self._in_thread(call, task, spec, slot)

    async def _in_thread(
        self, call: Callable[[], Any], task: Task[Any, Any], spec: JobSpec, slot: Slot
    ) -> Any:
        """Run `call` in the pool. A thread cannot be stopped: if the attempt ends first (its
        timeout, a cancel, a shutdown), its outcome is recorded as ever and the thread runs on,
        stuck, keeping its queue's slot until it returns. So a queue's threads, stuck or not,
        never outnumber its slots: a task that loops for ever, attempt after attempt, stops its
        own queue in this process, and never takes the threads of another."""
        started = time.monotonic()
        # With this task's context: the job's log fields follow it into the thread.
        thread: Future[Any] = self._executor.submit(contextvars.copy_context().run, call)
        try:
            return await asyncio.wrap_future(thread)
        finally:
            # A thread that had not started yet never will (cancel() is True).
            if not thread.done() and not thread.cancel():
                self._stuck(thread, task, spec, slot, time.monotonic() - started)

    def _stuck(
        self, thread: Future[Any], task: Task[Any, Any], spec: JobSpec, slot: Slot, ran: float
    ) -> None:
        give_back = slot.keep()
        since = time.monotonic()
        # One line when a thread is stuck, one when it returns: as many as a queue has slots.
        logger.warning(
            "job %s attempt %d (task %s): the attempt ended after %.1f s (timeout %g s) but its"
            " thread runs on, holding a slot of queue %s until it returns (%d stuck threads)",
            spec.id,
            spec.attempt,
            task.name,
            ran,
            spec.timeout,
            spec.queue,
            self.stuck_threads,
        )
        loop = asyncio.get_running_loop()

        def back() -> None:
            give_back()
            logger.info(
                "job %s attempt %d (task %s): its thread returned after %.1f s stuck; queue %s has"
                " its slot back (%d stuck threads left)",
                spec.id,
                spec.attempt,
                task.name,
                time.monotonic() - since,
                spec.queue,
                self.stuck_threads,
            )

        def returned(_: Future[Any]) -> None:
            # In the thread, or here if it returned meanwhile. A loop already closed (the
            # process stops) has no slots left to give back.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(back)

        thread.add_done_callback(returned)

    def _count_busy(self, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
        self.busy_threads += 1  # a GIL-atomic enough counter: only read to decide an exit
        try:
            return fn(*args, **kwargs)
        finally:
            self.busy_threads -= 1

    async def _failed(
        self,
        task: Task[Any, Any],
        spec: JobSpec,
        body: bytes,
        error: dict[str, Any],
        last: bool = False,
    ) -> None:
        """Record a failed attempt: the next one is published, or (the last attempt, or `last`)
        the job fails and its message is dead-lettered."""
        job_id, attempt = spec.id, spec.attempt
        if last or attempt >= spec.max_attempts:
            await self._dead_letter(body, "failed", task.name)
            await self._log.append(Failed(job_id, attempt, error))
            return
        delay = await self._publish_retry(spec, self._backoff(task, attempt))
        scheduled_for = time.time() + delay
        await self._log.append(Retrying(job_id, attempt, error, scheduled_for))

    async def _publish_retry(self, spec: JobSpec, delay: float) -> float:
        """Publish the next attempt's message, after `delay` seconds or later; returns when.

        A full queue refuses it as it refuses a submit (QueueFull). Left to the caller, that
        would requeue the delivery: this attempt would run again, and each requeue counts toward
        the delivery limit, so the job could end `dead` without its attempts. Through the delay
        queues instead, the retry waits for room, and this attempt is over.
        """
        body = spec.replace(attempt=spec.attempt + 1).encode()
        queue, priority = spec.queue, spec.priority
        try:
            await self._broker.publish(body, queue, delay, priority)
        except QueueFull:
            delay = max(delay, FULL_QUEUE_RETRY_DELAY)
            logger.info(
                "job %s attempt %d: queue %s is full, the retry waits %g s and then for room",
                spec.id,
                spec.attempt,
                queue,
                delay,
            )
            await self._broker.publish(body, queue, delay, priority)
        return delay

    def _backoff(self, task: Task[Any, Any], attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2^(n-1))] before the n-th retry."""
        base, cap = task.backoff(self._defaults)
        delay = random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
        resolution = self._broker.delay_resolution
        return round(delay / resolution) * resolution if resolution else delay


def kept_result(result: Any, limit: int) -> orjson.Fragment | dict[str, Any]:
    """A task's result as the JSON its `succeeded` event carries (encoded once: measured, then
    logged as it is), or why it cannot be kept, as a failed job's error: it must be JSON, and at
    most `limit` bytes of it (`jobs.max_result_bytes`: a result is kept for result_ttl, in every
    process's store). No traceback: the fault is in the value, not in a line of code."""
    try:
        encoded = orjson.dumps(result)
    except TypeError as exc:  # orjson's JSONEncodeError is a TypeError
        message = f"the task returned a value that is not JSON: {exc}"
        return {"type": "TypeError", "message": message}
    if len(encoded) > limit:
        return {
            "type": "ResultTooLarge",
            "message": f"the task returned {len(encoded)} bytes of JSON; at most {limit} are kept"
            " (jobs.max_result_bytes): return a reference to the data (a URL, a key), not the data",
        }
    return orjson.Fragment(encoded)


def _timeout_message(exc: TimeoutError, spec: JobSpec) -> str:
    return str(exc) or f"timed out after {spec.timeout:g} s"


def _stack(task: asyncio.Task[Any]) -> str:
    """Where a task waits: its chain of awaits (Task.print_stack shows only the outermost)."""
    lines = []
    awaiting: Any = task.get_coro()
    while awaiting is not None:
        frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
        if frame is None:
            lines.append(f"  awaiting {awaiting!r}")
            break
        code = frame.f_code
        lines.append(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}")
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
    return "\n".join(lines)
