"""A repository that is not where it should be: unmounted, another one mounted in its
place, read-only, full; and ``backup-agent repository init``.

The repository is a real mount: a tmpfs (the "holder") whose ``data`` directory is
bind-mounted onto the configured repository path, so that unmounting the bind leaves
the bare directory of the root filesystem there while the data survives in the holder,
and mounting it again brings the repository back, as with an NFS export or a disk.

Each case, against a real agent and a real domain: a first backup (which initialises the
repository's marker and records its id), the fault, then a backup that must fail with a
clear error having written nothing (the bare directory stays empty, another repository
unchanged), with no libvirt job left and no checkpoint added; restore and retention
fail the same way; the fault is undone and the next backup succeeds (incremental: the
chain survived) and restores byte for byte. Every mount is unmounted in a ``finally``,
by its path, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from agent.backup.run import Backups
from agent.core.config import AgentConfig
from agent.core.errors import (
    BackupError,
    RepositoryMarkerError,
    RepositoryReadOnlyError,
    RepositorySpaceError,
)
from agent.repository.marker import ID_FILE, MARKER_FILE
from agent.repository.store import Repository
from tests.guest_model import (
    SIZE,
    Guest,
    KiB,
    MiB,
    agent_cli,
    assert_restores,
    config,
    config_file,
    started_guest,
)
from tests.harness import TWO_DISKS, RunningAgent, running_agent
from tests.test_repository import Builder
from tests.testbed.daemon import live_processes_mentioning
from tests.testbed.domains import DomainFactory

pytestmark = pytest.mark.faults


# --- mounts ------------------------------------------------------------------------------


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")


def _unmount_all(path: Path) -> None:
    """Every mount stacked on ``path``, by its path; lazily if one is busy."""
    for _ in range(10):
        if not os.path.ismount(path):
            return
        try:
            _run("umount", str(path))
        except RuntimeError:
            _run("umount", "-l", str(path))


@dataclass(frozen=True)
class Mounts:
    holder: Path  # the tmpfs
    data: Path  # the repository's data, inside it
    repo: Path  # the configured repository path: data bind-mounted here, or bare

    async def bind(self, source: Path | None = None) -> None:
        await asyncio.to_thread(_run, "mount", "--bind", str(source or self.data), str(self.repo))

    async def unbind(self) -> None:
        await asyncio.to_thread(_run, "umount", str(self.repo))
        assert not await asyncio.to_thread(os.path.ismount, self.repo)

    async def remount_holder(self, options: str) -> None:
        await asyncio.to_thread(_run, "mount", "-o", f"remount,{options}", str(self.holder))


@contextlib.asynccontextmanager
async def mounted_repository(tmp_path: Path, size: str = "512M") -> AsyncIterator[Mounts]:
    mounts = Mounts(tmp_path / "holder", tmp_path / "holder" / "data", tmp_path / "repo")
    await asyncio.to_thread(mounts.holder.mkdir)
    await asyncio.to_thread(mounts.repo.mkdir)
    try:
        await asyncio.to_thread(
            _run,
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size={size},mode=0700",
            "tmpfs",
            str(mounts.holder),
        )
        await asyncio.to_thread(mounts.data.mkdir)
        await mounts.bind()
        yield mounts
    finally:
        await asyncio.to_thread(_unmount_all, mounts.repo)
        await asyncio.to_thread(_unmount_all, mounts.holder)


# --- checks ------------------------------------------------------------------------------


def _checkpoints(guest: Guest) -> set[str]:
    return {c.getName() for c in guest.td.dom().listAllCheckpoints()}


def _libvirt_job(guest: Guest) -> int:
    job_type: int = guest.td.dom().jobInfo()[0]
    return job_type


def _files_below(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if not p.is_dir()) if path.exists() else []


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


async def _assert_nothing_started(cfg: AgentConfig, guest: Guest, checkpoints: set[str]) -> None:
    """No libvirt job, no new checkpoint, no intent, scratch file or qemu-nbd left."""
    assert await asyncio.to_thread(_libvirt_job, guest) == libvirt.VIR_DOMAIN_JOB_NONE
    assert await asyncio.to_thread(_checkpoints, guest) == checkpoints
    assert await asyncio.to_thread(_files_below, cfg.run_path / "jobs") == []
    assert await asyncio.to_thread(_files_below, cfg.scratch_path) == []
    assert live_processes_mentioning(str(cfg.repository_path)) == []


async def _backup_succeeds_and_restores(
    backups: Backups, guest: Guest, tmp_path: Path, parent: str
) -> None:
    """The next backup: incremental on ``parent`` (the chain survived the fault), every
    disk restoring byte for byte what the guest holds, no libvirt job left."""
    await guest.write("vda", 40 * MiB, 256 * KiB, 0x7E)
    expected = guest.snapshot()
    result = await backups.run(guest.td.uuid)
    assert {(d.mode, d.reason) for d in result.disks} == {("incremental", None)}
    manifest = await backups.repository.backup(guest.td.name, result.backup_id)
    assert manifest.parent == parent
    await assert_restores(backups.repository, guest.td.name, result.backup_id, expected, tmp_path)
    assert await asyncio.to_thread(_libvirt_job, guest) == libvirt.VIR_DOMAIN_JOB_NONE


@dataclass
class Scene:
    run: RunningAgent
    guest: Guest
    cfg: AgentConfig
    first: str  # the first backup's id
    first_content: dict[str, bytes]
    repository_id: str


@contextlib.asynccontextmanager
async def backed_up_once(
    tmp_path: Path, domain_factory: DomainFactory, mounts: Mounts
) -> AsyncIterator[Scene]:
    """A running agent on the mounted repository, a two-disk guest, its first backup;
    then more guest writes (the next backup has something to copy)."""
    cfg = config(tmp_path, repository={"path": str(mounts.repo)})
    async with running_agent(cfg) as run:
        guest = await started_guest(run, domain_factory, TWO_DISKS)
        await guest.write("vda", 0, 1 * MiB, 0x71)
        await guest.write("sda", 3 * MiB, 64 * KiB, 0x72)
        first_content = guest.snapshot()
        first = await run.agent.backups.run(guest.td.uuid)
        # The first backup initialised the repository: its marker, and the id recorded.
        marker = json.loads((mounts.data / MARKER_FILE).read_text())
        assert (cfg.agent.state_dir / ID_FILE).read_text().strip() == marker["id"]
        await guest.write("vda", 8 * MiB, 2 * MiB, 0x73)
        await guest.write("sda", 0, 64 * KiB, 0x74)
        yield Scene(run, guest, cfg, first.backup_id, first_content, marker["id"])


async def _refused_everywhere(scene: Scene, tmp_path: Path, said: str, unchanged: Path) -> None:
    """A backup, a restore (in the agent and by the CLI) and retention all fail with an
    error saying ``said``; ``unchanged`` (what is mounted, or the bare directory) is
    exactly as it was, and nothing was started."""
    backups, guest, cfg = scene.run.agent.backups, scene.guest, scene.cfg
    checkpoints = await asyncio.to_thread(_checkpoints, guest)
    before = await asyncio.to_thread(_tree, unchanged)
    with pytest.raises(RepositoryMarkerError) as refused:
        await backups.run(guest.td.uuid)
    assert said in str(refused.value), str(refused.value)
    assert str(cfg.repository_path) in str(refused.value)
    await _assert_nothing_started(cfg, guest, checkpoints)
    dest = tmp_path / "refused-vda.raw"
    with pytest.raises(RepositoryMarkerError, match=re.escape(said)):
        await backups.repository.restore(guest.td.name, scene.first, "vda", dest, fmt="raw")
    with pytest.raises(RepositoryMarkerError, match=re.escape(said)):
        await backups.repository.apply_retention(guest.td.name, 1)
    agent_toml = config_file(tmp_path, cfg)
    for verb in (
        ["restore", guest.td.name, "--backup", scene.first, "--disk", "vda", "--to", str(dest)],
        ["backups", guest.td.name],
    ):
        done = await asyncio.to_thread(agent_cli, agent_toml, *verb)
        assert done.returncode == 1 and said in done.stderr, (verb, done.stderr)
    assert not dest.exists()
    assert await asyncio.to_thread(_tree, unchanged) == before


# --- the cases ---------------------------------------------------------------------------


@pytest.mark.libvirt
async def test_an_unmounted_repository_is_never_written_to(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with (
        mounted_repository(tmp_path) as mounts,
        backed_up_once(tmp_path, domain_factory, mounts) as scene,
    ):
        await mounts.unbind()
        assert os.listdir(mounts.repo) == []  # the bare mount point
        said = (
            f"repository {mounts.repo} has no marker {mounts.repo / MARKER_FILE} (is it mounted?)"
        )
        await _refused_everywhere(scene, tmp_path, said, mounts.repo)
        assert os.listdir(mounts.repo) == []  # not even a directory or a probe's file
        await mounts.bind()
        backups = scene.run.agent.backups
        await _backup_succeeds_and_restores(backups, scene.guest, tmp_path, scene.first)
        await assert_restores(
            backups.repository, scene.guest.td.name, scene.first, scene.first_content, tmp_path
        )


@pytest.mark.libvirt
async def test_another_repository_mounted_in_its_place_is_left_alone(
    domain_factory: DomainFactory, tmp_path: Path
) -> None:
    async with (
        mounted_repository(tmp_path) as mounts,
        backed_up_once(tmp_path, domain_factory, mounts) as scene,
    ):
        # Another host's repository, with a backup in it, mounted where ours should be.
        other = mounts.holder / "other"
        await Builder(Repository(other, state_dir=tmp_path / "other-state")).backup(
            {"vda": [(0, MiB, 0x55)]}
        )
        other_id = json.loads((other / MARKER_FILE).read_text())["id"]
        assert other_id != scene.repository_id
        await mounts.unbind()
        await mounts.bind(other)
        said = (
            f"repository {mounts.repo} is repository {other_id}, this agent uses "
            f"{scene.repository_id} (is the right filesystem mounted?)"
        )
        await _refused_everywhere(scene, tmp_path, said, other)
        await mounts.unbind()
        await mounts.bind()
        await _backup_succeeds_and_restores(
            scene.run.agent.backups, scene.guest, tmp_path, scene.first
        )


@pytest.mark.libvirt
@pytest.mark.parametrize("how", ["filesystem", "bind mount"])
async def test_a_read_only_repository_fails_the_backup_and_leaves_nothing(
    domain_factory: DomainFactory, tmp_path: Path, how: str
) -> None:
    async with (
        mounted_repository(tmp_path) as mounts,
        backed_up_once(tmp_path, domain_factory, mounts) as scene,
    ):
        backups, guest, cfg = scene.run.agent.backups, scene.guest, scene.cfg
        checkpoints = await asyncio.to_thread(_checkpoints, guest)
        before = await asyncio.to_thread(_tree, mounts.data)
        if how == "filesystem":
            await mounts.remount_holder("ro")
        else:
            await asyncio.to_thread(_run, "mount", "-o", "remount,bind,ro", str(mounts.repo))
        with pytest.raises(RepositoryReadOnlyError) as refused:
            await backups.run(guest.td.uuid)
        message = str(refused.value)
        assert f"repository {mounts.repo} is on a read-only filesystem" in message, message
        await _assert_nothing_started(cfg, guest, checkpoints)
        assert await asyncio.to_thread(_tree, mounts.data) == before  # no staging dir
        # Reading still works: a read-only repository restores.
        await assert_restores(
            backups.repository, guest.td.name, scene.first, scene.first_content, tmp_path
        )
        if how == "filesystem":
            await mounts.remount_holder("rw")
        else:
            await asyncio.to_thread(_run, "mount", "-o", "remount,bind,rw", str(mounts.repo))
        await _backup_succeeds_and_restores(backups, guest, tmp_path, scene.first)


@pytest.mark.libvirt
@pytest.mark.parametrize("when", ["before the backup", "during the copy"])
async def test_a_full_repository_is_refused_or_undone_then_works_again(
    domain_factory: DomainFactory, tmp_path: Path, when: str
) -> None:
    """Before: the space check refuses, naming what a backup may need and what there is.
    During (the check passed, then another writer filled the filesystem): the copy fails
    on ENOSPC and is undone. Either way, with the space back, the next backup works."""
    filled: list[int] = []
    armed = False

    def fill_once_begun(point: str, /) -> None:
        # On the main loop, while the images are served (one qemu-nbd per disk).
        if point != "backup:begun" or not armed or filled:
            return
        deadline = time.monotonic() + 10
        while len(live_processes_mentioning(str(mounts.repo))) < 2:
            assert time.monotonic() < deadline, "the images were not served"
            time.sleep(0.01)
        filled.append(_fill(filler, leave=256 * KiB))

    async with mounted_repository(tmp_path, "300M") as mounts:
        filler = mounts.holder / "filler"
        cfg = config(tmp_path, repository={"path": str(mounts.repo)})
        async with running_agent(cfg, faults=fill_once_begun) as run:
            backups = run.agent.backups
            guest = await started_guest(run, domain_factory, TWO_DISKS)
            await guest.write("vda", 0, 1 * MiB, 0x81)
            first = await backups.run(guest.td.uuid)
            await guest.write("vda", 8 * MiB, 4 * MiB, 0x82)
            await guest.write("sda", 0, 4 * MiB, 0x83)
            checkpoints = await asyncio.to_thread(_checkpoints, guest)
            # (names: an undone backup's staging directory came and went)
            before = set(await asyncio.to_thread(_tree, mounts.data))
            if when == "before the backup":
                await asyncio.to_thread(_fill, filler, leave=32 * MiB)
                free = await asyncio.to_thread(_free, mounts.repo)
                with pytest.raises(RepositorySpaceError) as refused:
                    await backups.run(guest.td.uuid)
                numbers = {int(n) for n in re.findall(r"\d+", str(refused.value))}
                # What it may need (both disks whole) and what there was, in bytes.
                assert {2 * SIZE, free} <= numbers, str(refused.value)
                assert str(mounts.repo) in str(refused.value)
            else:
                armed = True
                with pytest.raises(BackupError) as failed:
                    await backups.run(guest.td.uuid)
                armed = False
                assert filled, "the fault point was not reached"
                assert failed.value.code == "copy-failed"
                assert re.search("ENOSPC|No space left", str(failed.value)), str(failed.value)
            await _assert_nothing_started(cfg, guest, checkpoints)
            assert set(await asyncio.to_thread(_tree, mounts.data)) == before
            await asyncio.to_thread(filler.unlink)
            await _backup_succeeds_and_restores(backups, guest, tmp_path, first.backup_id)


def _fill(path: Path, *, leave: int) -> int:
    """A file taking all but ``leave`` bytes of its filesystem's free space."""
    size = _free(path.parent) - leave
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return size


def _free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


# --- backup-agent repository init ----------------------------------------------------------


def _init(agent_toml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return agent_cli(agent_toml, "repository", "init", *args)


async def test_repository_init_creates_adopts_and_refuses(tmp_path: Path) -> None:
    cfg = config(tmp_path, repository={"path": str(tmp_path / "nfs" / "repo")})
    agent_toml = config_file(tmp_path, cfg)
    root, id_file = cfg.repository_path, cfg.agent.state_dir / ID_FILE

    # A missing directory: created (0700), marker written, its id recorded.
    made = await asyncio.to_thread(_init, agent_toml)
    assert made.returncode == 0, made.stderr
    repository_id = json.loads((root / MARKER_FILE).read_text())["id"]
    assert made.stdout.strip() == (
        f"initialised a new repository {repository_id} at {root}; this agent uses it"
    )
    assert id_file.read_text().strip() == repository_id
    assert (root.stat().st_mode & 0o777, id_file.stat().st_mode & 0o777) == (0o700, 0o600)
    again = await asyncio.to_thread(_init, agent_toml, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {
        "action": "unchanged",
        "path": str(root),
        "id": repository_id,
        "previous_id": None,
        "id_file": str(id_file),
    }

    # A second host on the same shared storage: adopts the repository's id.
    host_b = config(
        tmp_path, agent={"state_dir": str(tmp_path / "host-b")}, repository={"path": str(root)}
    )
    (tmp_path / "b").mkdir()
    toml_b = config_file(tmp_path / "b", host_b)
    adopted = await asyncio.to_thread(_init, toml_b)
    assert adopted.returncode == 0, adopted.stderr
    assert (
        adopted.stdout.strip()
        == f"adopted repository {repository_id} at {root}; this agent uses it"
    )
    assert (host_b.agent.state_dir / ID_FILE).read_text().strip() == repository_id

    # A non-empty directory that is no repository: refused, nothing written.
    foreign = tmp_path / "home"
    (foreign / "photos").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    before = _tree(foreign)
    fresh = config(tmp_path, agent={"state_dir": str(tmp_path / "host-c")})
    (tmp_path / "c").mkdir()
    refused = await asyncio.to_thread(_init, config_file(tmp_path / "c", fresh), str(foreign))
    assert refused.returncode == 1
    assert f"repository {foreign} is not empty and has no marker {MARKER_FILE}" in refused.stderr
    assert "notes.txt, photos" in refused.stderr
    assert _tree(foreign) == before and not (tmp_path / "host-c" / ID_FILE).exists()

    # Another path while this agent uses a repository: refused unless --replace.
    elsewhere = tmp_path / "new-repo"
    kept = await asyncio.to_thread(_init, agent_toml, str(elsewhere))
    assert kept.returncode == 1 and "Add --replace" in kept.stderr, kept.stderr
    assert not elsewhere.exists() and id_file.read_text().strip() == repository_id
    replaced = await asyncio.to_thread(_init, agent_toml, str(elsewhere), "--replace", "--json")
    assert replaced.returncode == 0, replaced.stderr
    said = json.loads(replaced.stdout)
    assert (said["action"], said["previous_id"]) == ("initialised", repository_id)
    assert said["id"] == json.loads((elsewhere / MARKER_FILE).read_text())["id"] != repository_id
    assert id_file.read_text().strip() == said["id"]
    assert f"set it to {elsewhere}" in replaced.stderr  # the configuration names another path
