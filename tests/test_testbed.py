"""Checks that the real-libvirt test bed itself works, before agent tests rely on it.

Guest writes must really reach the images, hot-plug must change the live XML, a QEMU
crash must stop the domain, a libvirtd restart must leave running guests alone, and
cleanup must leave nothing behind.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import pytest

from tests.testbed import daemon
from tests.testbed.domains import (
    QEMU_LOG_DIR,
    DiskSpec,
    DomainFactory,
    image_has_pattern,
    kvm_available,
    make_domain,
)

pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024


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
    made: list = []
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
