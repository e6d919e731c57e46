"""The backup repository: qcow2 chains and their manifests on a filesystem.

``store``      :class:`~agent.repository.store.Repository`, the public surface
``manifest``   what one backup holds (frozen dataclasses) and its JSON file, read by pydantic
``windows``    the checksum of a range and the digest of a point: sums over 64 KiB windows
``blocks``     a disk stored as what changed: its blocks' checksums along a chain
``coverage``   the checksums a merged image keeps, and those updated from what changed
``layout``     the directories and files on disk, durable file operations, staging, publishing
``listing``    a domain's backups read with the damaged ones named; the tip a plan starts from
``layers``     qemu-img, bounded, and what it says about one image layer (header, extents)
``verify``     images checked against their manifests; which disks a damage breaks
``restore``    one disk at one backup written out as a standalone image, checked by its digest
``retention``  the oldest backups dropped, crash-safely, every kept one restoring as before
``marker``     which repository a path holds: its marker file, the id the agent records

May import: :mod:`agent.core`, :mod:`agent.qemu`. Not :mod:`agent.virt` or
:mod:`agent.nbd` (siblings), nor any layer above.
"""
