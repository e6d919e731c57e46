"""The verify job's runner (handlers/job_kinds.py) on a real repository and a real ledger:
what it reports when it finds damage, and when marking the damaged disks fails."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.chain.ledger import Ledger
from agent.control.dispatch import HandlerContext
from agent.control.job_requests import Job, JobRequest, JobState
from agent.control.jobs import JobFailedError
from agent.repository.store import Repository
from handlers.job_kinds import verify
from tests.test_repository import DOMAIN, Builder, MiB, _flip_byte, _host_offset


def _context(repo: Repository, ledger: Ledger) -> HandlerContext:
    # What the verify runner uses of the agent: the repository, the ledger, the names.
    domains = SimpleNamespace(name_of=lambda domain: domain)
    chains = SimpleNamespace(ledger=ledger)
    return cast(
        HandlerContext,
        SimpleNamespace(backups=SimpleNamespace(repository=repo), chains=chains, domains=domains),
    )


def _job() -> Job:
    request = JobRequest.model_validate({"kind": "verify", "domain": DOMAIN})
    return Job(id="v1", request=request, state=JobState.RUNNING, source="http", created_at=1.0)


@pytest.fixture
async def damaged(tmp_path: Path) -> Repository:
    builder = Builder(Repository(tmp_path / "repo"))
    await builder.backup({"vda": [(0, MiB, 0x31)]})
    image = tmp_path / "repo" / DOMAIN / "backups" / builder.ids[0] / "vda.qcow2"
    _flip_byte(image, _host_offset(image, 100))
    return builder.repo


def _ignore(done: int, total: int) -> None:
    pass


async def _failed(ctx: HandlerContext) -> dict[str, Any]:
    with pytest.raises(JobFailedError) as caught:
        await verify(ctx, _job(), _ignore)
    assert caught.value.code == "verify-failed"
    return dict(caught.value.result)


async def test_damage_marks_the_disk_for_a_full_backup_in_the_ledger(
    damaged: Repository, tmp_path: Path
) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        await ledger.set_disk_chains(DOMAIN, {"vda": (True, None, "chain from cp-0")})
        result = await _failed(_context(damaged, ledger))
        assert [p["target"] for p in result["problems"]] == ["vda"]
        assert result["full_next"] == ["vda"]
        chain = (await ledger.disk_chains(DOMAIN))["vda"]
        assert (chain.valid, chain.reason) == (False, "backup-corrupt")


async def test_a_ledger_failure_still_reports_the_problems(
    damaged: Repository, tmp_path: Path
) -> None:
    ledger = await Ledger.open(tmp_path / "ledger.sqlite")
    await ledger.close()  # every call fails from now on
    result = await _failed(_context(damaged, ledger))
    assert [p["target"] for p in result["problems"]] == ["vda"]
    assert result["full_next"] == []
    assert "is closed" in result["full_next_error"]


async def test_a_ledger_that_does_not_know_the_domain_marks_nothing(
    damaged: Repository, tmp_path: Path
) -> None:
    async with await Ledger.open(tmp_path / "ledger.sqlite") as ledger:
        result = await _failed(_context(damaged, ledger))
        assert result["full_next"] == [] and "full_next_error" not in result
        assert await ledger.disk_chains(DOMAIN) == {}
