"""``SlurmLauncher``: probe a cluster, submit a task as a job, adopt survivors.

Owns what the cluster can enforce for this profile (``probe()``: the client
commands, the controller's configuration, a ``sbatch --test-only`` with the
profile's partition/account/QOS, the stage directory, the task user), the
``sbatch`` options of a task, and finding a task's job after an agent restart
(by its name ``femd-<task id>``, its user and its comment).
"""

from __future__ import annotations

import logging
import math
import os
import pwd
import threading
from pathlib import Path
from typing import ClassVar, Final

import msgspec

from femd.errors import LaunchError, LauncherUnavailableError, UnenforceableError, cut
from femd.launchers import Capabilities, LauncherEnv, LaunchSpec, unenforceable
from femd.launchers.profile import LauncherProfile
from femd.launchers.slurm.client import SlurmClient
from femd.launchers.slurm.cluster import assess, parse_config
from femd.launchers.slurm.handle import SlurmHandle
from femd.launchers.slurm.settings import SlurmSettings
from femd.launchers.slurm.stage import JobFile, Stage, TaskUser
from femd.model import TaskId

__all__ = ["SlurmLauncher", "job_name"]

logger = logging.getLogger(__name__)

_COMMENT: Final = "femd task "


def job_name(task_id: str) -> str:
    """The job name that carries the task id (``squeue --name`` finds it)."""
    return f"femd-{task_id}"


class SlurmLauncher:
    """Runs tasks as Slurm batch jobs in a bubblewrap sandbox on compute nodes."""

    name: ClassVar[str] = "slurm"

    def __init__(self, profile: LauncherProfile, env: LauncherEnv) -> None:
        """Keep the profile; copied logs go under ``env.state_dir``."""
        self._profile = profile
        self._log_dir = env.state_dir
        self._caps: Capabilities | None = None
        self._accounting = False
        self._lock = threading.Lock()

    @property
    def _settings(self) -> SlurmSettings:
        settings = self._profile.section(self.name)
        if not isinstance(settings, SlurmSettings):
            raise LauncherUnavailableError(
                f"slurm: profile {self._profile.name!r} has no slurm section"
            )
        return settings

    def _user(self) -> TaskUser:
        if os.geteuid() != 0:
            me = pwd.getpwuid(os.getuid())
            return TaskUser(me.pw_name, me.pw_uid, me.pw_gid, switch=False)
        name = self._settings.sandbox.run_as
        try:
            entry = pwd.getpwnam(name)
        except KeyError as e:
            raise LauncherUnavailableError(
                f"slurm: task user {name!r} does not exist (femd runs as root)"
            ) from e
        if entry.pw_uid == 0 or entry.pw_gid == 0:
            raise LauncherUnavailableError(f"slurm: task user {name!r} is root")
        return TaskUser(name, entry.pw_uid, entry.pw_gid, switch=True)

    def _placement(self) -> list[str]:
        s = self._settings
        return [
            f"--{flag}={value}"
            for flag, value in (
                ("partition", s.partition),
                ("account", s.account),
                ("qos", s.qos),
            )
            if value
        ]

    def _identity(self, user: TaskUser) -> list[str]:
        # SECURITY: as root, the job runs as the task user, never as root.
        return [f"--uid={user.uid}", f"--gid={user.gid}"] if user.switch else []

    # -- probe -------------------------------------------------------------------

    def probe(self) -> Capabilities:
        """Ask the cluster what it enforces; an available result is reused."""
        with self._lock:
            if self._caps is not None and self._caps.available:
                return self._caps
            self._caps = self._probe()
            return self._caps

    def _probe(self) -> Capabilities:
        problems: list[str] = []
        notes: tuple[str, ...] = ()
        memory = cpus = False
        try:
            settings = self._settings
            user = self._user()
        except LauncherUnavailableError as e:
            return Capabilities(launcher=self.name, available=False, problems=(str(e),))
        missing = SlurmClient.missing_tools()
        problems += [f"slurm: {t} is not installed" for t in missing]
        stage = Path(settings.stage_dir)
        if not stage.is_dir() or not os.access(stage, os.W_OK | os.X_OK):
            problems.append(f"slurm: stage_dir {cut(stage)} is not a writable dir")
        if not problems:
            client = SlurmClient(settings)
            try:
                limits = assess(parse_config(client.config()))
                # Partition, account, QOS and the user as a job would have them.
                client.run(
                    "sbatch",
                    ["--test-only", *self._placement(), *self._identity(user),
                     "--job-name=femd-probe", "--ntasks=1", "--time=1", "--mem=1",
                     "--wrap=true"],
                )  # fmt: skip
            except LaunchError as e:
                problems.append(str(e))
            else:
                memory, cpus, notes = limits.memory, limits.cpus, limits.notes
                self._accounting = limits.accounting
                problems += limits.problems
        # Missing enforcement is not unavailability: unenforceable() names it.
        blocking = [p for p in problems if "not enforced" not in p]
        # SECURITY: femd's forwarders (docs/network.md) run on this host and
        # join the sandbox's network namespace; a sandbox on a compute node is
        # out of their reach, so a task asking for any network is refused.
        problems.append(
            "slurm: egress and ingress: femd forwards a task's network only on"
            " its own host, not to a job on a compute node"
        )
        return Capabilities(
            launcher=self.name,
            available=not blocking,
            problems=tuple(problems),
            memory_limit=memory,
            cpu_limit=cpus,
            pids_limit=True,
            egress=False,
            egress_filtered=False,
            ingress=False,
            min_cpus=1.0,
            notes=notes,
        )

    # -- launch ------------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> SlurmHandle:
        """Stage *spec* on the shared filesystem and submit it as a batch job.

        Raises:
            UnenforceableError: a limit cannot be enforced on this cluster.
            LauncherUnavailableError: Slurm, the stage or the task user is missing.
            LaunchError: the spec is malformed, staging or ``sbatch`` failed.
        """
        caps = self.probe()
        if not caps.available:
            raise LauncherUnavailableError(
                "slurm: not available: " + cut("; ".join(caps.problems), 200)
            )
        if spec.launcher != self.name or spec.profile != self._profile:
            raise LaunchError(
                f"slurm: task {spec.task_id} is not for this launcher and profile"
            )
        reasons = unenforceable(spec, caps)
        if reasons:
            raise UnenforceableError("; ".join(r.message for r in reasons))
        settings, user = self._settings, self._user()
        stage = Stage(settings, spec.task_id)
        record = JobFile(
            task_id=spec.task_id,
            output_dir=spec.output_dir,
            output_max_bytes=spec.output_max_bytes,
            log_max_bytes=spec.log_max_bytes,
            timeout_s=spec.limits.timeout_s,
        )
        try:
            node_spec = stage.create(spec, user)
            script = stage.write_job(node_spec)
            stage.write_record(record)
            limits = spec.limits
            options = [
                f"--job-name={job_name(spec.task_id)}",
                f"--comment={_COMMENT}{spec.task_id}",
                *self._placement(),
                *self._identity(user),
                "--nodes=1",
                "--ntasks=1",
                f"--cpus-per-task={max(1, math.floor(limits.cpus + 1e-9))}",
                f"--mem={limits.memory_mb}M",
                # Slurm counts whole minutes; femd cancels at the exact timeout.
                f"--time={math.ceil(limits.timeout_s / 60)}",
                # SECURITY: a requeued job would run the task a second time.
                "--no-requeue",
                f"--output={stage.log}",
                f"--chdir={stage.root}",
                "--export=NIL",
            ]
            job_id = SlurmClient(settings).submit(options, str(script))
        except BaseException:
            stage.remove()
            raise
        record = msgspec.structs.replace(record, job_id=job_id)
        stage.write_record(record)
        logger.info("slurm: task %s submitted as job %s", spec.task_id, job_id)
        return self._handle(stage, record)

    def _handle(self, stage: Stage, record: JobFile) -> SlurmHandle:
        return SlurmHandle(
            client=SlurmClient(self._settings),
            stage=stage,
            record=record,
            log_path=self._log_dir / f"{record.task_id}.log",
            poll_s=self._settings.poll_s,
            accounting=self._accounting,
        )

    # -- adopt -------------------------------------------------------------------

    def adopt(self, task_id: TaskId) -> SlurmHandle | None:
        """Find the task's job after a restart, running or ended meanwhile.

        Only a job of the task user, named and commented for this task, whose
        stage is still there, is adopted.

        Raises:
            LaunchError: Slurm cannot be asked, or two jobs claim the task.
        """
        if self._profile.section(self.name) is None:
            return None
        self.probe()  # learns whether sacct is there
        settings, user = self._settings, self._user()
        client = SlurmClient(settings)
        name = job_name(task_id)
        found = client.find(name, user.name)
        if not found and self._accounting:
            found = client.history(name, user.name)
        # SECURITY: another user's (or another task's) job never stands in.
        jobs = sorted({j for j, _, c in found if c.strip() == _COMMENT + task_id})
        if len(jobs) > 1:
            raise LaunchError(f"slurm: task {task_id}: several jobs {jobs}")
        stage = Stage(settings, task_id)
        record = stage.read_record()
        if not jobs or record is None or record.job_id != jobs[0]:
            if jobs:
                # Nobody can collect its outputs: do not let it run on.
                client.cancel(jobs[0])
            return None
        logger.info("slurm: task %s: adopted job %s", task_id, jobs[0])
        return self._handle(stage, record)
