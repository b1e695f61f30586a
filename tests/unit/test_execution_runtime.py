"""A task's runtime in its launch spec: the policy's directory, read-only, same path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from femd.launchers import Mount, load_profiles
from femd.launchspec import build_spec, runtime_target
from femd.manifest import Task, decode_manifest
from femd.policy import LoadedPolicy, load_policy
from tests.conftest import keypair, make_policy, task_dict

REPO = Path(__file__).resolve().parents[2]
RUNTIME = "/opt/femd/runtimes/flower"


def _setup(tmp_path: Path, runtime: str | None) -> tuple[Task, LoadedPolicy]:
    kp = keypair()
    path = make_policy(
        tmp_path,
        {"orchestrator": kp, "pi-smith": keypair()},
        runtimes={"flower": {"path": RUNTIME}},
    )
    task = decode_manifest(json.dumps(task_dict(runtime=runtime)).encode())
    assert isinstance(task, Task)
    return task, load_policy(path)


def test_runtime_is_mounted_read_only_at_the_policy_path(tmp_path: Path) -> None:
    task, policy = _setup(tmp_path, "flower")
    venv = tmp_path / "resolved-venv"
    profile = load_profiles(REPO / "launchers")["default"]
    spec = build_spec(task, policy, profile, work_dir=tmp_path / "w", runtime_dir=venv)
    assert Mount(source=str(venv), target=RUNTIME, read_only=True) in spec.mounts
    assert runtime_target(task, policy) == RUNTIME


def test_no_runtime_no_mount(tmp_path: Path) -> None:
    task, policy = _setup(tmp_path, None)
    profile = load_profiles(REPO / "launchers")["default"]
    spec = build_spec(task, policy, profile, work_dir=tmp_path / "w")
    assert all(m.target != RUNTIME for m in spec.mounts)
    with pytest.raises(RuntimeError):
        runtime_target(task, policy)
