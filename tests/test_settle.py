"""``settle`` (agent.core.shielding): a failing backup waits for its copy's clean-up
before undoing anything, even when it is cancelled again meanwhile (pure asyncio logic)."""

from __future__ import annotations

import asyncio

import pytest

from agent.core.shielding import settle


async def test_settle_waits_for_the_clean_up_through_repeated_cancellation() -> None:
    cleaned = asyncio.Event()

    async def copy() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.shield(asyncio.sleep(0.2))  # stopping qemu-nbd, say
            cleaned.set()

    task = asyncio.create_task(copy())
    await asyncio.sleep(0)
    seen_when_raised: list[bool] = []

    async def failing_backup() -> None:
        try:
            await settle(task)
        finally:
            seen_when_raised.append(cleaned.is_set())

    backup = asyncio.create_task(failing_backup())
    await asyncio.sleep(0.05)
    backup.cancel()  # the job is cancelled again while it waits
    await asyncio.sleep(0.05)
    backup.cancel()
    with pytest.raises(asyncio.CancelledError):
        await backup
    assert seen_when_raised == [True], "the caller went on before the copy had cleaned up"
    assert task.cancelled()


async def test_settle_retrieves_the_copy_failure() -> None:
    async def copy() -> None:
        raise OSError("qemu-nbd did not start")

    task = asyncio.create_task(copy())
    await asyncio.sleep(0)
    await settle(task)  # no "exception was never retrieved" (warnings are errors)
    assert isinstance(task.exception(), OSError)
