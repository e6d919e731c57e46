"""Retrying for ever with jittered exponential back-off: the agent's one retry loop.

:func:`retry_briefly` is its short sibling: a few attempts of one call that a passing
fault may fail (a store write), then the last error.

The libvirt connection (:mod:`agent.virt.connection`) and the scheduler's message
session (:mod:`agent.control.messages`) both live in :func:`retry_forever`: something
that comes up, stays up for a while, and is lost (or never comes up), tried again for as
long as the agent runs. It is tenacity's :class:`~tenacity.AsyncRetrying` with a wait
strategy of our own on top of :class:`~tenacity.wait_exponential`.

Shape
    The first attempt starts at once. After a failure the loop waits ``initial``,
    doubled after each further failure in a row up to ``maximum``. An attempt that came
    up (connected, consuming) and was then lost starts a new streak: its loss is the
    streak's first failure, so the next attempt waits ``initial`` again, never less:
    nothing reconnects before ``initial`` has passed.

Jitter
    Each delay is lengthened by a random share of up to :data:`JITTER` (a quarter) of
    itself, so that agents that lost the same peer at the same moment do not all come
    back at the same moment. A delay is therefore never below its nominal value, and
    never above ``maximum * (1 + JITTER)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
)
from tenacity.wait import wait_base, wait_exponential

T = TypeVar("T")

#: The largest random extra of a delay, as a fraction of the delay.
JITTER: Final = 0.25


@dataclasses.dataclass(frozen=True)
class Backoff:
    """The delays between attempts (see the module docstring).

    ``draw`` returns the share of ``jitter`` added to a delay, in ``[0, 1)``; tests pass
    a fixed or seeded one.
    """

    initial: float
    maximum: float
    jitter: float = JITTER
    draw: Callable[[], float] = random.random

    def wait(self) -> wait_base:
        """The tenacity wait strategy: by attempt number within the current streak."""
        return _Jittered(wait_exponential(multiplier=self.initial, max=self.maximum), self)


class _Jittered(wait_base):
    """``nominal``'s delay plus a random extra of up to ``backoff.jitter`` of it."""

    def __init__(self, nominal: wait_base, backoff: Backoff) -> None:
        self._nominal = nominal
        self._backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        delay = self._nominal(retry_state)
        return delay * (1 + self._backoff.jitter * self._backoff.draw())


async def retry_forever(
    attempt: Callable[[asyncio.Event], Awaitable[None]],
    backoff: Backoff,
    on_retry: Callable[[float, Exception | None], None],
    *,
    retry_on: tuple[type[Exception], ...] = (),
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> NoReturn:
    """Run ``attempt`` again and again, waiting between runs as ``backoff`` says.

    ``attempt`` gets an event to set once it is up; when it ends (returns, or raises
    one of ``retry_on``) the streak starts again if the event was set. Before each wait
    ``on_retry`` is called with the delay and the exception the attempt raised (None if
    it returned). Any other exception, cancellation included, ends the loop: it is
    raised as it is, and the attempt's own ``finally`` clauses have run.
    """
    retrying = AsyncRetrying(
        sleep=sleep,
        wait=backoff.wait(),
        retry=retry_if_result(lambda _: True) | retry_if_exception_type(retry_on),
        before_sleep=lambda state: on_retry(*_delay_and_error(state)),
    )
    async for trial in retrying:
        up = asyncio.Event()
        with trial:  # records how the attempt ended, raising nothing
            await attempt(up)
        if up.is_set():
            # Its loss is the first failure of a new streak; tenacity computes the wait
            # from this number when the loop goes on.
            trial.retry_state.attempt_number = 1
    raise AssertionError("tenacity ended a retry that never stops")  # pragma: no cover


async def retry_briefly(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int,
    backoff: Backoff,
    retry_on: tuple[type[Exception], ...],
    on_retry: Callable[[float, Exception | None], None] = lambda delay, error: None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """``call()``, tried up to ``attempts`` times while it raises one of ``retry_on``,
    waiting as ``backoff`` says in between; the last error is raised as it is."""
    retrying = AsyncRetrying(
        sleep=sleep,
        wait=backoff.wait(),
        stop=stop_after_attempt(attempts),
        retry=retry_if_exception_type(retry_on),
        before_sleep=lambda state: on_retry(*_delay_and_error(state)),
        reraise=True,
    )
    async for trial in retrying:
        with trial:
            return await call()
    raise AssertionError("tenacity ended without an outcome")  # pragma: no cover


def _delay_and_error(state: RetryCallState) -> tuple[float, Exception | None]:
    """What tenacity decided to wait (before it waits), and what the attempt raised."""
    action, outcome = state.next_action, state.outcome
    assert action is not None and outcome is not None  # both set before before_sleep
    error = outcome.exception() if outcome.failed else None
    return float(action.sleep), error if isinstance(error, Exception) else None
