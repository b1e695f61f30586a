"""A tar stream parsed with bounded memory: what a hostile sender cannot inflate.

Python's ``tarfile`` reads a pax or GNU long-name header's whole declared size
into memory, follows chains of such headers by recursion, and keeps every
member it has read: a stream written by a task could make femd hold gigabytes
or crash its reader. ``open_stream`` gives a ``tarfile`` reader that refuses,
before reading them, an extended header over ``MAX_HEADER`` bytes, more than
``MAX_CHAIN`` of them before one member, global pax headers and sparse files
(none of which the output step's ``tar -cf`` writes), and forgets each member
once the next is read. ``Budget`` caps the bytes read from the stream itself.
Refusals raise ``RefusedError`` (a ``tarfile.TarError``). Imported lazily: an
idle agent does not hold the tar modules.
"""

from __future__ import annotations

import tarfile
from typing import IO, Final, cast

__all__ = [
    "MAX_CHAIN",
    "MAX_HEADER",
    "PER_MEMBER",
    "SLACK",
    "Budget",
    "RefusedError",
    "open_stream",
]

# The largest pax or GNU long-name header: far above PATH_MAX (4096).
MAX_HEADER: Final = 64 * 1024
# Extended headers before one member (GNU: a long link and a long name; pax: one).
MAX_CHAIN: Final = 4
# Stream bytes allowed beyond the file bytes: a fixed part (the end-of-archive
# record and padding) plus a part per member (its header, a long-name header
# for a PATH_MAX name, the padding of its data).
SLACK: Final = 1024 * 1024
PER_MEMBER: Final = 8 * 1024

_EXTENDED: Final = {
    tarfile.GNUTYPE_LONGNAME: "GNU long-name",
    tarfile.GNUTYPE_LONGLINK: "GNU long-link",
    tarfile.XHDTYPE: "pax",
    tarfile.SOLARIS_XHDTYPE: "pax",
}


class RefusedError(tarfile.TarError):
    """The stream holds what a bounded reader does not parse (one line)."""


class Budget:
    """A byte stream that raises once more than its allowance has been read."""

    def __init__(self, stream: IO[bytes], allowance: int) -> None:
        """Read from *stream*, at most *allowance* bytes until ``grant()``."""
        self._stream = stream
        self.allowance = allowance
        self.read_bytes = 0

    def grant(self, more: int) -> None:
        """Allow *more* bytes to be read."""
        self.allowance += more

    def read(self, size: int = -1) -> bytes:
        """Read up to *size* bytes (``tarfile`` asks in records).

        Raises:
            RefusedError: the stream went past its allowance.
        """
        data = self._stream.read(size)
        self.read_bytes += len(data)
        if self.read_bytes > self.allowance:
            raise RefusedError(f"the stream is longer than {self.allowance} bytes")
        return data


class _Header(tarfile.TarInfo):
    """A member header whose extended headers are checked before they are read."""

    def _proc_member(self, tar: _Reader) -> tarfile.TarInfo:
        # tarfile's documented hook for a subclass; each extended header read
        # before the next member passes here before its data is read.
        kind = _EXTENDED.get(self.type)
        if kind is not None:
            tar.chain += 1
            if tar.chain > MAX_CHAIN:
                raise RefusedError(
                    f"more than {MAX_CHAIN} extended headers before one member"
                )
            if self.size > MAX_HEADER:
                raise RefusedError(
                    f"a {kind} header of {self.size} bytes (at most {MAX_HEADER})"
                )
        elif self.type == tarfile.XGLTYPE:
            raise RefusedError("a global pax header")
        elif self.type == tarfile.GNUTYPE_SPARSE:
            raise RefusedError("a sparse file")
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return member

    # pax sparse formats 0.0, 0.1 and 1.0 (1.0 reads its map off the stream).
    def _proc_gnusparse_00(self, *_: object) -> None:
        raise RefusedError("a sparse file")

    _proc_gnusparse_01 = _proc_gnusparse_00
    _proc_gnusparse_10 = _proc_gnusparse_00


class _Reader(tarfile.TarFile):
    """A stream reader that keeps no member but the last one."""

    chain = 0  # extended headers read since the last member
    members: list[tarfile.TarInfo]  # tarfile's own list (typeshed omits it)

    def next(self) -> tarfile.TarInfo | None:
        """The next member, or None at the end of the archive."""
        self.chain = 0
        self.members.clear()  # the stream is read once: nothing looks back
        return super().next()


def open_stream(budget: Budget) -> tarfile.TarFile:
    """A ``tarfile`` stream reader (mode ``r|``) over *budget*; read it with ``next()``.

    Raises:
        tarfile.TarError: not a tar stream, or refused (``RefusedError``).
    """
    return _Reader.open(fileobj=cast("IO[bytes]", budget), mode="r|", tarinfo=_Header)
