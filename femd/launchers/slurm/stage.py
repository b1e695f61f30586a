"""A task's stage directory on the shared filesystem, and its job script.

Owns the layout of ``<stage_dir>/femd-<task id>/`` (what the compute node
sees of a task), copying inputs and code there, writing the job script that
runs the task in the ``process`` launcher's bubblewrap sandbox (with its output
step: the output directory is a tmpfs of the output cap, streamed out as a tar
when the command ends, ``capture``), extracting that stream into the agent's
work dir, and removing the stage.

Layout (the task user is the job's user; "femd" is the agent's user)::

    femd-<id>/        femd, group of the task user, 0710
      job.json        femd 0600: what a restarted agent needs to adopt the job
      job.sh          femd 0600: read by sbatch at submission
      seccomp.bpf     femd 0640: the built-in filter, read by the job's shell
      status          task user 0600: bwrap's --json-status-fd
      log             task user 0600: the job's stdout+stderr
      out.stream      task user 0600: the output step's stream (the job's fd 0)
      in/<n>/, src/   femd, group-readable: copies of inputs and code

The sandbox's command line comes from the ``process`` launcher (same
namespaces, binds, read-only root, seccomp filter), built on this host: the
compute nodes are expected to share its layout (merged ``/usr``, bwrap path).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import stat
from pathlib import Path
from typing import Final

import msgspec

from femd.errors import LaunchError, cut
from femd.launchers import LaunchSpec, Mount
from femd.launchers.capture import OutputCapture, wrap_argv
from femd.launchers.process import bwrap_argv, check_spec, seccomp_filter
from femd.launchers.slurm.settings import SlurmSettings

__all__ = ["JobFile", "Stage", "TaskUser"]

_PRLIMIT: Final = "/usr/bin/prlimit"
_SECCOMP_FD: Final = 3
_EXTRA_SECCOMP_FD: Final = 4
_STATUS_FD: Final = 5  # dash: single-digit descriptors only


class TaskUser(msgspec.Struct, frozen=True):
    """The user a job runs as; ``switch``: femd is root and submits with --uid."""

    name: str
    uid: int
    gid: int
    switch: bool


class JobFile(msgspec.Struct, frozen=True, kw_only=True):
    """``job.json``: how to finish a job after an agent restart."""

    task_id: str
    job_id: str = ""
    output_dir: str
    output_max_bytes: int
    log_max_bytes: int
    timeout_s: int


class Stage:
    """One task's stage directory under the profile's ``stage_dir``."""

    def __init__(self, settings: SlurmSettings, task_id: str) -> None:
        """Name the directory; nothing is created yet."""
        self.settings = settings
        self.root = Path(settings.stage_dir) / f"femd-{task_id}"

    @property
    def stream(self) -> Path:
        """The output step's tar stream (the job's fd 0)."""
        return self.root / "out.stream"

    @property
    def log(self) -> Path:
        """The job's stdout and stderr."""
        return self.root / "log"

    @property
    def status(self) -> Path:
        """The JSON status lines of bwrap."""
        return self.root / "status"

    # -- stage in ----------------------------------------------------------------

    def create(self, spec: LaunchSpec, user: TaskUser) -> LaunchSpec:
        """Create the stage, copy inputs and code; return the spec as the node sees it.

        Raises:
            LaunchError: the stage exists already or cannot be written.
        """
        try:
            self.root.mkdir(mode=0o700)
        except FileExistsError as e:
            raise LaunchError(f"slurm: stage {cut(self.root)} exists already") from e
        except OSError as e:
            raise LaunchError(f"slurm: cannot create stage: {cut(e)}") from e
        try:
            mounts = []
            for i, m in enumerate(spec.mounts):
                mounts.append(Mount(source=self._copy_in(m, i), target=m.target))
            for f in (self.log, self.status, self.stream):
                f.touch(mode=0o600)
                os.chown(f, user.uid, user.gid)
            if (self.root / "in").exists():
                _readable_by_group(self.root / "in", user.gid)
            os.chown(self.root, -1, user.gid)
            self.root.chmod(0o710)
        except OSError as e:
            raise LaunchError(f"slurm: cannot stage task: {cut(e)}") from e
        return msgspec.structs.replace(spec, mounts=tuple(mounts))

    def _copy_in(self, mount: Mount, index: int) -> str:
        source = Path(mount.source)
        shared = [Path(s) for s in self.settings.shared]
        if any(source == s or s in source.parents for s in shared):
            return mount.source  # the compute nodes see it at the same place
        dest = self.root / "in" / str(index)
        dest.parent.mkdir(mode=0o750, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, symlinks=True)
        else:
            shutil.copy2(source, dest)
        return str(dest)

    # -- the job -----------------------------------------------------------------

    def write_job(self, spec: LaunchSpec) -> Path:
        """Write ``seccomp.bpf`` and ``job.sh`` for *spec* (as the node sees it).

        The sandbox is the ``process`` launcher's, with its checks; its limits
        on the node: Slurm's cgroup (memory, cpus), RLIMIT_NPROC (pids),
        RLIMIT_FSIZE and RLIMIT_NOFILE from the sandbox settings, no core dumps.

        Raises:
            LaunchError: the spec fails the sandbox's checks (mount targets,
                environment, argv) or the files cannot be written.
        """
        sandbox = self.settings.sandbox
        try:
            check_spec(spec, sandbox)  # the one sandbox, reused
        except LaunchError as e:
            raise LaunchError("slurm: " + str(e).removeprefix("process: ")) from e
        program = seccomp_filter()
        if program is None:
            raise LaunchError("slurm: no seccomp filter for this architecture")
        extra = sandbox.seccomp
        args = bwrap_argv(
            sandbox,
            spec,
            _SECCOMP_FD,
            wrap_argv(list(spec.argv), spec.output_target),
            _STATUS_FD,
            _EXTRA_SECCOMP_FD if extra else None,
        )
        mb = 1 << 20
        limits = {
            "nproc": spec.limits.pids,
            "fsize": sandbox.fsize_mb * mb,
            "nofile": sandbox.nofile,
            "core": 0,  # SECURITY: a core dump would copy task memory (data) out
        }
        prefix = [_PRLIMIT, *(f"--{k}={v}:{v}" for k, v in limits.items()), "--"]
        redirect = f"exec {_SECCOMP_FD}<{shlex.quote(str(self.root / 'seccomp.bpf'))}"
        redirect += f" {_STATUS_FD}>{shlex.quote(str(self.status))}"
        # The output step writes its stream to fd 0 (the task's is /dev/null).
        redirect += f" 0>{shlex.quote(str(self.stream))}"
        if extra:
            redirect += f" {_EXTRA_SECCOMP_FD}<{shlex.quote(extra)}"
        script = "\n".join(
            [
                "#!/bin/sh",
                f"# femd task {spec.task_id}: a bubblewrap sandbox (docs/slurm.md)",
                "umask 077",
                redirect,
                "exec " + shlex.join(prefix + args),
                "",
            ]
        )
        try:
            seccomp = self.root / "seccomp.bpf"
            seccomp.write_bytes(program)
            seccomp.chmod(0o640)
            os.chown(seccomp, -1, self.root.stat().st_gid)
            job = self.root / "job.sh"
            job.write_text(script)
            job.chmod(0o600)
        except OSError as e:
            raise LaunchError(f"slurm: cannot write the job script: {cut(e)}") from e
        return job

    def write_record(self, record: JobFile) -> None:
        """Write ``job.json`` (femd's own, mode 0600)."""
        path = self.root / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(msgspec.json.encode(record))
        tmp.chmod(0o600)
        tmp.replace(path)

    def read_record(self) -> JobFile | None:
        """``job.json``, or None when the stage is gone or unreadable."""
        try:
            return msgspec.json.decode(
                (self.root / "job.json").read_bytes(), type=JobFile
            )
        except (OSError, msgspec.DecodeError):
            return None

    def ran(self) -> bool:
        """True when bwrap reported that the task itself ran (not just setup)."""
        try:
            return b'"exit-code"' in self.status.read_bytes()
        except OSError:
            return False

    # -- stage out -----------------------------------------------------------------

    def collect(self, dest: Path, max_bytes: int) -> OutputCapture:
        """Extract the output step's stream into *dest* (hostile, capped)."""
        try:
            fd = os.open(self.stream, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # nothing sent
        capture = OutputCapture(fd, dest, max_bytes)
        capture.join(120)
        return capture

    def remove(self) -> None:
        """Delete the stage (best effort: a task's files may resist)."""
        with contextlib.suppress(OSError):
            # The task user's files may be read-only to their owner, not to us.
            shutil.rmtree(self.root, ignore_errors=True)


def _readable_by_group(top: Path, gid: int) -> None:
    """Make the copied inputs readable by the task user's group, nobody else."""
    paths = [top]
    if top.is_dir() and not top.is_symlink():
        for base, dirs, files in os.walk(top):
            paths += [Path(base, n) for n in dirs + files]
    for p in paths:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = 0o750 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o100 else 0o640
        os.chown(p, -1, gid)
        p.chmod(mode)
