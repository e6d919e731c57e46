"""A damaged file in the repository: the newest backup's manifest overwritten with
garbage, truncated or deleted, or the image of one of its two disks gone.

On a real two-disk domain and the in-process agent ([retention] keep_last = 2, so that
retention would drop the oldest backup if it ran): a full backup and an incremental,
then the damage. What a broken implementation gets wrong, checked each time:

- ``backup-agent backups --json`` (its own process) lists every backup, the good one as
  ever and the damaged one named with its file and what is wrong; exit status 0;
- ``backup-agent verify`` names the damaged backup (and the disk) and exits 1;
- the next backup (a job through the HTTP API) succeeds: in full with the reason
  ``repository-damaged`` for the disks whose chain the damage breaks, counted by
  ``backup_agent_full_backups_forced_total``; incremental, on the damaged backup's sound
  image, for the other disk; the API's listing names the damage too;
- it restores byte for byte what the guest held, and so do the older backups;
- libvirt has no job left on the domain, and no backup directory was deleted (retention
  refuses while a backup of the domain is damaged).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import libvirt
import pytest

from tests.guest_model import (
    KiB,
    MiB,
    agent_cli,
    assert_restores,
    config,
    config_file,
    started_guest,
)
from tests.harness import TWO_DISKS, running_agent
from tests.test_control_live import Api
from tests.testbed.domains import DomainFactory

pytestmark = [pytest.mark.libvirt, pytest.mark.faults]

_FORCED = 'backup_agent_full_backups_forced_total{reason="repository-damaged"}'


def _garbage(directory: Path) -> Path:
    path = directory / "manifest.json"
    path.write_bytes(os.urandom(4096))
    return path


def _truncated(directory: Path) -> Path:
    path = directory / "manifest.json"
    path.write_bytes(path.read_bytes()[:300])
    return path


def _deleted(directory: Path) -> Path:
    path = directory / "manifest.json"
    path.unlink()
    return path


def _image_gone(directory: Path) -> Path:
    path = directory / "sda.qcow2"
    path.unlink()
    return path


@dataclass(frozen=True)
class Case:
    damage: Callable[[Path], Path]  # damages the newest backup's directory; the bad file
    kind: str
    target: str | None  # the disk named, or None: the whole backup
    full: frozenset[str]  # the disks the next backup copies in full


CASES = {
    "garbage": Case(_garbage, "manifest-not-json", None, frozenset({"vda", "sda"})),
    "truncated": Case(_truncated, "manifest-truncated", None, frozenset({"vda", "sda"})),
    "manifest-deleted": Case(_deleted, "manifest-missing", None, frozenset({"vda", "sda"})),
    "image-deleted": Case(_image_gone, "image-missing", "sda", frozenset({"sda"})),
}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


@pytest.mark.parametrize("name", list(CASES))
async def test_a_damaged_newest_backup_blocks_nothing_and_loses_nothing(
    domain_factory: DomainFactory, tmp_path: Path, session: aiohttp.ClientSession, name: str
) -> None:
    case = CASES[name]
    cfg = config(tmp_path, retention={"keep_last": 2})
    toml = config_file(tmp_path, cfg)
    async with running_agent(cfg) as run:
        api, backups = Api(run, session), run.agent.backups
        repo = backups.repository
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        domain, uuid = guest.td.name, guest.td.uuid
        await guest.write("vda", 0, MiB, 0x11)
        await guest.write("sda", 3 * MiB, 256 * KiB, 0x21)
        first_point = guest.snapshot()
        first = await backups.run(uuid)
        await guest.write("vda", 8 * MiB, 128 * KiB, 0x12)
        await guest.write("sda", 0, 64 * KiB, 0x22)
        second_point = guest.snapshot()
        second = await backups.run(uuid)
        assert {d.mode for d in second.disks} == {"incremental"}

        backups_dir = repo.root / domain / "backups"
        bad = case.damage(backups_dir / second.backup_id)
        before = sorted(os.listdir(backups_dir))
        assert before == sorted([first.backup_id, second.backup_id])

        # The operator's view, from its own process: everything listed, the bad one named.
        listed = await asyncio.to_thread(agent_cli, toml, "backups", domain, "--json")
        assert listed.returncode == 0, listed.stderr
        entries = json.loads(listed.stdout)
        assert [e["id"] for e in entries] == [first.backup_id, second.backup_id]
        assert entries[0]["damaged"] == [] and entries[0]["mode"] == "full"
        [named] = entries[1]["damaged"]
        assert (named["kind"], named["target"], named["path"]) == (case.kind, case.target, str(bad))
        verified = await asyncio.to_thread(agent_cli, toml, "verify", domain)
        assert verified.returncode == 1
        said = f"{second.backup_id} {case.target or '-'} {bad}"
        assert said in verified.stdout, verified.stdout

        # The next backup, as a job: full where the chain broke, with the reason.
        await guest.write("vda", 20 * MiB, 64 * KiB, 0x13)
        await guest.write("sda", 40 * MiB, 64 * KiB, 0x23)
        third_point = guest.snapshot()
        done = await api.backup(domain, f"after-{name}")
        if case.target is None:  # two readable backups: keep_last = 2 has nothing to drop
            assert done["state"] == "succeeded", done
        else:
            # The backup stands (its id and disks are reported), but retention (keep_last
            # = 2) refused beside the damage: the job says so, it does not succeed.
            assert done["state"] == "failed", done
            assert done["error"]["code"] == "retention-refused", done
            assert f"backup {second.backup_id} is damaged" in done["error"]["message"], done
        assert {d["target"]: (d["mode"], d["reason"]) for d in done["disks"]} == {
            t: ("full", "repository-damaged") if t in case.full else ("incremental", None)
            for t in ("vda", "sda")
        }
        third = await repo.backup(domain, done["backup_id"])
        if case.full == {"vda", "sda"}:
            assert third.parent is None
        else:  # the sound disk's increment sits on the damaged backup's sound image
            assert third.parent == second.backup_id
            vda = third.disk("vda")
            assert vda is not None and vda.backing == f"../{second.backup_id}/vda.qcow2"
        assert (await api.metrics())[_FORCED] == len(case.full)
        status, shown = await api.call("GET", f"/v1/domains/{domain}/backups")
        assert status == 200 and [d["backup_id"] for d in shown["damaged"]] == [second.backup_id]
        assert [b["id"] for b in shown["backups"]][-1] == third.backup_id

        await assert_restores(repo, domain, third.backup_id, third_point, tmp_path)
        await assert_restores(repo, domain, first.backup_id, first_point, tmp_path)
        if case.target is not None:  # the damaged backup's other disk restores as ever
            vda_then = {"vda": second_point["vda"]}
            await assert_restores(repo, domain, second.backup_id, vda_then, tmp_path)
        job_type = (await asyncio.to_thread(guest.td.dom().jobInfo))[0]
        assert job_type == libvirt.VIR_DOMAIN_JOB_NONE, f"libvirt job type {job_type} left"
        # Nothing deleted: retention (keep_last = 2) refused, the damaged one kept too.
        after = sorted(os.listdir(backups_dir))
        assert after == sorted([*before, third.backup_id])
