"""``backup-agent restore --define``: the whole VM back, on real libvirt and QEMU.

A domain is backed up, then undefined and its disks deleted; the CLI (its own process)
restores every disk and defines it again from the recorded definition, started; its
disks read what the guest held at the backup. Beside a running original, ``--name``
gives a second domain with its own UUID on its own images. What already exists is never
replaced, and a refused restore leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import libvirt
import pytest

from tests.guest_model import MiB, agent_cli, config, config_file, started_guest
from tests.harness import running_agent
from tests.test_control_live import Api
from tests.testbed import daemon
from tests.testbed.domains import DiskSpec, DomainFactory, new_name

pytestmark = pytest.mark.libvirt

DISKS = [DiskSpec("vda", "virtio"), DiskSpec("vdb", "virtio", format="raw")]


async def _backed_up(
    domain_factory: DomainFactory, tmp_path: Path
) -> tuple[Path, object, str, dict[str, bytes]]:
    """A persistent two-disk guest, backed up once (a full and an incremental): the CLI's
    config, the guest, the newest backup id and what each disk held then."""
    cfg = config(tmp_path)
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, DISKS)
        await guest.write("vda", 0, 1 * MiB, 0x41)
        await guest.write("vdb", 5 * MiB, 2 * MiB, 0x42)
        await run.agent.backups.run(guest.td.uuid)
        await guest.write("vda", 9 * MiB, 64 * 1024, 0x43)
        newest = await run.agent.backups.run(guest.td.uuid)
        expected = guest.snapshot()
    return config_file(tmp_path, cfg), guest, newest.backup_id, expected


def _disk_bytes(image: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / f"{image.name}.read.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-O", "raw", str(image), str(raw)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    data = raw.read_bytes()
    raw.unlink()
    return data


def _source_files(dom: libvirt.virDomain) -> dict[str, str]:
    from lxml import etree  # noqa: PLC0415

    root = etree.fromstring(dom.XMLDesc(0).encode())
    return {
        d.find("target").get("dev"): d.find("source").get("file")
        for d in root.findall("devices/disk")
        if d.find("source") is not None
    }


async def test_a_vm_whose_definition_and_disks_are_gone_comes_back_started(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    config_path, guest, backup_id, expected = await _backed_up(domain_factory, tmp_path)
    td = guest.td  # type: ignore[attr-defined]
    name, uuid = td.name, td.uuid
    td.destroy()
    td.undefine()
    for path in td.disk_paths.values():
        path.unlink()

    done = await asyncio.to_thread(
        agent_cli, config_path, "restore", name, "--backup", backup_id, "--define", "--start"
    )
    assert done.returncode == 0, done.stderr
    assert f"domain {name} ({uuid}) started" in done.stdout, done.stdout
    dom = libvirt.open(daemon.URI).lookupByUUIDString(uuid)
    assert dom.name() == name and dom.isActive() and dom.isPersistent()
    sources = _source_files(dom)
    for target in ("vda", "vdb"):
        image = td.workdir / f"{name}-{target}.qcow2"  # beside where its disk was
        assert sources[target] == str(image)
        assert image.stat().st_mode & 0o777 == 0o600
        assert _disk_bytes(image, tmp_path) == expected[target], target
    # The agent's next backup of it is a full of each disk, and says why: new images,
    # no checkpoints (vdb was raw, whose backups had no bitmap to follow).
    async with running_agent(config(tmp_path)) as run:
        result = await run.agent.backups.run(uuid)
        assert [(d.target, d.mode) for d in result.disks] == [("vda", "full"), ("vdb", "full")]
        assert [d.reason for d in result.disks] == ["disk-replaced", "disk-added"]
    # (the fixture destroys and undefines it: same name and UUID as the original)


async def test_beside_the_original_under_a_new_name_and_nothing_is_ever_replaced(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    config_path, guest, backup_id, expected = await _backed_up(domain_factory, tmp_path)
    td = guest.td  # type: ignore[attr-defined]
    conn = libvirt.open(daemon.URI)
    to = tmp_path / "restored"

    # The original is still defined: under its own name, refused, nothing written.
    refused = await asyncio.to_thread(
        agent_cli,
        config_path,
        "restore",
        td.name,
        "--backup",
        backup_id,
        "--define",
        "--to",
        str(to),
    )
    assert refused.returncode == 1, refused.stderr
    assert f"a domain named {td.name} exists already" in refused.stderr, refused.stderr
    assert list(to.iterdir()) == []

    twin = new_name()
    (to / f"{twin}-vdb.qcow2").write_bytes(b"mine")  # an image path taken: refused too
    refused = await asyncio.to_thread(
        agent_cli,
        config_path,
        *("restore", td.name, "--backup", backup_id, "--define", "--name", twin, "--to", str(to)),
    )
    assert refused.returncode == 1, refused.stderr
    assert "exists already (never overwritten)" in refused.stderr, refused.stderr
    assert sorted(p.name for p in to.iterdir()) == [f"{twin}-vdb.qcow2"]
    assert (to / f"{twin}-vdb.qcow2").read_bytes() == b"mine"
    (to / f"{twin}-vdb.qcow2").unlink()

    done = await asyncio.to_thread(
        agent_cli,
        config_path,
        *("restore", td.name, "--backup", backup_id, "--define", "--name", twin),
        *("--to", str(to), "--start"),
    )
    try:
        assert done.returncode == 0, done.stderr
        copy = conn.lookupByName(twin)
        assert copy.UUIDString() != td.uuid
        assert copy.isActive() and td.dom().isActive()  # both run, side by side
        sources = _source_files(copy)
        for target in ("vda", "vdb"):
            assert sources[target] == str(to / f"{twin}-{target}.qcow2")
            assert _disk_bytes(to / f"{twin}-{target}.qcow2", tmp_path) == expected[target]
        assert _source_files(td.dom()) == {t: str(p) for t, p in td.disk_paths.items()}
    finally:
        with_twin = [d for d in conn.listAllDomains() if d.name() == twin]
        for dom in with_twin:
            if dom.isActive():
                dom.destroy()
            dom.undefine()


async def test_a_restore_job_with_define_through_the_api(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """The same through ``POST /v1/jobs``: the twin's images in ``restore_dir/to``, its
    name, new UUID and start in the job's result; the same request again is the same job;
    a request naming an existing domain fails with ``exists`` and writes nothing."""
    cfg = config(tmp_path, http={"port": 0})
    twin = new_name()
    conn = libvirt.open(daemon.URI)
    async with (
        running_agent(cfg) as run,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        api = Api(run, session)
        guest = await started_guest(run, domain_factory, DISKS)
        await guest.write("vda", 0, 1 * MiB, 0x51)
        expected = guest.snapshot()
        done = await api.backup(guest.td.name, "b1")
        assert done["state"] == "succeeded", done
        backup_id = done["backup_id"]
        request = {"kind": "restore", "domain": guest.td.name, "backup": backup_id}
        taken = await api.call("POST", "/v1/jobs", {**request, "id": "r0", "define": True})
        assert taken[0] == 201, taken
        refused = await api.wait_job("r0")
        assert refused["state"] == "failed" and refused["error"]["code"] == "exists", refused
        assert not cfg.restore_path.exists() or list(cfg.restore_path.iterdir()) == []

        body = {**request, "id": "r1", "define": True, "name": twin, "to": "twin", "start": True}
        try:
            assert (await api.call("POST", "/v1/jobs", body))[0] == 201
            job = await api.wait_job("r1")
            assert job["state"] == "succeeded", job
            result = job["result"]
            assert result["domain"]["name"] == twin and result["domain"]["started"] is True
            assert result["domain"]["uuid"] != guest.td.uuid
            copy = conn.lookupByName(twin)
            assert copy.UUIDString() == result["domain"]["uuid"] and copy.isActive()
            for target in ("vda", "vdb"):
                image = cfg.restore_path / "twin" / f"{twin}-{target}.qcow2"
                assert {"target": target, "path": str(image), "format": "qcow2"} in result["files"]
                assert _disk_bytes(image, tmp_path) == expected[target]
            assert (await api.call("POST", "/v1/jobs", body))[0] == 200  # the same job
        finally:
            for dom in [d for d in conn.listAllDomains() if d.name() == twin]:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
