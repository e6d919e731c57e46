"""The space book (agent.core.space): what running jobs hold, per filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.core.blocking import Filesystem
from agent.core.errors import RepositorySpaceError
from agent.core.space import Need, SpaceBook, measure

MB = 1_000_000


def _repo(free: int, nbytes: int, device: int = 1) -> Need:
    return Need("repository", "/repo", device, free, nbytes)


def test_jobs_are_admitted_together_against_the_same_free_space() -> None:
    book = SpaceBook()
    first = book.reserve("a backup of a", [_repo(100 * MB, 60 * MB)])
    with pytest.raises(RepositorySpaceError) as refused:
        book.reserve("a backup of b", [_repo(100 * MB, 60 * MB)])
    message = str(refused.value)
    assert "repository /repo has 100000000 bytes free" in message
    assert "running jobs hold 60000000 (a backup of a: 60000000)" in message
    assert "a backup of b may need 60000000" in message and "refusing" in message
    assert (refused.value.needed, refused.value.free, refused.value.held) == (
        60 * MB,
        100 * MB,
        60 * MB,
    )
    book.release(first)
    assert book.held(1) == 0
    book.reserve("a backup of b", [_repo(100 * MB, 60 * MB)])


def test_other_filesystems_are_not_counted() -> None:
    book = SpaceBook()
    book.reserve("a backup of a", [_repo(100 * MB, 90 * MB, device=1)])
    book.reserve("a backup of b", [_repo(100 * MB, 90 * MB, device=2)])
    assert (book.held(1), book.held(2)) == (90 * MB, 90 * MB)


def test_needs_on_one_filesystem_add_up_and_a_refusal_holds_nothing() -> None:
    book = SpaceBook()
    scratch = Need("scratch directory", "/scratch", 1, 100 * MB, 60 * MB)
    with pytest.raises(RepositorySpaceError, match=r"\(one filesystem\) have"):
        book.reserve("a backup of a", [scratch, _repo(100 * MB, 60 * MB)])
    assert book.held(1) == 0
    other = Need("repository", "/repo", 2, 100 * MB, 60 * MB)
    book.reserve("a backup of a", [scratch, other])
    assert (book.held(1), book.held(2)) == (60 * MB, 60 * MB)


async def test_measure_does_not_make_a_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "mnt" / "repo"
    need = await measure(Filesystem(root, timeout=5), "repository", 5)
    assert not (tmp_path / "mnt").exists()
    assert need.device == os.stat(tmp_path).st_dev and need.free > 0
    assert need.path == str(root)
