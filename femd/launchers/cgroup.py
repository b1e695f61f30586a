"""Per-task control groups: the process launcher's memory, pids and cpu limits.

Owns finding how this host can hold a task (``detect()``: cgroup v2 with a
delegated subtree, cgroup v1 as root, or neither), creating one cgroup per
task with its limits (``TaskCgroup.create``), killing everything in it
(``kill()``: ``cgroup.kill`` on v2; freeze, SIGKILL every member, thaw, until
empty on v1), reading what it used (``usage()``) and removing it. Does not
start processes: the launcher's entry step writes its own pid into
``procs_files()`` before it execs the sandbox, so no task code ever runs
outside its cgroup.

Layout. v2 (production: femd.service with ``Delegate=``): femd's own cgroup
(the service's) is the delegated root; femd moves itself into the leaf
``femd-agent`` below it (v2 allows processes only in leaves once controllers
are enabled for children), enables ``memory pids cpu`` (and ``io`` when
offered) in the root's ``cgroup.subtree_control``, and creates one sibling
``femd-task-<id>`` per task. v1 (femd as root): in every hierarchy a
``femd-task-<id>`` below femd's own cgroup there (memory, pids, cpu,
cpuacct, freezer). Not blkio: femd sets no io limit and reads no io figure,
and every hierarchy costs each launch a migration of the entry step (a
cgroup.procs write); the first migration after a quiet spell waits for an
RCU grace period (5-50 ms on a busy host), the next ones cost 0.1 ms, so
``warm_attach()`` takes that wait early, beside femd's own launch work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import msgspec

from femd.errors import cut
from femd.launchers import Usage
from femd.model import TaskId

__all__ = [
    "CgroupHost",
    "CgroupLimits",
    "TaskCgroup",
    "detect",
    "scope_of",
    "warm_attach",
]

AGENT_LEAF: Final = "femd-agent"
_PREFIX: Final = "femd-task-"
_V2_NEEDED: Final = ("memory", "pids", "cpu")
_V1_NEEDED: Final = ("memory", "pids", "cpu", "cpuacct", "freezer")
_PERIOD_US: Final = 100_000
_KILL_WAIT_S: Final = 10.0


class CgroupLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits one task cgroup gets."""

    memory_bytes: int
    pids: int
    cpus: float


class CgroupHost(msgspec.Struct, frozen=True, kw_only=True):
    """How this host can hold tasks in cgroups.

    ``dirs``: controller -> the directory task cgroups are created in (v2: one
    directory for every controller). ``problems``: why not, when ``kind`` is
    ``none``.
    """

    kind: Literal["v2", "v1", "none"]
    dirs: tuple[tuple[str, str], ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def enforced(self) -> str:
        """A short name of the mechanism, for doctor and the notes."""
        return f"cgroup {self.kind}" if self.kind != "none" else "none"


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    with path.open("w") as f:
        f.write(value)


def _own_paths(proc_self_cgroup: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as controller -> path ("" for the v2 line)."""
    paths: dict[str, str] = {}
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def detect(
    fs_root: Path = Path("/sys/fs/cgroup"),
    proc_self_cgroup: str | None = None,
    euid: int | None = None,
) -> CgroupHost:
    """Find how this host can hold tasks; prepares the v2 subtree (moves femd).

    Never raises: what does not work is a problem of the returned host.
    """
    try:
        text = (
            proc_self_cgroup
            if proc_self_cgroup is not None
            else Path("/proc/self/cgroup").read_text()
        )
    except OSError as e:
        return CgroupHost(kind="none", problems=(f"cannot read own cgroup: {e}",))
    own = _own_paths(text)
    if (fs_root / "cgroup.controllers").is_file() and "" in own:
        return _detect_v2(fs_root, own[""])
    if (euid if euid is not None else os.geteuid()) != 0:
        return CgroupHost(
            kind="none",
            problems=(
                "cgroup v1 host and femd is not root: no per-task memory, pids "
                "or cpu cgroup can be created",
            ),
        )
    return _detect_v1(fs_root, own)


def _detect_v2(fs_root: Path, own: str) -> CgroupHost:
    here = fs_root / own.lstrip("/")
    root = here.parent if here.name == AGENT_LEAF else here
    try:
        offered = _read(root / "cgroup.controllers").split()
        missing = [c for c in _V2_NEEDED if c not in offered]
        if missing:
            return CgroupHost(
                kind="none",
                problems=(
                    f"cgroup v2: controllers {', '.join(missing)} are not delegated "
                    f"to {root} (memory, pids and cpu need Delegate= on the unit)",
                ),
            )
        enabled = _read(root / "cgroup.subtree_control").split()
        wanted = [c for c in (*_V2_NEEDED, "io") if c in offered]
        if any(c not in enabled for c in wanted):
            others = set(_read(root / "cgroup.procs").split()) - {str(os.getpid())}
            if others:
                # Not a cgroup of femd's own (a login session, say): leave it.
                return CgroupHost(
                    kind="none",
                    problems=(
                        f"cgroup v2: {root} holds other processes: femd needs a "
                        "delegated cgroup of its own for memory, pids and cpu "
                        "(Delegate= on its unit)",
                    ),
                )
            # v2's "no internal processes": femd leaves the root for a leaf
            # before controllers are enabled for the root's children.
            leaf = root / AGENT_LEAF
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(
                root / "cgroup.subtree_control",
                " ".join(f"+{c}" for c in wanted if c not in enabled),
            )
    except OSError as e:
        return CgroupHost(
            kind="none",
            problems=(f"cgroup v2: cannot use {root} (not delegated?): {cut(e)}",),
        )
    return CgroupHost(kind="v2", dirs=(("", str(root)),))


def _detect_v1(fs_root: Path, own: Mapping[str, str]) -> CgroupHost:
    dirs: list[tuple[str, str]] = []
    for name in _V1_NEEDED:
        mount = fs_root / name
        if name not in own or not (mount / "cgroup.procs").is_file():
            return CgroupHost(
                kind="none",
                problems=(f"cgroup v1: the {name} controller is not mounted",),
            )
        # Co-mounted controllers (cpu,cpuacct) are one directory.
        base = Path(os.path.realpath(mount / own[name].lstrip("/")))
        if not os.access(base, os.W_OK):
            return CgroupHost(
                kind="none", problems=(f"cgroup v1: {base} is not writable",)
            )
        dirs.append((name, str(base)))
    return CgroupHost(kind="v1", dirs=tuple(dirs))


def warm_attach(
    host: CgroupHost,
    fs_root: Path = Path("/sys/fs/cgroup"),
    proc_self_cgroup: str | None = None,
) -> None:
    """Take the kernel's cgroup attach lock once, moving femd where it is.

    The first cgroup migration after a quiet spell waits for an RCU grace
    period (the global threadgroup lock leaves its fast mode: 5-50 ms on a
    busy host); those that follow within a grace period do not (0.1 ms).
    The write runs in a thread of its own as a launch begins, so that wait
    overlaps femd's own launch work instead of delaying the entry step's
    migration; the file is opened here, so the thread needs the GIL only to
    start. femd writes its pid into the cgroup it is in now (re-read):
    nothing moves. Best effort: errors are ignored (the entry step's own
    migration is what holds the task).
    """
    if host.kind == "none":
        return
    try:
        text = (
            proc_self_cgroup
            if proc_self_cgroup is not None
            else Path("/proc/self/cgroup").read_text()
        )
        own = _own_paths(text)
        # One hierarchy is enough: the lock is global.
        where = fs_root / "pids" if host.kind == "v1" else fs_root
        key = "pids" if host.kind == "v1" else ""
        if key not in own:
            return
        procs = where / own[key].lstrip("/") / "cgroup.procs"
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return
    pid = str(os.getpid()).encode()
    threading.Thread(target=_write_and_close, args=(fd, pid), daemon=True).start()


def _write_and_close(fd: int, data: bytes) -> None:
    try:
        with contextlib.suppress(OSError):
            os.write(fd, data)
    finally:
        os.close(fd)


def scope_of(state_dir: Path) -> str:
    """A short, stable tag of one agent: its state directory's path, hashed.

    Agents started from one shell (the demo, the tests) share a parent cgroup;
    their task cgroups carry this tag so the same task id on two nodes of one
    host gets two cgroups. It survives restarts (recovery finds the cgroups).
    """
    return hashlib.sha256(os.fsencode(os.path.abspath(state_dir))).hexdigest()[:8]


class TaskCgroup:
    """One task's cgroup (v2: one directory; v1: one per hierarchy)."""

    def __init__(self, host: CgroupHost, name: str) -> None:
        """Refer to the cgroup *name* (``femd-task-<id>``) of *host*."""
        if host.kind == "none":
            raise RuntimeError("no cgroup on this host")
        self.host = host
        self.name = name
        self.dirs = {c: Path(d) / name for c, d in host.dirs}
        self._pids_peak = 0

    @classmethod
    def of_task(cls, host: CgroupHost, task_id: TaskId, scope: str = "") -> TaskCgroup:
        """The cgroup a task of this id runs (or ran) in.

        *scope* (see ``scope_of``) keeps two agents on one host apart: the same
        task id sent to two nodes must never share, or kill, one cgroup.
        """
        return cls(host, _PREFIX + (f"{scope}-" if scope else "") + task_id)

    def _dir(self, controller: str) -> Path:
        return self.dirs[""] if self.host.kind == "v2" else self.dirs[controller]

    def _unique_dirs(self) -> list[Path]:
        return list(dict.fromkeys(self.dirs.values()))

    def exists(self) -> bool:
        """True when any directory of this cgroup is still there."""
        return any(d.is_dir() for d in self._unique_dirs())

    def create(self, limits: CgroupLimits) -> None:
        """Make the cgroup and set its limits (swap off, OOM kills in it).

        Raises:
            OSError: the cgroup cannot be made or a limit cannot be written (the
                half-made cgroup is removed).
        """
        try:
            for d in self._unique_dirs():
                d.mkdir()
            quota = max(1000, round(limits.cpus * _PERIOD_US))
            if self.host.kind == "v2":
                d = self.dirs[""]
                _write(d / "memory.max", str(limits.memory_bytes))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
                if (d / "memory.oom.group").exists():
                    # The whole task goes at once: no half-killed task limps on.
                    _write(d / "memory.oom.group", "1")
                _write(d / "pids.max", str(limits.pids))
                _write(d / "cpu.max", f"{quota} {_PERIOD_US}")
            else:
                mem = self.dirs["memory"]
                _write(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
                if (mem / "memory.memsw.limit_in_bytes").exists():
                    _write(
                        mem / "memory.memsw.limit_in_bytes", str(limits.memory_bytes)
                    )
                with contextlib.suppress(OSError):
                    _write(mem / "memory.swappiness", "0")
                _write(self.dirs["pids"] / "pids.max", str(limits.pids))
                cpu = self.dirs["cpu"]
                _write(cpu / "cpu.cfs_period_us", str(_PERIOD_US))
                _write(cpu / "cpu.cfs_quota_us", str(quota))
        except OSError:
            self.remove()
            raise

    def procs_files(self) -> list[str]:
        """Where the entry step writes its pid (every hierarchy on v1)."""
        return [str(d / "cgroup.procs") for d in self._unique_dirs()]

    def pids(self) -> set[int]:
        """Every process in the cgroup now (any hierarchy on v1)."""
        found: set[int] = set()
        for d in self._unique_dirs():
            with contextlib.suppress(OSError, ValueError):
                found |= {int(p) for p in _read(d / "cgroup.procs").split()}
        return found

    def sample(self) -> None:
        """Note the current number of tasks (for the peak where none is kept)."""
        with contextlib.suppress(OSError, ValueError):
            now = int(_read(self._dir("pids") / "pids.current"))
            self._pids_peak = max(self._pids_peak, now)

    def oom_killed(self) -> bool:
        """True when the kernel's OOM killer killed something in the cgroup."""
        name = "memory.events" if self.host.kind == "v2" else "memory.oom_control"
        with contextlib.suppress(OSError, ValueError):
            for line in _read(self._dir("memory") / name).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        return False

    def kill(self, wait_s: float = _KILL_WAIT_S) -> bool:
        """SIGKILL every process in the cgroup; True once it is empty.

        v2 with ``cgroup.kill`` (Linux 5.14): one write. Otherwise the cgroup
        is frozen (no member can fork or exit, so no pid is reused while it is
        signalled), every member gets SIGKILL, and it is thawed; again until
        nothing is left.
        """
        deadline = time.monotonic() + wait_s
        kill_file = self._dir("") / "cgroup.kill" if self.host.kind == "v2" else None
        while True:
            pids = self.pids()
            if not pids:
                return True
            if kill_file is not None and kill_file.exists():
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
            else:
                self._freeze_kill(pids)
            if time.monotonic() >= deadline:
                return not self.pids()
            time.sleep(0.05)

    def _freeze_kill(self, pids: set[int]) -> None:
        if self.host.kind == "v2":
            state, frozen, thawed = self._dir("") / "cgroup.freeze", "1", "0"
        else:
            state, frozen, thawed = (
                self.dirs["freezer"] / "freezer.state",
                "FROZEN",
                "THAWED",
            )
        with contextlib.suppress(OSError):
            _write(state, frozen)
            until = time.monotonic() + 1.0
            while time.monotonic() < until and not self._frozen(state, frozen):
                time.sleep(0.01)
        for pid in pids | self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            _write(state, thawed)

    def _frozen(self, state: Path, frozen: str) -> bool:
        if self.host.kind == "v2":
            events = _read(state.parent / "cgroup.events").splitlines()
            return "frozen 1" in events
        return _read(state) == frozen

    def usage(self) -> Usage:
        """CPU seconds, peak memory and peak pids so far (None where unknown)."""
        self.sample()
        cpu_s: float | None = None
        peak_mem: int | None = None
        peak_pids: int | None = self._pids_peak or None
        with contextlib.suppress(OSError, ValueError):
            if self.host.kind == "v2":
                for line in _read(self.dirs[""] / "cpu.stat").splitlines():
                    key, _, value = line.partition(" ")
                    if key == "usage_usec":
                        cpu_s = int(value) / 1e6
            else:
                cpu_s = int(_read(self.dirs["cpuacct"] / "cpuacct.usage")) / 1e9
        mem_file = (
            "memory.peak" if self.host.kind == "v2" else "memory.max_usage_in_bytes"
        )
        with contextlib.suppress(OSError, ValueError):
            peak_mem = int(_read(self._dir("memory") / mem_file))
        if self.host.kind == "v2":
            with contextlib.suppress(OSError, ValueError):
                peak_pids = max(peak_pids or 0, int(_read(self.dirs[""] / "pids.peak")))
        return Usage(
            cpu_s=None if cpu_s is None else round(cpu_s, 3),
            memory_peak_bytes=peak_mem,
            pids_peak=peak_pids,
        )

    def remove(self) -> None:
        """Remove the (empty) cgroup directories (a busy one stays)."""
        for d in self._unique_dirs():
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        break
                    time.sleep(0.05)
