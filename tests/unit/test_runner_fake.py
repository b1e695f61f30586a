"""The Runner with tests/fakes.FakeLauncher: a task's life without a sandbox.

Real state database, real policy, real stage-out; only the launcher is the
fake (it implements the real Protocol). The broker link is a counter of wakes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from femd.decision import EventRule, Rule
from femd.errors import LaunchError
from femd.execution import TELL_RUNNING_S, Runner
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
    """Issue 20: nothing to pack, chunk or fsync; a task that ends at once
    is told running, uploading and succeeded in one commit."""
    commits = _count_commits(monkeypatch, run_task.state)
    states = run_task(FakeLauncher())
    assert states == [
        "received", "queued", "staging", "running", "uploading", "succeeded"
    ]  # fmt: skip
    # staging, then running+uploading+succeeded together.
    assert commits == ["transition"] * 2
    events, chunks = _ended(run_task.state, run_task.task.id)
    assert chunks == []
    *_, running, uploading, done = events
    assert [running["state"], uploading["state"]] == ["running", "uploading"]
    assert done["state"] == "succeeded"
    assert done["event_seq"] == uploading["event_seq"] + 1 == running["event_seq"] + 2
    assert running["at"] <= uploading["at"]
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
    # staging, running+uploading (before packing), then chunks+succeeded.
    assert commits == ["transition"] * 3
    events, chunks = _ended(run_task.state, run_task.task.id)
    done = events[-1]
    assert done["state"] == "succeeded"
    out = done["outputs"]
    assert out["chunks"] == len(chunks) == 3  # 150 kB in 64 KiB chunks
    assert {c.headers["sha256"] for c in chunks} == {out["sha256"]}
    assert sum(len(c.body) for c in chunks) == out["bytes"]
    assert max(c.seq for c in chunks) < done["seq"]


def test_a_task_still_running_is_told_running_dated_at_its_launch(run_task):
    """`running` waits TELL_RUNNING_S for a quick end, then is committed alone."""
    launcher = FakeLauncher(hold=True)
    state, tid = run_task.state, run_task.task.id
    done = threading.Thread(target=run_task, args=(launcher,))
    before = datetime.now(UTC)
    done.start()
    deadline = time.monotonic() + 30
    while "running" not in [s for s, _, _ in state.transitions(tid)]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    told = datetime.now(UTC)
    (at,) = [at for s, at, _ in state.transitions(tid) if s == "running"]
    assert before <= at
    assert told - at >= timedelta(seconds=TELL_RUNNING_S)
    assert state.get(tid).state == "running"
    launcher.handles[tid].cancel(0)
    done.join(30)
    states = [s for s, _, _ in state.transitions(tid)]
    assert states[-2:] == ["running", "cancelled"]
