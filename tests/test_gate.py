"""The priority gate: who of the jobs a process holds starts next."""

from __future__ import annotations

import asyncio

import pytest

from aioqueue.gate import PriorityGate


async def hold(gate: PriorityGate, priority: int, label: str, order: list[str]) -> None:
    async with gate.slot(priority):
        order.append(label)
        await asyncio.sleep(0)


async def test_waiters_enter_by_priority_then_arrival() -> None:
    gate = PriorityGate(1, max_wait=60)
    order: list[str] = []
    async with gate.slot(0):
        tasks = [
            asyncio.create_task(hold(gate, priority, label, order))
            for priority, label in [(0, "a"), (9, "b"), (5, "c"), (9, "d"), (0, "e")]
        ]
        await asyncio.sleep(0.01)
        assert gate.waiting == 5 and order == []
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert order == ["b", "d", "c", "a", "e"]


async def test_no_more_than_the_limit_hold_a_slot_at_once() -> None:
    gate = PriorityGate(3, max_wait=60)
    holding = peak = 0

    async def job(priority: int) -> None:
        nonlocal holding, peak
        async with gate.slot(priority):
            holding += 1
            peak = max(peak, holding)
            await asyncio.sleep(0.001)
            holding -= 1

    async with asyncio.timeout(5):
        await asyncio.gather(*(job(n % 10) for n in range(50)))
    assert peak == 3 and gate.waiting == 0


async def test_a_waiter_past_max_wait_goes_first_whatever_its_priority() -> None:
    gate = PriorityGate(1, max_wait=0.05)
    order: list[str] = []
    async with gate.slot(0):
        old = asyncio.create_task(hold(gate, 0, "old", order))
        await asyncio.sleep(0.1)  # "old" is overdue now
        new = asyncio.create_task(hold(gate, 9, "new", order))
        await asyncio.sleep(0.01)
    async with asyncio.timeout(5):
        await asyncio.gather(old, new)
    assert order == ["old", "new"]


async def test_a_cancelled_waiter_gives_up_its_place_and_leaks_no_slot() -> None:
    gate = PriorityGate(1, max_wait=60)
    order: list[str] = []
    async with gate.slot(0):
        gone = asyncio.create_task(hold(gate, 9, "gone", order))
        kept = asyncio.create_task(hold(gate, 0, "kept", order))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
    async with asyncio.timeout(5):
        await kept
        async with gate.slot(0):  # the slot came back
            pass
    assert order == ["kept"] and gate.waiting == 0
