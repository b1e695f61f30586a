"""Message properties femd cannot decode cost that message, never the link.

pika decodes a content header's properties (``BasicProperties``) while it reads
frames off the socket: headers nested thousands of tables deep raise
``RecursionError`` there, an unknown field type ``InvalidFieldTypeException``,
and either one tears the whole connection down. The broker then hands the same
message back, again and again, until its delivery limit dead-letters it along
with whatever else was unacked at the time.

``install()`` registers ``GuardedProperties`` for the Basic class in pika's
frame decoder: when the properties cannot be decoded, the header table is cut
out and the rest decoded alone, and the properties say why in ``problem``.
The link then rejects that one message (dead-lettered by the broker) and goes
on. femd never reads message headers: an envelope carries all it needs.
"""

from __future__ import annotations

import struct
from typing import Final

import pika.spec

__all__ = ["GuardedProperties", "install"]

_FLAGS: Final = struct.Struct(">H")
_TABLE_LEN: Final = struct.Struct(">I")


def _without_headers(encoded: bytes, offset: int) -> bytes | None:
    """Return the properties with the header table removed, or None."""
    (flags,) = _FLAGS.unpack_from(encoded, offset)
    spec = pika.spec.BasicProperties
    if flags & 1 or not flags & spec.FLAG_HEADERS:
        return None  # a continuation word femd does not know, or no headers
    at = offset + 2
    for flag in (spec.FLAG_CONTENT_TYPE, spec.FLAG_CONTENT_ENCODING):
        if flags & flag:
            at += 1 + encoded[at]  # a short string: one length byte
    (size,) = _TABLE_LEN.unpack_from(encoded, at)
    end = at + 4 + size
    if end > len(encoded):
        return None
    head = _FLAGS.pack(flags & ~spec.FLAG_HEADERS) + encoded[offset + 2 : at]
    return head + encoded[end:]


class GuardedProperties(pika.spec.BasicProperties):  # type: ignore[misc]
    """``BasicProperties`` whose undecodable header table is dropped, not raised.

    ``problem`` is None for a message decoded as sent; else one line saying
    why its headers were dropped.
    """

    problem: str | None = None

    def decode(self, encoded: bytes, offset: int = 0) -> GuardedProperties:
        """Decode like pika; on failure decode again without the headers.

        Raises:
            Exception: what pika raises when the rest cannot be decoded either.
        """
        try:
            super().decode(encoded, offset)
        except Exception as e:
            why = f"{type(e).__name__}: {str(e)[:60]}".rstrip(": ")
            try:
                rest = _without_headers(encoded, offset)
            except (struct.error, IndexError):
                rest = None
            if rest is None:
                raise
            self.__init__()  # type: ignore[misc]
            super().decode(rest, 0)
            self.problem = f"AMQP headers cannot be decoded ({why})"
        return self


def install() -> None:
    """Make pika's frame decoder build ``GuardedProperties`` (idempotent)."""
    pika.spec.props[pika.spec.BasicProperties.INDEX] = GuardedProperties
