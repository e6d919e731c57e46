"""Block status as extents: :func:`extents` covers a whole range by looping
:meth:`NbdClient.block_status`, whose answers may stop short of what was asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

from agent.nbd.client import NbdClient
from agent.nbd.wire import Extent

_STATUS_STEP: Final = 1 << 31
"""How much :func:`extents` asks for per block-status request (fits the u32 length)."""


async def extents(
    client: NbdClient, context: str, offset: int = 0, length: int | None = None
) -> AsyncIterator[Extent]:
    """Every extent of ``context`` in [offset, offset+length) (default: to the end of the
    export), in order, as the server reported them (nothing merged); loops block_status.
    """
    end = client.info.size if length is None else offset + length
    pos = offset
    while pos < end:
        got = await client.block_status(pos, min(end - pos, _STATUS_STEP), context)
        for extent in got:
            yield extent
        pos = got[-1].offset + got[-1].length
