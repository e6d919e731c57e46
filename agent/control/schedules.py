"""Local cron schedules: backups on a host that has no central scheduler.

Each ``[[schedules]]`` entry (:class:`~agent.core.config.ScheduleEntry`) has a five-field cron
expression, read in the host's time zone, and fnmatch patterns of domain names. A *slot*
is a time the expression matches; a :class:`ScheduleStore` (the job store's SQLite file)
keeps, per schedule, the last slot that was handled.

- **New schedule** (nothing stored): the most recent slot is recorded as handled without
  running it, so adding a schedule does not start backups at once.
- **Missed slots** (agent down, host suspended): when the most recent slot is later than
  the stored one, the schedule runs once, now, for that slot, not once per missed slot.
- **At a slot**: one backup job (``source="schedule"``) per *running* domain matching any
  pattern (case-sensitive), with the entry's mode and keep_last; then the slot is recorded.
  Job ids are deterministic per (schedule, slot, domain), so a restart that handles a slot
  again (stopped between submitting and recording) gets the same jobs back, no duplicates.
  A job the agent refuses is logged and the others go on; while the agent takes no jobs
  (:class:`~agent.core.errors.JobsClosedError`) the slot stays unrecorded and is tried again.
- **Waiting**: one task serves every schedule. It sleeps towards the earliest next slot,
  never more than :data:`MAX_SLEEP` seconds at a time, and then reads the wall clock again,
  so clock changes and suspend/resume are noticed within a minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import UTC, datetime, tzinfo
from fnmatch import fnmatchcase
from typing import Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from croniter import CroniterBadDateError, croniter

from agent.control.job_requests import JobSink, parse_request
from agent.core.config import ScheduleEntry
from agent.core.errors import AgentError, JobError, JobsClosedError
from agent.core.logs import get_logger

log = get_logger("schedules")

#: Longest single sleep, in seconds: the wall clock is read again at least this often.
MAX_SLEEP: Final = 60.0

# Parts of a job id that are used as they are; anything else is replaced by a digest, so
# the id stays within JOB_ID_RE (128 characters, no odd characters).
_PLAIN_PART: Final = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_GLOB_CHARS: Final = frozenset("*?[")


class ScheduleStore(Protocol):
    """Where the last handled slot of each schedule survives restarts (the job store)."""

    async def last_slot(self, name: str) -> float | None:
        """Epoch seconds of the last slot handled for schedule ``name``; None if never.
        Raises JobStoreError when the store cannot be read."""
        ...

    async def set_last_slot(self, name: str, slot: float) -> None:
        """Record ``slot`` (epoch seconds) as handled for schedule ``name``.
        Raises JobStoreError when the store cannot be written."""
        ...


def local_zone() -> tzinfo | None:
    """The host's time zone (``TZ``, else ``/etc/localtime``) as a ZoneInfo.

    None when it cannot be named that way (a POSIX ``TZ`` rule, an unreadable file); the
    schedules then use the C library's offset at each instant they evaluate, which is
    right except for slot computations that span a daylight saving change.
    """
    spec = os.environ.get("TZ")
    try:
        if spec is not None:
            return ZoneInfo(spec.removeprefix(":")) if spec.strip(":") else None
        with open("/etc/localtime", "rb") as file:
            return ZoneInfo.from_file(file, key="localtime")
    except (OSError, ValueError, ZoneInfoNotFoundError):
        return None


def _aware(when: float, tz: tzinfo | None) -> datetime:
    if tz is None:
        return datetime.fromtimestamp(when, UTC).astimezone()
    return datetime.fromtimestamp(when, tz)


def latest_slot(cron: str, now: float, tz: tzinfo | None) -> float | None:
    """The most recent slot of ``cron`` at or before ``now``; None if it has none."""
    try:
        # get_prev is strictly before its start: a slot exactly at `now` is the next one.
        before = croniter(cron, _aware(now, tz)).get_prev(datetime)
        following = croniter(cron, before).get_next(datetime)
    except CroniterBadDateError:  # an expression no date matches, like Feb 30
        return None
    return following.timestamp() if following.timestamp() <= now else before.timestamp()


def next_slot(cron: str, now: float, tz: tzinfo | None) -> float | None:
    """The first slot of ``cron`` strictly after ``now``; None if it has none."""
    try:
        return croniter(cron, _aware(now, tz)).get_next(datetime).timestamp()
    except CroniterBadDateError:
        return None


def next_runs(
    entries: Iterable[ScheduleEntry], now: float, tz: tzinfo | None = None
) -> dict[str, float]:
    """Next slot (epoch seconds) after ``now`` per schedule name, for the status display.

    ``tz`` defaults to the host's time zone; a schedule that never matches is left out.
    """
    zone = tz if tz is not None else local_zone()
    runs: dict[str, float] = {}
    for entry in entries:
        slot = next_slot(entry.cron, now, zone)
        if slot is not None:
            runs[entry.name] = slot
    return runs


def job_id(schedule: str, slot: float, domain: str) -> str:
    """The id of the backup of ``domain`` for ``schedule``'s ``slot``: the same every time.

    Like ``sched:nightly:20261128T0100Z:web01`` (slot in UTC, so the two 01:30 of a
    daylight saving change differ); a name that is long or has other characters is
    replaced by 16 hex digits of its SHA-256.
    """
    stamp = datetime.fromtimestamp(slot, UTC).strftime("%Y%m%dT%H%MZ")
    return f"sched:{_id_part(schedule)}:{stamp}:{_id_part(domain)}"


def _id_part(name: str) -> str:
    if _PLAIN_PART.fullmatch(name):
        return name
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def matching_domains(patterns: Iterable[str], running: Iterable[str]) -> list[str]:
    """The running domains (sorted) whose name matches any of ``patterns``."""
    pattern_list = list(patterns)
    return sorted(name for name in set(running) if any(fnmatchcase(name, p) for p in pattern_list))


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


class Schedules:
    """Runs the local schedules: :meth:`run` submits their backups at their slots."""

    def __init__(
        self,
        entries: Sequence[ScheduleEntry],
        jobs: JobSink,
        store: ScheduleStore,
        running_domains: Callable[[], Collection[str]],
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        tz: tzinfo | None = None,
    ) -> None:
        self._entries = tuple(entries)
        self._jobs = jobs
        self._store = store
        self._running_domains = running_domains
        self._clock = clock
        self._sleep = sleep
        self._tz = tz if tz is not None else local_zone()
        self._last: dict[str, float] = {}

    async def run(self) -> None:
        """Handle every schedule's slots until cancelled; returns at once if there are none."""
        if not self._entries:
            return
        now = self._clock()
        for entry in self._entries:
            await self._load(entry, now)
        while True:
            now = self._clock()
            for entry in self._entries:
                slot = latest_slot(entry.cron, now, self._tz)
                last = self._last.get(entry.name)
                if slot is not None and (last is None or slot > last):
                    await self._handle(entry, slot, now)
            await self._sleep(self._delay(self._clock()))

    async def _load(self, entry: ScheduleEntry, now: float) -> None:
        try:
            last = await self._store.last_slot(entry.name)
        except JobError as exc:
            log.error(
                "could not read the schedule's last slot; taken as new",
                schedule=entry.name,
                error=str(exc),
            )
            last = None
        if last is None:
            # A new schedule waits for its next slot instead of running at once.
            last = latest_slot(entry.cron, now, self._tz)
            if last is None:
                log.warning("schedule never matches a date", schedule=entry.name, cron=entry.cron)
                return
            await self._record(entry.name, last)
            log.info("new schedule recorded, not run now", schedule=entry.name, slot=_iso(last))
        self._last[entry.name] = last

    def _delay(self, now: float) -> float:
        slots = [next_slot(entry.cron, now, self._tz) for entry in self._entries]
        known = [slot for slot in slots if slot is not None]
        if not known:
            return MAX_SLEEP
        return max(0.0, min(MAX_SLEEP, min(known) - now))

    async def _handle(self, entry: ScheduleEntry, slot: float, now: float) -> None:
        with structlog.contextvars.bound_contextvars(schedule=entry.name, slot=_iso(slot)):
            try:
                running = self._running_domains()
            except AgentError as exc:
                log.error("could not list running domains; slot tried again", error=str(exc))
                return
            log.info("schedule slot", late_seconds=round(now - slot, 3))
            self._log_not_running(entry, running)
            try:
                for domain in matching_domains(entry.domains, running):
                    await self._submit(entry, slot, domain)
            except JobsClosedError as exc:
                # The agent is stopping (this task is about to be cancelled) or not ready
                # yet: leave the slot unrecorded, so it runs when jobs are taken again.
                log.warning("agent takes no jobs; slot tried again", error=str(exc))
                return
            await self._record(entry.name, slot)

    def _log_not_running(self, entry: ScheduleEntry, running: Collection[str]) -> None:
        for pattern in entry.domains:
            if any(fnmatchcase(name, pattern) for name in running):
                continue
            if _GLOB_CHARS.isdisjoint(pattern):
                log.info("scheduled domain is not running; skipped", domain=pattern)
            else:
                log.info("no running domain matches the pattern", pattern=pattern)

    async def _submit(self, entry: ScheduleEntry, slot: float, domain: str) -> None:
        """Submit one backup; JobsClosedError goes to the caller, other refusals are logged."""
        wanted = job_id(entry.name, slot, domain)
        body = {
            "id": wanted,
            "kind": "backup",
            "domain": domain,
            "mode": entry.mode,
            "keep_last": entry.keep_last,
        }
        try:
            request = parse_request(body)
            job, created = await self._jobs.submit(request, source="schedule")
        except JobsClosedError:
            raise
        except JobError as exc:
            log.error(
                "scheduled backup not submitted",
                domain=domain,
                job=wanted,
                code=exc.code,
                error=str(exc),
            )
            return
        if created:
            log.info("scheduled backup submitted", domain=domain, job=job.id)
        else:
            log.info("scheduled backup was submitted before", domain=domain, job=job.id)

    async def _record(self, name: str, slot: float) -> None:
        self._last[name] = slot
        try:
            await self._store.set_last_slot(name, slot)
        except JobError as exc:
            # Kept in memory: this run does not repeat the slot; a restart might, and the
            # deterministic job ids make that harmless.
            log.error("could not record the schedule's slot", schedule=name, error=str(exc))
