"""Work that must finish once started, even when its caller is cancelled.

``asyncio.shield`` protects the work from the first cancellation only: a second one
(a job cancelled, then the agent stopping) lets the caller go on while the work still
runs, e.g. releasing a domain's lock while an undo still changes its checkpoints, or
undoing a backup while a worker thread is still renaming it into place.

Nothing can interrupt the wait: work without a bound of its own needs ``timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from agent.core.logs import get_logger

log = get_logger("shielding")

T = TypeVar("T")


async def to_completion(work: Awaitable[T], *, timeout: float | None = None) -> T:
    """Await ``work`` to its end (or ``timeout``: then TimeoutError) whatever
    cancellations arrive meanwhile; then raise ``CancelledError`` if any did (also one
    that came as the work ended), else return its result or raise its error."""
    task = asyncio.ensure_future(work if timeout is None else asyncio.wait_for(work, timeout))
    interrupted = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            interrupted = True  # the caller's, or the work's own: CancelledError either way
        except BaseException:
            break  # the work failed: its error below
    if interrupted:
        if not task.cancelled() and task.exception() is not None:
            log.warning("work failed after its caller was cancelled", error=repr(task.exception()))
        raise asyncio.CancelledError
    return task.result()


async def settle(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` unless it is over, and wait until it is, even if the caller is
    cancelled meanwhile (then that is raised afterwards): e.g. the undo that follows a
    failed copy must not race the copy's own clean-up. The task's outcome is dropped (the caller is
    already failing for a reason of its own)."""
    task.cancel()
    try:
        await to_completion(asyncio.wait([task]))
    finally:
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
