"""A booted systemd for system tests: Debian 12 in systemd-nspawn.

The host has no systemd as PID 1, so femd's units, journald audit and package
scripts are exercised inside a container that boots a real systemd:

1. ``ensure_rootfs()`` debootstraps a Debian 12 (bookworm) minbase root with
   systemd and every package femd's ``.deb`` depends on, **once**, into a cache
   directory keyed by a hash of the package list (``$FEMD_TEST_CACHE`` or
   ``/var/cache/femd-test``). Later runs reuse it, so no network is needed at
   test time (installing ``femd.deb`` finds its dependencies already there).
2. ``Container.boot(rootfs)`` puts a throw-away overlay (or, where overlayfs is
   not available, a copy) on top of the cached root, starts
   ``systemd-nspawn --boot --register=no --keep-unit --private-network`` in the
   background with the console in a log file, finds the container's PID 1 and
   waits for ``systemctl is-system-running --wait``.
   On a cgroup v1 host, ``boot(..., writable_cgroup_v1=True)`` then makes the
   container's v1 controller mounts writable (see ``Container.boot``).
3. Commands run inside with ``nsenter -t <pid 1> -a`` (``exec``), files go in as
   a tar stream (``copy_in``), the journal comes back as JSON (``journal``),
   and ``poweroff()`` stops the container and removes every trace.

Network: the container has its own network namespace with loopback only
(``--private-network``). Tests that need a broker run RabbitMQ *inside* the
container (the package is installed, its unit disabled) and submit from inside,
so nothing depends on the host's network or ports.

Run as a script to build the cache or get a shell::

    python testbed/nspawn.py build        # debootstrap once (about 80-120 s)
    python testbed/nspawn.py shell        # boot a throw-away container, bash in it
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "BARE_BASE",
    "BARE_PACKAGES",
    "PACKAGES",
    "BootError",
    "Container",
    "available",
    "cache_dir",
    "ensure_rootfs",
    "host_is_cgroup_v1",
]

SUITE = "bookworm"
MIRROR = os.environ.get("FEMD_TEST_MIRROR", "http://deb.debian.org/debian")
# Everything femd.deb depends on (so installing it needs no network), plus what a
# booted system and the tests need.
PACKAGES: tuple[str, ...] = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "python3-systemd",
    "bubblewrap",
    "podman",
    "uidmap",
    "runc",
    # podman's Recommends, which femd.deb recommends too: rootless networking,
    # an init for containers, overlay storage for rootless users.
    "slirp4netns",
    "catatonit",
    "fuse-overlayfs",
    "rabbitmq-server",
    "ca-certificates",
    "busybox-static",
    "procps",
)
# The newcomer's machine the README promises to work on: a booted minimal
# Debian 12 (debootstrap minbase and an init) where only python3 and git were
# added. scripts/install.sh must bring everything else.
BARE_BASE: tuple[str, ...] = ("systemd", "systemd-sysv", "dbus")
BARE_PACKAGES: tuple[str, ...] = ("python3", "git")
# Bump when the preparation below changes, so old caches are not reused.
_RECIPE = "3"
_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "cat",
    "SYSTEMD_COLORS": "0",
    "DEBIAN_FRONTEND": "noninteractive",
}


# The v1 controllers femd puts a task's cgroup in (femd.launchers.cgroup).
_V1_CONTROLLERS = frozenset({"memory", "pids", "cpu", "cpuacct", "freezer", "blkio"})


class BootError(RuntimeError):
    """The container could not be built, booted or reached."""


def available() -> str | None:
    """Say why a booted container cannot be had here, or None when it can."""
    if os.geteuid() != 0:
        return "system tests need root (systemd-nspawn, nsenter, debootstrap)"
    for tool in ("systemd-nspawn", "nsenter", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def host_is_cgroup_v1(fs_root: Path = Path("/sys/fs/cgroup")) -> bool:
    """True when this host mounts the cgroup v1 memory controller (legacy/hybrid)."""
    return (fs_root / "memory" / "cgroup.procs").is_file()


def cache_dir() -> Path:
    """Where cached roots (and other slow-to-build test artefacts) live."""
    return Path(os.environ.get("FEMD_TEST_CACHE", "/var/cache/femd-test"))


def _key(packages: Sequence[str], base: Sequence[str]) -> str:
    text = "\n".join([_RECIPE, SUITE, MIRROR, *sorted(packages)])
    if tuple(base) != _BASE:  # keeps the key of existing caches
        text += "\nbase:" + ",".join(sorted(base))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_rootfs(
    packages: Sequence[str] = PACKAGES,
    *,
    cache: Path | None = None,
    base: Sequence[str] | None = None,
) -> Path:
    """Return a cached Debian root with *packages*, debootstrapping it once.

    *base* is what debootstrap itself adds to minbase (default: systemd,
    dbus and ca-certificates); *packages* are then installed with apt.

    The root is built in a temporary directory next to the cache entry and
    renamed into place only when complete, so an interrupted build is never
    reused.

    Raises:
        BootError: debootstrap or the preparation failed.
    """
    include = _BASE if base is None else tuple(base)
    where = cache or cache_dir()
    root = where / f"rootfs-{SUITE}-{_key(packages, include)}"
    if (root / ".femd-complete").exists():
        return root
    where.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=where))
    try:
        _debootstrap(tmp, packages, include)
        _prepare(tmp)
        (tmp / ".femd-complete").write_text(" ".join(sorted(packages)) + "\n")
        if (root / ".femd-complete").exists():  # another run finished first
            shutil.rmtree(tmp)
            return root
        if root.exists():  # a stale, incomplete entry
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


_BASE = ("systemd", "systemd-sysv", "dbus", "ca-certificates")


def _run(cmd: Sequence[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        if log is not None and log.exists():
            tail += "\n--- " + str(log) + "\n" + log.read_text(errors="replace")[-3000:]
        raise BootError(f"{what} failed ({done.returncode}):\n{tail}")


def _debootstrap(root: Path, packages: Sequence[str], base: Sequence[str]) -> None:
    """A minbase root with systemd, then apt (a real resolver) for the rest."""
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(base),
            SUITE,
            str(root),
            MIRROR,
        ],
        "debootstrap",
        root / "debootstrap/debootstrap.log",
    )
    security = MIRROR.rstrip("/") + "-security"
    (root / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {security} {SUITE}-security main\n"
    )
    nspawn = [
        "systemd-nspawn",
        "-q",
        "-D",
        str(root),
        "--register=no",
        "--keep-unit",
        "--pipe",
        "-E",
        "DEBIAN_FRONTEND=noninteractive",
    ]
    _run([*nspawn, "apt-get", "update"], "apt-get update")
    install = ["apt-get", "install", "-y", "--no-install-recommends"]
    _run([*nspawn, *install, *packages], "apt-get install")


def _prepare(root: Path) -> None:
    """Make the fresh root boot quickly and quietly in a container."""
    # An empty machine-id: systemd generates a fresh one at every boot.
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("fdn-test\n")
    hosts = "127.0.0.1 localhost\n127.0.1.1 fdn-test\n::1 localhost\n"
    (root / "etc/hosts").write_text(hosts)
    # The broker runs only when a test starts it; nothing waits for a network.
    for unit in (
        "rabbitmq-server.service",
        "epmd.service",
        "epmd.socket",
        "systemd-networkd-wait-online.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    ):
        subprocess.run(
            ["systemctl", "--root", str(root), "disable", unit],
            capture_output=True,
            check=False,
        )
    subprocess.run(
        ["systemctl", "--root", str(root), "mask", "getty@tty1.service"],
        capture_output=True,
        check=False,
    )
    subprocess.run(
        ["chroot", str(root), "apt-get", "clean"], capture_output=True, check=False
    )


def _mount_overlay(lower: Path, work: Path) -> Path | None:
    merged, upper, scratch = work / "root", work / "upper", work / "work"
    for d in (merged, upper, scratch):
        d.mkdir()
    opts = f"lowerdir={lower},upperdir={upper},workdir={scratch}"
    done = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)],
        capture_output=True,
        check=False,
    )
    return merged if done.returncode == 0 else None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def _is_container_init(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) >= 2 and ids[-1] == "1"
    return False


class Container:
    """One booted, throw-away container; use as a context manager.

    Attributes:
        root: the container's root directory as seen from the host.
        pid: host pid of the container's systemd (PID 1 inside).
        console: file with the container's console output.
    """

    def __init__(
        self, root: Path, workdir: Path, proc: subprocess.Popen[bytes]
    ) -> None:
        """Wrap a started nspawn process; use ``Container.boot()``."""
        self.root = root
        self.workdir = workdir
        self.console = workdir / "console.log"
        self._proc = proc
        self._overlay = root.name == "root" and root.parent == workdir
        self.pid = 0

    @classmethod
    def boot(
        cls,
        rootfs: Path,
        *,
        private_network: bool = True,
        api_vfs_writable: bool = True,
        timeout_s: float = 120.0,
        extra_args: Sequence[str] = (),
        writable_cgroup_v1: bool = False,
    ) -> Container:
        """Boot a container on a throw-away layer over *rootfs*.

        *writable_cgroup_v1*: on a cgroup v1 host, systemd-nspawn mounts the
        v1 controller hierarchies read-only in the container, so nothing in it
        can create a cgroup (femd as root refuses every process task there, as
        on any host where it cannot). With this option, once the container is
        up, the host (as host root, in the container's mount namespace only:
        no user namespace, so with the host's capabilities) remounts the
        container's memory, pids, cpu, cpuacct, freezer and blkio mounts
        read-write, as a bare v1 machine has them. Each mount keeps its root
        (nspawn's cgroup namespace root, i.e. the cgroup the container runs
        in), so the paths in the container's ``/proc/self/cgroup`` resolve
        under them and task cgroups land below the container's own cgroup.
        Off by default: other system tests prove femd under a container that
        cannot make cgroups. Ignored on a cgroup v2 host.

        Raises:
            BootError: the container did not reach a running state in time, or
                its cgroup v1 mounts could not be made writable.
        """
        workdir = Path(tempfile.mkdtemp(prefix="femd-nspawn-"))
        root = _mount_overlay(rootfs, workdir)
        if root is None:
            root = workdir / "copy"
            subprocess.run(["cp", "-a", str(rootfs), str(root)], check=True)
        # A machine name allows letters, digits and "-" only (mkdtemp may give "_").
        name = "femd-" + secrets.token_hex(4)
        cmd = [
            "systemd-nspawn",
            "-D",
            str(root),
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            f"--machine={name}",
            *(["--private-network"] if private_network else []),
            *extra_args,
        ]
        console = (workdir / "console.log").open("wb")
        env = {**os.environ, "SYSTEMD_NSPAWN_TMPFS_TMP": "0"}
        if api_vfs_writable:
            env["SYSTEMD_NSPAWN_API_VFS_WRITABLE"] = "1"
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        console.close()
        box = cls(root, workdir, proc)
        try:
            box._wait_booted(timeout_s)
            if writable_cgroup_v1 and host_is_cgroup_v1():
                box._make_cgroup_v1_writable()
        except BaseException:
            box.poweroff()
            raise
        return box

    def _wait_booted(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.pid:
            if self._proc.poll() is not None:
                raise BootError(f"systemd-nspawn exited:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise BootError(f"no container init found:\n{self.console_tail()}")
            self.pid = self._find_init()
            if not self.pid:
                time.sleep(0.05)
        # "offline" until PID 1 listens on its private socket: keep asking.
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BootError(f"systemd did not come up:\n{self.console_tail()}")
            state = self.exec(
                ["systemctl", "is-system-running", "--wait"],
                check=False,
                timeout_s=left,
            ).stdout.strip()
            if state in ("running", "degraded"):
                return
            if state in ("maintenance", "stopping"):
                raise BootError(f"system is {state}:\n{self.console_tail()}")
            time.sleep(0.2)

    def _make_cgroup_v1_writable(self) -> None:
        # Mount points as the container sees them (relative to its root).
        # Co-mounted controllers (cpu,cpuacct) are one mount, remounted once.
        targets = []
        for line in Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines():
            fields, _, tail = line.partition(" - ")
            fstype, _src, super_opts = tail.split(" ")[:3]
            point = fields.split(" ")[4]
            if (
                fstype == "cgroup"
                and point.startswith("/sys/fs/cgroup/")
                and _V1_CONTROLLERS & set(super_opts.split(","))
            ):
                targets.append(point)
        if not targets:
            raise BootError("no cgroup v1 controller is mounted in the container")
        for point in targets:
            # A bind remount changes only this mount's flags: the hierarchy
            # and the mount's root stay nspawn's.
            _run(
                ["nsenter", "-t", str(self.pid), "-m", "--", "mount", "-o",
                 "remount,bind,rw,nosuid,nodev,noexec", point],
                f"making {point} writable in the container",
            )  # fmt: skip

    def _find_init(self) -> int:
        todo = _children(self._proc.pid)
        while todo:
            pid = todo.pop()
            if _is_container_init(pid):
                return pid
            todo += _children(pid)
        return 0

    def console_tail(self, limit: int = 4000) -> str:
        """The end of the console log."""
        try:
            return self.console.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def exec(
        self,
        cmd: Sequence[str],
        *,
        check: bool = True,
        input: bytes | str | None = None,
        timeout_s: float = 300.0,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *cmd* inside the container (all its namespaces); text output.

        Raises:
            subprocess.CalledProcessError: *check* and a non-zero exit; the
                message carries stdout and stderr.
        """
        argv = self._argv(cmd, env=env, user=user)
        data = input.encode() if isinstance(input, str) else input
        raw = subprocess.run(
            argv, input=data, capture_output=True, timeout=timeout_s, check=False
        )
        done = subprocess.CompletedProcess(
            list(cmd),
            raw.returncode,
            raw.stdout.decode(errors="replace"),
            raw.stderr.decode(errors="replace"),
        )
        if check and done.returncode != 0:
            raise _Failed(done)
        return done

    def _argv(
        self,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> list[str]:
        if not self.pid:
            raise BootError("the container is not running")
        full_env = {**_ENV, **(env or {})}
        pre: list[str] = []
        if user:
            gid = self.exec(["id", "-g", user]).stdout.strip()
            pre = ["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups"]
        return [
            "nsenter",
            "-t",
            str(self.pid),
            "-a",
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in full_env.items()),
            *pre,
            *cmd,
        ]

    def shell(
        self, script: str, *, check: bool = True, input: bytes | str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a ``sh -ec`` *script* inside the container."""
        return self.exec(["sh", "-ec", script], check=check, input=input)

    def copy_in(self, src: Path, dst: str, *, mode: int | None = None) -> None:
        """Copy a host file or directory to *dst* inside the container.

        A file lands exactly at *dst*; a directory's contents land in *dst*.
        """
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            if src.is_dir():
                tar.add(src, arcname=".")
                target = dst
            else:
                info = tar.gettarinfo(str(src), arcname=Path(dst).name)
                if mode is not None:
                    info.mode = mode
                with src.open("rb") as f:
                    tar.addfile(info, f)
                target = str(Path(dst).parent)
        self.exec(["mkdir", "-p", target])
        self.exec(
            ["tar", "-x", "--no-same-owner", "-C", target, "-f", "-"],
            input=buf.getvalue(),
        )

    def write(self, dst: str, data: bytes | str, *, mode: int = 0o644) -> None:
        """Write *data* to the file *dst* inside the container."""
        self.exec(["mkdir", "-p", str(Path(dst).parent)])
        self.exec(
            ["sh", "-c", 'cat > "$0" && chmod "$1" "$0"', dst, f"{mode:o}"], input=data
        )

    def read(self, path: str) -> str:
        """The text of the file *path* inside the container."""
        return self.exec(["cat", path]).stdout

    def systemctl(self, *args: str, check: bool = True) -> str:
        """``systemctl ARGS``; its stdout."""
        return self.exec(["systemctl", *args], check=check).stdout

    def unit_property(self, unit: str, prop: str) -> str:
        """One property of *unit*, e.g. ``ActiveState``."""
        out = self.systemctl("show", "--property", prop, "--value", unit)
        return out.strip()

    def wait_unit(
        self,
        unit: str,
        states: Sequence[str] = ("active",),
        *,
        timeout_s: float = 60.0,
    ) -> str:
        """Wait until *unit*'s ActiveState is one of *states*; return it.

        Raises:
            BootError: it did not get there in time (the unit's journal is in
                the message).
        """
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            state = self.unit_property(unit, "ActiveState")
            if state in states:
                return state
            time.sleep(0.2)
        log = self.exec(
            ["journalctl", "-u", unit, "--no-pager", "-n", "60"], check=False
        ).stdout
        raise BootError(f"{unit} is {state!r}, wanted {list(states)}:\n{log}")

    def journal(
        self,
        unit: str | None = None,
        *,
        identifier: str | None = None,
        since_cursor: str | None = None,
        **matches: str,
    ) -> list[dict[str, Any]]:
        """Journal entries inside the container as ``journalctl -o json`` dicts.

        *matches* are journal field matches (``FEMD_TASK_ID="..."``); they are
        ANDed with *unit* (``-u``) and *identifier* (``-t``).
        """
        cmd = ["journalctl", "--no-pager", "-o", "json", "--all"]
        if unit:
            cmd += ["-u", unit]
        if identifier:
            cmd += ["-t", identifier]
        if since_cursor:
            cmd += ["--after-cursor", since_cursor]
        cmd += [f"{k}={v}" for k, v in matches.items()]
        out = self.exec(cmd).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_sync(self) -> None:
        """Make journald write out what it has received so far."""
        self.exec(["journalctl", "--sync"], check=False)

    def poweroff(self, timeout_s: float = 30.0) -> None:
        """Stop the container and remove its layer; safe to call twice."""
        if self._proc.poll() is None:
            if self.pid:
                # SIGRTMIN+4 asks systemd for a clean poweroff.
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGRTMIN + 4)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=30)
        self.pid = 0
        if self._overlay:
            subprocess.run(["umount", "-l", str(self.root)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Container:
        """Use the container in a ``with`` block."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Power off and clean up."""
        self.poweroff()


class _Failed(subprocess.CalledProcessError):
    def __init__(self, done: subprocess.CompletedProcess[str]) -> None:
        super().__init__(done.returncode, done.args, done.stdout, done.stderr)

    def __str__(self) -> str:
        return (
            f"{' '.join(map(str, self.cmd))!s} exited {self.returncode}\n"
            f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"
        )


@contextlib.contextmanager
def booted(*, private_network: bool = True) -> Iterator[Container]:
    """Boot a container on the cached root; power it off afterwards."""
    box = Container.boot(ensure_rootfs(), private_network=private_network)
    try:
        yield box
    finally:
        box.poweroff()


def _main(argv: Sequence[str]) -> int:
    why = available()
    if why:
        print(f"nspawn: {why}", file=sys.stderr)  # noqa: T201
        return 2
    what = argv[0] if argv else "build"
    started = time.monotonic()
    root = ensure_rootfs()
    print(f"rootfs {root} ready in {time.monotonic() - started:.1f} s")  # noqa: T201
    if what == "shell":
        started = time.monotonic()
        with booted() as box:
            took = time.monotonic() - started
            print(f"booted in {took:.1f} s, pid {box.pid}")  # noqa: T201
            subprocess.run(box._argv(["bash", "-l"]), check=False)
    elif what == "boot":
        started = time.monotonic()
        with booted() as box:
            took = time.monotonic() - started
            print(f"booted in {took:.1f} s, pid {box.pid}")  # noqa: T201
            print(box.systemctl("is-system-running", check=False).strip())  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
