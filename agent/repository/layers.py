"""qemu-img for the repository, and what it says about one image layer.

Every qemu-img call goes through :func:`agent.qemu.images.run_qemu_img` (bounded, killed
and reaped on timeout or cancellation), so the event loop never blocks: :class:`QemuImg`
bounds quick calls (create, info, map) by ``timeout`` and those that copy a whole disk
(restore, retention merge) by ``copy_timeout``, and turns ImageError into RepositoryError.

A *layer* is one qcow2 file opened without its backing chain (:func:`_bare`): its header
(:class:`_LayerInfo`, from ``qemu-img info``) and its extents (:class:`_Extent`, from
``qemu-img map``, each with its host offset in the file when it has one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.core.errors import ImageError, RepositoryError
from agent.qemu import images


@dataclass(frozen=True, slots=True)
class _LayerInfo:
    format: str
    virtual_size: int
    backing: str | None
    backing_format: str | None


@dataclass(frozen=True, slots=True)
class _Extent:
    start: int
    length: int
    present: bool
    data: bool
    host: int | None


class QemuImg:
    """qemu-img calls about repository images, bounded; failures are RepositoryError."""

    def __init__(self, *, timeout: float, copy_timeout: float):
        self.timeout = timeout
        self.copy_timeout = copy_timeout

    async def run(
        self,
        args: list[str],
        image: Path,
        *,
        long: bool = False,
        progress: Callable[[float], None] | None = None,
    ) -> str:
        timeout = self.copy_timeout if long else self.timeout
        try:
            return await images.run_qemu_img(
                args, timeout=timeout, image=str(image), progress=progress
            )
        except ImageError as exc:
            raise RepositoryError(str(exc), path=str(image)) from exc

    async def layer_info(self, path: Path) -> _LayerInfo:
        # Plain `info` does not open the backing file, so it works when that is missing.
        out = await self.run(["info", "--output=json", "-U", str(path)], path)
        try:
            data = json.loads(out)
            return _LayerInfo(
                format=_typed(data["format"], str),
                virtual_size=_typed(data["virtual-size"], int),
                backing=_typed(data.get("backing-filename"), str, optional=True),
                backing_format=_typed(data.get("backing-filename-format"), str, optional=True),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"qemu-img info {path}: unexpected output: {exc}") from exc

    async def layer_map(self, path: Path) -> list[_Extent]:
        """The extents of this layer alone: opened with no backing, everything is depth 0."""
        out = await self.run(["map", "--output=json", "json:" + json.dumps(_bare(path))], path)
        try:
            return [
                _Extent(
                    start=_typed(e["start"], int),
                    length=_typed(e["length"], int),
                    present=_typed(e["present"], bool),
                    data=_typed(e["data"], bool),
                    host=_typed(e.get("offset"), int, optional=True),
                )
                for e in json.loads(out)
            ]
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"qemu-img map {path}: unexpected output: {exc}") from exc


def _typed(value: Any, kind: type, *, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{value!r} is not {kind.__name__}")
    return value


def _resolve(directory: Path, relative: str) -> Path:
    """``relative`` (a backing path) seen from ``directory``, without ``..`` (no I/O)."""
    return Path(os.path.normpath(directory / relative))


def _bare(path: Path) -> dict[str, Any]:
    """A ``json:`` blockdev spec opening the qcow2 image without its backing chain."""
    return {
        "driver": "qcow2",
        "backing": None,
        "file": {"driver": "file", "filename": str(path.absolute())},
    }
