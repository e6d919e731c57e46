"""agent.backup.whole_vm.definition: the recorded domain XML rewritten for a restore
(pure; the restore itself is tests/test_restore_vm_live.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from agent.backup.whole_vm import WholeVmError, definition
from agent.repository.manifest import DiskManifest, ExcludedDisk, Manifest

XML = """<domain type='kvm'>
  <name>web01</name>
  <uuid>6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11</uuid>
  <memory unit='KiB'>65536</memory>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web01.raw'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web01-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/shared.raw'/>
      <target dev='vdc' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/srv/iso/install.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>"""


def _disk(target: str) -> DiskManifest:
    return DiskManifest(
        target=target,
        image=f"{target}.qcow2",
        mode="full",
        reason="first-backup",
        virtual_size=1 << 20,
        bytes_copied=0,
        backing=None,
        checksums=(),
    )


def _manifest(xml: str = XML, disks: tuple[str, ...] = ("vda", "vdb")) -> Manifest:
    return Manifest(
        backup_id="20261204T000000Z-000001",
        domain="web01",
        domain_uuid="6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11",
        created_at=0.0,
        completed_at=1.0,
        parent=None,
        checkpoint="cp",
        checkpoint_xml="<domaincheckpoint/>",
        domain_xml=xml,
        disks=tuple(_disk(t) for t in disks),
        excluded=(ExcludedDisk("vdc", "shareable"), ExcludedDisk("sda", "device-cdrom")),
    )


def _disks(xml: str) -> dict[str, etree._Element]:
    root = etree.fromstring(xml.encode())
    return {d.find("target").get("dev"): d for d in root.findall("devices/disk")}


def test_each_backed_up_disk_points_at_its_restored_image_and_the_rest_is_decided() -> None:
    plan = definition(_manifest(), to=Path("/restore"), fmt="qcow2")
    assert plan.name == "web01"
    assert plan.uuid == "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"  # its own name: its own UUID
    assert plan.images == {
        "vda": Path("/restore/web01-vda.qcow2"),
        "vdb": Path("/restore/web01-vdb.qcow2"),
    }
    disks = _disks(plan.xml)
    for target in ("vda", "vdb"):
        disk = disks[target]
        assert disk.get("type") == "file"  # (vdb was a block device)
        assert disk.find("source").attrib == {"file": f"/restore/web01-{target}.qcow2"}
        assert disk.find("driver").get("type") == "qcow2"
        assert disk.find("backingStore") is None
    assert disks["vda"].find("driver").get("discard") == "unmap"  # the rest of it kept
    # The shareable disk is in no backup and writable: left out. The CD-ROM drive stays,
    # empty (which host file it read is not taken from a manifest).
    assert "vdc" not in disks
    assert disks["sda"].find("source") is None
    assert plan.left_out == (("vdc", "shareable"),)
    root = etree.fromstring(plan.xml.encode())
    assert root.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"


def test_a_new_name_gets_no_uuid_and_no_mac_so_libvirt_makes_new_ones() -> None:
    plan = definition(_manifest(), name="web01-restored", to=Path("/r"), fmt="raw")
    assert plan.uuid is None
    root = etree.fromstring(plan.xml.encode())
    assert root.findtext("name") == "web01-restored"
    assert root.find("uuid") is None
    assert root.find("devices/interface/mac") is None
    assert root.find("devices/interface/source").get("network") == "default"
    assert plan.images["vda"] == Path("/r/web01-restored-vda.raw")


def test_without_a_directory_an_image_goes_beside_where_the_disk_was() -> None:
    plan = definition(_manifest(disks=("vda",)), fmt="qcow2")
    assert plan.images == {"vda": Path("/var/lib/libvirt/images/web01-vda.qcow2")}
    # A disk that was no file (vdb, a block device) needs a directory given.
    with pytest.raises(WholeVmError, match=r"disk vdb was not an image file.*--to DIR"):
        definition(_manifest(), fmt="qcow2")


@pytest.mark.parametrize(
    ("xml", "says"),
    [
        ("<domain/>", "recorded no domain definition"),
        ("<domaincheckpoint><name>x</name></domaincheckpoint>", "is not a <domain>"),
        ("<domain><name>web01</name><devices/></domain>", "has no disk vda, vdb"),
    ],
)
def test_a_definition_that_cannot_serve_is_refused(xml: str, says: str) -> None:
    with pytest.raises(WholeVmError, match=says):
        definition(_manifest(xml), to=Path("/r"))


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "x\ny"])
def test_a_name_that_could_leave_the_directory_is_refused(name: str) -> None:
    """The name is part of each image's file name: asked for or recorded, it must not
    lead out of the directory."""
    with pytest.raises(WholeVmError, match="domain name"):
        definition(_manifest(), name=name, to=Path("/r"))
    recorded = XML.replace("<name>web01</name>", f"<name>{name}</name>")
    with pytest.raises(WholeVmError, match="domain name"):
        definition(_manifest(recorded), to=Path("/r"))


HOSTILE = (
    XML.replace(
        "<devices>",
        """<devices>
    <emulator>/tmp/evil</emulator>
    <serial type='file'><source path='/etc/cron.d/x'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='/run/other.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <hostdev mode='subsystem' type='pci'/>
    <filesystem type='mount'><source dir='/'/><target dir='host'/></filesystem>
    <graphics type='vnc' port='5901' autoport='no'/>
    <disk type='block' device='disk'><source dev='/dev/sda'/><target dev='vdz'/><readonly/></disk>
    <disk type='file' device='floppy'><source file='/srv/floppy.img'/><target dev='fda'/></disk>""",
    )
    .replace(
        "<memory unit='KiB'>65536</memory>",
        """<memory unit='KiB'>65536</memory>
  <genid>43dc0cf8-809b-4adb-9bea-a9abb5f3d90d</genid>
  <os><type>hvm</type><kernel>/etc/shadow</kernel><nvram>/var/lib/libvirt/qemu/nvram/web01_VARS.fd</nvram></os>
  <sysinfo type='smbios'><system>
    <entry name='uuid'>6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11</entry></system></sysinfo>
  <seclabel type='none'/>""",
    )
    .replace(
        "<domain type='kvm'>",
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
    )
    .replace(
        "</devices>", "</devices><qemu:commandline><qemu:arg value='-evil'/></qemu:commandline>"
    )
)


def test_nothing_of_a_recorded_definition_runs_programs_or_opens_host_paths() -> None:
    """A manifest may have been written elsewhere: its definition names no emulator, host
    device, host directory, file or socket path, boot file, security label or QEMU
    argument of its own; what must exist gets libvirt's defaults."""
    plan = definition(_manifest(HOSTILE), name="web02", to=Path("/r"))
    text = plan.xml
    for needle in (
        "/tmp/evil",
        "/etc/cron.d",
        "/run/other.sock",
        "/dev/sda",
        "/etc/shadow",
        "hostdev",
        "filesystem",
        "seclabel",
        "commandline",
        "-evil",
        "floppy",
        "web01_VARS",
        "5901",
        "43dc0cf8",
        "6b0bb1c1",
    ):
        assert needle not in text, needle
    root = etree.fromstring(text.encode())
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/channel/target").get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/graphics").get("autoport") == "yes"
    assert root.find("os/nvram") is not None  # (a VARS file of its own, from the template)
    assert ("vdz", "not in the backup") in plan.left_out
    assert ("fda", "not in the backup") in plan.left_out
