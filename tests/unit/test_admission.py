"""vlm.admission.RequestBudget: byte reservations, first come first served, bounded waiting."""

from __future__ import annotations

import asyncio

import pytest

from vlm.admission import RequestBudget
from vlm.errors import ResourceExhausted

MiB = 1 << 20


def test_the_limit_must_hold_one_message() -> None:
    with pytest.raises(ValueError, match="at least one maximum-size message"):
        RequestBudget(3 * MiB, 4 * MiB)
    RequestBudget(4 * MiB, 4 * MiB)


async def test_reservations_wait_for_room_in_arrival_order() -> None:
    changes: list[tuple[int, int]] = []
    budget = RequestBudget(10, 4, on_change=lambda r, w: changes.append((r, w)))
    await budget.reserve(4)
    await budget.reserve(4)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await budget.reserve(n)
        order.append(name)

    big = asyncio.create_task(take("big", 4))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 1))  # would fit now, but arrived second
    await asyncio.sleep(0)
    assert order == [] and budget.waiting == 2 and changes[-1] == (8, 2)
    budget.release(4)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.reserved == 9 and budget.waiting == 0
    assert changes[-1] == (9, 0)


async def test_too_many_waiting_is_refused_at_once() -> None:
    budget = RequestBudget(4, 4, max_waiting=1)
    await budget.reserve(4)
    waiter = asyncio.create_task(budget.reserve(4))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="1 requests already waiting"):
        await budget.reserve(1)
    budget.release(4)
    await waiter
    assert budget.reserved == 4


async def test_a_cancelled_waiter_leaves_the_queue_and_lets_the_next_in() -> None:
    budget = RequestBudget(8, 4)
    await budget.reserve(6)
    first = asyncio.create_task(budget.reserve(4))
    await asyncio.sleep(0)
    second = asyncio.create_task(budget.reserve(2))
    await asyncio.sleep(0)
    assert budget.waiting == 2
    first.cancel()  # the head: its departure lets the second (which fits) in
    await asyncio.wait_for(second, 1)
    assert first.cancelled() and budget.reserved == 8 and budget.waiting == 0


async def test_a_waiter_cancelled_after_its_grant_gives_the_bytes_back() -> None:
    budget = RequestBudget(4, 4)
    await budget.reserve(4)
    waiter = asyncio.create_task(budget.reserve(4))
    await asyncio.sleep(0)
    budget.release(4)  # granted: the future is resolved, the task not yet resumed
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert budget.reserved == 0
