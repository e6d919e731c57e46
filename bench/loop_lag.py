"""Event-loop lag of a busy agent: ten domains on a schedule, four backups at once.

    .venv/bin/python -m bench.loop_lag [--domains 10] [--concurrent 4] [--data-mib 48]

Creates the domains (each a 64 MiB qcow2 disk with ``--data-mib`` MiB written), starts
a real agent process with one schedule over them, ``max_concurrent_backups`` set to
``--concurrent`` and the schedule's last slot set in the past, so the agent starts with
one missed slot: ten full backups queued at once, four running at a time. Then every
domain gets 1 MiB of new writes and ten incremental backups through the API. It prints
how many ran at once at most, and the agent's event-loop lag as its own probe measured
it (a 100 ms timer, ``backup_agent_event_loop_lag_*`` on ``/metrics``): the worst, and
the share of samples under each bound. A blocking call on the loop would show here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import tempfile
import threading
import time
from pathlib import Path

import libvirt

from agent.control.job_store import JobStore
from tests.testbed.agent_process import AgentProcess, agent_process, http
from tests.testbed.domains import DiskSpec, TestDomain, make_domain

MiB = 1024 * 1024


def metric_lines(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--data-mib", type=int, default=48)
    args = parser.parse_args()
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    with tempfile.TemporaryDirectory(prefix="bench-lag-") as tmp:
        work = Path(tmp)
        conn = libvirt.open("qemu:///system")
        made: list[TestDomain] = []
        try:
            return run(work, conn, made, args.domains, args.concurrent, args.data_mib)
        finally:
            for td in made:
                with contextlib.suppress(Exception):
                    td.cleanup()
            conn.close()


def run(
    work: Path,
    conn: libvirt.virConnect,
    made: list[TestDomain],
    count: int,
    concurrent: int,
    data_mib: int,
) -> int:
    print(f"creating {count} domains with {data_mib} MiB written each ...", flush=True)
    for i in range(count):
        td = make_domain(conn, work, persistent=False, disks=[DiskSpec("vda")], registry=made)
        td.write_pattern("vda", 0, data_mib * MiB, 0x10 + i)
    names = [td.name for td in made]
    print(f"agent log: {work / 'agent.log'}", flush=True)
    settings = {
        "jobs": {"max_concurrent_backups": concurrent, "max_concurrent_jobs": concurrent},
        "schedules": [{"name": "bench", "cron": "0 3 * * *", "domains": names}],
    }
    with agent_process(work, settings) as agent:
        # The agent was "down" at the last slot: it runs it once at start, for all ten.
        asyncio.run(_seed_slot(work / "state" / "jobs.sqlite"))
        peak = _Peak(agent.url, agent.token)
        started = time.monotonic()
        agent.start()
        peak.start()
        _wait_all(agent, count, "succeeded")
        full_seconds = time.monotonic() - started
        for i, td in enumerate(made):
            td.write_pattern("vda", (data_mib + 1) * MiB, 1 * MiB, 0x80 + i)
        for name in names:
            agent.call("POST", "/v1/jobs", {"id": f"incr-{name}", "kind": "backup", "domain": name})
        _wait_all(agent, 2 * count, "succeeded")
        peak.stop()
        _, text = agent.call("GET", "/metrics")
    lag = metric_lines(str(text), "backup_agent_event_loop_lag")
    worst = lag.get("backup_agent_event_loop_lag_max_seconds", float("nan"))
    samples = lag.get("backup_agent_event_loop_lag_seconds_count", 0)
    print(
        f"{count} domains, {2 * count} backups ({count} full in {full_seconds:.1f} s, "
        f"then {count} incremental); at most {peak.value} running at once"
    )
    print(f"event-loop lag: worst {worst * 1000:.1f} ms over {samples:.0f} samples (100 ms timer)")
    for key, value in lag.items():
        bound = re.search(r'le="([^"]+)"', key)
        if bound and "_bucket" in key and samples:
            print(f"  <= {bound.group(1):>6} s: {value / samples:7.2%} of samples")
    return 0


async def _seed_slot(path: Path) -> None:
    store = await JobStore.open(path)
    try:
        await store.set_last_slot("bench", time.time() - 2 * 86400)
    finally:
        await store.close()


def _wait_all(agent: AgentProcess, count: int, state: str, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, data = agent.call("GET", f"/v1/jobs?state={state}")
        if len(data["jobs"]) >= count:
            return
        _, failed = agent.call("GET", "/v1/jobs?state=failed")
        if failed["jobs"]:
            raise SystemExit(f"a backup failed: {failed['jobs'][0]}")
        time.sleep(0.5)
    raise SystemExit(f"fewer than {count} jobs {state} within {timeout} s")


class _Peak:
    """The most jobs seen running at once (polled from the API in a thread)."""

    def __init__(self, url: str, token: str) -> None:
        self._url = url
        self._token = token
        self.value = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError, KeyError, TypeError):
                _, data = http(
                    "GET", self._url + "/v1/jobs?state=running", token=self._token, timeout=5
                )
                self.value = max(self.value, len(data["jobs"]))


if __name__ == "__main__":
    raise SystemExit(main())
