"""Ledger exports: one domain's records as JSON-able data, to move them between hosts.

An export is an object ``{format, version, domain, exported_at, checkpoints,
disk_chains}``; each checkpoint has the fields of a
:class:`~agent.chain.records.CheckpointRecord` (``seq`` is optional and ignored), each
disk chain those of a :class:`~agent.chain.records.DiskChain` but the domain.

:func:`parse_export` validates an export completely, without I/O, before anything is
written: its shape with the pydantic models below (objects, arrays, missing and unknown
fields), its values with :mod:`agent.chain.validation`, the same checks a record passes
on its way into the ledger. The first mistake is reported as a
:class:`~agent.core.errors.LedgerImportError` naming its field
(``import: checkpoints[2].disks[0].capacity: ...``), in the order :func:`_rank`
describes. :class:`ImportDomain` is the operation that writes a parsed export.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from agent.chain.ledger_sql import insert_checkpoint, select_checkpoints, upsert_chain
from agent.chain.records import CheckpointDisk, CheckpointRecord, CheckpointState, DiskChain
from agent.chain.validation import (
    chain_problem,
    find_cycle,
    first_problem,
    name_problem,
    record_problem,
    show,
    state_problem,
    time_problem,
)
from agent.core.errors import LedgerImportError

EXPORT_FORMAT: Final = "libvirt-backup-agent/ledger-export"
EXPORT_VERSION: Final = 1

_INVALID = "ledger_export"  # the pydantic error type of every value check here
_UNKNOWN = frozenset({"extra_forbidden", "invalid_key"})  # a field not declared; a key not a str


def _invalid(problem: str, at: str = "") -> PydanticCustomError:
    """A value check failed; ``at`` is the field below the validated one (".name", "[2]")."""
    return PydanticCustomError(_INVALID, "{problem}", {"problem": problem, "at": at})


def _checked(problem: Callable[[Any], str | None]) -> BeforeValidator:
    def check(value: Any) -> Any:
        if (what := problem(value)) is not None:
            raise _invalid(what)
        return value

    return BeforeValidator(check)


def _readable_version(value: Any) -> Any:
    if type(value) is not int or value != EXPORT_VERSION:
        raise _invalid(f"this agent reads version {EXPORT_VERSION}, got {value!r}")
    return value


def _same_domain(value: Any, info: ValidationInfo) -> Any:
    domain = (info.context or {})["domain"]
    if value != domain:
        raise _invalid(f"{show(value)} is not the export's {domain!r}")
    return value


def _known_state(value: Any) -> CheckpointState:
    try:
        return CheckpointState(value)
    except ValueError:
        raise _invalid(state_problem(value) or "") from None


class _Shape(BaseModel):
    # Lax: any Mapping is an object, as json.load()'s dicts are; arrays are Strict below.
    model_config = ConfigDict(extra="forbid", frozen=True)


class _DiskIn(_Shape):
    """A checkpoint's disk; its values are checked with the checkpoint's."""

    target: Any
    bitmap: Any
    identity: Any
    capacity: Any

    def disk(self) -> CheckpointDisk:
        return CheckpointDisk(self.target, self.bitmap, self.identity, self.capacity)


class _CheckpointIn(_Shape):
    """A checkpoint: the domain and state first, then every value as a record's."""

    domain: Annotated[str, BeforeValidator(_same_domain)]
    state: Annotated[CheckpointState, BeforeValidator(_known_state)]
    disks: Annotated[list[_DiskIn], Strict()]
    domain_uuid: Any
    name: Any
    parent: Any
    born_parent: Any
    created_at: Any
    xml: Any
    backed_up_at: Any
    seq: Any = None  # the exporting ledger's insertion order; the importing one assigns its own

    @model_validator(mode="after")
    def _sound(self) -> Self:
        if (problem := record_problem(self.record())) is not None:
            raise _invalid(problem[1], at=f".{problem[0]}")
        return self

    def record(self) -> CheckpointRecord:
        backed_up = self.backed_up_at
        return CheckpointRecord(
            domain=self.domain,
            domain_uuid=self.domain_uuid,
            name=self.name,
            parent=self.parent,
            born_parent=self.born_parent,
            created_at=self.created_at,
            xml=self.xml,
            disks=tuple(d.disk() for d in self.disks),
            state=self.state,
            # JSON writes 1700000000.0 as 1700000000; keep the record comparable with the ledger's.
            backed_up_at=float(backed_up) if time_problem(backed_up) is None else backed_up,
        )


class _ChainIn(_Shape):
    """A disk's chain: target, then (valid, reason, detail) together, then the time."""

    target: Any
    valid: Any
    reason: Any
    detail: Any
    updated_at: Any

    @model_validator(mode="after")
    def _sound(self) -> Self:
        problem = first_problem([("target", name_problem(self.target))]) or chain_problem(
            self.valid, self.reason, self.detail
        )
        if problem is None and (what := time_problem(self.updated_at)) is not None:
            problem = ("updated_at", what)
        if problem is not None:
            raise _invalid(problem[1], at=f".{problem[0]}")
        return self

    def chain(self, domain: str) -> DiskChain:
        return DiskChain(
            domain, self.target, self.valid, self.reason, self.detail, float(self.updated_at)
        )


def _check_references(checkpoints: list[_CheckpointIn]) -> list[_CheckpointIn]:
    names: set[str] = set()
    for i, c in enumerate(checkpoints):
        if c.name in names:
            raise _invalid(f"{c.name!r} appears twice", at=f"[{i}].name")
        names.add(c.name)
    for i, c in enumerate(checkpoints):
        if c.parent is not None and c.parent not in names:
            raise _invalid(f"{c.parent!r} is not in the export", at=f"[{i}].parent")
    if (name := find_cycle({c.name: c.parent for c in checkpoints})) is not None:
        raise _invalid(f"{name!r} is its own ancestor")
    return checkpoints


def _unique_targets(chains: list[_ChainIn]) -> list[_ChainIn]:
    targets = [c.target for c in chains]
    for i, target in enumerate(targets):
        if target in targets[:i]:
            raise _invalid(f"{target!r} appears twice", at=f"[{i}].target")
    return chains


class _ExportIn(_Shape):
    format: str  # checked first, by _format_first
    version: Annotated[int, BeforeValidator(_readable_version)]
    domain: Annotated[str, _checked(name_problem)]
    exported_at: Annotated[float, _checked(time_problem)]
    checkpoints: Annotated[list[_CheckpointIn], Strict(), AfterValidator(_check_references)]
    disk_chains: Annotated[list[_ChainIn], Strict(), AfterValidator(_unique_targets)]

    @model_validator(mode="before")
    @classmethod
    def _format_first(cls, data: Any) -> Any:
        # The format tag first: a file that is not an export at all should be told so.
        if isinstance(data, Mapping) and data.get("format") != EXPORT_FORMAT:
            got = show(data.get("format"))
            raise _invalid(f"expected {EXPORT_FORMAT!r}, got {got}", at=".format")
        return data


@dataclass(frozen=True, slots=True)
class ImportDomain:
    """Write a parsed export; with ``replace``, instead of what the ledger holds of it."""

    domain: str
    records: tuple[CheckpointRecord, ...]
    chains: tuple[DiskChain, ...]
    replace: bool

    def apply(self, db: sqlite3.Connection, now: float) -> int:
        existing = select_checkpoints(db, "domain = ?", (self.domain,))
        sql = "SELECT 1 FROM disk_chains WHERE domain = ? LIMIT 1"
        has_chains = db.execute(sql, (self.domain,)).fetchone() is not None
        if (existing or has_chains) and not self.replace:
            self._require_identical(existing)
            return 0
        if self.replace:
            db.execute("DELETE FROM checkpoints WHERE domain = ?", (self.domain,))
            db.execute("DELETE FROM disk_chains WHERE domain = ?", (self.domain,))
        for record in self.records:
            insert_checkpoint(db, record)
        for c in self.chains:
            upsert_chain(db, self.domain, c.target, (c.valid, c.reason, c.detail), c.updated_at)
        return len(self.records)

    def _require_identical(self, existing: list[CheckpointRecord]) -> None:
        # Importing the same export twice is harmless; anything else would silently mix two
        # histories, so it needs an explicit replace.
        held = {r.name: dataclasses.replace(r, seq=0) for r in existing}
        for i, record in enumerate(self.records):
            mine = held.get(record.name)
            if mine != dataclasses.replace(record, seq=0):
                what = "is not in the ledger" if mine is None else "differs from the ledger's"
                raise LedgerImportError(
                    f"checkpoints[{i}] ({record.name!r}) {what}, and the ledger already holds"
                    f" records of domain {self.domain!r}; import with replace to overwrite them"
                )


def parse_export(data: Mapping[str, Any], *, replace: bool = False) -> ImportDomain:
    """Validate an export completely (no I/O); raise LedgerImportError naming the field."""
    # Each checkpoint's domain is compared with the export's as written (_same_domain);
    # when that one is wrong, its own error comes first anyway.
    domain = data.get("domain") if isinstance(data, Mapping) else None
    try:
        export = _ExportIn.model_validate(data, context={"domain": domain})
    except ValidationError as exc:
        error = min(exc.errors(), key=lambda e: _rank(e, data))
        raise LedgerImportError(f"import: {_where(error, data)}: {_problem(error)}") from exc
    return ImportDomain(
        export.domain,
        tuple(c.record() for c in export.checkpoints),
        tuple(c.chain(export.domain) for c in export.disk_chains),
        replace=replace,
    )


def _rank(error: ErrorDetails, data: Any) -> tuple[int, ...]:
    """Where ``error`` comes in the order an export is checked in, the first one reported.

    In an object: that it is one, then its unknown fields in the order written, its
    missing fields by name, then each field's value in the order its model declares them
    (the order the checks ran in before pydantic), then the checks of the object as a
    whole. In an array: that it is one, its items in
    order, then the checks across items. (Errors of an object or array as a whole and
    errors inside it never come together: pydantic checks the whole only if the parts pass.)
    """
    key: list[int] = []
    shape: Any = _ExportIn
    loc = error["loc"]
    for depth, part in enumerate(loc):
        last = depth == len(loc) - 1
        if isinstance(data, list):  # an item of an array: list[item model]
            key += (0, int(part))
            shape, data = get_args(shape)[0], data[int(part)]
        elif last and error["type"] in _UNKNOWN:
            key += (0, list(data).index(part))
        elif last and error["type"] == "missing":
            key += (1, sorted(shape.model_fields).index(part))
        else:
            key += (2, list(shape.model_fields).index(part))
            shape, data = shape.model_fields[part].annotation, data[part]
    return tuple(key)


def _where(error: ErrorDetails, data: Any) -> str:
    path = ""
    for part in error["loc"]:
        if isinstance(data, list):
            path, data = f"{path}[{part}]", data[int(part)]
        else:
            path, data = f"{path}.{part}", data.get(part) if isinstance(data, Mapping) else None
    path += error.get("ctx", {}).get("at", "")
    return path.removeprefix(".") or "export"


def _problem(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind == _INVALID:
        return str(error.get("ctx", {})["problem"])
    if kind == "missing":
        return "missing"
    if kind in _UNKNOWN:
        return "unknown field"
    if kind == "list_type":
        return f"expected an array, got {show(error['input'])}"
    if kind == "model_type":
        return f"expected an object, got {show(error['input'])}"
    # Unforeseen: pydantic's own words, still naming the field.
    return error["msg"]


def export_checkpoint(record: CheckpointRecord) -> dict[str, Any]:
    fields = dataclasses.asdict(record)  # disks become a list of dicts, in order
    fields["state"] = record.state.value
    fields["disks"] = [dataclasses.asdict(d) for d in record.disks]
    return fields


def export_chain(chain: DiskChain) -> dict[str, Any]:
    fields = dataclasses.asdict(chain)
    del fields["domain"]
    return fields


def export_document(
    domain: str, at: float, records: Sequence[CheckpointRecord], chains: Sequence[DiskChain]
) -> dict[str, Any]:
    """The export of ``domain``'s records and chains, made at ``at``."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "domain": domain,
        "exported_at": at,
        "checkpoints": [export_checkpoint(r) for r in records],
        "disk_chains": [export_chain(c) for c in chains],
    }
