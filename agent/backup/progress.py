"""What a running job tells as it goes: bytes copied so far, and time spent per phase.

Progress is ``(done, total)`` in bytes, across every disk of the job; the total grows as
each disk's block status becomes known, so ``done == total`` is not the end of the job
until the last disk has started. The copies run on the data plane's thread
(:mod:`agent.backup.data_plane`); their reports are handed over to the main loop, at most
once per :data:`PROGRESS_INTERVAL`, and always the one that reaches the total.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from agent.core.faults import Faults

Progress = Callable[[int, int], None]

# How often a running copy reports its progress, at most (seconds).
PROGRESS_INTERVAL = 0.1


def throttled(
    report: Progress, interval: float, *, clock: Callable[[], float] = time.monotonic
) -> Progress:
    """``report``, passed on at most once per ``interval`` seconds, and always when
    ``done`` reaches ``total``."""
    last = -math.inf

    def forward(done: int, total: int) -> None:
        nonlocal last
        now = clock()
        if done >= total or now - last >= interval:
            last = now
            report(done, total)

    return forward


def from_data_plane(progress: Progress | None) -> Progress | None:
    """``progress`` (called on the running loop), for copies on the data plane's thread:
    each report is handed over to this loop, throttled."""
    main = asyncio.get_running_loop()
    if progress is None:
        return None
    report = progress

    # Each report wakes this loop from the data plane's thread: not for every one of an
    # increment's hundreds of runs.
    def to_main(done: int, total: int) -> None:
        main.call_soon_threadsafe(report, done, total)

    return throttled(to_main, PROGRESS_INTERVAL)


class Tally:
    """Bytes copied so far across the disks of one job; the ``copy:half`` crash point."""

    def __init__(self, progress: Progress | None, faults: Faults) -> None:
        self._progress = progress
        self._total = 0
        self._done = 0
        self._faults = faults

    def expect(self, amount: int) -> None:
        """A disk's block status is known: its bytes join the total."""
        self._total += amount

    def add(self, amount: int) -> None:
        before, self._done = self._done, self._done + amount
        if before * 2 < self._total <= self._done * 2:
            self._faults("copy:half")
        if self._progress is not None:
            self._progress(self._done, self._total)


class Phases:
    """Seconds spent in each phase of a job, for the log (where time goes, per phase)."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now
