"""The orchestrator's side on a real broker (issue 18): nothing lost, nodes, logs.

Every test runs the real ``femd`` CLI (``watch``, ``nodes``, ``submit``) as
subprocesses against a real agent on a private RabbitMQ. Outputs carry their
own witness: the task writes ``blob.bin`` and, inside the sandbox,
``blob.sha256`` of it, so byte-identity is checked against what the task
itself produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.integration.agent_support import (  # noqa: E402
    NODE,
    PYTHON,
    AgentProc,
    NodeEnv,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
    wait_for,
)

pytestmark = [pytest.mark.rabbitmq, pytest.mark.bwrap]

MiB = 1024 * 1024


def blob_task(env: NodeEnv, task_id: str, size: str, then: str = "") -> bytes:
    """A task writing *size* random bytes and, beside them, their sha256."""
    script = (
        f"head -c {size} /dev/urandom > /out/blob.bin"
        " && sha256sum /out/blob.bin | cut -d' ' -f1 > /out/blob.sha256"
    )
    if then:
        script += f"; {then}"
    return env.sign(env.manifest(task_id, ["/bin/bash", "-c", script]))


def submit(env: NodeEnv, *envelopes: bytes) -> None:
    for n, body in enumerate(envelopes):
        path = env.root / f"sub-{time.monotonic_ns()}-{n}.env"
        path.write_bytes(body)
        done = env.femd("submit", "--config", str(env.orch_config), "--node", NODE,
                        str(path))  # fmt: skip
        assert done.returncode == 0, done.stderr


# Runs argv[2:] as a forked child and writes the child's own peak RSS (KiB)
# to argv[1]. Not os.wait4 on a child of pytest: a process exec'd from pytest
# keeps pytest's RSS at exec as its ru_maxrss (the kernel records the old
# mm's high-water mark), so a watch started from a 240 MiB pytest would
# "peak" at 240 MiB having used 60. This shim's child starts from the shim's
# small image. SIGTERM/SIGINT are passed on to the child.
PEAK_SHIM = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda n, _f: os.kill(pid, n))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


class Watcher:
    """``femd watch`` as a subprocess, stdout and stderr in files.

    With *peak*, it runs under ``PEAK_SHIM`` and ``peak_kib()`` is its own
    peak RSS once it has exited.
    """

    def __init__(self, env: NodeEnv, args: tuple[str, ...], peak: bool = False) -> None:
        env_vars = {k: v for k, v in os.environ.items() if not k.startswith("FEMD_")}
        env_vars["PYTHONPATH"] = str(REPO)
        tag = time.monotonic_ns()
        self.out = env.root / f"watch-{tag}.out"
        self.err = env.root / f"watch-{tag}.err"
        self.peak = env.root / f"watch-{tag}.peak"
        argv = [PYTHON, "-m", "femd", "watch", "--config", str(env.orch_config)]
        if peak:
            argv = [PYTHON, "-c", PEAK_SHIM, str(self.peak), *argv]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(  # noqa: S603 (fixed arguments)
                [*argv, *args], stdout=out, stderr=err, cwd=REPO, env=env_vars
            )
        env.watchers.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self, timeout_s: float) -> tuple[int, str, str]:
        """Wait for it; return (exit code, stdout, stderr)."""
        code = self.proc.wait(timeout_s)
        return code, self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def peak_kib(self) -> int:
        """The watch's peak RSS, as the shim wrote it when the watch exited."""
        return int(self.peak.read_text())


def watch(env: NodeEnv, *args: str) -> Watcher:
    return Watcher(env, args)


@pytest.fixture(autouse=True)
def _no_leftover_watchers(node_env: NodeEnv) -> Iterator[None]:
    node_env.watchers = []  # type: ignore[attr-defined]
    yield
    for w in node_env.watchers:  # type: ignore[attr-defined]
        w.kill()


def inbox_dir(env: NodeEnv) -> Path:
    return env.root / "results"


def received_chunks(inbox: Path, task: str) -> int:
    db = inbox / "inbox.sqlite"
    if not db.exists():
        return 0
    conn = sqlite3.connect(db, timeout=30)
    try:
        return int(
            conn.execute(
                "SELECT COUNT(*) FROM chunks WHERE task_id = ?", (task,)
            ).fetchone()[0]
        )
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def check_blob(inbox: Path, task: str) -> str:
    """The outputs of *task* are the task's own bytes; return their sha256."""
    out = inbox / NODE / task
    digest = hashlib.sha256()
    with (out / "blob.bin").open("rb") as f:
        while data := f.read(MiB):
            digest.update(data)
    assert digest.hexdigest() == (out / "blob.sha256").read_text().strip()
    return digest.hexdigest()


def terminal_events(inbox: Path, task: str) -> list[dict[str, object]]:
    lines = (inbox / "events.jsonl").read_text().splitlines()
    return [
        e
        for e in map(json.loads, lines)
        if e["task_id"] == task and e["state"] == "succeeded"
    ]


# -- nothing lost ---------------------------------------------------------------


def test_two_watches_any_order_and_a_late_watch_get_their_outputs(
    node_env: NodeEnv,
) -> None:
    env = node_env
    env.start_agent()
    # B's watch starts before anything exists; A's after both were submitted.
    watch_b = watch(env, "--task", "two-b", "--node", NODE, "--timeout", "90")
    submit(env, blob_task(env, "two-a", "300K"), blob_task(env, "two-b", "200K"))
    watch_a = watch(env, "--task", "two-a", "--node", NODE, "--timeout", "90")
    for proc in (watch_a, watch_b):
        code, out, err = proc.finish(120)
        assert code == 0, err
        assert json.loads(out.splitlines()[-1])["state"] == "succeeded"
    inbox = inbox_dir(env)
    digests = {t: check_blob(inbox, t) for t in ("two-a", "two-b")}
    assert digests["two-a"] != digests["two-b"]
    # A watch started after both ended, with nobody left to consume for it.
    code, out, err = watch(env, "--task", "two-b", "--timeout", "30").finish(60)
    assert code == 0, err
    assert [json.loads(x)["state"] for x in out.splitlines()][-1] == "succeeded"
    assert "verified in" in err
    assert check_blob(inbox, "two-b") == digests["two-b"]
    # `tasks --orchestrator` reads the same inbox.
    done = env.femd("tasks", "--orchestrator", "--config", str(env.orch_config),
                    "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {r["task_id"]: r for r in json.loads(done.stdout)}
    assert rows["two-a"]["outputs"]["status"] == "complete"
    assert rows["two-b"]["state"] == "succeeded"


def test_outputs_survive_a_killed_watch_a_broker_and_an_agent_restart(
    node_env: NodeEnv,
) -> None:
    """Each fault hits while chunks are moving; each output arrives once, verified."""
    env = node_env
    env.write_config(result_chunk_bytes=16 * 1024)
    agent = env.start_agent()
    inbox = inbox_dir(env)

    # 1. A watch killed mid-transfer, then started again.
    submit(env, blob_task(env, "cut-watch", "24M"))
    first = watch(env, "--task", "cut-watch", "--timeout", "120")
    wait_for("chunks arriving", lambda: received_chunks(inbox, "cut-watch") > 20, 90)
    first.kill()
    assert received_chunks(inbox, "cut-watch") > 0  # killed before it completed
    code, _, err = watch(env, "--task", "cut-watch", "--timeout", "120").finish(150)
    assert code == 0, err
    check_blob(inbox, "cut-watch")

    # 2. The broker restarts mid-transfer; the watch reconnects by itself.
    submit(env, blob_task(env, "cut-broker", "24M"))
    second = watch(env, "--task", "cut-broker", "--timeout", "180")
    wait_for("chunks arriving", lambda: received_chunks(inbox, "cut-broker") > 20, 90)
    env.vhost.node.restart()
    code, _, err = second.finish(210)
    assert code == 0, err
    assert "reconnecting" in err  # the broker really went away under it
    check_blob(inbox, "cut-broker")

    # 3. The agent is killed mid-transfer and started again: it resumes.
    submit(env, blob_task(env, "cut-agent", "24M"))
    third = watch(env, "--task", "cut-agent", "--timeout", "180")
    wait_for("chunks arriving", lambda: received_chunks(inbox, "cut-agent") > 20, 90)
    agent.kill()
    assert received_chunks(inbox, "cut-agent") > 0  # really mid-transfer
    env.start_agent()
    code, _, err = third.finish(210)
    assert code == 0, err
    check_blob(inbox, "cut-agent")

    for task in ("cut-watch", "cut-broker", "cut-agent"):
        assert len(terminal_events(inbox, task)) == 1, task
        assert not (inbox / "parts" / NODE / f"{task}.part").exists()
    assert not list((env.state_dir / "outgoing").iterdir())  # sent, then removed


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# Incompressible, fast to make (a seeded generator), and the host can make it
# again to know the digest without trusting anything the node says.
GIB_WRITER = """
import random, sys
r = random.Random(7)
with open(sys.argv[1], "wb") as f:
    for _ in range(1024):
        f.write(r.randbytes(1 << 20))
"""


def gib_digest() -> str:
    import random

    r = random.Random(7)  # noqa: S311 (test data, not a secret)
    digest = hashlib.sha256()
    for _ in range(1024):
        digest.update(r.randbytes(1 << 20))
    return digest.hexdigest()


def _stages(task: str, env: NodeEnv) -> str:
    """Node-side times: running, packing (uploading), transfer to verified."""
    inbox = inbox_dir(env)
    at = {
        e["state"]: datetime.fromisoformat(str(e["at"]))
        for e in map(json.loads, (inbox / "events.jsonl").read_text().splitlines())
        if e["task_id"] == task
    }
    conn = sqlite3.connect(inbox / "inbox.sqlite")
    try:
        (verified,) = conn.execute(
            "SELECT updated_at FROM outputs WHERE task_id = ?", (task,)
        ).fetchone()
    finally:
        conn.close()
    done = datetime.fromisoformat(verified)
    run = (at["uploading"] - at["running"]).total_seconds()
    pack = (at["succeeded"] - at["uploading"]).total_seconds()
    move = (done - at["succeeded"]).total_seconds()
    return f"task {run:.1f} s, pack {pack:.1f} s, transfer+verify+unpack {move:.1f} s"


def test_one_gib_output_with_bounded_memory(node_env: NodeEnv) -> None:
    env = node_env
    env.write_config(result_chunk_bytes=1024 * 1024)
    # The process launcher's output dir is a tmpfs charged to the task's
    # memory: 1 GiB of outputs needs more than 1 GiB of memory_mb.
    env.write_policy(memory_mb=1400)
    manifest = env.manifest(
        "gib",
        ["/usr/bin/python3", "-c", GIB_WRITER, "/out/blob.bin"],
        resources={"timeout_s": 110, "memory_mb": 1400},
    )
    agent = env.start_agent()
    began = time.monotonic()
    submit(env, env.sign(manifest))
    # ru_maxrss of the watch, from the kernel, when it exits (see PEAK_SHIM).
    proc = Watcher(env, ("--task", "gib", "--timeout", "400"), peak=True)
    code, _, err = proc.finish(420)
    elapsed = time.monotonic() - began
    assert code == 0, err
    got = hashlib.sha256()
    with (inbox_dir(env) / NODE / "gib" / "blob.bin").open("rb") as f:
        while data := f.read(MiB):
            got.update(data)
    assert got.hexdigest() == gib_digest()
    agent_kib = _hwm_kib(agent.proc.pid)
    watch_kib = proc.peak_kib()
    report = (
        f"1 GiB output: {elapsed:.1f} s submit-to-verified ({_stages('gib', env)}),"
        f" peak RSS agent {agent_kib / 1024:.0f} MiB, watch {watch_kib / 1024:.0f} MiB"
    )
    sys.stderr.write(report + "\n")
    (REPO / ".pytest_cache").mkdir(exist_ok=True)
    (REPO / ".pytest_cache" / "femd-1gib.txt").write_text(report + "\n")
    # Bounded: far below the output's size on both sides.
    assert agent_kib < 256 * 1024, report
    assert watch_kib < 192 * 1024, report


# -- nodes ---------------------------------------------------------------------------


def test_nodes_shows_two_agents_and_a_stopped_one_as_down(node_env: NodeEnv) -> None:
    env = node_env
    env.write_config(node_status_interval_s=2)
    env.start_agent()
    # A second node, fdn-02, with its own config and policy.
    policy = yaml.safe_load((env.root / "policy.yaml").read_text())
    policy["node"] = "fdn-02"
    (env.root / "policy-2.yaml").write_text(yaml.safe_dump(policy))
    second = dict(env.settings)
    second.update(
        node="fdn-02",
        broker={**env.settings["broker"], **env.vhost.broker_config("fdn-02")},
        policy="policy-2.yaml",
        state_dir="state-2",
        node_status_interval_s=2,
    )
    config2 = env.root / "femd-2.yaml"
    config2.write_text(yaml.safe_dump(second))
    other = AgentProc(config2, env.root / "agent-fdn-02.log", env.root)
    env.agents.append(other)
    other.await_ready()

    def nodes() -> dict[str, dict[str, object]]:
        done = env.femd("nodes", "--config", str(env.orch_config), "--json",
                        "--receive", "1")  # fmt: skip
        assert done.returncode == 0, done.stderr
        return {n["node"]: n for n in json.loads(done.stdout)}

    seen = wait_for("both nodes up", lambda: (n := nodes()) and len(n) == 2 and n, 30)
    for name in (NODE, "fdn-02"):
        row = seen[name]
        assert row["down"] is False
        assert row["interval_s"] == 2
        assert row["disk_free_bytes"] > 0
        assert row["cert_not_after"]
        assert len(str(row["policy_sha256"])) == 64
        launchers = row["launchers"]
        assert isinstance(launchers, list)
        assert ("default", "process") in {
            (x["profile"], x["launcher"]) for x in launchers
        }
    other.kill()  # no goodbye: silence alone must mark it down
    stopped = time.monotonic()
    wait_for("fdn-02 down", lambda: nodes()["fdn-02"]["down"], 30)
    assert time.monotonic() - stopped < 3 * 2 + 8  # 3 intervals, plus a margin
    assert nodes()[NODE]["down"] is False
    text = env.femd("nodes", "--config", str(env.orch_config), "--receive", "0")
    down = [line for line in text.stdout.splitlines() if "DOWN" in line]
    assert [line.split()[0] for line in down] == ["fdn-02"]


# -- live logs ------------------------------------------------------------------------


def test_live_logs_arrive_before_the_task_ends(node_env: NodeEnv) -> None:
    env = node_env
    env.start_agent()
    script = "for i in 1 2 3; do echo live-line-$i; sleep 1; done; sleep 6"
    submit(env, env.sign(env.manifest("live", ["/bin/bash", "-c", script])))
    proc = watch(env, "--task", "live", "--logs", "--timeout", "60")
    out_path = proc.out

    def lines() -> list[dict[str, object]]:
        return [json.loads(x) for x in out_path.read_text().splitlines() if x]

    got = wait_for(
        "three live lines",
        lambda: [x["log"] for x in lines() if "log" in x][:3] == [
            "live-line-1", "live-line-2", "live-line-3"
        ],
        30,
    )  # fmt: skip
    assert got
    # ...and the task had not ended when they arrived.
    assert not any(x.get("state") == "succeeded" for x in lines())
    code, _, err = proc.finish(60)
    assert code == 0, err
    assert all(x["node"] == NODE for x in lines() if "log" in x)


def test_a_task_printing_100_mb_is_throttled_and_the_agent_responds(
    node_env: NodeEnv,
) -> None:
    env = node_env
    env.write_config(live_log_bytes_s=8192, live_log_burst_bytes=16384)
    env.start_agent()
    loud = "yes 0123456789012345678901234567890123456789 | head -c 100M; sleep 4"
    submit(env, env.sign(env.manifest("loud", ["/bin/bash", "-c", loud])))
    proc = watch(env, "--task", "loud", "--logs", "--timeout", "120")
    out_path = proc.out
    wait_for("live output", lambda: "log" in out_path.read_text(), 60)
    # The agent still takes and runs work while the loud task prints.
    began = time.monotonic()
    submit(env, blob_task(env, "quiet", "1K"))
    code, _, err = watch(env, "--task", "quiet", "--timeout", "60").finish(90)
    assert code == 0, err
    quiet_s = time.monotonic() - began
    code, out, err = proc.finish(150)
    assert code == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    sent = sum(len(str(r["log"])) + 1 for r in rows if "log" in r)
    dropped = sum(int(r["log_dropped_bytes"]) for r in rows if "log_dropped_bytes" in r)
    ends = [r for r in rows if r.get("state") == "succeeded"]
    run_s = 10 + 120  # generous: the burst plus the rate over the whole run
    assert sent <= 16384 + 8192 * run_s, sent
    assert sent < 4 * MiB
    # The launcher keeps the first log_max_bytes (1 MiB); of those, what the
    # rate did not allow was dropped, and said so.
    assert dropped > 512 * 1024, dropped
    assert ends, out[-500:]
    assert quiet_s < 60


# -- cancel ---------------------------------------------------------------------------


def test_cancel_signs_and_submits_a_cancel(node_env: NodeEnv) -> None:
    env = node_env
    env.start_agent()
    submit(env, env.sign(env.manifest("long", ["/bin/bash", "-c", "sleep 60"])))
    proc = watch(env, "--task", "long", "--timeout", "60")
    wait_for(
        "the task running",
        lambda: (
            '"running"' in (inbox_dir(env) / "events.jsonl").read_text()
            if (inbox_dir(env) / "events.jsonl").exists()
            else False
        ),
        30,
    )
    done = env.femd("cancel", "long", "--config", str(env.orch_config), "--node", NODE,
                    "--key", str(env.key_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "submitted cancel cancel-" in done.stdout
    code, out, err = proc.finish(60)
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["state"] == "cancelled"
    # A task this inbox never submitted needs its project named.
    ours = env.femd("cancel", "nope", "--config", str(env.orch_config), "--node",
                    NODE, "--key", str(env.key_file))  # fmt: skip
    assert ours.returncode == 2
    assert "give --project" in ours.stderr
