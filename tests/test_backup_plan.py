"""Full or incremental per disk, and why (pure logic)."""

from __future__ import annotations

import dataclasses

import pytest

from agent.backup.plan import BackupMode, RepositoryTip, plan_backup
from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState, DiskChain
from agent.core.errors import BackupError
from agent.virt.inventory import DomainState, parse_domain

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
