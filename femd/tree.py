"""Removing a directory tree that a task made, whatever its shape.

Owns ``remove_tree()``. A task controls what it leaves in its work dir: trees
thousands of levels deep (``shutil.rmtree`` recurses and opens one descriptor
per level), directories without read, write or search permission, symlinks
anywhere. This walk is iterative and holds two descriptors at a time: it goes
down by ``openat`` without following links, comes back up through ``..`` and
checks it arrived where it came from (device and inode), so a tree moved under
it cannot lead it outside. Does not decide what to remove.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Final

from femd.errors import StateError, cut

__all__ = ["remove_tree"]

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, parent_fd: int) -> int:
    """Open *name* under *parent_fd*; a dir the task locked is opened up first."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:
        # Not a symlink (O_NOFOLLOW refused nothing): make it ours to empty.
        os.chmod(name, 0o700, dir_fd=parent_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _first_subdir(fd: int) -> str | None:
    """Unlink every non-directory in *fd*; return one subdirectory, if any."""
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                return entry.name
            try:
                os.unlink(entry.name, dir_fd=fd)
            except PermissionError:
                os.fchmod(fd, 0o700)
                os.unlink(entry.name, dir_fd=fd)
    return None


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def remove_tree(path: Path) -> None:
    """Remove *path* and everything under it; a missing *path* is fine.

    Raises:
        StateError: something could not be removed (one line, names *path*).
    """
    try:
        _remove(path)
    except OSError as e:
        raise StateError(f"cannot remove {cut(path)}: {cut(e)}") from e


def _remove(path: Path) -> None:
    try:
        parent = os.open(path.parent, _DIR_FLAGS)
    except FileNotFoundError:
        return
    try:
        try:
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path.name, dir_fd=parent)
            return
        # (name, identity of the dir holding it) from the top down.
        stack: list[tuple[str, tuple[int, int]]] = [(path.name, _identity(parent))]
        fd = _open_dir(path.name, parent)
        try:
            while stack:
                child = _first_subdir(fd)
                if child is not None:
                    down = _open_dir(child, fd)
                    stack.append((child, _identity(fd)))
                    os.close(fd)
                    fd = down
                    continue
                name, above = stack.pop()
                up = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = up
                if _identity(fd) != above:
                    raise OSError(f"{name!r} moved while being removed")
                os.rmdir(name, dir_fd=fd)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    finally:
        os.close(parent)
