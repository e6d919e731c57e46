"""The gauges the alert rules read (pure logic: a Metrics object fed jobs and the values
the agent refreshes in the background, rendered as Prometheus scrapes it)."""

from __future__ import annotations

from agent.backup.plan import DiskCoverage
from agent.chain.records import DiskChain
from agent.control.job_requests import Job, JobState, parse_request
from agent.control.metrics import Metrics, StateCollector


def _backup(domain: str, state: JobState, finished: float, number: int) -> Job:
    request = parse_request({"kind": "backup", "domain": domain})
    return Job(
        id=f"j{number}",
        request=request,
        state=state,
        source="http",
        created_at=finished - 10,
        started_at=finished - 5,
        finished_at=finished,
    )


def _lines(metrics: Metrics) -> set[str]:
    return set(metrics.render().decode().splitlines())


def _collected(metrics: Metrics, coverage: dict[str, tuple[DiskCoverage, ...]]) -> Metrics:
    metrics.add_collector(
        StateCollector(
            lambda: True, lambda: 0, lambda: {}, coverage=lambda: coverage, metrics=metrics
        )
    )
    return metrics


def test_failures_in_a_row_count_until_a_success_and_the_last_failure_is_timed() -> None:
    metrics = Metrics()
    ends = [
        ("web", JobState.FAILED, 100.0),
        ("web", JobState.FAILED, 200.0),
        ("db", JobState.SUCCEEDED, 250.0),
        ("web", JobState.CANCELLED, 260.0),  # an operator's cancel is no failure
        ("web", JobState.FAILED, 300.0),
    ]
    for number, (domain, state, finished) in enumerate(ends):
        metrics.job_changed(_backup(domain, state, finished, number))
    lines = _lines(metrics)
    assert 'backup_agent_backup_failures_in_a_row{domain="web"} 3.0' in lines
    assert 'backup_agent_backup_failures_in_a_row{domain="db"} 0.0' in lines
    assert 'backup_agent_last_failed_backup_timestamp_seconds{domain="web"} 300.0' in lines
    metrics.job_changed(_backup("web", JobState.SUCCEEDED, 400.0, 9))
    lines = _lines(metrics)
    assert 'backup_agent_backup_failures_in_a_row{domain="web"} 0.0' in lines
    assert 'backup_agent_last_failed_backup_timestamp_seconds{domain="web"} 300.0' in lines


def test_domains_without_a_backup_broken_chains_and_the_repository_space() -> None:
    coverage = {
        "db": (DiskCoverage("vda", "incremental", None, size=10 << 30),),
        "web": (
            DiskCoverage("vda", "incremental", None, size=4 << 30),
            DiskCoverage("vdb", "full", "format-raw: no persistent bitmap", size=0),
            DiskCoverage("sdc", "excluded", "device-cdrom", size=1 << 30),  # not copied
        ),
    }
    metrics = _collected(Metrics(), coverage)
    metrics.job_changed(_backup("db", JobState.SUCCEEDED, 50.0, 1))
    metrics.broken_chains = (
        DiskChain("web", "vda", False, "bitmap-missing", "gone", 1234.5),
        DiskChain("web", "vdb", False, "something-new", "?", 99.0),  # bounded: "other"
        DiskChain("web", "sdc", False, "bitmap-missing", "?", 99.0),  # a CD-ROM: left out
        DiskChain("gone", "vda", False, "migrated-away", "?", 99.0),  # not here any more
    )
    metrics.repository_space = (1000, 300)
    lines = _lines(metrics)
    assert 'backup_agent_domain_without_backup{domain="db"} 0.0' in lines
    assert 'backup_agent_domain_without_backup{domain="web"} 1.0' in lines
    assert 'backup_agent_domain_disks_bytes{domain="web"} 4.294967296e+09' in lines
    assert 'backup_agent_domain_disks_bytes{domain="db"} 1.073741824e+10' in lines
    web_vda = 'disk="vda",domain="web",reason="bitmap-missing"'
    assert f"backup_agent_chain_broken{{{web_vda}}} 1.0" in lines
    assert f"backup_agent_chain_broken_since_timestamp_seconds{{{web_vda}}} 1234.5" in lines
    assert 'backup_agent_chain_broken{disk="vdb",domain="web",reason="other"} 1.0' in lines
    chains = [line for line in lines if line.startswith("backup_agent_chain_broken{")]
    assert len(chains) == 2, chains  # neither the CD-ROM's nor the domain gone away
    assert "backup_agent_repository_size_bytes 1000.0" in lines
    assert "backup_agent_repository_free_bytes 300.0" in lines
    assert "backup_agent_repository_used_bytes 700.0" in lines
    # Chains mended, the space not measured (yet, or the repository did not answer).
    metrics.broken_chains = ()
    metrics.repository_space = None
    text = metrics.render().decode()
    assert "backup_agent_chain_broken{" not in text
    assert "backup_agent_repository_free_bytes " not in text


def test_a_job_for_a_domain_not_here_makes_no_series() -> None:
    """Requests name anything: a job refused because no such domain is here must not
    grow a series (nor an alert) for that name."""
    metrics = Metrics()
    job = _backup("typo-or-gone", JobState.FAILED, 10.0, 1)
    from dataclasses import replace  # noqa: PLC0415

    metrics.job_changed(replace(job, error_code="domain-not-found"))
    assert 'domain="typo-or-gone"' not in metrics.render().decode()
