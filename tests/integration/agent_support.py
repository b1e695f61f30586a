"""A real femd node for end-to-end tests: a ``python -m femd run`` on a test vhost.

``NodeEnv`` (fixture ``node_env``) owns, per test, one world-traversable scratch
root under /tmp (the sandbox user must traverse it) holding:

- an Ed25519 signing key, a policy trusting it for project ``demo`` (process
  launcher, egress to the counter's port only), a launcher profile dir whose
  ``default`` profile runs a task as a test-only user (femd forwards its
  egress to the counter, docs/network.md), ``femd.yaml`` (heartbeat 5 s, fast
  reconnects) and ``orchestrator.yaml`` on the test's ``broker_vhost``;
- a ``Counter``: a loopback TCP server that counts, per task id, the connections
  that carried it. Tasks made with ``NodeEnv.counted()`` open one connection at
  their start (bash ``/dev/tcp``), so the counter is a host-side witness of how
  many times each task really started, trusting nothing femd reports;
- a ``Collector``: a pika consumer (the orchestrator's identity) of
  ``femd.orchestrator.events`` and ``femd.orchestrator.results`` that records
  every delivery, duplicates included, and reconnects across broker faults;
- ``AgentProc``: the agent as a real subprocess, its stderr in a file, its
  sd_notify datagrams received on a ``NOTIFY_SOCKET`` the fixture binds.

``check_runs()`` asserts the fault-test invariants: one terminal event per task,
complete and ordered event streams, no gap in the node's ``seq`` among what the
orchestrator received, and no task started twice (counter).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.agent import Agent  # noqa: E402
from femd.config import load_config  # noqa: E402
from femd.envelope import encode_envelope, sign  # noqa: E402
from femd.errors import FemdError  # noqa: E402
from femd.keys import load_private_key, write_keypair  # noqa: E402
from femd.orchestrator import EVENTS_QUEUE, RESULTS_QUEUE  # noqa: E402
from femd.tree import remove_tree  # noqa: E402
from testbed import Vhost  # noqa: E402
from tests.integration.sandbox_support import ensure_task_user  # noqa: E402

__all__ = [
    "NODE",
    "TERMINAL",
    "AgentProc",
    "Collector",
    "Counter",
    "NodeEnv",
    "check_runs",
    "node_env_fixture",
    "wait_for",
]

NODE = "fdn-01"
PROJECT = "demo"
# The agent's tasks get a user of their own: RLIMIT_NPROC counts per uid, and the
# launcher tests' pids checks must not see our sandboxes.
TASK_USER = "femd-agent-test"
PYTHON = str(REPO / ".venv" / "bin" / "python")
TERMINAL = frozenset({"rejected", "succeeded", "failed", "timed_out", "cancelled"})
FLOW = ("received", "staging", "running", "uploading")
_LEVELS = {"2": "CRITICAL", "3": "ERROR", "4": "WARNING", "6": "INFO", "7": "DEBUG"}


def wait_for(
    what: str, predicate: Callable[[], object], timeout_s: float, every_s: float = 0.1
) -> Any:
    """Poll *predicate* until it returns something true; fail after *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}"
            )
        time.sleep(every_s)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# the execution counter


class Counter:
    """Counts, per task id, the TCP connections that carried it (a host witness)."""

    def __init__(self) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(256)
        self._server.settimeout(0.2)
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._counts: Tally[str] = Tally()
        self.first_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            conn.settimeout(10)
            try:
                while chunk := conn.recv(4096):
                    data += chunk
            except OSError:
                pass
        now = time.monotonic()
        with self._lock:
            for line in data.decode(errors="replace").split():
                self._counts[line] += 1
                self.first_at.setdefault(line, now)

    def count(self, task_id: str) -> int:
        with self._lock:
            return self._counts[task_id]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(5)


# ---------------------------------------------------------------------------
# the orchestrator-side collector


class Collector:
    """Records every status event and result chunk the orchestrator's queues get.

    ``raw`` keeps each delivery (redeliveries and republished duplicates too);
    ``events`` keeps one per ``(node, seq)``; ``chunk_seqs`` the ``seq`` of each
    result chunk (its ``message_id`` is ``<node>:<seq>``).
    """

    def __init__(self, vhost: Vhost) -> None:
        self._params = vhost.parameters(vhost.orchestrator, heartbeat=10)
        self._lock = threading.Lock()
        self.raw: list[dict[str, Any]] = []
        self.events: dict[tuple[str, int], dict[str, Any]] = {}
        self.chunk_seqs: dict[str, set[int]] = {}
        self.chunks: dict[str, dict[int, bytes]] = {}
        self.conflicts: list[str] = []
        self.received_at: dict[tuple[str, int], float] = {}
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        wait_for("the collector to connect", self._connected.is_set, 30)

    def _on_event(self, body: bytes) -> None:
        event = json.loads(body)
        key = (event["node"], int(event["seq"]))
        with self._lock:
            self.raw.append(event)
            known = self.events.get(key)
            if known is None:
                self.events[key] = event
                self.received_at[key] = time.monotonic()
            elif known != event:
                self.conflicts.append(f"seq {key} carried two bodies: {known} {event}")

    def _on_chunk(self, routing_key: str, props: Any, body: bytes) -> None:
        node, _, seq = str(props.message_id).rpartition(":")
        task = routing_key.rsplit(".", 1)[1]
        index = int((props.headers or {})["index"])
        with self._lock:
            self.chunk_seqs.setdefault(node, set()).add(int(seq))
            self.chunks.setdefault(task, {})[index] = body

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = pika.BlockingConnection(self._params)
            except (pika.exceptions.AMQPError, OSError):
                self._stop.wait(0.5)
                continue
            try:
                ch = conn.channel()
                ch.basic_qos(prefetch_count=500)

                def status(c: Any, m: Any, _p: Any, body: bytes) -> None:
                    self._on_event(body)
                    c.basic_ack(m.delivery_tag)

                def chunk(c: Any, m: Any, p: Any, body: bytes) -> None:
                    self._on_chunk(m.routing_key, p, body)
                    c.basic_ack(m.delivery_tag)

                ch.basic_consume(EVENTS_QUEUE, status)
                ch.basic_consume(RESULTS_QUEUE, chunk)
                self._connected.set()
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.1)
            except (pika.exceptions.AMQPError, OSError):
                self._stop.wait(0.5)
            finally:
                try:
                    if conn.is_open:
                        conn.close()
                except (pika.exceptions.AMQPError, OSError):
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    # -- queries ----------------------------------------------------------------

    def of(self, task_id: str) -> list[dict[str, Any]]:
        """The task's events, one per seq, in seq order."""
        with self._lock:
            found = [e for e in self.events.values() if e["task_id"] == task_id]
        return sorted(found, key=lambda e: e["seq"])

    def states(self, task_id: str) -> list[str]:
        return [e["state"] for e in self.of(task_id)]

    def terminal(self, task_id: str) -> dict[str, Any] | None:
        ends = [e for e in self.of(task_id) if e["state"] in TERMINAL]
        return ends[-1] if ends else None

    def has(self, task_id: str, state: str) -> bool:
        return state in self.states(task_id)

    def await_state(
        self, task_id: str, state: str, timeout_s: float = 30
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.of(task_id) if e["state"] == state), None)

        return wait_for(f"task {task_id} to be {state}", found, timeout_s)  # type: ignore[no-any-return]

    def await_terminal(
        self, task_ids: Iterable[str], timeout_s: float = 60
    ) -> dict[str, dict[str, Any]]:
        ids = list(task_ids)

        def all_done() -> bool:
            return all(self.terminal(t) is not None for t in ids)

        try:
            wait_for(f"{len(ids)} tasks to end", all_done, timeout_s, every_s=0.25)
        except AssertionError:
            left = [t for t in ids if self.terminal(t) is None]
            raise AssertionError(
                f"{len(left)} of {len(ids)} tasks never ended: {left[:10]} "
                f"(states of the first: {self.states(left[0])})"
            ) from None
        return {t: self.terminal(t) or {} for t in ids}

    def seqs(self, node: str = NODE) -> set[int]:
        """Every seq the orchestrator got from *node*: events and result chunks."""
        with self._lock:
            ev = {s for (n, s) in self.events if n == node}
            return ev | self.chunk_seqs.get(node, set())

    def event_seqs(self, node: str = NODE) -> list[int]:
        """The ``event_seq`` of every distinct status event from *node*."""
        with self._lock:
            return [
                int(e["event_seq"])
                for (n, _), e in self.events.items()
                if n == node and "event_seq" in e
            ]

    def outputs(self, task_id: str) -> bytes:
        with self._lock:
            parts = self.chunks.get(task_id, {})
            return b"".join(parts[i] for i in sorted(parts))


def check_runs(
    collector: Collector,
    counter: Counter,
    tasks: Iterable[str],
    *,
    never_started: Iterable[str] = (),
) -> dict[str, str]:
    """Assert the DESIGN delivery invariants for *tasks*; return their end states.

    Every task has exactly one terminal event; its events start with
    ``received``, follow the state order without repeats and end terminal; no
    seq is missing among everything the orchestrator got from the node, no
    ``event_seq`` among its status events alone; no task
    started twice, every succeeded task started once, *never_started* never.
    """
    ends: dict[str, str] = {}
    tasks = list(tasks)
    # A task's egress is forwarded by a helper: its connection to the counter
    # may close (and be counted) a moment after the task's terminal event.
    wait_for(
        "every succeeded task to be counted",
        lambda: all(
            counter.count(t) >= 1
            for t in tasks
            if (collector.terminal(t) or {}).get("state") == "succeeded"
        ),
        15,
    )
    counts = counter.counts()
    for t in tasks:
        states = collector.states(t)
        terminal = [s for s in states if s in TERMINAL]
        assert len(terminal) == 1, f"task {t}: terminal events {states}"
        assert states[0] == "received", f"task {t}: events {states}"
        assert states[-1] in TERMINAL, f"task {t}: events {states}"
        middle = states[:-1]
        assert middle == [s for s in FLOW if s in middle], f"task {t}: {states}"
        ends[t] = states[-1]
        runs = counts.get(t, 0)
        assert runs <= 1, f"task {t} started {runs} times"
        if states[-1] == "succeeded":
            assert runs == 1, f"task {t} succeeded but started {runs} times"
            assert middle == list(FLOW), f"task {t}: events {states}"
    for t in never_started:
        assert counts.get(t, 0) == 0, f"task {t} started"
    seqs = collector.seqs()
    assert seqs, "no event received at all"
    missing = sorted(set(range(1, max(seqs) + 1)) - seqs)
    assert not missing, f"seqs never received: {missing[:20]}"
    # DESIGN "Status event": femd.events alone is numbered without a gap.
    numbers = collector.event_seqs()
    assert sorted(numbers) == list(range(1, len(numbers) + 1)), sorted(numbers)[:40]
    assert not collector.conflicts, collector.conflicts[:3]
    return ends


# ---------------------------------------------------------------------------
# the agent process


class AgentProc:
    """``python -m femd run`` as a subprocess, with its own NOTIFY_SOCKET."""

    def __init__(self, config: Path, log: Path, notify_dir: Path) -> None:
        self.log_path = log
        self.notify_path = notify_dir / f"n{secrets.token_hex(3)}.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.notify_path))
        self._sock.settimeout(0.2)
        self.notices: list[str] = []
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEMD_")}
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        env["PYTHONPATH"] = str(REPO)
        with log.open("wb") as err:
            self.proc = subprocess.Popen(  # noqa: S603 (fixed arguments)
                [PYTHON, "-m", "femd", "run", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
                env=env,
            )

    def _read(self) -> None:
        # Always drained: sd_notify blocks the agent when this buffer is full.
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                if not line.startswith("WATCHDOG="):
                    self.notices.append(line)
                if line == "READY=1":
                    self._ready.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def await_ready(self, timeout_s: float = 30) -> None:
        if not self._ready.wait(timeout_s):
            raise AssertionError(
                f"agent not READY after {timeout_s:.0f} s:\n{self.log()[-3000:]}"
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        """The agent's diagnostic lines as ``femd: LEVEL: ...``, not audit entries.

        Outside systemd the agent writes its diagnostics as JSON lines beside
        the audit entries (those have a ``MESSAGE_ID``); start-up errors are
        plain ``femd: error: ...`` lines.
        """
        lines = []
        for line in self.log().splitlines():
            if line.startswith("femd:"):
                lines.append(line)
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "MESSAGE_ID" not in record:
                level = _LEVELS.get(record.get("PRIORITY", ""), "INFO")
                lines.append(f"femd: {level}: {record.get('MESSAGE', '')}")
        return lines

    def terminate(self, timeout_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)
        self._close()

    def _close(self) -> None:
        self._stop.set()
        self._reader.join(5)
        self._sock.close()
        self.notify_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# one node


class NodeEnv:
    """Keys, policy, profile, configs and helpers for one agent on one vhost."""

    def __init__(self, vhost: Vhost) -> None:
        ensure_task_user(TASK_USER)
        self.vhost = vhost
        self.root = Path(tempfile.mkdtemp(prefix="femd-agent-", dir="/tmp"))
        self.root.chmod(0o711)  # the task user traverses to its output dir
        self.counter = Counter()
        self.key_file, _, _ = write_keypair("orch", self.root / "keys")
        self.key = load_private_key(self.key_file)
        (self.root / "launchers").mkdir()
        (self.root / "launchers" / "default.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "femd/v1",
                    "kind": "LauncherProfile",
                    "name": "default",
                    "process": {"run_as": TASK_USER},
                }
            )
        )
        self.write_policy()
        self.settings: dict[str, Any] = {
            "node": NODE,
            "broker": {
                **vhost.broker_config(NODE),
                "heartbeat_s": 5,
                "reconnect_max_s": 2,
                "connect_timeout_s": 5,
            },
            "policy": "policy.yaml",
            "launchers": "launchers",
            "state_dir": "state",
            "max_concurrent_tasks": 2,
            "stop_grace_s": 5,
            "audit": "stderr",
            "log_level": "info",
        }
        self.config = self.root / "femd.yaml"
        self.write_config()
        self.orch_config = self.root / "orchestrator.yaml"
        self.orch_config.write_text(
            yaml.safe_dump(
                {
                    "broker": vhost.broker_config(vhost.orchestrator),
                    "results_dir": str(self.root / "results"),
                }
            )
        )
        self.agents: list[AgentProc] = []
        self.collector: Collector | None = None

    # -- files ------------------------------------------------------------------

    def write_policy(self, *, pids: int = 64, memory_mb: int = 256) -> None:
        """The policy: project ``demo`` signed by ``orch``, egress to the counter.

        *pids* is the project's maximum, which tasks get (RLIMIT_NPROC of the
        task user). Each finished sandbox leaves zombies for the host's init to
        reap, and they count against it until then: a slow init needs room.
        """
        policy = {
            "apiVersion": "femd/v1",
            "kind": "Policy",
            "node": NODE,
            "signers": {"orch": {"public_key_file": "keys/orch.pub"}},
            "projects": {
                PROJECT: {
                    "signers": ["orch"],
                    "launchers": ["process"],
                    "max_resources": {
                        "cpus": 1,
                        "memory_mb": memory_mb,
                        "timeout_s": 120,
                        "pids": pids,
                    },
                    "network": {"egress": [f"127.0.0.1:{self.counter.port}"]},
                }
            },
        }
        (self.root / "policy.yaml").write_text(yaml.safe_dump(policy))

    def write_config(self, **overrides: Any) -> None:
        self.settings.update(overrides)
        self.config.write_text(yaml.safe_dump(self.settings))

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    # -- manifests --------------------------------------------------------------

    def counted(self, task_id: str, then: str = "") -> list[str]:
        """A command that reports its start to the counter, then runs *then*."""
        script = f"echo {task_id} >/dev/tcp/127.0.0.1/{self.counter.port}"
        if then:
            script += f"; {then}"
        return ["/bin/bash", "-c", script]

    def manifest(
        self, task_id: str, command: list[str], **fields: Any
    ) -> dict[str, Any]:
        now = datetime.now(UTC)
        base: dict[str, Any] = {
            "apiVersion": "femd/v1",
            "kind": "Task",
            "id": task_id,
            "project": PROJECT,
            "issued_at": _iso(now - timedelta(minutes=1)),
            "expires_at": _iso(now + timedelta(hours=1)),
            "nodes": [NODE],
            "launcher": "process",
            "command": command,
            "resources": {"timeout_s": 90},
            "network": {
                "mode": "egress",
                "allow": [f"127.0.0.1:{self.counter.port}"],
            },
        }
        base.update(fields)
        return base

    def sign(self, manifest: dict[str, Any], *, signed: bool = True) -> bytes:
        payload = json.dumps(manifest).encode()
        return encode_envelope(sign(payload, [self.key] if signed else []))

    def task(self, task_id: str, then: str = "", **fields: Any) -> bytes:
        """A signed, counted task envelope."""
        return self.sign(self.manifest(task_id, self.counted(task_id, then), **fields))

    def cancel_manifest(self, cancel_id: str, target: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {
            "apiVersion": "femd/v1",
            "kind": "Cancel",
            "id": cancel_id,
            "project": PROJECT,
            "target": target,
            "issued_at": _iso(now - timedelta(minutes=1)),
            "expires_at": _iso(now + timedelta(hours=1)),
            "nodes": [NODE],
        }

    def cancel(self, cancel_id: str, target: str) -> bytes:
        """A signed Cancel of *target*."""
        return self.sign(self.cancel_manifest(cancel_id, target))

    # -- broker -----------------------------------------------------------------

    def publish(self, *bodies: bytes) -> float:
        """Publish *bodies* to this node's queue with confirms; return the time."""
        conn = pika.BlockingConnection(self.vhost.parameters(self.vhost.orchestrator))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            props = pika.BasicProperties(delivery_mode=2)
            for body in bodies:
                ch.basic_publish("femd.tasks", NODE, body, props, mandatory=True)
        finally:
            conn.close()
        return time.monotonic()

    def collect(self) -> Collector:
        if self.collector is None:
            self.collector = Collector(self.vhost)
        return self.collector

    # -- processes --------------------------------------------------------------

    def start_agent(self, *, ready: bool = True) -> AgentProc:
        n = len(self.agents) + 1
        agent = AgentProc(self.config, self.root / f"agent-{n}.log", self.root)
        self.agents.append(agent)
        if ready:
            agent.await_ready()
        return agent

    def femd(
        self, *args: str, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run the femd CLI as a subprocess."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEMD_")}
        env["PYTHONPATH"] = str(REPO)
        return subprocess.run(  # noqa: S603 (fixed arguments)
            [PYTHON, "-m", "femd", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=REPO,
            env=env,
            check=False,
        )

    def tasks_json(self) -> dict[str, dict[str, Any]]:
        done = self.femd("tasks", "--config", str(self.config), "--json")
        assert done.returncode == 0, done.stderr
        return {row["task_id"]: row for row in json.loads(done.stdout)}

    def close(self) -> None:
        for agent in self.agents:
            if agent.alive():
                agent.kill()
        if self.collector is not None:
            self.collector.close()
        self.counter.close()
        with contextlib.suppress(FemdError):
            remove_tree(self.root)  # tasks may leave trees shutil cannot remove

    def diagnostics(self) -> str:
        """The tail of every agent's log, for a failing test's report."""
        return "\n".join(
            f"--- {a.log_path.name}\n" + "\n".join(a.log_lines()[-40:])
            for a in self.agents
        )


@pytest.fixture(name="node_env")
def node_env_fixture(
    broker_vhost: Vhost, request: pytest.FixtureRequest
) -> Iterator[NodeEnv]:
    """A NodeEnv on a fresh vhost; agent logs are printed when the test fails."""
    env = NodeEnv(broker_vhost)
    failed_before = request.session.testsfailed
    try:
        yield env
    finally:
        if request.session.testsfailed > failed_before:
            sys.stderr.write(env.diagnostics() + "\n")
        env.close()


@contextlib.contextmanager
def agent_in_process(env: NodeEnv, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    """Run *env*'s agent in this process (a thread) while the block runs.

    As systemd would see it: a notify socket; READY before the block, a
    clean stop (exit code 0) after it. In-process, a test's registry line or
    patch applies to it.
    """
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(env.root / f"notify-{secrets.token_hex(3)}.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", notify.getsockname())
    agent = Agent(load_config(env.config))
    exit_codes: list[int] = []
    runner = threading.Thread(target=lambda: exit_codes.append(agent.run()))
    runner.start()
    try:
        wait_for("READY", lambda: agent._ready, 30)
        yield agent
    finally:
        agent.request_stop()
        runner.join(30)
        notify.close()
    assert exit_codes == [0]
