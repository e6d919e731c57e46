"""Scale: fifty domains, one agent, a burst of fifty backups and a lifecycle storm.

    .venv/bin/python -m bench.scale [--json] [--domains 50] [--concurrent 4] [--data-mib 4]

Creates ``--domains`` tiny persistent domains (no guest OS: a 64 MiB qcow2 disk with
``--data-mib`` MiB written through QEMU), named ``bscale-<run>-<n>``, and starts one real
agent process with ``max_concurrent_backups`` (and ``max_concurrent_jobs``) set to
``--concurrent``. It then sends one backup request per domain through the HTTP API at
once and, as soon as a backup runs, a lifecycle storm from a thread of its own: every
domain suspended, held paused for ``--hold`` seconds, resumed, ``--storm-rounds`` times
(through libvirt, as an operator or a migration tool would). It waits (at most
``--timeout`` seconds) for every job to end and fails, naming the job and its error, if
one did not succeed; then checks that the agent followed the storm: libvirt and the
agent's ``/v1/domains`` both say every domain runs, and the agent counted every
lifecycle event.

The guests boot QEMU's minimal firmware, qboot (``/usr/share/qemu/qboot.rom``), which
finds no kernel and halts the vCPU: 0.7 CPU-seconds each, then nothing. SeaBIOS
(``--seabios``) spends about 6 CPU-seconds booting each one on this nested KVM and
retries every 60 s: fifty of them would keep a 2-core host busy on their own.

It reports the burst's wall time (first request sent to last job finished), each job's
queue time (created to started) and run time (started to finished) from the job records
(median, p95, max; ``jobs`` in the JSON lists them all), how many ran at once at most
(from the records), and the agent's event-loop lag as its own probe measured it (a
100 ms timer: the histogram ``backup_agent_event_loop_lag_seconds`` and the worst since
start, ``backup_agent_event_loop_lag_max_seconds``):

- ``loop_lag_p99_ms``: the p99 of the burst's samples (the histogram's difference from
  just before the first request to the end), as the upper bound of its bucket (no more
  than the burst's worst, when that is known): what a target can be checked against;
  ``loop_lag_p99_interp_ms`` is Prometheus' ``histogram_quantile`` of the same;
- ``loop_lag_max_ms``: the agent's worst since it started (start-up included; whether
  it was reached in the burst is said, and the worst before it shown);
- the same for the storm's window alone (``storm_lag_*``; its worst is known exactly only
  when the agent's worst rose in it, else it is bounded).

Then the agent's peak RSS (``VmHWM``), and where the CPU went in the burst: the host's
busy share, the agent (its main thread apart, and how long that thread waited for a CPU
while runnable, from ``schedstat``), its qemu-nbd children, our QEMUs, libvirtd,
everything else. ``--step-log-ms N`` also times every step of the agent's event loop
(a ``sitecustomize`` in the work directory; the agent is not changed) and reports those
longer than N ms with the CPU time their thread spent in them: a long step with little
CPU was waiting, not computing. ``--json`` prints one JSON object (``domains``,
``loop_lag_p99_ms``, ``loop_lag_max_ms``, ``peak_rss_mib`` and the rest); progress goes
to stderr.

Everything it made is removed at the end, also after a failure, Ctrl-C or SIGTERM: the
agent stopped by its pid, each domain destroyed and undefined by its own UUID (name
checked), its files and QEMU log removed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import astuple, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import libvirt

from tests.testbed.agent_process import AgentProcess, agent_process, http
from tests.testbed.domains import (
    DiskSpec,
    TestDomain,
    create_image,
    domain_xml,
)

MiB = 1024 * 1024
PREFIX = "bscale-"
LAG = "backup_agent_event_loop_lag_seconds"
LAG_MAX = "backup_agent_event_loop_lag_max_seconds"
TARGET_P99 = 0.020
TARGET_MAX = 0.100
# A minimal firmware: it finds no kernel to boot and halts the vCPU (see the docstring).
QBOOT = Path("/usr/share/qemu/qboot.rom")


def say(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


# -- domains -------------------------------------------------------------------------------


class ScaleDomain(TestDomain):
    """A test bed domain named ``bscale-*`` instead of ``lbat-*``: the test suite's
    domains are ``lbat-*``, and some tests compare the set of those before and after
    (``tests/test_demo.py``), which fifty more beside a test run would fail."""

    name_prefix = PREFIX


D = TypeVar("D", bound=ScaleDomain)


def make_domain(
    conn: libvirt.virConnect,
    work: Path,
    name: str,
    registry: list[D],
    firmware: Path | None = None,
    kind: type[D] = ScaleDomain,  # type: ignore[assignment]
) -> D:
    """Define and start a ``kind`` domain with one 64 MiB qcow2 disk; in ``registry``
    first. ``firmware``: a ROM to boot instead of the machine's default (SeaBIOS)."""
    spec = DiskSpec("vda")
    workdir = work / name
    path = workdir / spec.file_name
    td = kind(
        name=name,
        uuid=str(uuidlib.uuid4()),
        xml="",
        disk_paths={"vda": path},
        persistent=True,
        conn=conn,
        workdir=workdir,
    )
    registry.append(td)  # before anything exists: cleaned up whatever happens next
    workdir.mkdir(parents=True)
    create_image(path, spec.size, spec.image_format)
    root = ET.fromstring(domain_xml(name, td.uuid, [(spec, path)]))
    os_el = root.find("os")
    if firmware is not None and os_el is not None:
        ET.SubElement(os_el, "loader", readonly="yes", type="rom").text = str(firmware)
    td.xml = ET.tostring(root, encoding="unicode")
    conn.defineXML(td.xml).create()
    return td


def create_domains(
    conn: libvirt.virConnect,
    work: Path,
    count: int,
    data_mib: int,
    made: list[ScaleDomain],
    firmware: Path | None,
) -> None:
    run = secrets.token_hex(3)

    def one(i: int) -> None:
        td = make_domain(conn, work, f"{PREFIX}{run}-{i:02d}", made, firmware)
        if data_mib:
            td.write_pattern("vda", 0, data_mib * MiB, 0x10 + i % 0xE0)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="create")
    try:
        for future in [pool.submit(one, i) for i in range(count)]:
            future.result()
    finally:
        # Every creation has returned before anyone cleans up: none defines a domain
        # after its clean-up ran.
        pool.shutdown(wait=True, cancel_futures=True)
    made.sort(key=lambda td: td.name)


# -- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    """The lag probe's histogram (cumulative counts by upper bound) and worst gauge."""

    buckets: tuple[tuple[float, float], ...]
    worst: float
    lifecycle_events: float

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def __sub__(self, other: Lag) -> Lag:
        before = dict(other.buckets)
        return Lag(
            tuple((le, n - before.get(le, 0.0)) for le, n in self.buckets),
            self.worst,
            self.lifecycle_events - other.lifecycle_events,
        )

    def quantile(self, q: float) -> tuple[float, float, float]:
        """``(lower bound, upper bound, interpolated)`` of quantile ``q``'s bucket, as
        Prometheus' ``histogram_quantile`` (nan without samples; inf past the last bound)."""
        rank = q * self.count
        if not self.count:
            return math.nan, math.nan, math.nan
        low, below = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return low, le, low
                inside = n - below
                share = (rank - below) / inside if inside else 1.0
                return low, le, low + (le - low) * share
            low, below = le, n
        return low, math.inf, low

    def highest(self) -> float:
        """Upper bound of the highest bucket holding a sample (0 without samples)."""
        bound, below = 0.0, 0.0
        for le, n in self.buckets:
            if n > below:
                bound = le
            below = n
        return bound


def parse_metrics(text: str) -> Lag:
    buckets: list[tuple[float, float]] = []
    worst = math.nan
    events = 0.0
    for line in text.splitlines():
        if line.startswith(LAG + "_bucket"):
            match = re.search(r'le="([^"]+)"\} (\S+)$', line)
            if match:
                buckets.append((float(match.group(1)), float(match.group(2))))
        elif line.startswith(LAG_MAX + " "):
            worst = float(line.split()[-1])
        elif line.startswith('backup_agent_events_total{type="Lifecycle"}'):
            events = float(line.split()[-1])
    buckets.sort()
    return Lag(tuple(buckets), worst, events)


class Api:
    """The agent's API with the token read once (threads share it)."""

    def __init__(self, agent: AgentProcess) -> None:
        self.url = agent.url
        self.token = agent.token

    def call(
        self, method: str, path: str, body: object | None = None, timeout: float = 30
    ) -> tuple[int, Any]:
        return http(method, self.url + path, body, token=self.token, timeout=timeout)

    def lag(self) -> Lag:
        status, text = self.call("GET", "/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {text}")
        return parse_metrics(str(text))

    def jobs(self, prefix: str) -> list[dict[str, Any]]:
        status, data = self.call("GET", "/v1/jobs?limit=1000")
        if status != 200:
            raise RuntimeError(f"GET /v1/jobs answered {status}: {data}")
        return [j for j in data["jobs"] if str(j["id"]).startswith(prefix)]


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """``(VmHWM, VmRSS)`` of the process, MiB."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmHWM"], values["VmRSS"]


# -- the storm -----------------------------------------------------------------------------


@dataclass
class Storm:
    """Suspend every domain, hold, resume every domain; ``rounds`` times, in a thread."""

    domains: list[ScaleDomain]
    rounds: int
    hold: float
    api: Api
    started: float = math.nan
    ended: float = math.nan
    before: Lag | None = None
    after: Lag | None = None
    operations: int = 0
    slowest_call: float = 0.0
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="storm", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.join()

    def join(self, timeout: float = 120) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def launched(self) -> bool:
        return self._thread is not None

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _run(self) -> None:
        conn = libvirt.open("qemu:///system")
        try:
            doms = []
            for td in self.domains:
                dom = conn.lookupByUUIDString(td.uuid)
                if dom.name() != td.name:
                    raise RuntimeError(f"{td.uuid} names {dom.name()!r}, not {td.name!r}")
                doms.append(dom)
            self.before = self.api.lag()
            self.started = time.time()
            for _ in range(self.rounds):
                for op in ("suspend", "resume"):
                    for dom in doms:
                        if self._stop.is_set():
                            return
                        self._call(dom, op)
                    if op == "suspend":
                        self._stop.wait(self.hold)
            self.ended = time.time()
            self.after = self.api.lag()
        except Exception as exc:  # reported by the main thread
            self.errors.append(f"storm: {exc!r}")
        finally:
            conn.close()

    def _call(self, dom: libvirt.virDomain, op: str) -> None:
        began = time.monotonic()
        try:
            getattr(dom, op)()
        except libvirt.libvirtError as exc:
            self.errors.append(f"{op} {dom.name()}: {exc}")
        self.operations += 1
        self.slowest_call = max(self.slowest_call, time.monotonic() - began)


# -- the run -------------------------------------------------------------------------------


def _ts(value: str | None) -> float:
    if value is None:
        return math.nan
    return datetime.fromisoformat(value).timestamp()


def _most_at_once(intervals: list[tuple[float, float]]) -> int:
    edges = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = peak = 0
    for _, step in edges:  # an end sorts before a start at the same instant
        now += step
        peak = max(peak, now)
    return peak


def _spread(values: list[float]) -> tuple[float, float, float]:
    p95 = statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else 0.0
    return statistics.median(values), p95, max(values)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _window(delta: Lag, gauge_before: float) -> dict[str, Any]:
    """A window's lag: its p99 from the histogram difference; its worst exactly when the
    agent's worst-ever gauge rose in it, else only bounded by its highest bucket."""
    low, high, interp = delta.quantile(0.99)
    rose = delta.worst > gauge_before
    if rose:  # the window's worst is known exactly: no quantile lies above it
        high, interp = min(high, delta.worst), min(interp, delta.worst)
    return {
        "samples": int(delta.count),
        "p99_bucket_ms": [_ms(low), _ms(high)],
        "p99_ms": _ms(high),
        "p99_interp_ms": _ms(interp),
        "max_ms": _ms(delta.worst) if rose else None,
        "max_bound_ms": _ms(delta.worst if rose else min(delta.highest(), gauge_before)),
        "max_exact": rose,
        "buckets": _per_bucket(delta),
    }


def _per_bucket(lag: Lag) -> list[list[Any]]:
    """Samples in each bucket (not cumulative), by its upper bound in ms ("+Inf")."""
    out: list[list[Any]] = []
    below = 0.0
    for le, n in lag.buckets:
        out.append(["+Inf" if math.isinf(le) else round(le * 1000, 3), int(n - below)])
        below = n
    return out


def _warnings(agent: AgentProcess, since: float, limit: int = 20) -> tuple[int, list[str]]:
    """Warnings the agent logged since ``since`` (Unix time): how many, and the first
    lines of them (the loop-lag probe's, libvirt's, asyncio's)."""
    lines: list[str] = []
    count = 0
    for raw in agent.log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            if raw.strip() and not raw.startswith("STEP "):
                count += 1
                if len(lines) < limit:
                    lines.append(raw)
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("warning", "error"):
            continue
        with contextlib.suppress(KeyError, ValueError, TypeError):
            if _ts(entry["timestamp"]) < since:
                continue
        count += 1
        if len(lines) < limit:
            lines.append(raw)
    return count, lines


def run(
    args: argparse.Namespace, conn: libvirt.virConnect, work: Path, made: list[ScaleDomain]
) -> dict[str, Any]:
    firmware = None if args.seabios or not QBOOT.exists() else QBOOT
    say(
        f"creating {args.domains} domains ({args.data_mib} MiB written into each, "
        f"firmware {firmware or 'SeaBIOS'}) ..."
    )
    began = time.monotonic()
    create_domains(conn, work, args.domains, args.data_mib, made, firmware)
    say(f"  {time.monotonic() - began:.1f} s; names {made[0].name} .. {made[-1].name}")
    settings = {
        "jobs": {
            "max_concurrent_backups": args.concurrent,
            "max_concurrent_jobs": args.concurrent,
            "shutdown_grace": 5.0,
        },
    }
    env = {} if args.step_log_ms is None else _step_timer(work, args.step_log_ms)
    env |= dict(item.split("=", 1) for item in args.agent_env)
    with agent_process(work, settings, env=env) as agent, _shielded():
        say(f"agent log: {agent.log}")
        began = time.monotonic()
        agent.start()
        assert agent.proc is not None
        say(f"  agent ready in {time.monotonic() - began:.1f} s (pid {agent.proc.pid})")
        if args.agent_nice is not None:
            _renice(agent.proc.pid, args.agent_nice)
        return report(args, made, burst(args, agent, made))


def _renice(pid: int, nice: int) -> None:
    """Give every thread of the agent this nice value (threads and children it starts
    later inherit their creator's): an experiment, whether CPU contention is the lag."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
    say(f"  agent reniced to {nice}")


# Imported by the agent (``PYTHONPATH``) with ``--step-log-ms``: every callback and task
# step of its main thread's event loop timed, wall clock and the thread's own CPU time; the
# steps longer than the bound are written to its stderr (its log). A step that took long
# but little CPU was not computing: its thread waited, for a CPU or for the GIL.
_STEP_TIMER = """\
import asyncio.events, sys, threading, time
_run, _main, _limit = asyncio.events.Handle._run, threading.main_thread(), {limit!r}
def _timed(self):
    if threading.current_thread() is not _main:
        return _run(self)
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        return _run(self)
    finally:
        wall = time.perf_counter() - wall
        if wall > _limit:
            what = getattr(self._callback, "__self__", self._callback)
            sys.stderr.write(f"STEP {{time.time():.3f}} {{wall * 1000:.1f}} "
                             f"{{(time.thread_time() - cpu) * 1000:.1f}} {{what!r:.300}}\\n")
asyncio.events.Handle._run = _timed
"""


def _step_timer(work: Path, limit_ms: float) -> dict[str, str]:
    """The agent's environment for the step timer (nothing in the agent is changed)."""
    site = work / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_STEP_TIMER.format(limit=limit_ms / 1000))
    return {"PYTHONPATH": str(site)}


def _steps(log: Path, since: float, until: float) -> dict[str, Any]:
    """The step timer's records between two instants: how many, their wall and CPU time
    (ms) summed, the most CPU one took, and the five that took the most CPU."""
    steps = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("STEP "):
            _, at, wall, cpu, what = line.split(" ", 4)
            if since <= float(at) <= until:
                steps.append((float(cpu), float(wall), what))
    steps.sort(reverse=True)
    return {
        "count": len(steps),
        "wall_ms": round(sum(w for _, w, _ in steps), 1),
        "cpu_ms": round(sum(c for c, _, _ in steps), 1),
        "cpu_ms_max": steps[0][0] if steps else 0.0,
        "top_by_cpu": [{"cpu_ms": c, "wall_ms": w, "step": x} for c, w, x in steps[:5]],
    }


@dataclass(frozen=True)
class Cpu:
    """CPU time so far, in seconds: the host's busy time and all of it; the agent
    process's own, its reaped children's (qemu-nbd through setpriv), its main thread's and
    how long that thread waited for a CPU while runnable (``schedstat``); our domains'
    QEMUs' and libvirtd's."""

    host_busy: float
    host_total: float
    agent: float
    children: float
    main_thread: float
    main_waited: float
    qemus: float
    libvirtd: float

    @classmethod
    def read(cls, pid: int, qemu_pids: list[int], libvirtd: int | None) -> Cpu:
        tick = os.sysconf("SC_CLK_TCK")
        host = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = host[3] + host[4]  # idle, iowait

        def times(path: str) -> list[int]:
            try:
                fields = Path(path).read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone
                return [0, 0, 0, 0]
            return [int(v) for v in fields[11:15]]  # utime stime cutime cstime

        proc = times(f"/proc/{pid}/stat")
        main = times(f"/proc/{pid}/task/{pid}/stat")
        waited = int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1])
        qemus = sum(sum(times(f"/proc/{q}/stat")[:2]) for q in qemu_pids)
        daemon = sum(times(f"/proc/{libvirtd}/stat")[:2]) if libvirtd else 0
        return cls(
            (sum(host) - idle) / tick,
            sum(host) / tick,
            (proc[0] + proc[1]) / tick,
            (proc[2] + proc[3]) / tick,
            (main[0] + main[1]) / tick,
            waited / 1e9,
            qemus / tick,
            daemon / tick,
        )

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))


def libvirtd_pid() -> int | None:
    """libvirtd's pid (to read its CPU time), or None."""
    for stat in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if stat.read_text().strip() == "libvirtd":
                return int(stat.parent.name)
    return None


def qemu_pids(made: list[ScaleDomain]) -> list[int]:
    pids = []
    for td in made:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            pids.append(td.qemu_pid())
    return pids


@dataclass
class Burst:
    """What one burst measured, for :func:`report`."""

    jobs: list[dict[str, Any]]
    t0: float
    submitted: float
    idle: Lag
    done: Lag
    storm: Storm
    cpu: Cpu
    hwm: float
    rss: float
    domains_call: float
    warnings: int
    warning_lines: list[str]
    steps: dict[str, Any] | None


def _post_all(api: Api, made: list[ScaleDomain]) -> None:
    """One backup request per domain, ten at a time."""

    def post(td: ScaleDomain) -> None:
        body = {"id": f"{td.name}.backup", "kind": "backup", "domain": td.name}
        status, reply = api.call("POST", "/v1/jobs", body)
        if status not in (200, 201, 202):
            raise RuntimeError(f"POST /v1/jobs for {td.name}: {status} {reply}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=10, thread_name_prefix="post") as pool:
        for future in [pool.submit(post, td) for td in made]:
            future.result()


_STATES = {1: "running", 3: "paused", 5: "shut off", 6: "crashed"}
_SHUTOFF_CRASHED = (5, 3)  # VIR_DOMAIN_SHUTOFF, VIR_DOMAIN_SHUTOFF_CRASHED


def _now(made: list[ScaleDomain], name: str) -> str:
    """The domain's state in libvirt now, in words (a QEMU that crashed says so)."""
    td = next((td for td in made if td.name == name), None)
    state = None if td is None else td.state()
    if state is None:
        return "gone"
    if state == _SHUTOFF_CRASHED and td is not None:
        with contextlib.suppress(OSError):  # its last words, before clean-up removes them
            tail = td.log_path.read_text(errors="replace").strip().splitlines()[-2:]
            return "shut off, QEMU crashed: " + " / ".join(tail)
        return "shut off, QEMU crashed"
    return _STATES.get(state[0], f"state {state[0]}")


def _follow(
    args: argparse.Namespace,
    agent: AgentProcess,
    api: Api,
    storm: Storm,
    made: list[ScaleDomain],
    prefix: str,
) -> list[dict[str, Any]]:
    """Poll the jobs until all succeeded and the storm is over; start the storm once a
    backup runs. SystemExit when a job fails or the bound passes."""
    deadline = time.monotonic() + args.timeout
    while True:
        jobs = api.jobs(prefix)
        if not storm.launched and any(j["state"] != "queued" for j in jobs):
            storm.start()
        failed = [j for j in jobs if j["state"] in ("failed", "cancelled")]
        if failed:
            lines = [
                f"{j['domain']} ({_now(made, j['domain'])}): {j['state']} {j['error']}"
                for j in failed
            ]
            raise SystemExit(
                f"{len(failed)} backup(s) did not succeed:\n  "
                + "\n  ".join(lines)
                + f"\n--- agent log ---\n{agent.tail()}"
            )
        succeeded = sum(j["state"] == "succeeded" for j in jobs)
        if succeeded == len(made) and storm.done:
            return jobs
        if time.monotonic() > deadline:
            raise SystemExit(
                f"not every backup succeeded within {args.timeout:g} s ({succeeded} of "
                f"{len(made)}; storm done: {storm.done})\n--- agent log ---\n{agent.tail()}"
            )
        time.sleep(0.5)


def burst(args: argparse.Namespace, agent: AgentProcess, made: list[ScaleDomain]) -> Burst:
    api = Api(agent)
    assert agent.proc is not None
    pid = agent.proc.pid
    prefix = made[0].name.rsplit("-", 1)[0] + "-"
    _wait_inventory(api, made, "running", 60)
    time.sleep(args.settle)  # start-up's reconciles done, the agent idle
    qemus, daemon = qemu_pids(made), libvirtd_pid()
    idle, cpu0 = api.lag(), Cpu.read(pid, qemus, daemon)
    storm = Storm(made, args.storm_rounds, args.hold, api)
    say(f"sending {len(made)} backup requests at once ...")
    t0 = time.time()
    _post_all(api, made)
    submitted = time.time() - t0
    say(f"  sent in {submitted:.2f} s; the storm starts once a backup runs")
    try:
        jobs = _follow(args, agent, api, storm, made, prefix)
    finally:
        storm.stop()
    done, cpu = api.lag(), Cpu.read(pid, qemus, daemon) - cpu0
    t1 = time.time()
    say(f"  all {len(made)} succeeded in {time.time() - t0:.1f} s")
    if storm.errors:
        raise SystemExit("the storm failed: " + "; ".join(storm.errors[:5]))
    # The agent followed the storm: libvirt and the agent's inventory both say every
    # domain runs, and it counted every lifecycle event.
    not_running = [
        td.name for td in made if (s := td.state()) is None or s[0] != libvirt.VIR_DOMAIN_RUNNING
    ]
    if not_running:
        raise SystemExit(f"domains not running after the storm: {not_running[:5]}")
    began = time.monotonic()
    _wait_inventory(api, made, "running", 30)
    domains_call = time.monotonic() - began
    events = done.lifecycle_events - idle.lifecycle_events
    if events < storm.operations:
        raise SystemExit(
            f"the agent counted {events:.0f} lifecycle events, the storm made {storm.operations}"
        )
    hwm, rss = peak_rss_mib(pid)
    warnings, warning_lines = _warnings(agent, t0)
    steps = None if args.step_log_ms is None else _steps(agent.log, t0, t1)
    return Burst(
        jobs, t0, submitted, idle, done, storm, cpu, hwm, rss, domains_call, warnings,
        warning_lines, steps,
    )  # fmt: skip


def _wait_inventory(api: Api, made: list[ScaleDomain], state: str, timeout: float) -> None:
    names = {td.name for td in made}
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while True:
        status, data = api.call("GET", "/v1/domains", timeout=60)
        if status == 200:
            seen = {d["name"]: d["state"] for d in data["domains"] if d["name"] in names}
            if len(seen) == len(names) and set(seen.values()) == {state}:
                return
        if time.monotonic() > deadline:
            wrong = {n: s for n, s in seen.items() if s != state}
            raise SystemExit(
                f"the agent's inventory did not show every domain {state} within "
                f"{timeout:g} s: {len(seen)} of {len(names)} known, not {state}: "
                f"{dict(list(wrong.items())[:5])}"
            )
        time.sleep(0.5)


def _verdict(low_ms: float, high_ms: float, target_ms: float) -> str:
    if high_ms <= target_ms:  # the probe's samples are bucketed by <=
        return "met"
    if low_ms >= target_ms:
        return "missed"
    return f"undecidable (its bucket {low_ms:g}-{high_ms:g} ms straddles {target_ms:g} ms)"


def report(args: argparse.Namespace, made: list[ScaleDomain], b: Burst) -> dict[str, Any]:
    records = []
    for j in b.jobs:
        created, started, finished = (
            _ts(j[k]) for k in ("created_at", "started_at", "finished_at")
        )
        records.append(
            {
                "domain": j["domain"],
                "queue_s": round(started - created, 3),
                "run_s": round(finished - started, 3),
                "start_s": round(started - b.t0, 3),
                "end_s": round(finished - b.t0, 3),
                "modes": sorted({d["mode"] for d in j["disks"]}),
            }
        )
    records.sort(key=lambda r: r["start_s"])
    queue = _spread([r["queue_s"] for r in records])
    runs = _spread([r["run_s"] for r in records])
    delta = b.done - b.idle
    lag = _window(delta, b.idle.worst)
    p99_low, p99_high = lag["p99_bucket_ms"]
    storm = b.storm
    assert storm.before is not None and storm.after is not None
    storm_lag = _window(storm.after - storm.before, storm.before.worst)
    storm_from, storm_to = storm.started - b.t0, storm.ended - b.t0
    wall = b.cpu.host_total / (os.cpu_count() or 1)
    return {
        "domains": len(made),
        "concurrent_limit": args.concurrent,
        "data_mib": args.data_mib,
        "firmware": "seabios" if args.seabios or not QBOOT.exists() else "qboot",
        "agent_nice": args.agent_nice,
        "total_s": round(max(r["end_s"] for r in records), 2),
        "submit_s": round(b.submitted, 2),
        "queue_s_p50": round(queue[0], 2),
        "queue_s_p95": round(queue[1], 2),
        "queue_s_max": round(queue[2], 2),
        "run_s_p50": round(runs[0], 2),
        "run_s_p95": round(runs[1], 2),
        "run_s_max": round(runs[2], 2),
        "concurrent_max": _most_at_once([(r["start_s"], r["end_s"]) for r in records]),
        "modes": sorted({m for r in records for m in r["modes"]}),
        "loop_lag_p99_ms": lag["p99_ms"],
        "loop_lag_p99_interp_ms": lag["p99_interp_ms"],
        "loop_lag_p99_bucket_ms": lag["p99_bucket_ms"],
        "loop_lag_p99_target": _verdict(p99_low, p99_high, TARGET_P99 * 1000),
        "loop_lag_max_ms": _ms(b.done.worst),
        "loop_lag_max_target": "met" if b.done.worst < TARGET_MAX else "missed",
        "loop_lag_max_in_burst": lag["max_exact"],
        "loop_lag_max_before_burst_ms": _ms(b.idle.worst),
        "loop_lag_samples": lag["samples"],
        "loop_lag_buckets": lag["buckets"],
        "storm_rounds": args.storm_rounds,
        "storm_operations": storm.operations,
        "storm_s": round(storm_to - storm_from, 2),
        "storm_start_s": round(storm_from, 2),
        "storm_slowest_call_ms": _ms(storm.slowest_call),
        "storm_jobs_overlapping": sum(
            1 for r in records if r["start_s"] < storm_to and r["end_s"] > storm_from
        ),
        "storm_lifecycle_events": int(delta.lifecycle_events),
        "storm_lag_p99_ms": storm_lag["p99_ms"],
        "storm_lag_p99_interp_ms": storm_lag["p99_interp_ms"],
        "storm_lag_max_ms": storm_lag["max_ms"],
        "storm_lag_max_bound_ms": storm_lag["max_bound_ms"],
        "storm_lag_samples": storm_lag["samples"],
        "peak_rss_mib": round(b.hwm, 1),
        "rss_end_mib": round(b.rss, 1),
        "host_cpu_busy_pct": round(100 * b.cpu.host_busy / b.cpu.host_total, 1),
        "agent_cpu_s": round(b.cpu.agent, 2),
        "agent_main_thread_cpu_s": round(b.cpu.main_thread, 2),
        "agent_children_cpu_s": round(b.cpu.children, 2),
        "agent_main_thread_waited_s": round(b.cpu.main_waited, 2),
        "qemus_cpu_s": round(b.cpu.qemus, 2),
        "libvirtd_cpu_s": round(b.cpu.libvirtd, 2),
        "other_cpu_s": round(
            b.cpu.host_busy - b.cpu.agent - b.cpu.children - b.cpu.qemus - b.cpu.libvirtd, 2
        ),
        "burst_window_s": round(wall, 2),
        "domains_api_s": round(b.domains_call, 2),
        "loop_steps_over_limit": b.steps,
        "agent_warnings": b.warnings,
        "agent_warning_lines": b.warning_lines,
        "jobs": [{k: v for k, v in r.items() if k != "modes"} for r in records],
    }


def table(r: dict[str, Any]) -> str:
    low, high = r["loop_lag_p99_bucket_ms"]
    storm_max = (
        f"{r['storm_lag_max_ms']:.1f} ms"
        if r["storm_lag_max_ms"] is not None
        else f"<= {r['storm_lag_max_bound_ms']:.1f} ms (no new worst)"
    )
    buckets = ", ".join(f"<={le}: {n}" for le, n in r["loop_lag_buckets"] if n)
    rows = [
        ("domains, backups", f"{r['domains']}, {r['domains']} ({r['data_mib']} MiB each, "
            f"{', '.join(r['modes'])}; guests on {r['firmware']})"),
        ("max_concurrent_backups", f"{r['concurrent_limit']} (at most "
            f"{r['concurrent_max']} ran at once)"),
        ("burst wall time", f"{r['total_s']:.1f} s (requests sent in {r['submit_s']:.2f} s)"),
        ("queue time p50/p95/max", f"{r['queue_s_p50']:.2f} / {r['queue_s_p95']:.2f} / "
            f"{r['queue_s_max']:.2f} s"),
        ("run time p50/p95/max", f"{r['run_s_p50']:.2f} / {r['run_s_p95']:.2f} / "
            f"{r['run_s_max']:.2f} s"),
        ("loop lag p99 (burst)", f"<= {high:g} ms (bucket {low:g}-{high:g} ms, interpolated "
            f"{r['loop_lag_p99_interp_ms']:g} ms): target < 20 ms {r['loop_lag_p99_target']}"),
        ("  its samples by ms", f"{r['loop_lag_samples']}: {buckets}"),
        ("loop lag worst", f"{r['loop_lag_max_ms']:.1f} ms "
            f"({'in the burst' if r['loop_lag_max_in_burst'] else 'before the burst'}; "
            f"worst before it {r['loop_lag_max_before_burst_ms']:.1f} ms): "
            f"target < 100 ms {r['loop_lag_max_target']}"),
        ("storm", f"{r['storm_rounds']} rounds: {r['storm_operations']} suspend/resume in "
            f"{r['storm_s']:.1f} s from +{r['storm_start_s']:.1f} s (slowest "
            f"{r['storm_slowest_call_ms']:.0f} ms), {r['storm_jobs_overlapping']} jobs ran "
            f"meanwhile, {r['storm_lifecycle_events']} lifecycle events"),
        ("loop lag in the storm", f"p99 <= {r['storm_lag_p99_ms']:g} ms (interpolated "
            f"{r['storm_lag_p99_interp_ms']:g} ms, {r['storm_lag_samples']} samples), "
            f"worst {storm_max}"),
        ("CPU in the burst", f"host {r['host_cpu_busy_pct']:.0f} % busy over "
            f"{r['burst_window_s']:.1f} s: agent {r['agent_cpu_s']:.1f} s (main thread "
            f"{r['agent_main_thread_cpu_s']:.1f} s), its qemu-nbd "
            f"{r['agent_children_cpu_s']:.1f} s, QEMUs {r['qemus_cpu_s']:.1f} s, libvirtd "
            f"{r['libvirtd_cpu_s']:.1f} s, everything else {r['other_cpu_s']:.1f} s"),
        ("  main thread runnable", f"{r['agent_main_thread_waited_s']:.2f} s waiting for a CPU"),
        ("agent peak RSS (VmHWM)", f"{r['peak_rss_mib']:.1f} MiB (at the end "
            f"{r['rss_end_mib']:.1f} MiB)"),
        ("GET /v1/domains after", f"{r['domains_api_s']:.2f} s"),
        ("agent warnings", f"{r['agent_warnings']} in the burst"),
    ]  # fmt: skip
    if (st := r["loop_steps_over_limit"]) is not None:
        rows.append(
            (
                "loop steps over limit",
                f"{st['count']}: {st['wall_ms']:.0f} ms wall, "
                f"{st['cpu_ms']:.0f} ms CPU of it; the most CPU in one {st['cpu_ms_max']:.1f} ms",
            )
        )
        rows += [("", f"{t['cpu_ms']:.1f} ms CPU / {t['wall_ms']:.1f} ms: {t['step'][:120]}")
            for t in st["top_by_cpu"]]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"  {line[:200]}" for line in r["agent_warning_lines"][:10]]
    return "\n".join(lines)


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


def _cleanup(made: list[ScaleDomain], log: Path, keep_log: Path | None) -> None:
    """Remove every domain made (eight at a time), keeping the agent's log if asked."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if keep_log is not None and log.exists():
        shutil.copyfile(log, keep_log)
        say(f"agent log kept in {keep_log}")
    if not made:
        return
    say(f"removing {len(made)} domains ...")
    began = time.monotonic()
    failures = []

    def one(td: ScaleDomain) -> None:
        try:
            td.cleanup()
        except Exception as exc:  # every domain is tried; all failures said
            failures.append(str(exc))

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, made))
    for failure in failures:
        say(f"CLEAN-UP FAILED: {failure}")
    say(f"  removed in {time.monotonic() - began:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--domains", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=4, help="max_concurrent_backups")
    parser.add_argument("--data-mib", type=int, default=4, help="MiB written into each disk")
    parser.add_argument("--storm-rounds", type=int, default=2)
    parser.add_argument("--hold", type=float, default=1.0, help="seconds held paused")
    parser.add_argument("--settle", type=float, default=3.0, help="idle seconds before")
    parser.add_argument("--timeout", type=float, default=300, help="bound of the burst")
    parser.add_argument(
        "--seabios", action="store_true", help="guests boot SeaBIOS, not qboot (CPU-hungry)"
    )
    parser.add_argument(
        "--step-log-ms",
        type=float,
        help="time the agent's event-loop steps; report those longer than this (wall, CPU)",
    )
    parser.add_argument(
        "--agent-nice", type=int, help="renice the agent (an experiment: CPU contention?)"
    )
    parser.add_argument(
        "--agent-env", action="append", default=[], metavar="KEY=VALUE", help="for experiments"
    )
    parser.add_argument("--keep-log", type=Path, help="copy the agent's log there")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.domains < 1:
        parser.error("--domains must be at least 1")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {
        s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)
    }
    made: list[ScaleDomain] = []
    began = time.monotonic()
    conn = libvirt.open("qemu:///system")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            try:
                result = run(args, conn, Path(tmp), made)
            finally:
                _cleanup(made, Path(tmp) / "agent.log", args.keep_log)
    except KeyboardInterrupt:
        say("interrupted; everything made was removed")
        return 130
    finally:
        conn.close()
        for signum, handler in old.items():
            signal.signal(signum, handler)
    result["bench_s"] = round(time.monotonic() - began, 1)
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
