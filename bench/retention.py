"""Benchmark: what a retention merge costs, against a full backup of the same disk.

One run, on one qcow2 disk (2 GiB by default) of random data in a real domain:

1. the agent's full backup (``backup-agent backup --local --mode full``): ``full_s``;
2. 1 % of the disk rewritten (scattered 64 KiB writes), an incremental, then the merge
   that ``keep_last = 1`` makes of the two (the incremental committed into the full,
   checked, linked in place): ``merge_1pct_s``;
3. 10 % rewritten (scattered 1 MiB writes), an incremental, its merge: ``merge_10pct_s``.

Each merge runs in a process of its own (``Repository.apply_retention``), whose peak
RSS is ``peak_rss_mib`` (the larger of the two; qemu-img's own not included). The aim:
a 1 % merge at most 15 % of the full. With ``--json``, one JSON object with exactly
those four keys.

    .venv/bin/python -m bench.retention [--size-gib 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
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
from tests.testbed import daemon
from tests.testbed.domains import TestDomain

# Runs in a process of its own: the merge keep_last = 1 makes, its seconds and the
# process's peak RSS (KiB) printed as JSON.
_MERGE = """
import asyncio, json, resource, sys, time
from pathlib import Path
from agent.repository.store import Repository
repo = Repository(Path(sys.argv[1]), state_dir=Path(sys.argv[2]))
started = time.monotonic()
dropped = asyncio.run(repo.apply_retention(sys.argv[3], 1))
seconds = time.monotonic() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "dropped": dropped, "peak_kib": peak}))
"""


def rewrite(td: TestDomain, size: int, fraction: float, chunk: int, seed: int) -> int:
    """``fraction`` of the disk rewritten in scattered writes of ``chunk`` bytes."""
    count = int(size * fraction) // chunk
    for offset in random.Random(seed).sample(range(size // chunk), count):
        td.write_pattern("vda", offset * chunk, chunk, 0x5A + seed % 16)
    return count * chunk


def merge(work: Path, domain: str) -> tuple[float, int]:
    done = sh(sys.executable, "-c", _MERGE, str(work / "repo"), str(work / "state"), domain)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["dropped"]) == 1, result
    return float(result["seconds"]), int(result["peak_kib"]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    size = int(args.size_gib * GiB) // (64 * MiB) * (64 * MiB)
    say = (lambda *_, **__: None) if args.json else print
    daemon.ensure_libvirtd()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(daemon.URI)
    results: dict[str, float] = {}
    peak = 0
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lba-bench-retention-") as tmp:
        work = Path(tmp)
        config = agent_config(work)
        registry: list[TestDomain] = []
        try:
            say(f"filling a {size / GiB:g} GiB disk with random data ...", flush=True)
            td = random_domain(conn, work, size, registry)
            td.dom().suspend()  # (the OS-less guest's vCPU spins; see backup_vs_references)
            quiesce()
            results["full_s"], _, _ = agent_backup(config, td.name, "full")
            say(f"  full backup     {results['full_s']:7.3f} s", flush=True)
            for key, fraction, chunk, seed in (
                ("merge_1pct_s", 0.01, 64 * 1024, 1),
                ("merge_10pct_s", 0.10, 1 * MiB, 2),
            ):
                td.dom().resume()
                changed = rewrite(td, size, fraction, chunk, seed)
                td.dom().suspend()
                quiesce()
                agent_backup(config, td.name, "incremental")
                quiesce()
                results[key], rss = merge(work, td.name)
                peak = max(peak, rss)
                say(
                    f"  merge of {changed / MiB:6.1f} MiB changed {results[key]:7.3f} s "
                    f"= {results[key] / results['full_s']:.1%} of the full",
                    flush=True,
                )
        finally:
            for domain in registry:
                domain.cleanup()
            conn.close()
    summary = {
        "merge_1pct_s": round(results["merge_1pct_s"], 3),
        "merge_10pct_s": round(results["merge_10pct_s"], 3),
        "full_s": round(results["full_s"], 3),
        "peak_rss_mib": round(peak / MiB, 1),
    }
    if args.json:
        print(json.dumps(summary))
        return
    ratio = summary["merge_1pct_s"] / summary["full_s"]
    print(f"1 % merge / full: {ratio:.1%} (aim <= 15 %); peak RSS {summary['peak_rss_mib']} MiB")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
