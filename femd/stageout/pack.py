"""Packing a task's output directory (node side) into a deterministic tar.gz.

Owns the link-safe walk of the untrusted output tree, the size caps checked
from metadata, and the archive's exact bytes. Does not chunk or send it
(``femd.stageout.chunks`` and the broker do).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import msgspec

from femd.errors import OutputTooLargeError, StageOutError, UnsafeOutputPathError, cut
from femd.stageout.flags import DIR_FLAGS, READ_FLAGS

if TYPE_CHECKING:
    import tarfile

__all__ = ["ARCHIVE_SLACK_BYTES", "Packed", "is_empty", "pack_outputs"]

logger = logging.getLogger(__name__)

# The archive may exceed the content by this much (tar headers, gzip framing):
# a task cannot smuggle a large archive out as very many empty files.
ARCHIVE_SLACK_BYTES: Final = 1024 * 1024
_MAX_DEPTH: Final = 256
# Outputs this large are sampled to decide whether to compress them at all.
_SAMPLE_FROM_BYTES: Final = 16 * 1024 * 1024
_SAMPLE_FILES: Final = 8
_SAMPLE_BYTES: Final = 256 * 1024


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
    fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
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
    import tarfile

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
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        file_fd = os.open(entry.parts[-1], READ_FLAGS, dir_fd=fd)
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


def is_empty(output_dir: Path) -> bool:
    """Return True if *output_dir* has no entry at all (nothing to pack or send).

    Raises:
        StageOutError: the directory cannot be opened (a link is not followed).
    """
    try:
        fd = os.open(output_dir, DIR_FLAGS)
        try:
            with os.scandir(fd) as it:
                return next(it, None) is None
        finally:
            os.close(fd)
    except OSError as e:
        raise StageOutError(f"outputs: cannot open {cut(output_dir)}: {cut(e)}") from e


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
        root_fd = os.open(output_dir, DIR_FLAGS)
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
    import gzip  # lazily: an idle agent does not hold the tar modules
    import tarfile

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
