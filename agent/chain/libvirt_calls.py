"""The blocking libvirt calls on a domain's checkpoints.

Each takes the ``virConnect`` and the domain's UUID and runs in a worker thread through
:meth:`agent.virt.connection.VirtConnection.call`; only :class:`agent.chain.checkpoints.Chains`
calls them.
"""

from __future__ import annotations

from typing import Any

import libvirt

from agent.chain.rules import parent_in_xml

_REDEFINE = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
VALIDATE = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE  # an ``extra_flags`` of redefine


def _dom(conn: Any, uuid: str) -> Any:
    return conn.lookupByUUIDString(uuid)


def create(conn: Any, uuid: str, xml: str) -> None:
    _dom(conn, uuid).checkpointCreateXML(xml, 0)


def full_xml(conn: Any, uuid: str, name: str) -> str:
    """The checkpoint's XML with its ``<domain>``, as the ledger records it."""
    return str(_dom(conn, uuid).checkpointLookupByName(name).getXMLDesc(0))


def redefine(conn: Any, uuid: str, xml: str, extra_flags: int) -> None:
    _dom(conn, uuid).checkpointCreateXML(xml, _REDEFINE | extra_flags)


def parents(conn: Any, uuid: str) -> dict[str, str | None]:
    """Every checkpoint libvirt has of the domain, with its parent."""
    found: dict[str, str | None] = {}
    for cp in _dom(conn, uuid).listAllCheckpoints(0):
        xml = cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
        found[cp.getName()] = parent_in_xml(xml)
    return found


def delete(conn: Any, uuid: str, name: str) -> bool:
    """Delete the checkpoint; True if only its metadata could be deleted."""
    try:
        cp = _dom(conn, uuid).checkpointLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return False
        raise
    try:
        cp.delete(0)
    except libvirt.libvirtError:
        # The bitmap is gone from the image (removed by hand, never written), or the
        # domain is stopped (libvirt then refuses): only the metadata goes here.
        cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        return True
    return False
