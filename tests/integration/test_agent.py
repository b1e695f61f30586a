"""The agent end to end on a real broker and real bubblewrap (issue 4).

Each test runs ``python -m femd run`` as a subprocess on a fresh vhost and drives
it as the orchestrator would: signed envelopes in, status events and outputs
out. Executions are counted by a host-side TCP witness (``agent_support``), not
by what femd reports.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testbed import make_ca  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    NODE,
    NodeEnv,
    check_runs,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
    wait_for,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.bwrap]


def test_happy_path_cli(node_env: NodeEnv) -> None:
    env = node_env
    agent = env.start_agent()
    manifest = env.manifest(
        "happy-1",
        env.counted(
            "happy-1",
            "echo hello > /out/greeting.txt; mkdir /out/sub;"
            " head -c 300000 /dev/urandom > /out/sub/blob.bin; echo done",
        ),
    )
    (env.root / "happy.json").write_text(json.dumps(manifest))
    signed = env.femd(
        "sign", "--key", str(env.key_file), str(env.root / "happy.json"),
        "-o", str(env.root / "happy.env"),
    )  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    began = time.monotonic()
    sub = env.femd(
        "submit", "--config", str(env.orch_config), "--node", NODE,
        str(env.root / "happy.env"),
    )  # fmt: skip
    assert sub.returncode == 0, sub.stderr
    results = env.root / "collected"
    watch = env.femd(
        "watch", "--config", str(env.orch_config), "--task", "happy-1",
        "--node", NODE, "--timeout", "60", "--results", str(results),
    )  # fmt: skip
    latency = time.monotonic() - began
    assert watch.returncode == 0, watch.stderr
    events = [json.loads(line) for line in watch.stdout.splitlines()]
    assert [e["state"] for e in events] == [
        "received",
        "staging",
        "running",
        "uploading",
        "succeeded",
    ]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    done = events[-1]
    assert (done["exit_code"], done["node"]) == (0, NODE)
    # The counter connection went through femd's forwarder (docs/network.md).
    (traffic,) = done["network"]
    assert traffic["direction"] == "egress"
    assert traffic["destination"] == f"127.0.0.1:{env.counter.port}"
    assert traffic["connections"] == 1
    assert traffic["bytes_out"] > 0
    out = done["outputs"]
    assert set(out) == {"sha256", "bytes", "chunks"}
    archive = (results / NODE / "happy-1.tar.gz").read_bytes()
    assert hashlib.sha256(archive).hexdigest() == out["sha256"]
    assert len(archive) == out["bytes"]
    # 300 kB of random bytes do not compress: more than one 256 KiB chunk.
    assert out["chunks"] >= 2
    got = results / NODE / "happy-1"
    assert (got / "greeting.txt").read_text() == "hello\n"
    assert (got / "sub" / "blob.bin").stat().st_size == 300000
    assert env.counter.count("happy-1") == 1
    rows = env.tasks_json()
    row = rows["happy-1"]
    assert (row["state"], row["decision"]) == ("succeeded", "allow")
    assert (row["output_sha256"], row["exit_code"]) == (out["sha256"], 0)
    print(f"\nsubmit -> succeeded, outputs collected (CLI): {latency:.2f} s")  # noqa: T201
    assert agent.terminate() == 0


def test_denied_garbage_and_replay(node_env: NodeEnv) -> None:
    env = node_env
    events = env.collect()
    agent = env.start_agent()
    wrong_project = env.task("deny-1", project="someone-else")
    unsigned = env.sign(env.manifest("deny-2", env.counted("deny-2")), signed=False)
    env.publish(wrong_project, unsigned, b"\x00 this is { not an envelope")
    first = env.task("ok-1")
    env.publish(first)
    end = events.await_terminal(["deny-1", "ok-1"])
    assert end["ok-1"]["state"] == "succeeded"
    denied = end["deny-1"]
    assert denied["state"] == "rejected"
    assert [r["rule"] for r in denied["reasons"]] == ["project.unknown"]
    wait_for("two unverified envelopes", lambda: len(events.of("unverified")) >= 2, 20)
    unverified = events.of("unverified")
    assert [e["state"] for e in unverified] == ["rejected", "rejected"]
    rules = sorted(r["rule"] for e in unverified for r in e["reasons"])
    assert rules == ["input.envelope", "signature.threshold"], unverified
    assert events.of("deny-2") == [], "an unsigned task's id is never trusted"
    # A replay of the finished task: same envelope, published again.
    env.publish(first)
    wait_for(
        "the replay's rejection",
        lambda: len([e for e in events.of("ok-1") if e["state"] == "rejected"]) == 1,
        20,
    )
    replay = events.of("ok-1")[-1]
    assert [r["rule"] for r in replay["reasons"]] == ["task.replayed"]
    assert [e["state"] for e in events.of("ok-1")] == [
        "received", "staging", "running", "uploading", "succeeded", "rejected",
    ]  # fmt: skip
    # The agent kept running and still serves tasks.
    env.publish(env.task("ok-2"))
    assert events.await_terminal(["ok-2"])["ok-2"]["state"] == "succeeded"
    time.sleep(0.5)  # a late second run would show up here
    assert env.counter.counts() == {"ok-1": 1, "ok-2": 1}
    assert agent.alive()
    assert agent.terminate() == 0
    rows = env.tasks_json()
    assert rows["deny-1"]["state"] == "rejected"
    assert "deny-2" not in rows


def test_cancel_running_and_queued(node_env: NodeEnv) -> None:
    env = node_env
    env.write_config(max_concurrent_tasks=1)
    events = env.collect()
    env.start_agent()
    env.publish(env.task("long-1", "sleep 60"), env.task("queued-1", "sleep 60"))
    events.await_state("long-1", "running")
    wait_for("long-1 to start", lambda: env.counter.count("long-1"), 20)
    events.await_state("queued-1", "received")
    env.publish(env.cancel("cancel-q", "queued-1"))
    ended = events.await_terminal(["queued-1", "cancel-q"], 20)
    assert ended["queued-1"]["state"] == "cancelled"
    assert ended["cancel-q"]["state"] == "succeeded"
    began = time.monotonic()
    env.publish(env.cancel("cancel-r", "long-1"))
    ended = events.await_terminal(["long-1", "cancel-r"], 30)
    took = time.monotonic() - began
    assert ended["long-1"]["state"] == "cancelled"
    assert events.states("long-1") == ["received", "staging", "running", "cancelled"]
    assert took < 15, f"cancel took {took:.1f} s"
    assert env.counter.count("queued-1") == 0
    assert env.counter.count("long-1") == 1
    ends = check_runs(events, env.counter, ["long-1", "queued-1"])
    assert ends == {"long-1": "cancelled", "queued-1": "cancelled"}
    rows = env.tasks_json()
    assert rows["long-1"]["state"] == "cancelled"
    assert rows["queued-1"]["state"] == "cancelled"


def test_sigterm_drains_then_cancels_and_keeps_queued(node_env: NodeEnv) -> None:
    env = node_env
    env.write_config(max_concurrent_tasks=2, stop_grace_s=4)
    events = env.collect()
    agent = env.start_agent()
    env.publish(
        env.task("short", "sleep 2; echo ok > /out/ok"),
        env.task("outlives", "sleep 60"),
        env.task("waiting"),
    )
    for t in ("short", "outlives"):
        events.await_state(t, "running")
    events.await_state("waiting", "received")
    stopping = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    wait_for("STOPPING=1", lambda: "STOPPING=1" in agent.notices, 5)
    # Stopped consuming: a task published now stays ready on the broker,
    # while the agent still waits for its running tasks.
    env.publish(env.task("after-term"))
    env.vhost.node.await_messages(env.vhost.name, f"femd.node.{NODE}", 1, 3)
    assert agent.alive()
    rc = agent.proc.wait(30)
    took = time.monotonic() - stopping
    assert rc == 0, agent.log()[-2000:]
    assert 3.5 < took < 15, f"stop took {took:.1f} s (grace 4 s)"
    assert events.await_terminal(["short"], 10)["short"]["state"] == "succeeded"
    out = events.await_terminal(["outlives"], 10)["outlives"]
    assert out["state"] == "cancelled"
    assert events.terminal("waiting") is None
    assert events.of("after-term") == []
    rows = env.tasks_json()
    assert rows["waiting"]["state"] == "queued"
    assert rows["outlives"]["state"] == "cancelled"
    assert "after-term" not in rows
    assert env.counter.count("waiting") == 0
    # The next start runs what was queued, and what the broker kept.
    env.start_agent()
    ended = events.await_terminal(["waiting", "after-term"], 30)
    assert {t: e["state"] for t, e in ended.items()} == {
        "waiting": "succeeded",
        "after-term": "succeeded",
    }
    assert env.counter.counts() == {
        "short": 1,
        "outlives": 1,
        "waiting": 1,
        "after-term": 1,
    }
    check_runs(events, env.counter, ["short", "outlives", "waiting", "after-term"])


def test_heartbeats_survive_a_long_task(node_env: NodeEnv) -> None:
    env = node_env  # heartbeat_s is 5 in the node's config
    events = env.collect()
    agent = env.start_agent()
    env.publish(env.task("slow", "sleep 13"))
    events.await_state("slow", "running")
    # The premise: the broker holds the agent to a 5 s heartbeat.
    listed = env.vhost.node.ctl(
        "list_connections",
        "-p",
        env.vhost.name,
        "--no-table-headers",
        "user",
        "timeout",
    )
    assert f"{NODE}\t5" in listed.splitlines(), listed
    ended = events.await_terminal(["slow"], 40)
    assert ended["slow"]["state"] == "succeeded"
    lines = agent.log_lines()
    assert sum("broker: connected" in line for line in lines) == 1, lines
    assert not [line for line in lines if "reconnecting" in line], lines
    assert agent.terminate() == 0


def _bad_identity(env: NodeEnv, kind: str) -> tuple[Path, Path]:
    if kind == "other-ca":
        ca = make_ca(env.root / "other-ca", "an unrelated CA")
        issued = ca.issue(NODE, env.root / "other-ca" / "clients", sans=())
    else:
        now = dt.datetime.now(dt.UTC)
        issued = env.vhost.node.ca.issue(
            NODE,
            env.root / "expired",
            sans=(),
            not_before=now - dt.timedelta(days=10),
            not_after=now - dt.timedelta(days=1),
        )
    return issued.cert, issued.key


def _refusals(log: Path, offset: int) -> int:
    """Handshakes the broker refused (its own log) since *offset*."""
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace").count("generated SERVER ALERT")


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("other-ca", "does not trust our client certificate (unknown CA)"),
        ("expired", "refused our client certificate: expired"),
    ],
    ids=["other-ca", "expired"],
)
def test_bad_client_certificate_is_reported_and_retried(
    node_env: NodeEnv, kind: str, reason: str
) -> None:
    env = node_env
    cert, key = _bad_identity(env, kind)
    broker = dict(env.settings["broker"], cert=str(cert), key=str(key))
    env.write_config(broker=broker)
    node_log = env.vhost.node.node_log
    offset = node_log.stat().st_size
    agent = env.start_agent(ready=False)

    def failures() -> list[str]:
        return [line for line in agent.log_lines() if "broker:" in line]

    wait_for(
        f"the agent to say {reason!r}",
        lambda: any(reason in line for line in failures()),
        20,
    )
    time.sleep(4)  # more retries, which must not log again
    assert agent.alive(), agent.log()[-2000:]
    lines = failures()
    print(f"\n{kind}:\n" + "\n".join(lines))  # noqa: T201
    # One line per failure kind: the precise alert, and with TLS 1.3 possibly
    # the bare EOF a refused handshake can show up as.
    assert len(lines) == len(set(lines)) <= 2, lines
    assert all(re.search(r"cannot connect to \S+: TLS", ln) for ln in lines), lines
    assert "Traceback" not in agent.log()
    refused = _refusals(node_log, offset)
    assert refused >= 4, f"only {refused} attempts: no retrying"
    assert refused <= 25, f"{refused} attempts: no backoff"
    assert not agent.ready
    assert "READY=1" not in agent.notices
    assert agent.terminate(20) == 0
