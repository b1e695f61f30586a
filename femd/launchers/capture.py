"""Getting a task's outputs out of its size-capped output tmpfs.

Owns the step that runs inside a sandbox around the task command
(``wrap_argv``) and the host side that reads what it sends (``OutputCapture``).
The sandbox's output directory is a tmpfs of the task's output cap (charged to
its memory cgroup), so at no moment can it hold more, whatever file sizes or
``fallocate`` say. When the task command exits, the step kills every other
process of the sandbox, reports the tmpfs's free blocks and streams a tar of it
over its stdin, a pipe's write end; femd extracts regular files and directories into the
host's output directory with a byte cap, before the namespace disappears. An
output directory that is readable and holds no entry (shell globs: no exec)
sends the one line ``empty`` instead: no ``stat``, no ``tar``, nothing for
femd to parse (most tasks' outputs on the way to a launch's cost). A stream
with no line at all is a failed step, never an empty one.

Trust: the step runs as the task user, beside the task, so what it sends is
task output: a task could forge it (as it can write anything to its outputs).
The host side treats it as hostile: names are checked, only regular files and
directories are made, file bytes, member counts, header sizes and the stream's
own length are capped (``tarstream``): no header makes femd hold more
memory. Does not check output policy (``stageout`` does, from the extracted
files).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Final

from femd.errors import cut

if TYPE_CHECKING:
    import tarfile

__all__ = [
    "EMPTY",
    "STEP_FAILED",
    "OutputCapture",
    "send_script",
    "tmpfs_bytes",
    "wrap_argv",
]

_PAGE: Final = 4096
_MAX_MEMBERS: Final = 100_000
# "$1": the output dir inside the sandbox; the task command follows. The
# stream goes to fd 0, the pipe's write end (the task's stdin is /dev/null), so
# no other descriptor reaches the task. A SIGTERM (cancel) is for the task: the
# step waits for it (a trap, not an ignore, which the task would inherit).
# The step is the sandbox's PID 1 (bwrap --as-pid-1): the task cannot signal
# it away, and its `wait` reaps orphans. `kill -KILL -1` reaches every other
# process of the sandbox's PID namespace.
# An empty directory: readable and searchable (else tar would fail: the step
# fails) and no glob (dot files too) names an entry; `[`, `echo` and globs
# are builtins, so an empty output costs no exec.
STEP_FAILED: Final = 125  # the output step could not stream (a task's own code is kept)
EMPTY: Final = b"empty"  # the stream's first line for an empty output directory


def send_script(sink: str, tools: str = "") -> str:
    """The step's end, once the task's command ended with ``$code``: the protocol.

    Kills every other process of the sandbox, then sends the output dir
    ``$out`` to *sink* (a redirection: ``>&0``, ``>/run/femd/output``) as the
    one line ``empty``, or the tmpfs's free blocks then a tar; exits
    ``STEP_FAILED`` if it could not, else ``$code``. *tools*: the prefix of
    ``stat`` and ``tar`` (``$b `` for podman's bound busybox); the rest are
    shell builtins. Every sandbox's step ends with it, so one reader
    (``OutputCapture``) reads them all.
    """
    return (
        "kill -KILL -1 2>/dev/null; e=; "
        'if [ -r "$out" ] && [ -x "$out" ]; then e=1; '
        'for f in "$out"/* "$out"/.[!.]* "$out"/..?*; do '
        'if [ -e "$f" ] || [ -L "$f" ]; then e=; break; fi; done; fi; '
        f'if [ -n "$e" ]; then echo {EMPTY.decode()}; '
        f'else {tools}stat -f -c %a "$out" && {tools}tar -C "$out" -cf - .; '
        f"fi {sink} 2>/dev/null || exit {STEP_FAILED}; exit $code"
    )


_STEP: Final = 'trap : TERM; out=$1; shift; "$@" </dev/null; code=$?; ' + send_script(
    ">&0"
)


def tmpfs_bytes(max_bytes: int) -> int:
    """The output tmpfs's size: the cap, rounded up to whole pages (>= 1)."""
    return max(_PAGE, -(-max_bytes // _PAGE) * _PAGE)


def wrap_argv(argv: list[str], target: str) -> list[str]:
    """*argv* run by the in-sandbox output step (``/bin/sh``).

    The sandbox's stdin must be the write end of the stream's pipe.
    """
    return ["/bin/sh", "-c", _STEP, "femd-output", target, *argv]


class OutputCapture:
    """Reads one sandbox's output stream into *dest*, at most *max_bytes*."""

    def __init__(self, fd: int, dest: Path, max_bytes: int) -> None:
        """Start a reader thread on *fd* (it owns and closes it)."""
        self._fd = fd
        self._dest = dest
        self._max = max_bytes
        self.bytes = 0
        self.full = False
        self.complete = False
        self.error = ""
        self._thread = threading.Thread(
            target=self._run, name="femd-output-capture", daemon=True
        )
        self._thread.start()

    def full_reason(self, max_bytes: int) -> str:
        """The failure of a task whose output tmpfs filled (``outputs.exceeded``)."""
        return (
            f"outputs exceed the cap of {max_bytes} bytes: the output directory is full"
        )

    def step_failure(self, code: int | None) -> str:
        """Why the sandbox's step, not the task, ended it with *code*, or ""."""
        if code == STEP_FAILED and not self.complete:
            return "outputs not collected: the output step failed in the sandbox"
        return ""

    def incomplete_reason(self) -> str:
        """Why the outputs were not collected, or "" when they were."""
        if self.error or not self.complete:
            return f"outputs not collected: {self.error or 'stream incomplete'}"
        return ""

    def join(self, timeout_s: float) -> bool:
        """Wait for the stream's end; False if it is still open."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        import tarfile  # lazily: an idle agent does not hold the tar modules

        with os.fdopen(self._fd, "rb") as stream:
            try:
                self._read(stream)
            except (OSError, tarfile.TarError, ValueError) as e:
                self.error = self.error or f"output stream: {cut(e)}"
            # Drain: the step must never block on a full pipe.
            with contextlib.suppress(OSError):
                while stream.read(65536):
                    pass

    def _read(self, stream: IO[bytes]) -> None:
        header = stream.readline(32)
        if not header:
            return  # nothing sent: the step did not get that far
        if header.rstrip(b"\n") == EMPTY:
            # Nothing to extract, and nothing may follow.
            if stream.read(1):
                self.error = "output stream: data after the empty mark"
                return
            self.complete = True
            return
        self.full = int(header.strip()) == 0
        from femd.launchers import tarstream

        # SECURITY: the stream is task output. Memory stays bounded whatever
        # its headers declare, and it may carry no more than the file bytes
        # allowed plus a fixed allowance for headers (see tarstream).
        budget = tarstream.Budget(stream, self._max + tarstream.SLACK)
        members = 0
        with tarstream.open_stream(budget) as tar:
            while (member := tar.next()) is not None:
                members += 1
                budget.grant(tarstream.PER_MEMBER)
                if members > _MAX_MEMBERS:
                    self.error = f"more than {_MAX_MEMBERS} output files"
                    return
                if not self._extract(tar, member):
                    return
        self.complete = True

    def _extract(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
        parts = PurePosixPath(member.name).parts
        if parts and parts[0] == ".":
            parts = parts[1:]
        if not parts:
            return True  # the output directory itself
        if any(p in ("..", "/", "") for p in parts) or member.name.startswith("/"):
            self.error = f"output {cut(member.name)!r}: unsafe name"
            return False
        path = self._dest.joinpath(*parts)
        if member.isdir():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            return True
        if not member.isreg():
            # SECURITY: symlinks, hard links, devices and fifos never leave
            # (as stage-out would refuse them).
            kind = "a symlink" if member.issym() else "not a regular file"
            self.error = f"output {cut(member.name)!r} is {kind}"
            return False
        if self.bytes + member.size > self._max:
            self.full = True
            self.error = f"outputs exceed the cap of {self._max} bytes"
            return False
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        source = tar.extractfile(member)
        if source is None:
            self.error = f"output {cut(member.name)!r}: unreadable"
            return False
        with source, os.fdopen(os.open(path, flags, 0o600), "wb") as out:
            while chunk := source.read(65536):
                self.bytes += len(chunk)
                if self.bytes > self._max:
                    self.error = f"outputs exceed the cap of {self._max} bytes"
                    return False
                out.write(chunk)
        return True
