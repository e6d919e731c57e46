"""The checksum new backups record: a sum over the 64 KiB windows of a range.

A range's checksum (algorithm :data:`ALGORITHM`) is the sum, modulo 2**128, of one term
per :data:`WINDOW` of the disk it touches (windows are aligned to the disk, not to the
range; at a range's edges a window is cut to the part inside it, a *fragment*):

    term(fragment) = 0                                       if it is all zeroes
                   = XXH3-128(XXH3-128(bytes) || le64(offset))  otherwise

where ``offset`` is the fragment's first byte in the disk, and the 128-bit digests are
taken big-endian, as ``xxhsum -H2`` prints them. Why a sum:

- it costs what hashing the bytes costs (one XXH3 pass, plus a 24-byte hash per 64 KiB);
- the offset is in every term: data written at the wrong place does not match;
- zeroes add nothing, so a hole or a run written as zeroes has the checksum 0 whatever
  its length, without hashing it;
- above all, it can be updated: when a newer backup overwrites part of an older range,
  the merged range's checksum is the old one minus the terms of the windows that changed
  (their old bytes) plus their new terms. Retention so hashes again what changed, not
  the older range (:mod:`agent.repository.coverage`).

Anyone can recompute it from an image with a few lines of Python and the ``xxhash``
package (the README shows them).
"""

from __future__ import annotations

import functools
from typing import Final

import xxhash

ALGORITHM: Final = "xxh3-128-w64k"
WINDOW: Final = 64 << 10
MODULUS: Final = 1 << 128
ZERO: Final = "0" * 32  # the checksum of any run of zeroes

_hash = xxhash.xxh3_128_digest
_term_of = xxhash.xxh3_128_intdigest


@functools.cache
def _zeroes(length: int) -> bytes:
    return bytes(length)


@functools.cache
def _zero_digest(length: int) -> bytes:
    return _hash(bytes(length))


def _term(digest: bytes, length: int, offset: int) -> int:
    if digest == _zero_digest(length):
        return 0
    return _term_of(digest + offset.to_bytes(8, "little"))


def window_sum(data: bytes | bytearray | memoryview, offset: int) -> int:
    """The sum of the terms of ``data``, the bytes at ``offset`` in the disk."""
    view = memoryview(data)
    total, start, size = 0, 0, len(view)
    while start < size:
        end = min(size, (offset + start) // WINDOW * WINDOW + WINDOW - offset)
        total += _term(_hash(view[start:end]), end - start, offset + start)
        start = end
    return total % MODULUS


def as_hex(value: int) -> str:
    return f"{value % MODULUS:032x}"


def window_digest(data: bytes | bytearray | memoryview, offset: int) -> str:
    """The checksum (hex) of ``data``, the bytes at ``offset`` in the disk."""
    return as_hex(window_sum(data, offset))


def updated(checksum: str, old: int, new: int) -> str:
    """A range's checksum once windows whose terms summed to ``old`` now sum to ``new``."""
    return as_hex(int(checksum, 16) - old + new)


class WindowDigest:
    """:func:`window_digest` of bytes fed in order, in chunks of any size, from
    ``offset`` on (what verify reads)."""

    def __init__(self, offset: int) -> None:
        self._position = offset
        self._total = 0
        self._current: xxhash.xxh3_128 | None = None  # a window begun in an earlier chunk
        self._begun = offset

    def update(self, data: bytes | bytearray | memoryview, /) -> None:
        view = memoryview(data)
        while view:
            room = WINDOW - self._position % WINDOW
            take = min(room, len(view))
            if self._current is None and take == room:  # a whole fragment in this chunk
                self._total += _term(_hash(view[:take]), take, self._position)
            else:
                if self._current is None:
                    self._current, self._begun = xxhash.xxh3_128(), self._position
                self._current.update(view[:take])
                if take == room:  # the window is complete
                    length = self._position + take - self._begun
                    self._total += _term(self._current.digest(), length, self._begun)
                    self._current = None
            self._position += take
            view = view[take:]

    def zeros(self, length: int) -> None:
        """As :meth:`update` with ``length`` zero bytes, without hashing whole windows
        of them (they add nothing)."""
        while length:
            room = WINDOW - self._position % WINDOW
            take = min(room, length)
            if self._current is None and take == room:  # whole windows: skipped at once
                take = length - (length - room) % WINDOW
                self._position += take
            else:
                self.update(_zeroes(take))
            length -= take

    def hexdigest(self) -> str:
        if self._current is not None:  # the range ends inside a window
            length = self._position - self._begun
            self._total += _term(self._current.digest(), length, self._begun)
            self._current = None
        return as_hex(self._total)
