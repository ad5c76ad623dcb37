"""aioqueue.web.guard's log lines: the first closed connection at once, then counts a minute."""

import asyncio
import logging

import pytest

from aioqueue.web import guard


async def test_a_flood_of_closed_connections_is_a_line_then_a_count_per_period(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(guard, "SAY_EVERY", 0.2)
    caplog.set_level(logging.INFO, logger=guard.__name__)
    tally = guard._Tally(asyncio.get_running_loop(), logging.WARNING, "closed on accept")
    for _ in range(500):
        tally.add()
    assert caplog.messages == ["a connection closed on accept (more: counted once a minute)"]
    await asyncio.sleep(0.3)
    assert caplog.messages[1:] == ["499 more connections closed on accept in a minute"]
    await asyncio.sleep(0.3)  # a period with none: nothing said, and the next is said at once
    assert len(caplog.messages) == 2
    tally.add()
    assert caplog.messages[2] == caplog.messages[0]
    assert {record.levelno for record in caplog.records} == {logging.WARNING}
