"""Per-task cgroups against a fake cgroupfs (the v2 production path, v1, none).

The fake is plain directories and files laid out as the kernel shows them;
the real v1 kernel path runs in tests/integration/test_limits.py.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from femd.launchers import Usage
from femd.launchers.cgroup import (
    AGENT_LEAF,
    CgroupHost,
    CgroupLimits,
    TaskCgroup,
    detect,
    warm_attach,
)

SERVICE = "/system.slice/femd.service"
LIMITS = CgroupLimits(memory_bytes=64 << 20, pids=32, cpus=0.5)


def task_cgroup(tmp_path: Path, name: str) -> tuple[TaskCgroup, Path]:
    """A created task cgroup on a fake delegated v2 host, and its directory."""
    root = v2_host(tmp_path)
    cg = TaskCgroup.of_task(detect(root, f"0::{SERVICE}\n", euid=1000), name)
    cg.create(LIMITS)
    return cg, root / SERVICE.lstrip("/") / f"femd-task-{name}"


def v2_host(tmp_path: Path, offered: str = "cpu io memory pids") -> Path:
    """A cgroup2 mount with femd.service delegated (controllers offered)."""
    root = tmp_path / "cgroup"
    service = root / SERVICE.lstrip("/")
    service.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (service / "cgroup.controllers").write_text(offered + "\n")
    (service / "cgroup.subtree_control").write_text("\n")
    (service / "cgroup.procs").write_text(f"{os.getpid()}\n")
    return root


def test_v2_femd_moves_into_a_leaf_and_enables_controllers(tmp_path: Path):
    root = v2_host(tmp_path)
    host = detect(root, f"0::{SERVICE}\n", euid=1000)
    service = root / SERVICE.lstrip("/")
    assert host.kind == "v2"
    assert host.dirs == (("", str(service)),)
    assert host.enforced == "cgroup v2"
    # v2's "no internal processes": femd leaves the service's cgroup first.
    assert (service / AGENT_LEAF / "cgroup.procs").read_text() == str(os.getpid())
    assert (service / "cgroup.subtree_control").read_text() == (
        "+memory +pids +cpu +io"
    )
    # Seen again from the leaf (a reload in the same process): same subtree.
    again = detect(root, f"0::{SERVICE}/{AGENT_LEAF}\n", euid=1000)
    assert again.dirs == host.dirs


def test_v2_without_delegated_controllers_refuses(tmp_path: Path):
    root = v2_host(tmp_path, offered="pids")
    host = detect(root, f"0::{SERVICE}\n", euid=1000)
    assert host.kind == "none"
    assert "memory, cpu" in host.problems[0]
    assert "Delegate=" in host.problems[0]
    assert not (root / SERVICE.lstrip("/") / AGENT_LEAF).exists()


def test_v2_task_cgroup_limits_and_usage(tmp_path: Path):
    cg, d = task_cgroup(tmp_path, "t-1")
    assert cg.procs_files() == [str(d / "cgroup.procs")]
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "pids.max").read_text() == "32"
    assert (d / "cpu.max").read_text() == "50000 100000"  # half a cpu
    (d / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    (d / "memory.peak").write_text("1234\n")
    (d / "pids.peak").write_text("7\n")
    (d / "pids.current").write_text("3\n")
    assert cg.usage() == Usage(cpu_s=1.5, memory_peak_bytes=1234, pids_peak=7)
    assert not cg.oom_killed()
    (d / "memory.events").write_text("low 0\noom 2\noom_kill 1\n")
    assert cg.oom_killed()


def test_v2_kill_writes_cgroup_kill(tmp_path: Path):
    cg, d = task_cgroup(tmp_path, "t-2")
    (d / "cgroup.kill").write_text("")
    (d / "cgroup.procs").write_text("999999999\n")  # the fake never empties
    assert cg.kill(wait_s=0.2) is False
    assert (d / "cgroup.kill").read_text() == "1"


def test_v2_without_cgroup_kill_freezes_and_kills_each_member(tmp_path: Path):
    cg, d = task_cgroup(tmp_path, "t-3")
    member = subprocess.Popen(["/bin/sleep", "60"])
    try:
        (d / "cgroup.procs").write_text(f"{member.pid}\n")
        (d / "cgroup.events").write_text("populated 1\nfrozen 1\n")
        cg.kill(wait_s=0.3)
        assert member.wait(5) == -9
        assert (d / "cgroup.freeze").read_text() == "0"  # thawed again
    finally:
        member.kill()
        member.wait()


def test_v1_as_root_one_cgroup_per_hierarchy(tmp_path: Path):
    root = tmp_path / "cgroup"
    for name in ("memory", "pids", "cpu,cpuacct", "freezer", "blkio"):
        (root / name / "femd").mkdir(parents=True)
        (root / name / "cgroup.procs").write_text("")
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    own = "6:blkio:/femd\n5:memory:/femd\n4:pids:/femd\n3:cpu,cpuacct:/femd\n"
    own += "2:freezer:/femd\n"
    host = detect(root, own, euid=0)
    assert host.kind == "v1"
    dirs = dict(host.dirs)
    assert "blkio" not in dirs  # mounted, but no limit or figure needs it
    assert dirs["cpu"] == dirs["cpuacct"] == str(root / "cpu,cpuacct" / "femd")
    cg = TaskCgroup.of_task(host, "t-4")
    cg.create(LIMITS)
    task = root / "cpu,cpuacct" / "femd" / "femd-task-t-4"
    assert (task / "cpu.cfs_quota_us").read_text() == "50000"
    mem = root / "memory" / "femd" / "femd-task-t-4"
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert len(cg.procs_files()) == 4  # memory, pids, cpu+cpuacct, freezer
    (mem / "memory.max_usage_in_bytes").write_text("4096\n")
    (task / "cpuacct.usage").write_text("2500000000\n")
    assert cg.usage() == Usage(cpu_s=2.5, memory_peak_bytes=4096)
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 3\n")
    assert cg.oom_killed()


def test_v1_without_root_cannot_enforce(tmp_path: Path):
    host = detect(tmp_path, "4:memory:/\n1:pids:/\n", euid=1000)
    assert host.kind == "none"
    assert host.enforced == "none"
    text = host.problems[0]
    assert "memory" in text
    assert "pids" in text
    assert "cpu" in text


def test_v1_missing_controller_is_named(tmp_path: Path):
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "cgroup.procs").write_text("")
    host = detect(tmp_path, "4:memory:/\n", euid=0)
    assert host.kind == "none"
    assert host.problems == ("cgroup v1: the pids controller is not mounted",)


def test_no_cgroup_means_no_task_cgroup(tmp_path: Path):
    host = detect(tmp_path, "0::/\n", euid=1000)
    with pytest.raises(RuntimeError):
        TaskCgroup(host, "femd-task-x")


def test_v2_a_cgroup_shared_with_others_is_left_alone(tmp_path: Path):
    root = v2_host(tmp_path)
    service = root / SERVICE.lstrip("/")
    (service / "cgroup.procs").write_text(f"{os.getpid()}\n1\n")  # a login shell
    host = detect(root, f"0::{SERVICE}\n", euid=1000)
    assert host.kind == "none"
    assert "holds other processes" in host.problems[0]
    assert not (service / AGENT_LEAF).exists()
    assert (service / "cgroup.subtree_control").read_text() == "\n"


@pytest.mark.parametrize(
    ("kind", "line", "procs"),
    [
        ("v1", "8:pids:/svc/femd\n4:memory:/m\n", "pids/svc/femd/cgroup.procs"),
        ("v2", f"0::/svc/{AGENT_LEAF}\n", f"svc/{AGENT_LEAF}/cgroup.procs"),
    ],
)
def test_warm_attach_moves_femd_into_the_cgroup_it_is_in(
    tmp_path: Path, kind: str, line: str, procs: str
):
    (tmp_path / procs).parent.mkdir(parents=True)
    (tmp_path / procs).write_text("")
    host = CgroupHost(kind=kind, dirs=(("pids", str(tmp_path)),))  # type: ignore[arg-type]
    warm_attach(host, tmp_path, proc_self_cgroup=line)
    deadline = time.monotonic() + 10  # written by a thread of its own
    while (tmp_path / procs).read_text() == "" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (tmp_path / procs).read_text() == str(os.getpid())


def test_warm_attach_is_best_effort_and_idle_without_cgroups(tmp_path: Path):
    # No such directory: nothing raised; no cgroups: nothing written.
    v1 = CgroupHost(kind="v1", dirs=(("pids", str(tmp_path)),))
    warm_attach(v1, tmp_path / "missing", proc_self_cgroup="8:pids:/x\n")
    warm_attach(CgroupHost(kind="none"), tmp_path, proc_self_cgroup="0::/\n")
    assert list(tmp_path.iterdir()) == []
