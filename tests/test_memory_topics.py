"""The topic log of memory://: offsets, retention by age and by size, and reading from any
offset (the RabbitMQ side is tested through the service, in test_topics_ws.py)."""

from __future__ import annotations

import asyncio
import contextlib

from aioqueue.broker.memory_topics import MemoryTopics


async def read(log: MemoryTopics, after: int, count: int) -> list[tuple[int, str | None, bytes]]:
    got = []
    async with contextlib.aclosing(log.read(after)) as entries:
        async for entry in entries:
            got.append(entry)
            if len(got) == count:
                return got
    raise AssertionError("unreachable")


async def test_offsets_go_up_by_one_and_live_handlers_see_each_message_in_order() -> None:
    log = MemoryTopics(retention_seconds=60, retention_bytes=1 << 20)
    seen: list[int] = []
    log.listen(lambda offset, topic, data: seen.append(offset))
    offsets = [await log.publish("a", b"%d" % n) for n in range(5)]
    assert offsets == seen == [0, 1, 2, 3, 4] and log.position == 5
    assert await read(log, 2, 2) == [(3, "a", b"3"), (4, "a", b"4")]


async def test_retention_by_size_keeps_the_newest() -> None:
    log = MemoryTopics(retention_seconds=60, retention_bytes=1000)
    for _ in range(10):
        await log.publish("a", b"x" * 300)
    # 1000 bytes hold three of 300: reading from the start begins at the first one kept.
    assert [offset for offset, _, _ in await read(log, -1, 3)] == [7, 8, 9]


async def test_retention_by_age_drops_the_old_but_never_the_newest() -> None:
    log = MemoryTopics(retention_seconds=0.2, retention_bytes=1 << 20)
    await log.publish("a", b"1")
    await log.publish("a", b"2")
    await asyncio.sleep(0.3)
    assert [offset for offset, _, _ in await read(log, -1, 1)] == [1]  # the newest stays
    await log.publish("a", b"3")
    assert [offset for offset, _, _ in await read(log, -1, 1)] == [2]


async def test_a_reader_at_the_tail_waits_for_the_next_message() -> None:
    log = MemoryTopics(retention_seconds=60, retention_bytes=1 << 20)
    await log.publish("a", b"0")
    reading = asyncio.create_task(read(log, 0, 1))
    await asyncio.sleep(0.05)
    assert not reading.done()
    await log.publish("b", b"1")
    assert await asyncio.wait_for(reading, 5) == [(1, "b", b"1")]
