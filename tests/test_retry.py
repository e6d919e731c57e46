"""The one retry loop (agent.core.retry): its delays, streaks and exits (pure logic).

Sleeping is faked: each test records the delays the loop asks for and ends the loop by
raising from the fake sleep, so nothing here waits.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from agent.core.retry import JITTER, Backoff, retry_briefly, retry_forever


class _Enough(BaseException):
    """Raised by the fake sleep to end a loop that never ends by itself."""


class _Recorder:
    """A fake sleep and ``on_retry`` that note what the loop did, in order."""

    def __init__(self, sleeps: int) -> None:
        self._sleeps = sleeps
        self.log: list[str] = []
        self.delays: list[float] = []
        self.reported: list[tuple[float, Exception | None]] = []

    async def sleep(self, delay: float) -> None:
        self.log.append(f"sleep {delay:g}")
        self.delays.append(delay)
        if len(self.delays) >= self._sleeps:
            raise _Enough

    def on_retry(self, delay: float, error: Exception | None) -> None:
        self.reported.append((delay, error))


NOMINAL = Backoff(0.5, 3.0, draw=lambda: 0.0)


async def _run(
    recorder: _Recorder,
    attempt: Callable[[asyncio.Event], Awaitable[None]],
    backoff: Backoff = NOMINAL,
    retry_on: tuple[type[Exception], ...] = (),
) -> None:
    with pytest.raises(_Enough):
        await retry_forever(
            attempt, backoff, recorder.on_retry, retry_on=retry_on, sleep=recorder.sleep
        )


async def test_first_attempt_at_once_then_doubling_up_to_the_cap() -> None:
    rec = _Recorder(sleeps=6)

    async def fails(_up: asyncio.Event) -> None:
        rec.log.append("attempt")

    await _run(rec, fails)
    assert rec.log[0] == "attempt"  # no wait before the first attempt
    assert (
        rec.log
        == ["attempt", "sleep 0.5", "attempt", "sleep 1", "attempt", "sleep 2"]
        + [
            "attempt",
            "sleep 3",
        ]
        * 3
    )
    assert rec.reported == [(d, None) for d in rec.delays]


async def test_an_attempt_that_was_up_starts_the_streak_again() -> None:
    rec = _Recorder(sleeps=7)
    up_on = {3, 5}  # the attempts (counted from 1) that come up before they end
    count = 0

    async def attempt(up: asyncio.Event) -> None:
        nonlocal count
        count += 1
        if count in up_on:
            up.set()

    await _run(rec, attempt)
    # Failures 1, 2; attempt 3 up then lost: initial again (never less), then doubling.
    assert rec.delays == [0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 2.0]


async def test_retried_exceptions_are_reported_with_the_delay() -> None:
    rec = _Recorder(sleeps=3)
    errors = [OSError("refused"), ValueError("bad"), OSError("again")]

    async def attempt(up: asyncio.Event) -> None:
        error = errors[len(rec.delays)]
        if len(rec.delays) == 1:
            up.set()  # up, then failing: still a retry, and the streak starts again
        raise error

    await _run(rec, attempt, retry_on=(OSError, ValueError))
    assert rec.reported == [(0.5, errors[0]), (0.5, errors[1]), (1.0, errors[2])]


async def test_other_exceptions_end_the_loop_as_they_are() -> None:
    rec = _Recorder(sleeps=10)
    calls = 0

    async def attempt(_up: asyncio.Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyError("a bug")
        raise OSError("refused")

    with pytest.raises(KeyError, match="a bug"):
        await retry_forever(attempt, NOMINAL, rec.on_retry, retry_on=(OSError,), sleep=rec.sleep)
    assert calls == 3 and rec.delays == [0.5, 1.0]

    async def returns_then_raises(_up: asyncio.Event) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError("not retried without retry_on")

    with pytest.raises(OSError, match="not retried"):
        await retry_forever(returns_then_raises, NOMINAL, rec.on_retry, sleep=rec.sleep)
    assert calls == 5


async def test_cancellation_ends_the_loop_after_the_attempts_clean_up() -> None:
    cleaned: list[str] = []
    started = asyncio.Event()

    async def attempt(up: asyncio.Event) -> None:
        up.set()
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("attempt")

    rec = _Recorder(sleeps=10)
    task = asyncio.create_task(retry_forever(attempt, NOMINAL, rec.on_retry, sleep=rec.sleep))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["attempt"] and rec.delays == []

    async def fails(_up: asyncio.Event) -> None:
        return None

    sleeping = asyncio.Event()
    waiting = asyncio.create_task(  # the real sleep, of an hour
        retry_forever(fails, Backoff(3600.0, 3600.0), lambda _d, _e: sleeping.set())
    )
    await sleeping.wait()
    await asyncio.sleep(0)  # into the sleep itself
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_every_delay_is_jittered_within_a_quarter_above_nominal() -> None:
    rng = random.Random(14)
    rec = _Recorder(sleeps=200)

    async def fails(_up: asyncio.Event) -> None:
        return None

    await _run(rec, fails, Backoff(0.5, 3.0, draw=rng.random))
    nominal = [0.5, 1.0, 2.0] + [3.0] * 197
    ratios = [actual / n for actual, n in zip(rec.delays, nominal, strict=True)]
    assert all(1.0 <= r <= 1.0 + JITTER for r in ratios)
    assert max(rec.delays) <= 3.0 * (1 + JITTER)
    assert len({round(r, 6) for r in ratios}) > 100  # really random, not one fixed extra
    assert max(ratios) - min(ratios) > JITTER / 2  # and spread over the range


async def test_the_largest_draw_adds_exactly_the_jitter_fraction() -> None:
    rec = _Recorder(sleeps=5)

    async def fails(_up: asyncio.Event) -> None:
        return None

    await _run(rec, fails, Backoff(1.0, 4.0, draw=lambda: 1.0))
    assert rec.delays == [1.25, 2.5, 5.0, 5.0, 5.0]


async def test_retry_briefly_tries_a_few_times_then_raises_the_last_error() -> None:
    rec = _Recorder(sleeps=100)
    calls: list[int] = []

    async def flaky() -> str:
        calls.append(len(calls))
        if len(calls) < 3:
            raise OSError(f"busy {len(calls)}")
        return "done"

    got = await retry_briefly(
        flaky,
        attempts=4,
        backoff=NOMINAL,
        retry_on=(OSError,),
        on_retry=rec.on_retry,
        sleep=rec.sleep,
    )
    assert (got, len(calls), rec.delays) == ("done", 3, [0.5, 1.0])
    assert [str(e) for _, e in rec.reported] == ["busy 1", "busy 2"]

    async def broken() -> str:
        raise OSError("still busy")

    rec = _Recorder(sleeps=100)
    with pytest.raises(OSError, match="still busy"):
        await retry_briefly(
            broken, attempts=3, backoff=NOMINAL, retry_on=(OSError,), sleep=rec.sleep
        )
    assert rec.delays == [0.5, 1.0], "three attempts: two waits, then the error"

    async def wrong() -> str:
        raise ValueError("not retried")

    with pytest.raises(ValueError):
        await retry_briefly(
            wrong, attempts=3, backoff=NOMINAL, retry_on=(OSError,), sleep=rec.sleep
        )
    assert rec.delays == [0.5, 1.0]
