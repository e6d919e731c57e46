"""Crash points for tests: where the agent can be made to die on purpose.

Code that must survive a crash at any step calls ``faults("point")`` between steps
(e.g. ``"redefine:lba-...-1a2b3c"`` before each redefine). In production the hook does
nothing. Tests pass a hook that raises :class:`SimulatedCrash` at a chosen point, or
start a real agent process with ``BACKUP_AGENT_CRASH_AT=<point>`` set, which makes that
process kill itself with SIGKILL when it reaches the point, so nothing gets to clean up.
A point ending in ``*`` is a prefix: the first point reached that starts with it (e.g.
``retention:merged:*``, whose points name a backup id the test cannot know beforehand).
"""

from __future__ import annotations

import os
import signal
from typing import Protocol

CRASH_ENV = "BACKUP_AGENT_CRASH_AT"


class Faults(Protocol):
    def __call__(self, point: str, /) -> None: ...


class SimulatedCrash(BaseException):
    """Raised by a test's fault hook; a BaseException so no ``except Exception`` eats it."""


def no_faults(point: str, /) -> None:
    return None


def from_environment() -> Faults:
    """The hook for this process: SIGKILL at ``$BACKUP_AGENT_CRASH_AT``, else nothing."""
    target = os.environ.get(CRASH_ENV)
    if not target:
        return no_faults

    def crash_at(point: str, /) -> None:
        if point == target or (target.endswith("*") and point.startswith(target[:-1])):
            os.kill(os.getpid(), signal.SIGKILL)

    return crash_at
