"""The checkpoint chain against real libvirt and QEMU: redefine, judge, prune.

Guest data is written through QEMU's monitor at 64 KiB-aligned offsets (the bitmap
granularity), so "exactly the blocks written since the checkpoint" is a crisp set of
ranges: an incremental push backup into an empty qcow2 allocates exactly those.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import libvirt
import pytest

from agent.chain import checkpoints as checkpoints_module
from agent.chain.records import CheckpointState
from agent.core.faults import CRASH_ENV, Faults, SimulatedCrash
from agent.virt.events import DeviceAdded, DomainRef, JobCompleted, Lifecycle
from agent.virt.events import LifecycleKind as K
from tests.harness import (
    TWO_DISKS,
    RunningAgent,
    backed_up_checkpoint,
    crash_at,
    lifecycle,
    one_shot_chains,
    running_agent,
    started_domain,
    test_config,
)
from tests.testbed.domains import DiskSpec, DomainFactory, TestDomain, image_has_pattern

pytestmark = pytest.mark.libvirt

KiB = 1024
MiB = 1024 * KiB


def libvirt_chain(td: TestDomain) -> dict[str, str | None]:
    """name -> parent of the checkpoints libvirt has for the domain now."""
    chain: dict[str, str | None] = {}
    for cp in td.dom().listAllCheckpoints(0):
        try:
            chain[cp.getName()] = cp.getParent().getName()
        except libvirt.libvirtError:
            chain[cp.getName()] = None
    return chain


def allocated_ranges(image: Path) -> list[tuple[int, int]]:
    """(offset, length) of the data clusters in a qcow2 with no backing file."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [(e["start"], e["length"]) for e in json.loads(out) if e["data"]]


def bitmaps_in(image: Path) -> set[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    data = json.loads(out).get("format-specific", {}).get("data", {})
    return {b["name"] for b in data.get("bitmaps", [])}


async def push_backup(
    run: RunningAgent, td: TestDomain, workdir: Path, label: str, since: str | None
) -> dict[str, Path]:
    """A push-mode backup of every disk (incremental ``since`` a checkpoint, or full)."""
    targets = {t: workdir / f"{label}-{t}.qcow2" for t in td.disk_paths}
    for path in targets.values():
        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"],
            check=True,
        )
    disks = "".join(
        f"<disk name='{t}' type='file'><target file='{p}'/><driver type='qcow2'/></disk>"
        for t, p in targets.items()
    )
    incremental = f"<incremental>{since}</incremental>" if since else ""
    xml = f"<domainbackup mode='push'>{incremental}<disks>{disks}</disks></domainbackup>"
    mark = run.recorder.mark()
    await asyncio.to_thread(
        td.dom().backupBegin, xml, None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
    )
    done = await run.recorder.wait_for(
        lambda e: isinstance(e, JobCompleted) and e.domain.uuid == td.uuid, since=mark
    )
    assert isinstance(done, JobCompleted) and done.succeeded, done
    # JOB_COMPLETED comes before QEMU closes (and flushes) the target images: wait
    # until it lets go of them (their write lock), else they may read as empty.
    for path in targets.values():
        await asyncio.to_thread(wait_unlocked, path)
    return targets


def wait_unlocked(image: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    probe = ["qemu-img", "info", str(image)]
    while subprocess.run(probe, check=False, capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise AssertionError(f"{image} still held by QEMU after {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("new_uuid", [False, True], ids=["same-uuid", "new-uuid"])
async def test_transient_chain_is_redefined_in_order_after_recreate(
    domain_factory: DomainFactory, tmp_path: Path, new_uuid: bool
) -> None:
    disks = TWO_DISKS
    async with running_agent(test_config(tmp_path / "state")) as run:
        chains = run.agent.chains
        td = await started_domain(run, domain_factory, persistent=False, disks=disks)
        names = []
        for i in range(3):
            await asyncio.to_thread(td.write_pattern, "vda", i * MiB, 64 * KiB, 0xA0 + i)
            names.append((await chains.create_checkpoint(td.uuid)).name)
        assert libvirt_chain(td) == {names[0]: None, names[1]: names[0], names[2]: names[1]}

        # Written after the last checkpoint: exactly what the incremental must hold.
        await asyncio.to_thread(td.write_pattern, "vda", 8 * MiB, 64 * KiB, 0x11)
        await asyncio.to_thread(td.write_pattern, "vda", 20 * MiB, 128 * KiB, 0x22)
        await asyncio.to_thread(td.write_pattern, "sda", 1 * MiB, 64 * KiB, 0x33)

        await asyncio.to_thread(td.destroy)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STOPPED, "destroyed"))
        old_uuid = td.uuid
        mark = run.recorder.mark()
        await asyncio.to_thread(td.recreate, new_uuid=new_uuid)
        assert (td.uuid != old_uuid) is new_uuid
        # The start handler reconciles before the recorder (last handler) sees the event.
        await run.recorder.wait_for(lifecycle(td.uuid, K.STARTED, "booted"), since=mark)

        assert libvirt_chain(td) == {names[0]: None, names[1]: names[0], names[2]: names[1]}
        disk_chains = await chains.ledger.disk_chains(td.name)
        assert {t: c.valid for t, c in disk_chains.items()} == {"vda": True, "sda": True}
        if new_uuid:
            records = await chains.ledger.checkpoints(td.name)
            assert {r.domain_uuid for r in records} == {td.uuid}

        backup = await push_backup(run, td, tmp_path, "inc", since=names[2])
        assert allocated_ranges(backup["vda"]) == [(8 * MiB, 64 * KiB), (20 * MiB, 128 * KiB)]
        assert allocated_ranges(backup["sda"]) == [(1 * MiB, 64 * KiB)]
        assert image_has_pattern(backup["vda"], 20 * MiB, 128 * KiB, 0x22)
        assert image_has_pattern(backup["sda"], 1 * MiB, 64 * KiB, 0x33)


async def _chain_of_three(chains_owner: RunningAgent, td: TestDomain) -> list[str]:
    names = []
    for i in range(3):
        await asyncio.to_thread(td.write_pattern, "vda", i * MiB, 64 * KiB, 0x40 + i)
        names.append((await chains_owner.agent.chains.create_checkpoint(td.uuid)).name)
    return names


async def _forget_and_recreate(td: TestDomain) -> None:
    """Destroy the transient domain (libvirt forgets its checkpoints) and create it again."""
    await asyncio.to_thread(td.destroy)
    await asyncio.to_thread(td.recreate)
    assert libvirt_chain(td) == {}


async def test_redefine_killed_at_every_step_converges(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    config = test_config(tmp_path / "state")
    async with running_agent(config) as run:
        td = await started_domain(run, domain_factory, persistent=False)
        names = await _chain_of_three(run, td)
    full = {names[0]: None, names[1]: names[0], names[2]: names[1]}

    # Without the event-driven agent, so that only the reconciles below touch libvirt.
    for step, name in enumerate(names):
        await _forget_and_recreate(td)
        with pytest.raises(SimulatedCrash):
            async with one_shot_chains(config, faults=crash_at(f"redefine:{name}")) as chains:
                await chains.reconcile(td.uuid)
        # Died before redefining `name`: exactly its ancestors are defined.
        assert set(libvirt_chain(td)) == set(names[:step])
        async with one_shot_chains(config) as chains:
            report = await chains.reconcile(td.uuid)
        assert libvirt_chain(td) == full
        assert report.already_defined == names[:step] and report.redefined == names[step:]

    # Once with a real process killed by SIGKILL in the middle of the loop.
    await _forget_and_recreate(td)
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'[agent]\nstate_dir = "{tmp_path / "state"}"\n')
    command = [sys.executable, "-m", "agent", "reconcile", td.name, "--config", str(config_file)]
    killed = await asyncio.to_thread(
        subprocess.run,
        command,
        env={**os.environ, CRASH_ENV: f"redefine:{names[2]}"},
        capture_output=True,
        timeout=60,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert set(libvirt_chain(td)) == set(names[:2])
    again = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    assert "redefined 1, already defined 2" in again.stdout
    assert libvirt_chain(td) == full


async def test_qemu_killed_marks_chain_inconsistent_before_any_backup(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    disks = TWO_DISKS
    async with running_agent(test_config(tmp_path / "state")) as run:
        td = await started_domain(run, domain_factory, persistent=True, disks=disks)
        await backed_up_checkpoint(run, td)
        chains = await run.agent.chains.ledger.disk_chains(td.name)
        assert all(c.valid for c in chains.values())

        await asyncio.to_thread(td.crash)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STOPPED, "failed"))
        chains = await run.agent.chains.ledger.disk_chains(td.name)
        assert {t: c.reason for t, c in chains.items()} == {
            "vda": "bitmap-inconsistent",
            "sda": "bitmap-inconsistent",
        }
        # The images agree: the bitmap was left in-use.
        report = await run.agent.chains.reconcile(td.uuid)
        assert report.verdicts["vda"].reason == "bitmap-inconsistent"


async def test_bitmap_removed_on_stopped_domain_is_missing(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    disks = TWO_DISKS
    async with running_agent(test_config(tmp_path / "state")) as run:
        td = await started_domain(run, domain_factory, persistent=True, disks=disks)
        cp = await backed_up_checkpoint(run, td)
        await asyncio.to_thread(td.destroy)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STOPPED, "destroyed"))
        assert bitmaps_in(td.disk_paths["vda"]) == {cp.name}  # written back on a clean stop

        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "bitmap", "--remove", str(td.disk_paths["vda"]), cp.name],
            check=True,
        )
        report = await run.agent.chains.reconcile(td.uuid)  # on request, domain stopped
        assert report.verdicts["vda"].reason == "bitmap-missing"
        assert report.verdicts["sda"].valid
        chains = await run.agent.chains.ledger.disk_chains(td.name)
        assert (chains["vda"].valid, chains["vda"].reason) == (False, "bitmap-missing")
        assert chains["sda"].valid

        # Starting it again validates through libvirt and agrees.
        mark = run.recorder.mark()
        await asyncio.to_thread(td.start)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STARTED, "booted"), since=mark)
        chains = await run.agent.chains.ledger.disk_chains(td.name)
        assert chains["vda"].reason == "bitmap-missing" and chains["sda"].valid


async def test_scsi_disk_swapped_breaks_only_that_disk(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    disks = [DiskSpec("vda", "virtio"), DiskSpec("sda", "scsi"), DiskSpec("sdb", "scsi")]
    async with running_agent(test_config(tmp_path / "state")) as run:
        td = await started_domain(run, domain_factory, persistent=False, disks=disks)
        await backed_up_checkpoint(run, td)

        mark = run.recorder.mark()
        await asyncio.to_thread(td.detach_disk, "sdb")
        image = await asyncio.to_thread(td.create_image, "impostor")
        await asyncio.to_thread(td.attach_scsi_disk, "sdb", image)
        await run.recorder.wait_for(
            lambda e: isinstance(e, DeviceAdded) and e.domain.uuid == td.uuid, since=mark
        )
        chains = await run.agent.chains.ledger.disk_chains(td.name)
        assert {t: (c.valid, c.reason) for t, c in chains.items()} == {
            "vda": (True, None),
            "sda": (True, None),
            "sdb": (False, "disk-replaced"),
        }
        assert str(image) in chains["sdb"].detail


async def test_pruning_keeps_only_what_the_next_backup_needs(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    disks = TWO_DISKS
    async with running_agent(test_config(tmp_path / "state")) as run:
        chains = run.agent.chains
        td = await started_domain(run, domain_factory, persistent=True, disks=disks)
        names: list[str] = []
        for i in range(5):
            await asyncio.to_thread(td.write_pattern, "vda", i * MiB, 64 * KiB, 0x60 + i)
            cp = await chains.create_checkpoint(td.uuid)
            await push_backup(run, td, tmp_path, f"b{i}", since=names[-1] if names else None)
            await chains.backup_succeeded(td.name, cp.name)
            names.append(cp.name)
            assert set(libvirt_chain(td)) == {cp.name}, f"after backup {i + 1}"

        records = await chains.ledger.checkpoints(td.name)
        assert [r.name for r in records] == names
        assert [r.state for r in records] == [CheckpointState.PRUNED] * 4 + [CheckpointState.ACTIVE]
        assert all(r.backed_up_at is not None for r in records)
        assert records[-1].parent is None and records[-1].born_parent == names[-2]

        await asyncio.to_thread(td.destroy)  # a clean stop writes the bitmaps to the images
        await run.recorder.wait_for(lifecycle(td.uuid, K.STOPPED, "destroyed"))
        assert bitmaps_in(td.disk_paths["vda"]) == {names[-1]}
        assert bitmaps_in(td.disk_paths["sda"]) == {names[-1]}


async def test_interrupted_pruning_is_finished_by_reconcile(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    config = test_config(tmp_path / "state")
    async with running_agent(config) as run:
        td = await started_domain(run, domain_factory, persistent=False)
        names = await _chain_of_three(run, td)
        for name in names[:2]:
            await run.agent.chains.ledger.mark_backed_up(td.name, name, 1.0)
    async with one_shot_chains(config, faults=crash_at(f"pruned:{names[0]}")) as chains:
        with pytest.raises(SimulatedCrash):
            await chains.backup_succeeded(td.name, names[2])
    # names[0] deleted from libvirt but still "pruning"; names[1] not touched yet.
    assert set(libvirt_chain(td)) == {names[1], names[2]}
    async with one_shot_chains(config) as chains:
        report = await chains.reconcile(td.uuid)
        states = {r.name: r.state for r in await chains.ledger.checkpoints(td.name)}
    assert report.prunes_finished == names[:2]
    assert libvirt_chain(td) == {names[2]: None}
    assert states == {
        names[0]: CheckpointState.PRUNED,
        names[1]: CheckpointState.PRUNED,
        names[2]: CheckpointState.ACTIVE,
    }


async def test_undefine_of_a_running_domain_redefines_at_once(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with running_agent(test_config(tmp_path / "state")) as run:
        td = await started_domain(run, domain_factory, persistent=True)
        names = await _chain_of_three(run, td)
        mark = run.recorder.mark()
        # Undefining drops the checkpoint metadata; the domain runs on, now transient.
        await asyncio.to_thread(td.undefine)
        await run.recorder.wait_for(lifecycle(td.uuid, K.UNDEFINED, "removed"), since=mark)
        assert libvirt_chain(td) == {names[0]: None, names[1]: names[0], names[2]: names[1]}


async def test_leftover_and_foreign_checkpoints(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    config = test_config(tmp_path / "state")
    async with running_agent(config) as run:
        td = await started_domain(run, domain_factory, persistent=False)
        kept = await run.agent.chains.create_checkpoint(td.uuid)
    # The agent dies between creating a checkpoint in libvirt and recording it.
    async with one_shot_chains(config, faults=_crash_after_create()) as chains:
        with pytest.raises(SimulatedCrash) as crashed:
            await chains.create_checkpoint(td.uuid)
    leftover = str(crashed.value).removeprefix("created:")
    # An operator's own checkpoint, made by hand.
    await asyncio.to_thread(
        td.dom().checkpointCreateXML,
        "<domaincheckpoint><name>operator-cp</name></domaincheckpoint>",
        0,
    )
    assert set(libvirt_chain(td)) == {kept.name, leftover, "operator-cp"}
    async with one_shot_chains(config) as chains:
        report = await chains.reconcile(td.uuid)
        recorded = [r.name for r in await chains.ledger.checkpoints(td.name)]
    assert report.leftovers_deleted == [leftover]
    assert report.foreign == ["operator-cp"]
    assert set(libvirt_chain(td)) == {kept.name, "operator-cp"}
    assert recorded == [kept.name]


def _crash_after_create() -> Faults:
    def hook(point: str, /) -> None:
        if point.startswith("created:"):
            raise SimulatedCrash(point)

    return hook


async def test_a_stale_bitmap_of_the_chosen_name_is_stepped_around(
    domain_factory: DomainFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stale = "lba-20200101T000000Z-000000"
    td = await asyncio.to_thread(domain_factory, persistent=True, start=False)
    # Left in the image by an earlier life of this domain that libvirt no longer knows.
    await asyncio.to_thread(
        subprocess.run,
        ["qemu-img", "bitmap", "--add", str(td.disk_paths["vda"]), stale],
        check=True,
    )
    names = iter([stale, "lba-20200101T000001Z-000001"])
    monkeypatch.setattr(checkpoints_module, "new_checkpoint_name", lambda: next(names))
    async with running_agent(test_config(tmp_path / "state")) as run:
        await asyncio.to_thread(td.start)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STARTED, "booted"))
        record = await run.agent.chains.create_checkpoint(td.uuid)
    assert record.name == "lba-20200101T000001Z-000001"
    assert set(libvirt_chain(td)) == {record.name}


async def test_migration_departure_hands_the_chain_over(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    # A real migration needs a second host; the event libvirt sends on departure is
    # injected into the real agent instead, for a real domain with a real chain.
    async with running_agent(test_config(tmp_path / "state")) as run:
        td = await started_domain(run, domain_factory, persistent=True)
        await backed_up_checkpoint(run, td)
        mark = run.recorder.mark()
        departure = Lifecycle(domain=DomainRef(td.name, td.uuid), kind=K.STOPPED, detail="migrated")
        run.agent.dispatcher.submit(departure)
        await run.recorder.wait_for(lambda e: e is departure, since=mark)
        chains = await run.agent.chains.ledger.disk_chains(td.name)
        assert {t: c.reason for t, c in chains.items()} == {"vda": "migrated-away"}


async def test_pruning_a_stopped_domain_removes_the_bitmaps_too(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with running_agent(test_config(tmp_path / "state")) as run:
        chains = run.agent.chains
        td = await started_domain(run, domain_factory, persistent=True)
        first = await chains.create_checkpoint(td.uuid)
        await chains.backup_succeeded(td.name, first.name)
        second = await chains.create_checkpoint(td.uuid)
        await asyncio.to_thread(td.destroy)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STOPPED, "destroyed"))
        assert bitmaps_in(td.disk_paths["vda"]) == {first.name, second.name}
        # libvirt deletes a stopped domain's checkpoint only as metadata; the agent
        # removes the bitmap from the image itself.
        async with run.agent.backups.domain_lock(td.uuid):
            await chains.backup_succeeded(td.name, second.name)
        assert set(libvirt_chain(td)) == {second.name}
        assert bitmaps_in(td.disk_paths["vda"]) == {second.name}
