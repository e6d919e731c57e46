"""Start-up: the command line's verbs as whole processes, and a real agent's readiness
with fifty domains and a thousand checkpoints in its ledger.

    .venv/bin/python -m bench.startup [--json] [--domains 50] [--backups 20] [--runs 7]
        [--starts 3] [--keep N]

**The state.** ``--domains`` tiny persistent domains (no guest OS: a 64 MiB qcow2 disk,
64 KiB written through QEMU, qboot firmware that halts the vCPU), named
``bstart-<run>-<n>``, get ``--backups`` backups each from a real agent process through
its HTTP API, ``max_concurrent_backups`` = 4, in rounds (one backup of every domain per
round): the first a full, every later one an incremental after 64 KiB more were
written into the disk. So the checkpoints are not made up: each was created by libvirt
in its backup's own ``virDomainBackupBegin`` transaction, recorded by the agent's
ledger code and marked backed up when its backup was published. The repository holds
every backup (``[retention] keep_last`` = 0, the default) and the job store every job,
and the start-up reads both (each domain's backups for the metrics, the ended jobs for
the failure gauges). Of the ways to get there (backups one by one, a burst through the
agent, checkpoints made with libvirt directly and recorded with the ledger's code),
the burst is the only one whose result is exactly what the agent produces, repository
and job store included; and it is fast enough: a round of fifty tiny backups takes
12-15 s here (libvirt's ``backupBegin`` is most of each), the thousand 4-5 minutes
(printed). ``[checkpoints] keep`` is ``--keep``, by default ``--backups``: every
checkpoint stays in libvirt (twenty bitmaps per disk in QEMU), so the start-up's
resynchronisation finds all 1,000 in libvirt and in the ledger and compares each;
``--keep 1``, the agent's default, leaves one per domain in libvirt and the other 950 in
the ledger as pruned history. Before the starts the bench checks, with the agent's own
ledger code and libvirt's listing, that ledger and libvirt agree (the same live
checkpoints with the same parents, each backed up, the right count in each, every
backup in the repository), and again after the starts: no start-up changed anything.

**What is measured** (each phase, the fill included, starts once no other ``python -m
bench.*`` process runs, waiting at most ``--quiet-wait`` seconds; whether the machine
was quiet, also during each start, is reported):

1. ``--starts`` starts of ``backup-agent run`` (``sys.executable -m agent run``) on that
   state, each timed from just before the process is spawned until ``GET /readyz``
   answers 200 (polled every 10 ms): the median (``ready_s``) and the worst
   (``ready_max_s``). Also, from the agent's log (JSON lines, timestamped), when it said
   ``agent starting`` (interpreter and imports done), ``API listening``, ``connected``,
   ``resynchronised`` (every domain of the host listed and described: the agent sees
   other people's domains too, counted), the first and last ``reconciled`` (one per
   domain) and ``taking jobs`` (logged with ``READY=1``, after ``/readyz`` already
   answers 200: the repository is read in between); the spans between them, medians of
   the starts (``breakdown_s``); and the CPU the agent (its main thread apart),
   libvirtd and every other command used until ready. Between starts the agent gets
   SIGTERM and is waited for (at most 60 s).
2. Against the last agent started, still running: ``backup-agent --help``,
   ``backup-agent jobs`` and ``backup-agent status`` (``sys.executable -m agent ...
   --config CFG``) as whole processes, timed with ``time.monotonic`` around
   ``subprocess.run``, the median of ``--runs`` after one untimed run each; beside them
   ``python -c pass`` (the interpreter alone) and the time the agent takes to answer
   the requests ``jobs`` and ``status`` make, asked from this process.

The aims: each verb at most 0.150 s, readiness at most 2 s. A table on stdout; with
``--json`` exactly one JSON object on stdout instead (progress always on stderr).

Everything it made is removed at the end, also after a failure, Ctrl-C or SIGTERM: the
agent it started stopped by its own pid (SIGTERM, then SIGKILL), each domain destroyed
and undefined by its own UUID (name checked, prefix ``bstart-``), its files and QEMU
log removed; then ``virsh list --all`` is checked for any ``bstart-`` domain left (exit
status 1 if there is one, or a clean-up failed).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.client import HTTPConnection
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt

from agent.chain import libvirt_calls
from agent.chain.ledger import Ledger
from agent.chain.rules import LIVE_STATES
from bench import scale
from bench.scale import ScaleDomain
from tests.testbed.agent_process import REPO, AgentProcess, agent_process, http

KiB = 1024
PREFIX = "bstart-"
POLL = 0.01  # seconds between /readyz probes
AIM_CLI = 0.150
AIM_READY = 2.0
# A minimal firmware: it finds nothing to boot and halts the vCPU (no CPU spent).
QBOOT = Path("/usr/share/qemu/qboot.rom")
# The agent's own log lines whose first time (after the spawn) each start reports.
MILESTONES = (
    "agent starting",
    "API listening",
    "connected",
    "resynchronised",
    "taking jobs",
)


def say(message: str) -> None:
    print(f"[startup] {message}", file=sys.stderr, flush=True)


# -- domains -------------------------------------------------------------------------------


class StartDomain(ScaleDomain):
    """A test bed domain named ``bstart-*`` (see :class:`bench.scale.ScaleDomain`)."""

    name_prefix = PREFIX


def make_domain(
    conn: libvirt.virConnect, work: Path, name: str, registry: list[StartDomain]
) -> StartDomain:
    """Define and start a domain with one 64 MiB qcow2 disk (qboot where QEMU has it)."""
    firmware = QBOOT if QBOOT.exists() else None
    return scale.make_domain(conn, work, name, registry, firmware, kind=StartDomain)


def _pool_map(fn: Callable[[StartDomain], None], made: list[StartDomain], workers: int) -> None:
    """``fn`` on every domain, ``workers`` at a time; every call has returned before
    this does (none runs on after a clean-up started), the first failure raised."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        for future in [pool.submit(fn, td) for td in made]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def create_domains(
    conn: libvirt.virConnect, work: Path, count: int, made: list[StartDomain]
) -> None:
    run = secrets.token_hex(3)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="create")
    try:
        names = [f"{PREFIX}{run}-{i:02d}" for i in range(count)]
        for future in [pool.submit(make_domain, conn, work, n, made) for n in names]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    made.sort(key=lambda td: td.name)


def write_round(made: list[StartDomain], round_no: int, kib: int) -> None:
    """``kib`` KiB written through QEMU into each domain's disk, at a new place each
    round (so each incremental has something of its own to copy)."""

    def one(td: StartDomain) -> None:
        td.write_pattern("vda", round_no * kib * KiB, kib * KiB, 0x20 + round_no % 0xC0)

    _pool_map(one, made, 8)


def leftover_domains() -> list[str]:
    """Every domain libvirt has whose name starts ``bstart-`` (``virsh list --all``)."""
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [n for n in out.stdout.split() if n.startswith(PREFIX)]


# -- a quiet machine -----------------------------------------------------------------------


def other_benchmarks() -> list[str]:
    """Other ``python -m bench.*`` processes running now (``pgrep -af``), not this one."""
    out = subprocess.run(
        ["pgrep", "-af", r"python -m bench\."], capture_output=True, text=True, check=False
    )
    mine = _ancestors()
    found = []
    for line in out.stdout.splitlines():
        pid, _, cmd = line.partition(" ")
        if pid.isdigit() and int(pid) not in mine:
            found.append(f"{pid} {cmd}")
    return found


def _ancestors() -> set[int]:
    """This process and every process above it (a shell whose command line names this
    bench is not another benchmark)."""
    found = set()
    pid = os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
    return found


def wait_quiet(phase: str, limit: float) -> dict[str, Any]:
    """Wait (at most ``limit`` seconds) until no other benchmark runs; what was seen."""
    began = time.monotonic()
    seen: list[str] = []
    while True:
        others = other_benchmarks()
        if not others:
            waited = time.monotonic() - began
            if seen:
                say(f"{phase}: quiet after waiting {waited:.0f} s")
            return {"phase": phase, "quiet": True, "waited_s": round(waited, 1), "seen": seen}
        if not seen:
            say(f"{phase}: waiting (at most {limit:g} s) for other benchmarks: {others}")
        seen = sorted(set(seen) | set(others))
        if time.monotonic() - began > limit:
            say(f"{phase}: NOT QUIET after {limit:g} s, measuring anyway: {others}")
            return {"phase": phase, "quiet": False, "waited_s": round(limit, 1), "seen": seen}
        time.sleep(2)


# -- filling the state ---------------------------------------------------------------------


class Api:
    """The agent's API, token read once."""

    def __init__(self, agent: AgentProcess) -> None:
        self.url = agent.url
        self.token = agent.token

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
        return http(method, self.url + path, body, token=self.token, timeout=60)


def fill(
    agent: AgentProcess, made: list[StartDomain], backups: int, write_kib: int, timeout: float
) -> dict[str, Any]:
    """``backups`` rounds of one backup per domain through the API; each round waits for
    all to succeed and checks the modes: full first, incremental after."""
    api = Api(agent)
    began = time.monotonic()
    copy_s: list[float] = []
    for r in range(backups):
        if r:
            write_round(made, r, write_kib)
        started = time.monotonic()
        ids = {f"{td.name}.b{r:02d}": td.name for td in made}
        for job_id, name in ids.items():
            status, reply = api.call(
                "POST", "/v1/jobs", {"id": job_id, "kind": "backup", "domain": name}
            )
            if status not in (200, 201, 202):
                raise SystemExit(f"POST /v1/jobs for {name}: {status} {reply}")
        jobs = _wait_round(agent, api, set(ids), timeout)
        want = "full" if r == 0 else "incremental"
        for job in jobs:
            modes = {d["mode"] for d in job["disks"]}
            if modes != {want}:
                raise SystemExit(f"backup {job['id']} was {sorted(modes)}, not {want}: {job}")
        copy_s.append(time.monotonic() - started)
        say(
            f"  round {r + 1}/{backups}: {len(ids)} {want} backups in {copy_s[-1]:.1f} s "
            f"({time.monotonic() - began:.0f} s so far)"
        )
    total = time.monotonic() - began
    return {
        "fill_s": round(total, 1),
        "fill_backups": backups * len(made),
        "fill_round_s_median": round(statistics.median(copy_s), 2),
    }


def _wait_round(
    agent: AgentProcess, api: Api, ids: set[str], timeout: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    limit = min(1000, max(100, 2 * len(ids)))
    while True:
        status, data = api.call("GET", f"/v1/jobs?limit={limit}")
        if status != 200:
            raise SystemExit(f"GET /v1/jobs answered {status}: {data}")
        mine = [j for j in data["jobs"] if j["id"] in ids]
        bad = [j for j in mine if j["state"] in ("failed", "cancelled")]
        if bad:
            raise SystemExit(
                f"{len(bad)} backup(s) did not succeed, e.g. {bad[0]['id']}: {bad[0]['state']} "
                f"{bad[0].get('error')}\n--- agent log ---\n{agent.tail()}"
            )
        if len(mine) == len(ids) and all(j["state"] == "succeeded" for j in mine):
            return mine
        if time.monotonic() > deadline:
            done = sum(j["state"] == "succeeded" for j in mine)
            raise SystemExit(
                f"only {done} of {len(ids)} backups succeeded within {timeout:g} s\n"
                f"--- agent log ---\n{agent.tail()}"
            )
        time.sleep(0.2)


# -- the state checked ---------------------------------------------------------------------


def check_state(
    conn: libvirt.virConnect,
    made: list[StartDomain],
    state_dir: Path,
    repo: Path,
    backups: int,
    keep: int,
) -> dict[str, int]:
    """Ledger (read with the agent's own code) and libvirt agree, for every domain: the
    same live checkpoints, the same parents, ``min(keep, backups)`` of them, every one of
    the ``backups`` recorded backed up; and the repository holds ``backups`` backups."""
    ledgers = asyncio.run(_read_ledger(state_dir / "ledger.sqlite", [td.name for td in made]))
    live_want = min(keep, backups)
    totals = {"ledger": 0, "ledger_live": 0, "libvirt": 0, "backups": 0}
    problems: list[str] = []
    for td in made:
        dom = conn.lookupByUUIDString(td.uuid)
        if dom.name() != td.name:
            raise SystemExit(f"{td.uuid} names {dom.name()!r}, not {td.name!r}")
        in_libvirt = libvirt_calls.parents(conn, td.uuid)
        records = ledgers[td.name]
        live = {r.name: r.parent for r in records if r.state in LIVE_STATES}
        manifests = len(list((repo / td.name / "backups").glob("*/manifest.json")))
        totals["ledger"] += len(records)
        totals["ledger_live"] += len(live)
        totals["libvirt"] += len(in_libvirt)
        totals["backups"] += manifests
        if len(records) != backups or any(r.backed_up_at is None for r in records):
            problems.append(f"{td.name}: {len(records)} ledger records, not {backups} backed up")
        if live != in_libvirt:
            problems.append(f"{td.name}: ledger's live {live} != libvirt's {in_libvirt}")
        if len(in_libvirt) != live_want:
            problems.append(f"{td.name}: {len(in_libvirt)} checkpoints in libvirt, not {live_want}")
        if manifests != backups:
            problems.append(f"{td.name}: {manifests} backups in the repository, not {backups}")
    if problems:
        raise SystemExit("the state is not what the agent makes:\n  " + "\n  ".join(problems[:10]))
    return totals


async def _read_ledger(path: Path, names: list[str]) -> dict[str, list[Any]]:
    ledger = await Ledger.open(path)
    try:
        return {name: await ledger.checkpoints(name) for name in names}
    finally:
        await ledger.close()


# -- readiness -----------------------------------------------------------------------------


def _probe(port: int, path: str) -> int | None:
    """The status of one GET on the agent's loopback port; None if nothing answers."""
    conn = HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def _stop(agent: AgentProcess, timeout: float = 60) -> float:
    """SIGTERM to the agent we started (its own pid) and wait, bounded; SIGKILL after."""
    proc = agent.proc
    if proc is None or proc.poll() is not None:
        return 0.0
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        say(f"the agent (pid {proc.pid}) did not stop within {timeout:g} s: SIGKILL")
        proc.kill()
        proc.wait(timeout=30)
    return time.monotonic() - began


def _proc_cpu(path: str) -> float:
    """utime + stime (seconds) from a ``/proc/.../stat`` file; 0 if it is gone."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu() -> tuple[float, float]:
    """The host's busy and total CPU seconds so far (all CPUs)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / tick, sum(ticks) / tick


def cpu_by_command() -> dict[tuple[int, int], tuple[str, float]]:
    """Every process (pid and start time) with its command name (kernel workers as one)
    and CPU seconds so far, from ``/proc/*/stat``."""
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[tuple[int, int], tuple[str, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if comm.startswith("kworker"):
            comm = "kworker"
        cpu = (int(fields[11]) + int(fields[12])) / tick
        found[(int(stat.parent.name), int(fields[19]))] = (comm, cpu)
    return found


def cpu_spent(
    before: dict[tuple[int, int], tuple[str, float]], names: dict[int, str], top: int = 7
) -> dict[str, float]:
    """CPU seconds each command name (or ``names[pid]``) used since ``before``
    (processes born since count whole), the ``top`` largest."""
    spent: dict[str, float] = {}
    for key, (comm, now) in cpu_by_command().items():
        name = names.get(key[0], comm)
        was = before.get(key)
        used = now - (was[1] if was is not None else 0.0)
        if used > 0:
            spent[name] = spent.get(name, 0.0) + used
    ranked = sorted(spent.items(), key=lambda kv: -kv[1])[:top]
    return {comm: round(used, 2) for comm, used in ranked}


def _libvirtd_pid() -> int | None:
    out = subprocess.run(["pgrep", "-xo", "libvirtd"], capture_output=True, text=True, check=False)
    return int(out.stdout.split()[0]) if out.stdout.split() else None


def one_start(agent: AgentProcess, port: int, timeout: float) -> dict[str, Any]:
    """Start the agent; seconds until ``/readyz`` answers 200, and its log's milestones;
    the CPU the agent, libvirtd and everything else used meanwhile."""
    offset = agent.log.stat().st_size if agent.log.exists() else 0
    libvirtd = _libvirtd_pid()
    libvirtd0 = _proc_cpu(f"/proc/{libvirtd}/stat") if libvirtd else 0.0
    busy0, total0 = host_cpu()
    everyone = cpu_by_command()
    wall0 = time.time()
    t0 = time.monotonic()
    agent.start(ready=False)
    assert agent.proc is not None
    answered: float | None = None
    while True:
        if agent.proc.poll() is not None:
            raise SystemExit(f"the agent exited ({agent.proc.returncode}):\n{agent.tail()}")
        status = _probe(port, "/readyz")
        now = time.monotonic() - t0
        if status is not None and answered is None:
            answered = now
        if status == 200:
            ready = now
            pid = agent.proc.pid
            agent_cpu = _proc_cpu(f"/proc/{pid}/stat")
            main_cpu = _proc_cpu(f"/proc/{pid}/task/{pid}/stat")
            libvirtd_cpu = (_proc_cpu(f"/proc/{libvirtd}/stat") if libvirtd else 0.0) - libvirtd0
            busy, total = host_cpu()
            by_command = cpu_spent(everyone, {pid: "the agent", os.getpid(): "this bench"})
            break
        if now > timeout:
            raise SystemExit(f"not ready within {timeout:g} s:\n{agent.tail()}")
        time.sleep(POLL)
    # READY=1 (and its log line) comes after /readyz: the agent reads each domain's
    # backups from the repository first. Wait for it, bounded.
    while time.monotonic() - t0 < timeout and '"taking jobs"' not in _since(agent.log, offset):
        if agent.proc.poll() is not None:
            raise SystemExit(f"the agent exited ({agent.proc.returncode}):\n{agent.tail()}")
        time.sleep(0.05)
    result: dict[str, Any] = {
        "pid": agent.proc.pid,
        "ready_s": round(ready, 3),
        "api_answered_s": round(answered if answered is not None else ready, 3),
        "cpu_until_ready": {
            "host_busy_pct": round(100 * (busy - busy0) / max(total - total0, 1e-9), 1),
            "agent_s": round(agent_cpu, 2),
            "agent_main_thread_s": round(main_cpu, 2),
            "libvirtd_s": round(libvirtd_cpu, 2),
            "rest_s": round(busy - busy0 - agent_cpu - libvirtd_cpu, 2),
            "by_command_s": by_command,
        },
    }
    result.update(_milestones(_since(agent.log, offset), wall0))
    return result


def _since(log: Path, offset: int) -> str:
    with open(log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _milestones(text: str, wall0: float) -> dict[str, Any]:
    """Seconds after the spawn of each milestone log line, and of the reconciles; how
    many domains the agent found in libvirt (all of the host's, not only ours)."""
    found: dict[str, float] = {}
    seen_domains = None
    reconciled: list[float] = []
    redefined = 0
    warnings: list[str] = []
    for raw in text.splitlines():
        try:
            entry = json.loads(raw)
            at = datetime.fromisoformat(entry["timestamp"]).timestamp() - wall0
        except (ValueError, KeyError, TypeError):
            continue
        event = entry.get("event")
        if event in MILESTONES and event not in found:
            found[event] = at
            if event == "resynchronised":
                seen_domains = entry.get("domains")
        if event == "reconciled":
            reconciled.append(at)
            redefined += len(entry.get("redefined") or ())
        if entry.get("level") in ("warning", "error"):
            warnings.append(raw[:300])
    out: dict[str, Any] = {
        f"log_{k.replace(' ', '_').lower()}_s": round(v, 3) for k, v in found.items()
    }
    out["libvirt_domains"] = seen_domains
    out["reconciled"] = len(reconciled)
    out["redefined"] = redefined
    if reconciled:
        out["log_first_reconciled_s"] = round(min(reconciled), 3)
        out["log_last_reconciled_s"] = round(max(reconciled), 3)
    out["warnings"] = warnings[:10]
    return out


# -- the command line ----------------------------------------------------------------------


def time_cli(name: str, argv: list[str], runs: int, *, module: bool = True) -> dict[str, Any]:
    """``python -m agent ARGV`` (or ``python ARGV``) as a whole process: one untimed run,
    then the median of ``runs``."""
    cmd = [sys.executable, *(["-m", "agent"] if module else []), *argv]
    times = []
    for i in range(runs + 1):
        began = time.monotonic()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, check=False)
        took = time.monotonic() - began
        if done.returncode != 0:
            raise SystemExit(
                f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode()[-2000:]}"
            )
        if i:
            times.append(took)
    say(f"  {name}: median {statistics.median(times) * 1000:.0f} ms of {runs}")
    return {
        "median_s": round(statistics.median(times), 4),
        "min_s": round(min(times), 4),
        "max_s": round(max(times), 4),
        "runs": runs,
        "command": " ".join(["python", *cmd[1:]]),
    }


def time_api(api: Api, paths: list[str], runs: int) -> float:
    """The median time of the requests a verb makes (``paths``, one after the other),
    made from this process: the agent's share of the verb's time."""
    times = []
    for i in range(runs + 1):
        began = time.monotonic()
        for path in paths:
            status, reply = api.call("GET", path)
            if status != 200:
                raise SystemExit(f"GET {path} answered {status}: {reply}")
        if i:
            times.append(time.monotonic() - began)
    return round(statistics.median(times), 4)


# -- the run -------------------------------------------------------------------------------


def run(
    args: argparse.Namespace, conn: libvirt.virConnect, work: Path, made: list[StartDomain]
) -> dict[str, Any]:
    quiet = [wait_quiet("domains and fill", args.quiet_wait)]
    say(f"creating {args.domains} domains ...")
    began = time.monotonic()
    create_domains(conn, work, args.domains, made)
    write_round(made, 0, args.write_kib)
    create_s = time.monotonic() - began
    say(f"  {create_s:.1f} s; {made[0].name} .. {made[-1].name}")
    settings = {
        "jobs": {
            "max_concurrent_backups": args.concurrent,
            "max_concurrent_jobs": args.concurrent,
            "shutdown_grace": 5.0,
        },
        "checkpoints": {"keep": args.keep},
    }
    result: dict[str, Any] = {
        "domains": len(made),
        "backups_per_domain": args.backups,
        "keep": args.keep,
        "create_s": round(create_s, 1),
    }
    with agent_process(work, settings) as agent, _shielded():
        port = int(agent.url.rsplit(":", 1)[1])
        say(f"agent log: {agent.log}; config {agent.config}")
        agent.start()
        say(f"filling: {args.backups} backups of each domain, {args.concurrent} at once ...")
        result.update(fill(agent, made, args.backups, args.write_kib, args.timeout))
        _stop(agent)
        totals = check_state(conn, made, work / "state", work / "repo", args.backups, args.keep)
        say(
            f"  state checked: {totals['ledger']} checkpoints in the ledger "
            f"({totals['ledger_live']} live), {totals['libvirt']} in libvirt, "
            f"{totals['backups']} backups in the repository"
        )
        result.update(
            checkpoints=totals["ledger"],
            checkpoints_live=totals["ledger_live"],
            checkpoints_libvirt=totals["libvirt"],
            repository_backups=totals["backups"],
            jobs_in_store=args.backups * len(made),
        )
        quiet.append(wait_quiet("readiness", args.quiet_wait))
        starts: list[dict[str, Any]] = []
        for i in range(args.starts):
            if i:
                stopped = _stop(agent)
                starts[-1]["stop_s"] = round(stopped, 2)
            one = one_start(agent, port, args.timeout)
            one["others_after"] = other_benchmarks()
            starts.append(one)
            say(
                f"  start {i + 1}/{args.starts}: ready in {one['ready_s']:.3f} s "
                f"(taking jobs logged at {one.get('log_taking_jobs_s', float('nan')):.3f} s)"
            )
        time.sleep(args.settle)  # the start-up's background work done
        quiet.append(wait_quiet("command line", args.quiet_wait))
        cfg = ["--config", str(agent.config)]
        busy0, total0 = host_cpu()
        cli = {
            "help": time_cli("backup-agent --help", ["--help"], args.runs),
            "jobs": time_cli("backup-agent jobs", ["jobs", *cfg], args.runs),
            "status": time_cli("backup-agent status", ["status", *cfg], args.runs),
            "python": time_cli("python -c pass", ["-c", "pass"], args.runs, module=False),
        }
        busy, total = host_cpu()
        cli_busy = round(100 * (busy - busy0) / max(total - total0, 1e-9), 1)
        api = Api(agent)
        cli["jobs"]["api_s"] = time_api(api, ["/v1/jobs"], args.runs)
        cli["status"]["api_s"] = time_api(api, ["/v1/domains", "/v1/jobs?state=running"], args.runs)
        quiet[-1]["others_after"] = other_benchmarks()
        starts[-1]["stop_s"] = round(_stop(agent), 2)
        after = check_state(conn, made, work / "state", work / "repo", args.backups, args.keep)
        if after != totals:
            raise SystemExit(f"the starts changed the state: {totals} -> {after}")
    ready = [s["ready_s"] for s in starts]
    result.update(
        help_s=cli["help"]["median_s"],
        jobs_s=cli["jobs"]["median_s"],
        status_s=cli["status"]["median_s"],
        ready_s=round(statistics.median(ready), 3),
        ready_max_s=round(max(ready), 3),
        ready_min_s=round(min(ready), 3),
        taking_jobs_s=_median(starts, "log_taking_jobs_s"),
        breakdown_s=breakdown(starts),
        aims={"cli_s": AIM_CLI, "ready_s": AIM_READY},
        aims_met={
            "help": cli["help"]["median_s"] <= AIM_CLI,
            "jobs": cli["jobs"]["median_s"] <= AIM_CLI,
            "status": cli["status"]["median_s"] <= AIM_CLI,
            "ready": statistics.median(ready) <= AIM_READY,
            "ready_max": max(ready) <= AIM_READY,
        },
        cli=cli,
        cli_host_busy_pct=cli_busy,
        starts=starts,
        quiet=all(q["quiet"] for q in quiet)
        and not any(s["others_after"] for s in starts)
        and not quiet[-1]["others_after"],
        quiet_phases=quiet,
        python=sys.version.split()[0],
        cpus=os.cpu_count(),
    )
    return result


# Where a start's time goes: from one mark to the next (medians over the starts).
STEPS = (
    ("interpreter and imports", None, "log_agent_starting_s"),
    ("stores opened, API up, libvirt connected", "log_agent_starting_s", "log_connected_s"),
    ("every domain listed and described", "log_connected_s", "log_resynchronised_s"),
    ("reconciles (one per domain)", "log_resynchronised_s", "log_last_reconciled_s"),
    ("job store taken over, /readyz 200", "log_last_reconciled_s", "ready_s"),
    ("repository read, READY=1 and 'taking jobs'", "ready_s", "log_taking_jobs_s"),
)


def _median(starts: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in starts if s.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


def breakdown(starts: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, since, until in STEPS:
        spans = [
            s[until] - (s[since] if since else 0.0)
            for s in starts
            if s.get(until) is not None and (since is None or s.get(since) is not None)
        ]
        out[name] = round(statistics.median(spans), 3) if spans else None
    return out


def table(r: dict[str, Any]) -> str:
    met = r["aims_met"]

    def aim(ok: bool) -> str:
        return "met" if ok else "MISSED"

    rows = [
        ("state", f"{r['domains']} domains, {r['checkpoints']} checkpoints in the ledger "
            f"({r['checkpoints_live']} live, {r['checkpoints_libvirt']} in libvirt; keep "
            f"{r['keep']}), {r['repository_backups']} backups, {r['jobs_in_store']} jobs"),
        ("made in", f"{r['create_s']:.0f} s (domains) + {r['fill_s']:.0f} s ("
            f"{r['fill_backups']} backups through the API, a round of {r['domains']} in "
            f"{r['fill_round_s_median']:.1f} s)"),
        ("backup-agent --help", f"{r['help_s'] * 1000:.0f} ms: aim <= 150 ms {aim(met['help'])}"),
        ("backup-agent jobs", f"{r['jobs_s'] * 1000:.0f} ms: aim <= 150 ms {aim(met['jobs'])}"),
        ("backup-agent status", f"{r['status_s'] * 1000:.0f} ms: aim <= 150 ms "
            f"{aim(met['status'])}"),
        ("  (medians of)", f"{r['cli']['help']['runs']} runs each; min/max "
            + ", ".join(f"{k} {v['min_s'] * 1000:.0f}/{v['max_s'] * 1000:.0f}"
                        for k, v in r["cli"].items()) + " ms"),
        ("  of which", f"python -c pass {r['cli']['python']['median_s'] * 1000:.0f} ms; "
            f"the agent answering jobs' request {r['cli']['jobs']['api_s'] * 1000:.0f} ms, "
            f"status' two {r['cli']['status']['api_s'] * 1000:.0f} ms; host "
            f"{r['cli_host_busy_pct']:.0f} % busy meanwhile"),
        ("ready (/readyz 200)", f"median {r['ready_s']:.3f} s, max {r['ready_max_s']:.3f} s "
            f"of {len(r['starts'])}: aim <= 2 s {aim(met['ready'] and met['ready_max'])}"),
    ]  # fmt: skip
    for i, s in enumerate(r["starts"], 1):
        marks = ", ".join(
            f"{k[4:-2].replace('_', ' ')} {v:.3f}"
            for k, v in s.items()
            if k.startswith("log_") and isinstance(v, float)
        )
        rows.append(
            (f"  start {i}", f"ready {s['ready_s']:.3f} s; API answered {s['api_answered_s']:.3f}"
             f"; CPU until ready: agent {s['cpu_until_ready']['agent_s']:.2f} s (main thread "
             f"{s['cpu_until_ready']['agent_main_thread_s']:.2f}), libvirtd "
             f"{s['cpu_until_ready']['libvirtd_s']:.2f} s, the rest "
             f"{s['cpu_until_ready']['rest_s']:.2f} s, host "
             f"{s['cpu_until_ready']['host_busy_pct']:.0f} % busy (by command: "
             + ", ".join(f"{k} {v:.2f}" for k, v in s["cpu_until_ready"]["by_command_s"].items())
             + ")"
             f"; log: {marks}; {s['libvirt_domains']} domains in libvirt, {s['reconciled']} "
             f"reconciled, {s['redefined']} redefined; stopped in "
             f"{s.get('stop_s', float('nan')):.2f} s"
             + (f"; OTHER BENCHMARKS RAN: {s['others_after']}" if s["others_after"] else ""))
        )  # fmt: skip
    rows.append(("where a start goes", "medians of the starts, from the agent's log:"))
    for name, span in r["breakdown_s"].items():
        rows.append((f"  {name}", "-" if span is None else f"{span:.3f} s"))
    quiet = "yes" if r["quiet"] else "NO"
    seen = sorted(
        {p for q in r["quiet_phases"] for p in q["seen"] + q.get("others_after", [])}
        | {p for s in r["starts"] for p in s["others_after"]}
    )
    waited = sum(q["waited_s"] for q in r["quiet_phases"])
    rows.append(
        ("machine quiet", f"{quiet} (waited {waited:.0f} s for others; seen: {seen or 'none'})")
    )
    rows.append(("bench wall time", f"{r['bench_s']:.0f} s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# -- signals and clean-up ------------------------------------------------------------------


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """On the way out (normal or not), Ctrl-C and SIGTERM are ignored: the agent's stop
    and the domains' clean-up run to their end. ``main`` restores them afterwards."""
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _cleanup(made: list[StartDomain], log: Path, keep_log: Path | None) -> list[str]:
    """Remove every domain made (eight at a time); the failures."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if keep_log is not None and log.exists():
        shutil.copyfile(log, keep_log)
        say(f"agent log kept in {keep_log}")
    failures: list[str] = []
    if made:
        say(f"removing {len(made)} domains ...")
        began = time.monotonic()

        def one(td: StartDomain) -> None:
            try:
                td.cleanup()
            except Exception as exc:  # every domain is tried; all failures said
                failures.append(str(exc))

        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, made))
        say(f"  removed in {time.monotonic() - began:.1f} s")
    for failure in failures:
        say(f"CLEAN-UP FAILED: {failure}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--domains", type=int, default=50)
    parser.add_argument("--backups", type=int, default=20, help="backups (checkpoints) each")
    parser.add_argument("--keep", type=int, help="[checkpoints] keep (default: --backups)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each verb")
    parser.add_argument("--starts", type=int, default=3, help="agent starts timed")
    parser.add_argument("--concurrent", type=int, default=4, help="max_concurrent_backups")
    parser.add_argument("--write-kib", type=int, default=64, help="KiB written per round")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before the verbs")
    parser.add_argument("--timeout", type=float, default=300, help="bound of each wait")
    parser.add_argument("--quiet-wait", type=float, default=300, help="bound of each wait")
    parser.add_argument("--keep-log", type=Path, help="copy the agent's log there")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.domains < 1 or args.backups < 1 or args.runs < 1 or args.starts < 1:
        parser.error("--domains, --backups, --runs and --starts must be at least 1")
    if args.keep is None:
        args.keep = args.backups
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {
        s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)
    }
    made: list[StartDomain] = []
    began = time.monotonic()
    conn = libvirt.open("qemu:///system")
    failures: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            try:
                result = run(args, conn, Path(tmp), made)
            finally:
                failures = _cleanup(made, Path(tmp) / "agent.log", args.keep_log)
    except KeyboardInterrupt:
        say("interrupted; everything made was removed")
        return 130
    finally:
        conn.close()
        for signum, handler in old.items():
            signal.signal(signum, handler)
        left = leftover_domains()
        if left:
            say(f"bstart- domains still in libvirt: {left}")
    result["bench_s"] = round(time.monotonic() - began, 1)
    result["left_over_domains"] = left
    result["cleanup_failures"] = failures
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
    return 1 if left or failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
