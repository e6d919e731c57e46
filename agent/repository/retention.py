"""Retention: the oldest backups of a domain dropped, every kept one restoring as before.

The oldest kept backup's images that sit on dropped ones become standalone: each is
committed into the standalone image at the bottom of its chain (``qemu-img commit -d``,
which writes only the layers above it: the cost follows what changed since that image,
not the disk), and that image, once checked, takes its place. Later overlays still point
at the kept image by the same path and restore exactly as before. The steps, and why a
crash at any point is safe (the next ``apply_retention`` or ``cleanup_staging`` finishes
the job from the intent):

0. a domain with a damaged backup (:mod:`.listing`: a manifest that does not read, a
   chain that reads one or misses an image) is refused, also an interrupted retention's
   redo: nothing is merged or dropped next to damage an operator may still repair
   (logged; the repository's listing names it). Unfinished, every kept backup still
   restores (those it drops are hidden from listings: see below).
1. verify what the merges read (:meth:`Retention.preflight`: every layer they commit, and
   the ranges of a bottom image with an older checksum algorithm that they hash again
   whole): corrupt data is never baked into a new base, nor a checksum taken of it. And
   read, of every older range the layers above overwrite in part, the windows that
   change (:mod:`.coverage`): their terms, summed, are what step 4 takes out of its
   checksum (once the merge has run they are gone from the images).
2. write ``retention.json`` (the ids to drop, and those sums) atomically. Before it
   nothing has changed.
3. per kept backup that depends on a dropped one, per such disk: commit its chain into
   the bottom image B (a dropped one; ``-d`` leaves every layer above as it was, so the
   kept image reads the same throughout: where a layer above has data it is read, and
   B now holds the same), fsync B, check the ranges the layers above wrote against their
   checksums in B (the proof costs what changed too), then link B in place of the kept
   image (a hard link, renamed over it: B's own directory keeps its file, so the dropped
   backups stay whole until step 5; a copy where links are refused). A redo skips
   images whose header already has no backing, and commits again where it has one (the
   same data written again).
4. write the new manifest (``parent`` null, those disks' ``backing`` null, ``merged_from``,
   and checksums covering every range any layer of the chain recorded: :mod:`.coverage`,
   a range partly overwritten updated from the windows that changed, read in the merged
   image, or hashed again whole if its algorithm is an older one) and rename it over the
   old one: this commits the merge of that backup.
5. per dropped backup, newest first: rename to ``.dropped-<id>`` (it vanishes from
   listings at once, never half-deleted), then delete. Nothing kept refers to it any more
   (steps 3-4), and the dropped backups still listed only refer to older ones.
6. remove ``retention.json``.

A dropped backup read between steps 3 and 5 (after a crash, say) does not restore its own
point any more (its bottom image holds a newer one): it is in the intent, and the next
start drops it.

:class:`Retention` runs steps 3-6; ``faults`` (:mod:`agent.core.faults`) is called between
them, where a test makes the agent crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Final, TypeVar

from agent.core.blocking import Filesystem
from agent.core.errors import RepositoryError
from agent.core.faults import Faults
from agent.repository.blocks import describe, disk_chain
from agent.repository.coverage import Partial, combine
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
from agent.repository.listing import Damage, Listing, read_listing
from agent.repository.manifest import (
    BACKING_RE,
    BACKUP_ID_RE,
    CHECKSUM,
    MANIFEST_FILE,
    DiskManifest,
    Manifest,
    RangeChecksum,
)
from agent.repository.verify import LayerInfoReader, Problem, Verifier
from agent.repository.windows import MODULUS, as_hex, updated

_T = TypeVar("_T")

INTENT_FORMAT: Final = "libvirt-backup-agent/retention"
INTENT_VERSION: Final = 1
_HEX32: Final = re.compile(r"[0-9a-f]{32}")


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

    async def preflight(
        self, manifests: Sequence[Manifest], drop: Sequence[str]
    ) -> tuple[list[Problem], dict[str, str]]:
        """What is wrong in what the merges of dropping ``drop`` read (step 1): every
        layer they commit, whole, and of each bottom image the ranges with an older
        algorithm they hash again; and the sums of the windows that change of every
        older range overwritten in part (by :func:`_sum_key`). Not the rest of a bottom
        image: it is not rewritten, and its checksums stay in the merged manifest, where
        verify finds any damage as before. So this costs what changed too, never the
        disk."""
        by_id = {m.backup_id: m for m in manifests}
        dropped = set(drop)
        verifier = Verifier(self._qemu, self._layer_info)
        problems: list[Problem] = []
        sums: dict[str, str] = {}
        for manifest in manifests:
            if manifest.backup_id in dropped or not _depends_on(manifest, dropped):
                continue
            for disk in manifest.disks:
                if _backing_id(disk) not in dropped:
                    continue
                layers = self._layers(manifest, disk, by_id)
                for path, layer in layers[:-1]:
                    problems += await verifier.disk(path.parent, path.parent.name, layer)
                if disk.block_size is not None:  # (merged by its blocks: .blocks)
                    continue
                _, partial = await asyncio.to_thread(combine, [d.checksums for _, d in layers])
                bottom, _ = layers[-1]
                whole = [
                    p.checksum for p in partial if not p.updatable and p.layer == len(layers) - 1
                ]
                if whole:
                    found, _ = await verifier.standalone(bottom, whole)
                    problems += [
                        Problem(bottom.parent.name, disk.target, bottom, c.offset, c.length, why)
                        for c, why in found
                    ]
                for index, (path, _) in enumerate(layers):
                    mine = [p for p in partial if p.updatable and p.layer == index]
                    if not mine:
                        continue
                    try:
                        extents = await self._qemu.layer_map(path)
                        old = await _window_sums(verifier, path, mine, extents)
                    except RepositoryError as exc:
                        first = mine[0].windows[0][0]
                        problems.append(
                            Problem(path.parent.name, disk.target, path, first, None, str(exc))
                        )
                        continue
                    for p, value in zip(mine, old, strict=True):
                        sums[_sum_key(path, p.checksum)] = value
        return problems, sums

    async def run(self, drop: Sequence[str]) -> None:
        """Steps 3-6; idempotent, so a redo after a crash at any point finishes the job."""
        backups_dir = self._backups_dir
        sums = await self._io("read the retention intent", _read_sums, self._intent)
        listing = await self._io("read manifests", read_listing, backups_dir)
        damaged = undropped_damage(listing, drop)
        if damaged:  # (the repository checks first, and says so; see its docstring)
            first = damaged[0]
            raise RepositoryError(
                f"retention refused: backup {first.backup_id} is damaged ({first.error}); "
                "repair or remove it first",
                path=str(first.path),
            )
        manifests = listing.manifests
        by_id = {m.backup_id: m for m in manifests}
        dropped = set(drop)
        merges = [m for m in manifests if m.backup_id not in dropped and _depends_on(m, dropped)]
        # A commit writes the layers above the bottom image into it: at most what they
        # hold. The dropped backups' space comes back only at the end.
        need = sum(_above_bottom(m, d, by_id) for m in merges for d in m.disks)
        async with self._reserve(need):
            for manifest in merges:
                await self._merge_backup(manifest, by_id, drop, sums)
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
        self,
        manifest: Manifest,
        by_id: dict[str, Manifest],
        drop: Sequence[str],
        sums: dict[str, str],
    ) -> None:
        directory = self._backups_dir / manifest.backup_id
        merge_dir = self._backups_dir / f"{MERGE_PREFIX}{manifest.backup_id}"
        await self._io("make the merge directory", _fresh_dir, merge_dir)
        disks = []
        for disk in manifest.disks:
            if _backing_id(disk) not in drop:
                disks.append(disk)
                continue
            layers = self._layers(manifest, disk, by_id)
            live = directory / disk.image
            # Header without backing: replaced before a crash; its content is already right.
            if (await self._layer_info(live)).backing is not None:
                await self._commit(layers, merge_dir, manifest.backup_id, disk, sums)
            if disk.block_size is not None:
                # (a disk's blocks along its chain: CPU work, off the loop)
                disks.append(await asyncio.to_thread(_merged_disk, disk, manifest, by_id))
            else:
                disks.append(await self._covered(live, disk, layers, sums))
        merged = dataclasses.replace(
            manifest,
            parent=None if manifest.parent in drop else manifest.parent,
            disks=tuple(disks),
            merged_from=_merged_from(manifest, by_id, drop),
        )
        await self._io("replace a manifest", _replace_manifest, merge_dir, directory, merged)
        self._faults(f"retention:manifest-replaced:{manifest.backup_id}")

    def _layers(
        self, manifest: Manifest, disk: DiskManifest, by_id: dict[str, Manifest]
    ) -> list[tuple[Path, DiskManifest]]:
        """The kept image and those below it, newest first, down to a standalone one."""
        layers = [(self._backups_dir / manifest.backup_id / disk.image, disk)]
        current = disk
        while (below := _backing_id(current)) is not None:
            older = by_id.get(below)
            image = Path(current.backing or "").name
            found = next((d for d in older.disks if d.image == image), None) if older else None
            if found is None:
                raise RepositoryError(
                    f"the chain of {disk.target} in {manifest.backup_id} reads "
                    f"../{below}/{image}, which no manifest lists",
                    path=str(layers[0][0]),
                )
            layers.append((self._backups_dir / below / image, found))
            current = found
        return layers

    async def _commit(
        self,
        layers: list[tuple[Path, DiskManifest]],
        merge_dir: Path,
        backup_id: str,
        disk: DiskManifest,
        sums: dict[str, str],
    ) -> None:
        """The kept image's chain committed into its bottom image, checked, linked in place
        of the kept image (step 3)."""
        (live, _), (bottom, _) = layers[0], layers[-1]
        commit = ["commit", "-d", "-f", "qcow2", "-b", str(bottom.absolute()), str(live)]
        await self._qemu.run(commit, live, long=True)
        await asyncio.to_thread(_fsync, bottom)
        self._faults(f"retention:merged:{backup_id}:{disk.target}")
        # The proof: what the layers above wrote (the newest of each range) is in it now.
        written, middle = await asyncio.to_thread(
            functools.partial(combine, [d.checksums for _, d in layers[:-1]], all_newest=True)
        )
        verifier = Verifier(self._qemu, self._layer_info)
        found, extents = await verifier.standalone(bottom, written)
        wrong = [message for _, message in found]
        wrong += await self._prove_partials(verifier, bottom, extents, layers, middle, sums)
        if wrong:
            raise RepositoryError(
                f"retention: merging {disk.target} of {backup_id} into {bottom} did not "
                f"write what its layers hold ({len(wrong)} range(s); first: {wrong[0]})",
                path=str(bottom),
            )
        linked = merge_dir / disk.image
        await self._io("link the merged image", _link_or_copy, bottom, linked)
        await self._io("replace a merged image", _replace_file, linked, live)
        self._faults(f"retention:replaced:{backup_id}:{disk.target}")

    async def _prove_partials(
        self,
        verifier: Verifier,
        merged: Path,
        extents: Sequence[Any],
        layers: list[tuple[Path, DiskManifest]],
        partials: Sequence[Partial],
        sums: dict[str, str],
    ) -> list[str]:
        """Of each range of a middle layer that newer ones overwrite in part, whether the
        windows no newer range touches hold in ``merged`` what the layer wrote: their
        terms sum to its checksum minus the old terms of the others (a window sum with
        its sum kept), or (else) they read as in the layer itself. Costs what the layers
        above wrote, as the rest of the proof."""
        wrong = []
        for p in partials:
            c = p.checksum
            untouched = p.untouched()
            if not untouched:
                continue
            path = layers[p.layer][0]
            old = sums.get(_sum_key(path, c)) if p.updatable else None
            got = await _sum_of(verifier, merged, extents, untouched)
            if old is not None:
                expected = (int(c.digest, 16) - int(old, 16)) % MODULUS
            else:
                mine = await self._qemu.layer_map(path)
                expected = await _sum_of(verifier, path, mine, untouched)
            if got != expected:
                wrong.append(
                    f"{merged} [{c.offset}, {c.offset + c.length}): what {path} wrote there "
                    "(outside what newer layers overwrote) is not in the merged image"
                )
        return wrong

    async def _covered(
        self,
        live: Path,
        disk: DiskManifest,
        layers: list[tuple[Path, DiskManifest]],
        sums: dict[str, str],
    ) -> DiskManifest:
        """The merged disk's manifest: a checksum for every range of the chain (step 4).
        A range overwritten in part is updated with the windows that changed: minus their
        sum before the merge (``sums``, taken by :meth:`preflight`), plus their sum in
        the merged image; without a sum (an older algorithm, an intent written by an
        earlier version) it is hashed again whole."""
        kept, partial = await asyncio.to_thread(combine, [d.checksums for _, d in layers])
        verifier = Verifier(self._qemu, self._layer_info)
        extents = await self._qemu.layer_map(live) if partial else []
        olds = [
            sums.get(_sum_key(layers[p.layer][0], p.checksum)) if p.updatable else None
            for p in partial
        ]
        # Those with an old sum: the new one of their windows; the others hashed whole.
        update = [p for p, old in zip(partial, olds, strict=True) if old]
        whole = [p for p, old in zip(partial, olds, strict=True) if not old]
        news = iter(await _window_sums(verifier, live, update, extents))
        hashed = iter(
            await verifier.digests(
                live, extents, [(p.checksum.offset, p.checksum.length) for p in whole], CHECKSUM
            )
        )
        for p, old in zip(partial, olds, strict=True):
            c = p.checksum
            digest = updated(c.digest, int(old, 16), int(next(news), 16)) if old else next(hashed)
            kept.append(RangeChecksum(c.offset, c.length, digest, CHECKSUM))
        kept.sort(key=lambda c: c.offset)
        return dataclasses.replace(disk, backing=None, checksums=tuple(kept))

    async def _io(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        if self._fs is None:
            return await asyncio.to_thread(fn, *args)
        return await self._fs.call(what, fn, *args)


def _sum_key(image: Path, checksum: RangeChecksum) -> str:
    """Where a range's old window sum is kept in the intent:
    ``<backup>/<image>@<offset>+<length>`` (a merged image may hold two ranges that
    begin at one offset)."""
    return f"{image.parent.name}/{image.name}@{checksum.offset}+{checksum.length}"


async def _sum_of(
    verifier: Verifier, image: Path, extents: Sequence[Any], runs: Sequence[tuple[int, int]]
) -> int:
    """The sum of the terms of ``runs`` (window-aligned but at a range's edges) in ``image``."""
    found = await verifier.digests(image, extents, [(a, b - a) for a, b in runs], CHECKSUM)
    return sum(int(digest, 16) for digest in found) % MODULUS


async def _window_sums(
    verifier: Verifier, image: Path, partials: Sequence[Partial], extents: Sequence[Any]
) -> list[str]:
    """For each of ``partials``, the sum of the terms of its windows in ``image`` (with
    these extents): all of them read in one batch."""
    ranges = [(start, end - start) for p in partials for start, end in p.windows]
    found = iter(await verifier.digests(image, extents, ranges, CHECKSUM) if ranges else [])
    return [as_hex(sum(int(next(found), 16) for _ in p.windows) % MODULUS) for p in partials]


@contextlib.asynccontextmanager
async def _nothing_reserved(nbytes: int) -> AsyncIterator[None]:
    yield


def undropped_damage(listing: Listing, drop: Sequence[str]) -> list[Damage]:
    """The listing's damage but that of the backups being dropped: a bottom image moved
    into a kept backup (where links are refused) leaves its dropped backup without it."""
    return [d for d in listing.damaged if d.backup_id not in drop]


def _above_bottom(manifest: Manifest, disk: DiskManifest, by_id: dict[str, Manifest]) -> int:
    """Bytes the layers above the bottom of the disk's chain recorded (0 if standalone)."""
    total, current = 0, disk
    while (below := _backing_id(current)) is not None:
        total += sum(c.length for c in current.checksums)
        older = by_id.get(below)
        image = Path(current.backing or "").name
        found = next((d for d in older.disks if d.image == image), None) if older else None
        if found is None:
            return total
        current = found
    return total


def _link_or_copy(source: Path, dest: Path) -> None:
    """``dest`` becomes a name of ``source``'s file (a hard link), or, on a filesystem
    refusing links, a copy of it (fsync'd): never the file itself moved, so that the
    dropped backup keeps its image until it is dropped, whatever happens meanwhile."""
    with contextlib.suppress(FileNotFoundError):
        dest.unlink()
    try:
        os.link(source, dest)
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK):
            raise RepositoryError(f"cannot link {source} to {dest}: {exc}", path=str(dest)) from exc
    with _os_errors("cannot copy", source):
        shutil.copyfile(source, dest)
    _fsync(dest)


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
    if described is None:  # (its own checksums only: the chain's are not combined)
        return dataclasses.replace(merged, block_size=None, blocks=())
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


def _write_intent(path: Path, drop: Sequence[str], sums: dict[str, str] | None = None) -> None:
    intent = {
        "format": INTENT_FORMAT,
        "version": INTENT_VERSION,
        "drop": list(drop),
        "window_sums": dict(sums or {}),  # (read by this version on; others ignore it)
    }
    _write_durably(path, json.dumps(intent, indent=2) + "\n")


def _read_sums(path: Path) -> dict[str, str]:
    """The window sums the intent keeps ({} without any: hashed whole, then)."""
    with _os_errors("cannot read", path), contextlib.suppress(FileNotFoundError):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise RepositoryError(f"retention intent {path} is malformed: {exc}") from exc
        sums = data.get("window_sums", {}) if isinstance(data, dict) else {}
        if isinstance(sums, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _HEX32.fullmatch(v)
            for k, v in sums.items()
        ):
            return sums
        raise RepositoryError(f"retention intent {path}: malformed window_sums", path=str(path))
    return {}


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
