"""Running the real agent in-process for tests, and watching what it dispatches.

:func:`running_agent` starts :class:`agent.service.Agent` against the real libvirt
daemon with the default handlers plus a recorder appended to every event type, so a
test sees exactly the events the handlers saw, in dispatch order, and can wait for
one with a timeout. The agent is stopped when the ``async with`` block ends, even
when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.chain.checkpoints import Chains, standalone_chains
from agent.chain.records import CheckpointRecord
from agent.control.dispatch import HandlerContext
from agent.core.config import AgentConfig
from agent.core.faults import Faults, SimulatedCrash, no_faults
from agent.service import Agent
from agent.virt.events import Event, Lifecycle, LifecycleKind
from handlers import default_routes, with_extra
from tests.testbed.domains import DiskSpec, DomainFactory, TestDomain


@dataclass
class Recorder:
    """Collects dispatched events; ``wait_for`` waits for the first new match."""

    events: list[Event] = field(default_factory=list)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def __call__(self, event: Event, ctx: HandlerContext, /) -> None:
        async with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    __name__ = "recorder"

    def mark(self) -> int:
        """A position to wait from: ``wait_for(..., since=rec.mark())`` ignores older events."""
        return len(self.events)

    async def wait_for(
        self, predicate: Callable[[Event], bool], timeout: float = 30, *, since: int = 0
    ) -> Event:
        async with self._changed:
            found: list[Event] = []

            def matched() -> bool:
                found[:] = [e for e in self.events[since:] if predicate(e)]
                return bool(found)

            try:
                await asyncio.wait_for(self._changed.wait_for(matched), timeout)
            except TimeoutError:
                seen = "\n  ".join(repr(e) for e in self.events[-20:])
                raise AssertionError(
                    f"no matching event within {timeout} s; last events:\n  {seen}"
                ) from None
            return found[0]

    def for_domain(self, uuid: str) -> list[Event]:
        return [e for e in self.events if e.domain.uuid == uuid]


def lifecycle(uuid: str, kind: LifecycleKind, detail: str | None = None) -> Callable[[Event], bool]:
    """Predicate: a lifecycle event of this domain, kind and (optionally) detail."""

    def match(event: Event) -> bool:
        return (
            isinstance(event, Lifecycle)
            and event.domain.uuid == uuid
            and event.kind is kind
            and (detail is None or event.detail == detail)
        )

    return match


def test_config(state_dir: Path, **libvirt: Any) -> AgentConfig:
    """A configuration for tests: state under ``state_dir``, quick reconnects."""
    settings: dict[str, Any] = {"reconnect_initial_delay": 0.2, "reconnect_max_delay": 2.0}
    settings.update(libvirt)
    return AgentConfig.model_validate(
        {
            "agent": {"state_dir": str(state_dir)},
            "libvirt": settings,
            "http": {"port": 0},  # a free port: agents of several tests never collide
        }
    )


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test, despite the name


@dataclass
class RunningAgent:
    agent: Agent
    recorder: Recorder


def api_headers(run: RunningAgent) -> dict[str, str]:
    """The header the in-process agent's ``/v1`` API needs: its token, from the file the
    agent made on start (``<state_dir>/api-token`` unless configured)."""
    token = run.agent.config.token_path.read_text(encoding="utf-8").strip()
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def running_agent(
    config: AgentConfig, connect_timeout: float | None = 30, faults: Faults | None = None
) -> AsyncIterator[RunningAgent]:
    """The agent, running; connected, with its start-up events handled and every job an
    earlier agent left tried once, unless ``connect_timeout`` is None (then it may still
    be trying to connect)."""
    recorder = Recorder()
    agent = Agent(config, routes=with_extra(default_routes(), recorder), faults=faults)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        if connect_timeout is not None:
            ready = asyncio.create_task(agent.ready.wait())
            await asyncio.wait(
                {ready, task}, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED
            )
            ready.cancel()
            if task.done():
                task.result()  # the agent failed to start: its error, not a timeout
            if not agent.ready.is_set():
                raise AssertionError(f"the agent was not ready within {connect_timeout} s")
            await asyncio.wait_for(agent.recovery.first_pass.wait(), connect_timeout)
            await agent.dispatcher.drain()
        yield RunningAgent(agent, recorder)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def one_shot_chains(
    config: AgentConfig, faults: Faults | None = None
) -> contextlib.AbstractAsyncContextManager[Chains]:
    """``Chains`` with no event handling behind it, for tests that decide exactly when a
    reconcile runs (crash injection)."""
    return standalone_chains(config, faults if faults is not None else no_faults)


def crash_at(point: str) -> Faults:
    """A fault hook that raises SimulatedCrash at ``point``."""

    def hook(reached: str, /) -> None:
        if reached == point:
            raise SimulatedCrash(point)

    return hook


async def started_domain(run: RunningAgent, factory: DomainFactory, **kwargs: Any) -> TestDomain:
    """Make a running test domain and wait until the agent has handled its start."""
    td = await asyncio.to_thread(factory, **kwargs)
    await run.recorder.wait_for(lifecycle(td.uuid, LifecycleKind.STARTED, "booted"))
    return td


TWO_DISKS = [DiskSpec("vda", "virtio"), DiskSpec("sda", "scsi")]


async def backed_up_checkpoint(run: RunningAgent, td: TestDomain) -> CheckpointRecord:
    """A checkpoint the agent created and then saw a backup based on succeed."""
    cp = await run.agent.chains.create_checkpoint(td.uuid)
    await run.agent.chains.backup_succeeded(td.name, cp.name)
    return cp
