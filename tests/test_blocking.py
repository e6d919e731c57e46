"""Filesystem calls with a deadline (agent.core.blocking), and durable writes
(agent.core.durable), on real threads blocked on events (a hung mount, as the threads
see it: a call that does not return until it is let go)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.backup.job import Intents, Job
from agent.core import blocking, durable
from agent.core.blocking import WORKERS, Filesystem
from agent.core.config import AgentConfig
from agent.core.errors import FilesystemHungError


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Calls that wait on it hang until the test (or its teardown) opens it."""
    event = threading.Event()
    try:
        yield event
    finally:
        event.set()


def _threads_named(root: Path) -> int:
    return sum(1 for t in threading.enumerate() if t.name.endswith(f":{root}"))


async def test_a_call_returns_its_result_or_raises_its_error(tmp_path: Path) -> None:
    fs = Filesystem(tmp_path, timeout=5)
    assert await fs.call("add", lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(FileNotFoundError):
        await fs.call("stat", os.stat, tmp_path / "missing")


async def test_a_hung_call_fails_after_its_deadline_and_later_calls_fail_at_once(
    tmp_path: Path, gate: threading.Event
) -> None:
    fs = Filesystem(tmp_path, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(FilesystemHungError) as hung:
        await fs.call("statvfs", gate.wait)
    assert 0.3 <= time.monotonic() - started < 1.5
    assert str(tmp_path) in str(hung.value) and "is the mount hung?" in str(hung.value)
    assert "(statvfs)" in str(hung.value)

    # The first call is still stuck past its deadline: the next one is not even tried.
    ran = threading.Event()
    started = time.monotonic()
    with pytest.raises(FilesystemHungError) as refused:
        await fs.call("remove scratch files", ran.set)
    assert time.monotonic() - started < 0.1
    assert "still in: statvfs" in str(refused.value) and "remove scratch files" in str(
        refused.value
    )
    assert refused.value.seconds >= 0.3
    assert not ran.is_set()

    # The mount answers again: so do calls.
    gate.set()
    await _until(lambda: fs.stalled() is None)
    assert await fs.call("again", lambda: "ok") == "ok"


async def test_a_hung_mount_holds_at_most_a_few_threads_and_starves_nobody_else(
    tmp_path: Path, gate: threading.Event
) -> None:
    hung = Filesystem(tmp_path / "hung", timeout=0.5)
    before = threading.active_count()
    calls = [asyncio.create_task(hung.call(f"call {i}", gate.wait)) for i in range(3 * WORKERS)]
    await asyncio.sleep(0.1)
    assert hung.threads() == WORKERS
    assert _threads_named(tmp_path / "hung") == WORKERS
    assert threading.active_count() - before <= WORKERS
    # Meanwhile asyncio's default executor and another filesystem's threads answer.
    other = Filesystem(tmp_path / "other", timeout=0.5)
    assert await asyncio.wait_for(other.call("other", lambda: 1), 1) == 1
    many = [asyncio.to_thread(lambda: 2) for _ in range(64)]
    assert await asyncio.wait_for(asyncio.gather(*many), 2) == [2] * 64
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, FilesystemHungError) for r in results)
    assert _threads_named(tmp_path / "hung") == WORKERS  # none more for the failed ones


async def test_a_call_whose_caller_gave_up_before_it_started_never_runs(
    tmp_path: Path, gate: threading.Event
) -> None:
    fs = Filesystem(tmp_path, timeout=0.3)
    blockers = [asyncio.create_task(fs.call("block", gate.wait)) for _ in range(WORKERS)]
    await asyncio.sleep(0.05)
    ran = threading.Event()
    queued = asyncio.create_task(fs.call("queued", ran.set))  # no thread free for it
    await asyncio.gather(*blockers, queued, return_exceptions=True)
    gate.set()
    await _until(lambda: fs.stalled() is None)
    await asyncio.sleep(0.1)
    assert not ran.is_set(), "a call given up on ran later anyway (on a remounted path?)"


async def test_probes_of_a_hung_mount_are_single_flight(
    tmp_path: Path, gate: threading.Event
) -> None:
    fs = Filesystem(tmp_path, timeout=10)
    runs: list[int] = []

    def probe() -> str:
        runs.append(1)
        gate.wait()
        return "ok"

    before = threading.active_count()
    with pytest.raises(FilesystemHungError) as hung:
        await fs.probe("readyz", probe, timeout=0.2)
    assert hung.value.seconds >= 0.2
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(FilesystemHungError) as hung:
            await fs.probe("readyz", probe, timeout=0.2)
    # Overdue already: each probe answers at once, and says since when it is waiting.
    assert time.monotonic() - started < 0.2
    assert hung.value.seconds >= 0.2
    assert len(runs) == 1, "a probe still running was started again"
    assert threading.active_count() - before <= 1
    gate.set()
    assert await fs.probe("readyz", probe, timeout=1) == "ok"  # the one still running
    assert await fs.probe("readyz", probe, timeout=1) == "ok"  # a new one
    assert len(runs) == 2


async def test_calls_on_one_root_share_one_pool_across_filesystem_objects(
    tmp_path: Path, gate: threading.Event
) -> None:
    first = Filesystem(tmp_path, timeout=0.2)
    with pytest.raises(FilesystemHungError):
        await first.call("hangs", gate.wait)
    # A second object for the same root (another job) sees the same stuck call.
    with pytest.raises(FilesystemHungError, match="still in: hangs"):
        await Filesystem(tmp_path, timeout=0.2).call("next", lambda: None)


async def test_idle_threads_end_and_come_back_when_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blocking, "IDLE", 0.1)
    fs = Filesystem(tmp_path, timeout=5)
    assert await asyncio.gather(*(fs.call("c", lambda: 1) for _ in range(8))) == [1] * 8
    assert 1 <= fs.threads() <= WORKERS
    await _until(lambda: fs.threads() == 0 and _threads_named(tmp_path) == 0)
    assert await fs.call("again", lambda: 2) == 2


def test_write_durably_fsyncs_the_file_and_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "export.json"
    durable.write_durably(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["export.json"]  # no temporary file left
    assert synced[-1] == str(tmp_path), synced  # the rename made durable, after the data
    assert synced[0].startswith(str(tmp_path / ".export.json.tmp"))


def test_make_dir_durably_fsyncs_every_new_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _record_fsyncs(monkeypatch)
    durable.make_dir_durably(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert synced == [str(tmp_path), str(tmp_path / "a")]


async def test_an_intent_is_written_and_dropped_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    cfg = AgentConfig.model_validate({"agent": {"state_dir": str(tmp_path / "state")}})
    (tmp_path / "state").mkdir()
    intents = Intents(cfg)
    job = Job(
        uuid="0b7a4f8e-9a3c-4d2e-8f1a-2b3c4d5e6f70",
        domain="d",
        backup_id="20260101T000000Z-abcdef",
        checkpoint="cp",
        staging=tmp_path / "staging",
        socket=cfg.socket_path / "x.sock",
        scratch={"vda": tmp_path / "scratch-vda"},
    )
    synced = _record_fsyncs(monkeypatch)
    if cfg.socket_path != cfg.run_path:  # a deep tmp_path: the sockets go under /run
        request.addfinalizer(lambda: shutil.rmtree(cfg.socket_path, ignore_errors=True))
    await intents.write(job)
    jobs_dir = cfg.run_path / "jobs"
    intent = jobs_dir / f"{job.uuid}.json"
    assert Job.from_json(intent.read_text()) == job
    assert stat.S_IMODE(intent.stat().st_mode) == 0o600
    assert stat.S_IMODE(jobs_dir.stat().st_mode) == 0o700
    # The new directories' entries, the intent's data, then its rename.
    assert str(cfg.run_path) in synced and str(jobs_dir) == synced[-1], synced
    assert await intents.leftovers() == [intent]
    synced.clear()
    await intents.drop(job)
    assert not intent.exists() and synced == [str(jobs_dir)]
    assert await intents.leftovers() == []


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths fsync'd from now on (the real fsync runs too)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    return synced


async def _until(predicate: object, timeout: float = 5) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)
