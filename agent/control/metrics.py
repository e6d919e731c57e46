"""What the agent shows Prometheus at ``/metrics``, and the event-loop lag probe.

Each agent has its own registry (tests run several agents in one process). Counters
move where things happen: job ends (:meth:`Metrics.job_changed`, a job listener),
libvirt events as they are dispatched, checkpoint redefines. Values that already live
elsewhere (connection state, reconnects, jobs queued and running, NATS counters) are
read at scrape time by a collector, so they cannot drift.

Backups are counted per job by ``result`` (succeeded, failed, cancelled) and ``mode``:
for a successful backup what was done to the disks it copied (``full``, ``incremental``,
or ``mixed`` when they differ; a disk left out counts for nothing), for others the mode
that was asked for. Full copies forced on a disk whose chain could not be trusted are
counted per disk by ``reason`` (not those of a disk with no bitmap, always full).

How the live domains' disks are covered is read at scrape time too
(:func:`domain_coverage`): ``backup_agent_domain_partial{domain}`` is 1 for a domain
with a writable disk that is in no backup, not on purpose (0 otherwise), and
``backup_agent_disks_excluded{domain,reason}`` counts the disks left out of its backups
by reason (``excluded-by-config`` among them).

What the alert rules need (``config/prometheus/alerts.yml``): per domain the time of the
last failed backup and how many backups failed in a row (reset by a success; read back
from the job store at start), whether a live domain has no backup at all; and, refreshed
in the background by :class:`~agent.service.Agent` (never read from disk or the ledger at
scrape time, a hung filesystem must not hang ``/metrics``): each broken disk chain with
its reason (a fixed set: :data:`CHAIN_REASONS`) and since when, and the repository
filesystem's size and free bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from agent.backup.plan import NO_BITMAP, REPOSITORY_DAMAGED, DiskCoverage, disk_coverage, partial
from agent.chain.records import DiskChain
from agent.chain.rules import REASONS
from agent.control.job_requests import DISK_EXCLUDED, Job, JobKind, JobState
from agent.core.config import BackupSection
from agent.core.logs import get_logger
from agent.repository.manifest import Manifest
from agent.repository.verify import restore_chain
from agent.virt.inventory import DomainInfo

log = get_logger("metrics")

# The *_created series double every counter's output and nothing here needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
NOT_FORCED: Final = frozenset({None, "full-requested", "first-backup"})
# The end of the reason of a disk with no bitmap, read in full every time (never forced).

# The reasons a chain's label may carry (anything else is "other"): bounded label sets.
CHAIN_REASONS: Final = frozenset({*REASONS, REPOSITORY_DAMAGED})

_DURATION_BUCKETS: Final = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200)
# 15 and 20 ms: whether the p99 is under its 20 ms target can be read off the buckets
# (bench/scale.py); with 10 and 25 ms only, a p99 between them could not tell.
_LAG_BUCKETS: Final = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def job_mode(job: Job) -> str:
    """``full``/``incremental``/``mixed`` for a backup that ran (of the disks it copied),
    else the requested mode."""
    modes = {d.mode for d in job.disks if d.mode != DISK_EXCLUDED}
    if job.state is JobState.SUCCEEDED and modes:
        return modes.pop() if len(modes) == 1 else "mixed"
    return job.request.mode or "auto"


class Metrics:
    """The agent's metrics; ``render()`` is the body of ``/metrics``."""

    def __init__(self, domain_name: Callable[[str], str] = lambda domain: domain) -> None:
        self._domain_name = domain_name  # a job may name its domain by UUID
        self.registry = CollectorRegistry()
        r = self.registry
        self.backups = Counter(
            "backup_agent_backups",
            "Backup jobs ended, by result and mode.",
            ["result", "mode"],
            registry=r,
        )
        self.full_forced = Counter(
            "backup_agent_full_backups_forced",
            "Disks copied in full because their chain could not be trusted, by reason.",
            ["reason"],
            registry=r,
        )
        self.bytes_copied = Counter(
            "backup_agent_bytes_copied", "Bytes copied by successful backups.", registry=r
        )
        self.retention_refused = Counter(
            "backup_agent_retention_refused",
            "Backups published whose retention was refused: damage in the repository.",
            registry=r,
        )
        self.duration = Histogram(
            "backup_agent_backup_duration_seconds",
            "Duration of successful backup jobs.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            "backup_agent_last_successful_backup_timestamp_seconds",
            "When the newest successful backup of each domain finished (Unix time).",
            ["domain"],
            registry=r,
        )
        self.last_failure = Gauge(
            "backup_agent_last_failed_backup_timestamp_seconds",
            "When the newest failed backup job of each domain ended (Unix time).",
            ["domain"],
            registry=r,
        )
        self.failures_in_a_row = Gauge(
            "backup_agent_backup_failures_in_a_row",
            "Backup jobs of each domain that failed since its last successful one.",
            ["domain"],
            registry=r,
        )
        self.chain_length = Gauge(
            "backup_agent_chain_length",
            "Images a restore of each domain's newest backup reads (its newest full and "
            "the incrementals since; the longest over the disks).",
            ["domain"],
            registry=r,
        )
        self.jobs_ended = Counter(
            "backup_agent_jobs_ended",
            "Jobs of every kind ended, by kind and state.",
            ["kind", "state"],
            registry=r,
        )
        self.redefines = Counter(
            "backup_agent_checkpoint_redefines",
            "Checkpoint redefines in libvirt, by result.",
            ["result"],
            registry=r,
        )
        self.events = Counter(
            "backup_agent_events", "libvirt events received, by type.", ["type"], registry=r
        )
        self.loop_lag = Histogram(
            "backup_agent_event_loop_lag_seconds",
            "How late the event loop ran a timer (how long something blocked it).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "backup_agent_event_loop_lag_max_seconds",
            "The worst event-loop lag seen since the agent started.",
            registry=r,
        )
        self._max_lag = 0.0
        self.backed_up: set[str] = set()  # domains with a successful backup known
        # Refreshed in the background (the ledger's broken chains; the repository's
        # filesystem: size, free), read at scrape time.
        self.broken_chains: tuple[DiskChain, ...] = ()
        self.repository_space: tuple[int, int] | None = None
        # Pre-create the common label sets so a dashboard sees zeros, not gaps.
        for result in ("succeeded", "failed", "cancelled"):
            for mode in ("full", "incremental", "mixed"):
                self.backups.labels(result=result, mode=mode)
        self.redefines.labels(result="ok")
        self.redefines.labels(result="failed")

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- feeds ---------------------------------------------------------------------------

    def job_changed(self, job: Job) -> None:
        """Job listener: counts jobs (and backups) as they end."""
        if not job.state.finished:
            return
        self.jobs_ended.labels(kind=job.request.kind, state=job.state.value).inc()
        if job.kind is not JobKind.BACKUP:
            return
        self.backups.labels(result=job.state.value, mode=job_mode(job)).inc()
        self.ended(job)
        if job.error_code == "retention-refused":
            self.retention_refused.inc()
        # (a backup whose retention was refused stands: it counts as the backup it is)
        if job.state is not JobState.SUCCEEDED and job.backup_id is None:
            return
        for disk in job.disks:
            if disk.mode == "full" and not _not_forced(disk.reason):
                self.full_forced.labels(reason=disk.reason).inc()
        self.bytes_copied.inc(sum(d.bytes_copied for d in job.disks))
        if job.started_at is not None and job.finished_at is not None:
            self.duration.observe(max(0.0, job.finished_at - job.started_at))
        domain = self._domain_name(job.domain)
        if job.finished_at is not None:
            self.last_success.labels(domain=domain).set(job.finished_at)
        length = job.result.get("chain_length")
        if isinstance(length, int):
            self.chain_length.labels(domain=domain).set(length)

    def ended(self, job: Job) -> None:
        """A backup job's end in the per-domain failure gauges (also those the job store
        holds, replayed oldest first at start)."""
        if job.error_code == "domain-not-found":  # (no domain here: no series for it)
            return
        domain = self._domain_name(job.domain)
        if job.state is JobState.SUCCEEDED:
            self.failures_in_a_row.labels(domain=domain).set(0)
            self.backed_up.add(domain)
        elif job.state is JobState.FAILED:
            self.failures_in_a_row.labels(domain=domain).inc()
            if job.finished_at is not None:
                self.last_failure.labels(domain=domain).set(job.finished_at)

    def redefined(self, ok: bool) -> None:
        self.redefines.labels(result="ok" if ok else "failed").inc()

    def event(self, kind: str) -> None:
        self.events.labels(type=kind).inc()

    def lag(self, seconds: float) -> None:
        self.loop_lag.observe(seconds)
        if seconds > self._max_lag:
            self._max_lag = seconds
            self.loop_lag_max.set(seconds)


def _not_forced(reason: str | None) -> bool:
    return reason in NOT_FORCED or (reason is not None and reason.endswith(f": {NO_BITMAP}"))


def domain_coverage(info: DomainInfo, backup: BackupSection) -> tuple[DiskCoverage, ...]:
    """How backups treat each disk of ``info`` today, ``[backup] exclude`` applied."""
    exclude = {d.target for d in info.disks if backup.excluded(info.name, d.target)}
    return disk_coverage(info, exclude)


class StateCollector(Collector):
    """Reads, at scrape time, values that live in other objects (``coverage``: each
    live domain's disks, by name, as :func:`domain_coverage` says)."""

    def __init__(
        self,
        connected: Callable[[], bool],
        reconnects: Callable[[], int],
        job_counts: Callable[[], Mapping[JobState, int]],
        messages: Callable[[], Mapping[str, int]] = dict,
        nats: Callable[[], bool | None] = lambda: None,
        recovering: Callable[[], Iterable[str]] = tuple,
        coverage: Callable[[], Mapping[str, Sequence[DiskCoverage]]] = dict,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._recovering = recovering
        self._coverage = coverage
        self._connected = connected
        self._reconnects = reconnects
        self._job_counts = job_counts
        self._messages = messages
        self._nats = nats

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "backup_agent_libvirt_connected",
            "1 while the agent holds a working libvirt connection.",
            value=1.0 if self._connected() else 0.0,
        )
        yield CounterMetricFamily(
            "backup_agent_libvirt_reconnects",
            "Successful libvirt reconnections after the first connection.",
            value=self._reconnects(),
        )
        jobs = GaugeMetricFamily(
            "backup_agent_jobs", "Jobs queued and running now.", labels=["state"]
        )
        counts = self._job_counts()
        for state in (JobState.QUEUED, JobState.RUNNING):
            jobs.add_metric([state.value], counts.get(state, 0))
        yield jobs
        messages = CounterMetricFamily(
            "backup_agent_nats_messages",
            "Job requests received from NATS, by outcome.",
            labels=["outcome"],
        )
        for outcome, value in self._messages().items():
            messages.add_metric([outcome], value)
        yield messages
        recovering = sorted(self._recovering())
        yield GaugeMetricFamily(
            "backup_agent_domains_recovering",
            "Domains whose left-over backup jobs are not finished or undone yet.",
            value=len(recovering),
        )
        each = GaugeMetricFamily(
            "backup_agent_domain_recovering",
            "1 for each domain whose left-over backup job is not finished or undone yet.",
            labels=["domain"],
        )
        for name in recovering:
            each.add_metric([name], 1.0)
        yield each
        coverage = self._coverage()
        yield from self._covered(coverage)
        if self._metrics is not None:
            # Of the live domains' disks that backups copy: a chain left broken by a
            # domain that migrated away or a disk unplugged is nothing to act on here.
            live = {
                (name, c.target)
                for name, disks in coverage.items()
                for c in disks
                if c.how != "excluded"
            }
            broken = [c for c in self._metrics.broken_chains if (c.domain, c.target) in live]
            yield from self._chains(broken)
            yield from self._space(self._metrics.repository_space)
        nats = self._nats()
        if nats is not None:  # (absent without [nats] url)
            yield GaugeMetricFamily(
                "backup_agent_nats_connected",
                "1 while the agent is connected to its NATS server.",
                value=1.0 if nats else 0.0,
            )

    def _covered(self, coverage: Mapping[str, Sequence[DiskCoverage]]) -> Iterable[Metric]:
        partial_each = GaugeMetricFamily(
            "backup_agent_domain_partial",
            "1 for each domain with a writable disk that is in no backup (not left out by "
            "configuration), 0 for every other domain libvirt knows.",
            labels=["domain"],
        )
        excluded = GaugeMetricFamily(
            "backup_agent_disks_excluded",
            "Disks of each domain left out of its backups, by reason.",
            labels=["domain", "reason"],
        )
        without = GaugeMetricFamily(
            "backup_agent_domain_without_backup",
            "1 for each domain libvirt knows that has no successful backup (in the "
            "repository at start, or since), 0 for the others.",
            labels=["domain"],
        )
        size = GaugeMetricFamily(
            "backup_agent_domain_disks_bytes",
            "Bytes of each domain's disks that backups copy: what its next full needs at most.",
            labels=["domain"],
        )
        backed_up = self._metrics.backed_up if self._metrics is not None else set()
        for name, disks in sorted(coverage.items()):
            partial_each.add_metric([name], 1.0 if partial(disks) else 0.0)
            reasons = [c.reason or "" for c in disks if c.how == "excluded"]
            for reason in sorted(set(reasons)):
                excluded.add_metric([name, reason], reasons.count(reason))
            without.add_metric([name], 0.0 if name in backed_up else 1.0)
            size.add_metric([name], sum(c.size for c in disks if c.how != "excluded"))
        yield partial_each
        yield excluded
        yield without
        yield size

    def _chains(self, broken: Sequence[DiskChain]) -> Iterable[Metric]:
        each = GaugeMetricFamily(
            "backup_agent_chain_broken",
            "1 for each disk whose checkpoint chain is broken (its next backup is full), "
            "by reason.",
            labels=["domain", "disk", "reason"],
        )
        since = GaugeMetricFamily(
            "backup_agent_chain_broken_since_timestamp_seconds",
            "When each broken disk chain broke (Unix time).",
            labels=["domain", "disk", "reason"],
        )
        for chain in broken:
            reason = chain.reason if chain.reason in CHAIN_REASONS else "other"
            labels = [chain.domain, chain.target, reason]
            each.add_metric(labels, 1.0)
            since.add_metric(labels, chain.updated_at)
        yield each
        yield since

    def _space(self, space: tuple[int, int] | None) -> Iterable[Metric]:
        if space is None:  # (not measured yet, or the repository did not answer)
            return
        total, free = space
        yield GaugeMetricFamily(
            "backup_agent_repository_size_bytes",
            "Size of the repository's filesystem.",
            value=total,
        )
        yield GaugeMetricFamily(
            "backup_agent_repository_free_bytes",
            "Bytes the agent may still write on the repository's filesystem.",
            value=free,
        )
        yield GaugeMetricFamily(
            "backup_agent_repository_used_bytes",
            "Bytes in use on the repository's filesystem.",
            value=total - free,
        )


async def watch_loop_lag(metrics: Metrics, interval: float = 0.1) -> None:
    """Until cancelled: sleep ``interval`` and record how much later than asked we woke."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(interval)
        lag = max(0.0, loop.time() - before - interval)
        metrics.lag(lag)
        if lag > 0.1:
            log.warning("event loop was blocked", seconds=round(lag, 3))


def chain_length(manifests: Sequence[Manifest]) -> int:
    """Images a restore of the newest backup reads: per disk, the backups from the newest
    back to that disk's last full copy; the longest over the disks. 0 without backups."""
    if not manifests:
        return 0
    return max((len(restore_chain(manifests, d.target)) for d in manifests[-1].disks), default=0)
