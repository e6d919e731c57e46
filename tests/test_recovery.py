"""Recovery's bookkeeping (pure logic; the live cases are in tests/faults): which domains
are still recovering and why, one domain's failure or deadline not holding up the others,
retries on wake-up, and reconciles only once a domain is done."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agent.backup.recovery import Recovery
from agent.backup.undo import UndoPendingError


class _Undo:
    """What Recovery needs of :class:`agent.backup.undo.Undo`."""

    def __init__(self, leftovers: list[str]) -> None:
        self.leftovers = leftovers
        self.pending = asyncio.Event()
        self.on_pending: Callable[[str, str], None] = lambda uuid, why: None
        self.cleaned = 0

    async def leftover_domains(self) -> list[str]:
        return list(self.leftovers)

    async def clean_staging(self) -> list[object]:
        self.cleaned += 1
        return []


def _recovery(
    undo: _Undo,
    recover_domain: Callable[[str], Awaitable[str | None]],
    *,
    sweep: Callable[[], Awaitable[object]] | None = None,
    timeout: float = 5,
    connected: Callable[[], bool] = lambda: True,
    on_recovered: Callable[[str], Awaitable[None]] | None = None,
) -> Recovery:
    return Recovery(
        undo,  # type: ignore[arg-type]
        recover_domain,
        sweep if sweep is not None else undo.clean_staging,
        timeout=timeout,
        connected=connected,
        on_recovered=on_recovered,
    )


@contextlib.asynccontextmanager
async def _running(recovery: Recovery) -> AsyncIterator[None]:
    task = asyncio.create_task(recovery.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout} s")


async def test_one_failing_domain_holds_up_no_other_and_is_retried_on_wake() -> None:
    undo = _Undo(["a", "b", "c"])
    attempts: dict[str, int] = {}
    libvirt_back = False
    recovered: list[str] = []

    async def recover_domain(uuid: str) -> str | None:
        attempts[uuid] = attempts.get(uuid, 0) + 1
        if uuid == "b" and not libvirt_back:
            raise UndoPendingError("libvirt's backup job of b could not be ended yet")
        return f"backup-of-{uuid}"

    async def on_recovered(uuid: str) -> None:
        recovered.append(uuid)

    recovery = _recovery(undo, recover_domain, on_recovered=on_recovered)
    assert await recovery.scan() == ["a", "b", "c"]
    assert set(recovery.recovering) == {"a", "b", "c"}
    async with _running(recovery):
        await asyncio.wait_for(recovery.first_pass.wait(), 5)
        assert recovered == ["a", "c"], "only recovered domains are reconciled"
        assert recovery.recovering == {"b": "libvirt's backup job of b could not be ended yet"}
        libvirt_back = True
        undo.leftovers = ["b"]
        recovery.wake()  # e.g. reconnected to libvirt
        await _until(lambda: not recovery.recovering)
    assert recovered == ["a", "c", "b"]
    assert attempts == {"a": 1, "b": 2, "c": 1}


async def test_a_domain_over_its_deadline_is_left_for_later_and_the_rest_go_on() -> None:
    undo = _Undo(["slow", "quick"])
    hang = asyncio.Event()

    async def recover_domain(uuid: str) -> str | None:
        if uuid == "slow" and not hang.is_set():
            await asyncio.sleep(3600)
        return None

    recovery = _recovery(undo, recover_domain, timeout=0.2)
    await recovery.scan()
    async with _running(recovery):
        await asyncio.wait_for(recovery.first_pass.wait(), 5)
        assert recovery.recovering == {"slow": "not done within 0.2 s"}
        hang.set()
        recovery.wake()
        await _until(lambda: not recovery.recovering)


async def test_nothing_is_tried_while_libvirt_is_away_and_a_left_undo_is_tracked_at_once() -> None:
    undo = _Undo(["a"])
    connected = False
    calls: list[str] = []

    async def recover_domain(uuid: str) -> str | None:
        calls.append(uuid)
        return None

    recovery = _recovery(undo, recover_domain, connected=lambda: connected)
    await recovery.scan()
    # A job's undo left pending while the agent runs: known before any pass.
    undo.on_pending("z", "abort backup job: not connected")
    assert recovery.recovering["z"] == "abort backup job: not connected"
    async with _running(recovery):
        await asyncio.sleep(0.2)
        assert calls == [] and not recovery.first_pass.is_set()
        connected = True
        undo.leftovers = ["a", "z"]
        recovery.wake()
        await _until(lambda: not recovery.recovering)
    assert sorted(calls) == ["a", "z"]
    assert undo.cleaned >= 1, "staging no intent names is cleaned up after a pass"


@pytest.mark.parametrize("error", [OSError("EIO"), UndoPendingError("repository away")])
async def test_failures_keep_the_domain_with_its_reason(error: Exception) -> None:
    undo = _Undo(["a"])

    async def recover_domain(uuid: str) -> str | None:
        raise error

    recovery = _recovery(undo, recover_domain)
    await recovery.scan()
    async with _running(recovery):
        await asyncio.wait_for(recovery.first_pass.wait(), 5)
        assert recovery.recovering == {"a": str(error)}


async def test_the_loop_reads_the_intents_itself_before_its_first_pass() -> None:
    """Connected before the start-up scan (or that scan failed): a pass then must not see
    "no domain" and report recovery done while the killed agent's jobs are still there."""
    undo = _Undo(["a"])
    calls: list[str] = []

    async def recover_domain(uuid: str) -> str | None:
        calls.append(uuid)
        return None

    recovery = _recovery(undo, recover_domain)
    async with _running(recovery):
        await asyncio.wait_for(recovery.first_pass.wait(), 5)
        assert calls == ["a"]


async def test_a_failed_sweep_is_retried_without_any_domain_recovering() -> None:
    undo = _Undo([])
    sweeps = 0

    async def sweep() -> None:
        nonlocal sweeps
        sweeps += 1
        if sweeps == 1:
            raise OSError("repository away")

    async def recover_domain(uuid: str) -> str | None:
        return None

    recovery = _recovery(undo, recover_domain, sweep=sweep)
    async with _running(recovery):
        await asyncio.wait_for(recovery.first_pass.wait(), 5)
        assert sweeps == 1
        recovery.wake()
        await _until(lambda: sweeps == 2)
        recovery.wake()
        await asyncio.sleep(0.2)
        assert sweeps == 2, "swept once it worked: not again on every wake-up"
