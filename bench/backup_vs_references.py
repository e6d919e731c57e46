"""Benchmark: the agent's backups against the best NBD copy tools, side by side.

One run, on this machine, on one 2 GiB qcow2 disk filled with random data in a real
domain:

1. the agent's full backup (``backup-agent backup``, its own process);
2. the same kind of backup export (pull mode) copied by the references:
   ``nbdcopy --connections=4`` into a qcow2 served by ``qemu-nbd --cache=none
   --aio=native -e 4``, and ``qemu-img convert -W -m 8 -n`` into a qcow2;
3. per round, 1% of the disk rewritten in scattered 64 KiB writes, then the agent's
   incremental.

Prints each throughput, the agent's ratio to the faster reference, the best
incremental's time as a fraction of the best full's, its phases, what the agent adds to
it (``incremental_overhead_ms``: the incremental's time less libvirt's ``backupBegin``
and the job's end, and less the copy of the changed bytes at the rate of the fastest
full's copy phase; of the fastest incremental), and the agent's peak RSS. Ratios
matter, not the absolute figures: the machines are shared. Rounds alternate the order.
With ``--json``, the figures also as one JSON object on stdout (the table on stderr).

    .venv/bin/python -m bench.backup_vs_references [--size-gib 2] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt

from tests.testbed import daemon
from tests.testbed.domains import DiskSpec, TestDomain, make_domain

GiB = 1 << 30
MiB = 1 << 20


def agent_config(work: Path) -> Path:
    """``agent.toml`` for the agent processes of a benchmark in ``work`` (JSON logs: the
    benchmark reads the job's phases from them)."""
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{work / "state"}"\n'
        f'[repository]\npath = "{work / "repo"}"\n'
        '[logging]\nlevel = "info"\nformat = "json"\n'
    )
    return config


def random_domain(
    conn: libvirt.virConnect, work: Path, size: int, registry: list[TestDomain]
) -> TestDomain:
    """A transient test domain whose qcow2 ``vda`` of ``size`` bytes is random data."""
    td = make_domain(
        conn,
        work,
        persistent=False,
        disks=[DiskSpec("vda", size=size)],
        start=False,
        registry=registry,
    )
    # Re-create with a random-filled image (make_domain created it empty).
    td.destroy()
    fill_random(td.disk_paths["vda"], size)
    td.recreate()
    return td


def sh(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def fill_random(path: Path, size: int) -> None:
    """A fully allocated qcow2 of random data (through a raw file: fast and simple)."""
    raw = path.with_suffix(".raw")
    with open(raw, "wb") as out:
        for _ in range(size // (64 * MiB)):
            out.write(os.urandom(64 * MiB))
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    raw.unlink()


# Runs `python -m agent ARGS...` and, as it exits, prints the agent process's own peak
# RSS (KiB): not its qemu-nbd's, nor any other program this benchmark ran (which the
# children's rusage would mix in).
_PEAK_RSS = """
import atexit, resource, runpy, sys
def peak():
    print("peak-rss-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
atexit.register(peak)
sys.argv[0] = "backup-agent"
runpy.run_module("agent", run_name="__main__", alter_sys=True)
"""


def agent_backup(config: Path, domain: str, mode: str) -> tuple[float, int, dict[str, float]]:
    """Run `backup-agent backup`; its time, the agent process's peak RSS (bytes) and the
    time of each phase of the job (from its ``backup phases`` log line)."""
    done = sh(
        sys.executable,
        "-c",
        _PEAK_RSS,
        "backup",
        domain,
        "--local",
        "--mode",
        mode,
        "--config",
        str(config),
    )
    out = done.stdout
    peak = None
    phases: dict[str, float] = {}
    seconds = None
    for line in done.stderr.splitlines():
        if line.startswith("peak-rss-kib "):
            peak = int(line.split()[1])
        elif '"backup phases"' in line:
            phases = json.loads(line)["seconds"]
        elif '"backup done"' in line:
            seconds = float(json.loads(line)["seconds"])  # to the millisecond
    match = re.search(r"; (\d+) bytes in ([\d.]+) s", out)
    assert match, out
    assert peak is not None, done.stderr[-2000:]
    return seconds or float(match.group(2)), peak * 1024, phases


def print_phases(phases: dict[str, float]) -> None:
    print("    agent phases: " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))


class PullExport:
    """A pull-mode backup export of the domain's vda, for the reference tools."""

    def __init__(self, td: TestDomain, workdir: Path) -> None:
        self.td = td
        self.socket = workdir / "ref.sock"
        self.scratch = workdir / "ref-scratch.qcow2"

    def __enter__(self) -> str:
        xml = (
            "<domainbackup mode='pull'>"
            f"<server transport='unix' socket='{self.socket}'/>"
            "<disks><disk name='vda' backup='yes' type='file'>"
            f"<scratch file='{self.scratch}'/><driver type='qcow2'/></disk></disks>"
            "</domainbackup>"
        )
        self.td.dom().backupBegin(xml, None, 0)
        return f"nbd+unix:///vda?socket={self.socket}"

    def __exit__(self, *_: object) -> None:
        self.td.dom().abortJob()
        time.sleep(0.5)


def nbdcopy(td: TestDomain, workdir: Path, size: int) -> float:
    target = workdir / "nbdcopy-target.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size))
    sock = workdir / "target.sock"
    server = subprocess.Popen(
        [
            "qemu-nbd",
            "--cache=none",
            "--aio=native",
            "-e",
            "4",
            "-f",
            "qcow2",
            f"--socket={sock}",
            str(target),
        ]
    )
    try:
        while not sock.exists():
            time.sleep(0.02)
        with PullExport(td, workdir) as source:
            started = time.monotonic()
            sh("nbdcopy", "--connections=4", source, f"nbd+unix:///?socket={sock}")
            return time.monotonic() - started
    finally:
        server.terminate()
        server.wait()
        target.unlink()


def qemu_img_convert(td: TestDomain, workdir: Path, size: int) -> float:
    target = workdir / "convert-target.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size))
    try:
        with PullExport(td, workdir) as source:
            started = time.monotonic()
            sh(
                "qemu-img",
                "convert",
                "-W",
                "-m",
                "8",
                "-n",
                "-f",
                "raw",
                "-O",
                "qcow2",
                source,
                str(target),
            )
            copied = time.monotonic() - started
            # qemu-img leaves its output in the page cache; the agent's is on disk.
            sh("sync", "-f", str(target))
            SYNCED["qemu-img"].append(time.monotonic() - started)
            return copied
    finally:
        target.unlink()


SYNCED: dict[str, list[float]] = {"qemu-img": []}


def quiesce() -> None:
    """Let the last contender's leftovers settle before the next one starts: the dirty
    page cache qemu-img leaves (2 GiB for the kernel to write back), and the discards a
    deleted 2 GiB target sends on a filesystem mounted with ``discard`` (they hold up
    the next journal commit, so every fsync the agent makes)."""
    os.sync()
    time.sleep(1.0)


def rewrite_one_percent(td: TestDomain, size: int, seed: int) -> int:
    chunk = 64 * 1024
    count = size // 100 // chunk
    offsets = random.Random(seed).sample(range(size // chunk), count)
    for offset in offsets:
        td.write_pattern("vda", offset * chunk, chunk, 0x5A)
    return count * chunk


def incremental_rounds(
    td: TestDomain, config: Path, size: int, rounds: int, running_guest: bool
) -> tuple[list[tuple[float, dict[str, float]]], int, int]:
    """Per round, 1 % rewritten then an incremental: (seconds, phases) of each, the
    bytes rewritten per round, and the agent's peak RSS."""
    incrementals: list[tuple[float, dict[str, float]]] = []
    changed = peak = 0
    for round_no in range(rounds):
        if not running_guest:
            td.dom().resume()
        changed = rewrite_one_percent(td, size, seed=7 + round_no)
        if not running_guest:
            td.dom().suspend()
        quiesce()
        seconds, rss, phases = agent_backup(config, td.name, "incremental")
        peak = max(peak, rss)
        incrementals.append((seconds, phases))
        print(
            f"  round {round_no + 1}: 1% rewritten in scattered 64 KiB writes, "
            f"incremental {seconds:6.3f} s",
            flush=True,
        )
        print_phases(phases)
    return incrementals, changed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--running-guest",
        action="store_true",
        help="keep the guest's vCPU running during the copies (the test guest has no OS "
        "and its vCPU spins: half a core taken from every contender)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args()
    if not args.json:
        run(args)
        return
    with contextlib.redirect_stdout(sys.stderr):  # the table; stdout: the JSON alone
        summary = run(args)
    print(json.dumps(summary))


def run(args: argparse.Namespace) -> dict[str, object]:
    size = int(args.size_gib * GiB) // MiB * MiB
    daemon.ensure_libvirtd()
    # Errors come back as exceptions; libvirt's default handler would also print the
    # expected ones (a transient domain looked up after it stopped).
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open(daemon.URI)
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="lba-bench-") as tmp:
        work = Path(tmp)
        config = agent_config(work)
        registry: list[TestDomain] = []
        try:
            print(f"filling a {size / GiB:g} GiB disk with random data ...", flush=True)
            td = random_domain(conn, work, size, registry)
            if not args.running_guest:
                # A backup of a paused domain is the same pull-mode export; what is paused
                # is only the OS-less guest's spinning vCPU, which real idle guests lack.
                td.dom().suspend()
            results: dict[str, list[float]] = {"agent": [], "nbdcopy": [], "qemu-img": []}
            peak = 0
            runs = [("agent", None), ("nbdcopy", nbdcopy), ("qemu-img", qemu_img_convert)]
            for round_no in range(args.rounds):
                order = runs if round_no % 2 == 0 else list(reversed(runs))
                for name, reference in order:
                    quiesce()
                    phases = None
                    if reference is None:
                        seconds, rss, phases = agent_backup(config, td.name, "full")
                        peak = max(peak, rss)
                    else:
                        seconds = reference(td, work, size)
                    results[name].append(seconds)
                    print(f"  round {round_no + 1}: {name:9s} {seconds:6.2f} s", flush=True)
                    if phases:
                        print_phases(phases)
                        results.setdefault("agent-copy", []).append(phases["copy"])
            # As many incrementals as fulls, each after its own 1 %: the best is compared
            # with the best full.
            incrementals, changed, rss = incremental_rounds(
                td, config, size, args.rounds, args.running_guest
            )
            peak = max(peak, rss)
        finally:
            for domain in registry:
                domain.cleanup()
            conn.close()
    return report(results, size, args.rounds, args.running_guest, changed, incrementals, peak)


def overhead(incremental: float, phases: dict[str, float], changed: int, full_rate: float) -> float:
    """What the agent adds to an incremental of ``changed`` bytes: its time less
    libvirt's begin and end and less the copy of those bytes at the full's rate
    (bytes per second)."""
    return incremental - phases.get("begin", 0.0) - phases.get("end", 0.0) - changed / full_rate


def report(
    results: dict[str, list[float]],
    size: int,
    rounds: int,
    running_guest: bool,
    changed: int,
    incrementals: list[tuple[float, dict[str, float]]],
    peak: int,
) -> dict[str, object]:
    """Print the table; the figures as one JSON-ready dict."""
    best = {name: min(times) for name, times in results.items() if name != "agent-copy"}
    rate = {name: size / seconds / MiB for name, seconds in best.items()}
    faster = max(("nbdcopy", "qemu-img"), key=lambda n: rate[n])
    print()
    guest = "running" if running_guest else "paused"
    print(f"disk: {size / GiB:g} GiB of random data; guest vCPU {guest}; best of {rounds} rounds")
    for name in ("agent", "nbdcopy", "qemu-img"):
        print(f"  {name:9s} {best[name]:6.2f} s  {rate[name]:8.1f} MiB/s")
    print(f"agent / {faster}: {rate['agent'] / rate[faster]:.2f} (aim >= 0.80)")
    incremental, phases = min(incrementals, key=lambda i: i[0])
    print(
        f"incremental ({changed / MiB:.0f} MiB changed), best of {len(incrementals)}: "
        f"{incremental:.3f} s = {incremental / best['agent']:.1%} of the full (aim < 5%)"
    )
    libvirt = phases.get("begin", 0.0) + phases.get("end", 0.0)
    print(
        f"  of which libvirt's backupBegin and the job's end: {libvirt:.3f} s "
        f"({libvirt / best['agent']:.1%} of the full); all rounds: "
        + ", ".join(f"{seconds:.3f}" for seconds, _ in incrementals)
        + " s"
    )
    # The rate of the fastest full's copy phase (its own begin, end and publish left out).
    full_rate = size / min(results["agent-copy"])
    added = [overhead(seconds, p, changed, full_rate) for seconds, p in incrementals]
    mine = overhead(incremental, phases, changed, full_rate)  # the best round's
    print(
        f"  what the agent adds (the incremental less libvirt's begin and end and the "
        f"copy at the full's copy rate): {mine * 1000:.0f} ms (aim <= 30 ms); all rounds: "
        + ", ".join(f"{a * 1000:.0f}" for a in added)
        + " ms"
    )
    print("  phases of the best: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in phases.items()))
    print(f"agent peak RSS: {peak / MiB:.0f} MiB (aim < 200 MiB)")
    synced = min(SYNCED["qemu-img"])
    print(
        f"qemu-img including a sync of its output: {synced:.2f} s "
        f"({size / synced / MiB:.1f} MiB/s); agent / that: "
        f"{rate['agent'] / (size / synced / MiB):.2f}"
    )
    return {
        "size_bytes": size,
        "full_s": round(best["agent"], 3),
        "nbdcopy_s": round(best["nbdcopy"], 3),
        "qemu_img_s": round(best["qemu-img"], 3),
        "qemu_img_synced_s": round(synced, 3),
        "incremental_s": round(incremental, 3),
        "incremental_changed_bytes": changed,
        "incremental_libvirt_ms": round(libvirt * 1000, 1),
        "incremental_overhead_ms": round(mine * 1000, 1),
        "incremental_phases_ms": {k: round(v * 1000, 1) for k, v in phases.items()},
        "peak_rss_mib": round(peak / MiB, 1),
    }


if __name__ == "__main__":
    main()
