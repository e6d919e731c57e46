"""Tests for agent.repository.store with the real qemu-img and qemu-io, on images in tmp_path.

Backups are built the way the backup job builds them: stage, create_image (full, then
overlays), write known patterns into the staged images, publish with their checksums.
Staging is a sibling of the published backups, so a staged overlay's relative backing
path resolves and qemu-io opens it normally, with its chain: a write into part of a
cluster then copies the rest of the cluster from the backing image (one of the writes
below does that on purpose). Every test compares restored disks byte for byte with the
content the test itself tracked.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import BackupNotFoundError, RepositoryError, RetentionRefusedError
from agent.core.faults import SimulatedCrash
from agent.qemu import images
from agent.repository import layout as layout_module
from agent.repository.blocks import BLOCK
from agent.repository.manifest import (
    BACKUP_ID_RE,
    MANIFEST_VERSION,
    DiskManifest,
    ExcludedDisk,
    Manifest,
    RangeChecksum,
    digest_of,
)
from agent.repository.store import Repository
from agent.repository.verify import Problem, damaged_disks, restore_chain

QEMU_IMG = "/usr/bin/qemu-img"
QEMU_IO = "/usr/bin/qemu-io"
DOMAIN = "vm1"
KiB, MiB = 1024, 1024 * 1024
SIZES = {"vda": 4 * MiB, "vdb": 2 * MiB}

Write = tuple[int, int, int]  # offset, length, byte pattern


# --- helpers: the real tools -------------------------------------------------------------


def _run(*args: str | Path) -> str:
    done = subprocess.run(
        [*map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _write(image: Path, offset: int, length: int, pattern: int) -> None:
    _run(QEMU_IO, "-f", "qcow2", "-c", f"write -q -P {pattern:#x} {offset} {length}", image)


def _info(image: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(_run(QEMU_IMG, "info", "--output=json", "-U", image))
    return result


def _host_offset(image: Path, guest: int) -> int:
    """Where guest offset ``guest`` of ``image``'s own layer lies in the qcow2 file."""
    for extent in json.loads(_run(QEMU_IMG, "map", "--output=json", "-f", "qcow2", image)):
        if extent["start"] <= guest < extent["start"] + extent["length"]:
            assert extent["depth"] == 0 and "offset" in extent, extent
            return int(extent["offset"]) + guest - int(extent["start"])
    raise AssertionError(f"{guest} not mapped in {image}")


def _flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


def _sha(pattern: int, length: int, offset: int) -> str:
    """The checksum new backups record for ``length`` bytes of ``pattern`` written at
    ``offset`` in the disk (a window sum: where the bytes are counts)."""
    return digest_of(bytes([pattern]) * length, offset)


def _edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- helpers: building backups the way the job does --------------------------------------


@dataclass
class Builder:
    """Publishes backups into ``repo`` and remembers every disk's content at every point."""

    repo: Repository
    domain: str = DOMAIN
    content: dict[str, bytearray] = field(default_factory=dict)
    points: dict[str, dict[str, bytes]] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)

    async def backup(
        self,
        writes: dict[str, list[Write]],
        *,
        full: Iterable[str] = (),
        reason: str | None = None,
        compress: bool = False,
    ) -> Manifest:
        parent = await self.repo.latest(self.domain)
        backup_id = self.repo.new_backup_id()
        staging = await self.repo.stage(self.domain, backup_id)
        disks = []
        for target, target_writes in writes.items():
            fresh = parent is None or target in full or parent.disk(target) is None
            base = None if fresh else parent
            image, backing = await self.repo.create_image(
                staging, target, SIZES[target], backing=base
            )
            if fresh:
                self.content[target] = bytearray(SIZES[target])
            for offset, length, pattern in target_writes:
                _write(staging / image, offset, length, pattern)
                self.content[target][offset : offset + length] = bytes([pattern]) * length
            if compress:
                packed = staging / "packed.qcow2"
                _run(QEMU_IMG, "convert", "-c", "-O", "qcow2", staging / image, packed)
                packed.replace(staging / image)
            disks.append(
                self._disk(target, image, backing, target_writes, fresh=fresh, reason=reason)
            )
        manifest = Manifest(
            backup_id=backup_id,
            domain=self.domain,
            domain_uuid="6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11",
            created_at=1_700_000_000.0 + len(self.ids),
            completed_at=1_700_000_000.5 + len(self.ids),
            parent=None if parent is None else parent.backup_id,
            checkpoint=f"cp-{len(self.ids)}",
            checkpoint_xml="<domaincheckpoint/>",
            domain_xml="<domain/>",
            disks=tuple(disks),
        )
        await self.repo.publish(self.domain, staging, manifest)
        self.ids.append(backup_id)
        self.points[backup_id] = {t: bytes(self.content[t]) for t in writes}
        return manifest

    def _disk(
        self,
        target: str,
        image: str,
        backing: str | None,
        writes: list[Write],
        *,
        fresh: bool,
        reason: str | None,
    ) -> DiskManifest:
        return DiskManifest(
            target=target,
            image=image,
            mode="full" if fresh else "incremental",
            reason=(reason or "first-backup") if fresh else None,
            virtual_size=SIZES[target],
            bytes_copied=sum(length for _, length, _ in writes),
            backing=backing,
            checksums=tuple(RangeChecksum(o, n, _sha(p, n, o)) for o, n, p in writes),
        )


# b0 full; b1 writes part of a cluster whose backing holds data (copy-on-write through the
# staged chain); b2 backs vdb up in full again (its chain broke); b3, b4 incremental.
FIVE: list[tuple[dict[str, list[Write]], set[str]]] = [
    ({"vda": [(0, MiB, 0x11), (3 * MiB, 64 * KiB, 0x12)], "vdb": [(0, 512 * KiB, 0x21)]}, set()),
    (
        {
            "vda": [(64 * KiB, 64 * KiB, 0x13), (200_000, 5000, 0x14)],
            "vdb": [(100_000, 3000, 0x22)],
        },
        set(),
    ),
    ({"vda": [(MiB, 64 * KiB, 0x15)], "vdb": [(0, 256 * KiB, 0x23)]}, {"vdb"}),
    ({"vda": [(2 * MiB, 4096, 0x16)], "vdb": [(300_000, 10, 0x24)]}, set()),
    ({"vda": [(0, 4096, 0x17)], "vdb": [(MiB, 64 * KiB, 0x25)]}, set()),
]


async def _five(root: Path, **kwargs: Any) -> Builder:
    builder = Builder(Repository(root, **kwargs))
    for writes, full in FIVE:
        await builder.backup(writes, full=full, reason="bitmap-inconsistent" if full else None)
    return builder


async def _restored(repo: Repository, backup_id: str, target: str, dest: Path) -> bytes:
    await repo.restore(DOMAIN, backup_id, target, dest, fmt="raw")
    data = dest.read_bytes()  # noqa: ASYNC240 - a test helper; nothing else runs meanwhile
    dest.unlink()  # noqa: ASYNC240
    return data


async def _assert_all_restore(repo: Repository, builder: Builder, scratch: Path) -> list[str]:
    """Every listed backup restores every disk exactly; returns the listed ids."""
    listed = [m.backup_id for m in await repo.backups(DOMAIN)]
    for backup_id in listed:
        for target, expected in builder.points[backup_id].items():
            restored = await _restored(repo, backup_id, target, scratch / "point.raw")
            assert restored == expected, f"{backup_id} {target} differs"
    return listed


def _backups_dir(root: Path) -> Path:
    return root / DOMAIN / "backups"


# --- restore -----------------------------------------------------------------------------


async def test_every_point_restores_exactly_as_raw_and_qcow2(tmp_path: Path) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    for writes, _ in FIVE[:3]:
        await builder.backup({"vda": writes["vda"]})
    repo = builder.repo
    assert [m.backup_id for m in await repo.backups(DOMAIN)] == builder.ids
    for backup_id in builder.ids:
        expected = builder.points[backup_id]["vda"]
        assert await _restored(repo, backup_id, "vda", tmp_path / "out.raw") == expected
        progress: list[float] = []
        dest = tmp_path / f"{backup_id}.qcow2"
        await repo.restore(DOMAIN, backup_id, "vda", dest, progress=progress.append)
        assert progress[-1] == 1.0
        info = _info(dest)
        assert info["format"] == "qcow2" and "backing-filename" not in info  # standalone
        _run(QEMU_IMG, "convert", "-O", "raw", dest, tmp_path / "q.raw")
        assert (tmp_path / "q.raw").read_bytes() == expected
        assert not (tmp_path / f"{backup_id}.qcow2.part").exists()
    # The points really differ, so a restore of the wrong layer could not pass.
    assert len({builder.points[i]["vda"] for i in builder.ids}) == 3


async def test_moved_copy_of_repository_restores_without_the_agent(tmp_path: Path) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    for writes, _ in FIVE[:3]:
        await builder.backup({"vda": writes["vda"]})
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "repo", moved)
    shutil.rmtree(tmp_path / "repo")
    inc1, inc2 = builder.ids[1:]
    image = _backups_dir(moved) / inc2 / "vda.qcow2"
    assert _info(image)["backing-filename"] == f"../{inc1}/vda.qcow2"
    _run(QEMU_IMG, "convert", "-O", "raw", image, tmp_path / "out.raw")
    assert (tmp_path / "out.raw").read_bytes() == builder.points[inc2]["vda"]


async def test_mixed_backup_with_one_disk_full_and_one_incremental(tmp_path: Path) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    b1 = await builder.backup(
        {"vda": FIVE[1][0]["vda"], "vdb": FIVE[0][0]["vdb"]}, reason="disk-added"
    )
    b2 = await builder.backup({"vda": FIVE[2][0]["vda"], "vdb": FIVE[1][0]["vdb"]})
    repo = builder.repo
    vda, vdb = b1.disk("vda"), b1.disk("vdb")
    assert vda is not None and (vda.mode, vda.reason) == ("incremental", None)
    assert vdb is not None and (vdb.mode, vdb.reason, vdb.backing) == ("full", "disk-added", None)
    assert "backing-filename" not in _info(_backups_dir(repo.root) / b1.backup_id / "vdb.qcow2")
    assert _info(_backups_dir(repo.root) / b2.backup_id / "vdb.qcow2")["backing-filename"] == (
        f"../{b1.backup_id}/vdb.qcow2"
    )
    for manifest in (b1, b2):
        for target in ("vda", "vdb"):
            restored = await _restored(repo, manifest.backup_id, target, tmp_path / "out.raw")
            assert restored == builder.points[manifest.backup_id][target]
    with pytest.raises(RepositoryError, match="has no disk 'vdb'"):
        await repo.restore(DOMAIN, b0.backup_id, "vdb", tmp_path / "none.raw")


async def test_restore_refuses_existing_destination_and_unknown_backup(tmp_path: Path) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    dest = tmp_path / "taken.raw"
    dest.write_bytes(b"precious")
    with pytest.raises(RepositoryError, match=r"taken\.raw") as caught:
        await builder.repo.restore(DOMAIN, b0.backup_id, "vda", dest, fmt="raw")
    assert caught.value.path == str(dest)
    assert dest.read_bytes() == b"precious"
    with pytest.raises(BackupNotFoundError):
        await builder.repo.restore(DOMAIN, "20200101T000000Z-000000", "vda", tmp_path / "x.raw")
    with pytest.raises(BackupNotFoundError):
        await builder.repo.backup(DOMAIN, "../../etc")


async def test_restore_timeout_kills_qemu_img_and_leaves_no_part_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    stub = tmp_path / "qemu-img"
    # convert creates its output, then hangs; anything else is the real qemu-img.
    stub.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = convert ]; then for last; do :; done; : > "$last"; exec sleep 30; fi\n'
        f'exec {QEMU_IMG} "$@"\n'
    )
    stub.chmod(0o755)
    monkeypatch.setattr(images, "QEMU_IMG", str(stub))
    repo = Repository(tmp_path / "repo", copy_timeout=0.5)
    dest = tmp_path / "out.raw"
    started = time.monotonic()
    with pytest.raises(RepositoryError, match="no answer within"):
        await repo.restore(DOMAIN, b0.backup_id, "vda", dest, fmt="raw")
    assert time.monotonic() - started < 10
    assert not dest.exists() and not (tmp_path / "out.raw.part").exists()


# --- staging and publishing --------------------------------------------------------------


async def test_staged_backup_is_invisible_until_published_and_cleanup_removes_it(
    tmp_path: Path,
) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    repo = builder.repo
    staged_id = repo.new_backup_id()
    staging = await repo.stage(DOMAIN, staged_id)
    image, backing = await repo.create_image(staging, "vda", SIZES["vda"], backing=b0)
    assert (image, backing) == ("vda.qcow2", f"../{b0.backup_id}/vda.qcow2")
    _write(staging / image, 0, 4096, 0x99)
    assert [m.backup_id for m in await repo.backups(DOMAIN)] == [b0.backup_id]
    assert (await repo.latest(DOMAIN)) == b0
    with pytest.raises(BackupNotFoundError):
        await repo.backup(DOMAIN, staged_id)
    # A restart after a crash: the agent's start-up cleanup removes the leftover.
    assert await Repository(tmp_path / "repo").cleanup_staging() == [staging]
    assert not staging.exists()
    assert sorted(os.listdir(_backups_dir(repo.root))) == [b0.backup_id]
    assert await repo.cleanup_staging() == []


async def test_publish_reads_no_header_again_and_forgets_what_it_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header create_image read back serves publish's check (no qemu-img process);
    the cache keeps nothing of a backup once published or discarded."""
    repo = Repository(tmp_path / "repo")
    builder = Builder(repo)
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    assert repo._created == {}
    reads: list[Path] = []
    real = repo._layer_info

    async def counted(path: Path) -> Any:
        reads.append(path)
        return await real(path)

    monkeypatch.setattr(repo, "_layer_info", counted)
    b1 = await builder.backup({"vda": FIVE[1][0]["vda"]})
    staged = _backups_dir(repo.root) / b1.backup_id / "vda.qcow2"
    assert [p.name for p in reads] == ["vda.qcow2"]  # once, at creation
    assert reads[0].parent.name.startswith(".staging-") and staged.is_file()
    assert repo._created == {}
    staging = await repo.stage(DOMAIN, repo.new_backup_id())
    await repo.create_image(staging, "vda", SIZES["vda"], backing=b1)
    assert set(repo._created) == {staging}
    await repo.discard(staging)
    assert repo._created == {}
    # Without a cached header (another process staged it), publish reads it itself.
    staging = await repo.stage(DOMAIN, repo.new_backup_id())
    await repo.create_image(staging, "vda", SIZES["vda"], backing=b0)
    wrong = replace(
        b1,
        backup_id=staging.name.removeprefix(".staging-"),
        parent=b1.backup_id,
        disks=(
            replace(
                b1.disks[0], virtual_size=2 * SIZES["vda"], backing=f"../{b0.backup_id}/vda.qcow2"
            ),
        ),
    )
    reads.clear()
    with pytest.raises(RepositoryError, match="virtual size"):
        await Repository(tmp_path / "repo").publish(DOMAIN, staging, wrong)
    with pytest.raises(RepositoryError, match="virtual size"):
        await repo.publish(DOMAIN, staging, wrong)  # the cached header says the same
    assert reads == []


async def _staged_full_after(repo: Repository, b0: Manifest) -> tuple[Path, Manifest]:
    """A new full backup of vda staged (its image created, nothing written) and the
    manifest that publishes it."""
    new_id = repo.new_backup_id()
    staging = await repo.stage(DOMAIN, new_id)
    await repo.create_image(staging, "vda", SIZES["vda"], backing=None)
    disks = (replace(b0.disks[0], checksums=()),)
    return staging, replace(b0, backup_id=new_id, parent=None, disks=disks)


async def test_a_cancelled_publish_returns_only_once_the_rename_is_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename runs in a thread that a cancellation cannot stop: the cancelled caller
    must not go on (and undo the backup) while that thread may still publish it."""
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    repo = builder.repo
    staging, manifest = await _staged_full_after(repo, b0)
    new_id = manifest.backup_id
    in_thread = threading.Event()
    real = layout_module._publish

    def slow_publish(*args: Any) -> Path:
        in_thread.set()
        time.sleep(0.3)  # the fsyncs of a large backup
        return real(*args)

    monkeypatch.setattr(layout_module, "_publish", slow_publish)
    task = asyncio.create_task(repo.publish(DOMAIN, staging, manifest))
    await asyncio.to_thread(in_thread.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Published by the time the cancellation came through: the caller sees it stands.
    assert {m.backup_id for m in await repo.backups(DOMAIN)} == {b0.backup_id, new_id}
    assert not staging.exists()


async def test_publish_refuses_an_existing_backup_id(tmp_path: Path) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    repo = builder.repo
    with pytest.raises(RepositoryError, match="already exists"):
        await repo.stage(DOMAIN, b0.backup_id)
    # Another writer publishes the same id while this one is staging it.
    staging, manifest = await _staged_full_after(repo, b0)
    new_id = manifest.backup_id
    squatter = _backups_dir(repo.root) / new_id
    squatter.mkdir()
    (squatter / "vda.qcow2").write_bytes(b"theirs")
    with pytest.raises(RepositoryError, match="already exists") as caught:
        await repo.publish(DOMAIN, staging, manifest)
    assert caught.value.path == str(squatter)
    assert (squatter / "vda.qcow2").read_bytes() == b"theirs" and staging.is_dir()
    await repo.discard(staging)
    assert not staging.exists()


async def test_publish_refuses_a_manifest_that_does_not_match_the_images(tmp_path: Path) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": FIVE[0][0]["vda"]})
    repo = builder.repo
    new_id = repo.new_backup_id()
    staging = await repo.stage(DOMAIN, new_id)
    await repo.create_image(staging, "vda", SIZES["vda"], backing=b0)
    wrong = replace(b0, backup_id=new_id, parent=b0.backup_id)  # says full, image is an overlay
    with pytest.raises(RepositoryError, match="has backing"):
        await repo.publish(DOMAIN, staging, wrong)
    with pytest.raises(RepositoryError, match="not the staging directory"):
        await repo.publish(DOMAIN, staging, b0)
    assert [m.backup_id for m in await repo.backups(DOMAIN)] == [b0.backup_id]
    with pytest.raises(RepositoryError, match="not a staging directory"):
        await repo.discard(_backups_dir(repo.root) / b0.backup_id)
    assert (_backups_dir(repo.root) / b0.backup_id / "manifest.json").is_file()
    with pytest.raises(RepositoryError, match="has no disk 'vdb'"):
        await repo.create_image(staging, "vdb", SIZES["vdb"], backing=b0)
    with pytest.raises(RepositoryError, match="already exists"):
        await repo.create_image(staging, "vda", SIZES["vda"], backing=None)


async def test_ids_listing_order_and_free_space(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    ids = [repo.new_backup_id() for _ in range(20)]
    assert all(BACKUP_ID_RE.fullmatch(i) for i in ids) and len(set(ids)) == 20
    assert await repo.backups(DOMAIN) == [] and await repo.latest(DOMAIN) is None
    builder = Builder(repo)
    for writes, _ in FIVE[:3]:
        await builder.backup({"vda": writes["vda"]})
    # Listing follows created_at, not the random part of ids made within one second.
    assert [m.backup_id for m in await repo.backups(DOMAIN)] == builder.ids
    tmp_path.joinpath("repo").mkdir(exist_ok=True)
    st = os.statvfs(tmp_path / "repo")
    assert abs(await repo.free_bytes() - st.f_bavail * st.f_frsize) < 64 * MiB


async def test_latest_is_the_last_listed_reading_only_the_newest_second(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo")
    # Seconds increase with time; within one second the random part is in any order.
    ids = iter(
        [
            "20261128T100001Z-ffffff",
            "20261128T100002Z-000000",
            "20261128T100003Z-ffffff",
            "20261128T100003Z-000000",
        ]
    )
    repo.new_backup_id = lambda: next(ids)  # type: ignore[method-assign]
    builder = Builder(repo)
    for writes, _ in FIVE[:4]:
        await builder.backup({"vda": writes["vda"]})
        latest = await repo.latest(DOMAIN)
        assert latest is not None and latest == (await repo.backups(DOMAIN))[-1]
        assert latest.backup_id == builder.ids[-1]
    assert builder.ids[-1] == "20261128T100003Z-000000"
    # Older manifests are not read: one that went bad does not stop the next backup's
    # plan (verify names it).
    (_backups_dir(tmp_path / "repo") / builder.ids[0] / "manifest.json").write_text("{")
    latest = await repo.latest(DOMAIN)
    assert latest is not None and latest.backup_id == builder.ids[-1]


# --- verify ------------------------------------------------------------------------------


async def test_verify_finds_a_flipped_byte_in_the_layer_that_holds_it(tmp_path: Path) -> None:
    builder = await _five(tmp_path / "repo")
    repo = builder.repo
    assert await repo.verify(DOMAIN) == []
    b1 = builder.ids[1]
    image = _backups_dir(repo.root) / b1 / "vda.qcow2"
    _flip_byte(image, _host_offset(image, 64 * KiB + 100))
    problems = await repo.verify(DOMAIN)
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.backup_id, problem.target, problem.image) == (b1, "vda", image)
    assert (problem.offset, problem.length) == (64 * KiB, 64 * KiB)
    assert str(image) in problem.message and f"[{64 * KiB}, {128 * KiB})" in problem.message
    assert await repo.verify(DOMAIN, builder.ids[2]) == []


def _as_version_1(writes: dict[str, list[Write]]) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["version"] = 1
        del data["excluded"]  # (version 3's fields, and 4's)
        for disk in data["disks"]:
            del disk["block_size"], disk["blocks"], disk["point_digest"]
            disk["checksums"] = [
                {"offset": o, "length": n, "sha256": hashlib.sha256(bytes([p]) * n).hexdigest()}
                for o, n, p in writes[disk["target"]]
            ]

    return edit


def _as_plain_xxh3(
    version: int, writes: dict[str, list[Write]]
) -> Callable[[dict[str, Any]], None]:
    """A manifest as versions 2 and 3 wrote it: each range's plain XXH3-128, whatever its
    place in the disk, without version 4's fields (``version`` 2: nor version 3's)."""

    def edit(data: dict[str, Any]) -> None:
        data["version"] = version
        if version < 3:
            del data["excluded"]
        for disk in data["disks"]:
            del disk["point_digest"]
            if version < 3:
                del disk["block_size"], disk["blocks"]
            disk["checksums"] = [
                {
                    "offset": o,
                    "length": n,
                    "algorithm": "xxh3-128",
                    "digest": xxhash.xxh3_128_hexdigest(bytes([p]) * n),
                }
                for o, n, p in writes[disk["target"]]
            ]

    return edit


async def test_version_1_manifests_are_verified_with_sha256(tmp_path: Path) -> None:
    builder = await _five(tmp_path / "repo")
    repo = builder.repo
    b1 = builder.ids[1]
    _edit_manifest(_backups_dir(repo.root) / b1, _as_version_1(FIVE[1][0]))
    manifest = await repo.backup(DOMAIN, b1)
    assert manifest.version == 1
    assert {c.algorithm for d in manifest.disks for c in d.checksums} == {"sha256"}
    assert await repo.verify(DOMAIN, b1) == []
    image = _backups_dir(repo.root) / b1 / "vda.qcow2"
    _flip_byte(image, _host_offset(image, 64 * KiB + 100))
    [problem] = await repo.verify(DOMAIN, b1)
    assert (problem.offset, problem.length) == (64 * KiB, 64 * KiB)


async def test_retention_rewrites_a_version_1_manifest_readably(tmp_path: Path) -> None:
    """Dropping b0 rewrites b1's manifest (b1 merged b0's data): a version 1 manifest
    comes back in the current format, its SHA-256 digests kept and still verified."""
    builder = await _five(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    _edit_manifest(_backups_dir(repo.root) / ids[1], _as_version_1(FIVE[1][0]))
    assert await repo.apply_retention(DOMAIN, 4) == ids[:1]
    rewritten = await repo.backup(DOMAIN, ids[1])
    assert rewritten.version == MANIFEST_VERSION and rewritten.merged_from == (ids[0],)
    # b0's ranges, merged in, keep (or are updated with) their window sums; b1's SHA-256
    # ones stay where no range given a new checksum covers them.
    algorithms = {c.algorithm for d in rewritten.disks for c in d.checksums}
    assert "xxh3-128-w64k" in algorithms and algorithms <= {"sha256", "xxh3-128-w64k"}
    assert [m.backup_id for m in await repo.backups(DOMAIN)] == ids[1:]
    assert await repo.verify(DOMAIN) == []
    assert await _assert_all_restore(repo, builder, tmp_path) == ids[1:]


async def test_damage_breaks_the_chain_of_the_disks_whose_restore_reads_it(
    tmp_path: Path,
) -> None:
    """FIVE: vda is one chain b0..b4; vdb was copied in full again at b2."""
    builder = await _five(tmp_path)
    manifests = await builder.repo.backups(DOMAIN)
    b0, b1, b2, b3, b4 = builder.ids
    assert restore_chain(manifests, "vda") == [b4, b3, b2, b1, b0]
    assert restore_chain(manifests, "vdb") == [b4, b3, b2]
    assert restore_chain(manifests, "vdz") == []

    def problem(backup_id: str, target: str) -> Problem:
        return Problem(backup_id, target, Path(f"{target}.qcow2"), 0, 1, "checksum mismatch")

    # Damage in b1 matters to vda (its restore reads b1), not to vdb (restored from b2 on).
    assert damaged_disks(manifests, [problem(b1, "vdb")]) == {}
    assert damaged_disks(manifests, [problem(b1, "vda"), problem(b3, "vdb")]) == {
        "vda": f"{b1} vda.qcow2: checksum mismatch",
        "vdb": f"{b3} vdb.qcow2: checksum mismatch",
    }
    assert damaged_disks(manifests[:2], [problem(b1, "vdb")]) == {
        "vdb": f"{b1} vdb.qcow2: checksum mismatch"
    }


async def test_verify_reports_a_missing_backing_file(tmp_path: Path) -> None:
    builder = await _five(tmp_path / "repo")
    repo = builder.repo
    b0, b1 = builder.ids[:2]
    gone = _backups_dir(repo.root) / b0 / "vda.qcow2"
    gone.unlink()
    problems = await repo.verify(DOMAIN)
    # b1's image names the missing backing file; the later ones restore through it too.
    assert {(p.backup_id, p.target) for p in problems} == {(i, "vda") for i in builder.ids}
    assert all(str(gone) in p.message for p in problems)
    assert any("backing file" in p.message for p in problems if p.backup_id == b1)
    assert all(f"restores through backup {b0}" in p.message for p in problems[2:])


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["disks"][0].update(virtual_size=8 * MiB), "virtual size"),
        (
            lambda d: d["disks"][0].update(backing="../20200101T000000Z-000000/vda.qcow2"),
            "has backing",
        ),
    ],
    ids=["virtual-size", "backing-path"],
)
async def test_verify_compares_image_structure_with_the_manifest(
    tmp_path: Path, edit: Callable[[dict[str, Any]], None], expected: str
) -> None:
    builder = await _five(tmp_path / "repo")
    b3 = builder.ids[3]
    _edit_manifest(_backups_dir(builder.repo.root) / b3, edit)
    problems = await builder.repo.verify(DOMAIN)
    assert (problems[0].backup_id, problems[0].target) == (b3, "vda")
    assert expected in problems[0].message
    if expected == "has backing":  # by its manifest, b4's vda restores through a backup
        b4, gone = builder.ids[4], "20200101T000000Z-000000"  # that is not there
        assert [(p.backup_id, p.target) for p in problems[1:]] == [(b4, "vda")]
        assert f"restores through backup {gone}" in problems[1].message
    else:
        assert len(problems) == 1


async def test_verify_reads_compressed_clusters_through_qemu(tmp_path: Path) -> None:
    builder = Builder(Repository(tmp_path / "repo"))
    b0 = await builder.backup({"vda": [(0, 200_000, 0x31), (MiB + 7, 1000, 0x32)]}, compress=True)
    image = _backups_dir(builder.repo.root) / b0.backup_id / "vda.qcow2"
    extents = json.loads(_run(QEMU_IMG, "map", "--output=json", image))
    assert any(e["data"] and "offset" not in e for e in extents)  # really compressed
    assert await builder.repo.verify(DOMAIN) == []
    assert (
        await _restored(builder.repo, b0.backup_id, "vda", tmp_path / "o.raw")
        == (builder.points[b0.backup_id]["vda"])
    )
    wrong = _sha(0x33, 1000, MiB + 7)
    _edit_manifest(image.parent, lambda d: d["disks"][0]["checksums"][1].update(digest=wrong))
    problems = await builder.repo.verify(DOMAIN)
    assert [(p.offset, p.length) for p in problems] == [(MiB + 7, 1000)]


# --- retention ---------------------------------------------------------------------------


async def test_retention_keeps_the_last_two_and_each_restores_exactly(tmp_path: Path) -> None:
    builder = await _five(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    assert await repo.apply_retention(DOMAIN, 5) == []
    assert await repo.apply_retention(DOMAIN, 2) == ids[:3]
    assert await _assert_all_restore(repo, builder, tmp_path) == ids[3:]
    oldest = await repo.backup(DOMAIN, ids[3])
    assert oldest.parent is None and oldest.merged_from == tuple(ids[:3])
    assert [(d.mode, d.backing) for d in oldest.disks] == [("incremental", None)] * 2
    for target in ("vda", "vdb"):
        assert "backing-filename" not in _info(_backups_dir(repo.root) / ids[3] / f"{target}.qcow2")
        newest = _info(_backups_dir(repo.root) / ids[4] / f"{target}.qcow2")
        assert newest["backing-filename"] == f"../{ids[3]}/{target}.qcow2"
    assert sorted(os.listdir(_backups_dir(repo.root))) == sorted(ids[3:])
    assert not (repo.root / DOMAIN / "retention.json").exists()
    assert await repo.verify(DOMAIN) == []
    # A second pass merges the merged base's history along.
    assert await repo.apply_retention(DOMAIN, 1) == [ids[3]]
    assert (await repo.backup(DOMAIN, ids[4])).merged_from == tuple(ids[:4])
    assert await _assert_all_restore(repo, builder, tmp_path) == ids[4:]


async def test_retention_refuses_to_merge_corrupt_data(tmp_path: Path) -> None:
    """b1's vda is a layer b3's merge commits: corrupt, it is not baked into b3."""
    builder = await _five(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    image = _backups_dir(repo.root) / ids[1] / "vda.qcow2"
    _flip_byte(image, _host_offset(image, 64 * KiB + 100))
    with pytest.raises(RepositoryError, match="retention of vm1 refused") as caught:
        await repo.apply_retention(DOMAIN, 2)
    assert caught.value.path == str(image)
    assert [m.backup_id for m in await repo.backups(DOMAIN)] == ids
    assert not (repo.root / DOMAIN / "retention.json").exists()


async def test_retention_rereads_what_it_merges_not_the_disk(tmp_path: Path) -> None:
    """Of the bottom image (b0's vda, its checksums plain XXH3-128 as version 3 wrote
    them: no window sums to update) only the ranges the merge hashes again are reread:
    one overwritten in part, corrupt, refuses the merge; one no layer above touches,
    corrupt, is not baked in either (its checksum moves into the merged manifest, where
    verify still finds it) and does not stop retention. b1's vdb, which no merge reads
    (vdb was copied whole at b2), is dropped whatever it holds."""
    builder = await _five(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    _edit_manifest(_backups_dir(repo.root) / ids[0], _as_plain_xxh3(3, FIVE[0][0]))
    bottom = _backups_dir(repo.root) / ids[0] / "vda.qcow2"
    # [0, 1 MiB): b1 wrote [64 KiB, 128 KiB) over it, so the rest is hashed again.
    _flip_byte(bottom, _host_offset(bottom, 300 * KiB))
    with pytest.raises(RepositoryError, match="retention of vm1 refused"):
        await repo.apply_retention(DOMAIN, 2)
    _flip_byte(bottom, _host_offset(bottom, 300 * KiB))  # (back as it was)
    # Refused, and noted: the bottom image is named damaged until the note is removed.
    note = bottom.with_name("vda.qcow2.damaged")
    assert "checksum mismatch" in note.read_text()
    [damage] = (await repo.listing(DOMAIN)).damage_of(ids[0])
    assert (damage.kind, damage.target, damage.path) == ("image-damaged", "vda", bottom)
    with pytest.raises(RetentionRefusedError, match=f"backup {ids[0]} is damaged"):
        await repo.apply_retention(DOMAIN, 2)
    note.unlink()  # (the operator, once it is repaired)
    # [3 MiB, 3 MiB + 64 KiB): no layer above touches it.
    _flip_byte(bottom, _host_offset(bottom, 3 * MiB + 100))
    unneeded = _backups_dir(repo.root) / ids[1] / "vdb.qcow2"
    _flip_byte(unneeded, _host_offset(unneeded, 100_000))
    assert await repo.apply_retention(DOMAIN, 2) == ids[:3]
    [problem] = await repo.verify(DOMAIN)
    assert (problem.backup_id, problem.target, problem.offset) == (ids[3], "vda", 3 * MiB)
    # The range hashed again has a window sum from now on; the one moved keeps its own.
    merged = (await repo.backup(DOMAIN, ids[3])).disk("vda")
    assert merged is not None
    assert [(c.offset, c.algorithm) for c in merged.checksums] == [
        (0, "xxh3-128-w64k"),
        (MiB, "xxh3-128-w64k"),  # (b2's, b3's: written as window sums)
        (2 * MiB, "xxh3-128-w64k"),
        (3 * MiB, "xxh3-128"),
    ]


async def test_retention_updates_a_window_sum_from_the_windows_that_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A window sum of the bottom image overwritten in part is not hashed again: the
    merge reads, of its range, only the 64 KiB windows the layers above touch (in the
    bottom image before, in the merged one after). Corrupt bytes in the rest of the range
    are not read, so they do not stop retention; nor are they baked in: the updated
    checksum is still that of what was written, and verify finds them."""
    from agent.repository.verify import Verifier  # noqa: PLC0415 - its reads, counted

    builder = await _five(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    bottom = _backups_dir(repo.root) / ids[0] / "vda.qcow2"
    reads: list[tuple[str, int, int]] = []
    real = Verifier.digests

    async def counted(
        self: Verifier, path: Path, extents: Any, ranges: Any, algorithm: str
    ) -> list[str]:
        reads.extend((f"{path.parent.name}/{path.name}", o, n) for o, n in ranges)
        return await real(self, path, extents, ranges, algorithm)

    monkeypatch.setattr(Verifier, "digests", counted)
    # [0, 1 MiB): b1 wrote [64 KiB, 128 KiB) and [200000, 205000) over it; 300 KiB is in
    # a window nothing above touches.
    _flip_byte(bottom, _host_offset(bottom, 300 * KiB))
    assert await repo.apply_retention(DOMAIN, 2) == ids[:3]
    windows = [(64 * KiB, 64 * KiB), (192 * KiB, 64 * KiB)]
    assert sorted(reads) == sorted(
        (f"{backup_id}/vda.qcow2", o, n) for backup_id in (ids[0], ids[3]) for o, n in windows
    )
    merged = (await repo.backup(DOMAIN, ids[3])).disk("vda")
    assert merged is not None
    [first] = [c for c in merged.checksums if c.offset == 0]
    assert (first.length, first.algorithm) == (MiB, "xxh3-128-w64k")
    assert first.digest == digest_of(builder.points[ids[3]]["vda"][:MiB], 0)
    [problem] = await repo.verify(DOMAIN)
    assert (problem.backup_id, problem.target) == (ids[3], "vda")
    assert (problem.offset, problem.length) == (0, MiB)
    assert "checksum mismatch" in problem.message


async def test_retention_survives_a_crash_at_every_step(tmp_path: Path) -> None:
    points: list[str] = []
    recorder = await _five(tmp_path / "record", faults=points.append)
    await recorder.repo.apply_retention(DOMAIN, 2)
    kinds = {p.split(":")[1] for p in points}
    assert kinds == {
        "intent-written",
        "merged",
        "replaced",
        "manifest-replaced",
        "dropped",
        "deleted",
    }, points
    for index, crash_point in enumerate(points):
        root = tmp_path / f"crash-{index}"
        builder = await _five(root, faults=_crash_at(points, index))
        ids = builder.ids
        with pytest.raises(SimulatedCrash):
            await builder.repo.apply_retention(DOMAIN, 2)
        fresh = Repository(root)
        # Right after the crash, every backup still listed restores exactly.
        listed = await _assert_all_restore(fresh, builder, tmp_path)
        assert listed[-2:] == ids[3:], crash_point
        # The next agent finishes the job, at start-up or at its next retention.
        if index % 2:
            await fresh.cleanup_staging()
        else:
            assert await fresh.apply_retention(DOMAIN, 2) == []
        assert await _assert_all_restore(fresh, builder, tmp_path) == ids[3:], crash_point
        assert sorted(os.listdir(_backups_dir(root))) == sorted(ids[3:]), crash_point
        assert not (root / DOMAIN / "retention.json").exists()
        assert (await fresh.backup(DOMAIN, ids[3])).parent is None
        assert await fresh.verify(DOMAIN) == [], crash_point


def _crash_at(points: list[str], index: int) -> Callable[[str], None]:
    """A fault hook that raises at the ``index``-th point of a recorded run.

    Ids differ between runs, so points are matched by position in the sequence.
    """
    calls = iter(range(len(points) + 1))

    def hook(point: str, /) -> None:
        if next(calls) == index:
            assert point.split(":")[1] == points[index].split(":")[1]
            raise SimulatedCrash(point)

    return hook


# --- damage: one bad file hides nothing, breaks only what reads it --------------------------


def _cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _bad_field(path: Path) -> None:
    data = json.loads(path.read_text())
    data["checkpoint"] = 5
    path.write_text(json.dumps(data))


DAMAGES: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "garbage": (lambda p: p.write_bytes(bytes(range(256)) * 16), "manifest-not-json", "UTF-8"),
    "text": (lambda p: p.write_text("not a manifest\n"), "manifest-not-json", "not JSON"),
    "nested": (lambda p: p.write_text("[" * 100_000), "manifest-not-json", "nested too deeply"),
    "truncated": (_cut_in_half, "manifest-truncated", "truncated"),
    "empty": (lambda p: p.write_bytes(b""), "manifest-truncated", "truncated"),
    "deleted": (lambda p: p.unlink(), "manifest-missing", "is missing"),
    "unreadable": (_a_directory, "manifest-unreadable", "cannot read"),
    "invalid": (_bad_field, "manifest-invalid", "field checkpoint: wrong type int"),
}


async def _five_seconds_apart(root: Path) -> Builder:
    """FIVE with ids a second apart (made quickly, all five often share one second; a
    damaged backup in the tip's second counts as newer than the tip)."""
    repo = Repository(root)
    ids = iter(f"20261128T10000{i}Z-00000{i}" for i in range(5))
    repo.new_backup_id = lambda: next(ids)  # type: ignore[method-assign]
    builder = Builder(repo)
    for writes, full in FIVE:
        await builder.backup(writes, full=full, reason="bitmap-inconsistent" if full else None)
    return builder


@pytest.mark.parametrize("how", list(DAMAGES))
async def test_a_damaged_newest_manifest_hides_no_other_backup(tmp_path: Path, how: str) -> None:
    damage, kind, said = DAMAGES[how]
    builder = await _five(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    manifest = _backups_dir(repo.root) / ids[4] / "manifest.json"
    damage(manifest)
    listing = await repo.listing(DOMAIN)
    assert [m.backup_id for m in listing.manifests] == ids[:4]
    [found] = listing.damaged
    assert (found.backup_id, found.target, found.path, found.kind) == (ids[4], None, manifest, kind)
    assert said in found.error and str(manifest) in found.error
    assert [m.backup_id for m in await repo.backups(DOMAIN)] == ids[:4]
    latest = await repo.latest(DOMAIN)
    assert latest is not None and latest.backup_id == ids[3]
    # The plan's view: the tip is the newest readable backup, and a newer one is damaged.
    tip = await repo.tip(DOMAIN)
    assert tip.manifest == latest and tip.broken == {} and tip.newer == (found,)
    problems = await repo.verify(DOMAIN)
    assert [(p.backup_id, p.target, p.image) for p in problems] == [(ids[4], "-", manifest)]
    assert [(p.backup_id, p.target) for p in await repo.verify(DOMAIN, ids[4])] == [(ids[4], "-")]
    # Nothing good, nor the damaged backup's images, is deleted by retention or clean-up;
    # the refusal says why.
    with pytest.raises(RetentionRefusedError, match=f"backup {ids[4]} is damaged"):
        await repo.apply_retention(DOMAIN, 2)
    assert await repo.cleanup_staging() == []
    assert sorted(os.listdir(_backups_dir(repo.root))) == sorted(ids)
    assert (_backups_dir(repo.root) / ids[4] / "vda.qcow2").is_file()
    assert await _assert_all_restore(repo, builder, tmp_path) == ids[:4]


async def test_a_damaged_manifest_mid_chain_breaks_the_disks_that_restore_through_it(
    tmp_path: Path,
) -> None:
    """FIVE: vdb is full again in b2, so only vda's later backups read b1."""
    builder = await _five_seconds_apart(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    (_backups_dir(repo.root) / ids[1] / "manifest.json").write_text("{")
    listing = await repo.listing(DOMAIN)
    assert [(d.backup_id, d.target, d.kind) for d in listing.damaged] == [
        (ids[1], None, "manifest-truncated"),
        *((i, "vda", "backing-damaged") for i in ids[2:]),
    ]
    chained = {d.backup_id: d for d in listing.damaged if d.target == "vda"}
    assert all(f"vda of {i} restores through backup {ids[1]}" in chained[i].error for i in ids[2:])
    tip = await repo.tip(DOMAIN)
    assert tip.manifest is not None and tip.manifest.backup_id == ids[4]
    assert set(tip.broken) == {"vda"} and tip.newer == ()
    assert tip.broken["vda"] == chained[ids[4]]
    problems = await repo.verify(DOMAIN)
    assert {(p.backup_id, p.target) for p in problems} == {
        (ids[1], "-"),
        *((i, "vda") for i in ids[2:]),
    }
    with pytest.raises(RetentionRefusedError, match=f"backup {ids[1]} is damaged"):
        await repo.apply_retention(DOMAIN, 1)
    assert sorted(os.listdir(_backups_dir(repo.root))) == sorted(ids)


async def test_a_missing_image_breaks_that_disk_only_and_is_named_once(tmp_path: Path) -> None:
    builder = await _five(tmp_path / "repo")
    repo, ids = builder.repo, builder.ids
    gone = _backups_dir(repo.root) / ids[4] / "vdb.qcow2"
    gone.unlink()
    listing = await repo.listing(DOMAIN)
    assert len(listing.manifests) == 5
    assert [(d.backup_id, d.target, d.path, d.kind) for d in listing.damaged] == [
        (ids[4], "vdb", gone, "image-missing")
    ]
    tip = await repo.tip(DOMAIN)
    assert set(tip.broken) == {"vdb"} and tip.newer == ()
    problems = await repo.verify(DOMAIN)
    assert [(p.backup_id, p.target) for p in problems] == [(ids[4], "vdb")]
    assert f"image {gone} is missing" in problems[0].message


async def test_the_tip_reads_older_manifests_once_and_again_when_they_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent.repository import listing as listing_module  # noqa: PLC0415 - patched here

    builder = await _five_seconds_apart(tmp_path / "repo")
    repo = builder.repo
    read: list[str] = []
    real = listing_module.read_or_damage

    def counted(directory: Path) -> Any:
        read.append(directory.name)
        return real(directory)

    monkeypatch.setattr(listing_module, "read_or_damage", counted)
    b = builder.ids
    assert (await repo.tip(DOMAIN)).broken == {}
    assert sorted(read) == b  # vda's chain goes back to b0
    read.clear()
    assert (await repo.tip(DOMAIN)).broken == {}
    assert read == [b[4]]  # only the newest: the chain's links are known
    read.clear()
    (_backups_dir(repo.root) / b[0] / "manifest.json").write_text("[]")  # rewritten
    tip = await repo.tip(DOMAIN)
    assert read == [b[4], b[0]] and set(tip.broken) == {"vda"}
    assert f"restores through backup {b[0]}" in tip.broken["vda"].error


def test_a_chain_of_thousands_is_walked_without_recursion(tmp_path: Path) -> None:
    from agent.repository.listing import _Chains  # noqa: PLC0415 - the walk alone

    ids = [f"b{i:05d}" for i in range(3000)]
    for backup_id in ids:
        (tmp_path / backup_id).mkdir()
        (tmp_path / backup_id / "vda.qcow2").touch()
    links = {
        backup_id: {"vda.qcow2": ("vda", None if i == 0 else f"../{ids[i - 1]}/vda.qcow2")}
        for i, backup_id in enumerate(ids)
    }
    assert _Chains(tmp_path, links.get).damage(ids[-1], "vda", "vda.qcow2") is None
    (tmp_path / ids[7] / "vda.qcow2").unlink()
    chains = _Chains(tmp_path, links.get)
    top = chains.damage(ids[-1], "vda", "vda.qcow2")
    assert top is not None and top.kind == "backing-damaged"
    assert f"restores through backup {ids[7]}" in top.error
    assert chains.damage(ids[6], "vda", "vda.qcow2") is None


# --- manifest JSON -----------------------------------------------------------------------


def _manifest() -> Manifest:
    return Manifest(
        backup_id="20261125T183301Z-1a2b3c",
        domain="vm1",
        domain_uuid="6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11",
        created_at=1_764_095_581.25,
        completed_at=1_764_095_600.5,
        parent="20261124T183301Z-0a0b0c",
        checkpoint="cp-2",
        checkpoint_xml="<domaincheckpoint><name>cp-2</name><domain/></domaincheckpoint>",
        domain_xml="<domain type='kvm'/>",
        disks=(
            DiskManifest(
                "vda",
                "vda.qcow2",
                "incremental",
                None,
                4 * MiB,
                65536,
                "../20261124T183301Z-0a0b0c/vda.qcow2",
                (
                    RangeChecksum(0, 65536, _sha(1, 65536, 0)),
                    RangeChecksum(MiB, 512, _sha(2, 512, MiB)),
                ),
            ),
            DiskManifest("vdb", "vdb.qcow2", "full", "disk-added", 2 * MiB, 0, None, ()),
        ),
        merged_from=("20261120T000000Z-ffffff",),
    )


def test_manifest_json_round_trip() -> None:
    manifest = _manifest()
    text = manifest.to_json()
    assert Manifest.from_json(text, path="m.json") == manifest
    data = json.loads(text)
    assert (data["format"], data["version"]) == ("libvirt-backup-agent/backup", 4)
    assert data["disks"][0]["checksums"][1] == {
        "offset": MiB,
        "length": 512,
        "digest": _sha(2, 512, MiB),
        "algorithm": "xxh3-128-w64k",
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (_set("domain", _DELETE), "domain: missing"),
        (_set("disks.0.virtual_size", "4M"), "disks[0].virtual_size: wrong type"),
        (_set("version", True), "version: wrong type"),
        (_set("version", 5), "version: unsupported"),
        (_set("version", 1), "disks[0].checksums[0].sha256: missing"),  # 2's shape
        (_set("format", "something/else"), "format"),
        (_set("disks.0.checksums.1.digest", "xyz"), "disks[0].checksums[1].digest"),
        (_set("disks.0.checksums.1.algorithm", "md5"), "disks[0].checksums[1].algorithm"),
        (_set("disks.0.checksums.1.offset", 4 * MiB), "disks[0].checksums[1].length"),
        (_set("disks.1.mode", "differential"), "disks[1].mode"),
        (_set("disks.1.backing", "../20261124T183301Z-0a0b0c/vdb.qcow2"), "disks[1].backing"),
        (_set("disks.0.image", "../../etc/passwd"), "disks[0].image"),
        (_set("backup_id", "latest"), "backup_id"),
        (_set("merged_from", ["nope"]), "merged_from[0]"),
        (_set("colour", "blue"), "colour: unknown field"),
        (_set("disks.1.target", "vda"), "disks: duplicate"),
    ],
)
def test_malformed_manifest_names_the_field(
    edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    data = json.loads(_manifest().to_json())
    edit(data)
    with pytest.raises(RepositoryError) as caught:
        Manifest.from_json(json.dumps(data), path="/r/vm1/backups/x/manifest.json")
    assert field in str(caught.value) and caught.value.path == "/r/vm1/backups/x/manifest.json"


_XXH3_128_RE = re.compile(r"[0-9a-f]{32}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_DIGEST_RE = {"sha256": _SHA256_RE, "xxh3-128": _XXH3_128_RE, "xxh3-128-w64k": _XXH3_128_RE}


def _well_formed_checksum(value: object, virtual_size: int) -> RangeChecksum | None:
    """``value`` as a checksum if it is exactly what a manifest (version 2 on) may hold
    (offset, length, algorithm, digest, nothing else), else None: the parser's quick
    path before pydantic replaced it, kept here as the specification."""
    if type(value) is not dict or len(value) != 4:
        return None
    offset, length = value.get("offset"), value.get("length")
    algorithm, digest = value.get("algorithm"), value.get("digest")
    if type(offset) is not int or type(length) is not int or type(digest) is not str:
        return None
    if type(algorithm) is not str or (pattern := _DIGEST_RE.get(algorithm)) is None:
        return None
    if offset < 0 or length < 1 or offset + length > virtual_size:
        return None
    if not pattern.fullmatch(digest):
        return None
    return RangeChecksum(offset, length, digest, algorithm)


def _parsed_checksum(value: object, virtual_size: int) -> RangeChecksum | None:
    """``value`` as the one checksum of a disk of ``virtual_size`` in a manifest of the
    current version read by Manifest.from_json, or None if the manifest is refused."""
    data = json.loads(_manifest().to_json())
    data["disks"] = [{**data["disks"][1], "virtual_size": virtual_size, "checksums": [value]}]
    try:
        manifest = Manifest.from_json(json.dumps(data), path="m.json")
    except RepositoryError:
        return None
    [checksum] = manifest.disks[0].checksums
    return checksum


_CHECKSUM_VALUES = st.one_of(
    st.integers(-2, 5 * MiB),
    st.booleans(),
    st.none(),
    st.floats(0, 10),
    st.sampled_from(
        ["xxh3-128-w64k", "xxh3-128", "sha256", "md5", "a" * 32, "a" * 64, "A" * 32, "x"]
    ),
    st.lists(st.integers(), max_size=1),
)


@given(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["offset", "length", "algorithm", "digest", "sha256", "colour"]),
            _CHECKSUM_VALUES,
        ),
        st.fixed_dictionaries(  # mostly well-formed: the quick path's own territory
            {
                "offset": st.one_of(st.integers(-1, 4 * MiB), st.just(True)),
                "length": st.one_of(st.integers(0, 4 * MiB), st.just(1.0)),
                "algorithm": st.sampled_from(["xxh3-128-w64k", "xxh3-128", "sha256", "crc32"]),
                "digest": st.sampled_from(["0" * 32, "f" * 64, "F" * 32, "0" * 31]),
            },
            optional={"colour": st.just("blue")},
        ),
        _CHECKSUM_VALUES,
    )
)
def test_the_quick_checksum_path_accepts_exactly_what_the_field_parser_accepts(
    value: Any,
) -> None:
    size = 4 * MiB
    parsed = _parsed_checksum(value, size)
    assert _well_formed_checksum(value, size) == parsed


_GOOD = {"offset": 0, "length": 512, "algorithm": "xxh3-128", "digest": "0" * 32}


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"algorithm": "sha256", "digest": "f" * 64},
        {"algorithm": "xxh3-128-w64k"},
        {"algorithm": "xxh3-128-w64k", "digest": "f" * 64},  # a window sum has 32 digits
        {"offset": -1},
        {"offset": True},
        {"length": 0},
        {"length": 512.0},
        {"offset": 4 * MiB - 511},  # ends beyond the virtual size
        {"algorithm": "md5"},
        {"algorithm": ["xxh3-128"]},
        {"digest": "A" * 32},
        {"digest": "0" * 31},
        {"algorithm": "sha256"},  # a 32-digit digest is not SHA-256
        {"colour": "blue"},
        {"digest": None},
    ],
)
def test_the_quick_checksum_path_near_misses(change: dict[str, Any]) -> None:
    value = {**_GOOD, **change}
    if change.get("digest", "") is None:
        del value["digest"]
    parsed = _parsed_checksum(value, 4 * MiB)
    accepted: list[dict[str, Any]] = [
        {},
        {"algorithm": "sha256", "digest": "f" * 64},
        {"algorithm": "xxh3-128-w64k"},
    ]
    assert (parsed is not None) == (change in accepted)
    assert _well_formed_checksum(value, 4 * MiB) == parsed


@pytest.mark.parametrize(("text", "expected"), [("{", "not JSON"), ("[]", "(document)")])
def test_manifest_that_is_not_an_object(text: str, expected: str) -> None:
    with pytest.raises(RepositoryError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Manifest.from_json(text, path="m.json")


def test_incremental_disk_without_backing_needs_merged_from() -> None:
    data = json.loads(_manifest().to_json())
    data["disks"][0]["backing"] = None
    assert Manifest.from_json(json.dumps(data), path="m").disks[0].backing is None
    data["merged_from"] = []
    with pytest.raises(RepositoryError, match=r"disks\[0\].backing"):
        Manifest.from_json(json.dumps(data), path="m")


async def test_verify_reports_a_range_the_overlay_does_not_hold(tmp_path: Path) -> None:
    builder = await _five(tmp_path / "repo")
    b3 = builder.ids[3]
    # Zeros claimed written at 3 MiB, which b3 never wrote: reading through the chain (or
    # the bare layer as zeros) would wrongly accept it; the bytes must be in this layer.
    # (The checksum new backups record: that of zeroes, which the bytes read as.)
    claim = {"offset": 3 * MiB + 4096, "length": 4096, "digest": _sha(0, 4096, 3 * MiB + 4096)}
    claim["algorithm"] = "xxh3-128-w64k"
    _edit_manifest(
        _backups_dir(builder.repo.root) / b3,
        lambda d: d["disks"][0]["checksums"].append(claim),
    )
    problems = await builder.repo.verify(DOMAIN)
    assert [(p.backup_id, p.offset, p.length) for p in problems] == [(b3, 3 * MiB + 4096, 4096)]
    assert "not allocated in this image" in problems[0].message


# --- manifest version 3: excluded disks, disks stored as what changed ---------------------

RAW_SIZE = 2 * BLOCK + MiB  # three blocks, the last one half a block
PIECE = 64 * KiB


def _v3_manifest() -> Manifest:
    """vda incremental; vdb read in full, stored as what changed on the previous point:
    block 0 written whole, two pieces of the short last block, which ``blocks`` says."""
    last = 2 * BLOCK
    checksums = (
        RangeChecksum(0, BLOCK, _sha(1, BLOCK, 0)),
        RangeChecksum(last, PIECE, _sha(0, PIECE, last)),  # a piece that became zeroes
        RangeChecksum(last + 4 * PIECE, 2 * PIECE, _sha(3, 2 * PIECE, last + 4 * PIECE)),
    )
    vdb = DiskManifest(
        "vdb",
        "vdb.qcow2",
        "full",
        "format-raw: no persistent bitmap",
        RAW_SIZE,
        BLOCK + 2 * PIECE,
        "../20261124T183301Z-0a0b0c/vdb.qcow2",
        checksums,
        block_size=BLOCK,
        blocks=(RangeChecksum(last, MiB, _sha(3, MiB, last)),),  # what the last block holds now
    )
    excluded = (ExcludedDisk("hdc", "device-cdrom"), ExcludedDisk("vdc", "excluded-by-config"))
    return replace(_manifest(), disks=(_manifest().disks[0], vdb), excluded=excluded)


def _v3(edit: Callable[[dict[str, Any]], None]) -> Manifest:
    data = json.loads(_v3_manifest().to_json())
    edit(data)
    return Manifest.from_json(json.dumps(data), path="m.json")


def test_manifest_version_3_round_trips_excluded_disks_block_size_and_blocks() -> None:
    manifest = _v3_manifest()
    text = manifest.to_json()
    assert Manifest.from_json(text, path="m.json") == manifest
    data = json.loads(text)
    assert data["version"] == MANIFEST_VERSION == 4
    assert data["excluded"] == [
        {"target": "hdc", "reason": "device-cdrom"},
        {"target": "vdc", "reason": "excluded-by-config"},
    ]
    assert [d["block_size"] for d in data["disks"]] == [None, BLOCK]
    assert data["disks"][0]["blocks"] == []
    assert data["disks"][1]["blocks"] == [
        {
            "offset": 2 * BLOCK,
            "length": MiB,
            "digest": _sha(3, MiB, 2 * BLOCK),
            "algorithm": "xxh3-128-w64k",
        }
    ]
    summary = manifest.summary()
    assert summary["excluded"] == data["excluded"]
    disks = summary["disks"]
    assert isinstance(disks, list)
    assert [(d["target"], d["mode"], d["layered"]) for d in disks] == [
        ("vda", "incremental", False),
        ("vdb", "full", True),
    ]


def test_a_full_image_on_a_backing_is_only_a_disk_stored_as_what_changed() -> None:
    standalone = _v3(_set("disks.1.backing", None))
    assert standalone.disks[1].backing is None and standalone.disks[1].block_size == BLOCK

    def without_block_size(data: dict[str, Any]) -> None:
        disk = data["disks"][1]
        disk["block_size"], disk["blocks"] = None, []
        disk["checksums"] = disk["checksums"][:1]

    with pytest.raises(RepositoryError, match=r"disks\[1\]\.backing: a full image has no backing"):
        _v3(without_block_size)


def _piece(offset: int, length: int) -> dict[str, Any]:
    return {"offset": offset, "length": length, "algorithm": "xxh3-128", "digest": "0" * 32}


def _first_checksum(value: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        data["disks"][1]["checksums"][0] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        # Blocks are of a disk read in full, not of an increment.
        (_set("disks.1.mode", "incremental"), r"disks\[1\]\.block_size: only a disk read in full"),
        # A checksum across the edge of two blocks.
        (
            _first_checksum(_piece(BLOCK - PIECE, 2 * PIECE)),
            r"disks\[1\]\.checksums\[0\]: spans two blocks",
        ),
        (
            _first_checksum(_piece(0, BLOCK + PIECE)),
            r"disks\[1\]\.checksums\[0\]: spans two blocks",
        ),
        # A piece of a block that ``blocks`` does not describe.
        (
            _set("disks.1.checksums.0.length", PIECE),
            r"disks\[1\]\.checksums\[0\]: part of a block that blocks lacks \(block 0\)",
        ),
        (
            _set("disks.1.blocks", []),
            r"disks\[1\]\.checksums\[1\]: part of a block that blocks lacks \(block 4194304\)",
        ),
        # ``blocks``: whole blocks (the last as long as what is left), each once.
        (_set("disks.1.blocks.0.length", BLOCK), r"disks\[1\]\.blocks\[0\]: not one whole"),
        (_set("disks.1.blocks.0.offset", BLOCK + PIECE), r"disks\[1\]\.blocks\[0\]: not one"),
        (
            _set("disks.1.blocks", [_piece(2 * BLOCK, MiB), _piece(2 * BLOCK, MiB)]),
            r"disks\[1\]\.blocks\[1\]: not one whole",
        ),
        (_set("disks.1.blocks.0.digest", "0" * 64), r"disks\[1\]\.blocks\[0\]\.digest: invalid"),
        (_set("disks.1.blocks.0.algorithm", "md5"), r"disks\[1\]\.blocks\[0\]\.algorithm"),
        (_set("disks.1.blocks", _DELETE), r"disks\[1\]\.blocks: missing"),
        (_set("disks.0.blocks", [_piece(0, BLOCK)]), r"disks\[0\]\.blocks: a disk without"),
        (_set("disks.1.block_size", 1024), r"disks\[1\]\.block_size: 1024 is less than 4096"),
        (_set("disks.1.block_size", "2M"), r"disks\[1\]\.block_size: wrong type"),
        (_set("disks.1.block_size", _DELETE), r"disks\[1\]\.block_size: missing"),
        (_set("excluded", _DELETE), "excluded: missing"),
        (_set("excluded.0.reason", ""), r"excluded\[0\]\.reason"),
        (_set("excluded.0.target", "../x"), r"excluded\[0\]\.target: invalid value"),
        (_set("excluded.0.colour", "blue"), r"excluded\[0\]\.colour: unknown field"),
        (_set("excluded.1.target", "vdb"), r"excluded\[1\]\.target: 'vdb' is a disk of the"),
    ],
)
def test_malformed_version_3_manifest_names_the_field(
    edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    with pytest.raises(RepositoryError, match=field):
        _v3(edit)


def test_pieces_of_a_block_that_blocks_describes_are_accepted_anywhere_in_it() -> None:
    def pieces(data: dict[str, Any]) -> None:
        disk = data["disks"][1]
        disk["checksums"] = [_piece(BLOCK + 4096, 512), _piece(2 * BLOCK - PIECE, PIECE)]
        disk["blocks"] = [_piece(BLOCK, BLOCK)]

    disk = _v3(pieces).disks[1]
    assert [(c.offset, c.length) for c in disk.checksums] == [
        (BLOCK + 4096, 512),
        (2 * BLOCK - PIECE, PIECE),
    ]
    assert [(b.offset, b.length) for b in disk.blocks] == [(BLOCK, BLOCK)]
    # A block both written whole and described in blocks: which would say what it holds?
    with pytest.raises(RepositoryError, match=r"checksums\[0\]: also in blocks \(block 0\)"):
        _v3(lambda d: d["disks"][1]["blocks"].append(_piece(0, BLOCK)))


def test_a_disk_excluded_twice_is_refused() -> None:
    with pytest.raises(RepositoryError, match=r"excluded\[1\]\.target"):
        _v3(_set("excluded.1.target", "hdc"))


def test_a_disk_excluded_twice_is_refused_as_a_duplicate() -> None:
    with pytest.raises(RepositoryError, match=r"excluded\[1\]\.target: duplicate"):
        _v3(_set("excluded.1.target", "hdc"))


def _as_version_2(data: dict[str, Any]) -> None:
    data["version"] = 2
    del data["excluded"]
    for disk in data["disks"]:
        del disk["block_size"], disk["blocks"], disk["point_digest"]


def test_a_version_2_manifest_still_reads() -> None:
    data = json.loads(_manifest().to_json())
    _as_version_2(data)
    manifest = Manifest.from_json(json.dumps(data), path="m.json")
    assert manifest.version == 2 and manifest.excluded == ()
    assert [(d.block_size, d.blocks) for d in manifest.disks] == [(None, ())] * 2
    assert replace(manifest, version=MANIFEST_VERSION) == _manifest()


async def test_a_repository_written_with_version_2_manifests_lists_and_verifies(
    tmp_path: Path,
) -> None:
    """As the agent wrote them before window sums: plain XXH3-128 ranges, still verified."""
    builder = await _five(tmp_path / "repo")
    for backup_id, (writes, _) in zip(builder.ids, FIVE, strict=True):
        _edit_manifest(_backups_dir(builder.repo.root) / backup_id, _as_plain_xxh3(2, writes))
    repo = Repository(tmp_path / "repo")
    manifests = await repo.backups(DOMAIN)
    assert [m.backup_id for m in manifests] == builder.ids
    assert {m.version for m in manifests} == {2}
    assert {c.algorithm for m in manifests for d in m.disks for c in d.checksums} == {"xxh3-128"}
    assert await repo.verify(DOMAIN) == []
    image = _backups_dir(repo.root) / builder.ids[1] / "vda.qcow2"
    _flip_byte(image, _host_offset(image, 64 * KiB + 100))
    [problem] = await repo.verify(DOMAIN)
    assert (problem.backup_id, problem.offset, problem.length) == (
        builder.ids[1],
        64 * KiB,
        64 * KiB,
    )


def test_version_3_fields_are_unknown_in_a_version_1_manifest() -> None:
    data = json.loads(_manifest().to_json())
    _as_version_2(data)
    data["version"] = 1
    for disk in data["disks"]:
        disk["checksums"] = [
            {"offset": c["offset"], "length": c["length"], "sha256": "f" * 64}
            for c in disk["checksums"]
        ]
    assert Manifest.from_json(json.dumps(data), path="m.json").version == 1
    data["excluded"] = []
    with pytest.raises(RepositoryError, match="excluded: unknown field"):
        Manifest.from_json(json.dumps(data), path="m.json")
    del data["excluded"]
    data["disks"][0]["block_size"] = BLOCK
    with pytest.raises(RepositoryError, match=r"disks\[0\]\.block_size: unknown field"):
        Manifest.from_json(json.dumps(data), path="m.json")


def test_a_compact_manifest_is_read_by_the_model_of_its_version() -> None:
    """The writer's layout lets the reader guess the version; a document written
    otherwise (no spaces) is still read by its own version's model."""
    v3 = _v3_manifest()
    compact = json.dumps(json.loads(v3.to_json()), separators=(",", ":"))
    assert Manifest.from_json(compact, path="m.json") == v3
    data = json.loads(compact)
    data["version"] = 3  # (plain XXH3-128 ranges, as 3 wrote them)
    for disk in data["disks"]:
        for checksum in [*disk["checksums"], *disk["blocks"]]:
            checksum["algorithm"] = "xxh3-128"
    with pytest.raises(RepositoryError, match=r"disks\[0\]\.point_digest: unknown field"):
        Manifest.from_json(json.dumps(data, separators=(",", ":")), path="m.json")
    for disk in data["disks"]:
        del disk["point_digest"]  # (version 4's)
    older = Manifest.from_json(json.dumps(data, separators=(",", ":")), path="m.json")
    assert older.version == 3 and older.excluded == v3.excluded
    assert {c.algorithm for d in older.disks for c in [*d.checksums, *d.blocks]} == {"xxh3-128"}
    data["version"] = 5
    with pytest.raises(RepositoryError, match=r"version: unsupported \(this agent reads 1 to 4\)"):
        Manifest.from_json(json.dumps(data, separators=(",", ":")), path="m.json")


# --- retention of a disk stored as what changed -------------------------------------------


@dataclass
class _Layers:
    """Points of one disk ``vdr`` read in full and stored as what changed, built by hand
    as the copy would: each point writes what differs (zeroes as zeroes), records the
    checksum of each range written, and in ``blocks`` that of each block written in part."""

    repo: Repository
    content: bytearray = field(default_factory=lambda: bytearray(RAW_SIZE))
    points: dict[str, bytes] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)

    async def point(self, writes: list[Write], *, block_size: int | None = BLOCK) -> Manifest:
        """A point that writes ``writes`` (each within one block; pattern 0: zeroes)."""
        parent = await self.repo.latest(DOMAIN)
        backup_id = self.repo.new_backup_id()
        staging = await self.repo.stage(DOMAIN, backup_id)
        image, backing = await self.repo.create_image(staging, "vdr", RAW_SIZE, backing=parent)
        checksums, parts = [], set()
        for offset, length, fill in writes:
            command = f"write -q -z {offset} {length}" if fill == 0 else None
            command = command or f"write -q -P {fill:#x} {offset} {length}"
            _run(QEMU_IO, "-f", "qcow2", "-c", command, staging / image)
            self.content[offset : offset + length] = bytes([fill]) * length
            checksums.append(RangeChecksum(offset, length, _sha(fill, length, offset)))
            start = offset - offset % BLOCK
            if (offset, length) != (start, min(BLOCK, RAW_SIZE - start)):
                parts.add(start)
        blocks = tuple(
            RangeChecksum(o, n, digest_of(bytes(self.content[o : o + n]), o))
            for o in sorted(parts)
            for n in [min(BLOCK, RAW_SIZE - o)]
        )
        disk = DiskManifest(
            "vdr",
            image,
            "full",
            "format-raw: no persistent bitmap",
            RAW_SIZE,
            sum(c.length for c in checksums),
            backing,
            tuple(checksums),
            block_size=block_size,
            blocks=blocks if block_size is not None else (),
        )
        manifest = Manifest(
            backup_id=backup_id,
            domain=DOMAIN,
            domain_uuid="6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11",
            created_at=1_700_000_000.0 + len(self.ids),
            completed_at=1_700_000_000.5 + len(self.ids),
            parent=None if parent is None else parent.backup_id,
            checkpoint=f"cp-{len(self.ids)}",
            checkpoint_xml="<domaincheckpoint/>",
            domain_xml="<domain/>",
            disks=(disk,),
        )
        await self.repo.publish(DOMAIN, staging, manifest)
        self.ids.append(backup_id)
        self.points[backup_id] = bytes(self.content)
        return manifest

    async def assert_all_restore(self, scratch: Path) -> list[str]:
        listed = [m.backup_id for m in await self.repo.backups(DOMAIN)]
        for backup_id in listed:
            restored = await _restored(self.repo, backup_id, "vdr", scratch / "point.raw")
            assert restored == self.points[backup_id], f"{backup_id} differs"
        return listed


def _blocks_of(manifest: Manifest) -> dict[int, str]:
    disk = manifest.disk("vdr")
    assert disk is not None
    return {c.offset: c.digest for c in disk.checksums}


async def test_retention_merges_a_chain_of_layers_into_an_image_that_describes_its_blocks(
    tmp_path: Path,
) -> None:
    from agent.repository.blocks import describe, disk_chain  # noqa: PLC0415

    layers = _Layers(Repository(tmp_path / "repo"))
    last = 2 * BLOCK
    # Standalone: the blocks that are not zero.
    await layers.point([(0, BLOCK, 0x31), (last, MiB, 0x33)])
    # A block of data; the last block's first piece and its end become zeroes, and a
    # piece of it new data: written in part.
    await layers.point(
        [
            (BLOCK, BLOCK, 0x41),
            (last, PIECE, 0),
            (last + PIECE, PIECE, 0x43),
            (last + 2 * PIECE, MiB - 2 * PIECE, 0),
        ]
    )
    await layers.point([(0, BLOCK, 0x51), (BLOCK + PIECE, PIECE, 0x52)])
    repo, ids = layers.repo, layers.ids
    assert await layers.assert_all_restore(tmp_path) == ids
    now_last = bytes(PIECE) + b"\x43" * PIECE + bytes(MiB - 2 * PIECE)
    assert await repo.apply_retention(DOMAIN, 2) == ids[:1]
    merged = await repo.backup(DOMAIN, ids[1])
    [disk] = merged.disks
    assert (disk.mode, disk.backing, disk.block_size, disk.blocks) == ("full", None, BLOCK, ())
    # Every block that is not zero at that point, whole, its newest checksum; nothing else.
    assert _blocks_of(merged) == {
        0: _sha(0x31, BLOCK, 0),
        BLOCK: _sha(0x41, BLOCK, BLOCK),
        last: digest_of(now_last, last),
    }
    assert [c.length for c in disk.checksums] == [BLOCK, BLOCK, MiB]
    assert await layers.assert_all_restore(tmp_path) == ids[1:]
    assert await repo.verify(DOMAIN) == []
    # What the next copy would compare with: the same, through the merged image.
    manifests = await repo.backups(DOMAIN)
    by_id = {m.backup_id: m for m in manifests}
    chain = disk_chain(by_id.get, manifests[-1], "vdr")
    assert chain is not None
    described = describe(chain)
    assert described is not None
    block_1 = b"\x41" * PIECE + b"\x52" * PIECE + b"\x41" * (BLOCK - 2 * PIECE)
    expected = {
        0: _sha(0x51, BLOCK, 0),
        BLOCK: digest_of(block_1, BLOCK),
        last: digest_of(now_last, last),
    }
    assert {o: c.digest for o, c in described.items()} == expected
    # Merged again: the newest point, standalone, describes the same blocks, whole.
    assert await repo.apply_retention(DOMAIN, 1) == ids[1:2]
    newest = await repo.backup(DOMAIN, ids[2])
    assert (newest.disks[0].backing, newest.disks[0].block_size) == (None, BLOCK)
    assert (_blocks_of(newest), newest.disks[0].blocks) == (expected, ())
    assert newest.merged_from == tuple(ids[:2])
    assert await layers.assert_all_restore(tmp_path) == ids[2:]
    assert await repo.verify(DOMAIN) == []


async def test_a_merged_chain_that_did_not_describe_its_blocks_no_longer_claims_to(
    tmp_path: Path,
) -> None:
    layers = _Layers(Repository(tmp_path / "repo"))
    await layers.point([(0, BLOCK, 0x31)], block_size=None)  # a full copy of what was allocated
    await layers.point([(BLOCK, BLOCK, 0x41)])
    repo, ids = layers.repo, layers.ids
    assert await repo.apply_retention(DOMAIN, 1) == ids[:1]
    merged = await repo.backup(DOMAIN, ids[1])
    assert (merged.disks[0].backing, merged.disks[0].block_size) == (None, None)
    # Its own checksums still hold for what it wrote (verify reads them in the image).
    assert _blocks_of(merged) == {BLOCK: _sha(0x41, BLOCK, BLOCK)}
    assert await layers.assert_all_restore(tmp_path) == ids[1:]
    assert await repo.verify(DOMAIN) == []


async def test_the_merge_proves_what_a_middle_layer_wrote_where_nothing_newer_did(
    tmp_path: Path,
) -> None:
    """A chain of four (full [0, 1 MiB); [0, 256 KiB); [64 KiB, 128 KiB); elsewhere)
    merged at once: the second image's range is overwritten in part by the third. A byte
    of it that nothing newer overwrote, rotted in the merged image right after the
    commit (at the crash point between commit and proof), is caught by the proof:
    retention fails naming it and nothing is linked in place."""
    builder = Builder(Repository(tmp_path / "repo"))
    for writes in (
        [(0, MiB, 0x31)],
        [(0, 256 * KiB, 0x32)],
        [(64 * KiB, 64 * KiB, 0x33)],
        [(3 * MiB, 64 * KiB, 0x34)],
    ):
        await builder.backup({"vda": writes})
    ids = builder.ids
    bottom = _backups_dir(builder.repo.root) / ids[0] / "vda.qcow2"

    def rot(point: str) -> None:
        if point.startswith("retention:merged:"):
            _flip_byte(bottom, _host_offset(bottom, 200 * KiB))  # the second's, untouched

    repo = Repository(tmp_path / "repo", faults=rot)
    with pytest.raises(RepositoryError, match="did not write what its layers hold"):
        await repo.apply_retention(DOMAIN, 1)
    kept = _backups_dir(repo.root) / ids[3] / "vda.qcow2"
    assert _run(QEMU_IMG, "info", "-U", "--output=json", kept).count('"backing-filename"') == 1
