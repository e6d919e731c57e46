"""Micro-benchmark: read a whole export with agent.nbd.client, and with nbdcopy, and compare.

A qcow2 image of random data (1 GiB by default) is served by
``qemu-nbd -e 4 --cache=none --aio=native``; both readers then read all of it, several
rounds alternating, and the data is discarded:

* agent.nbd.client: ``connect_many(4)``, 2 MiB requests, 8 in flight per connection, each
  in-flight slot receiving into its own reusable buffer;
* ``nbdcopy --connections=4 nbd+unix:///?socket=S null:``.

One unmeasured warm-up pass comes first; the medians of the rounds are compared.

Run from the repository root: ``.venv/bin/python bench/nbd_read.py [--size-mib N]``.
The image lives in a directory on a real file system (O_DIRECT does not work on tmpfs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.nbd.client import NbdClient, connect_many

MiB = 1024 * 1024


def make_image(work: Path, size: int) -> Path:
    raw, image = work / "random.raw", work / "random.qcow2"
    with raw.open("wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image)], check=True
    )
    raw.unlink()
    return image


@contextlib.contextmanager
def qemu_nbd(image: Path, sock: Path) -> Iterator[None]:
    argv = ["qemu-nbd", "-f", "qcow2", "-e", "4", "--cache=none", "--aio=native", "-t"]
    proc = subprocess.Popen([*argv, f"--socket={sock}", str(image)])
    try:
        # Wait for the socket file rather than probing it (a probe makes qemu-nbd log).
        deadline = time.monotonic() + 15
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("qemu-nbd did not start")
            time.sleep(0.02)
        time.sleep(0.1)  # bind() creates the file just before listen()
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def read_all(sock: Path, *, connections: int, request: int, depth: int) -> int:
    """Read the whole export; returns the number of bytes read."""
    clients = await connect_many(connections, socket_path=sock, max_in_flight=depth)
    try:
        size = clients[0].info.size
        offsets = iter(range(0, size, request))

        async def worker(client: NbdClient) -> int:
            buf = memoryview(bytearray(request))
            done = 0
            for offset in offsets:  # shared iterator: the workers split the export
                n = min(request, size - offset)
                await client.read_into(offset, buf[:n])
                done += n
            return done

        counts = await asyncio.gather(*(worker(c) for c in clients for _ in range(depth)))
        return sum(counts)
    finally:
        for client in clients:
            await client.close()


def time_ours(sock: Path, size: int) -> float:
    started = time.perf_counter()
    got = asyncio.run(read_all(sock, connections=4, request=2 * MiB, depth=8))
    elapsed = time.perf_counter() - started
    assert got == size, (got, size)
    return elapsed


def time_nbdcopy(sock: Path) -> float:
    started = time.perf_counter()
    uri = f"nbd+unix:///?socket={sock}"
    subprocess.run(["nbdcopy", "--connections=4", uri, "null:"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="nbdbench", dir="/var/tmp"))
    try:
        image = make_image(work, size)
        sock = work / "s"
        ours: list[float] = []
        theirs: list[float] = []
        with qemu_nbd(image, sock):
            time_nbdcopy(sock)  # warm-up (the host's cache of the image), not measured
            for i in range(args.rounds):  # alternate who goes first
                if i % 2:
                    theirs.append(time_nbdcopy(sock))
                    ours.append(time_ours(sock, size))
                else:
                    ours.append(time_ours(sock, size))
                    theirs.append(time_nbdcopy(sock))
        a = size / MiB / statistics.median(ours)
        b = size / MiB / statistics.median(theirs)
        print(f"agent.nbd : {a:8.1f} MiB/s  (runs: {', '.join(f'{t:.2f}s' for t in ours)})")
        print(f"nbdcopy   : {b:8.1f} MiB/s  (runs: {', '.join(f'{t:.2f}s' for t in theirs)})")
        print(f"ratio     : {a / b:8.2f}  (agent.nbd / nbdcopy, medians)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
