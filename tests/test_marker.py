"""The repository's marker and the id the agent records (agent.repository.marker): the
rules of its table, on real directories; and the guard in Repository's writes and reads.

The mounts (unmounted, another repository mounted, read-only, full) are in
tests/faults/test_repository_mount.py; here the same states are plain directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.core.errors import RepositoryError, RepositoryMarkerError
from agent.repository.marker import (
    ID_FILE,
    MARKER_FILE,
    Action,
    Marker,
    RepositoryMarker,
    _write_marker,
)
from agent.repository.store import Repository
from tests.test_repository import DOMAIN, Builder, MiB


def _tree(path: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below ``path`` with its mode, size and mtime: what "nothing written" keeps."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


def _marker_id(root: Path) -> str:
    data = json.loads((root / MARKER_FILE).read_text())
    assert data["kind"] == "libvirt-backup-agent repository" and data["format"] == 1
    return str(data["id"])


def _recorded(state: Path) -> str:
    return (state / ID_FILE).read_text().strip()


async def test_a_missing_path_is_initialised_and_its_id_recorded(tmp_path: Path) -> None:
    root, state = tmp_path / "deep" / "repo", tmp_path / "state"
    marker = RepositoryMarker(root, state)
    outcome = await marker.ensure_ready()
    assert outcome.action is Action.INITIALISED
    repository_id = _marker_id(root)
    assert uuid.UUID(repository_id).version == 4 and outcome.id == repository_id
    assert _recorded(state) == repository_id
    # Root-only: the repository directory, the marker, the record of it.
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / MARKER_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((state / ID_FILE).stat().st_mode) == 0o600
    # No temporary file left beside either.
    assert sorted(os.listdir(root)) == [MARKER_FILE]
    assert sorted(os.listdir(state)) == [ID_FILE]
    again = await marker.ensure_ready()
    assert (again.action, again.id) == (Action.CHECKED, repository_id)
    assert _marker_id(root) == repository_id  # checking rewrites nothing


async def test_an_agent_that_made_backups_before_starts_no_repository_on_a_bare_path(
    tmp_path: Path,
) -> None:
    """Upgraded from before markers (no id recorded) with the repository not mounted yet:
    the missing or empty mount point is not made a new repository (``create`` is False
    when the ledger holds backed-up checkpoints); an explicit init still is."""
    state = tmp_path / "state"
    for root in (tmp_path / "missing", tmp_path / "empty"):
        if root.name == "empty":
            root.mkdir()
        before = _tree(tmp_path)
        with pytest.raises(RepositoryMarkerError, match="is the repository mounted"):
            await RepositoryMarker(root, state).ensure_ready(create=False)
        assert _tree(tmp_path) == before, "nothing written"
    outcome = await RepositoryMarker(tmp_path / "empty", state).init()
    assert outcome.action is Action.INITIALISED
    again = await RepositoryMarker(tmp_path / "empty", state).ensure_ready(create=False)
    assert again.action is Action.CHECKED


async def test_an_empty_path_is_initialised_lost_and_found_or_not(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "lost+found").mkdir(parents=True)  # a freshly made ext4
    outcome = await RepositoryMarker(root, tmp_path / "state").ensure_ready()
    assert outcome.action is Action.INITIALISED
    assert sorted(os.listdir(root)) == [MARKER_FILE, "lost+found"]


@pytest.mark.parametrize("state_of_path", ["missing", "empty", "file-less tree"])
async def test_a_recorded_id_and_no_marker_is_refused_and_nothing_is_written(
    tmp_path: Path, state_of_path: str
) -> None:
    root, state = tmp_path / "repo", tmp_path / "state"
    marker = RepositoryMarker(root, state)
    await marker.ensure_ready()
    recorded = _recorded(state)
    (root / MARKER_FILE).unlink()
    if state_of_path == "missing":
        root.rmdir()
    elif state_of_path == "file-less tree":
        (root / DOMAIN / "backups").mkdir(parents=True)  # our layout: still not ours
    before, state_before = _tree(tmp_path / "repo"), _tree(state)
    for attempt in (marker.ensure_ready, marker.check):
        with pytest.raises(RepositoryMarkerError) as refused:
            await attempt()
        message = str(refused.value)
        assert f"repository {root} has no marker {root / MARKER_FILE} (is it mounted?)" in message
        assert recorded in message
    assert root.exists() == (state_of_path != "missing")  # not even the directory
    assert _tree(tmp_path / "repo") == before
    assert _tree(state) == state_before and _recorded(state) == recorded


async def test_another_repository_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    await RepositoryMarker(theirs, tmp_path / "their-state").ensure_ready()
    marker = RepositoryMarker(ours, tmp_path / "state")
    mine = (await marker.ensure_ready()).id
    other = _marker_id(theirs)
    assert mine != other
    # Their repository mounted where ours should be.
    wrong = RepositoryMarker(theirs, tmp_path / "state")
    before = _tree(theirs)
    with pytest.raises(RepositoryMarkerError) as refused:
        await wrong.ensure_ready()
    assert f"repository {theirs} is repository {other}, this agent uses {mine}" in str(
        refused.value
    )
    assert "(is the right filesystem mounted?)" in str(refused.value)
    assert _tree(theirs) == before and _recorded(tmp_path / "state") == mine


async def test_a_marker_with_no_recorded_id_is_adopted(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    await RepositoryMarker(root, tmp_path / "host-a").ensure_ready()
    made = _marker_id(root)
    before = _tree(root)
    # A new host on the same shared storage, or this host's state directory rebuilt.
    outcome = await RepositoryMarker(root, tmp_path / "host-b").ensure_ready()
    assert (outcome.action, outcome.id) == (Action.ADOPTED, made)
    assert _recorded(tmp_path / "host-b") == made
    assert _tree(root) == before


async def test_a_repository_of_an_earlier_agent_gets_its_marker(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    builder = Builder(Repository(root))  # no marker: as an agent before markers wrote it
    await builder.backup({"vda": [(0, MiB, 0x11)]})
    await builder.backup({"vda": [(MiB, MiB, 0x12)]})
    assert not (root / MARKER_FILE).exists()
    guarded = Repository(root, state_dir=tmp_path / "state")
    await guarded.ensure_ready()
    assert _recorded(tmp_path / "state") == _marker_id(root)
    # ... and everything in it still reads and restores as before.
    assert [m.backup_id for m in await guarded.backups(DOMAIN)] == builder.ids
    dest = tmp_path / "vda.raw"
    await guarded.restore(DOMAIN, builder.ids[1], "vda", dest, fmt="raw")
    assert dest.read_bytes() == builder.points[builder.ids[1]]["vda"]


@pytest.mark.parametrize("foreign", ["a file", "a directory", "a domain with more"])
async def test_a_non_empty_directory_that_is_not_ours_is_refused(
    tmp_path: Path, foreign: str
) -> None:
    root, state = tmp_path / "repo", tmp_path / "state"
    root.mkdir()
    if foreign == "a file":
        (root / "notes.txt").write_text("mine")
    elif foreign == "a directory":
        (root / "photos").mkdir()
    else:
        (root / DOMAIN / "backups").mkdir(parents=True)
        (root / DOMAIN / "photos.tar").write_text("x")
    before = _tree(root)
    with pytest.raises(RepositoryMarkerError) as refused:
        await RepositoryMarker(root, state).ensure_ready()
    message = str(refused.value)
    assert f"repository {root} is not empty and has no marker {MARKER_FILE}" in message
    assert "nothing was written" in message
    assert _tree(root) == before and not state.exists()


async def test_reading_without_a_recorded_id_writes_nothing(tmp_path: Path) -> None:
    root, state = tmp_path / "repo", tmp_path / "state"
    outcome = await RepositoryMarker(root, state).check()
    assert outcome.action is Action.UNCHECKED
    assert not root.exists() and not state.exists()
    repository = Repository(root, state_dir=state)
    assert await repository.domain_named(DOMAIN) is None  # nothing there, nothing refused
    assert not root.exists() and not state.exists()


async def test_the_guard_refuses_every_write_and_restore_of_an_unmounted_repository(
    tmp_path: Path,
) -> None:
    root, state = tmp_path / "repo", tmp_path / "state"
    repository = Repository(root, state_dir=state)
    builder = Builder(repository)
    first = await builder.backup({"vda": [(0, MiB, 0x21)]})
    assert _recorded(state) == _marker_id(root)  # the first stage initialised it
    staging = await repository.stage(DOMAIN, repository.new_backup_id())
    root.rename(tmp_path / "away")  # "unmounted"
    root.mkdir()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "stage": lambda: repository.stage(DOMAIN, repository.new_backup_id()),
        "publish": lambda: repository.publish(
            DOMAIN, root / DOMAIN / "backups" / staging.name, first
        ),
        "restore": lambda: repository.restore(
            DOMAIN, first.backup_id, "vda", tmp_path / "vda.qcow2"
        ),
        "retention": lambda: repository.apply_retention(DOMAIN, 1),
        "cleanup": repository.cleanup_staging,
        "find": lambda: repository.domain_named(DOMAIN),
    }
    for name, call in calls.items():
        with pytest.raises(RepositoryMarkerError, match=r"\(is it mounted\?\)"):
            await call()
        assert os.listdir(root) == [], name
    assert not (tmp_path / "vda.qcow2").exists()
    # Mounted again: it all works, the staged backup included.
    root.rmdir()
    (tmp_path / "away").rename(root)
    assert await repository.cleanup_staging() == [staging]
    second = await builder.backup({"vda": [(2 * MiB, MiB, 0x22)]})
    assert second.parent == first.backup_id
    dest = tmp_path / "vda.raw"
    await repository.restore(DOMAIN, second.backup_id, "vda", dest, fmt="raw")
    assert dest.read_bytes() == builder.points[second.backup_id]["vda"]


async def test_a_marker_another_initialiser_put_in_place_first_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    first, second = Marker.new(), Marker.new()
    assert _write_marker(root, first) == first
    assert _write_marker(root, second) == first  # linked, never renamed over it
    assert _marker_id(root) == first.id and os.listdir(root) == [MARKER_FILE]
    # Two agents initialising one empty shared repository at once agree on its id.
    shared = tmp_path / "shared"
    a, b = await asyncio.gather(
        RepositoryMarker(shared, tmp_path / "a").ensure_ready(),
        RepositoryMarker(shared, tmp_path / "b").ensure_ready(),
    )
    assert a.id == b.id == _marker_id(shared) == _recorded(tmp_path / "a")
    assert _recorded(tmp_path / "b") == a.id


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("marker", "is damaged (not JSON"),
        ("marker-newer", "has format 2, made by a newer agent version"),
        ("id-file", "does not hold a repository id"),
    ],
)
async def test_a_damaged_marker_or_id_file_is_an_error_naming_it(
    tmp_path: Path, damage: str, said: str
) -> None:
    root, state = tmp_path / "repo", tmp_path / "state"
    marker = RepositoryMarker(root, state)
    await marker.ensure_ready()
    if damage == "marker":
        (root / MARKER_FILE).write_text('{"kind": "libvirt-backup')
    elif damage == "marker-newer":
        data = json.loads((root / MARKER_FILE).read_text())
        (root / MARKER_FILE).write_text(json.dumps({**data, "format": 2}))
    else:
        (state / ID_FILE).write_text("not-an-id\n")
    with pytest.raises(RepositoryMarkerError) as failed:
        await marker.ensure_ready()
    assert said in str(failed.value)
    damaged = state / ID_FILE if damage == "id-file" else root / MARKER_FILE
    assert str(damaged) in str(failed.value)


@contextlib.asynccontextmanager
async def _tmpfs(path: Path, size: str) -> AsyncIterator[Path]:
    await asyncio.to_thread(path.mkdir)
    await asyncio.to_thread(
        subprocess.run,
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        await asyncio.to_thread(subprocess.run, ["umount", "-l", str(path)], check=True)


async def test_a_full_filesystem_leaves_no_half_written_marker(tmp_path: Path) -> None:
    async with _tmpfs(tmp_path / "small", "64k") as small:
        root, filler = small / "repo", small / "filler"
        root.mkdir()
        with contextlib.suppress(OSError), filler.open("wb") as out:
            while True:
                out.write(b"\0" * 4096)
                out.flush()
        with pytest.raises(RepositoryError) as full:
            await RepositoryMarker(root, tmp_path / "state").ensure_ready()
        assert "No space left on device" in str(full.value), str(full.value)
        assert os.listdir(root) == []  # no temporary marker left behind
        assert not (tmp_path / "state" / ID_FILE).exists()
        filler.unlink()
        outcome = await RepositoryMarker(root, tmp_path / "state").ensure_ready()
        assert outcome.action is Action.INITIALISED and _recorded(tmp_path / "state") == outcome.id
