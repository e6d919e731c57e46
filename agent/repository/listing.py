"""Reading a domain's backups when some of them are damaged: the good ones, and the bad named.

One bad file must not hide the rest. :func:`read_listing` reads every manifest: those that
parse are the listing's backups; every other backup directory is a :class:`Damage` that
says what is wrong with its manifest (missing, unreadable, truncated, not JSON, a field
invalid). Then each disk of each good backup is followed down its backing chain, by the
manifests (never by opening an image): a missing image file, or a chain that reads a
backup whose manifest is damaged (or that is gone), makes that disk of that backup a
:class:`Damage` too, naming the first broken link. Nothing here deletes or rewrites
anything: damage is named, and left for an operator to repair or remove.

:func:`read_tip` is what a backup's plan needs, cheaply: the newest backup whose manifest
reads, the disks of it whose chain is broken, and any damaged backup at least as new
(then no disk may be incremental on it). It reads only the newest second's manifests in
full, as before; the older manifests of the tip's chains are read once and remembered by
their file's identity (:class:`LinkCache`: the images and backing paths only, not the
checksums, which are most of a large full backup's manifest).

Everything here blocks: callers run it in a worker thread (the repository's own,
bounded: :class:`agent.core.blocking.Filesystem`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from agent.core.durable import write_durably
from agent.core.errors import RepositoryError
from agent.repository.layout import _backup_ids, _parse_manifest
from agent.repository.manifest import BACKING_RE, MANIFEST_FILE, Manifest

# What is wrong, in a word (the ``kind`` of a Damage).
MANIFEST_MISSING: Final = "manifest-missing"
MANIFEST_UNREADABLE: Final = "manifest-unreadable"
MANIFEST_TRUNCATED: Final = "manifest-truncated"
MANIFEST_NOT_JSON: Final = "manifest-not-json"
MANIFEST_INVALID: Final = "manifest-invalid"
IMAGE_MISSING: Final = "image-missing"
BACKING_DAMAGED: Final = "backing-damaged"
BACKUP_MISSING: Final = "backup-missing"
IMAGE_DAMAGED: Final = "image-damaged"  # verify or retention found its data wrong

# Beside an image verify or retention found damaged, what they found: the image counts
# as damaged until an operator removes the note (after a repair) or the backups.
DAMAGE_NOTE_SUFFIX: Final = ".damaged"


@dataclass(frozen=True, slots=True)
class Damage:
    """A backup, or one disk of it, that cannot be trusted to restore, and why.

    ``target`` is None when the whole backup is damaged (its manifest cannot be read);
    ``path`` is the bad file (the manifest, or the missing image); ``error`` says what
    is wrong and, for a broken chain, which backup broke it.
    """

    backup_id: str
    target: str | None
    path: Path
    kind: str
    error: str

    def to_json(self) -> dict[str, object]:
        """What ``backups --json`` and ``GET /v1/domains/{domain}/backups`` show of it."""
        return {
            "backup_id": self.backup_id,
            "target": self.target,
            "path": str(self.path),
            "kind": self.kind,
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Listing:
    """A domain's backups: those whose manifest reads (oldest first), and the damage."""

    manifests: tuple[Manifest, ...]
    damaged: tuple[Damage, ...]  # in time order, then by target (the whole backup first)

    def damage_of(self, backup_id: str) -> tuple[Damage, ...]:
        return tuple(d for d in self.damaged if d.backup_id == backup_id)


@dataclass(frozen=True, slots=True)
class Tip:
    """What planning needs: the newest backup whose manifest reads (None if there is
    none), its disks whose chain is broken (by target), and the damaged backups at least
    as new as it (if any, no disk may be incremental on the tip)."""

    manifest: Manifest | None
    broken: Mapping[str, Damage] = field(default_factory=dict)
    newer: tuple[Damage, ...] = ()


# What a chain walk needs of one backup: each image's disk target and backing path.
_Links = Mapping[str, tuple[str, str | None]]
# A backup's links, its manifest's damage, or None when there is no such backup.
_Lookup = Callable[[str], _Links | Damage | None]
# The identity of a manifest file: a file rewritten or replaced is read again.
_Signature = tuple[int, int, int, int]


@dataclass(slots=True)
class LinkCache:
    """The links of manifests read before, by path and file identity (see the module
    docstring); one per domain, replaced by each walk with what that walk used."""

    entries: dict[Path, tuple[_Signature, _Links]] = field(default_factory=dict)


# --- one manifest ----------------------------------------------------------------------


def read_or_damage(directory: Path) -> Manifest | Damage:
    """The backup's manifest, or what is wrong with it."""
    path = directory / MANIFEST_FILE
    backup_id = directory.name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Damage(
            backup_id,
            None,
            path,
            MANIFEST_MISSING,
            f"{path} is missing: the backup directory has no manifest",
        )
    except OSError as exc:
        error = f"cannot read {path}: {exc.strerror or exc}"
        return Damage(backup_id, None, path, MANIFEST_UNREADABLE, error)
    try:
        return _parse_manifest(data, directory)
    except RepositoryError as exc:
        kind, error = _kind(exc), str(exc)
        if kind == MANIFEST_TRUNCATED:
            error += f" (truncated: its {len(data)} bytes end before the JSON document does)"
        return Damage(backup_id, None, path, kind, error)


def _kind(exc: RepositoryError) -> str:
    cause = exc.__cause__
    if isinstance(cause, json.JSONDecodeError):
        # JSON that stops before the document does: the file was cut short (or is empty).
        cut = cause.msg.startswith("Unterminated string") or cause.pos >= len(cause.doc.rstrip())
        return MANIFEST_TRUNCATED if cut else MANIFEST_NOT_JSON
    # Not JSON (or not text) says the manifest's parser with a ValueError; a field with
    # its own error type; a backup_id that is not the directory's with none.
    return MANIFEST_NOT_JSON if isinstance(cause, ValueError) else MANIFEST_INVALID


def _links(manifest: Manifest) -> _Links:
    return {d.image: (d.target, d.backing) for d in manifest.disks}


# --- chains ----------------------------------------------------------------------------


class _Chains:
    """Follows images down their backing chains; remembers each image's first broken
    link (its root damage), so that every chain is walked once."""

    def __init__(self, backups_dir: Path, lookup: _Lookup):
        self._dir = backups_dir
        self._lookup = lookup
        self._roots: dict[tuple[str, str], Damage | None] = {}

    def damage(self, backup_id: str, target: str, image: str) -> Damage | None:
        """Why disk ``target`` (``image``) of the readable backup ``backup_id`` cannot be
        trusted to restore, or None."""
        root = self._root((backup_id, image))
        if root is None or (root.backup_id == backup_id and root.target == target):
            return root
        path = self._dir / backup_id / image
        error = (
            f"{target} of {backup_id} restores through backup {root.backup_id}, "
            f"which is damaged: {root.error}"
        )
        return Damage(backup_id, target, path, BACKING_DAMAGED, error)

    def _root(self, key: tuple[str, str]) -> Damage | None:
        # Iterative: a chain of a thousand increments is no recursion limit.
        walked: list[tuple[str, str]] = []
        root: Damage | None = None
        current: tuple[str, str] | None = key
        while current is not None:
            if current in self._roots:
                root = self._roots[current]
                break
            if current in walked:  # a hand-made loop of backing paths
                path = self._dir / current[0] / current[1]
                root = Damage(current[0], None, path, BACKING_DAMAGED, f"{path}: backing loop")
                break
            walked.append(current)
            root, current = self._step(*current)
        for seen in walked:
            self._roots[seen] = root
        return root

    def _step(self, backup_id: str, image: str) -> tuple[Damage | None, tuple[str, str] | None]:
        """This link's damage, or (None and) the next link down (None: a full image)."""
        links = self._lookup(backup_id)
        path = self._dir / backup_id / image
        if links is None:
            error = f"backup {backup_id} is not in the repository ({self._dir / backup_id})"
            return Damage(backup_id, None, self._dir / backup_id, BACKUP_MISSING, error), None
        if isinstance(links, Damage):
            return links, None
        if image not in links:
            error = f"the manifest of {backup_id} lists no image {image}"
            return Damage(backup_id, None, path, IMAGE_MISSING, error), None
        target, backing = links[image]
        if (damage := _image_damage(backup_id, target, path)) is not None:
            return damage, None
        match = BACKING_RE.fullmatch(backing) if backing is not None else None
        if match is None:  # no backing (the manifest's parser checked its form)
            return None, None
        return None, (match["id"], match["image"])


def _image_damage(backup_id: str, target: str, path: Path) -> Damage | None:
    """The image missing, or noted damaged (:func:`mark_damaged`), or None."""
    if not path.is_file():
        return Damage(backup_id, target, path, IMAGE_MISSING, f"image {path} is missing")
    note = path.with_name(path.name + DAMAGE_NOTE_SUFFIX)
    if note.exists():
        found = _note_text(note)
        error = f"image {path} is damaged ({found}; {note} says so: remove it once repaired)"
        return Damage(backup_id, target, path, IMAGE_DAMAGED, error)
    return None


def _note_text(note: Path) -> str:
    try:
        text = note.read_text(encoding="utf-8", errors="replace").strip()
    except OSError as exc:
        return f"cannot read the note: {exc.strerror or exc}"
    return " ".join(text.split())[:500] or "no details"


def mark_damaged(image: Path, found: str) -> None:
    """BLOCKING: note beside ``image`` that its data was found wrong (``found``, one
    line); durable, so the next listing names it whatever happens meanwhile."""
    write_durably(image.with_name(image.name + DAMAGE_NOTE_SUFFIX), found.strip() + "\n")


def _chain_damage(chains: _Chains, manifest: Manifest) -> dict[str, Damage]:
    found = {}
    for disk in manifest.disks:
        if (damage := chains.damage(manifest.backup_id, disk.target, disk.image)) is not None:
            found[disk.target] = damage
    return found


# --- a domain's listing ----------------------------------------------------------------


def read_listing(backups_dir: Path) -> Listing:
    """Every backup of the domain in ``backups_dir``: the readable ones and the damage
    (empty if there is no directory). Only listing the directory itself can fail."""
    read = {n: read_or_damage(backups_dir / n) for n in _backup_ids(backups_dir)}
    manifests = sorted(
        (m for m in read.values() if isinstance(m, Manifest)),
        key=lambda m: (m.created_at, m.backup_id),
    )
    damaged = [d for d in read.values() if isinstance(d, Damage)]

    def lookup(backup_id: str) -> _Links | Damage | None:
        found = read.get(backup_id)
        return _links(found) if isinstance(found, Manifest) else found

    chains = _Chains(backups_dir, lookup)
    for manifest in manifests:
        damaged += _chain_damage(chains, manifest).values()
    in_time = time_order([m.backup_id for m in manifests])
    damaged.sort(key=lambda d: (in_time(d.backup_id), d.target or ""))
    return Listing(tuple(manifests), tuple(damaged))


def time_order(ids: Sequence[str]) -> Callable[[str], tuple[str, int]]:
    """A sort key putting backup ids in the order of ``ids`` (the readable backups,
    oldest first); one not among them (its manifest does not read) by its id's UTC
    second, after the readable ones of that second."""
    rank = {backup_id: index for index, backup_id in enumerate(ids)}
    return lambda backup_id: (backup_id.split("-", 1)[0], rank.get(backup_id, len(rank)))


def read_newest(backups_dir: Path) -> tuple[Manifest | None, list[Damage]]:
    """The newest backup whose manifest reads, and the damaged backups at least as new.

    Reads the manifests of the newest second's backups (an id starts with its UTC
    second), then of the second before if none of those reads, and so on.
    """
    names = _backup_ids(backups_dir)
    damaged: list[Damage] = []
    for second in sorted({n.split("-", 1)[0] for n in names}, reverse=True):
        read = [read_or_damage(backups_dir / n) for n in names if n.startswith(second + "-")]
        damaged += (d for d in read if isinstance(d, Damage))
        manifests = [m for m in read if isinstance(m, Manifest)]
        if manifests:
            return max(manifests, key=lambda m: (m.created_at, m.backup_id)), damaged
    return None, damaged


def read_tip(backups_dir: Path, cache: LinkCache) -> Tip:
    """The :class:`Tip` of the domain in ``backups_dir``; ``cache`` is updated."""
    newest, damaged = read_newest(backups_dir)
    if newest is None:
        return Tip(None, {}, tuple(damaged))
    used: dict[Path, tuple[_Signature, _Links]] = {}

    def lookup(backup_id: str) -> _Links | Damage | None:
        if backup_id == newest.backup_id:
            return _links(newest)
        return _cached_links(backups_dir / backup_id, cache, used)

    broken = _chain_damage(_Chains(backups_dir, lookup), newest)
    cache.entries = used
    return Tip(newest, broken, tuple(damaged))


def _cached_links(
    directory: Path, cache: LinkCache, used: dict[Path, tuple[_Signature, _Links]]
) -> _Links | Damage | None:
    path = directory / MANIFEST_FILE
    signature: _Signature | None = None
    try:
        st = os.stat(path)
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except OSError:
        if not directory.is_dir():
            return None  # no such backup (read_or_damage says what is wrong otherwise)
    known = used.get(path) or cache.entries.get(path)
    if known is not None and known[0] == signature:
        used[path] = known
        return known[1]
    read = read_or_damage(directory)
    if isinstance(read, Damage):
        return read
    links = _links(read)
    if signature is not None:
        used[path] = (signature, links)
    return links
