"""The agent's own asyncio NBD client, written to the NBD protocol specification.

May import: :mod:`agent.core`, :mod:`agent.qemu`. Not :mod:`agent.virt` or
:mod:`agent.repository` (siblings), nor any layer above.
"""
