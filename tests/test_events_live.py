"""Each event type, from real actions on real domains, reaches the handlers with its detail.

The agent runs in-process against the real libvirtd; test actions on domains run in
worker threads so the agent's loop keeps receiving events meanwhile.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import libvirt
import pytest

from agent.virt.events import (
    BlockJob,
    BlockJobStatus,
    BlockJobType,
    DeviceAdded,
    DeviceRemoved,
    Event,
    JobCompleted,
    Lifecycle,
)
from agent.virt.events import LifecycleKind as K
from tests.harness import lifecycle, running_agent, started_domain, test_config
from tests.testbed.domains import DiskSpec, DomainFactory

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024


def _lifecycle_story(events: list[Event]) -> list[tuple[K, str]]:
    return [(e.kind, e.detail) for e in events if isinstance(e, Lifecycle) and not e.synthetic]


async def test_persistent_domain_define_start_destroy_undefine(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with running_agent(test_config(tmp_path / "state")) as run:
        rec, domains = run.recorder, run.agent.domains
        td = await asyncio.to_thread(domain_factory, persistent=True, start=False)

        await rec.wait_for(lifecycle(td.uuid, K.DEFINED, "added"))
        info = domains.get(td.uuid)
        assert info is not None and info.persistent and not info.state.active
        assert info.name == td.name

        await asyncio.to_thread(td.start)
        await rec.wait_for(lifecycle(td.uuid, K.STARTED, "booted"))
        info = domains.get(td.uuid)
        assert info is not None and info.state.active
        vda = info.disk("vda")
        assert vda is not None and vda.backup_capable
        assert vda.alias == "virtio-disk0"
        assert vda.capacity == 64 * MiB
        assert vda.identity is not None and vda.identity.path == str(td.disk_paths["vda"])
        assert vda.identity.inode is not None  # probed on the host, not only parsed

        await asyncio.to_thread(td.destroy)
        await rec.wait_for(lifecycle(td.uuid, K.STOPPED, "destroyed"))
        info = domains.get(td.uuid)
        assert info is not None and not info.state.active  # still defined

        await asyncio.to_thread(td.undefine)
        await rec.wait_for(lifecycle(td.uuid, K.UNDEFINED, "removed"))
        assert domains.get(td.uuid) is None

        story = [s for s in _lifecycle_story(rec.for_domain(td.uuid)) if s[0] is not K.RESUMED]
        # libvirt also sends shutdown/host around destroy; the order of the rest is fixed.
        story = [s for s in story if s[0] is not K.SHUTDOWN]
        assert story == [
            (K.DEFINED, "added"),
            (K.STARTED, "booted"),
            (K.STOPPED, "destroyed"),
            (K.UNDEFINED, "removed"),
        ]
        seqs = [e.seq for e in rec.for_domain(td.uuid)]
        assert seqs == sorted(seqs), "events of one domain were dispatched out of order"


async def test_transient_domain_is_forgotten_when_it_stops(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    disks = [DiskSpec("vda", "virtio"), DiskSpec("sda", "scsi")]
    async with running_agent(test_config(tmp_path / "state")) as run:
        td = await started_domain(run, domain_factory, persistent=False, disks=disks)
        info = run.agent.domains.get(td.uuid)
        assert info is not None and not info.persistent
        assert [(d.target, d.bus, d.alias) for d in info.disks] == [
            ("vda", "virtio", "virtio-disk0"),
            ("sda", "scsi", "scsi0-0-0-0"),
        ]

        await asyncio.to_thread(td.destroy)
        await run.recorder.wait_for(lifecycle(td.uuid, K.STOPPED, "destroyed"))
        assert run.agent.domains.get(td.uuid) is None


async def test_scsi_unplug_and_plug_are_seen_with_the_disk(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    disks = [DiskSpec("vda", "virtio"), DiskSpec("sda", "scsi"), DiskSpec("sdb", "scsi")]
    async with running_agent(test_config(tmp_path / "state")) as run:
        rec, domains = run.recorder, run.agent.domains
        td = await asyncio.to_thread(domain_factory, persistent=False, disks=disks)
        await rec.wait_for(lifecycle(td.uuid, K.STARTED, "booted"))
        await run.agent.dispatcher.drain()
        before = domains.get(td.uuid)
        assert before is not None
        old_sdb = before.disk("sdb")
        assert old_sdb is not None and old_sdb.identity is not None
        alias = await asyncio.to_thread(td.disk_alias, "sdb")

        await asyncio.to_thread(td.detach_disk, "sdb")
        removed = await rec.wait_for(
            lambda e: isinstance(e, DeviceRemoved) and e.domain.uuid == td.uuid
        )
        assert isinstance(removed, DeviceRemoved) and removed.device == alias
        assert not removed.synthetic
        after = domains.get(td.uuid)
        assert after is not None and after.disk("sdb") is None and after.disk("sda") is not None

        image = await asyncio.to_thread(td.create_image, "other")
        await asyncio.to_thread(td.attach_scsi_disk, "sdb", image)
        added = await rec.wait_for(
            lambda e: isinstance(e, DeviceAdded) and e.domain.uuid == td.uuid
        )
        assert isinstance(added, DeviceAdded)
        replugged = domains.get(td.uuid)
        assert replugged is not None
        new_sdb = replugged.disk("sdb")
        assert new_sdb is not None and new_sdb.alias == added.device
        assert new_sdb.source == str(image)
        assert new_sdb.identity is not None
        assert not new_sdb.identity.same_image(old_sdb.identity)


async def test_qemu_killed_is_stopped_failed(domain_factory: DomainFactory, tmp_path: Path) -> None:
    async with running_agent(test_config(tmp_path / "state")) as run:
        td = await started_domain(run, domain_factory, persistent=True)
        await asyncio.to_thread(td.crash)
        event = await run.recorder.wait_for(lifecycle(td.uuid, K.STOPPED))
        assert isinstance(event, Lifecycle) and event.detail == "failed"
        info = run.agent.domains.get(td.uuid)
        assert info is not None and not info.state.active


async def test_block_job_and_job_completed(domain_factory: DomainFactory, tmp_path: Path) -> None:
    async with running_agent(test_config(tmp_path / "state")) as run:
        rec = run.recorder
        td = await asyncio.to_thread(domain_factory, persistent=False)
        await rec.wait_for(lifecycle(td.uuid, K.STARTED, "booted"))

        # A pull with no backing file to pull from completes at once.
        await asyncio.to_thread(td.dom().blockRebase, "vda", None, 0, 0)
        pull = await rec.wait_for(lambda e: isinstance(e, BlockJob) and e.domain.uuid == td.uuid)
        assert isinstance(pull, BlockJob)
        assert (pull.disk, pull.job_type, pull.status) == (
            "vda",
            BlockJobType.PULL,
            BlockJobStatus.COMPLETED,
        )

        # A push-mode backup is a domain job: it ends with JOB_COMPLETED and its statistics.
        target = tmp_path / "push.qcow2"
        await asyncio.to_thread(
            subprocess.run,
            ["qemu-img", "create", "-q", "-f", "qcow2", str(target), "64M"],
            check=True,
        )
        backup_xml = (
            "<domainbackup mode='push'><disks>"
            f"<disk name='vda' type='file'><target file='{target}'/><driver type='qcow2'/></disk>"
            "</disks></domainbackup>"
        )
        await asyncio.to_thread(
            td.dom().backupBegin, backup_xml, None, libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL
        )
        done = await rec.wait_for(
            lambda e: isinstance(e, JobCompleted) and e.domain.uuid == td.uuid
        )
        assert isinstance(done, JobCompleted)
        assert done.succeeded is True
        assert done.stats["operation"] == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP
        assert done.stats["disk_total"] == 64 * MiB
        backup_block_job = await rec.wait_for(
            lambda e: isinstance(e, BlockJob) and e.job_type is BlockJobType.BACKUP
        )
        assert isinstance(backup_block_job, BlockJob)
        assert backup_block_job.status is BlockJobStatus.COMPLETED
