"""The handshake: fixed-newstyle option haggling up to the transmission phase.

:class:`_Handshake` checks the server's greeting, asks for structured replies and the
wanted metadata contexts, then sends NBD_OPT_GO (or, on servers too old for it,
NBD_OPT_EXPORT_NAME) and returns what was agreed as :class:`_Negotiated`. A refused
option or a missing context is an :class:`NbdConnectionError` naming the export; a
server that speaks something else than NBD is an :class:`NbdProtocolError`. The length
of every reply is checked against a small cap before it is read.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from agent.core.errors import NbdConnectionError, NbdProtocolError
from agent.nbd.pump import _Wire
from agent.nbd.wire import (
    _GREETING,
    _INFO_BLOCK_SIZE,
    _INFO_EXPORT,
    _OPTION,
    _OPTION_NAMES,
    _OPTION_REPLY,
    _REP_ERRORS,
    _U16,
    _U32,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY,
    OPTION_REPLY_MAGIC,
    REP_ACK,
    REP_ERR_BIT,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_META_CONTEXT,
)

_DEFAULT_MAX_BLOCK: Final = 32 * 1024 * 1024
"""Without ``NBD_INFO_BLOCK_SIZE``, the spec's interoperable maximum for reads/writes."""

_MAX_OPTION_REPLY: Final = 64 * 1024
"""Handshake replies are small (infos, context names, error strings of <= 4096 bytes)."""

_MAX_NAME: Final = 4096
"""The spec's hard limit for strings (export names, context names)."""


@dataclass(frozen=True, slots=True)
class _Negotiated:
    """What the handshake agreed: structured replies or not, the export's size and
    transmission flags, its (minimum, preferred, maximum) block sizes, and the granted
    meta contexts by name with the ids the server chose."""

    structured: bool
    size: int
    flags: int
    block_sizes: tuple[int, int, int]
    contexts: Mapping[str, int]


class _Handshake:
    """Fixed-newstyle negotiation: structured replies, meta contexts, then NBD_OPT_GO."""

    def __init__(self, wire: _Wire, export: str) -> None:
        self._wire = wire
        self._server = wire.server
        self._export = export
        self._name = export.encode()
        if len(self._name) > _MAX_NAME:
            raise ValueError(f"export name longer than {_MAX_NAME} bytes: {export[:64]!r}...")

    async def run(self, contexts: Sequence[str]) -> _Negotiated:
        no_zeroes = await self._greeting()
        structured = await self._structured_reply()
        granted: dict[str, int] = {}
        if contexts:
            if not structured:
                raise self._error(
                    f"cannot use meta contexts {list(contexts)}: server has no structured replies"
                )
            granted = await self._set_meta_context(contexts)
        size, flags, block_sizes = await self._go(no_zeroes)
        return _Negotiated(structured, size, flags, block_sizes, MappingProxyType(granted))

    def soft_abort(self) -> None:
        """Tell the server we are leaving (NBD_OPT_ABORT), without waiting for its reply."""
        with contextlib.suppress(Exception):
            self._wire.write(_OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
            assert self._wire.transport is not None
            self._wire.transport.close()  # flushes the abort first

    def _error(self, what: str) -> NbdConnectionError:
        return NbdConnectionError(
            f"{self._server}: export {self._export!r}: {what}", server=self._server
        )

    def _protocol(self, what: str) -> NbdProtocolError:
        return NbdProtocolError(f"{self._server}: handshake: {what}", server=self._server)

    async def _greeting(self) -> bool:
        """Check the server's magic numbers; send our flags; return whether NO_ZEROES is on."""
        magic, ihaveopt, flags = _GREETING.unpack(await self._wire.read_exact(_GREETING.size))
        if magic != NBDMAGIC:
            raise self._protocol(f"bad magic 0x{magic:016x} (not an NBD server?)")
        if ihaveopt != IHAVEOPT:
            raise self._protocol(f"bad option magic 0x{ihaveopt:016x} (oldstyle server?)")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise self._error("server does not support fixed-newstyle negotiation")
        client_flags = FLAG_C_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES and FLAG_C_NO_ZEROES)
        self._wire.write(_U32.pack(client_flags))
        return bool(client_flags & FLAG_C_NO_ZEROES)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._wire.write(_OPTION.pack(IHAVEOPT, option, len(data)) + data)

    async def _reply(self, option: int) -> tuple[int, bytes]:
        """One option reply: (reply type, data); the length is checked before reading."""
        raw = await self._wire.read_exact(_OPTION_REPLY.size)
        magic, echoed, reply_type, length = _OPTION_REPLY.unpack(raw)
        if magic != OPTION_REPLY_MAGIC:
            raise self._protocol(f"bad option reply magic 0x{magic:016x}")
        if echoed != option:
            raise self._protocol(f"reply for option {echoed} while waiting for option {option}")
        if length > _MAX_OPTION_REPLY:
            raise self._protocol(f"option reply of {length} bytes (limit {_MAX_OPTION_REPLY})")
        return reply_type, await self._wire.read_exact(length)

    def _refused(self, option: int, reply_type: int, data: bytes) -> NbdConnectionError:
        name = _REP_ERRORS.get(reply_type, f"error 0x{reply_type:08x}")
        message = data.decode("utf-8", "replace")
        detail = f"{name}: {message}" if message else name
        return self._error(f"{_OPTION_NAMES.get(option, option)} refused: {detail}")

    async def _structured_reply(self) -> bool:
        self._send_option(OPT_STRUCTURED_REPLY)
        reply_type, data = await self._reply(OPT_STRUCTURED_REPLY)
        if reply_type == REP_ACK:
            return True
        if reply_type == REP_ERR_UNSUP:
            return False
        if reply_type & REP_ERR_BIT:
            raise self._refused(OPT_STRUCTURED_REPLY, reply_type, data)
        raise self._protocol(f"unexpected reply type {reply_type} to NBD_OPT_STRUCTURED_REPLY")

    async def _set_meta_context(self, contexts: Sequence[str]) -> dict[str, int]:
        # Data: u32 export name length, export name, u32 number of queries,
        #       then per query: u32 length, query string.
        # Replies: one NBD_REP_META_CONTEXT (u32 context id, name) per granted context,
        #          then NBD_REP_ACK.
        data = bytearray(_U32.pack(len(self._name)) + self._name + _U32.pack(len(contexts)))
        for query in contexts:
            encoded = query.encode()
            if len(encoded) > _MAX_NAME:
                raise ValueError(f"meta context name longer than {_MAX_NAME} bytes")
            data += _U32.pack(len(encoded)) + encoded
        self._send_option(OPT_SET_META_CONTEXT, bytes(data))
        granted: dict[str, int] = {}
        while True:
            reply_type, payload = await self._reply(OPT_SET_META_CONTEXT)
            if reply_type == REP_ACK:
                break
            if reply_type & REP_ERR_BIT:
                raise self._refused(OPT_SET_META_CONTEXT, reply_type, payload)
            if reply_type != REP_META_CONTEXT or len(payload) < 5:
                raise self._protocol(f"bad reply (type {reply_type}) to NBD_OPT_SET_META_CONTEXT")
            (context_id,) = _U32.unpack_from(payload)
            granted[self._decode(payload[4:], "meta context name")] = context_id
        missing = [c for c in contexts if c not in granted]
        if missing:
            raise self._error(f"server does not offer meta context(s) {missing}")
        return granted

    def _decode(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode()
        except UnicodeDecodeError as exc:
            raise self._protocol(f"{what} is not UTF-8") from exc

    async def _go(self, no_zeroes: bool) -> tuple[int, int, tuple[int, int, int]]:
        # Data: u32 name length, name, u16 number of info requests, u16 info types...
        # Replies: NBD_REP_INFO* then NBD_REP_ACK (transmission starts), or an error.
        self._send_option(
            OPT_GO,
            _U32.pack(len(self._name)) + self._name + _U16.pack(1) + _U16.pack(INFO_BLOCK_SIZE),
        )
        export: tuple[int, int] | None = None
        block_sizes = (1, 4096, _DEFAULT_MAX_BLOCK)
        while True:
            reply_type, data = await self._reply(OPT_GO)
            if reply_type == REP_ACK:
                break
            if reply_type == REP_ERR_UNSUP:
                return (*await self._export_name(no_zeroes), block_sizes)
            if reply_type & REP_ERR_BIT:
                raise self._refused(OPT_GO, reply_type, data)
            if reply_type != REP_INFO or len(data) < 2:
                raise self._protocol(f"bad reply (type {reply_type}) to NBD_OPT_GO")
            (info,) = _U16.unpack_from(data)
            if info == INFO_EXPORT:
                export = self._info_export(data)
            elif info == INFO_BLOCK_SIZE:
                block_sizes = self._info_block_size(data)
        if export is None:
            raise self._protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
        return (*export, block_sizes)

    def _info_export(self, data: bytes) -> tuple[int, int]:
        if len(data) != _INFO_EXPORT.size:
            raise self._protocol(f"NBD_INFO_EXPORT of {len(data)} bytes")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return size, flags

    def _info_block_size(self, data: bytes) -> tuple[int, int, int]:
        if len(data) != _INFO_BLOCK_SIZE.size:
            raise self._protocol(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
        _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
        power_of_two = minimum > 0 and minimum & (minimum - 1) == 0
        if not power_of_two or minimum > 65536 or preferred < minimum or maximum < minimum:
            raise self._protocol(f"nonsensical block sizes {minimum}/{preferred}/{maximum}")
        return minimum, preferred, maximum

    async def _export_name(self, no_zeroes: bool) -> tuple[int, int]:
        # Old servers: C: NBD_OPT_EXPORT_NAME with the name; S: u64 size, u16 flags,
        # 124 zero bytes unless NO_ZEROES. An unknown export just closes the connection.
        self._send_option(OPT_EXPORT_NAME, self._name)
        raw = await self._wire.read_exact(10 if no_zeroes else 134)
        size, flags = struct.unpack_from(">QH", raw)
        return size, flags
