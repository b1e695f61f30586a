"""Faults on a real broker: restarts, a killed agent, cut connections (issue 4).

After each fault, ``check_runs`` asserts what DESIGN promises: every submitted
task has exactly one terminal event, its events are complete and in order, no
``seq`` is missing among what the orchestrator received, and the host-side
counter saw no task start twice.
"""

from __future__ import annotations

import hashlib
import json
import pwd
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.keys import keyid  # noqa: E402
from femd.state import State  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    NODE,
    TASK_USER,
    NodeEnv,
    check_runs,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
    wait_for,
)
from tests.integration.sandbox_support import task_processes  # noqa: E402

pytestmark = [pytest.mark.rabbitmq, pytest.mark.bwrap]


def _connects(env: NodeEnv) -> int:
    return sum(
        "broker: connected" in line for a in env.agents for line in a.log_lines()
    )


def test_broker_restart_with_tasks_queued_and_running(node_env: NodeEnv) -> None:
    env = node_env
    events = env.collect()
    agent = env.start_agent()
    ids = [f"rb-{i}" for i in range(8)]
    env.publish(*(env.task(t, "sleep 1.5") for t in ids))
    wait_for("two tasks running", lambda: len(env.counter.counts()) >= 2, 20)
    env.vhost.node.restart()
    # Tasks published once the broker is back go through the restarted queue.
    late = [f"rb-late-{i}" for i in range(3)]
    env.publish(*(env.task(t) for t in late))
    events.await_terminal(ids + late, 90)
    ends = check_runs(events, env.counter, ids + late)
    assert set(ends.values()) == {"succeeded"}, ends
    assert _connects(env) >= 2, "the agent never reconnected"
    assert agent.alive()
    assert agent.terminate() == 0


def test_sigkill_mid_task_and_mid_intake_then_restart(node_env: NodeEnv) -> None:
    env = node_env
    # A window of 1: a slow, steady intake the kill can land in.
    env.write_config(max_concurrent_tasks=1, intake_window=1)
    events = env.collect()
    agent = env.start_agent()
    queued = [f"after-{i}" for i in range(3)]
    env.publish(env.task("victim", "sleep 60"), *(env.task(t) for t in queued))
    wait_for("the victim to start", lambda: env.counter.count("victim"), 20)
    for t in queued:
        events.await_state(t, "received")
    # A burst the agent is still taking in when it dies: some deliveries are
    # committed but not acked yet, and come back redelivered.
    burst = [f"burst-{i:02d}" for i in range(60)]
    env.publish(*(env.task(t) for t in burst))
    wait_for(
        "part of the burst to be received",
        lambda: sum(events.has(t, "received") for t in burst) >= 5,
        20,
        every_s=0.01,
    )
    agent.kill()
    taken = sum(events.has(t, "received") for t in burst)
    uid = pwd.getpwnam(TASK_USER).pw_uid
    # --die-with-parent: the sandbox does not outlive the agent.
    wait_for("the victim's sandbox to die", lambda: not task_processes(uid), 10)
    assert events.terminal("victim") is None
    env.start_agent()
    everything = ["victim", *queued, *burst]
    ended = events.await_terminal(everything, 60)
    victim = ended["victim"]
    assert victim["state"] == "failed"
    assert [r["rule"] for r in victim["reasons"]] == ["agent.restarted"]
    assert "agent restarted" in victim["reasons"][0]["message"]
    ends = check_runs(events, env.counter, everything)
    assert ends == {"victim": "failed"} | dict.fromkeys(queued + burst, "succeeded")
    assert env.counter.count("victim") == 1
    rows = env.tasks_json()
    assert rows["victim"]["state"] == "failed"
    print(f"\nkilled with {taken} of {len(burst)} burst tasks in")  # noqa: T201
    assert taken < len(burst), "the kill came after the whole intake"


def test_cancel_committed_just_before_a_crash_still_applies(node_env: NodeEnv) -> None:
    env = node_env
    events = env.collect()
    # What a crash right after committing a Cancel leaves (the delivery was
    # acked, the cancel not applied yet), made with the agent's own State calls.
    state = State(env.state_dir / "state.sqlite")
    target = env.manifest("doomed", env.counted("doomed"))
    for m in (target, env.cancel_manifest("cancel-doomed", "doomed")):
        payload = json.dumps(m).encode()
        assert state.record(
            task_id=m["id"],
            project=m["project"],
            kind=m["kind"],
            manifest_sha256=hashlib.sha256(payload).hexdigest(),
            payload=payload,
            signer_keyids=[keyid(env.key.public_key())],
            launcher=m.get("launcher"),
            decision="allow",
            reasons=[],
            node=NODE,
            at=datetime.now(UTC),
        )
    state.close()
    env.start_agent()
    ended = events.await_terminal(["doomed", "cancel-doomed"], 20)
    assert ended["doomed"]["state"] == "cancelled"
    assert ended["cancel-doomed"]["state"] == "succeeded"
    time.sleep(1)  # a run that should not happen would report by now
    assert env.counter.count("doomed") == 0


def _cut_repeatedly(env: NodeEnv, seconds: float) -> None:
    """Force-close the vhost's connections, again and again (~0.7 s apart)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        env.vhost.node.close_connections(env.vhost.name)


def test_connection_drops_and_restores(node_env: NodeEnv) -> None:
    env = node_env
    rabbit = env.vhost.node
    # Outputs of 40 kB in ~10 chunks each: a long outbox to drain; reconnect fast.
    broker = dict(env.settings["broker"], reconnect_max_s=1)
    env.write_config(result_chunk_bytes=4096, broker=broker)
    events = env.collect()
    agent = env.start_agent()
    work = "head -c 40000 /dev/urandom > /out/blob; sleep 0.2"
    first = [f"cut-{i:02d}" for i in range(60)]
    env.publish(*(env.task(t, work) for t in first))
    wait_for("a task running", lambda: env.counter.counts(), 20)
    _cut_repeatedly(env, 1.5)
    # Keep the agent out for a while: events and chunks pile up in its outbox.
    rabbit.suspend_listeners()
    rabbit.close_connections(env.vhost.name)
    time.sleep(5)
    rabbit.resume_listeners()
    # Cut again while it drains that backlog: a batch cut short must be
    # published again, never marked as sent.
    _cut_repeatedly(env, 5)
    second = [f"cut-late-{i}" for i in range(4)]
    env.publish(*(env.task(t, work) for t in second))
    wait_for("a late task running", lambda: env.counter.count(second[0]), 30)
    rabbit.close_connections(env.vhost.name)
    events.await_terminal(first + second, 90)
    ends = check_runs(events, env.counter, first + second)
    assert set(ends.values()) == {"succeeded"}, ends
    for t in first + second:
        announced = events.terminal(t) or {}
        got = hashlib.sha256(events.outputs(t)).hexdigest()
        assert got == announced["outputs"]["sha256"], f"task {t}: outputs differ"
    lost = [line for line in agent.log_lines() if "connection lost" in line]
    assert len(lost) >= 4, agent.log_lines()
    assert agent.alive()
    assert agent.terminate() == 0
