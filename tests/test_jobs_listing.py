"""``GET /v1/jobs``: filtered in SQL before the limit, paged newest first (a real job
store in SQLite behind the API; no libvirt)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.control.api import ApiParts, make_app
from agent.control.gate import Gate
from agent.control.job_requests import Job, JobState, parse_request
from agent.control.job_store import JobStore
from agent.control.metrics import Metrics
from agent.core.config import BackupSection
from agent.core.errors import JobNotFoundError

UUID = "4f6b2a1e-0000-4000-8000-000000000001"


class _Domains:
    """The one live domain, ``db1``, known by name and UUID."""

    def find(self, domain: str) -> Any:
        if domain in ("db1", UUID):
            return type("Info", (), {"name": "db1", "uuid": UUID})()
        return None


class _Jobs:
    def __init__(self, store: JobStore) -> None:
        self.find = store.find
        self._store = store

    async def get(self, job_id: str) -> Job:
        job = await self._store.get(job_id)
        if job is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return job


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    opened = await JobStore.open(tmp_path / "jobs.sqlite")
    try:
        yield opened
    finally:
        await opened.close()


async def _add(store: JobStore, number: int, domain: str, state: JobState) -> None:
    request = parse_request({"kind": "reconcile", "domain": domain})
    job = Job(id=f"job-{number:05}", request=request, state=state, source="http", created_at=1.0)
    await store.insert_or_get(job)


async def _client(store: JobStore) -> TestClient[Any, Any]:
    parts: Any = ApiParts(
        jobs=_Jobs(store),  # type: ignore[arg-type]
        chains=None,  # type: ignore[arg-type]
        domains=_Domains(),  # type: ignore[arg-type]
        connection=None,  # type: ignore[arg-type]
        repository=None,  # type: ignore[arg-type]
        metrics=Metrics(),
        backup=BackupSection(),
    )
    return TestClient(TestServer(make_app(parts, Gate(token=None, hosts=None))))


async def test_a_domain_filter_finds_jobs_older_than_a_thousand_others(store: JobStore) -> None:
    """Five jobs of db1 (by name and by UUID), then 1,200 of another domain: the filter
    is in SQL, so db1's are found (filtered after a LIMIT 1000, they were not)."""
    for number in range(5):
        await _add(store, number, "db1" if number % 2 else UUID, JobState.SUCCEEDED)
    for number in range(5, 1205):
        await _add(store, number, "web", JobState.FAILED)
    async with await _client(store) as client:
        response = await client.get("/v1/jobs", params={"domain": "db1", "limit": "1000"})
        body = await response.json()
        assert response.status == 200, body
        assert [j["id"] for j in body["jobs"]] == [f"job-{n:05}" for n in (4, 3, 2, 1, 0)]
        assert body["next"] is None
        by_uuid = await (await client.get("/v1/jobs", params={"domain": UUID})).json()
        assert by_uuid["jobs"] == body["jobs"]
        state = await (await client.get("/v1/jobs", params={"state": "succeeded"})).json()
        assert len(state["jobs"]) == 5


async def test_jobs_are_paged_newest_first_to_the_last(store: JobStore) -> None:
    for number in range(250):
        await _add(store, number, "web", JobState.SUCCEEDED)
    seen: list[str] = []
    async with await _client(store) as client:
        params: dict[str, str] = {}
        pages = 0
        while True:
            body = await (await client.get("/v1/jobs", params=params)).json()
            seen += [j["id"] for j in body["jobs"]]
            pages += 1
            if body["next"] is None:
                break
            assert body["next"] == body["jobs"][-1]["id"]
            params = {"before": body["next"]}
        assert pages == 3  # 100 + 100 + 50 (the default page)
        assert seen == [f"job-{n:05}" for n in reversed(range(250))]
        for bad in ("0", "1001", "-1", "ten"):
            response = await client.get("/v1/jobs", params={"limit": bad})
            error = (await response.json())["error"]
            assert (response.status, error["field"]) == (400, "limit"), bad
        response = await client.get("/v1/jobs", params={"before": "../x"})
        assert response.status == 400
        # A cursor whose job is gone (forgotten meanwhile): said, not an empty last page.
        response = await client.get("/v1/jobs", params={"before": "job-99999"})
        assert response.status == 404
