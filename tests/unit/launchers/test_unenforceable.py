"""unenforceable() and start(): fail closed where a host cannot enforce a limit."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from femd.decision import Rule
from femd.errors import FemdError, LaunchError, StageInError, UnenforceableError
from femd.launchers import (
    LAUNCHERS,
    Capabilities,
    LauncherProfile,
    LaunchSpec,
    Limits,
    environment,
    start,
    unenforceable,
)
from femd.launchers.process import BubblewrapLauncher, seccomp_filter
from femd.model import unknown_launcher
from tests import fakes

PROFILE = LauncherProfile(api_version="femd/v1", kind="LauncherProfile", name="default")
FULL = Capabilities(
    launcher="podman",
    available=True,
    memory_limit=True,
    cpu_limit=True,
    pids_limit=True,
    egress=True,
    egress_filtered=True,
    ingress=True,
)


def spec(**kw) -> LaunchSpec:
    limits = kw.pop("limits", Limits(cpus=2, memory_mb=512, timeout_s=60, pids=64))
    base = {
        "task_id": "t-1",
        "launcher": "podman",
        "profile": PROFILE,
        "argv": ("true",),
        "output_dir": "/srv/out",
        "limits": limits,
    }
    return LaunchSpec(**(base | kw))


def caps(**kw) -> Capabilities:
    return Capabilities(**({f: getattr(FULL, f) for f in FULL.__struct_fields__} | kw))


def test_everything_enforceable_gives_no_reason():
    assert unenforceable(spec(egress=("db.example.org:443",)), FULL) == []


def test_unavailable_launcher_is_one_reason_with_its_problems():
    reasons = unenforceable(
        spec(), caps(available=False, problems=("podman socket missing",))
    )
    assert len(reasons) == 1
    assert reasons[0].rule is Rule.LAUNCHER_UNENFORCEABLE
    assert reasons[0].message == (
        "launcher podman is not available on this host: podman socket missing"
    )


def test_unavailable_without_problems_still_says_why():
    (reason,) = unenforceable(spec(), caps(available=False))
    assert reason.message.endswith("not available on this host: unknown reason")


def test_memory_reason_names_the_limit_and_the_host_problem():
    reasons = unenforceable(
        spec(),
        caps(
            memory_limit=False,
            problems=(
                "rootless cgroup v1: no memory controller",
                "egress: not offered",
            ),
        ),
    )
    # Only the problem that speaks of memory, not every problem the probe saw.
    assert [r.message for r in reasons] == [
        "memory limit of 512 MB cannot be enforced by podman on this host: "
        "rootless cgroup v1: no memory controller"
    ]


MISSING = {
    "memory": ({"memory_limit": False}, "memory limit of 512 MB"),
    "cpu": ({"cpu_limit": False}, "cpu limit of 2 cpus"),
    "pids": ({"pids_limit": False}, "pids limit of 64"),
}


@pytest.mark.parametrize(("missing", "what"), MISSING.values(), ids=MISSING.keys())
def test_each_missing_limit_is_a_reason(missing, what):
    (reason,) = unenforceable(spec(), caps(**missing))
    assert reason.rule is Rule.LAUNCHER_UNENFORCEABLE
    assert reason.message.startswith(
        f"{what} cannot be enforced by podman on this host"
    )


def test_every_missing_limit_is_reported_not_just_the_first():
    reasons = unenforceable(
        spec(egress=("a:1",)),
        caps(memory_limit=False, cpu_limit=False, pids_limit=False, egress=False),
    )
    assert len(reasons) == 4
    assert {r.rule for r in reasons} == {Rule.LAUNCHER_UNENFORCEABLE}


@pytest.mark.parametrize(
    ("cpus", "refused"),
    [(0.5, True), (0.999, True), (1.0, False), (1.5, False), (3, False)],
)
def test_cpus_below_the_smallest_enforceable_quota(cpus, refused):
    limits = Limits(cpus=cpus, memory_mb=512, timeout_s=60, pids=64)
    reasons = unenforceable(spec(limits=limits), caps(min_cpus=1.0))
    assert bool(reasons) is refused
    if refused:
        assert reasons[0].message == (
            f"cpu limit of {cpus:g} cpus cannot be enforced by podman on this host: "
            "the smallest is 1"
        )


def test_egress_needs_the_capability():
    (reason,) = unenforceable(
        spec(egress=("db:5432",)),
        caps(egress=False, egress_filtered=False, problems=("egress: no way in",)),
    )
    assert reason.message == (
        "network egress to [db:5432] cannot be enforced by podman on this host: "
        "egress: no way in"
    )


def test_listening_needs_the_ingress_capability():
    (reason,) = unenforceable(spec(listen=(4433, 8080)), caps(ingress=False))
    assert reason.message == (
        "listening on ports [4433, 8080] cannot be enforced by podman on this host"
    )
    assert unenforceable(spec(listen=(4433,)), caps(egress=False)) == []


@pytest.mark.parametrize("egress", [None, ()], ids=["none", "empty"])
def test_no_network_needs_no_egress_capability(egress):
    assert unenforceable(spec(egress=egress), caps(egress=False)) == []


def test_capabilities_of_another_launcher_are_a_bug():
    with pytest.raises(RuntimeError, match="capabilities of process used for podman"):
        unenforceable(spec(), caps(launcher="process"))


# -- start(): the one boundary ------------------------------------------------


class FakeLauncher(fakes.FakeLauncher):
    name: ClassVar[str] = "podman"


def test_start_launches_when_enforceable():
    launcher = FakeLauncher(FULL)
    handle = start(launcher, spec())
    assert handle.task_id == "t-1"
    assert launcher.launched == [spec()]


def test_start_refuses_unenforceable_without_launching():
    launcher = FakeLauncher(caps(pids_limit=False, memory_limit=False))
    with pytest.raises(
        UnenforceableError, match=r"task t-1: memory limit .*; pids limit"
    ):
        start(launcher, spec())
    assert launcher.launched == []


@pytest.mark.parametrize(
    "error", [OSError(13, "denied"), ValueError("bad"), KeyError("x")], ids=type
)
def test_start_wraps_foreign_errors_once(error):
    with pytest.raises(LaunchError, match=r"^podman: cannot start task t-1: ") as info:
        start(FakeLauncher(FULL, error), spec())
    assert info.value.__cause__ is error
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "error", [LaunchError("already one"), StageInError("not ours to rewrap")]
)
def test_start_passes_femd_errors_through(error):
    with pytest.raises(FemdError) as info:
        start(FakeLauncher(FULL, error), spec())
    assert info.value is error


def test_registry_is_closed_and_read_only():
    assert set(LAUNCHERS) == {"podman", "process", "slurm"}
    # One launcher-name type (manifests, policies, specs): the registry's keys.
    assert unknown_launcher(LAUNCHERS) is None
    assert unknown_launcher(["process", "docker"]) == (
        1,
        '"docker" is not allowed here; use one of: podman, process, slurm',
    )
    with pytest.raises(TypeError):
        LAUNCHERS["evil"] = LAUNCHERS["process"]  # type: ignore[index]


def test_process_factory_builds_a_bubblewrap_launcher(tmp_path: Path):
    launcher = LAUNCHERS["process"].factory(PROFILE, environment("process", tmp_path))
    assert isinstance(launcher, BubblewrapLauncher)
    assert launcher.name == "process"


def test_process_probe_refuses_a_profile_without_process_section(tmp_path: Path):
    caps_ = BubblewrapLauncher(PROFILE, environment("process", tmp_path)).probe()
    assert caps_.available is False
    assert "profile 'default' has no process section" in caps_.problems


def test_seccomp_filter_is_classic_bpf_for_known_arches_only():
    for machine in ("x86_64", "aarch64"):
        program = seccomp_filter(machine)
        assert program is not None
        assert len(program) % 8 == 0
        assert 8 < len(program) // 8 < 256
    assert seccomp_filter("sparc64") is None
