"""Unpacking a received archive (``femd watch`` side), files and directories only.

Owns what an archive from a node may create on the orchestrator: plain
relative names, regular files and directories, within a byte cap, never
through a link and never over an existing name. Does not fetch or verify the
archive (``femd.stageout.chunks`` does).
"""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path
from typing import IO, TYPE_CHECKING

from femd.errors import OutputTooLargeError, StageOutError, UnsafeOutputPathError, cut
from femd.stageout.flags import COPY_BYTES, CREATE_FLAGS, DIR_FLAGS

if TYPE_CHECKING:
    import tarfile

__all__ = ["unpack_outputs"]


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
            nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
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
    import tarfile  # lazily: an idle agent does not hold the tar modules

    written: list[str] = []
    try:
        dest.mkdir(mode=0o755, exist_ok=True)
        root_fd = os.open(dest, DIR_FLAGS)
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
        fd = os.open(parts[-1], CREATE_FLAGS, perm, dir_fd=parent)
    finally:
        os.close(parent)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), perm)
        left = member.size
        while left > 0:
            data = src.read(min(left, COPY_BYTES))
            if not data:
                raise StageOutError(f"outputs: {cut(member.name)} is truncated")
            out.write(data)
            left -= len(data)
