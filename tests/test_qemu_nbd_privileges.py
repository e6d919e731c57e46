"""qemu-nbd as the agent starts it: through setpriv, with no capabilities and no new
privileges, still writing the repository's root-only images; without setpriv only
when the configuration says so; a missing setpriv an error, never skipped.

A real ``qemu-nbd`` on a real qcow2 file (no libvirt needed); its privileges are read
from ``/proc/<pid>/status``, where the kernel reports them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.core.errors import ImageError
from agent.nbd.client import NbdClient
from agent.qemu.qemu_nbd import SETPRIV, serve_image, setpriv_problem

MiB = 1024 * 1024


def _image(tmp_path: Path) -> Path:
    directory = tmp_path / "repo"
    directory.mkdir(mode=0o700)
    image = directory / "vda.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M"], check=True, timeout=30
    )
    image.chmod(0o600)  # as the agent's umask makes it
    return image


def _status(socket: Path) -> dict[str, str]:
    pid = int(socket.with_name(socket.name + ".pid").read_text())
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


async def _round_trip(socket: Path) -> bytes:
    client = await NbdClient.connect(socket_path=socket)
    try:
        await client.write(1 * MiB, b"\x5a" * 65536, fua=True)
        return await client.read(1 * MiB, 65536)
    finally:
        await client.close()


async def test_qemu_nbd_runs_without_capabilities_and_still_writes_root_only_images(
    tmp_path: Path,
) -> None:
    assert os.geteuid() == 0, "the agent runs as root; so does this test"
    image = _image(tmp_path)
    socket = tmp_path / "repo" / "vda.sock"
    async with serve_image(image, socket, setpriv=SETPRIV):
        status = _status(socket)
        assert status["Uid"].split()[:2] == ["0", "0"]  # root, owner of the images
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
        assert status["NoNewPrivs"] == "1"
        assert await _round_trip(socket) == b"\x5a" * 65536


async def test_an_empty_setpriv_runs_qemu_nbd_with_roots_privileges(tmp_path: Path) -> None:
    image = _image(tmp_path)
    socket = tmp_path / "repo" / "vda.sock"
    async with serve_image(image, socket, setpriv=""):
        status = _status(socket)
        assert int(status["CapEff"], 16) != 0  # what the setting says it does
        assert status["NoNewPrivs"] == "0"
        assert await _round_trip(socket) == b"\x5a" * 65536


async def test_a_missing_setpriv_is_an_error_naming_the_setting(tmp_path: Path) -> None:
    image = _image(tmp_path)
    missing = str(tmp_path / "no-setpriv")
    problem = setpriv_problem(missing)
    assert problem is not None and 'set [agent] setpriv = ""' in problem
    with pytest.raises(ImageError, match=r"\[agent\] setpriv .*no-setpriv is not an executable"):
        async with serve_image(image, tmp_path / "repo" / "vda.sock", setpriv=missing):
            raise AssertionError("qemu-nbd started without the setpriv the configuration names")
    assert not (tmp_path / "repo" / "vda.sock").exists()
    assert setpriv_problem(SETPRIV) is None
    assert setpriv_problem("") is None


async def test_an_image_root_does_not_own_is_refused_naming_the_setting(tmp_path: Path) -> None:
    """Without capabilities root is an ordinary user before files it does not own: a
    repository an operator gave to another user is refused, and the error says why."""
    image = _image(tmp_path)
    os.chown(image.parent, 65534, 65534)  # a directory nobody owns, 0700
    with pytest.raises(ImageError, match=r"Permission denied .*\[agent\] setpriv"):
        async with serve_image(image, tmp_path / "vda.sock", setpriv=SETPRIV):
            raise AssertionError("qemu-nbd opened an image its capabilities do not reach")
    async with serve_image(image, tmp_path / "vda.sock", setpriv=""):  # the way out
        assert await _round_trip(tmp_path / "vda.sock") == b"\x5a" * 65536
