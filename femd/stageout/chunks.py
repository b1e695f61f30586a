"""An archive in chunks: cutting it (node side) and reassembling it (receiver).

Owns the chunk size and count, the order-free reassembly into one file with
its byte bounds, and the final size and SHA-256 check against what the node
announced. Does not pack or unpack archives, nor talk to the broker.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from femd.errors import OutputTooLargeError, StageOutError, cut
from femd.stageout.flags import COPY_BYTES, READ_FLAGS

__all__ = ["CHUNK_BYTES", "Reassembler", "chunk_count", "iter_chunks", "verify_file"]

CHUNK_BYTES: Final = 256 * 1024


def chunk_count(size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Return how many chunks ``iter_chunks`` yields for *size* bytes (at least 1)."""
    if chunk_bytes <= 0 or size < 0:
        raise ValueError("outputs: chunk size must be positive and size not negative")
    return max(1, -(-size // chunk_bytes))


def iter_chunks(path: Path, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the archive at *path* in chunks of *chunk_bytes* (the last shorter).

    An empty file yields one empty chunk, so that ``chunk_count`` chunks always
    come out.

    Raises:
        StageOutError: the file cannot be read.
    """
    chunk_count(0, chunk_bytes)  # validates chunk_bytes
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as e:
        raise StageOutError(f"outputs: cannot read {cut(path)}: {cut(e)}") from e
    with os.fdopen(fd, "rb") as src:
        first = True
        while True:
            try:
                data = src.read(chunk_bytes)
            except OSError as e:
                raise StageOutError(
                    f"outputs: cannot read {cut(path)}: {cut(e)}"
                ) from e
            if not data and not first:
                return
            first = False
            yield data
            if len(data) < chunk_bytes:
                return


class Reassembler:
    """Writes the chunks of one announced archive into a file, in any order.

    Each chunk goes to its place in *part* as it comes (``pwrite``), so memory
    stays at one chunk whatever the archive's size, and several receivers
    (processes) may fill the same file. Non-final chunks all have the same
    length, so a chunk's offset follows from its index and length; an
    ``offset`` the sender states must agree. ``received`` says which chunks
    are already in the file (a receiver resuming after a restart).

    Args:
        part: the file to fill (created 0600 if missing, never via a link).
        sha256: the digest announced for the whole archive.
        size: the announced archive size in bytes.
        chunks: the announced number of chunks.
        max_bytes: the largest archive this receiver accepts.
        received: indexes already written to *part*.

    Raises:
        OutputTooLargeError: the announced size exceeds *max_bytes*.
        StageOutError: the announcement is malformed or *part* cannot be opened.
    """

    def __init__(
        self,
        part: Path,
        *,
        sha256: str,
        size: int,
        chunks: int,
        max_bytes: int,
        received: Iterable[int] = (),
    ) -> None:
        """Check the announcement and open *part*."""
        if len(sha256) != 64 or sha256.strip("0123456789abcdef"):
            raise StageOutError(f"outputs: bad sha256 {cut(sha256)}")
        if size < 0 or chunks < 1 or chunks > max(1, size):
            raise StageOutError(
                f"outputs: bad announcement ({size} bytes in {chunks} chunks)"
            )
        if size > max_bytes:
            raise OutputTooLargeError(
                f"outputs: archive of {size} bytes exceeds {max_bytes} bytes"
            )
        self.part = part
        self.sha256 = sha256
        self.size = size
        self.chunks = chunks
        self.received: set[int] = set(received)
        try:
            self._fd = os.open(
                part, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as e:
            raise StageOutError(f"outputs: cannot write {cut(part)}: {cut(e)}") from e

    def close(self) -> None:
        """Close the file (what was written stays)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def complete(self) -> bool:
        """True once every chunk is in the file."""
        return len(self.received) == self.chunks

    def _offset(self, index: int, length: int, offset: int | None) -> int:
        if index == self.chunks - 1:
            at = self.size - length
            fits = at >= 0
        else:
            at = index * length
            fits = length > 0 and at + length <= self.size
        if not fits:
            raise StageOutError(
                f"outputs: more bytes than announced"
                f" (over {self.size} at chunk {index})"
            )
        if offset is not None and offset != at:
            raise StageOutError(
                f"outputs: chunk {index} at offset {offset}, expected {at}"
            )
        return at

    def feed(
        self, index: int, total: int, data: bytes, offset: int | None = None
    ) -> bool:
        """Write chunk *index* of *total*; a repeated identical chunk is ignored.

        Returns:
            ``complete``.

        Raises:
            StageOutError: wrong total, index or offset, a repeated chunk that
                differs, more bytes than announced, or the file cannot be
                written.
        """
        if total != self.chunks:
            raise StageOutError(
                f"outputs: chunk total mismatch (got {total}, expected {self.chunks})"
            )
        if not 0 <= index < total:
            raise StageOutError(
                f"outputs: chunk index {index} out of range 0..{total - 1}"
            )
        at = self._offset(index, len(data), offset)
        try:
            if index in self.received:
                if os.pread(self._fd, len(data), at) != data:
                    raise StageOutError(
                        f"outputs: chunk {index} differs from an earlier copy"
                    )
                return self.complete
            os.pwrite(self._fd, data, at)
        except OSError as e:
            raise StageOutError(
                f"outputs: cannot write {cut(self.part)}: {cut(e)}"
            ) from e
        self.received.add(index)
        return self.complete

    def sync(self) -> None:
        """Make what was written durable (before acking the chunks).

        Raises:
            StageOutError: fsync failed.
        """
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise StageOutError(
                f"outputs: cannot sync {cut(self.part)}: {cut(e)}"
            ) from e

    def write(self, dest: Path) -> Path:
        """Verify the whole file and move it to *dest* (never replacing one).

        Raises:
            StageOutError: chunks are missing, the size or the SHA-256 differs
                from the announcement, or *dest* cannot be written.
        """
        if not self.complete:
            missing = self.chunks - len(self.received)
            raise StageOutError(f"outputs: {missing} of {self.chunks} chunks missing")
        verify_file(self.part, sha256=self.sha256, size=self.size)
        try:
            os.link(self.part, dest)
            os.unlink(self.part)
        except OSError as e:
            raise StageOutError(f"outputs: cannot write {cut(dest)}: {cut(e)}") from e
        return dest


def verify_file(path: Path, *, sha256: str, size: int) -> None:
    """Check *path* holds exactly *size* bytes whose SHA-256 is *sha256*, streaming.

    Raises:
        StageOutError: it does not, or it cannot be read.
    """
    digest = hashlib.sha256()
    got = 0
    try:
        with path.open("rb") as f:
            while data := f.read(COPY_BYTES):
                got += len(data)
                digest.update(data)
    except OSError as e:
        raise StageOutError(f"outputs: cannot read {cut(path)}: {cut(e)}") from e
    # SECURITY: the announced digest is what the node signed off in its
    # status event; nothing else is unpacked.
    if got != size or digest.hexdigest() != sha256:
        raise StageOutError(
            f"outputs: archive digest mismatch (got {digest.hexdigest()} for {got}"
            f" bytes, expected {sha256} for {size})"
        )
