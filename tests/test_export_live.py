"""Instant recovery on real libvirt and QEMU: a domain started at once on a backup point
served by ``backup-agent export --overlay``, written to by the guest, then moved onto
local storage with ``virsh blockcopy --pivot`` while it runs; the export stopped after
the pivot, the guest carries on, and the local copy holds the point and the writes."""

from __future__ import annotations

import asyncio
import subprocess
import uuid as uuidlib
from pathlib import Path

import libvirt
import pytest

from agent.repository.store import Repository
from tests.guest_model import assert_restores, config_file, started_guest
from tests.guest_model import config as agent_config
from tests.harness import running_agent
from tests.test_export import _repository_files, _stop, exporting
from tests.test_repository import DOMAIN, Builder, KiB, MiB
from tests.testbed import daemon
from tests.testbed.domains import (
    DiskSpec,
    DomainFactory,
    NbdServer,
    TestDomain,
    domain_xml,
    new_name,
)

pytestmark = pytest.mark.libvirt


async def _chain(repo: Repository) -> Builder:
    builder = Builder(repo)
    await builder.backup({"vda": [(0, MiB, 0x31), (3 * MiB, 64 * KiB, 0x32)]})
    await builder.backup({"vda": [(512 * KiB, 128 * KiB, 0x33)]})
    return builder


def test_a_vm_runs_on_an_exported_overlay_and_is_block_copied_to_local_storage(
    tmp_path: Path,
) -> None:
    cfg = agent_config(tmp_path)
    builder = asyncio.run(_chain(Repository(cfg.repository_path)))
    config = config_file(tmp_path, cfg)
    older, _ = builder.ids
    before = _repository_files(builder.repo.root)
    overlay, local = tmp_path / "overlay.qcow2", tmp_path / "local.qcow2"
    conn = libvirt.open(daemon.URI)
    name = new_name()
    td = TestDomain(
        name=name,
        uuid=str(uuidlib.uuid4()),
        xml="",
        disk_paths={"vda": local},
        persistent=False,
        conn=conn,
        workdir=tmp_path / name,
    )
    args = (DOMAIN, "--backup", older, "--disk", "vda", "--overlay", str(overlay))
    try:
        with exporting(config, *args) as (proc, uri):
            socket = Path(uri.split("socket=", 1)[1])
            served = NbdServer(path=overlay, socket=socket, export="", process=proc, log=overlay)  # type: ignore[arg-type]
            spec = DiskSpec("vda", size=4 * MiB, kind="nbd")
            td.xml = domain_xml(name, td.uuid, [(spec, served)])
            conn.createXML(td.xml, 0)  # a transient domain, started at once
            td.write_pattern("vda", 2 * MiB, 64 * KiB, 0x5C)  # the guest writes meanwhile
            done = subprocess.run(
                [
                    *("virsh", "-c", daemon.URI, "blockcopy", name, "vda", str(local)),
                    *("--format", "qcow2", "--wait", "--pivot", "--timeout", "60"),
                ],
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert str(local) in td.live_xml()
            _stop(proc)  # the export is no longer needed
        # The guest carries on, on local storage: it reads the point and its own write.
        assert td.is_active()
        assert td.guest_has_pattern("vda", 2 * MiB, 64 * KiB, 0x5C)
        td.write_pattern("vda", 3 * MiB, 4 * KiB, 0x5D)
        td.flush("vda")
        raw = tmp_path / "local.raw"
        subprocess.run(
            ["qemu-img", "convert", "-U", "-O", "raw", str(local), str(raw)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        expected = bytearray(builder.points[older]["vda"])
        expected[2 * MiB : 2 * MiB + 64 * KiB] = b"\x5c" * 64 * KiB
        expected[3 * MiB : 3 * MiB + 4 * KiB] = b"\x5d" * 4 * KiB
        assert raw.read_bytes() == expected
        assert _repository_files(builder.repo.root) == before
    finally:
        td.cleanup()


async def test_a_backup_whose_retention_meets_an_export_succeeds_and_the_next_finishes_it(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """keep_last = 1 while the newest point is exported: the next backup is published
    and succeeds (its retention is left for later, the chain untouched under qemu-nbd,
    no job left to finish); once the export ends, the backup after finishes the merge,
    and the newest point restores exactly."""
    cfg = agent_config(tmp_path, retention={"keep_last": 1})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda", "virtio")])
        backups, repo = run.agent.backups, run.agent.backups.repository
        await guest.write("vda", 0, 1 * MiB, 0x61)
        at_first = guest.snapshot()["vda"]
        first = await backups.run(guest.td.uuid)
        config = config_file(tmp_path, cfg)
        with exporting(config, guest.td.name, "--backup", first.backup_id) as (proc, uri):
            await guest.write("vda", 2 * MiB, 64 * KiB, 0x62)
            second = await backups.run(guest.td.uuid)  # its retention would merge first
            assert [d.mode for d in second.disks] == ["incremental"]
            read = await asyncio.to_thread(_nbd_read, uri, tmp_path / "first.raw")
            assert read == at_first  # (the point being dropped is not listed meanwhile)
            assert guest.td.uuid not in await backups.undo.leftover_domains()
            await asyncio.to_thread(_stop, proc)
        await guest.write("vda", 3 * MiB, 64 * KiB, 0x63)
        expected = guest.snapshot()
        third = await backups.run(guest.td.uuid)
        assert [m.backup_id for m in await repo.backups(guest.td.name)] == [third.backup_id]
        await assert_restores(repo, guest.td.name, third.backup_id, expected, tmp_path)
        assert await repo.verify(guest.td.name) == []


def _nbd_read(uri: str, dest: Path) -> bytes:
    subprocess.run(["nbdcopy", uri, str(dest)], check=True, timeout=60, capture_output=True)
    return dest.read_bytes()
