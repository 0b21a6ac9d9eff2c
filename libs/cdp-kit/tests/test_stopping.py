"""Stops that end: a cancellation landing with a result is not lost, and a task that ignores its
cancellation is named and left after the grace instead of holding the stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from cdp_kit.stopping import cancel_and_wait, raise_if_cancelling, wait_for


async def test_a_cancellation_landing_in_the_turn_the_result_does_is_not_lost():
    """On Python 3.11 `asyncio.wait_for` returns the result here and the task carries on."""
    result = asyncio.get_running_loop().create_future()
    carried_on = []

    async def waiting() -> None:
        await wait_for(result, 10)
        carried_on.append(True)

    task = asyncio.create_task(waiting())
    await asyncio.sleep(0)  # the task is waiting for the result
    result.set_result("reply")
    task.cancel()  # the reply and the stop in one loop turn
    with pytest.raises(asyncio.CancelledError):
        await task
    assert carried_on == []


async def test_wait_for_returns_the_result_or_times_out():
    assert await wait_for(asyncio.sleep(0, "done"), 1) == "done"
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.Event().wait(), 0.01)
    pending = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_for(pending, 0.01)
    assert pending.cancelled()  # as asyncio.wait_for: shield what must outlive the wait
    kept = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.shield(kept), 0.01)
    assert not kept.done()


async def test_raise_if_cancelling_honours_a_swallowed_stop():
    async def swallowing() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # what nats-py does in its flush path
        raise_if_cancelling(asyncio.current_task())
        return "ran on"

    task = asyncio.create_task(swallowing())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    raise_if_cancelling(asyncio.current_task())  # a task not asked to stop goes on


async def test_cancel_and_wait_names_and_leaves_a_task_that_does_not_end(caplog):
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    polite = asyncio.create_task(asyncio.sleep(10), name="polite")
    stuck = asyncio.create_task(stubborn(), name="stubborn loop")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="cdp.kit.stopping"):
        left = await asyncio.wait_for(cancel_and_wait([polite, stuck], 0.1), 5)
    assert left == {stuck} and polite.cancelled()
    assert "stubborn loop" in caplog.text and "polite" not in caplog.text
    release.set()
    await stuck
    assert await cancel_and_wait([], 1) == set()
