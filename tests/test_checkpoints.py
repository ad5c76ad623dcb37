"""Checkpoints on RabbitMQ (RELIABILITY row 28): a process with no store of its own starts from the
newest sound checkpoint and reads only the log after it; an unsound one is never loaded."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest

from aioqueue import Settings
from aioqueue.broker import checkpoints
from aioqueue.broker.checkpoints import CheckpointStreams
from aioqueue.config import BrokerSettings, JobsSettings, StoreSettings
from aioqueue.jobs import JobStatus
from aioqueue.service import Service
from tests.support import ROOT
from tests.test_service import make_app, until_terminal

pytestmark = pytest.mark.amqp

THIRTY_DAYS = 30 * 86400

#: A process that writes one good checkpoint, then a slow second one, until it is killed.
KILLED_WRITER = """
import asyncio, os, sys
from aioqueue import Settings
from aioqueue.broker import checkpoints
from aioqueue.config import BrokerSettings, StoreSettings
from aioqueue.service import Service
from tests.test_service import make_app

async def main(url, prefix, folder):
    settings = Settings(broker=BrokerSettings(url=url, prefix=prefix),
                        store=StoreSettings(dir=folder))
    app = make_app([])

    @app.task
    async def keep(text: str) -> None:
        pass

    service = Service(app, settings)
    await service.start()
    await service.jobs.submit({"task": "add", "args": [1]})
    record = await service.checkpointer.write()
    print("good", record["id"], flush=True)
    await service.jobs.submit({"task": "add", "args": [2]})
    for _ in range(20):  # incompressible arguments, so that the second checkpoint is large
        await service.jobs.submit({"task": "keep", "args": [os.urandom(2048).hex()], "delay": 3600})
    checkpoints.CHUNK_BYTES = 8  # thousands of tiny chunks: a write that takes seconds
    checkpoints.WINDOW = 1
    print("writing", flush=True)
    await service.checkpointer.write()
    print("finished (too soon)", flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
async def make_service(
    amqp_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Services on one log; each `folder` is a process's own disk (a fresh one: a new host)."""
    started: list[Service] = []

    async def make(
        folder: str,
        app: Any = None,
        broker: dict[str, Any] | None = None,
        jobs: dict[str, Any] | None = None,
        **store: Any,
    ) -> Service:
        settings = Settings(
            broker=BrokerSettings(
                url=amqp_url, prefix=prefix, confirm_timeout=3.0, **(broker or {})
            ),
            jobs=dataclasses.replace(JobsSettings(), result_ttl=3600, **(jobs or {})),
            store=dataclasses.replace(StoreSettings(dir=str(tmp_path / folder)), **store),
        )
        service = Service(app or make_app([]), settings)
        async with asyncio.timeout(60):
            await service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        await service.close()


async def test_a_fresh_process_starts_from_the_newest_checkpoint(make_service: Any) -> None:
    first = await make_service("host-a")
    done = [await first.jobs.submit({"task": "add", "args": [n]}) for n in range(20)]
    for job in done:
        await until_terminal(first, job.id)
    later = await first.jobs.submit({"task": "add", "args": [1], "delay": THIRTY_DAYS})
    record = await first.checkpointer.write()
    assert record is not None and record["jobs"] == 21
    after = await first.jobs.submit({"task": "add", "args": [2], "delay": THIRTY_DAYS})
    entries = first.log.entries_applied

    second = await make_service("host-b")  # a new host: no store of its own
    assert second.store.offset is not None and second.store.offset >= record["offset"]
    # It read the log only after the checkpoint: a few entries, not every one of the first's.
    assert second.log.entries_applied < entries / 2
    assert len(second.store) == 22
    for job in [*done, later, after]:
        assert second.store.get(job.id).to_dict() == first.store.get(job.id).to_dict()
    assert (await second.jobs.cancel(later.id)).status is JobStatus.CANCELLED


async def test_checkpoints_follow_changes_and_an_idle_log_gets_none(make_service: Any) -> None:
    """Written every interval while jobs change; none while nothing does (each would add its own
    notes to the log for nothing)."""
    service = await make_service("host-a", checkpoint_interval=0.2)

    def done() -> int:
        return sum(entry["checkpoint"] == "done" for entry in service.checkpointer.known)

    async def until_more_than(count: int) -> None:
        for _ in range(200):  # 10 s
            if done() > count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no checkpoint after {count} in 10 s")

    await service.jobs.submit({"task": "add", "args": [1], "delay": THIRTY_DAYS})
    await until_more_than(0)
    settled = done()
    await asyncio.sleep(1.5)  # several intervals, with only the log's empty entries
    await service.log.barrier()
    assert done() == settled
    await service.jobs.submit({"task": "add", "args": [2], "delay": THIRTY_DAYS})
    await until_more_than(settled)


async def test_a_store_of_its_own_newer_than_the_checkpoint_is_kept(make_service: Any) -> None:
    first = await make_service("host-a")
    await first.checkpointer.write()
    job = await first.jobs.submit({"task": "add", "args": [1], "delay": THIRTY_DAYS})
    offset = first.store.offset
    await first.close()
    again = await make_service("host-a")
    assert again.store.get(job.id) is not None
    assert again.log.entries_applied <= 2 and again.store.offset >= offset


async def test_an_unsound_checkpoint_is_never_loaded_and_an_older_one_is(
    make_service: Any, amqp_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "CHUNK_BYTES", 512)  # several chunks each
    first = await make_service("host-a")
    jobs = [
        await first.jobs.submit({"task": "add", "args": [n], "delay": THIRTY_DAYS})
        for n in range(5)
    ]
    good = await first.checkpointer.write()
    assert good is not None and good["chunks"] > 2
    streams = CheckpointStreams(amqp_url, prefix, timeout=30)
    # Newer records, each unsound: a chunk missing; a digest that does not match; no stream.
    data = await streams.fetch(good)
    pieces = [data[at : at + 512] for at in range(0, len(data), 512)]
    gapped = streams.stream_name("gapped")
    await publish_chunks(amqp_url, gapped, [(i, p) for i, p in enumerate(pieces) if i != 1])
    base = {**good, "offset": good["offset"] + 1000}
    await add_records(
        amqp_url,
        streams.index,
        [
            {**base, "id": "gapped", "stream": gapped},
            {**base, "id": "digest", "sha256": "0" * 64},
            {**base, "id": "gone", "stream": streams.stream_name("gone")},
        ],
    )
    second = await make_service("host-b")
    assert second.store.offset is not None and second.store.offset >= good["offset"]
    assert {j.id for j in jobs} <= {j.id for j in second.store.list(limit=100)[0]}


async def test_a_writer_killed_mid_checkpoint_leaves_the_last_good_one_to_load(
    make_service: Any, amqp_url: str, prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "aioqueue.checkpointer")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    writer = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WRITER,
        amqp_url,
        prefix,
        str(tmp_path / "killed"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert writer.stdout is not None
        async with asyncio.timeout(30):
            good = (await writer.stdout.readline()).split()
            assert good[:1] == [b"good"], good
            assert await writer.stdout.readline() == b"writing\n"
        await asyncio.sleep(1.0)  # well into its thousands of chunks
        assert writer.returncode is None, "the slow checkpoint finished before the kill"
    finally:
        if writer.returncode is None:
            writer.send_signal(signal.SIGKILL)
        async with asyncio.timeout(10):
            await writer.wait()

    fresh = await make_service("host-b")
    assert f"loaded checkpoint {good[1].decode()}:" in caplog.text
    known = fresh.checkpointer.known
    assert [e["checkpoint"] for e in known] == ["done", "begin"]
    assert known[0]["id"] == good[1].decode()
    orphan = known[1]["stream"]
    page, _ = fresh.store.list(limit=100)
    assert len(page) == 22  # the good checkpoint's job, then what the log had after it
    assert [j.args for j in page[-2:]] == [[2], [1]]
    # Two more checkpoints: the oldest good one and the orphan are deleted.
    await fresh.checkpointer.write()
    await fresh.checkpointer.write()
    assert [e["checkpoint"] for e in fresh.checkpointer.known] == ["done", "done"]
    assert not await stream_exists(amqp_url, orphan)


async def test_a_store_older_than_the_log_retention_says_what_it_misses(
    make_service: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """No checkpoint, and the log dropped what came after the store's offset: an ERROR line."""
    app = make_app([])

    @app.task
    async def keep(text: str) -> None:
        pass

    first = await make_service("host-a", app, log_max_bytes=2**20)
    await first.jobs.submit({"task": "add", "args": [1], "delay": THIRTY_DAYS})
    await first.close()
    big = {"max_args_bytes": 2**21}  # 1 MB args: the log fills fast
    other = await make_service("host-b", app, jobs=big, log_max_bytes=2**20)
    for _ in range(24):  # 24 MB: three segments of the log, of which retention keeps 1 MiB
        await other.jobs.submit({"task": "keep", "args": ["x" * 2**20], "delay": THIRTY_DAYS})
    await other.close()
    caplog.set_level(logging.ERROR, "aioqueue.broker.amqp")
    await make_service("host-a", app, log_max_bytes=2**20)
    assert "the event log goes on at offset" in caplog.text


async def test_a_new_log_is_read_from_its_start_and_the_store_keeps_its_jobs(
    make_service: Any, amqp_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The log stream deleted and declared again (its offsets start at 0 again): a store that
    applied more than it holds would wait for ever for an offset past its tail."""
    quick = {"heartbeat": 2}  # how long a resumed log may stay silent before it counts as new
    first = await make_service("host-a", broker=quick)
    job = await first.jobs.submit({"task": "add", "args": [1], "delay": THIRTY_DAYS})
    for n in range(5):  # so that the store's offset is past the new log's first entries
        await first.jobs.submit({"task": "add", "args": [n], "delay": THIRTY_DAYS})
    await first.close()
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{prefix}.events")
    caplog.set_level(logging.ERROR, "aioqueue.broker.amqp")
    again = await make_service("host-a", broker=quick)
    assert "the event log has no entry at offset" in caplog.text
    assert again.jobs.get(job.id).status is JobStatus.SCHEDULED  # the store kept its jobs
    later = await again.jobs.submit({"task": "add", "args": [2]})
    assert (await until_terminal(again, later.id)).status is JobStatus.SUCCEEDED


async def publish_chunks(url: str, stream: str, chunks: list[tuple[int, bytes]]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(stream, durable=True, arguments={"x-queue-type": "stream"})
        for index, body in chunks:
            message = aio_pika.Message(body, headers={checkpoints.CHUNK_HEADER: index})
            await channel.default_exchange.publish(message, stream)


async def add_records(url: str, index: str, records: list[dict[str, Any]]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for record in records:
            body = orjson.dumps({"checkpoint": record})
            await channel.default_exchange.publish(aio_pika.Message(body), index)


async def stream_exists(url: str, name: str) -> bool:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
