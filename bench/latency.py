"""Submit->succeeded latency and burst throughput of a trivial task (issue 4).

    .venv/bin/python bench/latency.py [--n 30] [--burst 100] [--json FILE]

Runs as root (femd's process launcher then runs tasks as femd-task). Starts a
private TLS RabbitMQ (testbed.RabbitNode) and one femd agent (`python -m femd
run`, process launcher, max_concurrent_tasks 2), then, over the same broker:

- femd latency: publish one signed envelope (`/usr/bin/true`) to femd.tasks with
  publisher confirms, wait for its `succeeded` event on femd.orchestrator.events;
  N sequential tasks, p50/p95.
- femd burst: publish B envelopes back to back, wait until all succeeded.

Baselines, measured in the same run:

- bare pika round trip: the same two broker hops without femd. The orchestrator
  publishes to femd.tasks (routing key = a second node); an echo consumer holding
  that node's certificate acks it and publishes a `succeeded` event to
  femd.events with confirms, as femd does; the orchestrator waits for it.
- bare sandbox start: `bwrap --unshare-all ... /usr/bin/true` as femd-task.
- the latency baseline is their sum (the least any broker+sandbox agent must
  do); the burst baseline is B bare round trips back to back plus B bare
  sandboxes at the agent's concurrency, the slower of the two bounding it.

Ratios are femd time / baseline time (1.0 = no overhead). No assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # testbed/ and demo/ live at the repository root
    sys.path.insert(0, str(REPO))

import pika  # noqa: E402
import yaml  # noqa: E402

from demo.agents import AgentProcess  # noqa: E402
from femd.broker import EVENTS_EXCHANGE, TASKS_EXCHANGE  # noqa: E402
from femd.envelope import encode_envelope, sign  # noqa: E402
from femd.keys import generate, public_pem  # noqa: E402
from femd.orchestrator import EVENTS_QUEUE, RESULTS_QUEUE  # noqa: E402
from testbed import RabbitNode, Vhost  # noqa: E402

AGENT_NODE = "bench-a"  # runs femd
ECHO_NODE = "bench-b"  # bare pika echo (baseline)
TASK_USER = "femd-task"
CONCURRENCY = 2  # the agent's max_concurrent_tasks (femd.yaml default)
POLICY = """\
apiVersion: femd/v1
kind: Policy
node: bench-a
signers:
  orchestrator: {public_key_file: orchestrator.pub}
projects:
  bench:
    signers: [orchestrator]
    launchers: [process]
    max_resources: {cpus: 1, memory_mb: 256, timeout_s: 60, pids: 1024}
"""
BWRAP = [
    "bwrap", "--unshare-all", "--die-with-parent", "--new-session",
    "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
    "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
    "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
    "--", "/usr/bin/true",
]  # fmt: skip


# -- figures -----------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The *q* quantile (0..1), linear interpolation (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Row:
    """One line of the results table: a figure, its baseline, their ratio."""

    name: str
    figure: float | None  # None: not measured (see note)
    baseline: float | None
    unit: str
    ratio: float | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def print_rows(rows: list[Row]) -> None:
    width = max(38, *(len(r.name) + 1 for r in rows))
    print(f"{'figure':<{width}}{'value':>12}{'baseline':>10}{'ratio':>8}  note")
    for r in rows:
        fig = "-" if r.figure is None else f"{r.figure:.2f}"
        base = "-" if r.baseline is None else f"{r.baseline:.2f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        cells = f"{r.name:<{width}}{fig:>9} {r.unit:<2}{base:>10}{ratio:>8}"
        print(f"{cells}  {r.note}".rstrip())


# -- the bare sandbox ------------------------------------------------------------


def task_user() -> tuple[int, int]:
    entry = pwd.getpwnam(TASK_USER)
    return entry.pw_uid, entry.pw_gid


def settle(timeout_s: float = 15.0) -> None:
    """Wait until no zombie of femd-task is left (PID 1 reaped bwrap's orphans).

    Zombies count against femd-task's RLIMIT_NPROC, which is how the process
    launcher enforces `pids` (and 64 in its capability probe): a run that starts
    while the previous one's orphans linger measures the host, not femd.
    """
    uid, _ = task_user()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        zombies = 0
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    status = Path(f"/proc/{entry.name}/status").read_text()
                    uids = status.split("Uid:", 1)[1].split()
                    zombies += int(uids[0]) == uid and "State:\tZ" in status
        if not zombies:
            return
        time.sleep(0.2)


def bare_bwrap_once() -> float:
    """Seconds for one `bwrap ... true` as femd-task, spawn to exit."""
    uid, gid = task_user()
    t0 = time.perf_counter()
    subprocess.run(
        BWRAP, check=True, user=uid, group=gid, extra_groups=[],
        stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    return time.perf_counter() - t0


_TCK = os.sysconf("SC_CLK_TCK")


def pid_cpu(pid: int) -> float:
    """utime + stime of *pid* (all its threads), seconds; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TCK


def _beams() -> list[int]:
    """The RabbitMQ (Erlang VM) processes on this host."""
    found = []
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if d.name.isdigit() and (d / "comm").read_text().strip() == "beam.smp":
                found.append(int(d.name))
    return found


@dataclass(frozen=True)
class CpuMark:
    """CPU seconds used so far: the whole host (busy, all cores), one process
    (the agent, if any), the brokers."""

    host: float
    agent: float
    brokers: float

    @classmethod
    def now(cls, agent: int | None, brokers: list[int]) -> CpuMark:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice:
        # guest time is inside user and nice; steal is not this host's work.
        busy = sum(ticks[:7]) - ticks[3] - ticks[4]
        return cls(
            busy / _TCK,
            pid_cpu(agent) if agent else 0.0,
            sum(pid_cpu(b) for b in brokers),
        )

    def per_task_ms(self, start: CpuMark, count: int) -> tuple[float, str]:
        """Milliseconds of host CPU per task from *start* to this mark, and
        how they split."""
        host, agent, brokers = (
            (getattr(self, k) - getattr(start, k)) * 1000 / count
            for k in ("host", "agent", "brokers")
        )
        split = f"the agent {agent:.1f}, " if agent else ""
        return host, (
            f"{split}RabbitMQ {brokers:.1f}, the rest (sandboxes, this client) "
            f"{host - agent - brokers:.1f} ms"
        )


def bare_bwrap_burst(count: int, concurrency: int) -> float:
    """Seconds for *count* bare sandboxes, *concurrency* at a time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: bare_bwrap_once(), range(count)))
    return time.perf_counter() - t0


# -- the broker side -----------------------------------------------------------------


class EventTap:
    """The orchestrator's connection: publishes tasks, notes when events arrive."""

    def __init__(self, vhost: Vhost) -> None:
        self.conn = pika.BlockingConnection(vhost.parameters("orchestrator"))
        self.pub = self.conn.channel()
        self.pub.confirm_delivery()
        self.sub = self.conn.channel()
        self.sub.basic_qos(prefetch_count=1000)
        self.arrived: dict[tuple[str, str], float] = {}
        self.failures: dict[str, dict[str, Any]] = {}
        self.stamped: dict[tuple[str, str], float] = {}
        self.sub.basic_consume(EVENTS_QUEUE, self._event, auto_ack=True)
        self.sub.basic_consume(RESULTS_QUEUE, lambda *_: None, auto_ack=True)

    def _event(self, _ch: Any, _m: Any, _p: Any, body: bytes) -> None:
        event = json.loads(body)
        self.arrived.setdefault((event["task_id"], event["state"]), time.perf_counter())
        # The agent's own clock (same host): when each transition happened.
        stamp = datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()
        self.stamped.setdefault((event["task_id"], event["state"]), stamp)
        if event["state"] in ("failed", "rejected", "timed_out", "cancelled"):
            self.failures.setdefault(event["task_id"], event)

    def publish(self, node: str, body: bytes, message_id: str) -> None:
        props = pika.BasicProperties(delivery_mode=2, message_id=message_id)
        self.pub.basic_publish(TASKS_EXCHANGE, node, body, props, mandatory=True)

    def wait(self, done: Callable[[], bool], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError("events did not arrive in time")
            self.conn.process_data_events(time_limit=0.002)

    def ended(self, task_id: str) -> bool:
        return self.succeeded(task_id) is not None or task_id in self.failures

    def succeeded(self, task_id: str) -> float | None:
        return self.arrived.get((task_id, "succeeded"))

    def why(self, task_id: str) -> str:
        event = self.failures[task_id]
        why = event.get("log_tail") or event.get("reasons") or event.get("error")
        return f"{event['state']}: {str(why).strip()[-160:]}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


class Echo(threading.Thread):
    """A bare pika 'agent': ack each task, publish a confirmed `succeeded` event."""

    def __init__(self, vhost: Vhost) -> None:
        super().__init__(daemon=True)
        self.params = vhost.parameters(ECHO_NODE)
        self.stopping = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        conn = pika.BlockingConnection(self.params)
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_qos(prefetch_count=CONCURRENCY)
        seq = 0

        def on_task(chan: Any, method: Any, props: Any, _body: bytes) -> None:
            nonlocal seq
            seq += 1
            event = {
                "node": ECHO_NODE,
                "task_id": props.message_id,
                "seq": seq,
                "state": "succeeded",
                "at": datetime.now(UTC).isoformat(),
            }
            key = f"{ECHO_NODE}.{props.message_id}.succeeded"
            chan.basic_publish(EVENTS_EXCHANGE, key, json.dumps(event).encode())
            chan.basic_ack(method.delivery_tag)

        ch.basic_consume(f"femd.node.{ECHO_NODE}", on_task)
        self.ready.set()
        while not self.stopping.is_set():
            conn.process_data_events(time_limit=0.05)
        conn.close()


# -- the femd side -------------------------------------------------------------------


class Testbed:
    """A private broker, a vhost for two nodes, and a femd agent for bench-a."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="femd-bench-"))
        self.base.chmod(0o711)  # femd-task must reach the task's output dir
        self.broker = RabbitNode(self.base / "broker")
        self.key = generate()
        self.agent: AgentProcess | None = None
        self.vhost: Vhost | None = None

    def start_broker(self) -> Vhost:
        self.broker.start()
        self.vhost = self.broker.provision("bench", [AGENT_NODE, ECHO_NODE])
        return self.vhost

    def start_agent(self, policy: str = POLICY) -> AgentProcess:
        assert self.vhost is not None
        node = self.base / AGENT_NODE
        node.mkdir(mode=0o711)
        (node / "orchestrator.pub").write_bytes(public_pem(self.key.public_key()))
        (node / "policy.yaml").write_text(policy)
        config = {
            "node": AGENT_NODE,
            "broker": self.vhost.broker_config(AGENT_NODE),
            "policy": "policy.yaml",
            "launchers": str(REPO / "launchers"),
            "state_dir": "state",
            "max_concurrent_tasks": CONCURRENCY,
            "audit": "stderr",
            "log_level": "warning",
        }
        (node / "femd.yaml").write_text(yaml.safe_dump(config))
        self.agent = AgentProcess(AGENT_NODE, node / "femd.yaml", node / "agent.log")
        self.agent.start()
        self.agent.wait_ready()
        return self.agent

    def envelope(self, **fields: Any) -> tuple[str, bytes]:
        now = datetime.now(UTC)
        task_id = str(uuid.uuid4())
        manifest = {
            "apiVersion": "femd/v1", "kind": "Task", "id": task_id,
            "project": "bench", "nodes": [AGENT_NODE], "launcher": "process",
            "issued_at": (now - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "expires_at": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": ["/usr/bin/true"],
            # pids is RLIMIT_NPROC of femd-task, shared with every other sandbox
            # of that user on the host (other test runs too): leave headroom.
            "resources": {"cpus": 1, "memory_mb": 256, "timeout_s": 60, "pids": 1024},
        }  # fmt: skip
        manifest.update(fields)
        return task_id, encode_envelope(sign(json.dumps(manifest).encode(), [self.key]))

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.broker.close()
        if not os.environ.get("FEMD_BENCH_KEEP"):
            shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def testbed(*, with_agent: bool) -> Iterator[Testbed]:
    bed = Testbed()
    try:
        bed.start_broker()
        if with_agent:
            bed.start_agent()
        yield bed
    finally:
        bed.close()


# -- measurements --------------------------------------------------------------------


@dataclass
class Failures:
    """Tasks that did not succeed (each retried once the host settled)."""

    count: int = 0
    last: str = ""

    def note(self) -> str:
        if not self.count:
            return ""
        return f"{self.count} not succeeded (not counted), e.g. {self.last[-120:]}"


STAGES = ("received", "staging", "running", "uploading", "succeeded")


def sequential(
    tap: EventTap,
    node: str,
    make: Callable[[], tuple[str, bytes]],
    n: int,
    failures: Failures,
    stages: dict[str, list[float]] | None = None,
) -> list[float]:
    """Publish one at a time; seconds from publish to `succeeded` for each.

    *stages* collects, per state, the seconds since the previous state's event.
    """
    times: list[float] = []
    while len(times) < n:
        task_id, body = make()
        wall0 = time.time()
        t0 = time.perf_counter()
        tap.publish(node, body, task_id)
        tap.wait(lambda t=task_id: tap.ended(t))  # type: ignore[misc]
        done = tap.succeeded(task_id)
        if done is None:
            failures.count += 1
            failures.last = tap.why(task_id)
            if failures.count > 10:
                raise RuntimeError(f"too many failed tasks: {failures.last}")
            settle()  # let the host reap what the failure left
            continue
        times.append(done - t0)
        if stages is not None:
            last = wall0
            for state in STAGES:
                at = tap.stamped.get((task_id, state))
                if at is not None:
                    stages.setdefault(state, []).append(at - last)
                    last = at
            stages.setdefault("event delivered", []).append(done - t0 - (last - wall0))
    return times


def burst(
    tap: EventTap, node: str, bodies: list[tuple[str, bytes]], failures: Failures
) -> float:
    """Publish all back to back; seconds until the last one ended."""
    t0 = time.perf_counter()
    for task_id, body in bodies:
        tap.publish(node, body, task_id)
    tap.wait(lambda: all(tap.ended(t) for t, _ in bodies), 600)
    ends = []
    for task_id, _ in bodies:
        done = tap.succeeded(task_id)
        if done is None:
            failures.count += 1
            failures.last = tap.why(task_id)
            done = tap.arrived[(task_id, tap.failures[task_id]["state"])]
        ends.append(done)
    return max(ends) - t0


def measure(n: int, burst_size: int, warmup: int = 3) -> list[Row]:
    """Run every measurement; return the table rows."""
    settle()
    with testbed(with_agent=True) as bed:
        assert bed.vhost is not None
        echo = Echo(bed.vhost)
        echo.start()
        echo.ready.wait(30)
        tap = EventTap(bed.vhost)
        lat_fail, burst_fail = Failures(), Failures()
        try:
            # Warm up both paths (first TLS use, the agent's first launch, caches).
            sequential(tap, AGENT_NODE, bed.envelope, warmup, Failures())
            sequential(tap, ECHO_NODE, bed.envelope, warmup, Failures())
            for _ in range(warmup):
                bare_bwrap_once()
            # Interleave femd and baselines so that host load falls on both alike.
            femd_lat, pika_lat, bwrap_lat = [], [], []
            stages: dict[str, list[float]] = {}
            for _ in range(n):
                femd_lat += sequential(
                    tap, AGENT_NODE, bed.envelope, 1, lat_fail, stages
                )
                pika_lat += sequential(tap, ECHO_NODE, bed.envelope, 1, Failures())
                bwrap_lat.append(bare_bwrap_once())
                time.sleep(0.1)  # see launch.py: let PID 1 reap bwrap's orphans
            settle()  # start the burst from a settled host
            bodies = [bed.envelope() for _ in range(burst_size)]
            brokers = _beams()
            agent_pid = bed.agent.pid if bed.agent else None
            cpu0 = CpuMark.now(agent_pid, brokers)
            femd_burst = burst(tap, AGENT_NODE, bodies, burst_fail)
            femd_cpu, femd_split = CpuMark.now(agent_pid, brokers).per_task_ms(
                cpu0, burst_size
            )
            pika_burst = burst(
                tap, ECHO_NODE, [bed.envelope() for _ in range(burst_size)], Failures()
            )
        finally:
            tap.close()
            echo.stopping.set()
            echo.join(10)
        settle()
        cpu0 = CpuMark.now(None, [])
        bwrap_burst = bare_bwrap_burst(burst_size, CONCURRENCY)
        bwrap_cpu, _ = CpuMark.now(None, []).per_task_ms(cpu0, burst_size)
        settle()

    ms = 1000.0
    p50 = {k: percentile(v, 0.5) * ms for k, v in
           (("femd", femd_lat), ("pika", pika_lat), ("bwrap", bwrap_lat))}  # fmt: skip
    p95 = {k: percentile(v, 0.95) * ms for k, v in
           (("femd", femd_lat), ("pika", pika_lat), ("bwrap", bwrap_lat))}  # fmt: skip
    base50 = p50["pika"] + p50["bwrap"]
    base95 = p95["pika"] + p95["bwrap"]
    # Only tasks that ran count; a refused task is not throughput.
    femd_tput = (burst_size - burst_fail.count) / femd_burst
    bound_s = max(pika_burst, bwrap_burst)
    base_tput = burst_size / bound_s
    since = dict(zip(STAGES, ("publish", *STAGES[:-1]), strict=True))
    since["event delivered"] = "succeeded"
    breakdown = [
        Row(f"  femd: {since[st]} -> {st} p50", percentile(v, 0.5) * ms, None, "ms",
            note=f"p95 {percentile(v, 0.95) * ms:.2f} ms (agent's event times)")
        for st, v in stages.items()
    ]  # fmt: skip
    return [
        Row("latency p50, submit->succeeded", p50["femd"], base50, "ms",
            p50["femd"] / base50,
            f"n={n}; baseline = pika rt + bwrap. {lat_fail.note()}".strip()),
        Row("latency p95, submit->succeeded", p95["femd"], base95, "ms",
            p95["femd"] / base95, f"n={n}"),
        *breakdown,
        Row("  baseline: bare pika round trip p50", p50["pika"], None, "ms",
            note=f"p95 {p95['pika']:.2f} ms, 2 hops + confirms"),
        Row("  baseline: bare bwrap true p50", p50["bwrap"], None, "ms",
            note=f"p95 {p95['bwrap']:.2f} ms, as {TASK_USER}"),
        Row("burst throughput", femd_tput, base_tput, "/s", femd_tput / base_tput,
            f"{burst_size} tasks in {femd_burst:.2f} s; concurrency {CONCURRENCY}; "
            "ratio = femd rate / baseline rate. " + burst_fail.note()),
        Row("  burst: host CPU per task", femd_cpu, bwrap_cpu, "ms",
            femd_cpu / bwrap_cpu,
            f"all cores; femd: {femd_split}; baseline: a bare bwrap run"),
        Row("  baseline: bare pika burst", burst_size / pika_burst, None, "/s",
            note=f"{pika_burst:.2f} s"),
        Row(f"  baseline: bare bwrap burst, {CONCURRENCY} at a time",
            burst_size / bwrap_burst, None, "/s", note=f"{bwrap_burst:.2f} s"),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="sequential tasks")
    ap.add_argument("--burst", type=int, default=100, help="tasks in the burst")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/latency.py: run as root (tasks run as femd-task)", file=sys.stderr)
        return 2
    rows = measure(args.n, args.burst)
    print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
