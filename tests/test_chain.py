"""The chain rules (pure): names, order, redefine XML, disk verdicts, pruning."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState
from agent.chain.rules import (
    base_checkpoint,
    bitmap_disks,
    checkpoint_xml,
    disk_verdicts,
    domain_uuid_in_xml,
    is_own,
    new_checkpoint_name,
    order_chain,
    parent_in_xml,
    prune_plan,
    redefine_xml,
    restrict_disks,
)
from agent.core.errors import ChainError
from agent.virt.inventory import DomainState, parse_domain

UUID = "6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11"
DOMAIN_XML = f"""<domain type='kvm'><name>d1</name><uuid>{UUID}</uuid><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/img/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/img/sda.qcow2'/><target dev='sda' bus='scsi'/></disk>
<disk type='file' device='cdrom'><target dev='sdc' bus='sata'/><readonly/></disk>
</devices></domain>"""


def cp_xml(name: str, parent: str | None) -> str:
    parent_xml = f"<parent><name>{parent}</name></parent>" if parent else ""
    return (
        f"<domaincheckpoint><name>{name}</name>{parent_xml}<creationTime>1</creationTime>"
        f"<disks><disk name='vda' checkpoint='bitmap' bitmap='{name}'/>"
        f"<disk name='sda' checkpoint='bitmap' bitmap='{name}'/></disks>{DOMAIN_XML}"
        "</domaincheckpoint>"
    )


def current_disks(*, sda_path: str = "/img/sda.qcow2", capacity: int = 1 << 30):
    xml = DOMAIN_XML.replace("/img/sda.qcow2", sda_path)
    info = parse_domain(xml, persistent=True, state=DomainState.RUNNING)
    return tuple(d.with_capacity(capacity) if d.backup_capable else d for d in info.disks)


def record(
    name: str,
    parent: str | None,
    seq: int,
    *,
    state: CheckpointState = CheckpointState.ACTIVE,
    backed_up: bool = False,
) -> CheckpointRecord:
    disks = tuple(
        CheckpointDisk(d.target, name, d.identity.key(), d.capacity)
        for d in current_disks()
        if d.identity is not None
    )
    return CheckpointRecord(
        domain="d1",
        domain_uuid=UUID,
        name=name,
        parent=parent,
        born_parent=parent,
        created_at=seq,
        xml=cp_xml(name, parent),
        disks=disks,
        state=state,
        backed_up_at=float(seq) if backed_up else None,
        seq=seq,
    )


def test_names_are_own_sortable_and_unique() -> None:
    early = new_checkpoint_name(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    late = new_checkpoint_name(datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC))
    assert early.startswith("lba-20260102T030405Z-") and early < late
    assert is_own(early) and not is_own("nightly-1") and not is_own("lba-evil")
    assert len({new_checkpoint_name() for _ in range(200)}) == 200


def test_order_follows_parents_not_names_or_insertion() -> None:
    # Inserted child-first and named so that sorting by name would be wrong.
    records = [record("cp.10", "cp.9", 1), record("cp.9", "cp.2", 2), record("cp.2", None, 3)]
    assert [r.name for r in order_chain(records)] == ["cp.2", "cp.9", "cp.10"]


def test_a_pruned_parent_makes_a_root_and_cycles_are_refused() -> None:
    assert [r.name for r in order_chain([record("b", "a", 2), record("c", "b", 3)])] == ["b", "c"]
    with pytest.raises(ChainError, match="cycle"):
        order_chain([record("x", "y", 1), record("y", "x", 2)])


def test_redefine_xml_takes_todays_parent_and_can_drop_the_domain() -> None:
    rec = dataclasses.replace(record("cp2", "cp1", 2), parent=None)  # cp1 was pruned
    xml = redefine_xml(rec, keep_domain=True)
    assert parent_in_xml(xml) is None and domain_uuid_in_xml(xml) == UUID
    moved = dataclasses.replace(rec, parent="cp0")
    assert parent_in_xml(redefine_xml(moved, keep_domain=True)) == "cp0"
    bare = redefine_xml(rec, keep_domain=False)
    assert domain_uuid_in_xml(bare) is None and "<name>cp2</name>" in bare
    assert bitmap_disks(bare) == {"vda": "cp2", "sda": "cp2"}


def test_checkpoint_xml_puts_bitmaps_only_on_capable_disks() -> None:
    xml = checkpoint_xml("lba-x", current_disks())
    assert bitmap_disks(xml) == {"vda": "lba-x", "sda": "lba-x"}
    assert 'name="sdc" checkpoint="no"' in xml
    assert bitmap_disks(restrict_disks(xml, ["sda"])) == {"sda": "lba-x"}


def test_verdicts_same_disks_are_valid() -> None:
    verdicts = disk_verdicts(record("cp1", None, 1), current_disks())
    assert {t: v.valid for t, v in verdicts.items()} == {"vda": True, "sda": True}


def test_verdicts_replaced_resized_added_removed() -> None:
    base = record("cp1", None, 1)
    replaced = disk_verdicts(base, current_disks(sda_path="/img/other.qcow2"))
    assert replaced["vda"].valid and replaced["sda"].reason == "disk-replaced"
    resized = disk_verdicts(base, current_disks(capacity=2 << 30))
    assert resized["vda"].reason == "disk-resized"
    one_disk = dataclasses.replace(base, disks=base.disks[:1])
    added = disk_verdicts(one_disk, current_disks())
    assert added["sda"].reason == "disk-added" and added["vda"].valid
    removed = disk_verdicts(base, current_disks()[:1])
    assert removed["sda"].reason == "disk-removed"
    assert disk_verdicts(None, current_disks())["vda"].reason == "no-checkpoint"


def test_base_is_newest_backed_up_else_newest_live() -> None:
    a = record("a", None, 1, backed_up=True)
    b = record("b", "a", 2, backed_up=True)
    c = record("c", "b", 3, state=CheckpointState.PENDING)
    assert base_checkpoint([a, b, c]) == b
    assert base_checkpoint([record("a", None, 1), record("b", "a", 2)]).name == "b"  # type: ignore[union-attr]
    assert base_checkpoint([]) is None


def test_prune_keeps_newest_backed_up_and_newer() -> None:
    recs = [
        record(f"cp{i}", f"cp{i - 1}" if i > 1 else None, i, backed_up=i <= 4) for i in range(1, 6)
    ]
    plan = prune_plan(recs, keep=1)
    assert plan.delete == ("cp1", "cp2", "cp3")
    assert plan.parents == {"cp4": None}
    plan2 = prune_plan(recs, keep=2)
    assert plan2.delete == ("cp1", "cp2") and plan2.parents == {"cp3": None}
    assert prune_plan(recs[:1], keep=1).delete == ()
    already = [dataclasses.replace(r, state=CheckpointState.PRUNED) for r in recs[:3]] + recs[3:]
    assert prune_plan(already, keep=1).delete == ()
