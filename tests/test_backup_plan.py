"""Full or incremental per disk, and why (pure logic)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from agent.backup.job import Job
from agent.backup.libvirt_job import backup_xml, checkpoint_xml
from agent.backup.plan import (
    EXCLUDED_BY_CONFIG,
    BackupMode,
    BackupPlan,
    DiskCoverage,
    RepositoryTip,
    disk_coverage,
    layer_on,
    partial,
    plan_backup,
)
from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState, DiskChain
from agent.core.errors import BackupError
from agent.repository.blocks import BLOCK
from agent.repository.manifest import (
    DiskManifest,
    ExcludedDisk,
    Manifest,
    RangeChecksum,
    digest_of,
)
from agent.virt.inventory import DomainInfo, DomainState, parse_domain

UUID = "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"


def domain(*targets: str):
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='/img/{t}.qcow2'/><target dev='{t}' bus='scsi'/></disk>"
        for t in targets
    )
    disks += "<disk type='file' device='cdrom'><target dev='hdc' bus='sata'/><readonly/></disk>"
    xml = f"<domain><name>d1</name><uuid>{UUID}</uuid><devices>{disks}</devices></domain>"
    info = parse_domain(xml, persistent=True, state=DomainState.RUNNING)
    return info.__class__(
        info.uuid,
        info.name,
        info.persistent,
        info.state,
        tuple(d.with_capacity(1 << 30) if d.backup_capable else d for d in info.disks),
    )


def checkpoint(name: str, targets: tuple[str, ...], backed_up: bool = True) -> CheckpointRecord:
    return CheckpointRecord(
        domain="d1",
        domain_uuid=UUID,
        name=name,
        parent=None,
        born_parent=None,
        created_at=1,
        xml="<domaincheckpoint/>",
        disks=tuple(CheckpointDisk(t, name, f"file:/img/{t}.qcow2", 1 << 30) for t in targets),
        state=CheckpointState.ACTIVE,
        backed_up_at=1.0 if backed_up else None,
        seq=1,
    )


def broken(target: str, reason: str) -> DiskChain:
    return DiskChain("d1", target, False, reason, "", 0.0)


TIP = RepositoryTip("b1", "cp1", frozenset({"vda", "vdb"}))


def summary(plan) -> dict[str, tuple[str, str | None]]:
    return {d.target: (d.mode, d.reason) for d in plan.disks}


def test_first_backup_is_full_and_skips_incapable_disks() -> None:
    plan = plan_backup(domain("vda"), [], {}, None, BackupMode.AUTO)
    assert summary(plan) == {"vda": ("full", "first-backup")}
    assert plan.base is None and plan.parent_backup is None
    assert plan.disks[0].size == 1 << 30


def test_incremental_when_every_link_holds() -> None:
    plan = plan_backup(
        domain("vda", "vdb"), [checkpoint("cp1", ("vda", "vdb"))], {}, TIP, BackupMode.AUTO
    )
    assert summary(plan) == {"vda": ("incremental", None), "vdb": ("incremental", None)}
    assert plan.base == "cp1" and plan.parent_backup == "b1"
    assert {d.since for d in plan.disks} == {"cp1"}


def test_one_broken_disk_is_full_the_other_stays_incremental() -> None:
    chains = {"vdb": broken("vdb", "bitmap-inconsistent")}
    plan = plan_backup(
        domain("vda", "vdb"), [checkpoint("cp1", ("vda", "vdb"))], chains, TIP, BackupMode.AUTO
    )
    assert summary(plan) == {"vda": ("incremental", None), "vdb": ("full", "bitmap-inconsistent")}
    assert plan.base == "cp1"


def test_a_new_disk_is_full() -> None:
    plan = plan_backup(
        domain("vda", "vdb", "vdc"), [checkpoint("cp1", ("vda", "vdb"))], {}, TIP, BackupMode.AUTO
    )
    assert summary(plan)["vdc"] == ("full", "disk-added")


def test_a_disk_resized_or_replaced_since_the_base_is_full_though_no_event_said_so() -> None:
    """The ledger's chains are valid (no event told of the change); the plan itself
    compares each disk with what the base checkpoint recorded."""
    info = domain("vda", "vdb", "vdc")
    grown = info.disks[0].with_capacity((1 << 30) + (1 << 20))
    replaced = checkpoint("cp1", ("vda", "vdb", "vdc"))
    disks = list(replaced.disks)
    disks[2] = CheckpointDisk("vdc", "cp1", "file:/img/old-vdc.qcow2", 1 << 30)
    base = dataclasses.replace(replaced, disks=tuple(disks))
    info = dataclasses.replace(info, disks=(grown, *info.disks[1:]))
    tip = RepositoryTip("b1", "cp1", frozenset({"vda", "vdb", "vdc"}))
    plan = plan_backup(info, [base], {}, tip, BackupMode.AUTO)
    assert summary(plan) == {
        "vda": ("full", "disk-resized"),
        "vdb": ("incremental", None),
        "vdc": ("full", "disk-replaced"),
    }
    assert plan.disks[0].size == (1 << 30) + (1 << 20)
    with pytest.raises(BackupError, match="vda: disk-resized"):
        plan_backup(info, [base], {}, tip, BackupMode.INCREMENTAL)


def test_explicit_incremental_refuses_with_the_reasons() -> None:
    chains = {"vdb": broken("vdb", "disk-replaced")}
    with pytest.raises(BackupError) as raised:
        plan_backup(
            domain("vda", "vdb"),
            [checkpoint("cp1", ("vda", "vdb"))],
            chains,
            TIP,
            BackupMode.INCREMENTAL,
        )
    assert raised.value.code == "chain-broken"
    assert "vdb: disk-replaced" in str(raised.value)


def test_full_requested_and_drift_and_unbacked_base() -> None:
    records = [checkpoint("cp1", ("vda",))]
    assert summary(plan_backup(domain("vda"), records, {}, TIP, BackupMode.FULL)) == {
        "vda": ("full", "full-requested")
    }
    drifted = RepositoryTip("b1", "cp0", frozenset({"vda"}))
    assert summary(plan_backup(domain("vda"), records, {}, drifted, BackupMode.AUTO)) == {
        "vda": ("full", "repository-drift")
    }
    pending = [checkpoint("cp1", ("vda",), backed_up=False)]
    assert summary(plan_backup(domain("vda"), pending, {}, TIP, BackupMode.AUTO)) == {
        "vda": ("full", "first-backup")
    }


def test_no_capable_disk_is_an_error() -> None:
    with pytest.raises(BackupError) as raised:
        plan_backup(domain(), [], {}, None, BackupMode.AUTO)
    assert raised.value.code == "no-disks" and "hdc: device-cdrom" in str(raised.value)


# --- a damaged repository ------------------------------------------------------------


def test_a_disk_whose_repository_chain_is_damaged_is_full_the_other_stays_incremental() -> None:
    tip = dataclasses.replace(TIP, broken={"vdb": "image .../vdb.qcow2 is missing"})
    records = [checkpoint("cp1", ("vda", "vdb"))]
    plan = plan_backup(domain("vda", "vdb"), records, {}, tip, BackupMode.AUTO)
    assert summary(plan) == {"vda": ("incremental", None), "vdb": ("full", "repository-damaged")}
    # The increment sits on the tip's sound image only; the broken disk starts anew.
    assert plan.parent_backup == "b1" and plan.base == "cp1"
    assert [d.since for d in plan.disks] == ["cp1", None]
    with pytest.raises(BackupError, match="vdb: repository-damaged") as raised:
        plan_backup(domain("vda", "vdb"), records, {}, tip, BackupMode.INCREMENTAL)
    assert raised.value.code == "chain-broken"
    # Damage outranks drift (it is why the tip is not the newest): said as what it is.
    drifted = dataclasses.replace(tip, checkpoint="cp0")
    assert summary(plan_backup(domain("vda", "vdb"), records, {}, drifted, BackupMode.AUTO)) == {
        "vda": ("full", "repository-drift"),
        "vdb": ("full", "repository-damaged"),
    }


def test_a_damaged_backup_newer_than_the_tip_makes_every_disk_full() -> None:
    records = [checkpoint("cp1", ("vda", "vdb"))]
    why = "manifest .../manifest.json: not JSON"
    plan = plan_backup(domain("vda", "vdb"), records, {}, TIP, BackupMode.AUTO, damaged=why)
    assert summary(plan) == {
        "vda": ("full", "repository-damaged"),
        "vdb": ("full", "repository-damaged"),
    }
    assert plan.parent_backup is None and plan.base is None
    # Also when no manifest of the domain reads at all (no tip), and not over a request.
    alone = plan_backup(domain("vda"), records, {}, None, BackupMode.AUTO, damaged=why)
    assert summary(alone) == {"vda": ("full", "repository-damaged")}
    asked = plan_backup(domain("vda"), records, {}, TIP, BackupMode.FULL, damaged=why)
    assert summary(asked) == {"vda": ("full", "full-requested")}
    with pytest.raises(BackupError, match="vda: repository-damaged"):
        plan_backup(domain("vda"), records, {}, TIP, BackupMode.INCREMENTAL, damaged=why)


# --- disks with no bitmap, and disks left out ---------------------------------------------

GiB = 1 << 30
QCOW2 = "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/{t}.qcow2'/><target dev='{t}' bus='virtio'/></disk>"  # noqa: E501
RAW = "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/{t}.img'/><target dev='{t}' bus='virtio'/>{x}</disk>"  # noqa: E501
LV = "<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/{t}'/><target dev='{t}' bus='virtio'/></disk>"  # noqa: E501
CDROM = "<disk type='file' device='cdrom'><target dev='{t}' bus='sata'/><readonly/></disk>"


def mixed(*disks: str, capacity: int = GiB) -> DomainInfo:
    """A domain of the given disks (``QCOW2.format(t='vda')``, ...), each of ``capacity``."""
    xml = f"<domain><name>d1</name><uuid>{UUID}</uuid><devices>{''.join(disks)}</devices></domain>"
    info = parse_domain(xml, persistent=True, state=DomainState.RUNNING)
    return dataclasses.replace(info, disks=tuple(d.with_capacity(capacity) for d in info.disks))


def every_kind() -> DomainInfo:
    """vda qcow2, vdb raw file, vdc raw LVM volume, vdd shareable raw, hdc CD-ROM."""
    return mixed(
        QCOW2.format(t="vda"),
        RAW.format(t="vdb", x=""),
        LV.format(t="vdc"),
        RAW.format(t="vdd", x="<shareable/>"),
        CDROM.format(t="hdc"),
    )


NO_BITMAP = "format-raw: no persistent bitmap"
RECORDS = [checkpoint("cp1", ("vda",))]


def layering(layerable: dict[str, int], **kwargs: Any) -> RepositoryTip:
    return RepositoryTip(
        "b1", "cp1", frozenset({"vda", "vdb", "vdc"}), layerable=layerable, **kwargs
    )


def kinds(plan: BackupPlan) -> dict[str, tuple[str, str | None, bool, bool]]:
    return {d.target: (d.mode, d.reason, d.bitmap, d.layered) for d in plan.disks}


def test_raw_disks_are_read_in_full_standalone_at_first_and_the_reason_says_why() -> None:
    plan = plan_backup(every_kind(), [], {}, None, BackupMode.AUTO)
    assert kinds(plan) == {
        "vda": ("full", "first-backup", True, False),
        "vdb": ("full", NO_BITMAP, False, False),
        "vdc": ("full", NO_BITMAP, False, False),
    }
    assert [d.target for d in plan.disks] == ["vda", "vdb", "vdc"]  # document order
    assert plan.excluded == (ExcludedDisk("vdd", "shareable"), ExcludedDisk("hdc", "device-cdrom"))
    assert {d.size for d in plan.disks} == {GiB}
    assert plan.base is None and plan.parent_backup is None


def test_raw_disks_are_layered_on_the_tip_while_the_qcow2_disk_stays_incremental() -> None:
    tip = layering({"vdb": GiB, "vdc": GiB})
    plan = plan_backup(every_kind(), RECORDS, {}, tip, BackupMode.AUTO)
    assert kinds(plan) == {
        "vda": ("incremental", None, True, False),
        "vdb": ("full", NO_BITMAP, False, True),
        "vdc": ("full", NO_BITMAP, False, True),
    }
    assert plan.base == "cp1" and plan.parent_backup == "b1"
    assert [d.since for d in plan.disks] == ["cp1", None, None]
    # An explicit incremental is not refused because the raw disks are read in full.
    assert plan_backup(every_kind(), RECORDS, {}, tip, BackupMode.INCREMENTAL) == plan


def test_a_raw_disk_is_layered_only_on_an_image_of_its_size_that_describes_its_blocks() -> None:
    # vdb's image in the tip does not describe its blocks; vdc's is of another size.
    tip = layering({"vdc": 2 * GiB})
    plan = plan_backup(every_kind(), RECORDS, {}, tip, BackupMode.AUTO)
    assert kinds(plan)["vdb"] == kinds(plan)["vdc"] == ("full", NO_BITMAP, False, False)
    assert kinds(plan)["vda"] == ("incremental", None, True, False)
    # Its capacity unknown (libvirt did not say): standalone.
    info = every_kind()
    unknown = dataclasses.replace(
        info, disks=tuple(d.with_capacity(None) if d.target == "vdb" else d for d in info.disks)
    )
    plan = plan_backup(unknown, RECORDS, {}, layering({"vdb": GiB, "vdc": GiB}), BackupMode.AUTO)
    assert (kinds(plan)["vdb"][3], kinds(plan)["vdc"][3]) == (False, True)


def test_a_raw_disk_is_not_layered_on_a_damaged_image_nor_over_a_request_for_a_full() -> None:
    tip = layering({"vdb": GiB, "vdc": GiB}, broken={"vdb": "image .../vdb.qcow2 is missing"})
    plan = plan_backup(every_kind(), RECORDS, {}, tip, BackupMode.AUTO)
    assert (kinds(plan)["vdb"][3], kinds(plan)["vdc"][3]) == (False, True)
    damaged = "manifest .../manifest.json: not JSON"
    good = layering({"vdb": GiB, "vdc": GiB})
    plan = plan_backup(every_kind(), RECORDS, {}, good, BackupMode.AUTO, damaged=damaged)
    assert not any(d.layered for d in plan.disks)
    assert plan.parent_backup is None and plan.base is None
    plan = plan_backup(every_kind(), RECORDS, {}, good, BackupMode.FULL)
    assert kinds(plan) == {
        "vda": ("full", "full-requested", True, False),
        "vdb": ("full", "full-requested", False, False),
        "vdc": ("full", "full-requested", False, False),
    }
    assert plan.parent_backup is None and plan.base is None


def test_a_raw_disk_whose_chain_verify_broke_is_copied_standalone_saying_why() -> None:
    """verify found vdb's image damaged (backup-corrupt in the ledger): a layer on it
    would skip the blocks the damaged image has wrong."""
    tip = layering({"vdb": GiB, "vdc": GiB})
    chains = {"vdb": broken("vdb", "backup-corrupt")}
    plan = plan_backup(every_kind(), RECORDS, chains, tip, BackupMode.AUTO)
    assert kinds(plan)["vdb"] == ("full", "backup-corrupt", False, False)
    assert kinds(plan)["vdc"][3] is True  # the other raw disk still layers


def test_a_domain_of_raw_disks_only_layers_on_the_tip_without_a_base_checkpoint() -> None:
    info = mixed(RAW.format(t="vdb", x=""), LV.format(t="vdc"))
    plan = plan_backup(info, [], {}, layering({"vdb": GiB}), BackupMode.INCREMENTAL)
    assert kinds(plan) == {
        "vdb": ("full", NO_BITMAP, False, True),
        "vdc": ("full", NO_BITMAP, False, False),
    }
    assert plan.base is None and plan.parent_backup == "b1"
    alone = plan_backup(info, [], {}, layering({}), BackupMode.AUTO)
    assert alone.parent_backup is None and not any(d.layered for d in alone.disks)


def test_disks_excluded_by_configuration_are_left_out_and_say_so() -> None:
    plan = plan_backup(
        every_kind(), RECORDS, {}, layering({}), BackupMode.AUTO, exclude={"vdc", "hdc"}
    )
    assert [d.target for d in plan.disks] == ["vda", "vdb"]
    # Configuration's reason for a disk it names, even one left out anyway (the CD-ROM).
    assert plan.excluded == (
        ExcludedDisk("vdc", EXCLUDED_BY_CONFIG),
        ExcludedDisk("vdd", "shareable"),
        ExcludedDisk("hdc", EXCLUDED_BY_CONFIG),
    )
    plan = plan_backup(every_kind(), RECORDS, {}, TIP, BackupMode.AUTO, exclude={"vda"})
    assert [d.target for d in plan.disks] == ["vdb", "vdc"]
    assert plan.base is None  # no disk left with a bitmap to increment
    assert ExcludedDisk("vda", EXCLUDED_BY_CONFIG) in plan.excluded


def test_nothing_left_to_back_up_is_no_disks_naming_every_reason() -> None:
    info = mixed(
        QCOW2.format(t="vda"), RAW.format(t="vdb", x="<shareable/>"), CDROM.format(t="hdc")
    )
    with pytest.raises(BackupError) as raised:
        plan_backup(info, [], {}, None, BackupMode.AUTO, exclude={"vda"})
    assert raised.value.code == "no-disks"
    message = str(raised.value)
    for said in ("vda: excluded-by-config", "vdb: shareable", "hdc: device-cdrom"):
        assert said in message
    # A raw disk alone is something to back up.
    only_raw = mixed(RAW.format(t="vdb", x=""), CDROM.format(t="hdc"))
    assert [d.target for d in plan_backup(only_raw, [], {}, None, BackupMode.AUTO).disks] == ["vdb"]


def test_disk_coverage_says_how_each_disk_is_backed_up_and_partial_only_when_silent() -> None:
    coverage = disk_coverage(every_kind())
    assert coverage == (
        DiskCoverage("vda", "incremental", None),
        DiskCoverage("vdb", "full", NO_BITMAP),
        DiskCoverage("vdc", "full", NO_BITMAP),
        DiskCoverage("vdd", "excluded", "shareable", silent=True),  # the guest writes it
        DiskCoverage("hdc", "excluded", "device-cdrom"),  # read-only media: nothing lost
    )
    assert partial(coverage)
    # Left out on purpose: said, and not partial.
    coverage = disk_coverage(every_kind(), {"vdd", "vdb"})
    assert [(c.target, c.how, c.reason, c.silent) for c in coverage][1::2] == [
        ("vdb", "excluded", EXCLUDED_BY_CONFIG, False),
        ("vdd", "excluded", EXCLUDED_BY_CONFIG, False),
    ]
    assert not partial(coverage)
    assert not partial(disk_coverage(mixed(QCOW2.format(t="vda"), CDROM.format(t="hdc"))))


def test_disk_coverage_and_the_plan_agree_on_every_disk() -> None:
    info, exclude = every_kind(), {"vdc"}
    plan = plan_backup(info, [], {}, None, BackupMode.AUTO, exclude=exclude)
    coverage = {c.target: c for c in disk_coverage(info, exclude)}
    assert {x.target: x.reason for x in plan.excluded} == {
        t: c.reason for t, c in coverage.items() if c.how == "excluded"
    }
    assert {d.target for d in plan.disks} == {t for t, c in coverage.items() if c.how != "excluded"}
    assert {d.target for d in plan.disks if not d.bitmap} == {
        t for t, c in coverage.items() if c.how == "full"
    }


# --- layer_on: what a layered disk is compared with ------------------------------------------


def _raw_disk(
    target: str, checksums: tuple[RangeChecksum, ...], backing: str | None, block_size: int | None
) -> DiskManifest:
    return DiskManifest(
        target, f"{target}.qcow2", "full", NO_BITMAP, GiB, 0, backing, checksums, block_size
    )


def _point(backup_id: str, *disks: DiskManifest) -> Manifest:
    return Manifest(
        backup_id=backup_id,
        domain="d1",
        domain_uuid=UUID,
        created_at=1.0,
        completed_at=2.0,
        parent=None,
        checkpoint="cp1",
        checkpoint_xml="<domaincheckpoint/>",
        domain_xml="<domain/>",
        disks=disks,
    )


def test_layer_on_gives_the_digests_of_the_parents_blocks_or_makes_the_disk_standalone() -> None:
    b0_id, b1_id = "20260101T000000Z-000000", "20260102T000000Z-000000"
    data = RangeChecksum(0, BLOCK, digest_of(b"\x01" * BLOCK, 0))
    other = RangeChecksum(BLOCK, BLOCK, digest_of(b"\x02" * BLOCK, BLOCK))
    zero = RangeChecksum(0, BLOCK, digest_of(bytes(BLOCK), 0))
    b0 = _point(
        b0_id,
        _raw_disk("vdb", (data,), None, BLOCK),
        _raw_disk("vdc", (data,), None, None),  # does not describe its blocks
    )
    b1 = _point(
        b1_id,
        _raw_disk("vdb", (zero, other), f"../{b0_id}/vdb.qcow2", BLOCK),
        _raw_disk("vdc", (other,), f"../{b0_id}/vdc.qcow2", BLOCK),
    )
    info = mixed(QCOW2.format(t="vda"), RAW.format(t="vdb", x=""), LV.format(t="vdc"))
    tip = RepositoryTip(
        b1_id, "cp1", frozenset({"vda", "vdb", "vdc"}), layerable={"vdb": GiB, "vdc": GiB}
    )
    plan = plan_backup(info, RECORDS, {}, tip, BackupMode.AUTO)
    assert [d.layered for d in plan.disks] == [False, True, True]
    layered, blocks = layer_on(plan, b1, [b0, b1])
    # vdb: block 0 became zeroes (not in it: zero), block 1 holds data.
    assert blocks == {"vdb": {BLOCK: other.digest}}
    assert [(d.target, d.layered) for d in layered.disks] == [
        ("vda", False),
        ("vdb", True),
        ("vdc", False),  # its chain does not describe its blocks: standalone
    ]
    assert layered.disks[0] == plan.disks[0] and layered.excluded == plan.excluded
    # The parent's older backup missing: standalone too.
    assert layer_on(plan, b1, [b1])[1] == {}


# --- libvirt's documents -------------------------------------------------------------------


def _job(plan: BackupPlan) -> Job:
    return Job(
        uuid=UUID,
        domain="d1",
        backup_id="20260102T000000Z-000000",
        checkpoint="cp2",
        staging=Path("/repo/d1/backups/.staging-x"),
        socket=Path("/run/agent/x.sock"),
        scratch={d.target: Path(f"/scratch/{d.target}.qcow2") for d in plan.disks},
    )


def _disk_elements(xml: str) -> dict[str, dict[str, str]]:
    root = etree.fromstring(xml.encode())
    disks = root.findall("disks/disk")
    assert len({d.get("name") for d in disks}) == len(disks), "a disk listed twice"
    return {
        str(d.get("name")): {
            **{str(k): str(v) for k, v in d.attrib.items() if k != "name"},
            **{f"{c.tag}.{k}": str(v) for c in d for k, v in c.attrib.items()},
        }
        for d in disks
    }


def test_backup_xml_names_every_disk_each_with_its_mode_or_backup_no() -> None:
    tip = layering({"vdb": GiB})
    plan = plan_backup(every_kind(), RECORDS, {}, tip, BackupMode.AUTO, exclude={"vdc"})
    xml = backup_xml(plan, _job(plan))
    root = etree.fromstring(xml.encode())
    assert root.get("mode") == "pull" and root.findtext("incremental") == "cp1"
    assert _disk_elements(xml) == {
        "vda": {
            "backup": "yes",
            "type": "file",
            "backupmode": "incremental",
            "incremental": "cp1",
            "scratch.file": "/scratch/vda.qcow2",
            "driver.type": "qcow2",
        },
        "vdb": {
            "backup": "yes",
            "type": "file",
            "backupmode": "full",
            "scratch.file": "/scratch/vdb.qcow2",
            "driver.type": "qcow2",
        },
        "vdc": {"backup": "no"},
        "vdd": {"backup": "no"},
        "hdc": {"backup": "no"},
    }


def test_checkpoint_xml_puts_a_bitmap_only_on_the_disks_that_can_have_one() -> None:
    plan = plan_backup(every_kind(), RECORDS, {}, layering({}), BackupMode.AUTO, exclude={"vdc"})
    root = etree.fromstring(checkpoint_xml(plan, _job(plan)).encode())
    assert root.findtext("name") == "cp2"
    assert _disk_elements(checkpoint_xml(plan, _job(plan))) == {
        "vda": {"checkpoint": "bitmap"},
        "vdb": {"checkpoint": "no"},  # raw: libvirt refuses a bitmap there
        "vdc": {"checkpoint": "no"},
        "vdd": {"checkpoint": "no"},
        "hdc": {"checkpoint": "no"},
    }


def test_every_disk_of_the_assorted_domain_is_in_both_documents_once() -> None:
    xml = (Path(__file__).parent / "data" / "domains" / "assorted.xml").read_bytes()
    info = parse_domain(xml, persistent=True, state=DomainState.RUNNING)
    info = dataclasses.replace(info, disks=tuple(d.with_capacity(GiB) for d in info.disks))
    plan = plan_backup(info, [], {}, None, BackupMode.AUTO, exclude={"vdc"})
    targets = [d.target for d in info.disks]
    for document in (backup_xml(plan, _job(plan)), checkpoint_xml(plan, _job(plan))):
        assert sorted(_disk_elements(document)) == sorted(targets)
    backed = {
        t for t, d in _disk_elements(backup_xml(plan, _job(plan))).items() if d["backup"] == "yes"
    }
    assert backed == {"vda", "vdb", "vdd", "vdf", "sdc"}
