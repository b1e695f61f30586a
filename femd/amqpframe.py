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

``BoundedAssembler`` replaces a channel's body assembler: a body longer than
the link's limit (``max_envelope_bytes``) is counted and dropped frame by
frame as it arrives, never held, and delivered empty with its declared size
in the properties' ``too_large``. So a broker that accepts large messages
(RabbitMQ 3.x: up to 128 MiB by default) costs femd one frame, not a message.
"""

from __future__ import annotations

import struct
from typing import Final

import pika.channel
import pika.exceptions
import pika.frame
import pika.spec

__all__ = ["BoundedAssembler", "GuardedProperties", "install"]

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
    # The declared size of a body dropped for being over the link's limit.
    too_large: int | None = None

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


class BoundedAssembler(pika.channel.ContentFrameAssembler):  # type: ignore[misc]
    """pika's body assembler, holding no body longer than *limit* bytes."""

    def __init__(self, limit: int) -> None:
        """Assemble bodies of up to *limit* bytes; drop longer ones as they come."""
        super().__init__()
        self._limit = limit

    def _handle_body_frame(
        self, body_frame: pika.frame.Body
    ) -> tuple[pika.frame.Method, pika.frame.Header, bytes] | None:
        header = self._header_frame
        if header is None or header.body_size <= self._limit:
            done: tuple[pika.frame.Method, pika.frame.Header, bytes] | None
            done = super()._handle_body_frame(body_frame)
            return done
        # SECURITY: counted, not kept; pika's own checks on the count stay.
        self._seen_so_far += len(body_frame.fragment)
        if self._seen_so_far > header.body_size:
            raise pika.exceptions.BodyTooLongError(self._seen_so_far, header.body_size)
        if self._seen_so_far < header.body_size:
            return None
        header.properties.too_large = header.body_size
        content: tuple[pika.frame.Method, pika.frame.Header, bytes] = self._finish()
        return content
