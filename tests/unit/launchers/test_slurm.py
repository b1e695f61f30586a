"""The slurm launcher's pure parts and its stage directory (no cluster needed).

What the cluster enforces (``scontrol show config``), Slurm's accounting rows,
the profile section, the job script (the process launcher's sandbox and output
step), and a probe that fails closed before it asks any cluster.
"""

from __future__ import annotations

import os
import shlex
import textwrap
from pathlib import Path

import msgspec
import pytest

from femd.errors import ConfigError, LaunchError
from femd.launchers import (
    LAUNCHERS,
    LauncherProfile,
    LaunchSpec,
    Limits,
    Mount,
    environment,
    load_profile,
    new_profile,
)
from femd.launchers.slurm.client import parse_key_values
from femd.launchers.slurm.cluster import assess, parse_config
from femd.launchers.slurm.handle import to_accounting
from femd.launchers.slurm.launcher import SlurmLauncher
from femd.launchers.slurm.settings import SlurmSettings
from femd.launchers.slurm.stage import Stage

CONFIG = """\
Configuration data as of 2026-12-03T14:35:00
AccountingStorageType   = accounting_storage/slurmdbd
ProctrackType           = proctrack/cgroup
TaskPlugin              = task/cgroup,task/affinity
SelectTypeParameters    = CR_CORE_MEMORY

Cgroup Support Configuration:
CgroupPlugin            = cgroup/v1
ConstrainCores          = yes
ConstrainRAMSpace       = yes
"""


def profile(tmp_path: Path, **slurm: object) -> LauncherProfile:
    settings = {"stage_dir": str(tmp_path / "stage"), "sandbox": {"run_as": "nobody"}}
    return new_profile(
        name="default", slurm=msgspec.convert(settings | slurm, SlurmSettings)
    )


def spec(prof: LauncherProfile, out: Path, **kw: object) -> LaunchSpec:
    base = {
        "task_id": "t-1",
        "launcher": "slurm",
        "profile": prof,
        "argv": ("/bin/sh", "-c", "echo hi > /out/x"),
        "output_dir": str(out),
        "limits": Limits(cpus=1, memory_mb=128, timeout_s=30, pids=16),
    }
    return LaunchSpec(**(base | kw))  # type: ignore[arg-type]


# -- what the cluster enforces -----------------------------------------------


def test_a_cgroup_cluster_enforces_memory_and_cpus():
    limits = assess(parse_config(CONFIG))
    assert (limits.memory, limits.cpus, limits.accounting) == (True, True, True)
    assert limits.problems == ()


def test_no_ram_constraint_means_no_memory_limit():
    text = CONFIG.replace("RAMSpace       = yes", "RAMSpace = no")
    limits = assess(parse_config(text))
    assert (limits.memory, limits.cpus) == (False, True)
    [problem] = limits.problems
    assert "ConstrainRAMSpace" in problem
    assert "not enforced" in problem


def test_no_task_cgroup_means_neither_memory_nor_cpus():
    text = CONFIG.replace("task/cgroup,task/affinity", "task/affinity")
    limits = assess(parse_config(text))
    assert (limits.memory, limits.cpus) == (False, False)
    assert "not task/cgroup" in limits.problems[0]


def test_no_slurmdbd_is_a_note_not_a_refusal():
    text = CONFIG.replace("accounting_storage/slurmdbd", "accounting_storage/none")
    text = text.replace("proctrack/cgroup", "proctrack/linuxproc")
    limits = assess(parse_config(text))
    assert (limits.memory, limits.accounting) == (True, False)
    assert limits.problems == ()
    assert any("no sacct" in n for n in limits.notes)
    assert any("proctrack/linuxproc" in n for n in limits.notes)


# -- Slurm's words -------------------------------------------------------------


def test_scontrol_one_liner_keeps_values_with_spaces():
    line = (
        "JobId=7 JobName=femd-t-1 JobState=RUNNING Comment=femd task t-1 "
        "StartTime=2026-12-03T14:40:00 NodeList=node1 ExitCode=0:0 TRES/x=1"
    )
    job = parse_key_values(line)
    assert job["Comment"] == "femd task t-1"
    assert (job["JobState"], job["NodeList"], job["ExitCode"]) == (
        "RUNNING",
        "node1",
        "0:0",
    )


def test_accounting_from_sacct_rows():
    rows = [
        {"JobID": "12", "State": "COMPLETED", "ExitCode": "0:0", "ElapsedRaw": "4",
         "TotalCPU": "01:02.500", "MaxRSS": "", "NodeList": "node1"},
        {"JobID": "12.batch", "State": "COMPLETED", "ExitCode": "0:0",
         "ElapsedRaw": "4", "TotalCPU": "01:02.500", "MaxRSS": "156696K",
         "NodeList": "node1"},
        {"JobID": "12.extern", "State": "COMPLETED", "ExitCode": "0:0",
         "ElapsedRaw": "4", "TotalCPU": "00:00", "MaxRSS": "2M", "NodeList": "node1"},
    ]  # fmt: skip
    acct = to_accounting("12", rows)
    assert acct is not None
    assert msgspec.to_builtins(acct) == {
        "job_id": "12",
        "state": "COMPLETED",
        "node": "node1",
        "elapsed_s": 4,
        "cpu_s": 62.5,
        "max_rss_kb": 156696,
        "exit_code": 0,
        "signal": 0,
    }


def test_accounting_waits_for_a_terminal_row_and_reads_cancelled_by():
    running = [{"JobID": "3", "State": "RUNNING", "ExitCode": "0:0"}]
    assert to_accounting("3", running) is None
    assert to_accounting("3", []) is None
    cancelled = [{"JobID": "3", "State": "CANCELLED by 0", "ExitCode": "0:15",
                  "ElapsedRaw": "", "TotalCPU": "1-00:00:01", "MaxRSS": "x",
                  "NodeList": "None assigned"}]  # fmt: skip
    acct = to_accounting("3", cancelled)
    assert acct is not None
    assert (acct.state, acct.signal, acct.node) == ("CANCELLED", 15, None)
    assert (acct.elapsed_s, acct.cpu_s, acct.max_rss_kb) == (None, 86401.0, None)


# -- the profile section -----------------------------------------------------------


def test_profile_slurm_section(tmp_path: Path):
    path = tmp_path / "hpc.yaml"
    path.write_text(
        textwrap.dedent("""\
        apiVersion: femd/v1
        kind: LauncherProfile
        name: hpc
        slurm:
          stage_dir: /gpfs/femd/stage
          shared: [/gpfs/data]
          partition: short
          account: fdn01
          sandbox: {run_as: femd-task, tmp_size_mb: 32}
        """)
    )
    slurm = load_profile(path).slurm
    assert slurm is not None
    assert (slurm.partition, slurm.account, slurm.qos) == ("short", "fdn01", None)
    assert slurm.sandbox.ro_binds[0] == "/usr"
    assert slurm.poll_s == 1.0


@pytest.mark.parametrize(
    ("section", "match"),
    [
        ("{partition: short}", r"hpc.yaml:5: slurm.*required field `stage_dir`"),
        ("{stage_dir: rel/dir}", r"slurm.stage_dir"),
        ("{stage_dir: /s, account: 'a b'}", r"slurm.account"),
        ("{stage_dir: /s, sandbox: {net: 1}}", r"unknown field `net`"),
    ],
)
def test_profile_slurm_section_is_strict(tmp_path: Path, section: str, match: str):
    path = tmp_path / "hpc.yaml"
    path.write_text(
        f"apiVersion: femd/v1\nkind: LauncherProfile\nname: hpc\n\nslurm: {section}\n"
    )
    with pytest.raises(ConfigError, match=match):
        load_profile(path)


# -- probe -------------------------------------------------------------------------


def test_factory_builds_a_slurm_launcher(tmp_path: Path):
    factory = LAUNCHERS["slurm"].factory
    launcher = factory(profile(tmp_path), environment("slurm", tmp_path))
    assert isinstance(launcher, SlurmLauncher)
    assert launcher.name == "slurm"


def test_probe_without_section_or_stage_fails_closed(tmp_path: Path):
    bare = LauncherProfile(api_version="femd/v1", kind="LauncherProfile", name="x")
    caps = SlurmLauncher(bare, environment("slurm", tmp_path)).probe()
    assert caps.available is False
    assert "has no slurm section" in caps.problems[0]
    caps = SlurmLauncher(profile(tmp_path), environment("slurm", tmp_path)).probe()
    assert caps.available is False
    assert any("stage_dir" in p for p in caps.problems)
    assert not caps.memory_limit


# -- the stage ---------------------------------------------------------------------


def test_job_script_runs_the_process_sandbox_under_prlimit(tmp_path: Path):
    prof = profile(tmp_path)
    assert prof.slurm is not None
    stage = Stage(prof.slurm, "t-1")
    stage.root.mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    mounts = (Mount(source=str(data), target="/data"),)
    job = stage.write_job(spec(prof, tmp_path / "out", mounts=mounts))
    lines = job.read_text().splitlines()
    assert lines[0] == "#!/bin/sh"
    redirect = f"exec 3<{stage.root}/seccomp.bpf 5>{stage.status} 0>{stage.stream}"
    assert redirect in lines
    argv = shlex.split(lines[-1])
    assert argv[:2] == ["exec", "/usr/bin/prlimit"]
    assert "--nproc=16:16" in argv
    assert "--core=0:0" in argv
    bwrap = argv[argv.index("--") + 1 :]
    assert bwrap[0].endswith("bwrap")
    for flag in ("--unshare-net", "--unshare-pid", "--clearenv", "--die-with-parent"):
        assert flag in bwrap
    assert ["--ro-bind", str(data), "/data"] == bwrap[bwrap.index("--ro-bind") :][:3]
    # The output dir is the process launcher's capped tmpfs, streamed out.
    assert bwrap[bwrap.index("/out") - 1 :][:2] == ["--tmpfs", "/out"]
    assert "--as-pid-1" in bwrap
    assert bwrap[bwrap.index("--add-seccomp-fd") :][:2] == ["--add-seccomp-fd", "3"]
    assert bwrap[-5:-3] == ["femd-output", "/out"]
    assert bwrap[-2:] == ["-c", "echo hi > /out/x"]
    assert os.stat(job).st_mode & 0o777 == 0o600


def test_job_script_keeps_the_sandbox_checks(tmp_path: Path):
    prof = profile(tmp_path)
    assert prof.slurm is not None
    stage = Stage(prof.slurm, "t-1")
    stage.root.mkdir(parents=True)
    bad = spec(prof, tmp_path, mounts=(Mount(source=str(tmp_path), target="/usr/x"),))
    with pytest.raises(LaunchError, match=r"^slurm: mount target '/usr/x' overlaps"):
        stage.write_job(bad)
