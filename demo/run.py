"""A first look at the agent, end to end, on this machine (``scripts/demo.sh``).

1. create a throwaway domain (64 MiB qcow2 disk, no guest OS) named ``lbat-*``;
2. start ``backup-agent run`` on the embedded defaults, with one override: its state
   directory (ledger, jobs, repository) is a temporary one, so nothing is left behind;
3. take a full and then an incremental backup through the HTTP API while a writer keeps
   writing into the guest's disk;
4. restore both through the API and show that each is the disk exactly as it was at one
   instant (after some prefix of the writes, never a mix), then verify the repository;
5. print what happened and where the metrics are; remove everything it made.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import libvirt

from tests.testbed.agent_process import AgentProcess, free_port, http
from tests.testbed.domains import DiskSpec, TestDomain, make_domain

MiB = 1024 * 1024
SIZE = 64 * MiB
REGION = 32 * MiB  # the writer's blocks: 32 MiB .. 48 MiB, one MiB at a time
BLOCKS = 16
JOB_TIMEOUT = 120.0


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


class Writer:
    """Keeps writing 1 MiB blocks into the guest's disk, in order, from a thread."""

    def __init__(self, td: TestDomain) -> None:
        self.td = td
        self.writes: list[tuple[int, int]] = []  # (offset, byte), in the order done
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            offset, byte = REGION + (count % BLOCKS) * MiB, 0x40 + count % 150
            self.td.write_pattern("vda", offset, MiB, byte)
            self.writes.append((offset, byte))
            count += 1


def point_in_time(before: bytes, writes: list[tuple[int, int]], restored: bytes) -> int | None:
    """How many of ``writes`` (applied in order to ``before``) give ``restored``; None if
    no prefix does (the backup would be a mix of moments)."""
    model = bytearray(before)
    for done in range(len(writes) + 1):
        if done:
            offset, byte = writes[done - 1]
            model[offset : offset + MiB] = bytes([byte]) * MiB
        if model == restored:
            return done
    return None


def submit(agent: AgentProcess, body: dict[str, Any]) -> dict[str, Any]:
    """A job through the agent's API (with the token it made on its first start), once ended."""
    status, job = agent.call("POST", "/v1/jobs", body)
    if status not in (200, 201):
        raise SystemExit(f"the agent refused {body}: {status} {job}")
    deadline = time.monotonic() + JOB_TIMEOUT
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job['id']} still {job['state']} after {JOB_TIMEOUT:g} s")
        time.sleep(0.1)
        _, job = agent.call("GET", f"/v1/jobs/{job['id']}")
    if job["state"] != "succeeded":
        raise SystemExit(f"job {job['id']} {job['state']}: {job['error']}")
    return dict(job)


def describe(job: dict[str, Any]) -> str:
    disks = ", ".join(
        f"{d['target']} {d['mode']}"
        + (f" ({d['reason']})" if d["reason"] else "")
        + f", {d['bytes_copied'] / MiB:.1f} MiB copied"
        for d in job["disks"]
    )
    return f"job {job['id']}: backup {job['backup_id']}: {disks}"


def main() -> int:
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised anyway
    with tempfile.TemporaryDirectory(prefix="backup-agent-demo-") as tmp:
        work = Path(tmp)
        conn = libvirt.open("qemu:///system")
        registry: list[TestDomain] = []
        try:
            return demo(work, conn, registry)
        finally:
            for td in registry:
                with contextlib.suppress(Exception):
                    td.cleanup()
            say("removed the demo domain, its images and the agent's state")
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


def demo(work: Path, conn: libvirt.virConnect, registry: list[TestDomain]) -> int:
    td = make_domain(conn, work, persistent=False, disks=[DiskSpec("vda")], registry=registry)
    say(f"created the throwaway domain {td.name} (disk {td.disk_paths['vda']})")
    config = work / "agent.toml"
    text = f'[agent]\nstate_dir = "{work / "state"}"\n'
    port = 8710
    if not _free(port):
        port = free_port()
        text += f"[http]\nport = {port}\n"
        say(f"port 8710 is taken here: the demo's agent uses {port}")
    config.write_text(text)
    agent = AgentProcess(config, work / "agent.log", f"http://127.0.0.1:{port}", {})
    try:
        return _with_agent(td, agent, work)
    finally:
        agent.stop()


def _with_agent(td: TestDomain, agent: AgentProcess, work: Path) -> int:
    agent.start()
    say(f"the agent runs on its defaults, state in {work / 'state'}; API at {agent.url}")
    model = bytearray(SIZE)  # what the guest's disk holds: every write goes here too
    for offset, length, byte in ((0, 8 * MiB, 0x11), (64 * 1024 - 512, 1024, 0x33)):
        td.write_pattern("vda", offset, length, byte)
        model[offset : offset + length] = bytes([byte]) * length
    say("wrote 8 MiB, and 1 KiB across a cluster boundary, into the guest's disk")
    backups = []
    for mode in ("auto", "auto"):
        before = bytes(model)
        with Writer(td) as writer:
            time.sleep(0.3)  # the writer is busy before the backup begins
            job = submit(agent, {"kind": "backup", "domain": td.name, "mode": mode})
            time.sleep(0.3)
        for offset, byte in writer.writes:
            model[offset : offset + MiB] = bytes([byte]) * MiB
        say(describe(job) + f" (while {len(writer.writes)} writes of 1 MiB went on)")
        backups.append((job, before, list(writer.writes)))
    for job, before, writes in backups:
        name = f"{job['backup_id']}.raw"
        restore = {"kind": "restore", "domain": td.name, "backup": job["backup_id"], "disk": "vda"}
        submit(agent, {**restore, "to": name, "format": "raw"})
        restored = (work / "state" / "restores" / name).read_bytes()
        done = point_in_time(before, writes, restored)
        digest = hashlib.sha256(restored).hexdigest()[:16]
        if done is None:
            say(f"restored {job['backup_id']} (sha256 {digest}...) is NOT one point in time")
            return 1
        say(
            f"restored {job['backup_id']} (sha256 {digest}...): exactly the disk after "
            f"{done} of the {len(writes)} writes made around it: one point in time"
        )
    verified = submit(agent, {"kind": "verify", "domain": td.name})
    say(f"verify: {len(verified['result']['problems'])} problems in the repository")
    _, metrics = http("GET", agent.url + "/metrics")
    wanted = (
        "backup_agent_backups_total{",
        "backup_agent_bytes_copied_total",
        "backup_agent_chain_length",
        "backup_agent_event_loop_lag_max_seconds",
    )
    say(f"metrics at {agent.url}/metrics, for example:")
    for line in str(metrics).splitlines():
        if line.startswith(wanted) and not line.endswith(" 0.0"):
            print(f"    {line}")
    say(
        "with an agent running, `backup-agent status`, `jobs` and `backup DOMAIN --wait` "
        f"talk to it; its API is described at {agent.url}/v1/openapi.json (with the "
        "token in <state_dir>/api-token, as every /v1 route)"
    )
    status = agent.terminate()
    say(f"stopped the agent (SIGTERM, exit status {status})")
    return 0


def _free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent does
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
