"""The manifest: what one backup holds, as frozen dataclasses, and its JSON file.

``manifest.json`` in a backup's directory is read strictly: every field typed, unknown
fields refused (a newer writer must bump :data:`MANIFEST_VERSION`), and every error names
the file and the field's path (``disks[0].checksums[3].digest: invalid value ...``).

The file's shape is checked by pydantic models (:class:`_ManifestV4`,
:class:`_ManifestV3`, :class:`_ManifestV2`, :class:`_ManifestV1`, one per version:
version 4 has the same shape as 3 and its checksums are window sums
(:mod:`agent.repository.windows`), version 3 lists the disks left out of the backup
(``excluded``) and a disk's ``block_size``, version 2 names each range's checksum
algorithm, version 1 holds SHA-256 digests); the rules across fields (a range within the
disk, a digest as long as its algorithm's, a mode's backing file, unique targets, whole
blocks) then by :func:`_checked`. Fields are declared in the order they have always been
checked in, and pydantic reports errors in that order: of several mistakes the first is
named (a rule across fields, though, only once the whole shape is right). pydantic's
errors are phrased as before: ``<path>: missing``, ``wrong type str``, ``invalid value
'...'``, ``unknown field`` and so on.

A full backup has one checksum per 2 MiB request (51,200 for 100 GiB), and the newest
manifest is read before every backup: version 2's checksums are validated by
pydantic-core straight into :class:`RangeChecksum` (no intermediate model), and the rules
across fields take one pass over plain attributes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Protocol

import xxhash
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetPydanticSchema,
    ValidationError,
    field_validator,
)
from pydantic_core import ErrorDetails, core_schema

from agent.core.errors import RepositoryError
from agent.repository.windows import ALGORITHM, WindowDigest, window_digest

MANIFEST_FORMAT: Final = "libvirt-backup-agent/backup"
# 4: window sums (xxh3-128-w64k); 3: excluded disks, block_size; 2: per-range checksum
# algorithm (XXH3-128); 1: SHA-256
MANIFEST_VERSION: Final = 4
CHECKSUM: Final = ALGORITHM
MANIFEST_FILE: Final = "manifest.json"

BACKUP_ID_RE: Final = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
BACKING_RE: Final = re.compile(r"\.\./(?P<id>[^/]+)/(?P<image>[^/]+)")
# The checksum algorithms manifests may name, and how many hex digits their digests have.
_DIGEST_LENGTHS: Final = {"sha256": 64, "xxh3-128": 32, ALGORITHM: 32}
_MODES: Final = ("full", "incremental")


class Digest(Protocol):
    """What verify needs of a hash object (hashlib's and xxhash's both fit)."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RangeChecksum:
    """The checksum (``algorithm``, hex ``digest``) of the bytes written at
    ``[offset, offset + length)`` into one image.

    New backups use a sum of XXH3-128 terms over the range's 64 KiB windows
    (:mod:`agent.repository.windows`): XXH3 finds corruption as surely as SHA-256 and
    costs a hundredth of its CPU, which on a busy host is what a full backup is short
    of, and a sum can be updated when a merge overwrites part of the range. (A checksum
    next to the data cannot stop anyone able to rewrite both anyway.) Manifests of
    versions 2 and 3 carry plain XXH3-128 of each range, those of version 1 SHA-256;
    both are still verified with theirs.
    """

    offset: int
    length: int
    digest: str
    algorithm: str = CHECKSUM


def new_digest(algorithm: str, offset: int = 0) -> Digest:
    """A fresh incremental hash object for ``algorithm``, of bytes from ``offset`` on."""
    if algorithm == ALGORITHM:
        return WindowDigest(offset)
    if algorithm == "xxh3-128":
        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise RepositoryError(f"unknown checksum algorithm {algorithm!r}")


def digest_of(data: bytes | bytearray | memoryview, offset: int) -> str:
    """The checksum new backups record for ``data``, the bytes at ``offset`` in the disk
    (:data:`CHECKSUM`)."""
    return window_digest(data, offset)


@dataclass(frozen=True, slots=True)
class DiskManifest:
    """One disk of a backup: its image (relative to the backup directory) and what is in it.

    ``reason`` says why a disk is full when the backup as a whole was not (e.g.
    ``disk-added``, ``format-raw: no persistent bitmap``); ``backing`` is the image's
    backing path (``../<id>/<image>``) or None.

    ``block_size`` is set for a disk read in full and stored as what changed (a disk with
    no bitmap, :mod:`agent.repository.blocks`): then no checksum of this image spans two
    blocks of that size, and each block the image wrote only in part has the checksum of
    all it holds now in ``blocks`` (a block's last one may be shorter: the disk's end).
    The image's whole-block checksums and ``blocks``, and those below it in its backing
    chain, the newest for each block, describe every block of the disk that is not all
    zeroes. Such an image is ``full`` (all of the disk was read) and may still have a
    backing: the previous point, which holds what did not change.

    ``point_digest`` is the window sum (:mod:`agent.repository.windows`) of the whole
    disk at this point, as a restore of it reads (None where it is not known: a backup
    of version 3 or older, or one on such a parent). A full's is the sum of its ranges'
    checksums; an increment's, its parent's minus the old terms of the windows it
    wrote, plus their new terms; a merge keeps it (the point's bytes do not change).
    ``restore`` checks it before it reports success.
    """

    target: str
    image: str
    mode: str
    reason: str | None
    virtual_size: int
    bytes_copied: int
    backing: str | None
    checksums: tuple[RangeChecksum, ...]
    block_size: int | None = None
    blocks: tuple[RangeChecksum, ...] = ()
    point_digest: str | None = None


@dataclass(frozen=True, slots=True)
class ExcludedDisk:
    """A disk of the domain that is in no backup, and why (e.g. ``device-cdrom``,
    ``excluded-by-config``; :mod:`agent.virt.inventory`)."""

    target: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """Everything about one backup; ``manifest.json`` in its directory.

    ``merged_from`` lists the dropped backups whose data retention merged into this one;
    such a backup has no ``parent`` and its merged disks no ``backing``, whatever their mode.
    """

    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION
    backup_id: str
    domain: str
    domain_uuid: str
    created_at: float
    completed_at: float
    parent: str | None
    checkpoint: str
    checkpoint_xml: str
    domain_xml: str
    disks: tuple[DiskManifest, ...]
    merged_from: tuple[str, ...] = ()
    excluded: tuple[ExcludedDisk, ...] = ()

    def disk(self, target: str) -> DiskManifest | None:
        """The disk called ``target`` in this backup, if it has one."""
        return next((d for d in self.disks if d.target == target), None)

    def to_json(self) -> str:
        # The same document as dataclasses.asdict gives, built field by field: asdict
        # deep-copies every value, 8 ms for the thousand checksums of a 2 GiB full.
        data = _fields(self)
        # Always the current format: checksums are written in version 2's shape (a version
        # 1 manifest rewritten by retention keeps its SHA-256 digests, with their name).
        data["version"] = MANIFEST_VERSION
        data["disks"] = [
            {
                **_fields(d),
                "checksums": [_fields(c) for c in d.checksums],
                "blocks": [_fields(c) for c in d.blocks],
            }
            for d in self.disks
        ]
        data["excluded"] = [_fields(x) for x in self.excluded]
        return json.dumps(data, indent=2) + "\n"

    @property
    def mode(self) -> str:
        """``full`` or ``incremental`` when every disk agrees, else ``mixed``."""
        modes = {d.mode for d in self.disks}
        return modes.pop() if len(modes) == 1 else "mixed"

    def summary(self) -> dict[str, object]:
        """What ``backups --json`` and ``GET /v1/domains/{domain}/backups`` show."""
        return {
            "id": self.backup_id,
            "domain": self.domain,
            "domain_uuid": self.domain_uuid,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "mode": self.mode,
            "parent": self.parent,
            "checkpoint": self.checkpoint,
            "bytes": sum(d.bytes_copied for d in self.disks),
            "disks": [
                {
                    "target": d.target,
                    "mode": d.mode,
                    "reason": d.reason,
                    "bytes": d.bytes_copied,
                    "virtual_size": d.virtual_size,
                    "image": d.image,
                    "layered": d.mode == "full" and d.backing is not None,
                }
                for d in self.disks
            ],
            "excluded": [{"target": x.target, "reason": x.reason} for x in self.excluded],
        }

    @classmethod
    def from_json(cls, text: str, *, path: str) -> Manifest:
        """Parse and strictly validate a manifest; RepositoryError names the bad field."""
        try:
            return _checked(_validated(text))
        except ValueError as exc:  # not JSON
            raise RepositoryError(f"manifest {path}: not JSON: {exc}", path=path) from exc
        except _FieldError as exc:
            raise RepositoryError(f"manifest {path}: field {exc}", path=path) from exc


def _fields(value: Any) -> dict[str, Any]:
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


# --- the file's shape, per version (pydantic) ------------------------------------------
#
# Fields are declared in the order they are checked: pydantic reports a model's errors in
# that order (its unknown fields after them), so the first error is the first mistake.


def _pattern(regex: re.Pattern[str]) -> str:
    return f"^(?:{regex.pattern})$"  # pydantic searches; a manifest's values must match whole


_Count = Annotated[int, Field(ge=0)]
_BackupId = Annotated[str, Field(pattern=_pattern(BACKUP_ID_RE))]
_Name = Annotated[str, Field(pattern=_pattern(NAME_RE))]
_HEX_DIGEST = r"^(?:[0-9a-f]{32}|[0-9a-f]{64})$"  # which of the two: see _check_checksums


def _checksum_schema(version: int) -> core_schema.CoreSchema:
    """A checksum of a manifest of ``version``, built by pydantic-core as a
    :class:`RangeChecksum` itself (without calling ``__init__``): a model per range and a
    copy into the dataclass took twice as long as the whole parse does now.

    Version 2: ``offset``, ``length``, ``algorithm``, ``digest``. Version 1: ``offset``,
    ``length``, ``sha256`` (the digest; the algorithm is not in the file).
    """
    offset = core_schema.dataclass_field("offset", core_schema.int_schema(ge=0, strict=True))
    length = core_schema.dataclass_field("length", core_schema.int_schema(ge=1, strict=True))
    if version == 1:
        digest = core_schema.str_schema(pattern=r"^[0-9a-f]{64}$", strict=True)
        fields = [
            offset,
            length,
            core_schema.dataclass_field("digest", digest, validation_alias="sha256"),
            core_schema.dataclass_field(
                "algorithm",
                core_schema.with_default_schema(core_schema.str_schema(), default="sha256"),
                init=False,  # not read from the file: "algorithm" there is an unknown field
            ),
        ]
    else:
        algorithm = core_schema.literal_schema(list(_DIGEST_LENGTHS))
        digest = core_schema.str_schema(pattern=_HEX_DIGEST, strict=True)
        fields = [
            offset,
            length,
            core_schema.dataclass_field("algorithm", algorithm),
            core_schema.dataclass_field("digest", digest),
        ]
    arguments = core_schema.dataclass_args_schema("RangeChecksum", fields, extra_behavior="forbid")
    names = [f.name for f in dataclasses.fields(RangeChecksum)]
    return core_schema.dataclass_schema(
        RangeChecksum, arguments, names, slots=True, frozen=True, strict=False
    )


_ChecksumV2 = Annotated[RangeChecksum, GetPydanticSchema(lambda *_: _checksum_schema(2))]
_ChecksumV1 = Annotated[RangeChecksum, GetPydanticSchema(lambda *_: _checksum_schema(1))]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _DiskV2(_Strict):
    virtual_size: Annotated[int, Field(ge=1)]
    target: _Name
    image: _Name
    mode: str  # its value is checked after the checksums (_check_disk)
    reason: str | None
    bytes_copied: _Count
    backing: Annotated[str, Field(pattern=_pattern(BACKING_RE))] | None
    checksums: tuple[_ChecksumV2, ...]

    def parsed(self) -> DiskManifest:
        return DiskManifest(
            self.target,
            self.image,
            self.mode,
            self.reason,
            self.virtual_size,
            self.bytes_copied,
            self.backing,
            self.checksums,
        )


class _DiskV1(_DiskV2):
    checksums: tuple[_ChecksumV1, ...]


class _DiskV3(_DiskV2):
    block_size: Annotated[int, Field(ge=4096)] | None
    blocks: tuple[_ChecksumV2, ...]

    def parsed(self) -> DiskManifest:
        parsed = super().parsed()
        return dataclasses.replace(parsed, block_size=self.block_size, blocks=self.blocks)


class _DiskV4(_DiskV3):
    point_digest: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None

    def parsed(self) -> DiskManifest:
        return dataclasses.replace(super().parsed(), point_digest=self.point_digest)


class _Excluded(_Strict):
    target: _Name
    reason: Annotated[str, Field(min_length=1)]


class _OtherVersionError(ValueError):
    """The document is of the other version this agent reads: parse it with that model."""


class _ManifestV2(_Strict):
    VERSION: ClassVar[int] = 2

    format: str
    version: _Count
    merged_from: tuple[_BackupId, ...]
    disks: tuple[_DiskV2, ...]
    backup_id: _BackupId
    domain: str
    domain_uuid: str
    created_at: float
    completed_at: float
    parent: _BackupId | None
    checkpoint: str
    checkpoint_xml: str
    domain_xml: str

    @field_validator("format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value != MANIFEST_FORMAT:
            raise _InvalidValueError(f"not {MANIFEST_FORMAT!r}")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value not in _MODELS:
            raise _InvalidValueError(f"unsupported (this agent reads 1 to {MANIFEST_VERSION})")
        if value != cls.VERSION:
            raise _OtherVersionError(value)
        return value

    def parsed(self) -> Manifest:
        return Manifest(
            format=self.format,
            version=self.version,
            backup_id=self.backup_id,
            domain=self.domain,
            domain_uuid=self.domain_uuid,
            created_at=self.created_at,
            completed_at=self.completed_at,
            parent=self.parent,
            checkpoint=self.checkpoint,
            checkpoint_xml=self.checkpoint_xml,
            domain_xml=self.domain_xml,
            disks=tuple(d.parsed() for d in self.disks),
            merged_from=self.merged_from,
        )


class _ManifestV1(_ManifestV2):
    VERSION: ClassVar[int] = 1

    disks: tuple[_DiskV1, ...]  # version 1's checksums


class _ManifestV3(_ManifestV2):
    VERSION: ClassVar[int] = 3

    disks: tuple[_DiskV3, ...]
    excluded: tuple[_Excluded, ...]

    def parsed(self) -> Manifest:
        excluded = tuple(ExcludedDisk(x.target, x.reason) for x in self.excluded)
        return dataclasses.replace(super().parsed(), excluded=excluded)


class _ManifestV4(_ManifestV3):
    VERSION: ClassVar[int] = 4  # window sums, and each disk's point_digest

    disks: tuple[_DiskV4, ...]


_MODELS: Final[dict[int, type[_ManifestV2]]] = {
    1: _ManifestV1,
    2: _ManifestV2,
    3: _ManifestV3,
    4: _ManifestV4,
}
_VERSION_RE: Final = re.compile(r'"version": (\d+),')


# --- errors: pydantic's, phrased as a field path and what is wrong with it -------------


class _FieldError(Exception):
    """A manifest field is missing or wrong; the message starts with its dotted name."""


class _InvalidValueError(ValueError):
    """Raised by a validator: the message says what is wrong with the field's value."""


def _validated(text: str) -> _ManifestV2:
    """The document validated by its version's model (raises _FieldError, ValueError)."""
    # The writer puts the version first: a guess of the model, which checks it anyway.
    guess = _VERSION_RE.search(text[:200])
    model = _MODELS.get(int(guess.group(1)) if guess else MANIFEST_VERSION, _ManifestV4)
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        failure = exc
    other = next((v for e in failure.errors() if (v := _other_version(e)) is not None), None)
    if other is not None:
        try:
            return _MODELS[other].model_validate_json(text)
        except ValidationError as exc:
            failure = exc
    errors = failure.errors()
    if errors[0]["type"] == "json_invalid":
        try:
            json.loads(text)  # raises ValueError: the standard library's words, as ever
        except RecursionError:  # garbage of nested brackets: not a manifest either
            raise ValueError("nested too deeply to be a manifest") from failure
        raise ValueError(errors[0]["ctx"]["error"]) from failure  # what only pydantic refuses
    raise _FieldError(_describe(_first(errors))) from failure


def _other_version(error: ErrorDetails) -> int | None:
    """The version the document says it is, when that is another model's."""
    found = error.get("ctx", {}).get("error")
    return found.args[0] if isinstance(found, _OtherVersionError) else None


def _first(errors: Sequence[ErrorDetails]) -> ErrorDetails:
    # An object's unknown fields come after its other errors, reported in name order.
    first = errors[0]
    if first["type"] not in _UNKNOWN_TYPES:
        return first
    parent = first["loc"][:-1]
    extra = [e for e in errors if e["type"] in _UNKNOWN_TYPES and e["loc"][:-1] == parent]
    return min(extra, key=lambda e: str(e["loc"][-1]))


def _path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


_OBJECT_TYPES: Final = {"model_type", "dataclass_type", "dataclass_args_type", "dict_type"}
# An unknown field: of a model, and of a checksum (a dataclass, to pydantic a keyword).
_UNKNOWN_TYPES: Final = {"extra_forbidden", "unexpected_keyword_argument"}


_PHRASES: Final[dict[str, Callable[[Any, dict[str, Any]], str]]] = {
    "value_error": lambda _, ctx: str(ctx["error"]),  # a validator's _InvalidValueError
    "greater_than_equal": lambda value, ctx: f"{value} is less than {ctx['ge']}",
    "string_pattern_mismatch": lambda value, _: f"invalid value {value!r}",
    "missing": lambda *_: "missing",
    **dict.fromkeys(_OBJECT_TYPES, lambda *_: "expected an object"),
    **dict.fromkeys(_UNKNOWN_TYPES, lambda *_: "unknown field"),
}


def _describe(error: ErrorDetails) -> str:
    """``<field path>: <what is wrong>``, in the words of the hand-written parser it replaced."""
    return f"{_path(error['loc']) or '(document)'}: {_problem(error)}"


def _problem(error: ErrorDetails) -> str:
    loc, kind, value = error["loc"], error["type"], error["input"]
    if len(loc) == 2 and loc[0] == "merged_from" and kind not in _UNKNOWN_TYPES:
        return "not a backup id"
    if kind == "literal_error" and type(value) is str:  # only a checksum's algorithm
        return f"unknown checksum algorithm {value!r}"
    if (phrase := _PHRASES.get(kind)) is not None:
        return phrase(value, error.get("ctx", {}))
    # A type error (pydantic's strict mode: no bool for an int, no "4M" for a size).
    return f"wrong type {type(value).__name__}"


# --- the rules across fields -----------------------------------------------------------


def _checked(document: _ManifestV2) -> Manifest:
    """The manifest, once the rules that tie its fields together hold."""
    manifest = document.parsed()
    for index, disk in enumerate(manifest.disks):
        _check_disk(f"disks[{index}]", disk, manifest.merged_from)
    if len({d.target for d in manifest.disks}) != len(manifest.disks):
        raise _FieldError("disks: duplicate target")
    targets = {d.target for d in manifest.disks}
    left_out: set[str] = set()
    for index, x in enumerate(manifest.excluded):
        if x.target in targets:
            raise _FieldError(f"excluded[{index}].target: {x.target!r} is a disk of the backup")
        if x.target in left_out:
            raise _FieldError(f"excluded[{index}].target: duplicate {x.target!r}")
        left_out.add(x.target)
    return manifest


def _check_disk(where: str, disk: DiskManifest, merged_from: tuple[str, ...]) -> None:
    _check_checksums(where, disk)
    if disk.mode not in _MODES:
        raise _FieldError(f"{where}.mode: {disk.mode!r} is not one of {', '.join(_MODES)}")
    if disk.block_size is not None and disk.mode != "full":
        raise _FieldError(f"{where}.block_size: only a disk read in full has blocks")
    if disk.mode == "full" and disk.backing is not None and disk.block_size is None:
        # (only a disk stored as what changed sits on the previous point: block_size)
        raise _FieldError(f"{where}.backing: a full image has no backing file")
    # Retention makes an incremental image standalone; without that it needs a backing.
    if disk.mode == "incremental" and disk.backing is None and not merged_from:
        raise _FieldError(f"{where}.backing: an incremental image needs a backing file")


def _check_checksums(where: str, disk: DiskManifest) -> None:
    size, lengths = disk.virtual_size, _DIGEST_LENGTHS
    for index, c in enumerate(disk.checksums):
        if len(c.digest) != lengths[c.algorithm]:
            # Only version 2 names the algorithm; version 1's pattern admits 64 digits only.
            raise _FieldError(f"{where}.checksums[{index}].digest: invalid value {c.digest!r}")
        if c.offset + c.length > size:
            raise _FieldError(
                f"{where}.checksums[{index}].length: range ends beyond the virtual size"
            )
        block = disk.block_size
        if block is not None and c.offset // block != (c.offset + c.length - 1) // block:
            raise _FieldError(f"{where}.checksums[{index}]: spans two blocks of {block} bytes")
    _check_blocks(where, disk)


def _check_blocks(where: str, disk: DiskManifest) -> None:
    """``blocks``: whole blocks, one each at most, for every block written in part."""
    block, size = disk.block_size, disk.virtual_size
    if block is None:
        if disk.blocks:
            raise _FieldError(f"{where}.blocks: a disk without block_size has none")
        return
    said = set()
    for index, b in enumerate(disk.blocks):
        if b.offset % block or b.length != min(block, size - b.offset) or b.offset in said:
            raise _FieldError(f"{where}.blocks[{index}]: not one whole block of {block} bytes")
        if len(b.digest) != _DIGEST_LENGTHS[b.algorithm]:
            raise _FieldError(f"{where}.blocks[{index}].digest: invalid value {b.digest!r}")
        said.add(b.offset)
    for index, c in enumerate(disk.checksums):
        start = c.offset - c.offset % block
        whole = c.offset == start and c.length == min(block, size - start)
        if whole == (start in said):  # a block is described once: whole, or in blocks
            problem = "also in blocks" if whole else "part of a block that blocks lacks"
            raise _FieldError(f"{where}.checksums[{index}]: {problem} (block {start})")
