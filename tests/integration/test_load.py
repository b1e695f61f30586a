"""Load: a burst of 500 small tasks drains with no loss and no duplicate (issue 4).

Also measures the submit -> ``succeeded`` latency of a lone trivial task. The
figures are printed (``pytest -s``); the budgets are generous bounds for this
2-core test machine, not the benchmark (``bench/latency.py``).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.agent_support import (  # noqa: E402
    NODE,
    NodeEnv,
    check_runs,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.bwrap]

BURST = 500
DRAIN_BUDGET_S = 150


def _succeeded_at(env: NodeEnv, task_id: str) -> float:
    collector = env.collect()
    seq = collector.await_state(task_id, "succeeded", 30)["seq"]
    return collector.received_at[(NODE, seq)]


def test_burst_of_500_tasks_drains_once_each(node_env: NodeEnv) -> None:
    env = node_env
    env.write_config(max_concurrent_tasks=2)
    # Each sandbox leaves two zombies (bwrap's) for the host's init, which on
    # this VM reaps them only every second or so: give RLIMIT_NPROC room.
    env.write_policy(pids=256)
    events = env.collect()
    agent = env.start_agent()
    lone = []
    for i in range(5):
        published = env.publish(env.task(f"lone-{i}"))
        lone.append(_succeeded_at(env, f"lone-{i}") - published)
    ids = [f"load-{i:03d}" for i in range(BURST)]
    envelopes = [env.task(t) for t in ids]  # signed before the clock starts
    began = time.monotonic()
    published = env.publish(*envelopes)
    events.await_terminal(ids, DRAIN_BUDGET_S)
    drained = time.monotonic() - began
    ends = check_runs(events, env.counter, [*(f"lone-{i}" for i in range(5)), *ids])
    bad = {t: events.terminal(t) for t, s in ends.items() if s != "succeeded"}
    assert not bad, f"{len(bad)} did not succeed: {list(bad.items())[:4]}"
    assert sum(env.counter.count(t) for t in ids) == BURST
    raw = sum(1 for e in events.raw if e["task_id"].startswith("load-"))
    intake = max(
        events.received_at[(NODE, e["seq"])]
        for t in ids
        for e in events.of(t)
        if e["state"] == "received"
    )
    print(  # noqa: T201
        f"\nlone task submit->succeeded: median {statistics.median(lone):.2f} s, "
        f"max {max(lone):.2f} s"
        f"\n{BURST} tasks: published in {published - began:.2f} s, drained in "
        f"{drained:.1f} s ({BURST / drained:.1f} tasks/s), all received by the "
        f"node in {intake - began:.1f} s, "
        f"{raw} event deliveries for {5 * BURST} events"
    )
    rows = env.tasks_json()
    assert sum(1 for t in ids if rows[t]["state"] == "succeeded") == BURST
    assert agent.terminate() == 0
