"""Local schedules, with a fake clock, an in-memory store and job sink (pure logic).

The fake ``sleep`` moves the fake clock forward by exactly what was asked, so a slot is
handled at its exact second; it refuses sleeps over a minute and stops the run (raising
``TimeUpError``) instead of sleeping past the test's end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import structlog

from agent.control.job_requests import JOB_ID_RE, Job, JobListener, JobRequest, JobState
from agent.control.schedules import MAX_SLEEP, Schedules, job_id, next_runs
from agent.core.config import ScheduleEntry
from agent.core.errors import JobConflictError, JobsClosedError


def at(hour: int, minute: int, second: int = 0, day: int = 28) -> float:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=UTC).timestamp()


class TimeUpError(Exception):
    """The fake time reached the end of the test."""


class FakeTime:
    def __init__(self, now: float) -> None:
        self.now = now
        self.until = now
        self.sleeps: list[float] = []
        # sleep number (1-based) -> extra seconds that pass during it (host suspended)
        self.jumps: dict[int, float] = {}

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= MAX_SLEEP == 60, seconds
        self.sleeps.append(seconds)
        assert len(self.sleeps) < 100_000, "the schedule loop makes no progress"
        if self.now + seconds > self.until:
            raise TimeUpError
        self.now += seconds + self.jumps.get(len(self.sleeps), 0.0)


class MemoryStore:
    def __init__(self, slots: dict[str, float] | None = None) -> None:
        self.slots = dict(slots or {})
        self.writes: list[tuple[str, float]] = []

    async def last_slot(self, name: str) -> float | None:
        return self.slots.get(name)

    async def set_last_slot(self, name: str, slot: float) -> None:
        self.slots[name] = slot
        self.writes.append((name, slot))


class MemorySink:
    """Like agent.control.jobs.Jobs as the schedules see it: one job per id."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        # (job id, clock at submission, created)
        self.submissions: list[tuple[str, float, bool]] = []
        self.closed_until = 0.0

    async def submit(self, request: JobRequest, *, source: str) -> tuple[Job, bool]:
        assert request.id is not None
        if self.clock() < self.closed_until:
            raise JobsClosedError("the agent is stopping")
        existing = self.jobs.get(request.id)
        if existing is not None:
            if existing.request.fingerprint() != request.fingerprint():
                raise JobConflictError(f"job {request.id} exists with another request")
            self.submissions.append((request.id, self.clock(), False))
            return existing, False
        job = Job(
            id=request.id,
            request=request,
            state=JobState.QUEUED,
            source=source,
            created_at=self.clock(),
        )
        self.jobs[job.id] = job
        self.submissions.append((job.id, self.clock(), True))
        return job, True

    def subscribe(self, listener: JobListener) -> Callable[[], None]:
        return lambda: None

    def ids(self) -> list[str]:
        return [job_id for job_id, _, _ in self.submissions]


def entry(name: str, cron: str, domains: Iterable[str] = ("*",), **extra: Any) -> ScheduleEntry:
    return ScheduleEntry.model_validate(
        {"name": name, "cron": cron, "domains": list(domains), **extra}
    )


def make(
    entries: list[ScheduleEntry],
    time: FakeTime,
    store: MemoryStore,
    sink: MemorySink,
    running: Iterable[str],
) -> Schedules:
    names = list(running)
    return Schedules(
        entries, sink, store, lambda: names, clock=time.clock, sleep=time.sleep, tz=UTC
    )


async def run_until(schedules: Schedules, time: FakeTime, until: float) -> None:
    time.until = until
    with pytest.raises(TimeUpError):
        await schedules.run()


async def test_a_new_schedule_records_its_latest_slot_and_waits_for_the_next() -> None:
    time = FakeTime(at(10, 7, 30))
    store = MemoryStore()
    sink = MemorySink(time.clock)
    schedules = make([entry("quarter", "*/15 * * * *")], time, store, sink, ["web1"])

    await run_until(schedules, time, at(10, 14, 59))
    assert sink.submissions == []
    assert store.writes == [("quarter", at(10, 0))]

    await run_until(schedules, time, at(10, 15, 30))
    assert sink.submissions == [("sched:quarter:20261128T1015Z:web1", at(10, 15), True)]
    assert store.slots == {"quarter": at(10, 15)}


async def test_a_slot_submits_one_backup_per_matching_running_domain() -> None:
    time = FakeTime(at(10, 14))
    store = MemoryStore({"nightly": at(10, 0)})
    sink = MemorySink(time.clock)
    running = ["web1", "web2", "db1", "db10", "Web3", "other"]
    schedule = entry("nightly", "*/15 * * * *", ["web*", "db1", "mail", "cache-*"], mode="full")
    schedule = schedule.model_copy(update={"keep_last": 3})
    schedules = make([schedule], time, store, sink, running)

    with structlog.testing.capture_logs(
        processors=[structlog.contextvars.merge_contextvars]
    ) as logs:
        await run_until(schedules, time, at(10, 16))

    # fnmatchcase: "Web3" does not match "web*", "db10" does not match "db1".
    assert sink.ids() == [
        "sched:nightly:20261128T1015Z:db1",
        "sched:nightly:20261128T1015Z:web1",
        "sched:nightly:20261128T1015Z:web2",
    ]
    for job in sink.jobs.values():
        assert job.source == "schedule"
        assert job.created_at == at(10, 15)
        assert job.request.kind == "backup"
        assert job.request.mode == "full"
        assert job.request.keep_last == 3
    assert {job.domain for job in sink.jobs.values()} == {"db1", "web1", "web2"}
    assert store.slots == {"nightly": at(10, 15)}

    skipped = [e for e in logs if e["event"] == "scheduled domain is not running; skipped"]
    assert [(e["domain"], e["log_level"], e["schedule"]) for e in skipped] == [
        ("mail", "info", "nightly")
    ]
    unmatched = [e for e in logs if e["event"] == "no running domain matches the pattern"]
    assert [(e["pattern"], e["log_level"]) for e in unmatched] == [("cache-*", "info")]


async def test_keep_last_unset_stays_unset_and_mode_defaults_to_auto() -> None:
    time = FakeTime(at(10, 14))
    store = MemoryStore({"s": at(10, 0)})
    sink = MemorySink(time.clock)
    schedules = make([entry("s", "*/15 * * * *")], time, store, sink, ["vm"])
    await run_until(schedules, time, at(10, 16))
    (job,) = sink.jobs.values()
    assert job.request.mode == "auto"
    assert job.request.keep_last is None


async def test_agent_down_across_five_slots_runs_once_for_the_latest() -> None:
    # Slots 10:15, 10:30, 10:45, 11:00 and 11:15 passed while the agent was down.
    time = FakeTime(at(11, 20))
    store = MemoryStore({"quarter": at(10, 0)})
    sink = MemorySink(time.clock)
    schedules = make([entry("quarter", "*/15 * * * *")], time, store, sink, ["web1"])

    await run_until(schedules, time, at(11, 29))
    assert sink.submissions == [("sched:quarter:20261128T1115Z:web1", at(11, 20), True)]
    assert store.writes == [("quarter", at(11, 15))]

    await run_until(schedules, time, at(11, 31))
    assert sink.ids()[1:] == ["sched:quarter:20261128T1130Z:web1"]


async def test_a_restart_before_the_slot_was_recorded_creates_no_duplicate() -> None:
    # The agent submitted web1's backup for 10:15 and stopped before recording the slot.
    time = FakeTime(at(10, 16))
    store = MemoryStore({"quarter": at(10, 0)})
    sink = MemorySink(time.clock)
    earlier = JobRequest(
        id="sched:quarter:20261128T1015Z:web1", kind="backup", domain="web1", mode="auto"
    )
    await sink.submit(earlier, source="schedule")
    sink.submissions.clear()
    schedules = make([entry("quarter", "*/15 * * * *")], time, store, sink, ["web1", "web2"])

    await run_until(schedules, time, at(10, 17))
    assert sink.submissions == [
        ("sched:quarter:20261128T1015Z:web1", at(10, 16), False),
        ("sched:quarter:20261128T1015Z:web2", at(10, 16), True),
    ]
    assert sorted(sink.jobs) == [
        "sched:quarter:20261128T1015Z:web1",
        "sched:quarter:20261128T1015Z:web2",
    ]
    assert store.slots == {"quarter": at(10, 15)}


async def test_two_schedules_interleave() -> None:
    time = FakeTime(at(10, 0, 30))
    store = MemoryStore()
    sink = MemorySink(time.clock)
    tens = entry("tens", "*/10 * * * *", ["web*"])
    quarters = entry("quarters", "*/15 * * * *", ["db*"])
    schedules = make([tens, quarters], time, store, sink, ["web1", "db1"])

    await run_until(schedules, time, at(11, 0, 30))
    expected = [
        ("tens", "1010", "web1"),
        ("quarters", "1015", "db1"),
        ("tens", "1020", "web1"),
        ("tens", "1030", "web1"),
        ("quarters", "1030", "db1"),
        ("tens", "1040", "web1"),
        ("quarters", "1045", "db1"),
        ("tens", "1050", "web1"),
        ("tens", "1100", "web1"),
        ("quarters", "1100", "db1"),
    ]
    assert sink.submissions == [
        (
            f"sched:{name}:20261128T{hhmm}Z:{domain}",
            at(int(hhmm[:2]), int(hhmm[2:])),
            True,
        )
        for name, hhmm, domain in expected
    ]
    assert store.slots == {"tens": at(11, 0), "quarters": at(11, 0)}


async def test_sleeps_are_at_most_a_minute_and_a_suspend_is_noticed() -> None:
    time = FakeTime(at(10, 1))
    time.jumps = {3: 2 * 3600}  # the host sleeps for two hours during the third sleep
    store = MemoryStore({"quarter": at(10, 0)})
    sink = MemorySink(time.clock)
    schedules = make([entry("quarter", "*/15 * * * *")], time, store, sink, ["web1"])

    await run_until(schedules, time, at(12, 14))
    # Awake at 12:04: the missed slots (10:15 ... 12:00) give one run, for 12:00, at once.
    assert sink.submissions == [("sched:quarter:20261128T1200Z:web1", at(12, 4), True)]
    assert max(time.sleeps) == 60


async def test_a_daily_schedule_runs_at_its_time_after_many_short_sleeps() -> None:
    time = FakeTime(at(10, 0))
    store = MemoryStore()
    sink = MemorySink(time.clock)
    schedules = make([entry("nightly", "0 3 * * *")], time, store, sink, ["web1"])

    await run_until(schedules, time, at(3, 0, 30, day=29))
    assert sink.submissions == [("sched:nightly:20261129T0300Z:web1", at(3, 0, day=29), True)]
    assert len(time.sleeps) >= 17 * 60  # 17 hours in steps of at most a minute


async def test_a_refused_job_is_logged_and_the_others_go_on() -> None:
    time = FakeTime(at(10, 14))
    store = MemoryStore({"quarter": at(10, 0)})
    sink = MemorySink(time.clock)
    # The id is taken by a job with another request: the sink refuses it (conflict).
    taken = JobRequest(
        id="sched:quarter:20261128T1015Z:web1", kind="backup", domain="web1", mode="full"
    )
    await sink.submit(taken, source="http")
    sink.submissions.clear()
    schedules = make([entry("quarter", "*/15 * * * *")], time, store, sink, ["web1", "web2"])

    with structlog.testing.capture_logs() as logs:
        await run_until(schedules, time, at(10, 31))

    assert sink.ids() == [
        "sched:quarter:20261128T1015Z:web2",
        "sched:quarter:20261128T1030Z:web1",
        "sched:quarter:20261128T1030Z:web2",
    ]
    failed = [e for e in logs if e["event"] == "scheduled backup not submitted"]
    assert [(e["domain"], e["code"], e["log_level"]) for e in failed] == [
        ("web1", "job-conflict", "error")
    ]
    assert store.writes == [("quarter", at(10, 15)), ("quarter", at(10, 30))]


async def test_while_jobs_are_closed_the_slot_is_tried_again() -> None:
    time = FakeTime(at(10, 14))
    store = MemoryStore({"quarter": at(10, 0)})
    sink = MemorySink(time.clock)
    sink.closed_until = at(10, 15, 30)
    schedules = make([entry("quarter", "*/15 * * * *")], time, store, sink, ["web1"])

    with structlog.testing.capture_logs() as logs:
        await run_until(schedules, time, at(10, 15, 20))
    assert sink.submissions == []
    assert store.writes == []
    assert any(e["event"] == "agent takes no jobs; slot tried again" for e in logs)

    # Jobs are taken again: the slot is handled at the next look, within a minute.
    await run_until(schedules, time, at(10, 17))
    ((submitted, when, created),) = sink.submissions
    assert submitted == "sched:quarter:20261128T1015Z:web1"
    assert created
    assert at(10, 15, 30) <= when <= at(10, 16, 30)
    assert store.slots == {"quarter": at(10, 15)}


async def test_unusual_names_still_give_valid_distinct_job_ids() -> None:
    long_name = "n" * 100
    odd_domains = ["web server", "données", "x" * 41, "a:b", "web1"]
    ids = [job_id(long_name, at(10, 15), domain) for domain in odd_domains]
    for value in ids:
        assert JOB_ID_RE.fullmatch(value), value
    assert len(set(ids)) == len(ids)
    assert ids[-1].endswith(":20261128T1015Z:web1")
    assert job_id(long_name, at(10, 15), "web server") == ids[0]
    assert job_id(long_name, at(10, 30), "web server") != ids[0]

    # and such domains are backed up like any other
    time = FakeTime(at(10, 14))
    store = MemoryStore({long_name: at(10, 0)})
    sink = MemorySink(time.clock)
    schedules = make([entry(long_name, "*/15 * * * *")], time, store, sink, odd_domains)
    await run_until(schedules, time, at(10, 16))
    assert sorted(sink.ids()) == sorted(ids)
    assert {job.domain for job in sink.jobs.values()} == set(odd_domains)


def test_next_runs_gives_the_next_slot_of_each_schedule() -> None:
    entries = [entry("tens", "*/10 * * * *"), entry("nightly", "0 3 * * *")]
    assert next_runs(entries, at(10, 5), tz=UTC) == {
        "tens": at(10, 10),
        "nightly": at(3, 0, day=29),
    }
    # strictly after: at a slot, the next one
    assert next_runs(entries, at(10, 10), tz=UTC)["tens"] == at(10, 20)
    # cron times are read in the given time zone
    plus_two = timezone(timedelta(hours=2))
    assert next_runs(entries, at(10, 5), tz=plus_two)["nightly"] == at(1, 0, day=29)
