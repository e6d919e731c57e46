"""The NBD wire format: the protocol's constants and struct layouts, and the value types
the handshake and block status produce (:class:`ExportInfo`, :class:`Extent`).

Each part of the protocol is described next to its constants, after the NBD protocol
specification (``doc/proto.md`` of the NetworkBlockDevice/nbd project); all integers
are big-endian. Limits the client imposes on what a server may send live with the code
that enforces them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

# --- Handshake (fixed newstyle) ----------------------------------------------------------
#
# S: u64 NBDMAGIC, u64 IHAVEOPT, u16 handshake flags
# C: u32 client flags
# Then option haggling; every option and every reply to it:
# C: u64 IHAVEOPT, u32 option, u32 data length, data
# S: u64 OPTION_REPLY_MAGIC, u32 option (echoed), u32 reply type, u32 data length, data
# ending with NBD_OPT_GO, whose final NBD_REP_ACK starts the transmission phase.

NBDMAGIC: Final = 0x4E42444D41474943  # ASCII "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # ASCII "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9

_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_C_NO_ZEROES: Final = 1 << 1

# Options.
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8
OPT_SET_META_CONTEXT: Final = 10

# Option reply types; errors have bit 31 set and may carry a message string.
REP_ACK: Final = 1
REP_INFO: Final = 3
REP_META_CONTEXT: Final = 4
REP_ERR_BIT: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_ERR_BIT | 1
_REP_ERRORS: Final = {
    REP_ERR_BIT | 1: "NBD_REP_ERR_UNSUP",
    REP_ERR_BIT | 2: "NBD_REP_ERR_POLICY",
    REP_ERR_BIT | 3: "NBD_REP_ERR_INVALID",
    REP_ERR_BIT | 4: "NBD_REP_ERR_PLATFORM",
    REP_ERR_BIT | 5: "NBD_REP_ERR_TLS_REQD",
    REP_ERR_BIT | 6: "NBD_REP_ERR_UNKNOWN",
    REP_ERR_BIT | 7: "NBD_REP_ERR_SHUTDOWN",
    REP_ERR_BIT | 8: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    REP_ERR_BIT | 9: "NBD_REP_ERR_TOO_BIG",
}
_OPTION_NAMES: Final = {
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

# NBD_REP_INFO payload: u16 info type, then per type:
#   NBD_INFO_EXPORT (0):     u64 export size, u16 transmission flags         (length 12)
#   NBD_INFO_BLOCK_SIZE (3): u32 minimum, u32 preferred, u32 maximum block   (length 14)
INFO_EXPORT: Final = 0
INFO_BLOCK_SIZE: Final = 3
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")

# Transmission flags (u16, from NBD_INFO_EXPORT or the NBD_OPT_EXPORT_NAME reply).
TFLAG_HAS_FLAGS: Final = 1 << 0
TFLAG_READ_ONLY: Final = 1 << 1
TFLAG_SEND_FLUSH: Final = 1 << 2
TFLAG_SEND_FUA: Final = 1 << 3
TFLAG_ROTATIONAL: Final = 1 << 4
TFLAG_SEND_TRIM: Final = 1 << 5
TFLAG_SEND_WRITE_ZEROES: Final = 1 << 6
TFLAG_SEND_DF: Final = 1 << 7
TFLAG_CAN_MULTI_CONN: Final = 1 << 8
TFLAG_SEND_CACHE: Final = 1 << 10
TFLAG_SEND_FAST_ZERO: Final = 1 << 11

# --- Transmission ------------------------------------------------------------------------
#
# C: request:  u32 REQUEST_MAGIC, u16 command flags, u16 type, u64 handle,
#              u64 offset, u32 length, then `length` bytes of data for NBD_CMD_WRITE
# S: simple reply: u32 SIMPLE_REPLY_MAGIC, u32 error, u64 handle
#              (followed by `length` bytes of data for a successful NBD_CMD_READ, only
#              when structured replies were not negotiated)
# S: structured reply chunk: u32 STRUCTURED_REPLY_MAGIC, u16 flags, u16 type,
#              u64 handle, u32 payload length, payload; NBD_REPLY_FLAG_DONE ends a reply.
# Replies may come in any order and chunks of different replies may interleave.

REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

_REQUEST = struct.Struct(">IHHQQI")  # 28 bytes
_SIMPLE_REPLY = struct.Struct(">IIQ")  # 16 bytes
_CHUNK_HEAD = struct.Struct(">IHHQI")  # 20 bytes: the first 16 are read before the magic is known
_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")  # offset, hole size
_ERROR = struct.Struct(">IH")  # errno, message length
_DESCRIPTOR = struct.Struct(">II")  # extent length, status flags

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7
_COMMAND_NAMES: Final = {
    CMD_READ: "read",
    CMD_WRITE: "write",
    CMD_FLUSH: "flush",
    CMD_WRITE_ZEROES: "write-zeroes",
    CMD_BLOCK_STATUS: "block-status",
}

# Command flags.
CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# Structured reply chunk flags and types. Error types have bit 15 set and start with
# u32 errno, u16 message length, message; NBD_REPLY_TYPE_ERROR_OFFSET adds a u64 offset.
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0  # no payload; only as the final chunk
REPLY_TYPE_OFFSET_DATA: Final = 1  # u64 offset, data (>= 1 byte)
REPLY_TYPE_OFFSET_HOLE: Final = 2  # u64 offset, u32 hole size: reads as zeroes
REPLY_TYPE_BLOCK_STATUS: Final = 5  # u32 context id, then (u32 length, u32 flags)+
REPLY_TYPE_ERROR_BIT: Final = 1 << 15
REPLY_TYPE_ERROR: Final = REPLY_TYPE_ERROR_BIT | 1
REPLY_TYPE_ERROR_OFFSET: Final = REPLY_TYPE_ERROR_BIT | 2

# Error values (reply `error` fields and error chunks).
NBD_EPERM: Final = 1
NBD_EIO: Final = 5
NBD_ENOMEM: Final = 12
NBD_EINVAL: Final = 22
NBD_ENOSPC: Final = 28
NBD_EOVERFLOW: Final = 75
NBD_ENOTSUP: Final = 95
NBD_ESHUTDOWN: Final = 108
_ERRNO_NAMES: Final = {
    NBD_EPERM: "EPERM",
    NBD_EIO: "EIO",
    NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL",
    NBD_ENOSPC: "ENOSPC",
    NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP",
    NBD_ESHUTDOWN: "ESHUTDOWN",
}

# Extent flags: base:allocation, and QEMU's qemu:dirty-bitmap:NAME contexts.
STATE_HOLE: Final = 1 << 0
STATE_ZERO: Final = 1 << 1
STATE_DIRTY: Final = 1 << 0

BASE_ALLOCATION: Final = "base:allocation"


# --- Public value types ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake said about the export.

    ``max_block`` is the largest read/write this client will send: the server's maximum,
    capped at :data:`agent.nbd.client.MAX_PAYLOAD` (32 MiB when the server gave no block
    sizes).
    ``meta_contexts`` maps each granted metadata context to the id the server chose.
    """

    name: str
    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int
    meta_contexts: Mapping[str, int] = field(default_factory=dict, hash=False)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FUA)

    @property
    def can_write_zeroes(self) -> bool:
        return bool(self.flags & TFLAG_SEND_WRITE_ZEROES)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & TFLAG_CAN_MULTI_CONN)

    @property
    def can_fast_zero(self) -> bool:
        return bool(self.flags & TFLAG_SEND_FAST_ZERO)


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with one status.

    ``flags`` depends on the context: for ``base:allocation`` 1 = HOLE, 2 = ZERO; for
    ``qemu:dirty-bitmap:NAME`` 1 = DIRTY.
    """

    offset: int
    length: int
    flags: int
