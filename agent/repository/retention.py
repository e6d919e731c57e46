"""Retention: the oldest backups of a domain dropped, every kept one restoring as before.

Every kept image that had a dropped image as backing is replaced by a standalone copy
(``qemu-img convert`` of its chain, checked with ``qemu-img compare``), so later overlays,
which still point at it by the same path, restore exactly as before. The steps, and why a
crash at any point is safe (the next ``apply_retention`` or ``cleanup_staging`` finishes
the job from the intent):

0. a domain with a damaged backup (:mod:`.listing`: a manifest that does not read, a
   chain that reads one or misses an image) is refused, also an interrupted retention's
   redo: nothing is merged or dropped next to damage an operator may still repair
   (logged; the repository's listing names it). Unfinished, every backup still restores.
1. verify the backups involved (:func:`plan`): corrupt data is never baked into a new base.
2. write ``retention.json`` (the ids to drop) atomically. Before it nothing has changed.
3. per kept backup that depends on a dropped one, per such disk: convert into
   ``.merge-<id>/``, compare, fsync, rename over the image. The merged image has the same
   guest-visible content, so the backup restores the same whether or not it was replaced;
   a redo skips images whose header already has no backing.
4. write the new manifest (``parent`` null, those disks' ``backing`` null, ``merged_from``)
   and rename it over the old one: this commits the merge of that backup.
5. per dropped backup, newest first: rename to ``.dropped-<id>`` (it vanishes from
   listings at once, never half-deleted), then delete. Nothing kept refers to it any more
   (steps 3-4), and the dropped backups still listed only refer to older ones.
6. remove ``retention.json``.

:class:`Retention` runs steps 3-6; ``faults`` (:mod:`agent.core.faults`) is called between
them, where a test makes the agent crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Final, TypeVar

from agent.core.blocking import Filesystem
from agent.core.errors import RepositoryError
from agent.core.faults import Faults
from agent.repository.blocks import describe, disk_chain
from agent.repository.layers import QemuImg
from agent.repository.layout import (
    DROPPED_PREFIX,
    MERGE_PREFIX,
    _fresh_dir,
    _fsync,
    _os_errors,
    _remove_durably,
    _remove_tree,
    _rename_away,
    _replace_file,
    _round_trip,
    _write_durably,
)
from agent.repository.listing import read_listing
from agent.repository.manifest import (
    BACKING_RE,
    BACKUP_ID_RE,
    MANIFEST_FILE,
    DiskManifest,
    Manifest,
)
from agent.repository.verify import LayerInfoReader

_T = TypeVar("_T")

INTENT_FORMAT: Final = "libvirt-backup-agent/retention"
INTENT_VERSION: Final = 1


def plan(manifests: Sequence[Manifest], keep_last: int) -> tuple[list[str], list[Manifest]]:
    """The ids to drop so that ``keep_last`` of ``manifests`` (oldest first) remain, and
    the backups to verify first: the dropped ones merged into a kept one, and those."""
    drop = [m.backup_id for m in manifests[:-keep_last]]
    by_id = {m.backup_id: m for m in manifests}
    dependents = [m for m in manifests[-keep_last:] if _depends_on(m, set(drop))]
    chains = {i for m in dependents for i in _chain_ids(m, by_id, drop)}
    return drop, [*(by_id[i] for i in drop if i in chains), *dependents]


class Retention:
    """Steps 3-6 for one domain: ``backups_dir``, and ``intent`` (its retention.json)."""

    def __init__(
        self,
        backups_dir: Path,
        intent: Path,
        *,
        qemu: QemuImg,
        layer_info: LayerInfoReader,
        faults: Faults,
        reserve: Callable[[int], AbstractAsyncContextManager[None]] | None = None,
        fs: Filesystem | None = None,
    ):
        self._backups_dir = backups_dir
        # Space for the merge copies, held against the other jobs' (agent.core.space).
        self._reserve = reserve if reserve is not None else _nothing_reserved
        # The repository's bounded calls (agent.core.blocking): a hung mount fails the
        # step after io_timeout (redone from the intent later) instead of hanging.
        self._fs = fs
        self._intent = intent
        self._qemu = qemu
        self._layer_info = layer_info
        self._faults = faults

    async def run(self, drop: Sequence[str]) -> None:
        """Steps 3-6; idempotent, so a redo after a crash at any point finishes the job."""
        backups_dir = self._backups_dir
        listing = await self._io("read manifests", read_listing, backups_dir)
        if listing.damaged:  # (the repository checks first, and says so; see its docstring)
            first = listing.damaged[0]
            raise RepositoryError(
                f"retention refused: backup {first.backup_id} is damaged ({first.error}); "
                "repair or remove it first",
                path=str(first.path),
            )
        manifests = listing.manifests
        by_id = {m.backup_id: m for m in manifests}
        dropped = set(drop)
        merges = [m for m in manifests if m.backup_id not in dropped and _depends_on(m, dropped)]
        # Each merged image is a whole copy of its disk, at most its virtual size; the
        # dropped backups' space comes back only at the end.
        need = sum(d.virtual_size for m in merges for d in m.disks if _backing_id(d) in dropped)
        async with self._reserve(need):
            for manifest in merges:
                await self._merge_backup(manifest, by_id, drop)
        # Newest first: a dropped backup still listed after a crash keeps its whole chain
        # (only older backups), so every listed backup restores at every moment.
        for backup_id in reversed(drop):
            tomb = backups_dir / f"{DROPPED_PREFIX}{backup_id}"
            await self._io("drop a backup", _rename_away, backups_dir / backup_id, tomb)
            self._faults(f"retention:dropped:{backup_id}")
            await self._io("delete a dropped backup", _remove_tree, tomb)
            self._faults(f"retention:deleted:{backup_id}")
        await self._io("remove the retention intent", _remove_durably, self._intent)

    async def _merge_backup(
        self, manifest: Manifest, by_id: dict[str, Manifest], drop: Sequence[str]
    ) -> None:
        directory = self._backups_dir / manifest.backup_id
        merge_dir = self._backups_dir / f"{MERGE_PREFIX}{manifest.backup_id}"
        await self._io("make the merge directory", _fresh_dir, merge_dir)
        disks = []
        for disk in manifest.disks:
            if _backing_id(disk) not in drop:
                disks.append(disk)
                continue
            live = directory / disk.image
            # Header without backing: replaced before a crash; its content is already right.
            if (await self._layer_info(live)).backing is not None:
                await self._merge_image(live, merge_dir / disk.image, manifest.backup_id, disk)
            # (a disk's blocks along its chain: CPU work, off the loop)
            disks.append(await asyncio.to_thread(_merged_disk, disk, manifest, by_id))
        merged = dataclasses.replace(
            manifest,
            parent=None if manifest.parent in drop else manifest.parent,
            disks=tuple(disks),
            merged_from=_merged_from(manifest, by_id, drop),
        )
        await self._io("replace a manifest", _replace_manifest, merge_dir, directory, merged)
        self._faults(f"retention:manifest-replaced:{manifest.backup_id}")

    async def _merge_image(
        self, live: Path, merged: Path, backup_id: str, disk: DiskManifest
    ) -> None:
        # convert reads the image through its whole chain; compare re-reads both to be sure
        # before the only other copy of the older data is deleted.
        convert = ["convert", "-f", "qcow2", "-O", "qcow2", str(live), str(merged)]
        await self._qemu.run(convert, live, long=True)
        compare = ["compare", "-q", "-f", "qcow2", "-F", "qcow2", str(live), str(merged)]
        await self._qemu.run(compare, live, long=True)
        await asyncio.to_thread(_fsync, merged)
        self._faults(f"retention:merged:{backup_id}:{disk.target}")
        await self._io("replace a merged image", _replace_file, merged, live)
        self._faults(f"retention:replaced:{backup_id}:{disk.target}")

    async def _io(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        if self._fs is None:
            return await asyncio.to_thread(fn, *args)
        return await self._fs.call(what, fn, *args)


@contextlib.asynccontextmanager
async def _nothing_reserved(nbytes: int) -> AsyncIterator[None]:
    yield


def _merged_disk(
    disk: DiskManifest, manifest: Manifest, by_id: dict[str, Manifest]
) -> DiskManifest:
    """The disk's manifest once its image is standalone. A disk stored as what changed
    (``block_size``) keeps describing its blocks: the merged image holds every block its
    chain described (:mod:`.blocks`); if the chain did not, it no longer claims to."""
    merged = dataclasses.replace(disk, backing=None)
    if disk.block_size is None:
        return merged
    chain = disk_chain(by_id.get, manifest, disk.target)
    described = describe(chain) if chain is not None else None
    if described is None:
        return dataclasses.replace(merged, block_size=None)
    whole = tuple(described[o] for o in sorted(described))  # each block of the image, whole
    return dataclasses.replace(merged, checksums=whole, blocks=())


def _backing_id(disk: DiskManifest) -> str | None:
    match = BACKING_RE.fullmatch(disk.backing) if disk.backing else None
    return match["id"] if match else None


def _depends_on(manifest: Manifest, ids: set[str]) -> bool:
    return manifest.parent in ids or any(_backing_id(d) in ids for d in manifest.disks)


def _chain_ids(manifest: Manifest, by_id: dict[str, Manifest], drop: Sequence[str]) -> set[str]:
    """The dropped backups that the backing chains of ``manifest``'s disks pass through."""
    seen: set[str] = set()
    for disk in manifest.disks:
        current: DiskManifest | None = disk
        while current is not None and (backing_id := _backing_id(current)) in drop:
            assert backing_id is not None and current.backing is not None
            seen.add(backing_id)
            older = by_id.get(backing_id)
            image = Path(current.backing).name
            current = next((d for d in older.disks if d.image == image), None) if older else None
    return seen


def _merged_from(
    manifest: Manifest, by_id: dict[str, Manifest], drop: Sequence[str]
) -> tuple[str, ...]:
    """What ``manifest`` had merged before, plus the dropped backups merged into it now."""
    chain = _chain_ids(manifest, by_id, drop)
    ids: list[str] = []
    for backup_id in drop:
        if backup_id in chain and backup_id in by_id:
            ids += [*by_id[backup_id].merged_from, backup_id]
    return tuple(dict.fromkeys([*ids, *manifest.merged_from]))


def _write_intent(path: Path, drop: Sequence[str]) -> None:
    intent = {"format": INTENT_FORMAT, "version": INTENT_VERSION, "drop": list(drop)}
    _write_durably(path, json.dumps(intent, indent=2) + "\n")


def _read_intent(path: Path) -> list[str] | None:
    with _os_errors("cannot read", path):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
    try:
        data = json.loads(text)
        if data["format"] != INTENT_FORMAT or data["version"] != INTENT_VERSION:
            raise ValueError("unknown format or version")
        drop = data["drop"]
        if not isinstance(drop, list) or not all(
            isinstance(i, str) and BACKUP_ID_RE.fullmatch(i) for i in drop
        ):
            raise ValueError("'drop' is not a list of backup ids")
    except (ValueError, KeyError, TypeError) as exc:
        raise RepositoryError(
            f"retention intent {path} is malformed: {exc}", path=str(path)
        ) from exc
    return drop


def _replace_manifest(merge_dir: Path, directory: Path, manifest: Manifest) -> None:
    staged = merge_dir / MANIFEST_FILE
    text = _round_trip(manifest, staged)
    with _os_errors("cannot write", staged):
        staged.write_text(text, encoding="utf-8")
    _fsync(staged)
    _replace_file(staged, directory / MANIFEST_FILE)
    _remove_tree(merge_dir)
