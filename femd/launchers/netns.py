"""femd's side of ``nsjoin``: sockets made inside a task's network namespace.

Owns ``Helper`` (a task's helper, forked by the agent's one ``nsjoin``
zygote into the task's namespace, asked for listeners, connections and
addresses) and ``probe_join()`` (can this host do that at all, for
``probe()`` and ``femd doctor``). What the sockets are
used for is ``network.TaskNetwork``'s business.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Final

from femd.errors import LaunchError, cut

__all__ = ["Helper", "probe_join", "warm"]

_HELPER: Final = Path(__file__).with_name("nsjoin.py")


class Helper:
    """The ``nsjoin`` process of one task, in the task's network namespace.

    Raises:
        LaunchError: it could not start or join (from the constructor).
    """

    def __init__(self, netns_fd: int) -> None:
        """Fork a helper in the namespace *netns_fd*; wait until it joined."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lock = threading.Lock()
        try:
            _zygote.fork(netns_fd, theirs.fileno())
        except OSError as e:
            ours.close()
            raise LaunchError(f"network: helper did not start: {cut(e)}") from e
        finally:
            theirs.close()
        self._sock = ours
        self._sock.settimeout(30)
        try:
            ready = self._sock.recv(256)
        except OSError as e:
            self.close()
            raise LaunchError(f"network: helper did not start: {cut(e)}") from e
        if ready != b"ready":
            self.close()
            text = ready.decode(errors="replace") or "the helper ended"
            raise LaunchError(f"network: {cut(text)}")

    def ask(self, request: str) -> socket.socket | None:
        """Send one request; the socket it made (None for ``address``)."""
        with self._lock:
            try:
                self._sock.send(request.encode())
                msg, fds, _, _ = socket.recv_fds(self._sock, 256, 1)
            except OSError as e:
                raise LaunchError(f"network: helper failed: {cut(e)}") from e
        if msg != b"ok":
            for fd in fds:
                os.close(fd)
            text = msg.decode(errors="replace") or "helper ended"
            raise LaunchError(f"network: {request}: {cut(text)}")
        return socket.socket(fileno=fds[0]) if fds else None

    def close(self) -> None:
        """Stop the helper (it exits when its control socket closes)."""
        self._sock.close()


class _Zygote:
    """The one ``nsjoin`` process of this agent, forking a helper per task.

    Started on first use, again if it died. A fork of that small
    single-threaded process costs a millisecond; a new interpreter per task
    cost a tenth of a second under load.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._registered = False

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(  # noqa: S603 (our own script, no shell)
                [sys.executable, "-I", "-S", str(_HELPER), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={},
                cwd="/",
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        if not self._registered:
            atexit.register(self.stop)
            self._registered = True
        return ours

    def warm(self) -> None:
        """Start the zygote if it never ran; a failure waits for the first use."""
        with self._lock, contextlib.suppress(OSError):
            if self._proc is None:
                self._start()

    def stop(self) -> None:
        """End the zygote (its helpers end with their tasks' sockets)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()  # the zygote exits on EOF
                self._sock = None
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None

    def fork(self, netns_fd: int, task_fd: int) -> None:
        """Have a child join *netns_fd* and serve on *task_fd*.

        Raises:
            OSError: the zygote cannot be started or reached.
        """
        with self._lock:
            for attempt in (1, 2):
                alive = self._proc is not None and self._proc.poll() is None
                sock = self._sock if alive and self._sock else None
                if sock is None:
                    if self._sock is not None:
                        self._sock.close()
                    if self._proc is not None:
                        self._proc.wait()
                    sock = self._start()
                try:
                    socket.send_fds(sock, [b"join"], [netns_fd, task_fd])
                    return
                except OSError:
                    if attempt == 2:
                        raise
                    if self._proc is not None:
                        self._proc.kill()


_zygote: Final = _Zygote()


def warm() -> None:
    """Start the helpers' zygote now: a probe or a task is about to need it.

    Its interpreter then starts while femd does other work (``femd run``:
    while the agent loads); if it cannot start, the first use says why.
    """
    _zygote.warm()


def probe_join(uid: int | None) -> str | None:
    """Can femd join a network namespace that *uid* created, and listen there?

    Runs ``unshare --user --net sleep`` (as *uid* when given), joins its
    namespace with the helper and opens a listener, as for a task. Returns
    None when it works, else the problem.
    """
    tool = shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if tool is None:
        return "unshare (util-linux) is not installed"
    try:
        proc = subprocess.Popen(  # noqa: S603 (fixed tool, no shell)
            [tool, "--user", "--net", "--", "sleep", "30"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin"},
            user=uid,
            extra_groups=[] if uid is not None else None,
        )
    except OSError as e:
        return f"cannot create a network namespace: {cut(e)}"
    try:
        return _probe_pid(proc)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _probe_pid(proc: subprocess.Popen[bytes]) -> str | None:
    own = os.readlink("/proc/self/ns/net")
    # unshare takes a few ms: poll often (start-up waits for this probe).
    for _ in range(1000):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            return f"cannot create a network namespace: {cut(err.strip())}"
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{proc.pid}/ns/net") != own:
                break
        threading.Event().wait(0.005)
    else:
        return "cannot create a network namespace: timed out"
    try:
        fd = os.open(f"/proc/{proc.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open a task's network namespace: {cut(e)}"
    try:
        helper = Helper(fd)
    except LaunchError as e:
        return str(e)
    finally:
        os.close(fd)
    try:
        listener = helper.ask("listen 127.0.1.1 9")
    except LaunchError as e:
        return str(e)
    finally:
        helper.close()
    if listener is not None:
        listener.close()
    return None
