"""Retention against a real domain: after every merge, every byte of the kept points that
holds data is still covered by a checksum, so ``verify`` catches a flipped byte wherever
it came from (the old full, each merged incremental, a range an incremental overwrote
in part); and a merge costs what changed (its commit writes the layers above the
bottom image only)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core.errors import RepositoryError
from agent.repository.store import Repository
from agent.repository.windows import window_digest
from tests.guest_model import KiB, MiB, assert_restores, config, started_guest
from tests.harness import running_agent
from tests.test_backup_live import flip_byte
from tests.testbed.domains import DiskSpec, DomainFactory

pytestmark = pytest.mark.libvirt

REPO = Path(__file__).resolve().parents[1]

# (offset, length, pattern) written before each of five backups: the full's data, then
# an incremental each; the second one overwrites part of the full's first 2 MiB range.
WRITES = [
    (0, 4 * MiB, 0xA0),
    (8 * MiB, 64 * KiB, 0xA1),
    (1 * MiB, 4 * KiB, 0xA2),  # inside the full's range [0, 2 MiB): the rest is rehashed
    (16 * MiB, 128 * KiB, 0xA3),
    (24 * MiB, 64 * KiB, 0xA4),
]


async def _caught(repo: Repository, name: str, image: Path, offset: int) -> None:
    """A byte flipped at guest ``offset`` of ``image`` is named by verify (its file and a
    range holding the byte); flipped back, verify is clean again."""
    await asyncio.to_thread(flip_byte, image, offset)
    try:
        problems = await repo.verify(name)
    finally:
        await asyncio.to_thread(flip_byte, image, offset)  # (XOR 0xFF twice: as it was)
    assert problems, f"a byte flipped at {offset} of {image} was not caught"
    [problem] = problems
    assert problem.image == image, problem
    assert problem.offset is not None and problem.length is not None, problem
    assert problem.offset <= offset < problem.offset + problem.length, problem
    assert await repo.verify(name) == []


async def test_every_byte_of_a_merged_point_stays_verifiable(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    cfg = config(tmp_path, retention={"keep_last": 2})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda")])
        name, repo = guest.td.name, run.agent.backups.repository
        points = {}
        for step, (offset, length, pattern) in enumerate(WRITES):
            await guest.write("vda", offset, length, pattern)
            result = await run.agent.backups.run(guest.td.uuid)
            points[result.backup_id] = guest.snapshot()
            manifests = await repo.backups(name)
            if step < 2:
                continue
            # Retention merged: the oldest kept point is standalone, and every range any
            # backup wrote so far is in it. Each is caught where it is flipped.
            oldest = manifests[0]
            assert len(manifests) == 2 and oldest.merged_from and oldest.parent is None
            [disk] = oldest.disks
            assert disk.backing is None
            image = tmp_path / "repo" / name / "backups" / oldest.backup_id / disk.image
            for start, size, _ in WRITES[:step]:
                await _caught(repo, name, image, start + size - 1)
            # The full's data beside the part an incremental overwrote (hashed again).
            await _caught(repo, name, image, 1 * MiB + 4 * KiB + 100)
            await _caught(repo, name, image, 100)
            for manifest in manifests:
                await assert_restores(
                    repo, name, manifest.backup_id, points[manifest.backup_id], tmp_path
                )


async def test_damage_retention_finds_breaks_the_chain_and_the_job_says_so(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """A byte rots in an incremental that the next retention must merge: retention
    refuses (nothing merged or dropped), the image is noted damaged and kept, the job
    fails with ``retention-refused`` while its backup stands, the disk's chain is broken
    and its next backup is full; another domain's retention goes on meanwhile."""
    cfg = config(tmp_path, retention={"keep_last": 2})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, [DiskSpec("vda")])
        healthy = await started_guest(run, domain_factory, [DiskSpec("vda")])
        name, repo = guest.td.name, run.agent.backups.repository
        for pattern in (0xB0, 0xB1):
            await guest.write("vda", 2 * MiB, 64 * KiB, pattern)
            await run.agent.backups.run(guest.td.uuid)
        first, second = await repo.backups(name)
        image = tmp_path / "repo" / name / "backups" / second.backup_id / "vda.qcow2"
        await asyncio.to_thread(flip_byte, image, 2 * MiB + 7)
        await guest.write("vda", 5 * MiB, 64 * KiB, 0xB2)
        third = await run.agent.backups.run(guest.td.uuid)  # keep_last = 2: merge second
        assert third.retention_refused is not None
        assert f"{image}" in third.retention_refused, third.retention_refused
        listing = await repo.listing(name)
        assert [m.backup_id for m in listing.manifests] == [
            first.backup_id,
            second.backup_id,
            third.backup_id,
        ]
        kinds = {(d.backup_id, d.kind) for d in listing.damaged}
        assert (second.backup_id, "image-damaged") in kinds, kinds
        chains = await run.agent.chains.ledger.disk_chains(name)
        assert not chains["vda"].valid and chains["vda"].reason == "repository-damaged"
        # The next backup does not sit on the damage; the damaged image is still kept.
        await guest.write("vda", 6 * MiB, 64 * KiB, 0xB3)
        expected = guest.snapshot()
        fourth = await run.agent.backups.run(guest.td.uuid)
        assert [(d.mode, d.reason) for d in fourth.disks] == [("full", "repository-damaged")]
        await assert_restores(repo, name, fourth.backup_id, expected, tmp_path)
        assert image.is_file()
        # The healthy domain's retention is not held up.
        for pattern in (0xC0, 0xC1, 0xC2):
            await healthy.write("vda", 0, 64 * KiB, pattern)
            done = await run.agent.backups.run(healthy.td.uuid)
            assert done.retention_refused is None
        assert len(await repo.backups(healthy.td.name)) == 2


async def test_each_point_keeps_its_digest_and_restore_checks_it(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    """Every point of a qcow2 disk and of a raw one (stored as what changed) records the
    digest of the whole disk as the guest held it; the documented command recomputes it
    from a restore; a merge keeps it; and a restore whose result does not match it (a
    byte rotted in the merged image) fails, leaving nothing behind."""
    cfg = config(tmp_path, retention={"keep_last": 2})
    async with running_agent(cfg) as run:
        guest = await started_guest(
            run, domain_factory, [DiskSpec("vda"), DiskSpec("vdb", format="raw")]
        )
        name, repo = guest.td.name, run.agent.backups.repository
        digests: dict[tuple[str, str], str] = {}
        writes = [(0, 3 * MiB, 0xC0), (1 * MiB, 64 * KiB, 0xC1), (9 * MiB, 200 * KiB, 0xC2)]
        for offset, length, pattern in writes:
            for target in ("vda", "vdb"):
                await guest.write(target, offset, length, pattern)
            result = await run.agent.backups.run(guest.td.uuid)
            held = guest.snapshot()
            for target in ("vda", "vdb"):
                disk = next(d for d in result.disks if d.target == target)
                assert disk.point_digest == window_digest(held[target], 0), (target, result)
                digests[(result.backup_id, target)] = disk.point_digest
            for manifest in await repo.backups(name):  # merged ones keep theirs
                for disk in manifest.disks:
                    assert disk.point_digest == digests[(manifest.backup_id, disk.target)]
        oldest = (await repo.backups(name))[0]
        assert oldest.merged_from, "retention merged"
        for target in ("vda", "vdb"):
            restored = tmp_path / f"{target}.raw"
            await repo.restore(name, oldest.backup_id, target, restored, fmt="raw")
            shown = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, str(REPO / "scripts" / "point-digest"), str(restored)],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            )
            assert shown.stdout.strip() == digests[(oldest.backup_id, target)]
        image = tmp_path / "repo" / name / "backups" / oldest.backup_id / "vda.qcow2"
        await asyncio.to_thread(flip_byte, image, 2 * MiB + 5)
        dest = tmp_path / "rotten.qcow2"
        with pytest.raises(RepositoryError, match="digest"):
            await repo.restore(name, oldest.backup_id, "vda", dest)
        assert not dest.exists() and not dest.with_name(dest.name + ".part").exists()
