"""A first look at the agent, end to end, on this machine (``scripts/demo.sh``).

1. create a throwaway domain (64 MiB qcow2 disk, no guest OS) named ``lbat-*``;
2. start ``backup-agent run`` on the embedded defaults, except that its state and
   repository live in a temporary directory (nothing is left in /var/lib);
3. write into the guest's disk, take a full backup through the HTTP API; write more,
   take an incremental one;
4. restore both points through the API and compare them byte for byte with what the
   guest's disk held; verify the repository;
5. print what happened and where the metrics are; remove everything it made.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import libvirt

from tests.testbed.agent_process import agent_process, free_port, http
from tests.testbed.domains import DiskSpec, TestDomain, make_domain

MiB = 1024 * 1024
SIZE = 64 * MiB


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def write(td: TestDomain, model: bytearray, offset: int, length: int, byte: int) -> None:
    td.write_pattern("vda", offset, length, byte)
    model[offset : offset + length] = bytes([byte]) * length


def submit(url: str, body: dict[str, Any]) -> dict[str, Any]:
    status, job = http("POST", url + "/v1/jobs", body)
    if status not in (200, 201):
        raise SystemExit(f"the agent refused {body}: {status} {job}")
    say(f"job {job['id']} queued: {body['kind']} of {body['domain']}")
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.2)
        _, job = http("GET", f"{url}/v1/jobs/{job['id']}")
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
    return f"backup {job['backup_id']}: {disks}"


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
    port = 8710 if _free(8710) else free_port()
    settings = {"http": {"port": port}, "logging": {"format": "json"}}
    with agent_process(work, settings) as agent:
        agent.start()
        say(f"the agent is ready at {agent.url} (log: {agent.log})")
        model = bytearray(SIZE)
        write(td, model, 0, 8 * MiB, 0x11)
        write(td, model, 40 * MiB, 4 * MiB, 0x22)
        say("wrote 12 MiB into the guest's disk")
        full_expected = bytes(model)
        full = submit(agent.url, {"kind": "backup", "domain": td.name, "mode": "auto"})
        say(describe(full))
        write(td, model, 64 * 1024 - 512, 1024, 0x33)  # straddles a cluster boundary
        write(td, model, 20 * MiB, 1 * MiB, 0x44)
        say("wrote 1 MiB more, and 1 KiB across a cluster boundary")
        incremental = submit(agent.url, {"kind": "backup", "domain": td.name})
        say(describe(incremental))
        for job, expected in ((full, full_expected), (incremental, bytes(model))):
            name = f"{job['backup_id']}.raw"
            submit(
                agent.url,
                {
                    "kind": "restore",
                    "domain": td.name,
                    "backup": job["backup_id"],
                    "to": name,
                    "format": "raw",
                },
            )
            restored = (work / "state" / "restores" / name).read_bytes()
            same = restored == expected
            digest = hashlib.sha256(restored).hexdigest()[:16]
            say(
                f"restored {job['backup_id']}: sha256 {digest}..., "
                + ("identical to what the guest held then" if same else "DIFFERENT")
            )
            if not same:
                return 1
        verified = submit(agent.url, {"kind": "verify", "domain": td.name})
        say(f"verify: {len(verified['result']['problems'])} problems in the repository")
        _, metrics = http("GET", agent.url + "/metrics")
        wanted = (
            "backup_agent_backups_total{",
            "backup_agent_bytes_copied_total",
            "backup_agent_event_loop_lag_max_seconds",
            "backup_agent_chain_length",
        )
        say(f"metrics at {agent.url}/metrics, for example:")
        for line in str(metrics).splitlines():
            if line.startswith(wanted) and not line.endswith(" 0.0"):
                print(f"    {line}")
        say(
            f"the repository was {work / 'repo'}; `backup-agent status`, `jobs` and the "
            f"API ({agent.url}/v1/openapi.json) work the same against a real agent"
        )
        status = agent.terminate()
        say(f"stopped the agent (SIGTERM, exit status {status})")
    return 0


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
