"""A femd agent as a child process: ``python -m femd run``, as systemd would run it.

The agent is started exactly as in production, only outside systemd: its
``NOTIFY_SOCKET`` points at a datagram socket this module owns, so we learn
when it is READY (broker connected, policy loaded) the way systemd does, and
its audit records (JSON lines on stderr outside systemd) go to a log file.
It is stopped with SIGTERM, femd's "drain and exit 0".
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Final

__all__ = ["AgentError", "AgentProcess"]

_PR_SET_PDEATHSIG: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)


class AgentError(RuntimeError):
    """The agent did not start, did not become ready, or did not stop cleanly."""


def _term_with_parent() -> None:
    """Runs in the child: SIGTERM it if the demo dies without cleaning up."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class AgentProcess:
    """One ``femd run --config CONFIG`` child with its readiness socket and log."""

    def __init__(self, name: str, config: Path, log: Path) -> None:
        """Prepare (not start) the agent *name* with *config*, logging to *log*."""
        self.name = name
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_s: float | None = None
        self._sock: socket.socket | None = None
        self._sock_dir: str | None = None
        self._log_file: IO[bytes] | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()

    @property
    def pid(self) -> int:
        """The agent's process id (after :meth:`start`)."""
        if self.proc is None:
            raise AgentError(f"{self.name}: not started")
        return self.proc.pid

    def start(self) -> None:
        """Start the agent; returns at once (see :meth:`wait_ready`)."""
        self._sock_dir = tempfile.mkdtemp(prefix="femd-notify-")
        path = os.path.join(self._sock_dir, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        threading.Thread(target=self._drain, args=(self._sock,), daemon=True).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEMD_")}
        env["NOTIFY_SOCKET"] = path
        self._log_file = self.log.open("ab")
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "femd", "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=env,
            preexec_fn=_term_with_parent,  # prctl only: safe after fork
        )

    def _drain(self, sock: socket.socket) -> None:
        """Read every notification, as systemd does, and note READY.

        A notify socket nobody reads fills up, and then the agent's next
        ``sd_notify`` blocks its main loop: someone must always read.
        """
        sock.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                message = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if b"READY=1" in message.split(b"\n") and self.ready_s is None:
                self.ready_s = time.monotonic() - self.started_at
                self._ready.set()

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wait for ``READY=1``; return the seconds from process start to READY.

        Raises:
            AgentError: the agent exited or was not ready in time (with the end
                of its log).
        """
        if self.proc is None:
            raise AgentError(f"{self.name}: not started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._ready.wait(0.1) and self.ready_s is not None:
                return self.ready_s
            if self.proc.poll() is not None:
                raise AgentError(
                    f"{self.name}: exited with {self.proc.returncode} before READY: "
                    + self.tail()
                )
        raise AgentError(
            f"{self.name}: not READY after {timeout_s:.0f} s: {self.tail()}"
        )

    def tail(self, lines: int = 5) -> str:
        """The last *lines* lines of the agent's log, on one line."""
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, wait for the drain, SIGKILL if it overruns; return the exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                code = None
        if self._sock is not None:
            self._stopping.set()  # the drain thread ends within 0.2 s
            self._sock.close()
            self._sock = None
        if self._sock_dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self._sock_dir, "notify.sock"))
                os.rmdir(self._sock_dir)
            self._sock_dir = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code
