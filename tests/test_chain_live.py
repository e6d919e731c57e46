"""The checkpoint chain against real libvirt and QEMU: redefine, judge, prune.

Guest data is written through QEMU's monitor at 64 KiB-aligned offsets (the bitmap
granularity), so "exactly the blocks written since the checkpoint" is a crisp set of
ranges: an incremental push backup into an empty qcow2 allocates exactly those.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import libvirt
import pytest

from agent.events import JobCompleted
from agent.events import LifecycleKind as K
from agent.ledger import CheckpointState
from tests.harness import RunningAgent, lifecycle, running_agent, test_config
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
        ["qemu-img", "map", "--output=json", str(image)], check=True, capture_output=True, text=True
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
    return targets


@pytest.mark.parametrize("new_uuid", [False, True], ids=["same-uuid", "new-uuid"])
async def test_transient_chain_is_redefined_in_order_after_recreate(
    domain_factory: DomainFactory, tmp_path: Path, new_uuid: bool
) -> None:
    disks = [DiskSpec("vda", "virtio"), DiskSpec("sda", "scsi")]
    async with running_agent(test_config(tmp_path / "state")) as run:
        chains = run.agent.chains
        td = await asyncio.to_thread(domain_factory, persistent=False, disks=disks)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STARTED, "booted"))
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
