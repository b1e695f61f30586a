"""The ``process`` launcher: a plain process in a bubblewrap sandbox.

Owns ``BubblewrapLauncher`` and its handle: the bwrap command line, the
resource limits (its cgroup, rlimits), the built-in seccomp filter, privilege
dropping, log capture, timeout and cancellation. Does not decide what may run
(the policy does) nor collect outputs (``stageout`` does).

How each limit is enforced (``Capabilities.enforcement`` says the same):

- memory, pids, cpus: the task's own cgroup (``cgroup``: v2 in femd.service's
  delegated subtree, v1 when femd runs as root). Memory counts everything the
  task holds (anonymous, page cache, tmpfs, memfd, shm; swap off) and the OOM
  killer acts inside it; pids are per task; cpus are a CFS quota (0.5 works).
  A host with neither refuses every task (``launcher.unenforceable``). The
  entry step (``/bin/sh``, femd's identity) sets the rlimits (``ulimit``:
  file size, open files, no core dumps, a CPU time backstop), writes its own
  pid into the cgroup, then execs ``setpriv`` (when femd is root: to the task
  user) and bwrap: no task code ever runs outside the cgroup.
- outputs: the output directory is a tmpfs of the task's output cap, charged
  to its memory cgroup; ``capture`` streams it out when the command ends.
- network: always its own empty network namespace; what the policy allows
  (egress to named ``host:port``, ingress on named ports) is forwarded by
  femd (``network.TaskNetwork``, docs/network.md), attached while bwrap
  holds the command back (``--block-fd``).
- time: the wall-clock timeout, a cancel and the end of the task kill the
  whole cgroup, so nothing survives (double-forked, setsid'd, or a sandbox
  stuck in bwrap's setup). After an agent restart ``adopt()`` kills what a
  task left in its cgroup.

Namespaces: user, mount, pid, IPC and network; not uts nor
cgroup, which femd.service refuses (see ``sandbox._NAMESPACES``). ``probe()`` runs a
real (empty) sandbox the way a task runs, in a cgroup of its own.
"""

from __future__ import annotations

import logging
import os
import platform
import pwd
import shutil
import subprocess
import threading
from typing import ClassVar, Final

from femd.errors import LaunchError, LauncherUnavailableError, UnenforceableError, cut
from femd.launchers import Capabilities, LauncherEnv, LaunchSpec, unenforceable
from femd.launchers.cgroup import (
    CgroupHost,
    CgroupLimits,
    TaskCgroup,
    detect,
    warm_attach,
)
from femd.launchers.netns import probe_join
from femd.launchers.network import TaskNetwork
from femd.launchers.process.entry import TaskUser, entry_prefix
from femd.launchers.process.handle import ProcessHandle
from femd.launchers.process.sandbox import HOST_PATH, bwrap_argv, check_spec
from femd.launchers.process.seccomp import seccomp_filter, seccomp_memfd
from femd.launchers.profile import LauncherProfile, ProcessSettings
from femd.model import TaskId

__all__ = ["BubblewrapLauncher"]

logger = logging.getLogger(__name__)

_TOOLS: Final = ("bwrap", "sh")


class BubblewrapLauncher:
    """Runs a task as an unprivileged process in a bubblewrap sandbox."""

    name: ClassVar[str] = "process"

    def __init__(self, profile: LauncherProfile, env: LauncherEnv) -> None:
        """Keep the profile; logs go under ``env.state_dir``."""
        self._profile = profile
        self._log_dir = env.state_dir
        self._caps: Capabilities | None = None
        self._cgroups: CgroupHost | None = None
        self._scope = env.scope

    # -- probe ---------------------------------------------------------------

    def probe(self) -> Capabilities:
        """Find what this host can enforce, running a real (empty) sandbox.

        ``start()`` probes before every launch, so an available result is
        reused (a reload builds a new launcher, hence probes afresh): a smoke
        sandbox per task doubled the sandboxes. The smoke runs in a cgroup of
        its own, entered like a task's: a host whose cgroups cannot be made or
        entered enforces no memory, pids or cpu limit (every task is refused).
        """
        if self._caps is not None and self._caps.available:
            return self._caps
        problems: list[str] = []
        settings = self._profile.process
        user = None
        try:
            user = self._task_user()
        except LauncherUnavailableError as e:
            problems.append(str(e))
        tools = [*_TOOLS, "setpriv"] if user is not None and user.switch else _TOOLS
        found = {t: shutil.which(t, path=HOST_PATH) for t in tools}
        if settings is None:
            problems.append(f"profile {self._profile.name!r} has no process section")
        problems += [f"{t} is not installed" for t, path in found.items() if not path]
        cgroups = self._cgroups = detect()
        limits = list(cgroups.problems)
        # The namespace probe needs nothing from the smoke sandbox: both run at
        # once (the agent's start-up waits for them); it counts only if the
        # sandbox works.
        joined: list[str | None] = []
        join = None
        if self._profile.network.enabled and not problems and user is not None:
            uid = user.uid if user.switch else None
            join = threading.Thread(
                target=lambda: joined.append(probe_join(uid)), daemon=True
            )
            join.start()
        if not problems and settings is not None and user is not None:
            smoke, cgroup_problem = self._smoke(settings, user, cgroups)
            problems += smoke
            limits += cgroup_problem
        if join is not None:
            join.join()
        seccomp = seccomp_filter() is not None
        enforced = cgroups.kind != "none" and not limits
        how = cgroups.enforced if enforced else "none"
        net = None
        if not self._profile.network.enabled:
            net = f"profile {self._profile.name!r} gives tasks no network"
        elif problems:
            net = "the sandbox itself does not work"
        elif joined:
            net = joined[0]
        else:
            net = "the network probe did not finish"
        caps = Capabilities(
            launcher=self.name,
            available=not problems,
            problems=tuple(problems)
            + tuple(limits)
            + (() if seccomp else (f"no seccomp filter for {platform.machine()}",))
            + (() if net is None else (f"egress and ingress: {net}",)),
            memory_limit=enforced,
            cpu_limit=enforced,
            pids_limit=enforced,
            egress=net is None,
            egress_filtered=net is None,
            ingress=net is None,
            min_cpus=0.01,
            notes=(
                "memory: the task's cgroup (anonymous, page cache, tmpfs, memfd, "
                "shm; swap off), OOM kills inside it",
                "cpus: a CFS quota of the task's cgroup (fractions work)",
                "pids: the task's cgroup, per task",
                "outputs: a tmpfs of the output cap, charged to the task's memory",
                "network: own empty namespace; femd forwards allowed egress "
                "and ingress (TCP only)",
            ),
            enforcement=(
                ("memory", how),
                ("pids", how),
                ("cpus", how),
                ("outputs", f"tmpfs of the cap ({how})"),
                ("time", "wall-clock timeout, kills the task's cgroup"),
            ),
        )
        self._caps = caps
        return caps

    def _task_user(self) -> TaskUser:
        if os.geteuid() != 0:
            return TaskUser(uid=os.getuid(), gid=os.getgid(), switch=False)
        name = self._profile.process.run_as if self._profile.process else "femd-task"
        try:
            entry = pwd.getpwnam(name)
        except KeyError as e:
            raise LauncherUnavailableError(
                f"process: task user {name!r} does not exist (femd runs as root)"
            ) from e
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise LauncherUnavailableError(f"process: task user {name!r} is root")
        return TaskUser(uid=entry.pw_uid, gid=entry.pw_gid, switch=True)

    def _smoke(
        self, settings: ProcessSettings, user: TaskUser, cgroups: CgroupHost
    ) -> tuple[list[str], list[str]]:
        """Run ``true`` in a sandbox like a task's, in a cgroup like a task's.

        Returns the sandbox's problems and the cgroup's (a host whose cgroups
        cannot be made still runs sandboxes, but refuses every task).
        """
        cgroup = None
        if cgroups.kind != "none":
            cgroup = TaskCgroup(cgroups, f"femd-probe-{os.getpid()}")
            cgroup.kill()
            cgroup.remove()
            try:
                cgroup.create(CgroupLimits(memory_bytes=256 << 20, pids=64, cpus=1))
            except OSError as e:
                return [], [f"no memory, pids or cpu cgroup can be made: {cut(e)}"]
        memfd = seccomp_memfd()
        try:
            # The output step's tools (capture) must be in the sandbox too.
            needs = "command -v stat >/dev/null && command -v tar >/dev/null"
            args = bwrap_argv(settings, None, memfd, ["/bin/sh", "-c", needs])
            # Entered like a task: a host or unit that refuses the cgroup
            # write, setrlimit or setpriv fails here, not at a task's launch.
            prefix = entry_prefix(settings, None, user, cgroup)
            result = subprocess.run(  # noqa: S603 (fixed tools, no shell)
                prefix + args,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
                env={"PATH": HOST_PATH},
                pass_fds=(memfd,) if memfd is not None else (),
            )
        except (OSError, subprocess.SubprocessError) as e:
            return [f"bubblewrap cannot run: {cut(e)}"], []
        finally:
            if memfd is not None:
                os.close(memfd)
            if cgroup is not None:
                cgroup.kill()
                cgroup.remove()
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").splitlines()
            # The last line that says something is bwrap's error, cause last.
            said = [line.strip() for line in lines if line.strip()]
            why = (
                cut(said[-1], 200, keep_end=True)
                if said
                else "/bin/sh, stat or tar missing (ro_binds)"
            )
            return [f"bubblewrap cannot create a sandbox: {why}"], []
        return [], []

    # -- launch ----------------------------------------------------------------

    def adopt(self, task_id: TaskId) -> None:
        """Kill whatever *task_id* left in its cgroup; nothing is re-attached.

        A sandbox dies with the agent (``--die-with-parent``), but not one
        stuck in bwrap's setup handshake, nor what it forked meanwhile: they
        are all in the task's cgroup, which goes with them.
        """
        host = self._cgroups if self._cgroups is not None else detect()
        if host.kind == "none":
            return
        cgroup = TaskCgroup.of_task(host, task_id, self._scope)
        if not cgroup.exists():
            return
        left = len(cgroup.pids())
        emptied = cgroup.kill()
        cgroup.remove()
        logger.info(
            "process: task %s: killed %d processes left after a restart%s",
            task_id,
            left,
            "" if emptied else " (some did not die)",
        )

    def launch(self, spec: LaunchSpec) -> ProcessHandle:
        """Start *spec* in a new sandbox.

        Raises:
            UnenforceableError: a limit cannot be enforced here.
            LauncherUnavailableError: bubblewrap or the task user is missing.
            LaunchError: the spec is malformed or the sandbox did not start.
        """
        caps = self._caps or self.probe()
        if not caps.available:
            raise LauncherUnavailableError(
                "process: not available: " + cut("; ".join(caps.problems), 200)
            )
        if spec.launcher != self.name or self._profile.process is None:
            raise LaunchError(f"process: task {spec.task_id} is not for this launcher")
        if spec.profile != self._profile:
            # A launcher serves the one profile it was built (and probed) with.
            raise LaunchError(
                f"process: task {spec.task_id} names profile {spec.profile.name!r}, "
                f"this launcher serves {self._profile.name!r}"
            )
        reasons = unenforceable(spec, caps)
        if reasons:
            raise UnenforceableError("; ".join(r.message for r in reasons))
        settings = self._profile.process
        check_spec(spec, settings)
        user = self._task_user()
        self._prepare_output(spec)
        net = TaskNetwork(spec, self._profile.network) if spec.network else None
        cgroup = self._cgroup(spec)
        binds = net.prepare() if net else None
        log = self._log_dir / f"{spec.task_id}.log"
        handle = ProcessHandle(spec, log, cgroup, net, binds)
        handle.start(settings, user)
        return handle

    def _cgroup(self, spec: LaunchSpec) -> TaskCgroup:
        if self._cgroups is None or self._cgroups.kind == "none":
            raise UnenforceableError(
                f"task {spec.task_id}: no per-task cgroup on this host"
            )
        cgroup = TaskCgroup.of_task(self._cgroups, spec.task_id, self._scope)
        if cgroup.exists():  # left by a launch the agent did not see through
            cgroup.kill()
            cgroup.remove()
        limits = CgroupLimits(
            memory_bytes=spec.limits.memory_mb << 20,
            pids=spec.limits.pids,
            cpus=spec.limits.cpus,
        )
        try:
            cgroup.create(limits)
        except OSError as e:
            raise LaunchError(
                f"process: cannot create the cgroup of task {spec.task_id}: {cut(e)}"
            ) from e
        # After the mkdirs (they wait for the lock it takes): its grace
        # period overlaps the spawn instead of the entry step's migration.
        warm_attach(self._cgroups)
        return cgroup

    @staticmethod
    def _prepare_output(spec: LaunchSpec) -> None:
        """Check the host output directory is empty; femd alone writes it."""
        try:
            fd = os.open(spec.output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            raise LaunchError(
                f"process: output dir {cut(spec.output_dir)!r}: {e}"
            ) from e
        try:
            if os.listdir(fd):
                raise LaunchError(
                    f"process: output dir {cut(spec.output_dir)!r} is not empty"
                )
            os.fchmod(fd, 0o700)
        except OSError as e:
            raise LaunchError(f"process: cannot prepare output dir: {cut(e)}") from e
        finally:
            os.close(fd)
