"""One agent process per state directory.

Start-up recovery undoes every backup job it finds an intent for, and removes every
staged backup: correct after a crash, destructive if another agent process were still
running those jobs. So whatever works on a state directory (the service, a one-shot
``backup`` or ``reconcile``) first takes an exclusive lock on ``<state_dir>/agent.lock``,
and a second one is refused with the first one's pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

from agent.core.durable import make_dir_durably
from agent.core.errors import AgentError


class StateDirectoryBusyError(AgentError):
    """Another backup-agent process holds the state directory."""


def _acquire(path: Path) -> int:
    # The first thing made in a new state directory: its entry must survive a crash,
    # or the ledger and the intents made in it next would vanish with it.
    make_dir_durably(path.parent, mode=0o777)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirectoryBusyError(
            f"another backup-agent process (pid {holder}) is using {path.parent}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.asynccontextmanager
async def state_lock(state_dir: Path) -> AsyncIterator[None]:
    """Hold the state directory's lock inside the block (released at exit or death)."""
    fd = await asyncio.to_thread(_acquire, state_dir / "agent.lock")
    try:
        yield
    finally:
        os.close(fd)
