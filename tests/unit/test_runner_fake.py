"""The Runner with tests/fakes.FakeLauncher: a task's life without a sandbox.

Real state database, real policy, real stage-out; only the launcher is the
fake (it implements the real Protocol). The broker link is a counter of wakes.
"""

from __future__ import annotations

import json
import os

import msgspec
import pytest

from femd.decision import EventRule, Rule
from femd.errors import LaunchError
from femd.execution import Runner
from femd.launchers import Capabilities, LauncherProfile, ProcessSettings
from femd.manifest import Task
from femd.policy import load_policy
from femd.state import RESULTS_EXCHANGE, State
from tests.conftest import NOW
from tests.fakes import ENFORCES_ALL, FakeLauncher

PROFILE = LauncherProfile(
    api_version="femd/v1",
    kind="LauncherProfile",
    name="default",
    process=ProcessSettings(),
)


@pytest.fixture
def run_task(tmp_path, keys, make_policy, task_dict):
    policy = load_policy(
        make_policy(
            tmp_path, keys, projects={"dt4h-heart-failure": {"launchers": ["process"]}}
        )
    )
    task = msgspec.convert(
        task_dict(launcher="process", image=None, source=None, inputs=[]),
        Task,
        strict=False,
    )
    state = State(tmp_path / "state.sqlite")
    state.record(
        task_id=task.id, project=task.project, kind="Task", manifest_sha256="0" * 64,
        payload=b"{}", signer_keyids=(), launcher="process", decision="allow",
        reasons=(), node="fdn-01", at=NOW,
    )  # fmt: skip
    wakes: list[None] = []

    def run(launcher: FakeLauncher) -> list[str]:
        Runner(
            task=task, state=state, node="fdn-01", policy=policy,
            profiles={"default": PROFILE},
            launchers={("default", "process"): launcher},
            state_dir=tmp_path / "state", chunk_bytes=1 << 16,
            log_max_bytes=1 << 16, wake=lambda: wakes.append(None),
        ).run()  # fmt: skip
        assert wakes
        return [s for s, _, _ in state.transitions(task.id)]

    run.state = state
    run.task = task
    return run


def test_a_task_runs_to_succeeded_with_its_outputs(run_task):
    launcher = FakeLauncher(outputs={"model.bin": b"\x00" * 10})
    states = run_task(launcher)
    assert states == [
        "received", "queued", "staging", "running", "uploading", "succeeded"
    ]  # fmt: skip
    (spec,) = launcher.launched
    assert spec.argv == run_task.task.command
    assert spec.limits.cpus == 2
    row = run_task.state.get(run_task.task.id)
    assert row.state == "succeeded"


def test_a_launcher_that_cannot_enforce_a_limit_rejects_the_task(run_task):
    caps = Capabilities(launcher="process", **(ENFORCES_ALL | {"pids_limit": False}))
    launcher = FakeLauncher(caps)
    assert run_task(launcher)[-1] == "rejected"
    assert launcher.launched == []
    (_, _, detail) = run_task.state.transitions(run_task.task.id)[-1]
    assert detail.startswith(f"rules={Rule.LAUNCHER_UNENFORCEABLE};")


def test_a_failing_launch_fails_the_task_with_its_rule(run_task):
    launcher = FakeLauncher(error=LaunchError("process: no sandbox today"))
    assert run_task(launcher)[-1] == "failed"
    (_, _, detail) = run_task.state.transitions(run_task.task.id)[-1]
    assert detail.startswith(f"rules={EventRule.TASK_FAILED};")


def _count_commits(monkeypatch, state):
    """The write transactions (commits) the state makes from now on, by name."""
    made: list[str] = []
    write = state._write

    def counted(what):
        made.append(what)
        return write(what)

    monkeypatch.setattr(state, "_write", counted)
    return made


def _ended(state, task_id):
    """(this task's status events, the result chunks) in the outbox."""
    pending = state.pending_events(limit=1000)
    chunks = [e for e in pending if e.exchange == RESULTS_EXCHANGE]
    events = [json.loads(e.body) for e in pending if e not in chunks]
    return [e for e in events if e["task_id"] == task_id], chunks


def test_an_empty_output_dir_sends_no_archive_and_folds_the_end(
    run_task, tmp_path, monkeypatch
):
    """Issue 20: nothing to pack, chunk or fsync; one commit from the end of the run."""
    commits = _count_commits(monkeypatch, run_task.state)
    states = run_task(FakeLauncher())
    assert states == [
        "received", "queued", "staging", "running", "uploading", "succeeded"
    ]  # fmt: skip
    # staging, running, then uploading+succeeded together.
    assert commits == ["transition"] * 3
    events, chunks = _ended(run_task.state, run_task.task.id)
    assert chunks == []
    *_, uploading, done = events
    assert uploading["state"] == "uploading"
    assert done["state"] == "succeeded"
    assert done["event_seq"] == uploading["event_seq"] + 1
    # DESIGN "Status event": no outputs, no `outputs` field.
    assert "outputs" not in done
    assert done["exit_code"] == 0
    assert not any((tmp_path / "state").rglob("*.tar.gz"))
    row = run_task.state.get(run_task.task.id)
    assert (row.state, row.output_sha256, row.output_chunks) == (
        "succeeded", None, None
    )  # fmt: skip


def test_outputs_are_queued_with_the_event_that_announces_them(run_task, monkeypatch):
    """The chunks and the terminal event: one commit (atomic, one fsync)."""
    commits = _count_commits(monkeypatch, run_task.state)
    run_task(FakeLauncher(outputs={"sub/model.bin": os.urandom(150_000)}))
    # staging, running, uploading (before packing), then chunks+succeeded.
    assert commits == ["transition"] * 4
    events, chunks = _ended(run_task.state, run_task.task.id)
    done = events[-1]
    assert done["state"] == "succeeded"
    out = done["outputs"]
    assert out["chunks"] == len(chunks) == 3  # 150 kB in 64 KiB chunks
    assert {c.headers["sha256"] for c in chunks} == {out["sha256"]}
    assert sum(len(c.body) for c in chunks) == out["bytes"]
    assert max(c.seq for c in chunks) < done["seq"]
