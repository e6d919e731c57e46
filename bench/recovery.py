"""How long recovery of N domains takes after a kill -9 of the agent mid-backup.

    .venv/bin/python -m bench.recovery [--domains 4] [--data-mib 48] [--bandwidth-mib 4]

Creates ``--domains`` domains (each one 64 MiB qcow2 disk with ``--data-mib`` MiB
written), starts a real agent process with ``[jobs] max_concurrent_backups`` = N and a
bandwidth limit small enough that every full backup is still copying a few seconds in,
requests a backup of each through the API, and once every one is copying (its job's
``done_bytes`` above 0 and a libvirt job on its domain) kills the agent with SIGKILL.
Then it starts the agent again and measures, from the moment the new process is
started:

- ``healthz_s``: until ``/healthz`` first answers 200;
- ``per_domain_s``: per domain, until its left-over job is undone: its intent
  (``<run_path>/jobs/<uuid>.json``) gone, no libvirt job on it, and (where ``/readyz``
  has the field) the domain no longer in ``/readyz``'s ``recovering``;
- ``recovered_s``: until every domain is (the largest of ``per_domain_s``).

The last line printed is one JSON object with those keys and ``domains``. Everything
it made (domains, the agent, its files) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from agent.core.config import AgentConfig, load_config
from tests.testbed.agent_process import AgentProcess, agent_process, http
from tests.testbed.domains import DiskSpec, TestDomain, make_domain

MiB = 1024 * 1024
POLL = 0.01  # seconds between probes: the figures are wanted to ~10 ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--data-mib", type=int, default=48, help="MiB written per disk (< 64)")
    parser.add_argument(
        "--bandwidth-mib", type=float, default=4, help="MiB/s per backup job: keeps them copying"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each step")
    args = parser.parse_args()
    if not 0 < args.data_mib < 64:
        parser.error("--data-mib must be between 1 and 63")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        work = Path(tmp)
        conn = libvirt.open("qemu:///system")
        made: list[TestDomain] = []
        try:
            result = run(work, conn, made, args)
        finally:
            for td in made:
                with contextlib.suppress(Exception):
                    td.cleanup()
            conn.close()
    print(json.dumps(result), flush=True)
    return 0


def run(
    work: Path, conn: libvirt.virConnect, made: list[TestDomain], args: argparse.Namespace
) -> dict[str, Any]:
    count = args.domains
    print(f"creating {count} domains with {args.data_mib} MiB written each ...", flush=True)
    for i in range(count):
        td = make_domain(conn, work, persistent=False, disks=[DiskSpec("vda")], registry=made)
        td.write_pattern("vda", 0, args.data_mib * MiB, 0x10 + i)
    settings = {
        "backup": {"bandwidth_limit": int(args.bandwidth_mib * MiB)},
        "jobs": {"max_concurrent_backups": count, "max_concurrent_jobs": count},
    }
    print(f"agent log: {work / 'agent.log'}", flush=True)
    with agent_process(work, settings) as agent:
        cfg = load_config(agent.config)
        try:
            agent.start()
            # The first backup alone until it copies: it initialises the new repository,
            # which N first backups at once should not race for (this measures recovery).
            _submit(agent, made[0])
            _wait_all_copying(agent, made[:1], args.timeout)
            for td in made[1:]:
                _submit(agent, td)
            _wait_all_copying(agent, made, args.timeout)
            agent.kill9()
            _check_left_over(cfg, made)
            print(f"agent killed with {count} backups copying; starting it again", flush=True)
            started = time.monotonic()
            agent.start(ready=False)
            healthz, per_domain = _measure(agent, cfg, made, started, args.timeout)
        finally:
            agent.stop()
            _remove_socket_dir(cfg)
    return {
        "domains": count,
        "healthz_s": round(healthz, 3),
        "recovered_s": round(max(per_domain.values()), 3),
        "per_domain_s": {name: round(s, 3) for name, s in sorted(per_domain.items())},
    }


def _submit(agent: AgentProcess, td: TestDomain) -> None:
    body = {"id": f"backup-{td.name}", "kind": "backup", "domain": td.name}
    status, job = agent.call("POST", "/v1/jobs", body)
    if status != 201:
        raise SystemExit(f"backup of {td.name} refused: {job}")


def _wait_all_copying(agent: AgentProcess, made: list[TestDomain], timeout: float) -> None:
    """Until every backup has copied something and each domain has a libvirt job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        copying = 0
        for td in made:
            _, job = agent.call("GET", f"/v1/jobs/backup-{td.name}")
            if job.get("state") in ("succeeded", "failed", "cancelled"):
                raise SystemExit(f"the backup of {td.name} ended before the kill: {job}")
            if job.get("progress", {}).get("done_bytes", 0) > 0 and _job_active(td):
                copying += 1
        if copying == len(made):
            return
        time.sleep(0.1)
    raise SystemExit(f"not every backup was copying within {timeout:g} s:\n{agent.tail()}")


def _check_left_over(cfg: AgentConfig, made: list[TestDomain]) -> None:
    """The kill left an intent and a libvirt job per domain (else nothing is measured)."""
    for td in made:
        if not _intent(cfg, td).exists() or not _job_active(td):
            raise SystemExit(f"the kill left no job of {td.name} to recover")


def _measure(
    agent: AgentProcess,
    cfg: AgentConfig,
    made: list[TestDomain],
    started: float,
    timeout: float,
) -> tuple[float, dict[str, float]]:
    """Seconds from ``started`` until /healthz answered, and until each domain recovered."""
    healthz: float | None = None
    per_domain: dict[str, float] = {}
    field_seen = False  # /readyz has named what is recovering: from then on it must agree
    deadline = started + timeout
    while time.monotonic() < deadline:
        assert agent.proc is not None
        if agent.proc.poll() is not None:
            raise SystemExit(f"the agent exited ({agent.proc.returncode}):\n{agent.tail()}")
        if healthz is None and _answers(agent.url + "/healthz"):
            healthz = time.monotonic() - started
        if healthz is not None:
            recovering = _recovering(agent.url)
            field_seen = field_seen or recovering is not None
            for td in made:
                if td.name in per_domain or (field_seen and recovering is None):
                    continue
                if _recovered(cfg, td, recovering):
                    per_domain[td.name] = time.monotonic() - started
            if len(per_domain) == len(made):
                return healthz, per_domain
        time.sleep(POLL)
    missing = sorted({td.name for td in made} - set(per_domain))
    raise SystemExit(f"not recovered within {timeout:g} s: {missing}\n{agent.tail()}")


def _recovered(cfg: AgentConfig, td: TestDomain, recovering: set[str] | None) -> bool:
    if recovering is not None and (td.name in recovering or td.uuid in recovering):
        return False
    return not _intent(cfg, td).exists() and not _job_active(td)


def _answers(url: str) -> bool:
    with contextlib.suppress(OSError):
        status, _ = http("GET", url, timeout=1)
        return status == 200
    return False


def _recovering(url: str) -> set[str] | None:
    """The domains in /readyz's ``recovering`` (None while it does not answer or has none)."""
    with contextlib.suppress(OSError):
        _, body = http("GET", url + "/readyz", timeout=2)
        if isinstance(body, dict) and isinstance(body.get("recovering"), list | dict):
            return {str(name) for name in body["recovering"]}  # a list, or name -> why
    return None


def _intent(cfg: AgentConfig, td: TestDomain) -> Path:
    return cfg.run_path / "jobs" / f"{td.uuid}.json"


def _job_active(td: TestDomain) -> bool:
    try:
        return bool(td.dom().jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE)
    except libvirt.libvirtError:
        return True  # e.g. "backup job data missing" while libvirt tears the job down


def _remove_socket_dir(cfg: AgentConfig) -> None:
    # A deep state directory's sockets live in a /run directory named after it: ours.
    if cfg.socket_path != cfg.run_path and cfg.socket_path.is_dir():
        for path in cfg.socket_path.iterdir():
            path.unlink(missing_ok=True)
        cfg.socket_path.rmdir()


if __name__ == "__main__":
    sys.exit(main())
