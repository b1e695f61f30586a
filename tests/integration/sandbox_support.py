"""Helpers for the real-bubblewrap tests of the ``process`` launcher.

``Sandbox`` owns one world-traversable scratch root (pytest's ``tmp_path`` is
0700 under root's own directory, which the unprivileged task user could not
even traverse, and the point here is that the *sandbox*, not file modes, keeps
things out), a stand-in for the agent's state dir, and a real
``BubblewrapLauncher``. When the tests run as root, the task user
(``femd-task``) is created if missing.

No fakes: every run is a real bwrap sandbox. When bubblewrap cannot create a
sandbox here the tests skip, unless ``CI=true`` or ``FEMD_TEST_REQUIRE`` names
``bwrap`` (or ``all``): then they fail (tests/conftest.py, "skips that cannot
lie").
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from femd.launchers import (
    Capabilities,
    LauncherProfile,
    LaunchSpec,
    Limits,
    Mount,
    Outcome,
    ProcessSettings,
    environment,
    start,
)
from femd.launchers.process import BubblewrapLauncher
from femd.launchers.profile import NetworkSettings
from tests.backends import unavailable

# A user of the tests' own: RLIMIT_NPROC counts every process of a uid, so the
# pids tests must not share their user with other femd runs on the same host.
TASK_USER = "femd-test-task"
BUSYBOX = "/usr/bin/busybox"


def ensure_task_user(name: str = TASK_USER) -> int:
    """Return the uid tasks run as; as root, create *name* when it is missing."""
    if os.geteuid() != 0:
        return os.getuid()
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        subprocess.run(  # noqa: S603 (fixed arguments)
            ["/usr/sbin/useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
            check=True,
        )  # fmt: skip
        return pwd.getpwnam(name).pw_uid


def profile(
    network: NetworkSettings | None = None, **process: object
) -> LauncherProfile:
    """A profile with a process section (settings overridable)."""
    settings = {"run_as": TASK_USER} | process
    return LauncherProfile(
        api_version="femd/v1",
        kind="LauncherProfile",
        name="default",
        process=ProcessSettings(**settings),  # type: ignore[arg-type]
        network=network or NetworkSettings(),
    )


def task_processes(uid: int, *, zombies: bool = False) -> list[int]:
    """Pids of every process whose real uid is *uid* (live ones unless *zombies*)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and (
            zombies or "Z" not in fields["State"]
        ):
            found.append(int(entry.name))
    return found


def settle(uid: int, timeout_s: float = 20.0) -> None:
    """Wait until no process of *uid* is left, zombies included.

    bwrap's outer process exits without reaping the sandbox's PID 1, which is
    then reparented to the host's init; until init reaps it, that zombie counts
    against RLIMIT_NPROC of the task user. systemd reaps at once; some minimal
    inits (this CI VM's) every second or two. Tests that measure the pids limit
    start from a clean count.
    """
    deadline = time.monotonic() + timeout_s
    while task_processes(uid, zombies=True):
        if time.monotonic() > deadline:
            left = task_processes(uid, zombies=True)
            raise AssertionError(f"processes of uid {uid} never went away: {left}")
        time.sleep(0.05)


class Sandbox:
    """A scratch root, an agent state stand-in, and a real launcher."""

    def __init__(self, root: Path, launcher_profile: LauncherProfile) -> None:
        self.root = root
        run_as = launcher_profile.process.run_as if launcher_profile.process else None
        self.uid = ensure_task_user(run_as or TASK_USER)
        self.state_dir = root / "state"  # the agent's state dir, stand-in
        self.state_dir.mkdir(mode=0o755)
        self.secret = self.state_dir / "state.sqlite"
        self.secret.write_text("agent secret\n")
        self.secret.chmod(0o644)  # readable by anyone: only the sandbox hides it
        self.profile = launcher_profile
        self.launcher = BubblewrapLauncher(
            launcher_profile, environment("process", self.state_dir)
        )
        self._count = 0

    @classmethod
    @contextmanager
    def open(cls, launcher_profile: LauncherProfile | None = None) -> Iterator[Sandbox]:
        root = Path(tempfile.mkdtemp(prefix="femd-sandbox-", dir="/tmp"))
        try:
            root.chmod(0o711)
            box = cls(root, launcher_profile or profile())
            caps = box.launcher.probe()
            if not caps.available:
                message = f"bubblewrap sandbox unavailable: {caps.problems}"
                unavailable("bwrap", message)
            yield box
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def caps(self) -> Capabilities:
        return self.launcher.probe()

    def _new_dir(self, kind: str, mode: int) -> Path:
        self._count += 1
        path = self.root / f"{kind}-{self._count}"
        path.mkdir()
        path.chmod(mode)
        return path

    def input_dir(self, files: dict[str, str | bytes] | None = None) -> Path:
        """A root-owned, world-readable input directory holding *files*."""
        path = self._new_dir("in", 0o755)
        for name, content in (files or {}).items():
            target = path / name
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
            target.chmod(0o644)
        return path

    def output_dir(self) -> Path:
        """An empty output directory, as the agent creates it."""
        return self._new_dir("out", 0o755)

    def spec(
        self,
        script: str,
        *,
        argv: tuple[str, ...] | None = None,
        mounts: tuple[Mount, ...] = (),
        env: tuple[tuple[str, str], ...] = (),
        output: Path | None = None,
        cpus: float = 1,
        memory_mb: int = 256,
        timeout_s: int = 20,
        pids: int = 256,  # generous: PID-1 zombies linger briefly (see settle)
        egress: tuple[str, ...] | None = None,
        listen: tuple[int, ...] = (),
        ingress_peers: tuple[str, ...] = (),
        log_max_bytes: int = 1 << 20,
        workdir: str | None = None,
        task_id: str | None = None,
        output_max_bytes: int = 1 << 20,
    ) -> LaunchSpec:
        self._count += 1
        # Unique: a task's cgroup is named after its id, and other test runs
        # on this host create theirs beside it.
        return LaunchSpec(
            task_id=task_id or f"task-{self._count}-{uuid.uuid4().hex[:12]}",
            launcher="process",
            profile=self.profile,
            argv=argv or ("/bin/sh", "-c", textwrap.dedent(script)),
            env=env,
            mounts=mounts,
            workdir=workdir,
            output_dir=str(output or self.output_dir()),
            limits=Limits(
                cpus=cpus, memory_mb=memory_mb, timeout_s=timeout_s, pids=pids
            ),
            egress=egress,
            listen=listen,
            ingress_peers=ingress_peers,
            log_max_bytes=log_max_bytes,
            output_max_bytes=output_max_bytes,
        )

    def run_unprivileged(
        self, name: str, script: str, *args: str
    ) -> tuple[Path, subprocess.CompletedProcess[str]]:
        """Run a Python *script* as the task user, as an unprivileged femd would.

        Its first argument is a fresh directory (owned by that user) holding
        an empty ``out``; *args* follow. Returns (that directory, the result).
        """
        gid = pwd.getpwuid(self.uid).pw_gid
        root = self.root / name
        (root / "out").mkdir(parents=True)
        for path in (root, root / "out"):
            os.chown(path, self.uid, gid)
        result = subprocess.run(  # noqa: S603 (our own interpreter and script)
            [sys.executable, "-c", script, str(root), *args],
            user=self.uid,
            group=gid,
            extra_groups=[],
            cwd=str(Path(__file__).resolve().parents[2]),
            capture_output=True,
            text=True,
            check=False,
            timeout=180,
        )
        return root, result

    def run(self, script: str, **kw: object) -> tuple[Outcome, Path]:
        """Run *script* with ``/bin/sh -c`` to the end; return (outcome, output dir)."""
        spec = self.spec(script, **kw)  # type: ignore[arg-type]
        handle = start(self.launcher, spec)
        outcome = handle.wait(spec.limits.timeout_s + 30)
        assert outcome is not None, "the launcher did not end the task"
        return outcome, Path(spec.output_dir)


@contextmanager
def tcp_listener() -> Iterator[socket.socket]:
    """A loopback TCP listener on a free port, non-blocking for accept()."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        yield server


def accepted(server: socket.socket) -> bool:
    """True if anybody connected to *server*."""
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True
