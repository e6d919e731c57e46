"""Benchmark: what a disk with no bitmap costs and saves, beside a qcow2 disk.

Three domains, one disk each, the same size and the same random data: a qcow2 image, a
raw image file and a raw block device (a loop device). Each gets a full backup; then,
per round, the same 1% of each disk is rewritten in scattered 64 KiB writes and each is
backed up again (the qcow2 disk incrementally; the raw ones read whole, and only the
blocks that changed written, as a layer on the previous point). Prints, per disk: the
full's and the best later backup's time, the bytes a later backup wrote, what its image
holds on disk, and the ratios that matter: a raw disk's nightly time against the qcow2
incremental's (the cost of reading it whole) and a raw layer's size against a
standalone full copy's (what storing only the change saves). JSON at the end.

    .venv/bin/python -m bench.raw_disks [--size-gib 1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import libvirt

from bench.backup_vs_references import (
    GiB,
    MiB,
    agent_backup,
    agent_config,
    fill_random,
    quiesce,
    rewrite_one_percent,
)
from tests.testbed import daemon
from tests.testbed.domains import DiskSpec, TestDomain, make_domain

KINDS = {
    "qcow2": DiskSpec("vda"),
    "raw_file": DiskSpec("vda", format="raw"),
    "raw_block": DiskSpec("vda", kind="block"),
}


def _fill(kind: str, path: Path, size: int) -> None:
    if kind == "qcow2":
        fill_random(path, size)
        return
    with open(path, "r+b") as out:  # the raw file (the loop device's backing file)
        for _ in range(size // (64 * MiB)):
            out.write(os.urandom(64 * MiB))
        out.flush()
        os.fsync(out.fileno())


def _image(work: Path, domain: str, backup_id: str) -> Path:
    return work / "repo" / domain / "backups" / backup_id / "vda.qcow2"


def _latest(work: Path, domain: str) -> tuple[str, int]:
    backups = sorted((work / "repo" / domain / "backups").iterdir())
    manifest = json.loads((backups[-1] / "manifest.json").read_text())
    return manifest["backup_id"], manifest["disks"][0]["bytes_copied"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    size = int(args.size_gib * GiB) // (64 * MiB) * (64 * MiB)
    daemon.ensure_libvirtd()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(daemon.URI)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lba-bench-raw-") as tmp:
        work = Path(tmp)
        config = agent_config(work)
        registry: list[TestDomain] = []
        try:
            domains = {}
            for kind, spec in KINDS.items():
                print(
                    f"filling the {kind} disk ({size / GiB:g} GiB of random data) ...", flush=True
                )
                disk = DiskSpec("vda", size=size, format=spec.format, kind=spec.kind)
                (work / kind).mkdir()
                td = make_domain(
                    conn,
                    work / kind,
                    persistent=False,
                    disks=[disk],
                    start=False,
                    registry=registry,
                )
                td.destroy()  # (as backup_vs_references: re-created once the image is filled)
                _fill(kind, td.disk_paths["vda"], size)
                td.recreate()
                td.dom().suspend()  # (the OS-less guest's vCPU spins; see backup_vs_references)
                domains[kind] = td
            for kind, td in domains.items():
                quiesce()
                seconds, _, _ = agent_backup(config, td.name, "auto")
                backup_id, written = _latest(work, td.name)
                full = _image(work, td.name, backup_id).stat().st_blocks * 512
                results[kind] = {"full_s": seconds, "full_image_bytes": full, "later": []}
                print(
                    f"  {kind:9s} full  {seconds:7.3f} s, image {full / MiB:8.1f} MiB", flush=True
                )
            for round_no in range(args.rounds):
                for kind, td in domains.items():
                    td.dom().resume()
                    changed = rewrite_one_percent(td, size, seed=11 + round_no)
                    td.dom().suspend()
                    quiesce()
                    seconds, _, _ = agent_backup(config, td.name, "auto")
                    backup_id, written = _latest(work, td.name)
                    held = _image(work, td.name, backup_id).stat().st_blocks * 512
                    results[kind]["later"].append(
                        {"seconds": seconds, "bytes_written": written, "image_bytes": held}
                    )
                    results[kind]["changed_bytes"] = changed
                    print(
                        f"  round {round_no + 1}: {kind:9s} {seconds:7.3f} s, wrote "
                        f"{written / MiB:7.1f} MiB, image {held / MiB:7.1f} MiB",
                        flush=True,
                    )
        finally:
            for domain in registry:
                domain.cleanup()
            conn.close()
    report(results, size)


def report(results: dict[str, dict[str, Any]], size: int) -> None:
    summary: dict[str, Any] = {"disk_bytes": size}
    best_qcow2 = min(r["seconds"] for r in results["qcow2"]["later"])
    for kind, result in results.items():
        best = min(r["seconds"] for r in result["later"])
        layer = max(r["image_bytes"] for r in result["later"])
        summary[kind] = {
            "full_s": round(result["full_s"], 3),
            "later_best_s": round(best, 3),
            "later_vs_qcow2_incremental": round(best / best_qcow2, 2),
            "later_vs_own_full": round(best / result["full_s"], 3),
            "changed_bytes": result["changed_bytes"],
            "later_bytes_written_max": max(r["bytes_written"] for r in result["later"]),
            "later_image_bytes_max": layer,
            "full_image_bytes": result["full_image_bytes"],
            "layer_vs_full_image": round(layer / result["full_image_bytes"], 4),
        }
    print()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
