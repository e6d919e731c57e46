"""Tests for agent.virt.inventory: disk parsing, backup eligibility, and disk identity."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from lxml import etree

from agent.core.errors import InventoryError
from agent.virt.inventory import (
    Disk,
    DiskIdentity,
    DomainInfo,
    DomainState,
    parse_disks,
    parse_domain,
    probe_inode,
)

DATA = Path(__file__).parent / "data" / "domains"
TB1_RUNNING = (DATA / "tb1_running.xml").read_text()
TB1_CHECKPOINT = (DATA / "tb1_checkpoint.xml").read_text()
ASSORTED = (DATA / "assorted.xml").read_bytes()


def _by_target(disks: tuple[Disk, ...]) -> dict[str, Disk]:
    return {d.target: d for d in disks}


# --- the real libvirt 9.0 running domain -------------------------------------------------


def test_running_domain_disks_in_document_order() -> None:
    disks = parse_disks(TB1_RUNNING)
    assert [d.target for d in disks] == ["vda", "sda"]


def test_running_domain_vda_fields() -> None:
    vda = parse_disks(TB1_RUNNING)[0]
    assert vda == Disk(
        target="vda",
        bus="virtio",
        device="disk",
        source_type="file",
        source="/tmp/tb/a.qcow2",
        format="qcow2",
        alias="virtio-disk0",
        serial="SER-A",
        wwn=None,
        readonly=False,
        backing_chain=("/tmp/tb/base.qcow2",),
        unsupported_reason=None,
        capacity=None,
        identity=DiskIdentity("file", "/tmp/tb/a.qcow2", "SER-A", None),
    )
    assert vda.backup_capable


def test_running_domain_sda_has_no_serial_and_empty_chain() -> None:
    sda = parse_disks(TB1_RUNNING)[1]
    assert (sda.bus, sda.alias, sda.source) == ("scsi", "scsi0-0-0-0", "/tmp/tb/b.qcow2")
    assert sda.serial is None
    # `<backingStore/>` alone is the chain terminator, not a layer.
    assert sda.backing_chain == ()
    assert sda.identity == DiskIdentity("file", "/tmp/tb/b.qcow2", None, None)


def test_parse_domain_reads_name_uuid_and_keeps_given_facts() -> None:
    info = parse_domain(TB1_RUNNING, persistent=False, state=DomainState.PAUSED)
    assert info.name == "tb1"
    assert info.uuid == "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"
    assert info.persistent is False
    assert info.state is DomainState.PAUSED
    assert info.disk("sda") is info.disks[1]
    assert info.disk("vdz") is None


def test_backup_disks_excludes_unsupported_keeping_order() -> None:
    info = parse_domain(ASSORTED, persistent=True, state=DomainState.SHUTOFF)
    assert [d.target for d in info.backup_disks] == ["vda", "vdc", "sdc"]


# --- a checkpoint document ---------------------------------------------------------------


def test_checkpoint_document_yields_the_embedded_domain_disks() -> None:
    # Not the checkpoint's own <disks name='vda' .../> list: those are not devices.
    assert parse_disks(TB1_CHECKPOINT) == parse_disks(TB1_RUNNING)


def test_checkpoint_identity_matches_live_disk_probed_later() -> None:
    saved = parse_disks(TB1_CHECKPOINT)[0].identity
    live = parse_disks(TB1_RUNNING)[0].with_inode((2049, 1234)).identity
    assert saved is not None and live is not None
    assert saved.same_image(live)


def test_parse_domain_accepts_checkpoint_document() -> None:
    info = parse_domain(TB1_CHECKPOINT, persistent=True, state=DomainState.RUNNING)
    assert (info.name, len(info.disks)) == ("tb1", 2)


def test_checkpoint_without_domain_is_an_error() -> None:
    xml = "<domaincheckpoint><name>cp1</name><disks/></domaincheckpoint>"
    with pytest.raises(InventoryError, match="no <domain>") as info:
        parse_disks(xml, domain="tb1")
    assert info.value.domain == "tb1"


def test_unexpected_root_element_is_an_error() -> None:
    with pytest.raises(InventoryError, match="domainsnapshot"):
        parse_disks("<domainsnapshot><name>s</name></domainsnapshot>")


# --- every kind of disk ------------------------------------------------------------------

# target -> (device, source_type, source, format, unsupported_reason)
ASSORTED_CASES = {
    "vda": ("disk", "file", "/var/lib/libvirt/images/a.qcow2", "qcow2", None),
    "vdb": ("disk", "file", "/var/lib/libvirt/images/b.img", "raw", "format-raw"),
    "vdc": ("disk", "block", "/dev/vg/lv", "qcow2", None),
    "vdd": ("disk", "file", "/var/lib/libvirt/images/d.img", None, "format-unknown"),
    "hda": ("cdrom", "file", "/srv/iso/install.iso", "raw", "device-cdrom"),
    "hdb": ("cdrom", "file", None, "raw", "device-cdrom"),
    "fda": ("floppy", "file", "/srv/floppy.img", "raw", "device-floppy"),
    "vde": ("disk", "file", "/var/lib/libvirt/images/e.qcow2", "qcow2", "readonly"),
    "vdf": ("disk", "network", "rbd:pool/img", "raw", "source-network"),
    "vdg": ("disk", "volume", "default/v1", "qcow2", "source-volume"),
    "sdb": ("lun", "block", "/dev/sdx", "raw", "device-lun"),
    "vdh": ("disk", "file", "/var/lib/libvirt/images/h.qcow2", "qcow2", "transient-disk"),
    "vdi": ("disk", "file", "/var/lib/libvirt/images/i.qcow2", "qcow2", "shareable"),
    "vdj": ("disk", "file", "/var/lib/libvirt/images/j.img", "raw", "transient-disk"),
    "vdk": ("disk", "file", None, "raw", "source-empty"),
    "vdl": ("disk", "network", None, "raw", "readonly"),
    "vdm": ("disk", "dir", "/srv/share", "fat", "source-dir"),
    "vdn": ("disk", "nvme", "0x0000:0x01:0x00.0x0/ns1", "raw", "source-nvme"),
    "vdo": ("disk", "vhostuser", "/tmp/vhost-blk.sock", "raw", "source-vhostuser"),
    "sdc": ("disk", "file", "/var/lib/libvirt/images/top.qcow2", "qcow2", None),
}


def test_assorted_fixture_covers_exactly_the_table() -> None:
    assert [d.target for d in parse_disks(ASSORTED)] == list(ASSORTED_CASES)


@pytest.mark.parametrize("target", list(ASSORTED_CASES))
def test_assorted_disk(target: str) -> None:
    disk = _by_target(parse_disks(ASSORTED))[target]
    device, source_type, source, image_format, reason = ASSORTED_CASES[target]
    assert (disk.device, disk.source_type, disk.source, disk.format) == (
        device,
        source_type,
        source,
        image_format,
    )
    assert disk.unsupported_reason == reason
    assert disk.backup_capable is (reason is None)
    # Identity exists exactly for backup-capable disks.
    assert (disk.identity is not None) is (reason is None)
    # An inactive definition has no aliases.
    assert disk.alias is None


def test_serial_wwn_and_readonly_flags() -> None:
    disks = _by_target(parse_disks(ASSORTED))
    vda = disks["vda"]
    assert (vda.serial, vda.wwn) == ("SER-VDA", "5000c50015ea71ac")
    assert vda.identity == DiskIdentity(
        "file", "/var/lib/libvirt/images/a.qcow2", "SER-VDA", "5000c50015ea71ac"
    )
    assert [t for t, d in disks.items() if d.readonly] == ["hda", "hdb", "vde", "vdl"]


def test_block_disk_identity_and_buses() -> None:
    disks = _by_target(parse_disks(ASSORTED))
    assert disks["vdc"].identity == DiskIdentity("block", "/dev/vg/lv", None, None)
    assert (disks["hda"].bus, disks["fda"].bus, disks["sdc"].bus) == ("ide", "fdc", "sata")


def test_backing_chain_mixes_block_and_file_top_down() -> None:
    sdc = _by_target(parse_disks(ASSORTED))["sdc"]
    assert sdc.backing_chain == ("/dev/vg/mid", "/srv/golden/base.img")


def test_network_disk_without_name_is_located_by_host() -> None:
    xml = """<domain><name>n</name><devices><disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd'><host name='nbd.example.org' port='10809'/></source>
      <target dev='vda' bus='virtio'/></disk></devices></domain>"""
    disk = parse_disks(xml)[0]
    assert disk.source == "nbd://nbd.example.org:10809"
    assert disk.unsupported_reason == "source-network"


def test_missing_type_and_device_default_like_libvirt() -> None:
    xml = """<domain><name>d</name><devices><disk>
      <driver name='qemu' type='qcow2'/><source file='/x.qcow2'/><target dev='vda'/>
      </disk></devices></domain>"""
    disk = parse_disks(xml)[0]
    assert (disk.source_type, disk.device, disk.bus) == ("file", "disk", None)
    assert disk.backup_capable


def test_domain_without_devices_has_no_disks() -> None:
    assert parse_disks("<domain><name>d</name></domain>") == ()


def test_str_with_encoding_declaration_and_bytes_parse_the_same() -> None:
    assert parse_disks(ASSORTED.decode()) == parse_disks(ASSORTED)


# --- copies -------------------------------------------------------------------------------


def test_with_capacity_and_with_inode_return_copies() -> None:
    vda = parse_disks(TB1_RUNNING)[0]
    sized = vda.with_capacity(10 * 2**30).with_inode((8, 42))
    assert sized.capacity == 10 * 2**30
    assert sized.identity is not None and sized.identity.inode == (8, 42)
    assert sized.identity.path == "/tmp/tb/a.qcow2"
    # The original is untouched.
    assert vda.capacity is None
    assert vda.identity is not None and vda.identity.inode is None


def test_with_inode_on_unsupported_disk() -> None:
    cdrom = _by_target(parse_disks(ASSORTED))["hda"]
    assert cdrom.with_inode(None) is cdrom
    with pytest.raises(ValueError, match="hda"):
        cdrom.with_inode((1, 2))


# --- identity -----------------------------------------------------------------------------

BASE = DiskIdentity("file", "/img/a.qcow2", "S1", "5000c500", (10, 100))


@pytest.mark.parametrize(
    ("other", "same"),
    [
        pytest.param(
            DiskIdentity("file", "/img/a.qcow2", "S1", "5000c500", (10, 100)), True, id="identical"
        ),
        pytest.param(
            DiskIdentity("file", "/img/a.qcow2", "S1", "5000c500", (10, 101)),
            False,
            id="same-path-other-inode",
        ),
        pytest.param(
            DiskIdentity("file", "/img/a.qcow2", "S1", "5000c500", (11, 100)),
            False,
            id="same-inode-other-filesystem",
        ),
        pytest.param(
            DiskIdentity("file", "/img/a.qcow2", "S1", "5000c500", None), True, id="inode-unknown"
        ),
        pytest.param(
            DiskIdentity("file", "/img/a.qcow2", "S2", "5000c500", None),
            False,
            id="other-serial-inode-unknown",
        ),
        pytest.param(
            DiskIdentity("file", "/img/a.qcow2", None, "5000c500", (10, 100)),
            False,
            id="serial-removed",
        ),
        pytest.param(
            DiskIdentity("file", "/img/a.qcow2", "S1", "5000c501", (10, 100)), False, id="other-wwn"
        ),
        pytest.param(
            DiskIdentity("file", "/img/b.qcow2", "S1", "5000c500", (10, 100)),
            False,
            id="other-path-same-inode",
        ),
        pytest.param(
            DiskIdentity("block", "/img/a.qcow2", "S1", "5000c500", (10, 100)),
            False,
            id="other-type",
        ),
    ],
)
def test_same_image(other: DiskIdentity, same: bool) -> None:
    assert BASE.same_image(other) is same
    assert other.same_image(BASE) is same


def test_same_image_with_inode_unknown_on_both_sides() -> None:
    a = DiskIdentity("file", "/img/a.qcow2", None, None)
    assert a.same_image(DiskIdentity("file", "/img/a.qcow2", None, None))
    assert not a.same_image(DiskIdentity("file", "/img/b.qcow2", None, None))


def test_key_format() -> None:
    assert BASE.key() == "file:/img/a.qcow2|serial=S1|wwn=5000c500|ino=10:100"
    assert DiskIdentity("block", "/dev/vg/lv", None, None).key() == "block:/dev/vg/lv"
    assert DiskIdentity("file", "/x", None, "W").key() == "file:/x|wwn=W"


def test_key_is_deterministic_across_parses() -> None:
    keys = {d.identity.key() for d in parse_disks(TB1_RUNNING)[:1] if d.identity}
    keys |= {d.identity.key() for d in parse_disks(TB1_CHECKPOINT)[:1] if d.identity}
    assert keys == {"file:/tmp/tb/a.qcow2|serial=SER-A"}


def test_key_distinguishes_inode() -> None:
    assert BASE.key() != DiskIdentity("file", "/img/a.qcow2", "S1", "5000c500", (10, 101)).key()


def test_key_escapes_separators_unambiguously() -> None:
    # Without escaping, both would read "file:/a|serial=b".
    tricky = DiskIdentity("file", "/a|serial=b", None, None)
    plain = DiskIdentity("file", "/a", "b", None)
    assert tricky.key() != plain.key()
    assert "\n" not in DiskIdentity("file", "/a\nb", "x%7Cy", None).key()


@pytest.mark.parametrize(
    "identity",
    [
        BASE,
        DiskIdentity("block", "/dev/vg/lv", None, None, (0, 64768)),
        DiskIdentity("file", "/a|serial=b", "x%7Cy|z", None),
        DiskIdentity("file", "/weird/p\u00e4th\nwith=eq:colon", "", "w w"),
    ],
)
def test_from_key_round_trips(identity: DiskIdentity) -> None:
    assert DiskIdentity.from_key(identity.key()) == identity


@pytest.mark.parametrize(
    "key",
    [
        "",
        "noseparator",
        ":/path",
        "file:/p|colour=red",
        "file:/p|serial",
        "file:/p|ino=1",
        "file:/p|ino=a:b",
        "file:/p|serial=a|serial=b",
    ],
)
def test_from_key_rejects_malformed(key: str) -> None:
    with pytest.raises(InventoryError, match="malformed"):
        DiskIdentity.from_key(key)


# --- probe_inode --------------------------------------------------------------------------


def test_probe_inode_detects_recreated_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"old")
    identity = DiskIdentity("file", str(path), None, None)
    before = probe_inode(identity)
    st = path.stat()
    assert before == (st.st_dev, st.st_ino)
    # Keep the old inode allocated while the new file is created, so the filesystem
    # cannot hand the same inode number back.
    with path.open("rb"):
        path.unlink()
        path.write_bytes(b"new")
        after = probe_inode(identity)
    assert after is not None and after != before
    old_side = DiskIdentity("file", str(path), None, None, before)
    assert not old_side.same_image(DiskIdentity("file", str(path), None, None, after))


def test_probe_inode_is_stable_for_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"x")
    identity = DiskIdentity("file", str(path), None, None)
    path.write_bytes(b"rewritten in place")
    assert probe_inode(identity) == probe_inode(identity) is not None


def test_probe_inode_follows_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "real.qcow2"
    target.write_bytes(b"x")
    link = tmp_path / "link.qcow2"
    link.symlink_to(target)
    st = target.stat()
    assert probe_inode(DiskIdentity("file", str(link), None, None)) == (st.st_dev, st.st_ino)


def test_probe_inode_missing_path(tmp_path: Path) -> None:
    assert probe_inode(DiskIdentity("file", str(tmp_path / "gone.qcow2"), None, None)) is None
    # A path "through" a regular file is as missing as an absent one.
    (tmp_path / "f").write_bytes(b"")
    assert probe_inode(DiskIdentity("file", str(tmp_path / "f" / "x"), None, None)) is None


def test_probe_inode_block_device_uses_rdev(tmp_path: Path) -> None:
    # Runs as root (the test bed needs it anyway), so a device node of our own will do.
    device = tmp_path / "disk0"
    os.mknod(device, stat.S_IFBLK | 0o600, os.makedev(7, 200))
    assert probe_inode(DiskIdentity("block", str(device), None, None)) == (
        0,
        os.makedev(7, 200),
    )


# --- domain state -------------------------------------------------------------------------


def test_domain_state_values_match_libvirt() -> None:
    assert [s.value for s in DomainState] == list(range(8))
    assert DomainState.from_libvirt(1) is DomainState.RUNNING
    assert DomainState.from_libvirt(5) is DomainState.SHUTOFF
    assert DomainState.from_libvirt(7) is DomainState.PMSUSPENDED
    assert DomainState.from_libvirt(99) is DomainState.NOSTATE
    assert DomainState.from_libvirt(-1) is DomainState.NOSTATE


def test_domain_state_active() -> None:
    inactive = {s for s in DomainState if not s.active}
    assert inactive == {DomainState.NOSTATE, DomainState.SHUTOFF}


def test_domain_info_is_frozen() -> None:
    info = parse_domain(TB1_RUNNING, persistent=True, state=DomainState.RUNNING)
    assert isinstance(info, DomainInfo)
    with pytest.raises(AttributeError):
        info.name = "other"  # type: ignore[misc]


# --- errors and hostile input -------------------------------------------------------------


def test_syntax_error_wraps_lxml_error() -> None:
    with pytest.raises(InventoryError, match="not well-formed") as info:
        parse_disks("<domain><devices><disk></devices></domain>", domain="tb1")
    assert info.value.domain == "tb1"
    assert isinstance(info.value.__cause__, etree.XMLSyntaxError)


@pytest.mark.parametrize("xml", ["", b"", "not xml"])
def test_empty_or_non_xml_input(xml: str | bytes) -> None:
    with pytest.raises(InventoryError):
        parse_disks(xml)


def test_missing_target_names_the_domain() -> None:
    xml = TB1_RUNNING.replace("<target dev='sda' bus='scsi'/>", "")
    with pytest.raises(InventoryError, match="target") as info:
        parse_disks(xml)
    assert info.value.domain == "tb1"


def test_target_without_dev_is_an_error() -> None:
    xml = TB1_RUNNING.replace("<target dev='sda' bus='scsi'/>", "<target bus='scsi'/>")
    with pytest.raises(InventoryError) as info:
        parse_disks(xml, domain="given-name")
    assert info.value.domain == "given-name"


def test_parse_domain_requires_name_and_uuid() -> None:
    with pytest.raises(InventoryError, match="<name>"):
        parse_domain("<domain><uuid>u</uuid></domain>", persistent=True, state=DomainState.SHUTOFF)
    with pytest.raises(InventoryError, match="<uuid>") as info:
        parse_domain("<domain><name>n</name></domain>", persistent=True, state=DomainState.SHUTOFF)
    assert info.value.domain == "n"


def test_external_entity_is_not_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET-CONTENT")
    for uri in (secret.as_uri(), "file:///etc/passwd"):
        xml = (
            f'<!DOCTYPE domain [<!ENTITY x SYSTEM "{uri}">]>'
            "<domain><name>evil</name><devices><disk type='file' device='disk'>"
            "<driver name='qemu' type='qcow2'/><source file='/x.qcow2'/>"
            "<target dev='vda'/><serial>&x;</serial></disk></devices></domain>"
        )
        disk = parse_disks(xml)[0]
        assert disk.serial is None
        assert "TOP-SECRET" not in repr(disk)
        assert "root:" not in repr(disk)


def test_internal_entities_are_not_expanded() -> None:
    # "Billion laughs": expanding would need gigabytes; it must be refused or ignored.
    levels = ['<!ENTITY l0 "lol">'] + [
        f'<!ENTITY l{i} "{f"&l{i - 1};" * 10}">' for i in range(1, 10)
    ]
    xml = (
        f"<!DOCTYPE domain [{''.join(levels)}]>"
        "<domain><name>evil</name><devices><disk type='file' device='disk'>"
        "<driver name='qemu' type='qcow2'/><source file='/x.qcow2'/>"
        "<target dev='vda'/><serial>&l9;</serial></disk></devices></domain>"
    )
    try:
        disks = parse_disks(xml)
    except InventoryError:
        return
    assert disks[0].serial is None


# --- what a backup does with each disk ----------------------------------------------------

# target -> (full_only, excluded_reason, writable)
ASSORTED_COVERAGE = {
    "vda": (False, None, True),
    "vdb": (True, None, True),  # raw file: read in full
    "vdc": (False, None, True),
    "vdd": (True, None, True),  # format-unknown file: read in full as well
    "hda": (False, "device-cdrom", False),
    "hdb": (False, "device-cdrom", False),
    "fda": (False, "device-floppy", False),
    "vde": (False, "readonly", False),
    "vdf": (True, None, True),  # rbd: QEMU reads it for the backup
    "vdg": (False, "source-volume", True),
    "sdb": (False, "device-lun", True),
    "vdh": (False, "transient-disk", False),
    "vdi": (False, "shareable", True),
    "vdj": (False, "transient-disk", False),
    "vdk": (False, "source-empty", False),
    "vdl": (False, "readonly", False),
    "vdm": (False, "source-dir", True),
    "vdn": (False, "source-nvme", True),
    "vdo": (False, "source-vhostuser", True),
    "sdc": (False, None, True),
}


def test_coverage_table_matches_the_assorted_fixture() -> None:
    assert list(ASSORTED_COVERAGE) == list(ASSORTED_CASES)


@pytest.mark.parametrize("target", list(ASSORTED_COVERAGE))
def test_each_disk_is_backed_up_incrementally_in_full_or_excluded_with_a_reason(
    target: str,
) -> None:
    disk = _by_target(parse_disks(ASSORTED))[target]
    full_only, excluded, writable = ASSORTED_COVERAGE[target]
    assert (disk.full_only, disk.excluded_reason, disk.writable) == (full_only, excluded, writable)
    # Exactly one of the three.
    assert [disk.backup_capable, disk.full_only, disk.excluded_reason is not None].count(True) == 1
    if excluded is not None:
        assert excluded == disk.unsupported_reason


def test_backed_up_disks_are_the_capable_and_the_full_only_in_document_order() -> None:
    info = parse_domain(ASSORTED, persistent=True, state=DomainState.SHUTOFF)
    assert [d.target for d in info.backed_up_disks] == ["vda", "vdb", "vdc", "vdd", "vdf", "sdc"]
    assert [d.target for d in info.backup_disks] == ["vda", "vdc", "sdc"]


def _one_disk(kind: str, device: str, driver: str, source: str, extra: str = "") -> Disk:
    xml = (
        f"<domain><name>d</name><devices><disk type='{kind}' device='{device}'>"
        f"<driver name='qemu' type='{driver}'/>{source}<target dev='vdz' bus='virtio'/>"
        f"{extra}</disk></devices></domain>"
    )
    return parse_disks(xml)[0]


RAW_FILE = "<source file='/img/z.img'/>"
RAW_BLOCK = "<source dev='/dev/vg/z'/>"
NBD = "<source protocol='nbd' name='z'><host name='127.0.0.1' port='10809'/></source>"


@pytest.mark.parametrize(
    ("kind", "device", "driver", "source", "extra", "reason", "full_only"),
    [
        pytest.param("block", "disk", "raw", RAW_BLOCK, "", "format-raw", True, id="raw-block"),
        pytest.param("file", "disk", "raw", RAW_FILE, "", "format-raw", True, id="raw-file"),
        pytest.param("file", "disk", "vmdk", RAW_FILE, "", "format-vmdk", True, id="vmdk-file"),
        pytest.param("network", "disk", "raw", NBD, "", "source-network", True, id="nbd"),
        # A reason that leaves the disk out outranks the missing bitmap.
        pytest.param(
            "file", "disk", "raw", RAW_FILE, "<shareable/>", "shareable", False, id="raw-shared"
        ),
        pytest.param(
            "block", "disk", "raw", RAW_BLOCK, "<transient/>", "transient-disk", False, id="tr"
        ),
        pytest.param(
            "network", "disk", "raw", NBD, "<shareable/>", "shareable", False, id="nbd-shared"
        ),
        pytest.param("block", "disk", "raw", RAW_BLOCK, "<readonly/>", "readonly", False, id="ro"),
        pytest.param(
            "file", "disk", "qcow2", RAW_FILE, "<transient/><shareable/>", "transient-disk", False
        ),
        pytest.param("block", "lun", "raw", RAW_BLOCK, "", "device-lun", False, id="lun"),
        # Not a file or block device: no local image read in full either.
        pytest.param(
            "volume", "disk", "raw", "<source pool='p' volume='v'/>", "", "source-volume", False
        ),
    ],
)
def test_which_reason_wins_and_whether_the_disk_is_read_in_full(
    kind: str, device: str, driver: str, source: str, extra: str, reason: str, full_only: bool
) -> None:
    disk = _one_disk(kind, device, driver, source, extra)
    assert disk.unsupported_reason == reason
    assert disk.full_only is full_only
    assert disk.excluded_reason == (None if full_only else reason)
    assert not disk.backup_capable and disk.identity is None
