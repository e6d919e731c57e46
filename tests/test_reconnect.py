"""libvirtd killed and restarted under a running agent: loss logged, reconnect, resync.

The agent's first reconnect delay is long (8 s) so that the test can restart libvirtd
and start a domain while the agent is still away, deterministically: the test checks
that the agent had not reconnected yet when the domain was created, so the domain can
only be discovered by the resynchronisation.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import structlog

from agent.virt.connection import ConnState
from agent.virt.events import Lifecycle
from agent.virt.events import LifecycleKind as K
from tests.harness import lifecycle, running_agent, test_config
from tests.testbed import daemon
from tests.testbed.domains import DomainFactory

pytestmark = pytest.mark.libvirt

AWAY = 8.0


async def _wait_until(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_libvirtd_restart_reconnects_and_resynchronises(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    config = test_config(tmp_path / "state", reconnect_initial_delay=AWAY, reconnect_max_delay=AWAY)
    async with running_agent(config) as run:
        agent, rec = run.agent, run.recorder
        before = await asyncio.to_thread(domain_factory, persistent=False)
        await rec.wait_for(lifecycle(before.uuid, K.STARTED, "booted"))

        with structlog.testing.capture_logs() as logs:
            await asyncio.to_thread(daemon.kill_libvirtd)
            await _wait_until(
                lambda: agent.connection.state is not ConnState.CONNECTED, 15, "the loss"
            )
            await asyncio.to_thread(daemon.start_libvirtd)
            during = await asyncio.to_thread(domain_factory, persistent=False)
            assert agent.connection.reconnects == 0, (
                "the agent reconnected before the domain was created; the test proves nothing"
            )
            assert agent.connection.state is not ConnState.CONNECTED

            discovered = await rec.wait_for(lifecycle(during.uuid, K.STARTED), timeout=60)
        assert isinstance(discovered, Lifecycle)
        assert discovered.synthetic and discovered.detail == "resync"
        assert agent.connection.reconnects == 1
        assert agent.domains.get(during.uuid) is not None
        messages = [entry["event"] for entry in logs]
        assert "connection closed by libvirt" in messages
        assert "disconnected" in messages
        assert "connected" in messages
        # The domain that ran through the restart was not reported as started again.
        assert not [
            e for e in rec.for_domain(before.uuid) if isinstance(e, Lifecycle) and e.synthetic
        ]

        # Callbacks were registered again: the next start is a live event.
        after = await asyncio.to_thread(domain_factory, persistent=False)
        live = await rec.wait_for(lifecycle(after.uuid, K.STARTED, "booted"))
        assert not live.synthetic


async def test_agent_started_while_libvirtd_is_down_keeps_trying(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    running = await asyncio.to_thread(domain_factory, persistent=False)
    await asyncio.to_thread(daemon.kill_libvirtd)
    try:
        config = test_config(tmp_path / "state", reconnect_initial_delay=0.2, reconnect_max_delay=1)
        async with running_agent(config, connect_timeout=None) as run:
            await asyncio.sleep(2)  # several failed attempts; the agent must not give up
            assert run.agent.connection.state is not ConnState.CONNECTED
            assert run.recorder.events == []
            await asyncio.to_thread(daemon.start_libvirtd)
            seen = await run.recorder.wait_for(lifecycle(running.uuid, K.STARTED), timeout=30)
            assert run.agent.connection.state is ConnState.CONNECTED
            # It ran before the agent ever connected: known only through the resync.
            assert seen.synthetic
            info = run.agent.domains.get(running.uuid)
            assert info is not None and info.state.active
    finally:
        if daemon.libvirtd_pid() is None:
            await asyncio.to_thread(daemon.start_libvirtd)
