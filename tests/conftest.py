"""Shared pytest fixtures: the real libvirt daemon, a setup connection and test domains.

Nothing here skips: a test that needs libvirt fails loudly when the daemons cannot be
started, so a broken CI host can never pass by running fewer tests.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from hypothesis import settings

from tests.testbed import daemon
from tests.testbed.domains import DiskSpec, DomainFactory, TestDomain, make_domain

# No per-example deadline: on a loaded machine (two cores, QEMU and libvirtd beside the
# suite) a property test's example can take longer than hypothesis' 200 ms and fail as
# flaky without anything being wrong. pytest-timeout bounds every test instead.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[None]:
    """libvirtd and virtlogd running and ``qemu:///system`` connectable (started if not).

    Daemons this fixture had to start are stopped again at session end; daemons that were
    already running (even if a test restarted them) are left running.
    """
    had_libvirtd = daemon.can_connect()
    had_virtlogd = daemon.virtlogd_pid() is not None
    daemon.ensure_libvirtd()
    yield
    if not had_libvirtd and daemon.libvirtd_pid() is not None:
        daemon.kill_libvirtd(signal.SIGTERM)
    if not had_virtlogd:
        daemon.stop_virtlogd()


@pytest.fixture(autouse=True)
def _libvirt_marker_needs_daemon(request: pytest.FixtureRequest) -> None:
    # Every @pytest.mark.libvirt test needs the daemons, whether it asks for them or not.
    # (A usefixtures mark added at collection time would come too late to count.)
    if request.node.get_closest_marker("libvirt") is not None:
        request.getfixturevalue("libvirtd")


@pytest.fixture
def virt_conn(libvirtd: None) -> Iterator[libvirt.virConnect]:
    """A plain blocking connection for test setup; dead after a libvirtd restart."""
    conn = libvirt.open(daemon.URI)
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


@pytest.fixture
def domain_factory(virt_conn: libvirt.virConnect, tmp_path: Path) -> Iterator[DomainFactory]:
    """``make_domain`` bound to this test; every domain made is removed at teardown."""
    made: list[TestDomain] = []

    def make(
        *, persistent: bool = False, disks: list[DiskSpec] | None = None, start: bool = True
    ) -> TestDomain:
        return make_domain(
            virt_conn,
            tmp_path,
            persistent=persistent,
            disks=disks if disks is not None else [DiskSpec()],
            start=start,
            registry=made,
        )

    try:
        yield make
    finally:
        errors: list[str] = []
        for td in reversed(made):
            try:
                td.cleanup()
            except Exception as exc:  # every domain gets its turn first
                errors.append(str(exc))
        if errors:
            raise RuntimeError("domain_factory teardown: " + "; ".join(errors))
