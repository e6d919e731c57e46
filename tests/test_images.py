"""Tests for agent.qemu.images, against the real qemu-img with real images in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.core.errors import ImageError
from agent.qemu import images
from agent.qemu.images import (
    Bitmap,
    bitmap_problem,
    list_bitmaps,
    read_chain,
    remove_bitmap,
    run_qemu_img,
)

QEMU_IMG = "/usr/bin/qemu-img"
QEMU_IO = "/usr/bin/qemu-io"


# --- helpers: build images with the real tools -------------------------------------------


def _qemu_img(*args: str | Path) -> str:
    done = subprocess.run(
        [QEMU_IMG, *map(str, args)], capture_output=True, text=True, check=False, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _qcow2(path: Path, *bitmaps: str, backing: Path | None = None, disabled: bool = False) -> Path:
    backing_args = [] if backing is None else ["-b", str(backing), "-F", "qcow2"]
    _qemu_img("create", "-q", "-f", "qcow2", *backing_args, path, "16M")
    for name in bitmaps:
        _qemu_img("bitmap", "--add", *(["--disable"] if disabled else []), path, name)
    return path


def _header_flags(image: Path) -> dict[str, list[str]]:
    info = json.loads(_qemu_img("info", "--output=json", "-U", image))
    return {b["name"]: b["flags"] for b in info["format-specific"]["data"].get("bitmaps", [])}


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextlib.contextmanager
def _open_read_write(image: Path) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-io holding ``image`` open read-write, as a running QEMU would, until SIGKILLed."""
    proc = subprocess.Popen(
        [QEMU_IO, "-f", "qcow2", str(image)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Loading persistent bitmaps read-write is what sets their in-use flag.
        _wait_for(lambda: any("in-use" in f for f in _header_flags(image).values()), "in-use")
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        assert proc.stdin is not None
        proc.stdin.close()


def _make_inconsistent(image: Path) -> None:
    # Killed without closing the image, QEMU never writes the bitmaps back: they stay in-use.
    with _open_read_write(image):
        pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists at all; an unreaped zombie counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _fake_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """Point the module at a shell script that records its pid, then runs ``body``."""
    pidfile = tmp_path / "fake.pid"
    script = tmp_path / "fake-qemu-img"
    script.write_text(f'#!/bin/sh\necho $$ > "{pidfile}"\n{body}\n')
    script.chmod(0o755)
    monkeypatch.setattr(images, "QEMU_IMG", str(script))
    return pidfile


# --- reading the chain ---------------------------------------------------------------------


async def test_read_chain_parses_every_layer_top_first(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "cp0", disabled=True)
    _qemu_img("bitmap", "--add", "-g", "131072", base, "cp1")
    top = _qcow2(tmp_path / "top.qcow2", "cp1", backing=base)

    chain = await read_chain(top)

    assert [(layer.filename, layer.format) for layer in chain] == [
        (str(top), "qcow2"),
        (str(base), "qcow2"),
    ]
    assert chain[0].virtual_size == 16 * 1024 * 1024
    assert chain[1].bitmaps == (
        Bitmap(name="cp0", flags=frozenset(), granularity=65536),
        Bitmap(name="cp1", flags=frozenset({"auto"}), granularity=131072),
    )
    assert chain[1].bitmap("cp1") == Bitmap("cp1", frozenset({"auto"}), 131072)
    assert chain[0].bitmap("cp0") is None
    assert chain[1].bitmap("cp0") is not None
    assert not chain[1].bitmaps[0].recording
    assert chain[1].bitmaps[1].recording


async def test_image_without_bitmaps_has_none_and_any_bitmap_is_missing(tmp_path: Path) -> None:
    chain = await read_chain(_qcow2(tmp_path / "a.qcow2"))
    assert len(chain) == 1
    assert chain[0].bitmaps == ()
    assert bitmap_problem(chain, "cp1") == (
        "bitmap-missing",
        f"bitmap 'cp1' not in {tmp_path / 'a.qcow2'} nor its backing files",
    )


async def test_raw_image_is_not_qcow2(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    _qemu_img("create", "-q", "-f", "raw", raw, "1M")
    chain = await read_chain(raw)
    assert chain[0].format == "raw"
    assert chain[0].bitmaps == ()
    reason, detail = bitmap_problem(chain, "cp1") or ("", "")
    assert reason == "image-not-qcow2"
    assert str(raw) in detail


async def test_nonexistent_image_raises_image_error_with_stderr(tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    with pytest.raises(ImageError) as info:
        await read_chain(missing)
    assert info.value.image == str(missing)
    assert str(missing) in str(info.value)
    assert "No such file or directory" in str(info.value)  # qemu-img's own stderr


async def test_unexpected_json_raises_image_error_with_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_qemu_img(tmp_path, monkeypatch, "echo '{\"not\": \"a chain\"}'; echo 'odd warning' >&2")
    with pytest.raises(ImageError) as info:
        await read_chain(tmp_path / "x.qcow2")
    assert "unexpected JSON" in str(info.value)
    assert "odd warning" in str(info.value)
    assert info.value.image == str(tmp_path / "x.qcow2")


# --- bitmap_problem on a single image ------------------------------------------------------


async def test_recording_bitmap_is_usable(tmp_path: Path) -> None:
    chain = await read_chain(_qcow2(tmp_path / "a.qcow2", "cp1"))
    assert bitmap_problem(chain, "cp1") is None


async def test_disabled_bitmap_is_reported(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2", "cp1", disabled=True)
    chain = await read_chain(image)
    reason, detail = bitmap_problem(chain, "cp1") or ("", "")
    assert reason == "bitmap-disabled"
    assert str(image) in detail


async def test_other_bitmaps_do_not_stand_in_for_the_missing_one(tmp_path: Path) -> None:
    chain = await read_chain(_qcow2(tmp_path / "a.qcow2", "cp1", "cp2"))
    assert bitmap_problem(chain, "cp3") is not None
    assert (bitmap_problem(chain, "cp3") or ("",))[0] == "bitmap-missing"
    assert bitmap_problem(chain, "cp2") is None


# --- bitmap_problem across a backing chain -------------------------------------------------


async def test_bitmap_in_every_layer_is_usable(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "cp1")
    top = _qcow2(tmp_path / "top.qcow2", "cp1", backing=base)
    assert bitmap_problem(await read_chain(top), "cp1") is None


async def test_bitmap_missing_from_the_overlay_is_a_gap_naming_it(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "cp1")
    top = _qcow2(tmp_path / "top.qcow2", backing=base)
    reason, detail = bitmap_problem(await read_chain(top), "cp1") or ("", "")
    assert reason == "bitmap-missing"
    assert f"missing from {top} " in detail


async def test_gap_in_a_middle_layer_is_missing_naming_that_layer(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "cp1")
    mid = _qcow2(tmp_path / "mid.qcow2", backing=base)
    top = _qcow2(tmp_path / "top.qcow2", "cp1", backing=mid)
    reason, detail = bitmap_problem(await read_chain(top), "cp1") or ("", "")
    assert reason == "bitmap-missing"
    assert f"missing from {mid} " in detail


async def test_bitmap_created_after_the_overlay_is_usable(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "cp0")
    top = _qcow2(tmp_path / "top.qcow2", "cp0", backing=base)
    _qemu_img("bitmap", "--add", top, "cp1")
    chain = await read_chain(top)
    assert bitmap_problem(chain, "cp1") is None
    assert bitmap_problem(chain, "cp0") is None


async def test_only_the_top_layer_must_be_recording(tmp_path: Path) -> None:
    # A backing file is read-only: its copy of the bitmap need not record any more.
    base = _qcow2(tmp_path / "base.qcow2", "cp1", disabled=True)
    top = _qcow2(tmp_path / "top.qcow2", "cp1", backing=base)
    assert bitmap_problem(await read_chain(top), "cp1") is None


# --- in-use bitmaps ------------------------------------------------------------------------


async def test_bitmap_left_in_use_by_a_killed_writer_is_inconsistent(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2", "cp1")
    _make_inconsistent(image)
    assert _header_flags(image) == {"cp1": ["in-use", "auto"]}

    chain = await read_chain(image)
    assert chain[0].bitmaps[0].in_use
    reason, detail = bitmap_problem(chain, "cp1") or ("", "")
    assert reason == "bitmap-inconsistent"
    assert str(image) in detail
    # The caller says a QEMU has it open: then in-use is expected and means nothing.
    assert bitmap_problem(chain, "cp1", image_open=True) is None


async def test_in_use_on_a_backing_layer_is_inconsistent(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "cp1")
    _make_inconsistent(base)
    top = _qcow2(tmp_path / "top.qcow2", "cp1", backing=base)
    reason, detail = bitmap_problem(await read_chain(top), "cp1") or ("", "")
    assert reason == "bitmap-inconsistent"
    assert str(base) in detail


async def test_image_held_open_is_readable_and_in_use_is_ignored_only_if_said(
    tmp_path: Path,
) -> None:
    image = _qcow2(tmp_path / "a.qcow2", "cp1")
    with _open_read_write(image):
        chain = await read_chain(image)  # -U: the writer's lock does not stop us
        assert bitmap_problem(chain, "cp1", image_open=True) is None
        assert (bitmap_problem(chain, "cp1") or ("",))[0] == "bitmap-inconsistent"


# --- list_bitmaps and remove_bitmap --------------------------------------------------------


async def test_list_bitmaps_reads_the_top_layer_only(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2", "cp0")
    top = _qcow2(tmp_path / "top.qcow2", "cp1", backing=base)
    assert [b.name for b in await list_bitmaps(top)] == ["cp1"]


async def test_remove_bitmap_removes_only_that_bitmap(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2", "cp1", "cp2")
    await remove_bitmap(image, "cp1")
    assert [b.name for b in await list_bitmaps(image)] == ["cp2"]


async def test_remove_bitmap_removes_an_inconsistent_bitmap(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2", "cp1")
    _make_inconsistent(image)
    await remove_bitmap(image, "cp1")
    assert await list_bitmaps(image) == ()


async def test_remove_missing_bitmap_raises_image_error(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2", "cp1")
    with pytest.raises(ImageError) as info:
        await remove_bitmap(image, "cp9")
    assert info.value.image == str(image)
    assert "'cp9' not found" in str(info.value)
    assert [b.name for b in await list_bitmaps(image)] == ["cp1"]


async def test_remove_bitmap_refuses_an_image_a_writer_holds(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2", "cp1")
    with _open_read_write(image):
        with pytest.raises(ImageError) as info:
            await remove_bitmap(image, "cp1")
        assert "lock" in str(info.value)
        assert [b.name for b in await list_bitmaps(image)] == ["cp1"]


# --- the runner: timeouts and cancellation leave nothing behind ----------------------------


async def test_run_qemu_img_returns_stdout(tmp_path: Path) -> None:
    image = _qcow2(tmp_path / "a.qcow2")
    out = await run_qemu_img(["info", "--output=json", str(image)], timeout=30, image=str(image))
    assert json.loads(out)["format"] == "qcow2"


async def test_timeout_kills_and_reaps_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = _fake_qemu_img(tmp_path, monkeypatch, "exec sleep 60")
    started = time.monotonic()
    with pytest.raises(ImageError) as info:
        await run_qemu_img(["info", "x.qcow2"], timeout=1.0, image="x.qcow2")
    assert time.monotonic() - started < 10
    assert "no answer within 1 s" in str(info.value)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert not _alive(int(pidfile.read_text()))


async def test_cancellation_kills_and_reaps_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pidfile = _fake_qemu_img(tmp_path, monkeypatch, "exec sleep 60")
    task = asyncio.create_task(run_qemu_img(["info", "x"], timeout=60, image="x"))
    for _ in range(500):  # until the child has started, at most 10 s
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.02)
    pid = int(pidfile.read_text())
    assert _alive(pid)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not _alive(pid)


async def test_missing_executable_is_an_image_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "QEMU_IMG", str(tmp_path / "no-such-qemu-img"))
    with pytest.raises(ImageError) as info:
        await read_chain(tmp_path / "a.qcow2")
    assert "cannot run" in str(info.value)


async def test_progress_is_streamed_while_qemu_img_runs(tmp_path: Path) -> None:
    source = tmp_path / "src.qcow2"
    await asyncio.to_thread(_make_filled, source)
    seen: list[float] = []
    await images.run_qemu_img(
        ["convert", "-p", "-f", "qcow2", "-O", "raw", str(source), str(tmp_path / "out.raw")],
        timeout=120,
        image=str(source),
        progress=seen.append,
    )
    assert len(seen) > 2 and seen == sorted(seen)
    assert 0 < seen[len(seen) // 2] < 1 and seen[-1] == 1.0


def _make_filled(source: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(source), "256M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 200M", str(source)],
        check=True,
        capture_output=True,
    )
