"""The agent's main loop is driven by events, not by a clock (issue 20).

It sleeps until a delivery, a finished task, a connect, a signal or a stop
request wakes it: an idle agent does not spin, and a task slot that frees up
is refilled at once, not at the next turn of a periodic tick.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pika
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.agent import Agent  # noqa: E402
from femd.config import load_config  # noqa: E402
from femd.earlylink import EarlyLink  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    NODE,
    NodeEnv,
    check_runs,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
    wait_for,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.bwrap]


def _at(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["at"])).timestamp()


def test_idle_agent_sleeps_and_wakes_on_delivery_and_stop(
    node_env: NodeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = node_env
    events = env.collect()
    # The agent in this process, as systemd would see it: a notify socket.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(env.root / "loop-notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(env.root / "loop-notify.sock"))
    agent = Agent(load_config(env.config))
    turns: list[float] = []
    tick = agent._tick

    def counted() -> None:
        turns.append(time.monotonic())
        tick()

    agent._tick = counted  # type: ignore[method-assign]
    exit_codes: list[int] = []
    runner = threading.Thread(target=lambda: exit_codes.append(agent.run()))
    runner.start()
    try:
        wait_for("READY", lambda: agent._ready, 30)
        # A 100 ms tick would turn ~20 times in 2 s; the loop wakes only for
        # the periodic STATUS (every 5 s) and whatever happens.
        time.sleep(0.5)
        before = len(turns)
        time.sleep(2.0)
        assert len(turns) - before <= 2, f"{len(turns) - before} turns while idle"
        env.publish(env.task("loop-1"))
        events.await_terminal(["loop-1"], 60)
        assert check_runs(events, env.counter, ["loop-1"]) == {"loop-1": "succeeded"}
    finally:
        stopped = time.monotonic()
        agent.request_stop()
        runner.join(30)
        notify.close()
    assert not runner.is_alive()
    assert exit_codes == [0]
    assert time.monotonic() - stopped < 15, "request_stop() did not wake the loop"


def test_a_freed_slot_is_refilled_at_once(node_env: NodeEnv) -> None:
    env = node_env
    env.write_config(max_concurrent_tasks=1)
    events = env.collect()
    agent = env.start_agent()
    ids = [f"slot-{i:02d}" for i in range(24)]
    env.publish(*(env.task(t) for t in ids))
    events.await_terminal(ids, 120)
    ends = check_runs(events, env.counter, ids)
    assert set(ends.values()) == {"succeeded"}, ends
    # Through one slot, each task starts after the previous one ended: the gap
    # from a terminal event to the next task's `staging` (the agent's own
    # clock) is the time a slot sat empty: the previous task's last commit and
    # clean-up, then the dispatch (~10 ms on a loaded 2-core host). A 100 ms
    # tick adds a uniform 0-100 ms wait to each gap: a median of ~60 ms.
    runs = sorted(
        (_at(next(e for e in events.of(t) if e["state"] == "staging")), t) for t in ids
    )
    gaps = []
    for (_, prev), (start, _) in itertools.pairwise(runs):
        terminal = events.terminal(prev)
        assert terminal is not None
        gaps.append((start - _at(terminal)) * 1000)
    assert min(gaps) >= 0, gaps  # one slot: never two tasks at once
    assert statistics.median(gaps) < 35, f"slot idle gaps (ms): {gaps}"
    assert agent.terminate() == 0


def test_intake_window_is_the_prefetch_not_the_task_slots(node_env: NodeEnv) -> None:
    """The broker hands a stopped agent `intake_window` deliveries, not one per slot."""
    env = node_env
    env.write_config(max_concurrent_tasks=1, intake_window=5)
    events = env.collect()
    agent = env.start_agent()
    queue = f"femd.node.{NODE}"
    conn = pika.BlockingConnection(env.vhost.parameters(env.vhost.orchestrator))
    try:
        ask = conn.channel()

        def waiting() -> int:
            return int(ask.queue_declare(queue, passive=True).method.message_count)

        ids = [f"win-{i:02d}" for i in range(12)]
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            env.publish(*(env.task(t) for t in ids))
            # The broker pushes the window into the stopped agent's socket and
            # keeps the rest ready in the queue.
            wait_for("the window to be handed out", lambda: waiting() == 7, 20)
            time.sleep(0.5)
            assert waiting() == 7
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
    finally:
        conn.close()
    events.await_terminal(ids, 120)
    assert set(check_runs(events, env.counter, ids).values()) == {"succeeded"}
    assert agent.terminate() == 0


def test_an_early_link_takes_no_task_before_its_agent(node_env: NodeEnv) -> None:
    """femd run connects before the agent is built, but takes nothing until then.

    An agent that fails to start (a bad policy, restarted by systemd again
    and again) must not hand tasks back to the queue each time: each hand-back
    counts towards the delivery limit, then the dead-letter queue.
    """
    env = node_env
    env.publish(env.task("early-1"))
    queue = f"femd.node.{NODE}"
    ready_in_queue = _ready_count(env, queue)
    assert ready_in_queue == 1
    early = EarlyLink(load_config(env.config))
    try:
        wait_for("connected", early.link.connected.is_set, 30)
        time.sleep(0.5)  # a consuming link (prefetch 32) has it within ms
        assert early.link.inbox.empty()
        assert _ready_count(env, queue) == 1  # still ready, not unacked
        heard: list[bool] = []
        early.bind(lambda up, _why: heard.append(up), lambda: None)
        assert heard == [True]  # the connect, held until the agent listens
        wait_for("the delivery", lambda: not early.link.inbox.empty(), 30)
        assert not early.link.inbox.get_nowait().redelivered
    finally:
        early.close()


def _ready_count(env: NodeEnv, queue: str) -> int:
    """Messages ready (not unacked) in *queue*, as the node itself sees them."""
    conn = pika.BlockingConnection(env.vhost.parameters(NODE))
    try:
        done = conn.channel().queue_declare(queue, passive=True)
        return int(done.method.message_count)
    finally:
        conn.close()
