"""libvirt: the connection, its events, and what the agent knows of each domain.

``connection``    the one libvirt connection: keepalive, reconnect, ``call()`` in a thread
``libvirt_loop``  libvirt's event loop on asyncio (libvirtaio)
``events``        **where events come in**: libvirt's callbacks as typed, frozen events
``inventory``     a domain's disks from its XML, disk identity, why a disk is left out
``domains``       the live inventory and its resynchronisation after a reconnect

May import: :mod:`agent.core`, :mod:`agent.qemu`. Not :mod:`agent.nbd` or
:mod:`agent.repository` (siblings), nor any layer above.
"""
