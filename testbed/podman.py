"""A private rootless ``podman system service`` for tests and demos.

:class:`PodmanService` runs the distribution's Podman as the dedicated unprivileged
user (``femd-podman`` by default) on a unix socket of its own, the way femd's
production unit does: rootless, ``runc``, ``cgroupfs``, file events, no network.
femd (root in tests) connects to that socket with podman-py.

- :func:`ensure_podman_user` creates the user, its ``/etc/subuid`` and
  ``/etc/subgid`` ranges and its ``containers.conf``/``storage.conf`` by running
  ``scripts/setup-podman-user.sh`` (idempotent), the same script CI and the demo use.
- :meth:`PodmanService.build_busybox_image` imports a tiny image (a
  ``busybox-static`` root filesystem) with ``podman import`` as that user, since
  nothing can be pulled from the internet here, and returns its digest reference
  ``localhost/femd-test/busybox@sha256:<hex>``.
- :meth:`PodmanService.podman` runs the podman CLI as that user: test set-up and
  the baseline measurements only. femd itself never shells out to podman.
- :func:`unenforced_launcher` builds the launcher the tests and the bench use on
  a host where podman cannot enforce memory/cpu limits (rootless cgroup v1):
  everything else of the real path runs and is checked.

The service is started with ``--time=0`` (never exits by itself); containers run
under their own ``conmon`` and outlive a service restart, which is what the
launcher's ``adopt()`` relies on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from femd.launchers import LauncherEnv, LauncherProfile
from femd.launchers.podman import PodmanLauncher, TrialPodmanLauncher

__all__ = [
    "BUSYBOX_REPO",
    "PodmanService",
    "PodmanServiceError",
    "ensure_podman_user",
    "podman_available",
    "unenforced_launcher",
]

REPO = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO / "scripts" / "setup-podman-user.sh"
DEFAULT_USER = "femd-podman"
BUSYBOX_REPO = "localhost/femd-test/busybox"
_BUSYBOX = Path("/bin/busybox")
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# A setuid-root copy of busybox named ``su`` (an applet that needs euid 0): the
# escape suite checks that no-new-privileges makes it say "must be suid".
_SUID_BUSYBOX = "bin/suid/su"


class PodmanServiceError(RuntimeError):
    """The rootless podman service could not be set up, started or used."""


def podman_available() -> str | None:
    """Return why rootless podman cannot be used here, or None when it can."""
    if os.geteuid() != 0:
        return "the podman testbed must run as root (it runs podman as femd-podman)"
    for tool in ("podman", "runc", "newuidmap", "newgidmap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman runc uidmap)"
    if not _BUSYBOX.is_file():
        return f"{_BUSYBOX} is missing (apt-get install busybox-static)"
    return None


def unenforced_launcher(profile: LauncherProfile, env: LauncherEnv) -> PodmanLauncher:
    """A podman launcher that runs tasks without the memory/cpu limits this host lacks.

    It is ``femd doctor``'s trial launcher (each such launch logs a warning);
    every other limit is checked as the agent's launcher checks it. The agent
    never builds one: tests and benchmarks only.
    """
    return TrialPodmanLauncher(profile, env)


def ensure_podman_user(user: str = DEFAULT_USER) -> pwd.struct_passwd:
    """Create *user*, its subordinate ids and podman config unless they exist.

    Raises:
        PodmanServiceError: the set-up script failed.
    """
    env = {"PATH": _PATH, "FEMD_PODMAN_USER": user}
    done = subprocess.run(
        ["/bin/sh", str(SETUP_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise PodmanServiceError(
            f"{SETUP_SCRIPT.name} failed ({done.returncode}): {done.stderr.strip()}"
        )
    return pwd.getpwnam(user)


def _rootfs_tar() -> bytes:
    """A deterministic tar of a busybox-static root filesystem."""
    buf = io.BytesIO()
    body = _BUSYBOX.read_bytes()
    applets = subprocess.run(
        [str(_BUSYBOX), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()

    def add(
        name: str,
        *,
        mode: int,
        kind: bytes = tarfile.REGTYPE,
        data: bytes = b"",
        link: str = "",
    ) -> None:
        info = tarfile.TarInfo(name)
        info.mode, info.type, info.linkname = mode, kind, link
        info.uid = info.gid = 0
        info.mtime = 0
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in (
            "bin",
            "bin/suid",
            "etc",
            "dev",
            "proc",
            "sys",
            "run",
            "var",
            "root",
            "work",
        ):
            add(d, mode=0o755, kind=tarfile.DIRTYPE)
        add("tmp", mode=0o1777, kind=tarfile.DIRTYPE)
        add("bin/busybox", mode=0o755, data=body)
        add(_SUID_BUSYBOX, mode=0o4755, data=body)
        for applet in sorted(set(applets) - {"busybox"}):
            add(f"bin/{applet}", mode=0o777, kind=tarfile.SYMTYPE, link="busybox")
        add(
            "etc/passwd",
            mode=0o644,
            data=b"root:x:0:0:root:/root:/bin/sh\n"
            b"nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n",
        )
        add("etc/group", mode=0o644, data=b"root:x:0:\nnogroup:x:65534:\n")
        add("etc/shadow", mode=0o600, data=b"root:IMAGE-SHADOW:19000::::::\n")
    return buf.getvalue()


class PodmanService:
    """``podman system service`` run as an unprivileged user on a private socket.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self, user: str = DEFAULT_USER, socket_dir: Path | None = None
    ) -> None:
        """Prepare (not start) a service for *user*; *socket_dir*: a temp dir."""
        self.user = user
        self._socket_dir = socket_dir
        self._own_dir = False
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._pw: pwd.struct_passwd | None = None

    # -- identity ---------------------------------------------------------------
    @property
    def passwd(self) -> pwd.struct_passwd:
        """The service user's passwd entry (after :meth:`start`)."""
        if self._pw is None:
            raise PodmanServiceError("the podman service is not started")
        return self._pw

    @property
    def socket_path(self) -> Path:
        """The unix socket the service listens on."""
        if self._socket_dir is None:
            raise PodmanServiceError("the podman service is not started")
        return self._socket_dir / "podman.sock"

    @property
    def url(self) -> str:
        """podman-py base URL: ``unix:///…/podman.sock``."""
        return f"unix://{self.socket_path}"

    @property
    def runtime_dir(self) -> Path:
        """The user's ``XDG_RUNTIME_DIR``."""
        return Path(f"/run/user/{self.passwd.pw_uid}")

    def _env(self) -> dict[str, str]:
        return {
            "PATH": _PATH,
            "HOME": self.passwd.pw_dir,
            "USER": self.user,
            "LOGNAME": self.user,
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "LANG": "C.UTF-8",
        }

    def _as_user(self) -> dict[str, object]:
        pw = self.passwd
        return {
            "user": pw.pw_uid,
            "group": pw.pw_gid,
            "extra_groups": [],
            "env": self._env(),
            "cwd": pw.pw_dir,
        }

    # -- lifecycle --------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> PodmanService:
        """Create the user if needed, then start the service and wait for its socket.

        Raises:
            PodmanServiceError: podman is unusable, or the socket never answered.
        """
        why = podman_available()
        if why is not None:
            raise PodmanServiceError(why)
        self._pw = ensure_podman_user(self.user)
        pw = self._pw
        if self._socket_dir is None:
            base = Path(tempfile.mkdtemp(prefix="femd-podman-sock-"))
            self._own_dir = True
            self._socket_dir = base
        self._socket_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self._socket_dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self._socket_dir, 0o750)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        # A file, not a pipe: podman warns on stderr per request, and a full pipe
        # that nobody reads would block the service.
        self._log = tempfile.TemporaryFile(prefix="femd-podman-service-")  # noqa: SIM115
        self._process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", self.url],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
            **self._as_user(),  # type: ignore[call-overload]
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._log.seek(0)
                err = self._log.read()[-2000:].decode(errors="replace").strip()
                raise PodmanServiceError(f"podman system service exited: {err}")
            if self._ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise PodmanServiceError(f"podman socket {self.socket_path} did not answer")

    def _ping(self) -> bool:
        if not self.socket_path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            try:
                s.connect(str(self.socket_path))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.")
            except OSError:
                return False

    def stop(self) -> None:
        """Stop the service (containers keep running under conmon)."""
        proc, self._process = self._process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log, self._log = self._log, None
        if log is not None:
            log.close()
        if self._own_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start the service on the same socket (an agent-side restart)."""
        own = self._own_dir
        self._own_dir = False
        self.stop()
        self._own_dir = own
        self.start()

    def __enter__(self) -> PodmanService:
        """Start the service."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the service."""
        self.stop()

    # -- the CLI, for set-up and baselines only -----------------------------------
    def podman(
        self, args: Sequence[str], *, stdin: bytes | None = None, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman ARGS`` as the service user (local, not through the socket).

        Raises:
            PodmanServiceError: podman exited non-zero.
        """
        done = subprocess.run(
            ["podman", *args],
            input=stdin,
            capture_output=True,
            timeout=timeout_s,
            check=False,
            **self._as_user(),  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()
            raise PodmanServiceError(
                f"podman {' '.join(args[:3])} failed: {err[-500:]}"
            )
        return done  # type: ignore[no-any-return]

    def build_busybox_image(self, repo: str = BUSYBOX_REPO) -> str:
        """Import the busybox test image (once per content) and return ``repo@digest``.

        Raises:
            PodmanServiceError: the import failed.
        """
        tar = _rootfs_tar()
        content = hashlib.sha256(tar).hexdigest()[:32]
        tag = f"{repo}:{content}"
        exists = subprocess.run(
            ["podman", "image", "exists", tag],
            capture_output=True,
            check=False,
            **self._as_user(),  # type: ignore[call-overload]
        )
        if exists.returncode != 0:
            self.podman(
                [
                    "import",
                    "--change",
                    'CMD ["/bin/sh"]',
                    "--change",
                    "LABEL femd.test=busybox",
                    "-",
                    tag,
                ],
                stdin=tar,
            )
        out = self.podman(["image", "inspect", "--format", "{{.Digest}}", tag])
        digest = out.stdout.decode().strip()
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise PodmanServiceError(f"unexpected digest for {tag}: {digest!r}")
        return f"{repo}@{digest}"
