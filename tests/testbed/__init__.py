"""Test bed for the real-libvirt tests: the host's daemons and throw-away QEMU domains.

``daemon`` starts/kills/restarts libvirtd and virtlogd; ``domains`` builds ``lbat-*``
domains with fresh disk images and drives them (guest writes, hot-plug, crashes).
"""

from .daemon import (
    URI,
    can_connect,
    ensure_libvirtd,
    kill_libvirtd,
    libvirtd_pid,
    restart_libvirtd,
    start_libvirtd,
    virtlogd_pid,
)
from .domains import (
    DiskSpec,
    DomainFactory,
    MiB,
    TestDomain,
    create_image,
    image_has_pattern,
    kvm_available,
    make_domain,
)

__all__ = [
    "URI",
    "DiskSpec",
    "DomainFactory",
    "MiB",
    "TestDomain",
    "can_connect",
    "create_image",
    "ensure_libvirtd",
    "image_has_pattern",
    "kill_libvirtd",
    "kvm_available",
    "libvirtd_pid",
    "make_domain",
    "restart_libvirtd",
    "start_libvirtd",
    "virtlogd_pid",
]
