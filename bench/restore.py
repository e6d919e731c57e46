"""Benchmark: a restore against ``qemu-img convert -W -m 8`` of the same point.

One run, on one qcow2 disk (2 GiB by default) of random data in a real domain: a full
backup, 10 % of the disk rewritten (scattered 1 MiB writes), an incremental. Then the
point of the incremental (its image and the full's under it) is written out as a raw
and as a qcow2 image, each ``--rounds`` times (3 by default), alternately by

- ``backup-agent restore DOMAIN --backup ID --disk vda --format FMT --to FILE`` (the
  whole process: start-up, the copy, the check of the point's digest, the fsync), and
- ``qemu-img convert -W -m 8 -f qcow2 -O FMT IMAGE FILE`` (the reference; it neither
  checks nor syncs anything: what it wrote may still be only in the page cache), and
- the same followed by ``sync FILE`` (``qemu_img_sync_FMT_s``): the reference made as
  durable as the restore, which fsyncs before it reports success,

both on the same filesystem as the repository, each output deleted and the page cache
written back (``sync``) before the next; rounds alternate the order. Prints the
medians; with ``--json``, one JSON object: ``restore_raw_s``, ``qemu_img_raw_s``,
``restore_qcow2_s``, ``qemu_img_qcow2_s``, ``qemu_img_sync_raw_s``,
``qemu_img_sync_qcow2_s``. The aim: the restore no slower than the reference.

    .venv/bin/python -m bench.restore [--size-gib 2] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from bench.backup_vs_references import (
    GiB,
    MiB,
    agent_backup,
    agent_config,
    quiesce,
    random_domain,
    sh,
)
from bench.retention import rewrite
from tests.testbed import daemon
from tests.testbed.domains import TestDomain


def timed(*args: str) -> float:
    started = time.monotonic()
    sh(*args)
    return time.monotonic() - started


def point(work: Path, config: Path, domain: str) -> tuple[str, Path]:
    """The newest backup of ``domain``: its id and the image of its vda."""
    listed = json.loads(sh(*agent_cli("backups", domain, "--json", config=config)).stdout)
    entries = listed["backups"] if isinstance(listed, dict) else listed
    newest = entries[-1]  # (in time order)
    backup_id = str(newest["id"])
    images = sorted((work / "repo").glob(f"*/backups/{backup_id}/vda.qcow2"))
    assert len(images) == 1, images
    return backup_id, images[0]


def agent_cli(*args: str, config: Path) -> tuple[str, ...]:
    return (sys.executable, "-m", "agent", *args, "--config", str(config))


def race(
    config: Path,
    domain: str,
    newest: tuple[str, Path],
    out: Path,
    rounds: int,
    say: Callable[..., None],
) -> dict[str, list[float]]:
    """Each contender's seconds, round after round, each format in turn."""
    backup_id, image = newest
    times: dict[str, list[float]] = {}
    out.mkdir()
    for round_ in range(rounds):
        for fmt in ("raw", "qcow2"):
            contenders = ("restore", "qemu_img", "qemu_img_sync")
            for who in contenders if round_ % 2 == 0 else contenders[::-1]:
                target = out / f"{who}.{fmt}"
                quiesce()
                if who == "restore":
                    cmd = agent_cli(
                        *("restore", domain, "--backup", backup_id, "--disk", "vda"),
                        *("--format", fmt, "--to", str(target)),
                        config=config,
                    )
                else:
                    cmd = ("qemu-img", "convert", "-W", "-m", "8", "-f", "qcow2")
                    cmd += ("-O", fmt, str(image), str(target))
                seconds = timed(*cmd)
                if who == "qemu_img_sync":  # the same, but on disk when it ends
                    seconds += timed("sync", str(target))
                times.setdefault(f"{who}_{fmt}_s", []).append(seconds)
                say(f"  round {round_ + 1} {fmt:5} {who:13} {seconds:7.3f} s", flush=True)
                target.unlink()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    size = int(args.size_gib * GiB) // (64 * MiB) * (64 * MiB)
    say = (lambda *_, **__: None) if args.json else print
    daemon.ensure_libvirtd()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(daemon.URI)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lba-bench-restore-") as tmp:
        work = Path(tmp)
        config = agent_config(work)
        registry: list[TestDomain] = []
        try:
            say(f"filling a {size / GiB:g} GiB disk with random data ...", flush=True)
            td = random_domain(conn, work, size, registry)
            td.dom().suspend()  # (the OS-less guest's vCPU spins; see backup_vs_references)
            agent_backup(config, td.name, "full")
            td.dom().resume()
            rewrite(td, size, 0.10, 1 * MiB, 3)
            td.dom().suspend()
            agent_backup(config, td.name, "incremental")
            times = race(
                config, td.name, point(work, config, td.name), work / "out", args.rounds, say
            )
        finally:
            for domain in registry:
                domain.cleanup()
            conn.close()
    summary = {key: round(statistics.median(values), 3) for key, values in sorted(times.items())}
    if args.json:
        print(json.dumps(summary))
        return
    for fmt in ("raw", "qcow2"):
        mine, ref = summary[f"restore_{fmt}_s"], summary[f"qemu_img_{fmt}_s"]
        synced = summary[f"qemu_img_sync_{fmt}_s"]
        print(
            f"{fmt:5}: restore {mine:.3f} s, qemu-img {ref:.3f} s ({mine / ref:.2f}x), "
            f"qemu-img + sync {synced:.3f} s ({mine / synced:.2f}x)"
        )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
