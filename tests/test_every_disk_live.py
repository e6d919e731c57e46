"""Every disk of a domain, against real domains: qcow2 images incremental, raw images and
raw block devices read in full and stored as what changed, network disks read through
QEMU, and every disk that is left out named with its reason.

Each backup is restored and compared byte for byte with the model of what the guest held
(:mod:`tests.guest_model`); a raw disk's layers must grow with what changed, not with
the disk.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.backup.copy import PIECE
from agent.backup.plan import BackupMode
from agent.core.config import AgentConfig
from agent.core.errors import BackupError
from agent.repository.blocks import BLOCK
from agent.repository.manifest import Manifest
from tests.guest_model import (
    Guest,
    KiB,
    MiB,
    agent_cli,
    assert_cli_restores,
    assert_restores,
    config,
    config_file,
    started_guest,
)
from tests.harness import RunningAgent, api_headers, running_agent
from tests.test_backup_live import _backup_killed_at, _leftovers, flip_byte, wait_until_async
from tests.testbed.agent_process import free_port
from tests.testbed.daemon import live_processes_mentioning
from tests.testbed.domains import DiskSpec, DomainFactory

pytestmark = pytest.mark.libvirt

RAW = "format-raw: no persistent bitmap"
THREE_KINDS = [
    DiskSpec("vda"),  # a qcow2 image
    DiskSpec("vdb", format="raw"),  # a raw image file
    DiskSpec("vdc", kind="block"),  # a raw block device (a loop device)
]


def _allocated(path: Path) -> int:
    """Bytes the file holds on disk (its holes not counted)."""
    return path.stat().st_blocks * 512


async def _job(run: RunningAgent, session: aiohttp.ClientSession, body: dict[str, Any]) -> Any:
    """Submit a job to the agent's API and wait for its end."""
    url, headers = run.agent.urls[0], api_headers(run)
    async with session.post(f"{url}/v1/jobs", json=body, headers=headers) as response:
        assert response.status == 201, await response.text()
    for _ in range(600):
        async with session.get(f"{url}/v1/jobs/{body['id']}", headers=headers) as response:
            job = await response.json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {body['id']} did not end")


def _http_config(tmp_path: Path, **sections: dict[str, object]) -> AgentConfig:
    return config(tmp_path, http={"port": free_port()}, **sections)


async def test_qcow2_raw_file_and_block_device_every_point_restores(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    cfg = _http_config(tmp_path)
    agent_toml = config_file(tmp_path, cfg, f"[http]\nport = {cfg.http.port}\n")
    async with (
        running_agent(cfg) as run,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        guest = await started_guest(run, domain_factory, THREE_KINDS)
        name, repo = guest.td.name, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0xA1)
        await guest.write("vdb", 4 * MiB, 8 * MiB, 0xB1)
        await guest.write("vdc", 16 * MiB, 8 * MiB, 0xC1)
        points = [guest.snapshot()]
        first = await _job(run, session, {"id": "every-1", "kind": "backup", "domain": name})
        assert first["state"] == "succeeded", first
        assert [(d["target"], d["mode"], d["reason"]) for d in first["disks"]] == [
            ("vda", "full", "first-backup"),
            ("vdb", "full", RAW),
            ("vdc", "full", RAW),
        ]
        # Holes are not copied (the raw file's block status), nor zeroes (the block
        # device reports everything allocated): only the 8 MiB of data of each.
        copied = {d["target"]: d["bytes_copied"] for d in first["disks"]}
        assert copied["vdb"] == copied["vdc"] == 8 * MiB

        await guest.write("vda", 5 * MiB, 64 * KiB, 0xA2)
        await guest.write("vdb", 30 * MiB, 4 * KiB, 0xB2)  # a block of zeroes gets data
        await guest.zero("vdb", 4 * MiB, 2 * MiB)  # a block of data becomes zeroes
        await guest.write("vdc", 40 * MiB + 100, 1000, 0xC2)
        await guest.write("vdc", 18 * MiB + 512, 512, 0xC3)  # inside the data
        await guest.flush()
        points.append(guest.snapshot())
        # An incremental backup is possible: the raw disks are read in full, as always.
        second = await run.agent.backups.run(guest.td.uuid, BackupMode.INCREMENTAL)
        assert [(d.target, d.mode, d.reason) for d in second.disks] == [
            ("vda", "incremental", None),
            ("vdb", "full", RAW),
            ("vdc", "full", RAW),
        ]
        # Of each block that changed, the 64 KiB pieces that did: the block zeroed
        # costs no data (zeroes, written as such).
        assert {d.target: d.bytes_copied for d in second.disks} == {
            "vda": 64 * KiB,
            "vdb": PIECE,
            "vdc": 2 * PIECE,
        }

        await guest.write("vdc", 23 * MiB, 2 * MiB, 0xC4)  # across a block boundary
        await guest.flush()
        points.append(guest.snapshot())
        third = await run.agent.backups.run(guest.td.uuid)
        assert {d.target: d.bytes_copied for d in third.disks} == {
            "vda": 0,
            "vdb": 0,  # nothing changed: nothing written
            "vdc": 2 * MiB,  # 32 pieces, half in each of two blocks
        }

        manifests = await repo.backups(name)
        assert [m.backup_id for m in manifests] == [
            first["backup_id"],
            second.backup_id,
            third.backup_id,
        ]
        for manifest, expected in zip(manifests, points, strict=True):
            await assert_restores(repo, name, manifest.backup_id, expected, tmp_path)
        await assert_cli_restores(agent_toml, name, third.backup_id, points[2], tmp_path)
        assert await repo.verify(name) == []
        _assert_layers(tmp_path, manifests)

        # backups and status list all three disks.
        listed = await asyncio.to_thread(agent_cli, agent_toml, "backups", name, "--json")
        assert listed.returncode == 0, listed.stderr
        for entry in json.loads(listed.stdout):
            assert [d["target"] for d in entry["disks"]] == ["vda", "vdb", "vdc"]
            assert entry["excluded"] == []
        status = await asyncio.to_thread(agent_cli, agent_toml, "status", "--json")
        assert status.returncode == 0, status.stderr
        [domain] = [d for d in json.loads(status.stdout)["domains"] if d["name"] == name]
        assert {d["target"]: d["backup"] for d in domain["disks"]} == {
            "vda": "incremental",
            "vdb": "full",
            "vdc": "full",
        }
        assert domain["partial"] is False and domain["not_backed_up"] == []


def _assert_layers(tmp_path: Path, manifests: list[Manifest]) -> None:
    """The raw disks' later images sit on the previous point and hold what changed."""
    first, *later = manifests
    for target in ("vdb", "vdc"):
        standalone = first.disk(target)
        assert standalone is not None and standalone.backing is None
        assert standalone.block_size == BLOCK
        previous = first
        for manifest in later:
            disk = manifest.disk(target)
            assert disk is not None and disk.mode == "full"
            assert disk.backing == f"../{previous.backup_id}/{target}.qcow2"
            image = (
                tmp_path / "repo" / manifest.domain / "backups" / manifest.backup_id / disk.image
            )
            # What changed (at most 2 MiB) and qcow2's tables, never the disk.
            assert _allocated(image) < 2 * MiB + 1 * MiB, (manifest.backup_id, target)
            previous = manifest
        base = tmp_path / "repo" / first.domain / "backups" / first.backup_id / f"{target}.qcow2"
        assert _allocated(base) >= 8 * MiB


async def test_excluded_disks_are_named_with_their_reasons(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    disks = [
        DiskSpec("vda"),
        DiskSpec("sda", "sata", device="cdrom"),
        DiskSpec("vdb", readonly=True),
        DiskSpec("vdc"),  # excluded by configuration
    ]
    cfg = _http_config(tmp_path)
    cfg = cfg.model_copy(
        update={"backup": cfg.backup.model_copy(update={"exclude": {"lbat-*": ["vdc"]}})}
    )
    agent_toml = config_file(
        tmp_path, cfg, f'[http]\nport = {cfg.http.port}\n[backup.exclude]\n"lbat-*" = ["vdc"]\n'
    )
    expected_excluded = [
        ("sda", "device-cdrom"),
        ("vdb", "readonly"),
        ("vdc", "excluded-by-config"),
    ]
    async with (
        running_agent(cfg) as run,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        guest = await started_guest(run, domain_factory, disks)
        name = guest.td.name
        await guest.write("vda", 1 * MiB, 64 * KiB, 0x5A)
        await guest.write("vdc", 1 * MiB, 64 * KiB, 0x5B)
        expected = guest.snapshot()
        job = await _job(run, session, {"id": "excl-1", "kind": "backup", "domain": name})
        assert job["state"] == "succeeded", job
        assert sorted((d["target"], d["mode"], d["reason"]) for d in job["disks"]) == [
            ("sda", "excluded", "device-cdrom"),
            ("vda", "full", "first-backup"),
            ("vdb", "excluded", "readonly"),
            ("vdc", "excluded", "excluded-by-config"),
        ]
        manifest = await run.agent.backups.repository.backup(name, job["backup_id"])
        assert [d.target for d in manifest.disks] == ["vda"]
        assert sorted((x.target, x.reason) for x in manifest.excluded) == expected_excluded
        await assert_restores(
            run.agent.backups.repository, name, job["backup_id"], {"vda": expected["vda"]}, tmp_path
        )
        # An incremental backup names them too (the CLI, through the agent).
        await guest.write("vda", 2 * MiB, 4 * KiB, 0x5C)
        done = await asyncio.to_thread(
            agent_cli, agent_toml, "backup", name, "--mode", "incremental", "--wait"
        )
        assert done.returncode == 0, done.stderr
        for target, reason in expected_excluded:
            assert f"{target} excluded [{reason}]" in done.stdout, done.stdout

        listed = await asyncio.to_thread(agent_cli, agent_toml, "backups", name, "--json")
        assert listed.returncode == 0, listed.stderr
        for entry in json.loads(listed.stdout):
            excluded = sorted((x["target"], x["reason"]) for x in entry["excluded"])
            assert excluded == expected_excluded
        status = await asyncio.to_thread(agent_cli, agent_toml, "status", "--json")
        assert status.returncode == 0, status.stderr
        [domain] = [d for d in json.loads(status.stdout)["domains"] if d["name"] == name]
        assert sorted((x["target"], x["reason"]) for x in domain["not_backed_up"]) == (
            expected_excluded
        )
        # Neither the cdrom nor the read-only disk can hold data the guest wrote, and
        # vdc is left out on purpose: nothing is in no backup without saying so.
        assert domain["partial"] is False


async def test_a_writable_disk_left_out_makes_the_domain_partial(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """A shareable disk is in no backup (other writers): the domain shows as partial."""
    cfg = _http_config(tmp_path)
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda")])
        # (shareable made by hand: the bed's disks are not)
        await asyncio.to_thread(_attach_shareable, guest, tmp_path / "shared.raw")
        info = await run.agent.domains.refresh(guest.td.uuid)
        assert info is not None
        disk = info.disk("vdz")
        assert disk is not None and disk.excluded_reason == "shareable" and disk.writable
        result = await run.agent.backups.run(guest.td.uuid)
        assert [(x.target, x.reason) for x in result.excluded] == [("vdz", "shareable")]
        async with aiohttp.ClientSession(headers=api_headers(run)) as session:
            url = run.agent.urls[0]
            async with session.get(f"{url}/v1/domains") as response:
                domains = (await response.json())["domains"]
            async with session.get(f"{url}/metrics") as response:
                metrics = await response.text()
        [domain] = [d for d in domains if d["name"] == guest.td.name]
        assert domain["partial"] is True
        assert domain["not_backed_up"] == [{"target": "vdz", "reason": "shareable"}]
        assert f'backup_agent_domain_partial{{domain="{guest.td.name}"}} 1.0' in metrics


def _attach_shareable(guest: Guest, path: Path) -> None:
    import subprocess  # noqa: PLC0415

    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), "16M"], check=True)
    xml = (
        "<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"<source file='{path}'/><target dev='vdz' bus='virtio'/><shareable/></disk>"
    )
    guest.td.dom().attachDeviceFlags(xml, guest.td._affect_flags())


async def test_a_domain_with_only_excluded_disks_is_refused(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    cfg = config(tmp_path)
    cfg = cfg.model_copy(update={"backup": cfg.backup.model_copy(update={"exclude": {"*": ["*"]}})})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda")])
        with pytest.raises(BackupError) as refused:
            await run.agent.backups.run(guest.td.uuid)
        assert refused.value.code == "no-disks"
        assert "vda: excluded-by-config" in str(refused.value)
        assert await run.agent.backups.repository.backups(guest.td.name) == []


async def test_a_network_disk_is_read_through_qemu_and_stored_as_what_changed(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """An NBD network disk (served by a qemu-nbd of the test bed): QEMU exports it for
    the backup like any other; it has no bitmap, so it is read in full every time."""
    async with running_agent(config(tmp_path)) as run:
        guest = await started_guest(
            run, domain_factory, [DiskSpec("vda"), DiskSpec("vdd", kind="nbd")]
        )
        name, repo = guest.td.name, run.agent.backups.repository
        await guest.write("vdd", 6 * MiB, 3 * MiB, 0xD1)
        points = [guest.snapshot()]
        first = await run.agent.backups.run(guest.td.uuid)
        assert {(d.target, d.mode, d.reason) for d in first.disks} == {
            ("vda", "full", "first-backup"),
            ("vdd", "full", "source-network: no persistent bitmap"),
        }
        await guest.write("vdd", 7 * MiB, 4 * KiB, 0xD2)
        points.append(guest.snapshot())
        second = await run.agent.backups.run(guest.td.uuid)
        vdd = next(d for d in second.disks if d.target == "vdd")
        assert vdd.backing is not None and vdd.bytes_copied == PIECE
        for backup_id, expected in zip((first.backup_id, second.backup_id), points, strict=True):
            await assert_restores(repo, name, backup_id, expected, tmp_path)
        assert await repo.verify(name) == []


async def test_a_domain_with_only_raw_disks_and_retention(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """No disk can have a bitmap: each backup's checkpoint has no disks, every backup
    reads the disk whole. Retention merges the raw layers like any others, and the
    merged image still describes its blocks: the next backup is a small layer again."""
    cfg = config(tmp_path, retention={"keep_last": 2})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda", format="raw")])
        name, repo = guest.td.name, run.agent.backups.repository
        points = {}
        for step in range(4):
            await guest.write("vda", step * 8 * MiB, 4 * MiB, 0x10 + step)
            expected = guest.snapshot()
            result = await run.agent.backups.run(guest.td.uuid)
            points[result.backup_id] = expected
            [disk] = result.disks
            assert (disk.mode, disk.reason) == ("full", RAW)
            # 4 MiB of new data each time (the first: all there is), never the disk.
            assert disk.bytes_copied == 4 * MiB, step
        manifests = await repo.backups(name)
        assert len(manifests) == 2 and manifests[0].merged_from
        oldest = manifests[0].disks[0]
        assert oldest.backing is None and oldest.block_size == BLOCK
        # The merged image's checksums cover all of its data, which verify rereads.
        assert sum(c.length for c in oldest.checksums) == 12 * MiB
        assert await repo.verify(name) == []
        for manifest in manifests:
            await assert_restores(
                repo, name, manifest.backup_id, points[manifest.backup_id], tmp_path
            )
        records = await run.agent.chains.ledger.checkpoints(name)
        assert records and all(r.disks == () for r in records)


async def test_agent_killed_while_copying_a_raw_disk(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """kill -9 half-way through a raw disk's layer: the next start undoes the job (no
    staged layer, scratch file or qemu-nbd left), and the next backup is a layer on
    the last good point again, restoring byte for byte."""
    cfg = config(tmp_path, backup={"bandwidth_limit": 32 * MiB})
    agent_toml = config_file(tmp_path, cfg, f"[backup]\nbandwidth_limit = {32 * MiB}\n")
    async with running_agent(cfg) as run:
        guest = await started_guest(
            run, domain_factory, [DiskSpec("vda"), DiskSpec("vdb", kind="block")]
        )
        await guest.write("vdb", 0, 16 * MiB, 0x61)
        first = await run.agent.backups.run(guest.td.uuid)
        await guest.write("vdb", 20 * MiB, 16 * MiB, 0x62)
        await guest.flush()
        expected = guest.snapshot()
    await _backup_killed_at("copy:half", guest, agent_toml)
    assert _leftovers(cfg), "the killed job left nothing behind; it cannot have been mid-copy"
    await wait_until_async(lambda: not live_processes_mentioning(str(cfg.socket_path)), 10)
    async with running_agent(cfg) as run:
        assert _leftovers(cfg) == []
        repo = run.agent.backups.repository
        assert [m.backup_id for m in await repo.backups(guest.td.name)] == [first.backup_id]
        result = await run.agent.backups.run(guest.td.uuid)
        vdb = next(d for d in result.disks if d.target == "vdb")
        assert vdb.backing == f"../{first.backup_id}/vdb.qcow2"
        assert vdb.bytes_copied == 16 * MiB  # what changed since the last good point
        await assert_restores(repo, guest.td.name, result.backup_id, expected, tmp_path)
        assert await repo.verify(guest.td.name) == []


async def test_a_raw_disk_verify_found_damaged_is_copied_whole_again(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """A byte of a raw disk's image rots and `verify` finds it: the next backup is not
    a layer on the damaged image (its blocks would be skipped as unchanged) but a
    standalone copy, saying why; the one after it is a layer again."""
    cfg = config(tmp_path)
    agent_toml = config_file(tmp_path, cfg)
    async with running_agent(cfg) as run:
        guest = await started_guest(
            run, domain_factory, [DiskSpec("vda"), DiskSpec("vdb", format="raw")]
        )
        name, repo = guest.td.name, run.agent.backups.repository
        await guest.write("vdb", 4 * MiB, 1 * MiB, 0x71)
        first = await run.agent.backups.run(guest.td.uuid)
        image = tmp_path / "repo" / name / "backups" / first.backup_id / "vdb.qcow2"
        await asyncio.to_thread(flip_byte, image, 4 * MiB + 10)
        checked = await asyncio.to_thread(agent_cli, agent_toml, "verify", name)
        assert checked.returncode == 1 and "vdb" in checked.stdout, checked.stdout
        expected = guest.snapshot()
        second = await run.agent.backups.run(guest.td.uuid)
        vdb = next(d for d in second.disks if d.target == "vdb")
        assert (vdb.reason, vdb.backing) == ("backup-corrupt", None)
        await assert_restores(repo, name, second.backup_id, expected, tmp_path)
        # Copied whole and sound: the disk's broken chain is over.
        assert "vdb" not in await run.agent.chains.ledger.disk_chains(name)
        await guest.write("vdb", 9 * MiB, 4 * KiB, 0x72)
        expected = guest.snapshot()
        third = await run.agent.backups.run(guest.td.uuid)
        vdb = next(d for d in third.disks if d.target == "vdb")
        assert (vdb.reason, vdb.backing) == (RAW, f"../{second.backup_id}/vdb.qcow2")
        await assert_restores(repo, name, third.backup_id, expected, tmp_path)
