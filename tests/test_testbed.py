"""Checks that the real-libvirt test bed itself works, before agent tests rely on it.

Guest writes must really reach the images (also behind a loop device or an NBD server),
every kind of disk must start, hot-plug must change the live XML, a QEMU crash must stop
the domain, a libvirtd restart must leave running guests alone, and cleanup must leave
nothing behind: no domain, file, loop device or qemu-nbd.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from tests.testbed import daemon
from tests.testbed.domains import (
    QEMU_LOG_DIR,
    DiskSpec,
    DomainFactory,
    TestDomain,
    image_has_pattern,
    kvm_available,
    loop_devices_of,
    make_domain,
)

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024
KiB = 1024

# One disk of every kind the bed makes, on the buses they are used with.
EVERY_KIND = [
    DiskSpec("vda", "virtio"),  # qcow2 file
    DiskSpec("vdb", "virtio", format="raw"),  # raw file
    DiskSpec("vdc", "virtio", kind="block"),  # loop device
    DiskSpec("vdd", "virtio", kind="nbd"),  # qemu-nbd on a Unix socket
    DiskSpec("sda", "scsi", kind="block"),
    DiskSpec("sdb", "scsi", kind="nbd"),
    DiskSpec("sdc", "sata", size=4 * MiB, device="cdrom"),
    DiskSpec("vde", "virtio", format="raw", readonly=True),
]
WRITABLE = ["vda", "vdb", "vdc", "vdd", "sda", "sdb"]


def _bed_loops(root: Path) -> list[str]:
    """Loop devices (as 'NAME BACK-FILE' lines) whose backing file lies under ``root``."""
    out = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if str(root) in line]


def _bed_nbd_pids(root: Path) -> set[int]:
    """Pids of live (not zombie) qemu-nbd processes with an argument under ``root``."""
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if os.path.basename(args[0]) != b"qemu-nbd" or not any(
            os.fsencode(root) in arg for arg in args
        ):
            continue
        if stat[stat.rindex(")") + 2 :].split(" ", 1)[0] not in ("Z", "X"):
            pids.add(int(proc.name))
    return pids


def _fill(path: Path, offset: int, length: int, byte: int) -> None:
    """Write a pattern into a raw image offline (before any QEMU opens it)."""
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"write -P 0x{byte:02x} {offset} {length}", str(path)],
        capture_output=True,
        check=True,
    )


def _attr(element: ET.Element, child: str, name: str) -> str | None:
    """Attribute ``name`` of ``element``'s sub-element ``child`` (which must exist)."""
    sub = element.find(child)
    assert sub is not None, f"no <{child}> in {ET.tostring(element, encoding='unicode')}"
    return sub.get(name)


def _disk(xml: str, target: str) -> ET.Element:
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            return disk
    raise KeyError(target)


def test_daemons_are_up() -> None:
    pid = daemon.libvirtd_pid()
    assert pid is not None
    assert daemon.virtlogd_pid() is not None
    assert daemon.can_connect()


def test_domain_xml_matches_host(domain_factory: DomainFactory) -> None:
    td = domain_factory(disks=[DiskSpec("vda", "virtio", format="raw")])
    xml = td.live_xml()
    assert f"type='{'kvm' if kvm_available() else 'qemu'}'" in xml
    assert "<memballoon model='none'" in xml
    assert "model='virtio-scsi'" in xml
    assert td.disk_alias("vda") == "virtio-disk0"
    assert td.qemu_pid() > 0


def test_guest_writes_land_in_images(domain_factory: DomainFactory) -> None:
    td = domain_factory(disks=[DiskSpec("vda", "virtio"), DiskSpec("sda", "scsi")])
    assert td.disk_alias("sda") == "scsi0-0-0-0"

    td.write_pattern("vda", 4 * MiB, 512 * 1024, 0xAB)
    td.write_pattern("sda", 0, 64 * 1024, 0xCD)
    assert td.guest_has_pattern("vda", 4 * MiB, 512 * 1024, 0xAB)
    assert not td.guest_has_pattern("vda", 0, 4096, 0xAB)
    assert td.read_guest("sda", 64 * 1024 - 8, 16) == b"\xcd" * 8 + b"\0" * 8
    # qemu-io failures (here: past the 64 MiB end) must raise, not pass silently.
    with pytest.raises(RuntimeError, match="failed"):
        td.write_pattern("sda", 100 * MiB, 4096, 0x11)

    td.destroy()
    assert td.find() is None  # transient: gone once stopped
    assert image_has_pattern(td.disk_paths["vda"], 4 * MiB, 512 * 1024, 0xAB)
    assert image_has_pattern(td.disk_paths["sda"], 0, 64 * 1024, 0xCD)
    # The checker itself must be able to say no.
    assert not image_has_pattern(td.disk_paths["vda"], 0, 4096, 0xAB)
    assert not image_has_pattern(td.disk_paths["sda"], 0, 64 * 1024, 0xAB)


def test_scsi_hotplug_changes_live_and_config_xml(domain_factory: DomainFactory) -> None:
    td = domain_factory(persistent=True, disks=[DiskSpec("vda", "virtio")])
    image = td.create_image("hot")
    assert "sdb" not in td.disk_targets()

    td.attach_scsi_disk("sdb", image)
    assert "sdb" in td.disk_targets()
    assert "sdb" in td.disk_targets(inactive=True)  # persistent: config changed too
    td.write_pattern("sdb", MiB, 4096, 0x5A)

    td.detach_disk("sdb")
    assert "sdb" not in td.disk_targets()
    assert "sdb" not in td.disk_targets(inactive=True)
    assert td.is_active()
    # QEMU has let go of the image, so it can be checked offline while the domain runs.
    assert image_has_pattern(image, MiB, 4096, 0x5A)
    with pytest.raises(ValueError, match="non-SCSI"):
        td.detach_disk("vda")


def test_crash_stops_domain(domain_factory: DomainFactory) -> None:
    transient = domain_factory()
    transient.crash()
    assert transient.find() is None

    persistent = domain_factory(persistent=True)
    pid = persistent.qemu_pid()
    persistent.crash()
    assert persistent.state() == (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)
    persistent.start()
    assert persistent.is_active()
    assert persistent.qemu_pid() != pid


def test_recreate_transient_with_new_uuid(domain_factory: DomainFactory) -> None:
    td = domain_factory()
    old_uuid = td.uuid
    td.destroy()
    td.recreate(new_uuid=True)
    assert td.uuid != old_uuid
    assert td.is_active()
    assert td.dom().name() == td.name


def test_restart_libvirtd_keeps_domain_running(domain_factory: DomainFactory) -> None:
    td = domain_factory(disks=[DiskSpec("sda", "scsi")])
    qemu_pid = td.qemu_pid()
    old_daemon = daemon.libvirtd_pid()

    daemon.restart_libvirtd()

    assert daemon.libvirtd_pid() not in (None, old_daemon)
    conn = libvirt.open(daemon.URI)
    try:
        dom = conn.lookupByUUIDString(td.uuid)
        assert dom.isActive()
        assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()
    assert td.qemu_pid() == qemu_pid
    # The monitor was reconnected, too: guest I/O still works through the new daemon.
    td.write_pattern("sda", 0, 4096, 0x77)
    assert td.guest_has_pattern("sda", 0, 4096, 0x77)


def test_cleanup_leaves_nothing(virt_conn: libvirt.virConnect, tmp_path: Path) -> None:
    made: list[TestDomain] = []
    try:
        td = make_domain(
            virt_conn,
            tmp_path,
            persistent=True,
            disks=[DiskSpec("vda"), DiskSpec("sda", "scsi", format="raw")],
            registry=made,
        )
        td.write_pattern("vda", 0, 512, 0x01)  # makes QEMU log something
        assert td.name.startswith("lbat-")
        assert td.workdir.is_dir()
        assert (QEMU_LOG_DIR / f"{td.name}.log").exists()
    finally:
        for made_td in made:
            made_td.cleanup()
    assert td.find() is None
    assert not td.workdir.exists()
    assert not list(QEMU_LOG_DIR.glob(f"{td.name}.log*"))
    names = subprocess.run(
        ["virsh", "-c", daemon.URI, "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert td.name not in names
    td.cleanup()  # idempotent: a second cleanup of a vanished domain is fine


def test_disk_spec_defaults_and_checks() -> None:
    # Old call sites keep their meaning: a qcow2 virtio file disk by default.
    assert DiskSpec() == DiskSpec("vda", "virtio", 64 * MiB, "qcow2", "file", "disk", False)
    assert DiskSpec("sda", "scsi", format="raw").format == "raw"
    assert DiskSpec("vdc", kind="block").format == "raw"
    assert DiskSpec("vdd", kind="nbd").format == "raw"
    cdrom = DiskSpec("sdc", "sata", device="cdrom")
    assert (cdrom.format, cdrom.readonly) == ("raw", True)
    with pytest.raises(ValueError, match="raw"):
        DiskSpec("vdc", kind="block", format="qcow2")
    with pytest.raises(ValueError, match="sata or scsi"):
        DiskSpec("vdc", device="cdrom")


def test_every_disk_kind_starts(domain_factory: DomainFactory) -> None:
    td = domain_factory(persistent=True, disks=EVERY_KIND, start=False)
    # The read-only media get content before QEMU opens them.
    _fill(td.disk_paths["sdc"], 0, 64 * KiB, 0xC0)
    _fill(td.disk_paths["vde"], MiB, 64 * KiB, 0xE0)
    td.start()
    xml = td.live_xml()

    assert _attr(_disk(xml, "vda"), "driver", "type") == "qcow2"
    assert _attr(_disk(xml, "vdb"), "source", "file") == str(td.disk_paths["vdb"])
    for target in ("vdc", "sda"):
        disk = _disk(xml, target)
        dev = td.block_devices[target]
        assert (disk.get("type"), disk.get("device")) == ("block", "disk")
        assert _attr(disk, "source", "dev") == dev
        assert _attr(disk, "driver", "type") == "raw"
        assert dev.startswith("/dev/loop")
        assert loop_devices_of(td.disk_paths[target]) == [dev]  # losetup -j
    for target in ("vdd", "sdb"):
        disk = _disk(xml, target)
        server = td.nbd_servers[target]
        assert disk.get("type") == "network"
        source = disk.find("source")
        assert source is not None
        assert (source.get("protocol"), source.get("name")) == ("nbd", server.export)
        host = source.find("host")
        assert host is not None
        assert (host.get("transport"), host.get("socket")) == ("unix", str(server.socket))
        assert server.alive()
        assert server.path == td.disk_paths[target]
    cdrom = _disk(xml, "sdc")
    assert cdrom.get("device") == "cdrom"
    assert _attr(cdrom, "target", "bus") == "sata"
    assert cdrom.find("readonly") is not None
    assert _disk(xml, "vde").find("readonly") is not None
    assert sorted(td.disk_targets()) == sorted(d.target for d in EVERY_KIND)

    for i, target in enumerate(WRITABLE):
        td.write_pattern(target, 2 * MiB, 64 * KiB, 0x10 + i)
    for i, target in enumerate(WRITABLE):
        assert td.guest_has_pattern(target, 2 * MiB, 64 * KiB, 0x10 + i), target
    assert td.guest_has_pattern("sdc", 0, 64 * KiB, 0xC0)
    assert td.guest_has_pattern("vde", MiB, 64 * KiB, 0xE0)
    for target in ("sdc", "vde"):
        with pytest.raises(RuntimeError, match="read-only"):
            td.write_pattern(target, 0, 512, 0x01)


def test_block_and_nbd_writes_reach_backing_files(domain_factory: DomainFactory) -> None:
    td = domain_factory(
        disks=[
            DiskSpec("vdc", "virtio", kind="block"),
            DiskSpec("vdd", "virtio", kind="nbd"),
            DiskSpec("sda", "scsi", kind="block"),
            DiskSpec("sdb", "scsi", kind="nbd"),
        ]
    )
    td.write_pattern("vdc", 4 * MiB, 256 * KiB, 0xA1)
    td.write_pattern("vdd", 8 * MiB, 256 * KiB, 0xA2)
    td.write_pattern("sda", 0, 64 * KiB, 0xA3)
    td.write_pattern("sdb", 60 * MiB, 64 * KiB, 0xA4)

    # A loop device's writes sit in its page cache until the guest flushes...
    td.flush("vdc")
    assert image_has_pattern(td.disk_paths["vdc"], 4 * MiB, 256 * KiB, 0xA1, "raw")
    # ...an NBD write is in the served file once acknowledged.
    assert image_has_pattern(td.disk_paths["vdd"], 8 * MiB, 256 * KiB, 0xA2, "raw")

    td.destroy()  # QEMU closes the loop device: the rest reaches the backing file
    assert td.find() is None
    assert image_has_pattern(td.disk_paths["sda"], 0, 64 * KiB, 0xA3, "raw")
    assert image_has_pattern(td.disk_paths["sdb"], 60 * MiB, 64 * KiB, 0xA4, "raw")
    assert not image_has_pattern(td.disk_paths["vdc"], 0, 4096, 0xA1, "raw")
    assert not image_has_pattern(td.disk_paths["sdb"], 0, 4096, 0xA4, "raw")

    # Loop devices and (persistent) NBD servers outlive the domain: it can come back.
    td.recreate()
    assert td.guest_has_pattern("vdc", 4 * MiB, 256 * KiB, 0xA1)
    assert td.guest_has_pattern("sdb", 60 * MiB, 64 * KiB, 0xA4)


def test_cleanup_releases_loop_devices_and_nbd_servers(
    virt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    made: list[TestDomain] = []
    with pytest.raises(RuntimeError, match="the test failed here"):
        try:
            td = make_domain(
                virt_conn,
                tmp_path,
                persistent=False,
                disks=[DiskSpec("vdc", kind="block"), DiskSpec("sdb", "scsi", kind="nbd")],
                registry=made,
            )
            dev = td.block_devices["vdc"]
            server = td.nbd_servers["sdb"]
            assert _bed_loops(tmp_path) == [f"{dev} {td.disk_paths['vdc']}"]
            assert _bed_nbd_pids(tmp_path) == {server.pid}
            td.write_pattern("sdb", 0, 4096, 0x5B)
            td.crash()  # cleanup must cope with a domain that is already gone
            assert td.find() is None
            raise RuntimeError("the test failed here")
        finally:
            for made_td in made:
                made_td.cleanup()
    assert not _bed_loops(tmp_path)
    assert not _bed_nbd_pids(tmp_path)
    assert server.process.returncode is not None  # stopped and reaped by the bed
    assert not td.block_devices
    assert not td.workdir.exists()
    td.cleanup()  # idempotent


def test_failed_creation_releases_loop_devices_and_nbd_servers(
    virt_conn: libvirt.virConnect, tmp_path: Path
) -> None:
    # libvirt rejects the last disk only after the loop device and qemu-nbd exist.
    disks = [DiskSpec("vdc", kind="block"), DiskSpec("vdd", kind="nbd"), DiskSpec("xyz", "scsi")]
    with pytest.raises(libvirt.libvirtError, match="xyz"):
        make_domain(virt_conn, tmp_path, persistent=False, disks=disks)
    assert not _bed_loops(tmp_path)
    assert not _bed_nbd_pids(tmp_path)
    assert not list(tmp_path.iterdir())
