"""The agent's own asyncio NBD client, written to the NBD protocol specification.

``client``     the public surface: :class:`NbdClient`, :func:`connect_many`
``extents``    block status as a stream of extents over a whole range
``session``    the transmission phase: requests in flight, replies demultiplexed to them
``handshake``  fixed-newstyle option haggling, up to the transmission phase
``pump``       the byte pump: a socket's bytes straight into the reader's buffers
``wire``       the wire format: constants, struct layouts, ``ExportInfo``, ``Extent``

Names with a leading underscore are private to this package: its modules share them,
nothing outside it uses them.

May import: :mod:`agent.core`, :mod:`agent.qemu`. Not :mod:`agent.virt` or
:mod:`agent.repository` (siblings), nor any layer above.
"""
