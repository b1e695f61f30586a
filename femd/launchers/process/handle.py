"""A running ``process`` task: its monitor thread, log, time and outcome.

Owns one sandbox once started: the thread that spawns bwrap (behind the entry
step) and pumps its log, pins its PID 1, attaches its network, enforces the
timeout and a cancel, kills its cgroup at the end, and turns what happened
into an ``Outcome``. Does not decide what the sandbox is (``sandbox``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import msgspec

from femd.errors import LaunchError, cut
from femd.launchers import LaunchSpec, Outcome
from femd.launchers.capture import OutputCapture, wrap_argv
from femd.launchers.cgroup import TaskCgroup
from femd.launchers.ending import judge
from femd.launchers.network import TaskNetwork
from femd.launchers.process.entry import TaskUser, entry_prefix
from femd.launchers.process.sandbox import HOST_PATH, bwrap_argv
from femd.launchers.process.seccomp import seccomp_memfd
from femd.launchers.profile import ProcessSettings
from femd.model import TaskId
from femd.model import utc_now as _now

__all__ = ["ProcessHandle"]

logger = logging.getLogger(__name__)

_TAIL_BYTES: Final = 8192


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def _children(pid: int) -> set[int]:
    """Every live descendant of *pid* (via /proc), not *pid* itself."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                parent[int(entry.name)] = _parent(int(entry.name))
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - found
        found |= frontier
    return found


class ProcessHandle:
    """One sandbox: a monitor thread spawns it, pumps its log, enforces time."""

    def __init__(
        self,
        spec: LaunchSpec,
        log_path: Path,
        cgroup: TaskCgroup,
        net: TaskNetwork | None = None,
        net_binds: list[tuple[str, str]] | None = None,
    ) -> None:
        """Hold what the sandbox needs; ``start()`` spawns it."""
        self.task_id: TaskId = spec.task_id
        self._spec = spec
        self._cgroup = cgroup
        self._capture: OutputCapture | None = None
        self._mono_start = time.monotonic()
        self._net = net
        self._net_binds = net_binds or []
        self._block_w: int | None = None  # holds the command until attached
        self._net_error: str | None = None
        self._log_path = log_path
        self._tail = bytearray()
        self._done = threading.Event()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._outcome: Outcome | None = None
        self._cancel_at: float | None = None
        self._pidfd: int | None = None
        self._pid1 = 0
        self._pidfd_lock = threading.Lock()  # cancel() races the monitor's close
        self._popen: subprocess.Popen[bytes] | None = None
        self._started_at = _now()

    def start(self, settings: ProcessSettings, user: TaskUser) -> None:
        """Spawn the sandbox from a monitor thread; return once it started.

        Raises:
            LaunchError: the sandbox could not be spawned.
        """
        # The monitor thread owns the child: PR_SET_PDEATHSIG fires when the
        # *thread* that forked bwrap ends, so it must live as long as the task.
        thread = threading.Thread(
            target=self._run,
            args=(settings, user),
            name=f"femd-process-{self.task_id}",
            daemon=True,
        )
        thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise LaunchError(
                f"process: cannot start task {self.task_id}: {cut(self._start_error)}"
            ) from self._start_error

    def _spawn(self, settings: ProcessSettings, user: TaskUser) -> tuple[int, int, int]:
        self._log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        log_fd = os.open(self._log_path, flags, 0o600)
        log_r, log_w = os.pipe()
        status_r, status_w = os.pipe()
        out_r, out_w = os.pipe()
        fds: list[int | None] = [seccomp_memfd(), status_w, None, None]
        if settings.seccomp is not None:
            fds[2] = os.open(settings.seccomp, os.O_RDONLY | os.O_CLOEXEC)
        net = None
        if self._net is not None:
            block_r, self._block_w = os.pipe()
            fds[3], net = block_r, (self._net_binds, block_r)
        try:
            spec = self._spec
            argv = wrap_argv(list(spec.argv), spec.output_target)
            args = bwrap_argv(settings, spec, fds[0], argv, status_w, fds[2], net)
            prefix = entry_prefix(settings, spec, user, self._cgroup)
            self._popen = subprocess.Popen(  # noqa: S603 (fixed tools, no shell)
                prefix + args,
                stdin=out_w,  # the output stream (see capture)
                stdout=log_w,
                stderr=log_w,
                pass_fds=tuple(fd for fd in fds if fd is not None),
                env={"PATH": HOST_PATH},
                cwd="/",
                umask=0o077,
                process_group=0,
            )
        except BaseException:
            for fd in (log_fd, log_r, status_r, out_r):
                os.close(fd)
            raise
        finally:
            for closing in (log_w, out_w, *fds):
                if closing is not None:
                    os.close(closing)
        self._capture = OutputCapture(
            out_r, Path(self._spec.output_dir), self._spec.output_max_bytes
        )
        return log_fd, log_r, status_r

    def _end_network(self) -> None:
        """Close the task's ports and forwarders; the traffic goes in the outcome."""
        if self._block_w is not None:
            self._kill()  # never released: the command must not run unforwarded
            os.close(self._block_w)
            self._block_w = None
        if self._net is None:
            return
        traffic = self._net.close()
        if self._outcome is None:
            return
        changes: dict[str, object] = {"traffic": traffic}
        if self._net_error is not None:
            changes |= {"state": "failed", "exit_code": None, "reason": self._net_error}
        self._outcome = msgspec.structs.replace(self._outcome, **changes)

    def _run(self, settings: ProcessSettings, user: TaskUser) -> None:
        try:
            log_fd, log_r, status_r = self._spawn(settings, user)
        except BaseException as e:  # noqa: BLE001 (handed to the launching thread)
            self._cgroup.kill()
            self._cgroup.remove()
            self._start_error = e
            self._end_network()
            self._started.set()
            return
        self._started_at = _now()
        self._mono_start = time.monotonic()
        logger.info("process: task %s started in %s", self.task_id, self._cgroup.name)
        self._started.set()
        try:
            self._outcome = self._monitor(log_fd, log_r, status_r)
        except Exception as e:
            # Never leave a sandbox behind, and never leave wait() hanging.
            logger.exception("process: monitoring task %s failed", self.task_id)
            self._kill()
            if self._popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._popen.wait(timeout=10)
            self._outcome = Outcome(
                state="failed",
                exit_code=None,
                started_at=self._started_at,
                finished_at=_now(),
                log_tail=self._tail.decode(errors="replace"),
                reason=f"launcher error: {cut(e)}",
            )
            self._cgroup.kill()
        finally:
            self._end_network()
            self._cgroup.remove()
            for fd in (log_fd, log_r, status_r):
                os.close(fd)
            with self._pidfd_lock:
                if self._pidfd is not None:
                    os.close(self._pidfd)
                    self._pidfd = None
            self._done.set()

    def _monitor(self, log_fd: int, log_r: int, status_r: int) -> Outcome:
        assert self._popen is not None  # noqa: S101 (set by _spawn)
        deadline = time.monotonic() + self._spec.limits.timeout_s
        status, written, timed_out, killed = b"", 0, False, False
        drain_until: float | None = None
        sel = selectors.DefaultSelector()
        sel.register(log_r, selectors.EVENT_READ)
        sel.register(status_r, selectors.EVENT_READ)
        while sel.get_map():
            now = time.monotonic()
            self._cgroup.sample()
            timed_out = timed_out or now >= deadline
            cancelled = self._cancel_at is not None and now >= self._cancel_at
            if (timed_out or cancelled) and not killed:
                killed = True
                self._kill()
            if drain_until is None and self._popen.poll() is not None:
                drain_until = now + 5  # bwrap is gone: read what is left, then stop
            elif drain_until is not None and now >= drain_until:
                self._kill()
                break
            for key, _ in sel.select(timeout=0.1):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                elif key.fd == status_r:
                    status += data
                    self._pin(status)
                    self._attach_network()
                else:
                    written += self._log(log_fd, data, written)
        sel.close()
        self._popen.wait(timeout=10)
        # SECURITY: nothing of the task outlives it (double-forked, setsid'd,
        # or a sandbox stuck in bwrap's setup): the whole cgroup goes.
        if not self._cgroup.kill():
            logger.error("process: task %s: processes left in its cgroup", self.task_id)
        assert self._capture is not None  # noqa: S101 (set by _spawn)
        if not self._capture.join(30):
            logger.error("process: task %s: output stream did not end", self.task_id)
        return self._result(status, timed_out)

    def _attach_network(self) -> None:
        """Start the task's forwarders in its namespace, then let it run."""
        if self._block_w is None or self._net is None or self._pidfd is None:
            return
        block_w, self._block_w = self._block_w, None
        assert self._popen is not None  # noqa: S101 (set by _spawn)
        try:
            fd = os.open(f"/proc/{self._pid1}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                # SECURITY: still the sandbox pinned by _pin, not a reused pid.
                if _parent(self._pid1) != self._popen.pid:
                    raise LaunchError("network: the sandbox ended before it ran")
                self._net.attach(fd)
            finally:
                os.close(fd)
            os.write(block_w, b"x")
        except (LaunchError, OSError, ValueError, IndexError) as e:
            self._net_error = cut(e, 200)
            logger.error("process: task %s: %s", self.task_id, self._net_error)
            self._kill()
        finally:
            os.close(block_w)

    def _log(self, log_fd: int, data: bytes, written: int) -> int:
        self._tail += data
        del self._tail[:-_TAIL_BYTES]
        limit = self._spec.log_max_bytes
        if written >= limit:
            return 0
        chunk = data[: limit - written]
        os.write(log_fd, chunk)
        if len(chunk) < len(data):
            os.write(log_fd, f"\n[femd: log cut at {limit} bytes]\n".encode())
        return len(data)

    def _pin(self, status: bytes) -> None:
        """Hold a pidfd on the sandbox's PID 1 as soon as bwrap reports it."""
        if self._pidfd is not None or b"\n" not in status:
            return
        pid = int(json.loads(status.split(b"\n", 1)[0])["child-pid"])
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # already over (and reaped): nothing left to signal
        assert self._popen is not None  # noqa: S101
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _parent(pid) == self._popen.pid:  # else: reused before we pinned
                with self._pidfd_lock:
                    self._pidfd, self._pid1 = fd, pid
                return
        os.close(fd)

    def _signal_sandbox(self, sig: int) -> None:
        """Send *sig* to every process in the sandbox (below its PID 1)."""
        with self._pidfd_lock:
            if self._pidfd is None:
                return
            tree = _children(self._pid1) | {self._pid1}
            for child in tree - {self._pid1}:
                try:
                    fd = os.pidfd_open(child)
                except OSError:
                    continue  # already gone
                # SECURITY: the pidfd pins the process; re-check it is still in
                # the sandbox's tree, so a reused pid is never signalled.
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if _parent(child) in tree:
                        signal.pidfd_send_signal(fd, sig)
                os.close(fd)

    def _kill(self) -> None:
        """Kill the whole task: every process of its cgroup, bwrap included."""
        self._cgroup.kill()
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    def _result(self, status: bytes, timed_out: bool) -> Outcome:
        assert self._popen is not None  # noqa: S101
        assert self._capture is not None  # noqa: S101
        # bwrap writes "exit-code" only when the task ran; the code itself is
        # taken from bwrap's own exit status, which the task cannot forge.
        exited = any(b'"exit-code"' in line for line in status.splitlines())
        returncode = self._popen.returncode
        code = returncode if exited and returncode >= 0 else None
        tail = self._tail.decode(errors="replace")
        limits, capture = self._spec.limits, self._capture
        oom = (
            f"memory limit of {limits.memory_mb} MB reached: killed by the "
            "kernel's OOM killer in the task's cgroup"
        )
        end = judge(
            capture,
            code,
            max_bytes=self._spec.output_max_bytes,
            timed_out=f"timeout of {limits.timeout_s} s reached" if timed_out else None,
            cancelled=self._cancel_at is not None,
            out_of_memory=oom if self._cgroup.oom_killed() else None,
            never_ran=f"sandbox setup failed (bwrap exit {returncode})",
        )
        usage = msgspec.structs.replace(
            self._cgroup.usage(),
            output_bytes=capture.bytes,
            wall_s=round(time.monotonic() - self._mono_start, 3),
        )
        logger.info("process: task %s %s %s", self.task_id, end.state, end.reason)
        return Outcome(
            state=end.state,
            exit_code=code,
            started_at=self._started_at,
            finished_at=_now(),
            log_tail=tail,
            reason=end.reason,
            rule=end.rule,
            usage=usage,
        )

    # -- Handle ----------------------------------------------------------------

    def wait(self, timeout_s: float | None = None) -> Outcome | None:
        """The outcome, or None if the task still runs after *timeout_s*."""
        self._done.wait(timeout_s)
        return self._outcome if self._done.is_set() else None

    def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM every task process now, SIGKILL the sandbox after *grace_s*."""
        if self._done.is_set() or self._cancel_at is not None:
            return
        self._cancel_at = time.monotonic() + max(0.0, grace_s)
        self._signal_sandbox(signal.SIGTERM)

    def logs(self) -> Iterator[bytes]:
        """The captured stdout+stderr (at most ``log_max_bytes`` and a marker)."""
        try:
            with self._log_path.open("rb") as f:
                while chunk := f.read(65536):
                    yield chunk
        except OSError as e:
            raise LaunchError(f"process: cannot read log of {self.task_id}: {e}") from e
