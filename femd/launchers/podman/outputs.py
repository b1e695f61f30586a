"""A podman task's output quota: a tmpfs of the cap, streamed out by femd.

Owns what makes ``max_output_bytes`` hold *during* a podman task (issue
"limits that hold"), whatever the image contains (it may have no shell, no
tar):

- the container's output directory is a ``tmpfs`` of the output cap, which
  podman mounts in the container's own mount namespace: at no moment can it
  hold more, whatever file sizes or ``fallocate`` (``KEEP_SIZE`` too) say;
  its pages are charged to the container's memory cgroup where podman has
  one (cgroup v2), and never touch the node's disk;
- the container's command is a trusted step: the host's static busybox,
  bound read-only at ``/run/femd/busybox``, runs the task's argv through
  podman's own init (``/run/podman-init``, so argv is resolved exactly as
  podman would), forwards a stop's SIGTERM to it, and when it ends kills
  every other process of the container, then sends the output dir into a
  FIFO bound at ``/run/femd/output`` with every sandbox's protocol
  (``capture.send_script``: the line ``empty``, or free blocks and a tar);
- femd reads that FIFO with ``capture.OutputCapture``, which treats the
  stream as hostile (the step runs as the task's uid, beside it): names
  checked, regular files and directories only, bytes and members capped.

Works the same whether femd is root or the unprivileged service user: podman
mounts the tmpfs, femd only makes a FIFO in the task's work dir. The task
runs as a background job of the step, so SIGINT and SIGQUIT are ignored in
it (no terminal ever sends them). Does not build the rest of the container
(``container``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import Final

from femd.errors import LaunchError, cut
from femd.launchers import LaunchSpec
from femd.launchers.capture import OutputCapture, send_script, tmpfs_bytes

__all__ = [
    "HELPER",
    "OutputStream",
    "absent_capture",
    "fifo_path",
    "helper_problem",
    "output_mounts",
    "step_argv",
]

HELPER: Final = "/bin/busybox"
"""The host's static busybox (Debian ``busybox-static``): the step's shell and tar."""
_HELPER_TARGET: Final = "/run/femd/busybox"
_STREAM_TARGET: Final = "/run/femd/output"
_INIT: Final = "/run/podman-init"  # podman's catatonit, bound there by init=true
# "$1": the output dir; the task's argv follows. A stop's SIGTERM reaches
# the step (podman's init forwards it to its child), which passes it on to
# the task's own init; `got` tells a wait cut short by that trap from the end.
_STEP: Final = (
    f"b={_HELPER_TARGET}; out=$1; shift; "
    f'{_INIT} -- "$@" </dev/null & pid=$!; '
    "trap 'got=1; kill -TERM $pid 2>/dev/null' TERM; "
    'while :; do got=; wait $pid; code=$?; [ -z "$got" ] && break; done; '
    # the same end as every sandbox's step: one protocol, one reader
    + send_script(f">{_STREAM_TARGET}", tools="$b ")
)


def helper_problem(path: str = HELPER) -> str | None:
    """Why *path* cannot be the step's shell in any image, or None.

    It must be a regular executable without an ELF interpreter (static): the
    image may have no libc at all.
    """
    hint = "install busybox-static"
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF
                return f"output quota: {path} is not a 64-bit executable ({hint})"
            phoff = int.from_bytes(head[32:40], "little")
            size = int.from_bytes(head[54:56], "little")
            count = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(size * count)
    except OSError as e:
        return f"output quota: {path}: {e.strerror or e} ({hint})"
    for i in range(count):
        if int.from_bytes(table[i * size : i * size + 4], "little") == 3:  # PT_INTERP
            return f"output quota: {path} is not statically linked ({hint})"
    if not os.access(path, os.X_OK):
        return f"output quota: {path} is not executable ({hint})"
    return None


def step_argv(spec: LaunchSpec) -> list[str]:
    """The container's command: the task's argv run by the output step."""
    return [
        _HELPER_TARGET, "sh", "-c", _STEP, "femd-output", spec.output_target,
        *spec.argv,
    ]  # fmt: skip


def output_mounts(spec: LaunchSpec, stream: Path) -> list[dict[str, object]]:
    """The output tmpfs (the cap), the step's busybox and its stream FIFO."""
    size = tmpfs_bytes(spec.output_max_bytes)
    return [
        {"destination": spec.output_target, "type": "tmpfs", "source": "tmpfs",
         "options": ["rw", "nosuid", "nodev", "noexec", "mode=1777", f"size={size}"]},
        {"destination": _HELPER_TARGET, "type": "bind", "source": HELPER,
         "options": ["rbind", "ro", "nosuid", "nodev"]},
        {"destination": _STREAM_TARGET, "type": "bind", "source": str(stream),
         "options": ["bind", "rw", "nosuid", "nodev", "noexec"]},
    ]  # fmt: skip


class OutputStream:
    """The host end of one container's output stream (a FIFO beside ``out``).

    femd holds the FIFO's read end and, until the container has ended, a
    write end of its own, so the reader never sees an end of file before the
    step wrote (or could no longer write).
    """

    def __init__(self, output_dir: Path, max_bytes: int) -> None:
        """Open the FIFO ``<output_dir>.stream`` (made by ``create``).

        Raises:
            LaunchError: the FIFO is missing or not a FIFO.
        """
        self.path = fifo_path(output_dir)
        self.max_bytes = max_bytes
        self._keeper: int | None = None
        _own_dir(output_dir)
        try:
            flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.path, flags)
        except OSError as e:
            raise LaunchError(f"output stream {cut(self.path)}: {e.strerror}") from e
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise LaunchError(f"output stream {cut(self.path)}: not a FIFO")
            self._keeper = os.open(
                self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
            )
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        except (OSError, LaunchError):
            os.close(fd)
            self._close_keeper()
            raise
        self.capture = OutputCapture(fd, output_dir, max_bytes)

    @classmethod
    def create(cls, output_dir: Path, max_bytes: int) -> OutputStream:
        """Check the (agent-created) output dir, make the FIFO, open it.

        Raises:
            LaunchError: the output dir is not an empty directory, or is
                reachable by any host user.
        """
        try:
            names = os.listdir(output_dir)
            is_dir = stat.S_ISDIR(os.lstat(output_dir).st_mode)
        except OSError as e:
            raise LaunchError(f"output dir {cut(output_dir)}: {e.strerror}") from e
        if not is_dir or names:
            raise LaunchError(f"output dir {cut(output_dir)}: not an empty directory")
        # SECURITY: the FIFO is writable by any uid (the task's is an anonymous
        # subordinate one): safe only behind a parent closed to "other".
        if all(os.stat(p).st_mode & stat.S_IXOTH for p in output_dir.parents):
            raise LaunchError(
                f"output dir {cut(output_dir)}: every parent is searchable by any "
                "user; close one (e.g. mode 0750, group of the podman user)"
            )
        path = fifo_path(output_dir)
        try:
            path.unlink(missing_ok=True)
            os.mkfifo(path, 0o600)
            os.chmod(path, 0o666)  # noqa: S103 (closed parent, checked above)
        except OSError as e:
            raise LaunchError(f"output stream {cut(path)}: {e.strerror}") from e
        return cls(output_dir, max_bytes)

    def _close_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            with contextlib.suppress(OSError):
                os.close(keeper)

    def finish(self, timeout_s: float = 30.0) -> OutputCapture:
        """The container ended: read what the step sent, to its end.

        Returns the capture (``complete``, ``full``, ``bytes`` and its reasons).
        """
        self._close_keeper()
        if not self.capture.join(timeout_s) and not self.capture.error:
            self.capture.error = "the output stream did not end"
        self.path.unlink(missing_ok=True)
        return self.capture

    def close(self) -> None:
        """Give up the stream (nothing ran); remove the FIFO."""
        self._close_keeper()
        self.capture.join(5)
        self.path.unlink(missing_ok=True)


def _own_dir(output_dir: Path) -> None:
    """Refuse an output dir that is not femd's own: a symlink anywhere, or not ours.

    Raises:
        LaunchError: *output_dir* is not absolute, has a symlink on its
            path, is not a directory, or is not owned by femd's user.
    """
    try:
        real = os.path.realpath(output_dir, strict=True)
        st = os.lstat(output_dir)
    except OSError as e:
        raise LaunchError(f"output dir {cut(output_dir)}: {e.strerror}") from e
    if (
        not output_dir.is_absolute()
        or real != str(output_dir)
        or not stat.S_ISDIR(st.st_mode)
        or st.st_uid != os.geteuid()
    ):
        raise LaunchError(
            f"output dir {cut(output_dir)}: not a directory of femd's own "
            "(symlinked, or another owner)"
        )


def absent_capture() -> OutputCapture:
    """The capture of a stream that is gone (a container adopted without it)."""
    read, write = os.pipe()
    os.close(write)
    capture = OutputCapture(read, Path("/nonexistent"), 0)  # reads an end at once
    capture.join(5)
    capture.error = "no output stream"
    return capture


def fifo_path(output_dir: Path) -> Path:
    """Where a task's output FIFO lives: beside its output dir, not in it."""
    return output_dir.with_name(output_dir.name + ".stream")
