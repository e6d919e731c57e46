"""to_completion: work that must finish once started, whatever cancellations arrive."""

from __future__ import annotations

import asyncio

import pytest

from agent.core.shielding import to_completion


async def test_work_finishes_through_repeated_cancellations_which_are_raised_after() -> None:
    release = asyncio.Event()
    finished: list[str] = []

    async def work() -> str:
        await release.wait()
        finished.append("done")
        return "result"

    caller = asyncio.create_task(to_completion(work()))
    await asyncio.sleep(0)
    for _ in range(3):  # a job cancelled, then the agent stopping, then again
        caller.cancel()
        await asyncio.sleep(0)
        assert not caller.done() and not finished
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert finished == ["done"]


async def test_without_cancellation_the_result_or_the_error_comes_through() -> None:
    async def fine() -> int:
        await asyncio.sleep(0)
        return 7

    async def broken() -> int:
        await asyncio.sleep(0)
        raise ValueError("no")

    assert await to_completion(fine()) == 7
    with pytest.raises(ValueError, match="no"):
        await to_completion(broken())


async def test_a_failure_of_the_work_after_a_cancellation_still_ends_in_cancellation() -> None:
    release = asyncio.Event()

    async def broken() -> None:
        await release.wait()
        raise ValueError("late")

    caller = asyncio.create_task(to_completion(broken()))
    await asyncio.sleep(0)
    caller.cancel()
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_cancellation_arriving_as_the_work_ends_is_not_lost() -> None:
    release = asyncio.Event()

    async def work() -> int:
        await release.wait()
        return 1

    caller = asyncio.create_task(to_completion(work()))
    await asyncio.sleep(0)
    release.set()
    await asyncio.sleep(0)  # the work has ended; the caller has not resumed yet
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_an_enclosing_timeout_still_fires_once_the_work_is_over() -> None:
    finished: list[float] = []
    loop = asyncio.get_running_loop()

    async def work() -> None:
        await asyncio.sleep(0.2)
        finished.append(loop.time())

    started = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await to_completion(work())
    assert finished and finished[0] - started >= 0.2
