"""Talking to Slurm through its client commands.

Owns running ``sbatch``, ``scontrol``, ``squeue``, ``scancel`` and ``sacct``
with a clean environment (only ``PATH``, ``LANG`` and the profile's
``SLURM_CONF``: no ``SBATCH_*`` variable of femd's own environment can change
a job), a timeout, and turning their failures into one-line ``LaunchError``s.
Parses their machine-readable output; decides nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Final

from femd.errors import LaunchError, cut
from femd.launchers.slurm.settings import SlurmSettings

__all__ = ["TOOLS", "SlurmClient", "parse_key_values"]

TOOLS: Final = ("sbatch", "scontrol", "squeue", "scancel", "sacct")
_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
_TIMEOUT_S: Final = 60.0


def parse_key_values(line: str) -> dict[str, str]:
    """``scontrol show job -o`` text: ``Key=Value`` words, values without spaces.

    A value with spaces (``Comment``, ``Command``) keeps the words that follow
    it up to the next ``Key=``.
    """
    out: dict[str, str] = {}
    key = None
    for word in line.split():
        name, eq, value = word.partition("=")
        if eq and name and name[0].isalpha() and name.replace("/", "").isalnum():
            key = name
            out[key] = value
        elif key is not None:
            out[key] += " " + word
    return out


class SlurmClient:
    """Runs the Slurm client commands of one profile."""

    def __init__(self, settings: SlurmSettings) -> None:
        """Keep the settings; nothing runs yet."""
        self._env = {"PATH": _PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        conf = settings.slurm_conf or os.environ.get("SLURM_CONF")
        if conf:
            self._env["SLURM_CONF"] = conf

    @staticmethod
    def missing_tools() -> list[str]:
        """The client commands not installed on this host."""
        return [t for t in TOOLS if shutil.which(t, path=_PATH) is None]

    def run(
        self, tool: str, args: Sequence[str], *, timeout_s: float = _TIMEOUT_S
    ) -> str:
        """Run *tool* with *args*; return its stdout.

        Raises:
            LaunchError: the tool is missing, timed out or failed (its last
                stderr line is the message).
        """
        path = shutil.which(tool, path=_PATH)
        if path is None:
            raise LaunchError(f"slurm: {tool} is not installed")
        try:
            done = subprocess.run(  # noqa: S603 (fixed tools, no shell)
                [path, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout_s,
                check=False,
                env=self._env,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise LaunchError(f"slurm: {tool} failed: {cut(e)}") from e
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            why = lines[-1] if lines else f"exit {done.returncode}"
            raise LaunchError(f"slurm: {tool}: {cut(why, 200)}")
        return done.stdout.decode(errors="replace")

    def config(self) -> str:
        """``scontrol show config``: the cluster's configuration, as text."""
        return self.run("scontrol", ["show", "config"])

    def submit(self, options: Sequence[str], script: str) -> str:
        """``sbatch``: submit *script* (a file); return the job id."""
        out = self.run("sbatch", ["--parsable", *options, script]).strip()
        job_id = out.split(";", 1)[0]
        if not job_id.isdigit():
            raise LaunchError(f"slurm: sbatch printed no job id (got {cut(out)!r})")
        return job_id

    def job(self, job_id: str) -> dict[str, str] | None:
        """``scontrol show job``: the controller's record, None once purged."""
        try:
            out = self.run("scontrol", ["--oneliner", "show", "job", job_id])
        except LaunchError as e:
            if "Invalid job id" in str(e):
                return None
            raise
        return parse_key_values(out) if out.strip() else None

    def find(self, name: str, user: str) -> list[tuple[str, str, str]]:
        """Jobs named *name* of *user* the controller knows: (id, state, comment)."""
        out = self.run(
            "squeue",
            ["--noheader", "--states=all", f"--name={name}", f"--user={user}",
             "--format=%i|%T|%k"],
        )  # fmt: skip
        found = []
        for line in out.splitlines():
            job_id, _, rest = line.strip().partition("|")
            state, _, comment = rest.partition("|")
            if job_id:
                found.append((job_id, state, comment))
        return found

    def history(self, name: str, user: str) -> list[tuple[str, str, str]]:
        """Jobs named *name* of *user* in the accounting database (any age)."""
        out = self.run(
            "sacct",
            ["--noheader", "--parsable2", "--allocations", f"--name={name}",
             f"--user={user}", "--starttime=2000-01-01",
             "--format=JobID,State,Comment"],
        )  # fmt: skip
        found = []
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) >= 3 and parts[0].isdigit():
                found.append((parts[0], parts[1], "|".join(parts[2:])))
        return found

    def accounting(self, job_id: str) -> list[dict[str, str]]:
        """``sacct`` rows of the job and its steps (empty if not recorded yet)."""
        fields = ("JobID", "State", "ExitCode", "ElapsedRaw", "TotalCPU", "MaxRSS",
                  "NodeList")  # fmt: skip
        out = self.run(
            "sacct",
            ["--noheader", "--parsable2", f"--jobs={job_id}",
             "--format=" + ",".join(fields)],
        )  # fmt: skip
        return [
            dict(zip(fields, line.split("|"), strict=False))
            for line in out.splitlines()
            if line.strip()
        ]

    def cancel(self, job_id: str, signal: str | None = None) -> None:
        """``scancel``: end the job (Slurm's TERM, then KILL), or send *signal*."""
        args = [f"--signal={signal}", "--full"] if signal else []
        self.run("scancel", [*args, job_id])
