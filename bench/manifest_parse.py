"""Benchmark: reading the manifest of a 100 GiB disk's full backup, this tree against a
git revision, interleaved in one run.

    .venv/bin/python -m bench.manifest_parse [--against REV] [--runs N] [--manifest-version V]

The manifest: a full backup of a fully allocated 100 GiB disk copied with the default
``request_size`` of 2 MiB gets one checksum range per request, 51,200 ranges (window
sums, manifest version 4), beside a second, empty disk; about 9 MB of JSON. Each side
reads the same file with its own code (``REV`` in a temporary git worktree, in a process
of its own), alternating, and the medians are printed with their ratio. Without
``--against`` only this tree is timed.

A revision from before window sums refuses version 4: with ``--against`` the file is
written as version 3 (the same shape; plain XXH3-128 ranges, as version 3 wrote them),
which this tree still reads, unless ``--manifest-version`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.repository.manifest import (
    MANIFEST_VERSION,
    DiskManifest,
    Manifest,
    RangeChecksum,
    digest_of,
)

REPO = Path(__file__).resolve().parent.parent

# Run in each side's own process, with that side's tree first on sys.path: prints the
# seconds one read of the manifest in directory argv[1] took, argv[2] times.
_TIMER = """
import sys, time
from pathlib import Path
try:
    from agent.repository.layout import _read_manifest
except ImportError:  # before agent/ was split into layers
    from agent.repository import _read_manifest
directory = Path(sys.argv[1])
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    _read_manifest(directory)
    print(time.perf_counter() - start)
"""


def _write_manifest(directory: Path, version: int = MANIFEST_VERSION) -> int:
    """The 100 GiB disk's manifest, written by this tree's code; its size in bytes. As
    ``version`` 3: the same document without version 4's fields, its ranges named plain
    XXH3-128 (digests of the same length: any 32 hex digits parse)."""
    size, step = 100 << 30, 2 << 20
    checksums = tuple(
        RangeChecksum(offset, step, digest_of(offset.to_bytes(8, "little"), offset))
        for offset in range(0, size, step)
    )
    manifest = Manifest(
        backup_id="20261125T183301Z-1a2b3c",
        domain="vm1",
        domain_uuid="6b0bb1c1-4a40-4d5e-9a8a-0e9e4d0f2c11",
        created_at=1.0,
        completed_at=2.0,
        parent=None,
        checkpoint="lba-20261125T183301Z-1a2b3c",
        checkpoint_xml="<domaincheckpoint/>" * 20,
        domain_xml="<domain/>" * 200,
        disks=(
            DiskManifest("vda", "vda.qcow2", "full", "first-backup", size, size, None, checksums),
            DiskManifest("vdb", "vdb.qcow2", "full", "first-backup", 2 << 30, 0, None, ()),
        ),
    )
    text = manifest.to_json()
    if version != MANIFEST_VERSION:
        assert version == 3, version
        data = json.loads(text)
        data["version"] = version
        for disk in data["disks"]:
            del disk["point_digest"]  # (version 4's)
            for checksum in disk["checksums"]:
                checksum["algorithm"] = "xxh3-128"
        text = json.dumps(data, indent=2) + "\n"  # (the writer's layout: version first)
    (directory / "manifest.json").write_text(text)
    return len(text)


def _times(tree: Path, directory: Path, runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-c", _TIMER, str(directory), str(runs)],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return [float(line) for line in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="a git revision to compare with")
    parser.add_argument("--runs", type=int, default=5, help="reads per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the sides")
    parser.add_argument(
        "--manifest-version",
        type=int,
        choices=[3, MANIFEST_VERSION],
        help=f"the file's version (default: 3 with --against, else {MANIFEST_VERSION})",
    )
    args = parser.parse_args()
    version = args.manifest_version or (3 if args.against else MANIFEST_VERSION)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "20261125T183301Z-1a2b3c"
        directory.mkdir()
        size = _write_manifest(directory, version)
        print(
            f"manifest (version {version}): 51,200 ranges of a 100 GiB disk, "
            f"{size / 1e6:.1f} MB of JSON"
        )
        sides = {"this tree": REPO}
        if args.against:
            other = Path(tmp) / "against"
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(REPO),
                    "worktree",
                    "add",
                    "-q",
                    "--detach",
                    str(other),
                    args.against,
                ],
                check=True,
                timeout=120,
            )
            sides[args.against] = other
        try:
            times: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, tree in sides.items():
                    times[name] += _times(tree, directory, args.runs)
        finally:
            if args.against:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(other)],
                    check=False,
                    timeout=120,
                )
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    for name, median in medians.items():
        print(f"{name:>12}: median {median * 1000:6.1f} ms over {len(times[name])} reads")
    if args.against:
        ratio = medians["this tree"] / medians[args.against]
        print(f"this tree / {args.against}: {ratio:.2f} (below 1: faster)")


if __name__ == "__main__":
    main()
