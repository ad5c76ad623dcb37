"""The priority gate: who of the jobs a process holds starts next."""

from __future__ import annotations

import asyncio

import pytest

from aioqueue.gate import NoSlot, PriorityGate


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


async def test_a_kept_slot_stays_taken_past_its_block_until_given_back_once() -> None:
    """A stuck thread's slot: its job is over, the slot is not free until the thread returns."""
    gate = PriorityGate(1, max_wait=60)
    order: list[str] = []
    async with gate.slot(0) as slot:
        give_back = slot.keep()
    assert gate.kept == 1
    waiter = asyncio.create_task(hold(gate, 0, "waiter", order))
    await asyncio.sleep(0.05)
    assert order == [] and gate.waiting == 1
    give_back()
    async with asyncio.timeout(5):
        await waiter
    assert order == ["waiter"] and gate.kept == 0
    give_back()  # a second call gives nothing more: the gate still has one slot
    holding = peak = 0

    async def job() -> None:
        nonlocal holding, peak
        async with gate.slot(0):
            holding += 1
            peak = max(peak, holding)
            await asyncio.sleep(0.01)
            holding -= 1

    async with asyncio.timeout(5):
        await asyncio.gather(job(), job(), job())
    assert peak == 1


async def test_a_slot_given_back_before_its_block_ends_is_released_by_the_block() -> None:
    """A thread that returns while its attempt's outcome is still being recorded."""
    gate = PriorityGate(1, max_wait=60)
    order: list[str] = []
    async with gate.slot(0) as slot:
        slot.keep()()
        waiter = asyncio.create_task(hold(gate, 0, "waiter", order))
        await asyncio.sleep(0.05)
        assert order == [] and gate.kept == 0  # still one holder: this block
    async with asyncio.timeout(5):
        await waiter
    assert order == ["waiter"]


async def test_shut_sends_every_waiter_and_every_later_arrival_away() -> None:
    gate = PriorityGate(1, max_wait=60)
    async with gate.slot(0) as slot:
        slot.keep()  # never given back: a thread that never returns
    waiters = [asyncio.create_task(hold(gate, n, str(n), [])) for n in range(3)]
    await asyncio.sleep(0.01)
    assert gate.waiting == 3
    gate.shut()
    async with asyncio.timeout(5):
        results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(result) for result in results] == [NoSlot] * 3 and gate.waiting == 0
    with pytest.raises(NoSlot):
        await hold(gate, 0, "late", [])


async def test_with_patience_a_waiter_gives_up_only_once_every_slot_is_kept() -> None:
    """A slot held by a running job comes free within its timeout: wait. One kept by a stuck
    thread may never: past `patience`, go (back to the broker, in the runner)."""
    gate = PriorityGate(1, max_wait=60, patience=0.02)
    order: list[str] = []
    async with gate.slot(0) as slot:
        waiter = asyncio.create_task(hold(gate, 0, "waiter", order))
        await asyncio.sleep(0.2)  # ten times its patience
        assert not waiter.done()
        give_back = slot.keep()
    async with asyncio.timeout(5):
        with pytest.raises(NoSlot, match="all 1 slots are held by stuck work"):
            await waiter
    assert order == [] and gate.waiting == 0
    give_back()
    async with asyncio.timeout(5):
        await hold(gate, 0, "after", order)  # the slot is free again
    assert order == ["after"] and gate.kept == 0
