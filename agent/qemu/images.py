"""What ``qemu-img`` says about a disk image's backing chain and its dirty bitmaps.

An incremental backup trusts a checkpoint's persistent dirty bitmap only if it is
present from the top image down to the layer where it was created, still recording,
and consistent. :func:`read_chain` reads every layer's bitmaps with
``qemu-img info --backing-chain``; :func:`bitmap_problem` decides whether a bitmap can
be trusted and, if not, why. :func:`remove_bitmap` deletes a bitmap from an image that
no QEMU has open. Every ``qemu-img`` call goes through :func:`run_qemu_img`, which never
blocks the event loop and never leaves a child process behind.
"""

# ASYNC109: the timeout is part of this API, not a stand-in for asyncio.timeout(): on
# expiry the qemu-img child is killed and reaped and the caller gets an ImageError.

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.core.errors import ImageError

# Module level so tests can point the agent at a stand-in that hangs or misbehaves.
QEMU_IMG = "/usr/bin/qemu-img"

# A SIGKILLed process is normally reaped at once; this only bounds a child stuck in
# uninterruptible I/O (e.g. a hung NFS mount), which nothing can kill.
_REAP_TIMEOUT = 5.0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One persistent dirty bitmap as stored in a qcow2 header."""

    name: str
    flags: frozenset[str]
    granularity: int

    @property
    def recording(self) -> bool:
        """Whether guest writes are tracked (qcow2's ``auto`` flag)."""
        return "auto" in self.flags

    @property
    def in_use(self) -> bool:
        """Whether a writer had it loaded; on a closed image this means inconsistent."""
        return "in-use" in self.flags


@dataclass(frozen=True, slots=True)
class Layer:
    """One image of a backing chain; ``bitmaps`` is empty for formats without bitmaps."""

    filename: str
    format: str
    virtual_size: int
    bitmaps: tuple[Bitmap, ...]

    def bitmap(self, name: str) -> Bitmap | None:
        """The bitmap called ``name`` in this layer, if there is one."""
        return next((b for b in self.bitmaps if b.name == name), None)


async def run_qemu_img(
    args: Sequence[str],
    *,
    timeout: float,
    image: str,
    progress: Callable[[float], None] | None = None,
) -> str:
    """Run ``qemu-img *args`` and return its standard output.

    Raises :class:`ImageError` (with qemu-img's stderr) on a non-zero exit, and when
    it does not finish within ``timeout`` seconds. On timeout or cancellation the child
    is killed and reaped before this returns. With ``progress`` (for commands given
    ``-p``), each ``(12.34/100%)`` qemu-img prints is passed on as 0.1234 as it comes.
    """
    stdout, _ = await _run(args, timeout=timeout, image=image, progress=progress)
    return stdout


async def read_chain(image: Path | str, *, timeout: float = 30.0) -> tuple[Layer, ...]:
    """Every layer of ``image``'s backing chain, top first.

    Uses ``-U`` so that an image a running QEMU holds locked can still be read; the
    bitmap flags of such an image are then not authoritative (see :func:`bitmap_problem`).
    """
    path = str(image)
    args = ["info", "--output=json", "-U", "--backing-chain", path]
    stdout, stderr = await _run(args, timeout=timeout, image=path)
    try:
        layers = _expect(_loads(stdout), list)
        if not layers:
            raise _BadJSONError("empty backing chain")
        return tuple(_parse_layer(layer) for layer in layers)
    except _BadJSONError as exc:
        raise _unexpected_json(exc, path, stderr) from exc


async def list_bitmaps(image: Path | str, *, timeout: float = 30.0) -> tuple[Bitmap, ...]:
    """The bitmaps of ``image`` itself (not of its backing files)."""
    path = str(image)
    stdout, stderr = await _run(["info", "--output=json", "-U", path], timeout=timeout, image=path)
    try:
        return _parse_layer(_loads(stdout)).bitmaps
    except _BadJSONError as exc:
        raise _unexpected_json(exc, path, stderr) from exc


async def remove_bitmap(image: Path | str, name: str, *, timeout: float = 30.0) -> None:
    """Delete bitmap ``name`` from ``image``, which no QEMU may have open.

    qemu-img takes the image's write lock, so this fails (rather than corrupting the
    image) if a QEMU that honours locking has it open. Inconsistent bitmaps can be removed.
    """
    path = str(image)
    # -f qcow2: only qcow2 has bitmaps, and naming the format avoids probing it.
    await _run(["bitmap", "-f", "qcow2", "--remove", path, name], timeout=timeout, image=path)


def bitmap_problem(
    chain: Sequence[Layer], name: str, *, image_open: bool = False
) -> tuple[str, str] | None:
    """Why bitmap ``name`` cannot be trusted for an incremental backup, or None if it can.

    ``chain`` is top first, as from :func:`read_chain`. The answer is ``(reason, detail)``
    with reason one of ``image-not-qcow2``, ``bitmap-missing``, ``bitmap-inconsistent``,
    ``bitmap-disabled``. Pass ``image_open=True`` when a QEMU has the top image open:
    it flags its loaded bitmaps in-use in the header, so that flag means nothing then.
    """
    if not chain:
        raise ValueError("bitmap_problem needs at least one layer")
    top = chain[0]
    if top.format != "qcow2":
        return "image-not-qcow2", f"{top.filename} is {top.format}, not qcow2"
    span = _creation_span(chain, name)
    if not span:
        return "bitmap-missing", f"bitmap {name!r} not in {top.filename} nor its backing files"
    if gap := _gap(span, name):
        return gap
    held = [(layer, bitmap) for layer in span if (bitmap := layer.bitmap(name)) is not None]
    return _state_problem(held, name, image_open=image_open)


def _creation_span(chain: Sequence[Layer], name: str) -> Sequence[Layer]:
    """The layers from the top down to the deepest one holding the bitmap (its creation)."""
    holders = [i for i, layer in enumerate(chain) if layer.bitmap(name) is not None]
    return chain[: holders[-1] + 1] if holders else ()


def _gap(span: Sequence[Layer], name: str) -> tuple[str, str] | None:
    # Writes made while a layer was the top are only in that layer's bitmap: if a layer
    # between the top and the creation layer lacks it, those writes would be missed.
    for layer in span:
        if layer.bitmap(name) is None:
            deepest = span[-1].filename
            detail = f"bitmap {name!r} missing from {layer.filename} (present in {deepest})"
            return "bitmap-missing", detail
    return None


def _state_problem(
    held: Sequence[tuple[Layer, Bitmap]], name: str, *, image_open: bool
) -> tuple[str, str] | None:
    if not image_open:
        for layer, bitmap in held:
            if bitmap.in_use:
                detail = f"bitmap {name!r} in {layer.filename} is in-use (not saved by QEMU)"
                return "bitmap-inconsistent", detail
    # Backing layers are read-only, so only the top layer's bitmap must still record.
    top, top_bitmap = held[0]
    if not top_bitmap.recording:
        return "bitmap-disabled", f"bitmap {name!r} in {top.filename} is not recording"
    return None


async def _run(
    args: Sequence[str],
    *,
    timeout: float,
    image: str,
    progress: Callable[[float], None] | None = None,
) -> tuple[str, str]:
    command = f"qemu-img {args[0]}" if args else "qemu-img"
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ImageError(f"{command} {image}: cannot run {QEMU_IMG}: {exc}", image=image) from exc
    try:
        async with asyncio.timeout(timeout):
            if progress is None:
                out, err = await proc.communicate()
            else:
                out, err = await _communicate_with_progress(proc, progress)
    except TimeoutError as exc:
        await _kill_and_reap(proc)
        message = f"{command} {image}: no answer within {timeout:g} s (killed)"
        raise ImageError(message, image=image) from exc
    except BaseException:
        await _kill_and_reap(proc)
        raise
    stdout, stderr = (b.decode("utf-8", errors="replace") for b in (out, err))
    if proc.returncode != 0:
        message = f"{command} {image}: exit status {proc.returncode}: {stderr.strip()}"
        raise ImageError(message, image=image)
    return stdout, stderr


_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


async def _communicate_with_progress(
    proc: asyncio.subprocess.Process, progress: Callable[[float], None]
) -> tuple[bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.create_task(proc.stderr.read())
    out = bytearray()
    while chunk := await proc.stdout.read(4096):
        out += chunk
        # qemu-img redraws its progress with carriage returns: the last one is current.
        found = _PROGRESS.findall(chunk)
        if found:
            progress(float(found[-1]) / 100)
    await proc.wait()
    return bytes(out), await errors


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    # Shielded: if we are cancelled again meanwhile, the wait itself carries on and the
    # loop's child watcher still reaps the child, so no zombie is left either way.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(proc.wait()), _REAP_TIMEOUT)


class _BadJSONError(Exception):
    """qemu-img's JSON lacks something or has the wrong type; internal to parsing."""


def _unexpected_json(exc: _BadJSONError, image: str, stderr: str) -> ImageError:
    message = f"qemu-img info {image}: unexpected JSON: {exc}"
    if stderr.strip():
        message += f"; stderr: {stderr.strip()}"
    return ImageError(message, image=image)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise _BadJSONError(f"not JSON ({exc})") from exc


def _expect(value: Any, kind: type[_T], what: str = "document") -> _T:
    # bool is an int subclass; a flag where a size belongs is still wrong.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _BadJSONError(f"{what} is {type(value).__name__}, expected {kind.__name__}")
    return value


def _field(obj: dict[str, Any], key: str, kind: type[_T]) -> _T:
    if key not in obj:
        raise _BadJSONError(f"no {key!r} key")
    return _expect(obj[key], kind, repr(key))


def _parse_layer(value: Any) -> Layer:
    obj = _expect(value, dict, "layer")
    return Layer(
        filename=_field(obj, "filename", str),
        format=_field(obj, "format", str),
        virtual_size=_field(obj, "virtual-size", int),
        bitmaps=_parse_bitmaps(obj),
    )


def _parse_bitmaps(layer: dict[str, Any]) -> tuple[Bitmap, ...]:
    # Raw and other formats have no qcow2 data; a qcow2 layer without bitmaps has no key.
    specific = _expect(layer.get("format-specific", {}), dict, "'format-specific'")
    if specific.get("type") != "qcow2":
        return ()
    data = _field(specific, "data", dict)
    entries = _expect(data.get("bitmaps", []), list, "'bitmaps'")
    return tuple(_parse_bitmap(entry) for entry in entries)


def _parse_bitmap(value: Any) -> Bitmap:
    obj = _expect(value, dict, "bitmap")
    flags = _field(obj, "flags", list)
    return Bitmap(
        name=_field(obj, "name", str),
        flags=frozenset(_expect(flag, str, "flag") for flag in flags),
        granularity=_field(obj, "granularity", int),
    )
