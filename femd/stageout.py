"""Stage-out: a task's output directory as one bounded, checksummed archive.

Owns packing (node side), chunking, and reassembly plus safe unpacking
(``femd watch`` side). The output directory was writable by an untrusted task,
so packing never follows a link: every name is opened relative to an already
opened directory with ``O_NOFOLLOW`` and checked with ``lstat``/``fstat``, and
anything but plain directories and single-link regular files is refused
(DESIGN "Launchers": one writable output dir). Sizes are checked from metadata
before a byte is read. The archive is a deterministic tar.gz, so the same
outputs always have the same SHA-256. Does not publish chunks (the broker
module does) nor decide the limits (the policy does).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import logging
import os
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Final

import msgspec

from femd.errors import OutputTooLargeError, StageOutError, UnsafeOutputPathError, cut

__all__ = [
    "ARCHIVE_SLACK_BYTES",
    "CHUNK_BYTES",
    "Packed",
    "Reassembler",
    "chunk_count",
    "iter_chunks",
    "pack_outputs",
    "unpack_outputs",
    "verify_file",
]

logger = logging.getLogger(__name__)

CHUNK_BYTES: Final = 256 * 1024
# The archive may exceed the content by this much (tar headers, gzip framing):
# a task cannot smuggle a large archive out as very many empty files.
ARCHIVE_SLACK_BYTES: Final = 1024 * 1024
_MAX_DEPTH: Final = 256
_COPY_BYTES: Final = 1024 * 1024
# Outputs this large are sampled to decide whether to compress them at all.
_SAMPLE_FROM_BYTES: Final = 16 * 1024 * 1024
_SAMPLE_FILES: Final = 8
_SAMPLE_BYTES: Final = 256 * 1024
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
)


class Packed(msgspec.Struct, frozen=True):
    """A packed output archive, as announced in the ``outputs`` event field."""

    path: Path
    sha256: str
    bytes: int
    files: int
    content_bytes: int


class _Entry(msgspec.Struct, frozen=True):
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    executable: bool
    dev: int
    ino: int


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


class _Scan:
    """Walks the output tree by directory fds, never following a link."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self.entries: list[_Entry] = []

    def walk(self, dir_fd: int, prefix: tuple[str, ...]) -> None:
        if len(prefix) > _MAX_DEPTH:
            raise UnsafeOutputPathError(
                f"outputs: {cut('/'.join(prefix))} nests too deeply"
            )
        with os.scandir(dir_fd) as it:
            names = sorted(entry.name for entry in it)
        for name in names:
            parts = (*prefix, name)
            rel = "/".join(parts)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError as e:
                raise UnsafeOutputPathError(
                    f"outputs: {cut(rel)}: name is not UTF-8"
                ) from e
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                self.entries.append(_Entry(parts, True, 0, True, st.st_dev, st.st_ino))
                fd = _open_dir(name, dir_fd, st, rel)
                try:
                    self.walk(fd, parts)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode):
                # SECURITY: a hard link could name a file the task cannot read
                # itself but we can; refuse it rather than ship it.
                if st.st_nlink > 1:
                    raise UnsafeOutputPathError(f"outputs: {cut(rel)} is a hard link")
                self.total += st.st_size
                # Size from metadata, before reading: a sparse 10 GiB file
                # costs nothing to refuse.
                if self.total > self.max_bytes:
                    raise OutputTooLargeError(
                        f"outputs: more than {self.max_bytes} bytes"
                        f" (got at least {self.total} at {cut(rel)})"
                    )
                executable = bool(st.st_mode & 0o111)
                self.entries.append(
                    _Entry(parts, False, st.st_size, executable, st.st_dev, st.st_ino)
                )
            else:
                # SECURITY: symlinks, devices, fifos and sockets never leave.
                raise UnsafeOutputPathError(
                    f"outputs: {cut(rel)} is a {_kind(st.st_mode)}"
                )


def _open_dir(name: str, dir_fd: int, st: os.stat_result, rel: str) -> int:
    """Open a subdirectory seen by ``lstat`` and check it is still that one."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    got = os.fstat(fd)
    if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise UnsafeOutputPathError(f"outputs: {cut(rel)} changed while packing")
    return fd


class _Sink:
    """Hashes, counts and caps what gzip writes, then passes it to the file."""

    def __init__(self, out: IO[bytes], cap: int) -> None:
        self.out = out
        self.cap = cap
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes, /) -> int:
        self.size += len(data)
        if self.size > self.cap:
            raise OutputTooLargeError(f"outputs: archive exceeds {self.cap} bytes")
        self.digest.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    """A header with everything but name, type, size and x bit normalized."""
    info = tarfile.TarInfo("/".join(entry.parts))
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    else:
        info.type = tarfile.REGTYPE
        info.size = entry.size
        info.mode = 0o755 if entry.executable else 0o644
    return info


def _open_file(root_fd: int, entry: _Entry) -> IO[bytes]:
    """Open a scanned file by walking its path with ``O_NOFOLLOW`` at each step."""
    rel = "/".join(entry.parts)
    fd = os.dup(root_fd)
    try:
        for part in entry.parts[:-1]:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        file_fd = os.open(entry.parts[-1], _READ_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    st = os.fstat(file_fd)
    if (
        not stat.S_ISREG(st.st_mode)
        or (st.st_dev, st.st_ino) != (entry.dev, entry.ino)
        or st.st_nlink != 1
        or st.st_size != entry.size
    ):
        os.close(file_fd)
        raise UnsafeOutputPathError(f"outputs: {cut(rel)} changed while packing")
    return os.fdopen(file_fd, "rb")


def pack_outputs(output_dir: Path, dest: Path, *, max_bytes: int) -> Packed:
    """Pack *output_dir* into a deterministic tar.gz at *dest*.

    Entries are sorted by path; mtime, owner and group are zeroed; modes are
    0644/0755 for files, 0755 for directories; gzip level 1, or 0 (stored)
    for large outputs whose sample does not compress (model weights); the
    gzip header has mtime 0 and no name. The same outputs always give the
    same bytes.

    Args:
        output_dir: the task's output directory (not a symlink).
        dest: the archive to write (outside *output_dir*; replaced if present).
        max_bytes: cap on the sum of the regular files' sizes; the archive
            itself may exceed it by at most ``ARCHIVE_SLACK_BYTES``.

    Returns:
        The archive's path, SHA-256, size, file count and content size.

    Raises:
        UnsafeOutputPathError: a symlink, hard link, device, fifo, socket, a
            name that is not UTF-8, or a file that changed while packing;
            the message names the relative path.
        OutputTooLargeError: the content or the archive exceeds the caps.
        StageOutError: the directory cannot be read or the archive written.
    """
    try:
        out_real = output_dir.resolve(strict=True)
        if dest.parent.resolve().is_relative_to(out_real):
            raise StageOutError(
                f"outputs: archive {cut(dest)} is inside the output dir"
            )
        root_fd = os.open(output_dir, _DIR_FLAGS)
    except OSError as e:
        raise StageOutError(f"outputs: cannot open {cut(output_dir)}: {cut(e)}") from e
    try:
        scan = _Scan(max_bytes)
        try:
            scan.walk(root_fd, ())
        except OSError as e:
            raise StageOutError(
                f"outputs: cannot read {cut(output_dir)}: {cut(e)}"
            ) from e
        entries = sorted(scan.entries, key=lambda e: tuple(p.encode() for p in e.parts))
        level = _compression_level(root_fd, entries)
        sink = _write_archive(
            root_fd, entries, dest, max_bytes + ARCHIVE_SLACK_BYTES, level
        )
    finally:
        os.close(root_fd)
    files = sum(1 for e in entries if not e.is_dir)
    packed = Packed(dest, sink.digest.hexdigest(), sink.size, files, scan.total)
    logger.info(
        "outputs: packed %d files, %d bytes into %s (%d bytes, sha256 %s)",
        files,
        scan.total,
        dest,
        sink.size,
        packed.sha256,
    )
    return packed


def _compression_level(root_fd: int, entries: list[_Entry]) -> int:
    """Return gzip level 1, or 0 (stored) if a sample of the content will not shrink.

    Model weights and other binary outputs barely compress, and deflating a
    checkpoint costs minutes; text compresses well and cheaply. The sample
    (the start of the largest files) is a function of the content, so the
    archive stays deterministic.
    """
    files = sorted((e for e in entries if not e.is_dir), key=lambda e: -e.size)
    total = sum(e.size for e in files)
    if total < _SAMPLE_FROM_BYTES:
        return 1
    sample = bytearray()
    for entry in files[:_SAMPLE_FILES]:
        with _open_file(root_fd, entry) as src:
            sample += src.read(_SAMPLE_BYTES)
    squeezed = len(zlib.compress(bytes(sample), 1))
    return 0 if squeezed > 0.9 * len(sample) else 1


def _write_archive(
    root_fd: int, entries: list[_Entry], dest: Path, cap: int, level: int
) -> _Sink:
    """Write the archive; on any error remove what was written."""
    try:
        out_fd = os.open(
            dest,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except OSError as e:
        raise StageOutError(f"outputs: cannot write {cut(dest)}: {cut(e)}") from e
    try:
        with os.fdopen(out_fd, "wb") as out:
            sink = _Sink(out, cap)
            with (
                gzip.GzipFile(
                    filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=level
                ) as gz,
                tarfile.TarFile(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for entry in entries:
                    if entry.is_dir:
                        tar.addfile(_tarinfo(entry))
                        continue
                    with _open_file(root_fd, entry) as src:
                        tar.addfile(_tarinfo(entry), src)
            out.flush()
            os.fsync(out.fileno())
    except BaseException as e:
        _unlink_quietly(dest)
        if isinstance(e, OSError):
            raise StageOutError(f"outputs: cannot pack {cut(dest)}: {cut(e)}") from e
        raise
    return sink


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError as e:
        logger.warning("outputs: could not remove %s: %s", path, e)


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
        fd = os.open(path, _READ_FLAGS)
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
            while data := f.read(_COPY_BYTES):
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


def _member_parts(name: str) -> tuple[str, ...]:
    parts = tuple(name.split("/"))
    # SECURITY: only plain relative names; never absolute, `.`/`..` or empty.
    if (
        not name
        or name.startswith("/")
        or "\0" in name
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise UnsafeOutputPathError(f"outputs: unsafe name {cut(name)} in archive")
    return parts


def _open_parents(root_fd: int, parts: tuple[str, ...]) -> int:
    """Create and open the directories *parts* under *root_fd*, never via a link."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def unpack_outputs(archive: Path, dest: Path, *, max_bytes: int) -> list[str]:
    """Extract *archive* into *dest*, accepting only directories and regular files.

    Args:
        archive: a tar.gz, normally written by ``Reassembler.write``.
        dest: an existing or new directory; existing names are never replaced.
        max_bytes: cap on the total size of the extracted files.

    Returns:
        The relative paths of the extracted files, in archive order.

    Raises:
        UnsafeOutputPathError: a link, device, fifo, sparse or other special
            member; an absolute, empty, ``.`` or ``..`` name; or a name
            extracted twice.
        OutputTooLargeError: the files exceed *max_bytes*.
        StageOutError: the archive is corrupt or *dest* cannot be written.
    """
    written: list[str] = []
    try:
        dest.mkdir(mode=0o755, exist_ok=True)
        root_fd = os.open(dest, _DIR_FLAGS)
    except OSError as e:
        raise StageOutError(f"outputs: cannot create {cut(dest)}: {cut(e)}") from e
    total = 0
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                parts = _member_parts(member.name)
                if member.isdir():
                    os.close(_open_parents(root_fd, parts))
                    continue
                if not member.isreg() or member.issparse():
                    raise UnsafeOutputPathError(
                        f"outputs: {cut(member.name)} in archive is not a file"
                        " or directory"
                    )
                total += member.size
                if total > max_bytes:
                    raise OutputTooLargeError(
                        f"outputs: archive content exceeds {max_bytes} bytes"
                        f" (at {cut(member.name)})"
                    )
                src = tar.extractfile(member)
                if src is None:
                    raise RuntimeError("outputs: tarfile gave no data for a file")
                _extract_file(root_fd, parts, member, src)
                written.append(member.name)
    except FileExistsError as e:
        raise UnsafeOutputPathError(
            f"outputs: {cut(os.fsdecode(e.filename or ''))} extracted twice"
        ) from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise StageOutError(f"outputs: corrupt archive {cut(archive)}: {cut(e)}") from e
    except OSError as e:
        raise StageOutError(f"outputs: cannot unpack {cut(archive)}: {cut(e)}") from e
    finally:
        os.close(root_fd)
    return written


def _extract_file(
    root_fd: int, parts: tuple[str, ...], member: tarfile.TarInfo, src: IO[bytes]
) -> None:
    parent = _open_parents(root_fd, parts[:-1])
    try:
        perm = 0o755 if member.mode & 0o111 else 0o644
        fd = os.open(parts[-1], _CREATE_FLAGS, perm, dir_fd=parent)
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), perm)
        left = member.size
        while left > 0:
            data = src.read(min(left, _COPY_BYTES))
            if not data:
                raise StageOutError(f"outputs: {cut(member.name)} is truncated")
            out.write(data)
            left -= len(data)
