"""A copy's progress reports are throttled, and the last one always passes (pure logic)."""

from __future__ import annotations

from agent.backup.progress import throttled


def test_reports_at_most_once_per_interval_and_always_the_end() -> None:
    now = [0.0]
    seen: list[tuple[int, int]] = []
    report = throttled(lambda done, total: seen.append((done, total)), 0.1, clock=lambda: now[0])
    for done in range(1, 11):  # ten runs within 0.1 s: the first one only
        now[0] += 0.009
        report(done, 20)
    assert seen == [(1, 20)]
    now[0] += 0.02  # 0.1 s after the first report
    report(11, 20)
    assert seen[-1] == (11, 20)
    report(12, 20)  # right after: dropped
    assert seen[-1] == (11, 20)
    report(20, 20)  # the end passes however soon it comes
    assert seen == [(1, 20), (11, 20), (20, 20)]


def test_the_total_growing_as_disks_start_does_not_end_the_reports() -> None:
    now = [0.0]
    seen: list[tuple[int, int]] = []
    report = throttled(lambda done, total: seen.append((done, total)), 0.1, clock=lambda: now[0])
    report(10, 10)  # the first disk is done; the second's block status is not known yet
    report(15, 30)  # within the interval, not the end: dropped
    now[0] += 0.1
    report(20, 30)
    report(30, 30)
    assert seen == [(10, 10), (20, 30), (30, 30)]
