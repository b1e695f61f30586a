"""Every femd benchmark in one run, as one table: figure, baseline, ratio, goal.

    sudo .venv/bin/python bench/run_all.py [--runs 3] [--quick] [--only SECTIONS]

Sections (each figure beside its baseline, measured in the same run):

- ``verify``: bench/verify.py, verify+decide per envelope vs 2 raw Ed25519
  verifications (its own output is parsed);
- ``latency``: bench/latency.py, submit->succeeded p50/p95 and a burst vs a
  bare pika round trip plus a bare bwrap start;
- ``launch``: bench/launch.py, start-to-exit per launcher vs the bare tool;
- ``agent``: an agent (``python -m femd run``, process launcher) against a
  private broker: process start to READY (sd_notify; the median of 5 starts,
  the first then restarts, against 5 of the baseline), then 10 s idle (VmRSS,
  utime+stime), then a flood of unverifiable envelopes. The baseline is a
  bare pika consumer holding the same kind of mTLS connection;
- ``transfer``: a 1 GiB output end to end, through the orchestrator side's
  streaming API when this tree has it (else a "not measured" row).

The flood: N envelopes no trusted key signed (random bytes, unsigned, signed
by an unknown key, a trusted keyid over a bad signature) wait in the node's
queue while the consumer is stopped (SIGSTOP); from SIGCONT to the queue
being empty (polled from the orchestrator's side) gives messages per second.
The baseline is a bare pika consumer with the agent's prefetch, acking each
message. The note counts the rows the agent's state database gained per
message (what it keeps durably for input it cannot verify).

A section that cannot run on this host (no broker, no bwrap, no task user, not
root, a refused launcher) becomes "not measured" rows with the reason; the run
goes on. With ``--runs N`` every section runs N times and the summary prints
the medians of figure and baseline, their ratio, and the spread of the
per-run ratios. Ratios: femd / baseline for times, memory and rates; the
verify figure is raw / admit, as its goal is stated. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

IDLE_S = 10.0
STARTS = 5  # start->READY: the median of this many starts, each side
FLOOD_N = 1000
# The agent's intake_window (femd.yaml default): the flood baseline's prefetch.
INTAKE_WINDOW = 32
# Row names the summary reads (bench/latency.py and bench/launch.py use them).
LATENCY = "latency p50, submit->succeeded"
BURST = "burst throughput"
LAUNCH = "process: femd start()+wait"
RSS = "agent idle RSS"
READY = "agent start -> READY (sd_notify)"
VERIFY = "verify+decide per envelope"
FLOOD = "flood of unverifiable envelopes"
TRANSFER = "1 GiB output, submit -> verified at orchestrator"

_BARE_CONSUMER = textwrap.dedent(
    """
    import ssl
    import pika
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile={ca!r})
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain({cert!r}, {key!r})
    params = pika.ConnectionParameters(
        host="localhost", port={port}, virtual_host={vhost!r},
        credentials=pika.credentials.ExternalCredentials(),
        ssl_options=pika.SSLOptions(ctx, "localhost"), heartbeat=30)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.basic_qos(prefetch_count={prefetch})
    ch.basic_consume({queue!r}, lambda c, m, p, b: c.basic_ack(m.delivery_tag))
    print("READY", flush=True)
    while True:
        conn.process_data_events(time_limit=1)
    """
)


@dataclass(frozen=True)
class Goal:
    """One figure of issue 20's table: which row, how its ratio reads, the goal."""

    row: str
    label: str
    unit: str
    inverse: bool = False  # ratio = baseline / figure (verify: raw/admit)
    op: str = "<="  # the ratio (or, with on_figure, the figure) must be op value
    value: float | None = None
    on_figure: bool = False

    def ratio(self, figure: float | None, base: float | None) -> float | None:
        if figure is None or not base or not figure:
            return None
        return base / figure if self.inverse else figure / base

    def text(self) -> str:
        if self.value is None:
            return "report"
        what = f"{self.value:,.0f} {self.unit}" if self.on_figure else f"{self.value}x"
        return f"{self.op} {what}"

    def met(self, figure: float | None, ratio: float | None) -> str:
        seen = figure if self.on_figure else ratio
        if self.value is None or seen is None:
            return ""
        ok = seen <= self.value if self.op == "<=" else seen >= self.value
        return "met" if ok else "NOT met"


GOALS = (
    Goal(LATENCY, "submit->succeeded p50", "ms", value=1.5),
    Goal(BURST, "burst (tasks/s)", "/s", op=">=", value=0.5),
    Goal(LAUNCH, "process launcher start+wait", "ms", value=1.15),
    Goal(RSS, "idle RSS", "MB", value=1.2),
    Goal(READY, "start->READY", "ms", value=1.5),
    Goal(VERIFY, "verify+decide (raw/admit)", "us", inverse=True, op=">=", value=0.9),
    Goal(FLOOD, "flood of unverifiable msgs", "msg/s", op=">=", value=1000,
         on_figure=True),
    Goal(TRANSFER, "1 GiB output end to end", "s"),
)  # fmt: skip


def _row(name: str, unit: str, why: str) -> Any:
    from latency import Row

    return Row(name, None, None, unit, note=f"not measured: {why}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:200]


def guarded(
    run: Callable[[], list[Any]], expected: tuple[tuple[str, str], ...]
) -> list[Any]:
    """Run a section; on any failure, "not measured" rows for what it owed."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 (a host that cannot run it is a row)
        why = _one_line(e)
        return [_row(name, unit, why) for name, unit in expected]


# -- the agent at rest, and the flood ---------------------------------------------


def proc_usage(pid: int) -> tuple[float, float]:
    """(VmRSS MiB, utime+stime s) of *pid*."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    from latency import pid_cpu

    return rss_kb / 1024, pid_cpu(pid)


def idle(pid: int) -> tuple[float, float]:
    """Idle *pid* for IDLE_S; return (RSS MiB at the end, CPU seconds used)."""
    _, cpu0 = proc_usage(pid)
    time.sleep(IDLE_S)
    rss, cpu1 = proc_usage(pid)
    return rss, cpu1 - cpu0


def unverifiable(trusted: Any, n: int) -> list[bytes]:
    """*n* envelopes no trusted key signed, four kinds in turn."""
    import msgspec

    from femd.envelope import Signature, encode_envelope, sign
    from femd.keys import generate, keyid

    stranger = generate()
    trusted_id = keyid(trusted.public_key())
    bodies = []
    for i in range(n):
        payload = b'{"apiVersion":"femd/v1","kind":"Task","id":"flood-%d"}' % i
        kind = i % 4
        if kind == 0:
            bodies.append(os.urandom(64 + i % 64))
            continue
        env = sign(payload, [stranger])
        if kind == 1:
            env = msgspec.structs.replace(env, signatures=())
        elif kind == 3:  # a trusted keyid over a signature it did not make
            forged = Signature(sig=env.signatures[0].sig, keyid=trusted_id)
            env = msgspec.structs.replace(env, signatures=(forged,))
        bodies.append(encode_envelope(env))
    return bodies


def _durable_rows(db: Path) -> int:
    """Rows in every table of a state database (read-only, beside the agent)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        tables = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        return sum(
            conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables
        )
    finally:
        conn.close()


class Flood:
    """Fill a node's queue while its consumer is stopped; time the drain."""

    def __init__(self, vhost: Any) -> None:
        import pika

        self.conn = pika.BlockingConnection(vhost.parameters("orchestrator"))
        self.pub = self.conn.channel()
        self.pub.confirm_delivery()
        self.ask = self.conn.channel()

    def waiting(self, queue: str) -> int:
        done = self.ask.queue_declare(queue, passive=True)
        return int(done.method.message_count)

    def run(self, pid: int, node: str, bodies: list[bytes]) -> tuple[float, int]:
        """Seconds from SIGCONT to an empty queue, and the messages it took."""
        from latency import TASKS_EXCHANGE

        queue = f"femd.node.{node}"
        os.kill(pid, signal.SIGSTOP)
        try:
            for body in bodies:
                self.pub.basic_publish(TASKS_EXCHANGE, node, body, mandatory=True)
            before = self.waiting(queue)
        finally:
            os.kill(pid, signal.SIGCONT)
        t0 = time.perf_counter()
        deadline = t0 + 120
        while self.waiting(queue) > 0:
            if time.perf_counter() > deadline:
                left = self.waiting(queue)
                return time.perf_counter() - t0, before - left
            time.sleep(0.005)
        return time.perf_counter() - t0, before

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


@contextlib.contextmanager
def bare_consumer(bed: Any, prefetch: int) -> Iterator[subprocess.Popen[str]]:
    """A bare python + pika consumer of the echo node's queue, connected."""
    from latency import ECHO_NODE

    ident = bed.vhost.identity(ECHO_NODE)
    script = _BARE_CONSUMER.format(
        ca=str(bed.vhost.ca), cert=str(ident.cert),
        key=str(ident.key), port=bed.vhost.port, vhost=bed.vhost.name,
        queue=f"femd.node.{ECHO_NODE}", prefetch=prefetch,
    )  # fmt: skip
    bare = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        yield bare
    finally:
        bare.terminate()
        bare.wait(10)


def _ms(seconds: list[float]) -> str:
    return " ".join(f"{s * 1000:.0f}" for s in seconds) + " ms"


def _bare_ready(bed: Any) -> float:
    """Seconds from starting a bare consumer to its connected READY line."""
    t0 = time.monotonic()
    with bare_consumer(bed, INTAKE_WINDOW) as bare:
        assert bare.stdout is not None
        if bare.stdout.readline().strip() != "READY":
            raise RuntimeError("the bare consumer did not connect")
        return time.monotonic() - t0


def agent_rows() -> list[Any]:
    from latency import AGENT_NODE, ECHO_NODE, Row, testbed

    from demo.agents import AgentProcess

    with testbed(with_agent=False) as bed:
        assert bed.vhost is not None
        agent = bed.start_agent()
        readies = [agent.ready_s or 0.0]
        for _ in range(STARTS - 1):  # restarts: the node's state is there now
            agent.stop()
            time.sleep(0.5)
            agent = bed.agent = AgentProcess(agent.name, agent.config, agent.log)
            agent.start()
            readies.append(agent.wait_ready())
        ready_s = statistics.median(readies)
        rss, cpu = idle(agent.pid)
        bare_readies = []
        for _ in range(STARTS - 1):
            bare_readies.append(_bare_ready(bed))
            time.sleep(0.5)
        t0 = time.monotonic()
        with bare_consumer(bed, INTAKE_WINDOW) as bare:
            assert bare.stdout is not None
            line = bare.stdout.readline()
            bare_readies.append(time.monotonic() - t0)
            if line.strip() != "READY":
                raise RuntimeError("the bare consumer did not connect")
            bare_ready = statistics.median(bare_readies)
            bare_rss, bare_cpu = idle(bare.pid)
            flood = Flood(bed.vhost)
            try:
                bodies = unverifiable(bed.key, FLOOD_N)
                db = bed.base / AGENT_NODE / "state" / "state.sqlite"
                rows0 = _durable_rows(db)
                femd_s, femd_n = flood.run(agent.pid, AGENT_NODE, bodies)
                time.sleep(0.5)  # the last acks and commits land
                kept = (_durable_rows(db) - rows0) / max(1, femd_n)
                bare_s, bare_n = flood.run(bare.pid, ECHO_NODE, bodies)
            finally:
                flood.close()
    pct = 100 / IDLE_S
    femd_rate, bare_rate = femd_n / femd_s, bare_n / bare_s
    return [
        Row(READY, ready_s * 1000, bare_ready * 1000, "ms", ready_s / bare_ready,
            f"median of {STARTS} starts each (femd: the first, then restarts: "
            f"{_ms(readies)}); baseline: python+pika start to mTLS connected "
            f"({_ms(bare_readies)})"),
        Row(RSS, rss, bare_rss, "MB", rss / bare_rss,
            f"VmRSS after {IDLE_S:.0f} s idle; baseline: bare pika consumer"),
        Row(f"agent idle CPU over {IDLE_S:.0f} s", cpu * pct, bare_cpu * pct, "%",
            (cpu / bare_cpu) if bare_cpu else None,
            f"utime+stime: {cpu * 1000:.0f} ms vs {bare_cpu * 1000:.0f} ms"),
        Row(FLOOD, femd_rate, bare_rate, "msg/s", femd_rate / bare_rate,
            f"{femd_n} msgs in {femd_s:.2f} s; intake window {INTAKE_WINDOW}; "
            f"{kept:.2f} durable state rows kept per message; baseline: bare "
            "pika consumer acking each, same prefetch"),
    ]  # fmt: skip


AGENT_ROWS = ((READY, "ms"), (RSS, "MB"), (FLOOD, "msg/s"))


# -- the other sections -----------------------------------------------------------


def verify_rows() -> list[Any]:
    from latency import Row
    from verify import ADMIT, FEMD_RAW, FLOOR, RAW

    done = subprocess.run(
        # Many short rounds, best of each: a loaded host spoils some rounds, not all.
        [sys.executable, str(BENCH / "verify.py"), "--n", "200", "--repeat", "25"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    # The rows by the names verify.py prints them under (name, then the value).
    us: dict[str, float] = {}
    for line in done.stdout.splitlines():
        for name in (RAW, ADMIT, FLOOR, FEMD_RAW):
            rest = line[len(name) :].split() if line.startswith(name) else []
            if rest:
                us[name] = float(rest[0])
    if len(us) != 4:
        tail = " ".join((done.stdout + done.stderr).split())[-160:]
        return [_row(VERIFY, "us", tail)]
    admit, raw, floor, own = us[ADMIT], us[RAW], us[FLOOR], us[FEMD_RAW]
    return [
        Row(VERIFY, admit, raw, "us", raw / admit,
            "ratio = raw / admit; baseline: 2 raw Ed25519 verifies "
            f"(cryptography; femd's own libcrypto binding: {own:.0f} us); the floor "
            f"(verifies, strict decodes, rules back to back): {floor:.0f} us, "
            f"raw/floor {raw / floor:.2f}"),
    ]  # fmt: skip


TRANSFER_MB = 1024


def bare_transfer(bed: Any, path: Path, chunk: int) -> float:
    """Seconds to move *path* through the broker bare: confirmed chunks, to disk."""
    import hashlib
    import threading

    import pika
    from latency import ECHO_NODE

    from femd.broker import RESULTS_EXCHANGE
    from femd.orchestrator import RESULTS_QUEUE

    size = path.stat().st_size
    got = {"bytes": 0}
    done = threading.Event()
    sink = path.with_suffix(".received")

    def receive() -> None:
        conn = pika.BlockingConnection(bed.vhost.parameters("orchestrator"))
        ch = conn.channel()
        ch.basic_qos(prefetch_count=64)
        digest = hashlib.sha256()
        with sink.open("wb") as out:

            def on_chunk(c: Any, m: Any, _p: Any, body: bytes) -> None:
                out.write(body)
                digest.update(body)
                got["bytes"] += len(body)
                c.basic_ack(m.delivery_tag)
                if got["bytes"] >= size:
                    done.set()

            ch.basic_consume(RESULTS_QUEUE, on_chunk)
            while not done.is_set():
                conn.process_data_events(time_limit=0.1)
            out.flush()
            os.fsync(out.fileno())
        conn.close()

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    t0 = time.perf_counter()
    conn = pika.BlockingConnection(bed.vhost.parameters(ECHO_NODE))
    ch = conn.channel()
    ch.confirm_delivery()
    with path.open("rb") as f:
        while block := f.read(chunk):
            # The node may publish only `<node>.<task id>` (broker permissions).
            ch.basic_publish(RESULTS_EXCHANGE, f"{ECHO_NODE}.bare-0", block)
    conn.close()
    if not done.wait(900):
        raise TimeoutError("the bare transfer did not arrive")
    reader.join(30)
    sink.unlink()
    return time.perf_counter() - t0


def transfer_rows(size: int = TRANSFER_MB << 20) -> list[Any]:
    """A 1 GiB (*size*) output end to end, through the orchestrator side's client API.

    Needs ``femd.client.Client`` (submit, watch().follow(), outputs()): until
    this tree has the orchestrator side's streaming, the row says so. femd:
    submit a task writing 1 GiB of random bytes to /out, until its outputs are
    complete (verified) in the orchestrator's inbox; the agent's peak RSS in
    the note. Baseline: the same bytes written by `head` and moved bare
    through the broker (confirmed chunks of the agent's size, to disk, hashed).
    """
    import msgspec
    from latency import AGENT_NODE, POLICY, Row, testbed

    try:
        client = importlib.import_module("femd.client")
        from femd.config import OrchestratorConfig  # type: ignore[attr-defined]
    except ImportError as e:
        why = f"the orchestrator side's streaming is not in this tree ({e.name})"
        return [_row(TRANSFER, "s", why)]
    cap = size + (64 << 20)
    # The process launcher's output dir is a tmpfs charged to the task's
    # memory: the task needs the cap in memory, plus its own.
    memory_mb = (cap >> 20) + 256
    policy = POLICY.replace("timeout_s: 60", "timeout_s: 900").replace(
        "memory_mb: 256", f"memory_mb: {memory_mb}"
    )
    policy += f"    outputs: {{max_bytes: {cap}}}\n"
    with testbed(with_agent=False) as bed:
        assert bed.vhost is not None
        agent = bed.start_agent(policy)
        cfg = msgspec.convert(
            {
                "broker": bed.vhost.broker_config("orchestrator"),
                "results_dir": str(bed.base / "inbox"),
            },
            OrchestratorConfig,
        )
        task_id, body = bed.envelope(
            command=["/bin/sh", "-c", f"head -c {size} /dev/urandom >/out/big"],
            outputs={"max_bytes": cap},
            resources={"cpus": 1, "memory_mb": memory_mb, "timeout_s": 900},
        )
        t0 = time.perf_counter()
        with client.Client(cfg) as c:
            c.submit(body, [AGENT_NODE])
            watch = c.watch(task_id)
            for _ in watch.follow(timeout_s=1800):
                pass
            status = c.outputs(AGENT_NODE, task_id)
        seconds = time.perf_counter() - t0
        if status is None or status.status != "complete":
            ends = {n: e.state for n, e in watch.terminal.items()}
            raise RuntimeError(f"no outputs: {status or ends} {watch.errors}")
        peak = (
            int(
                re.search(
                    r"VmHWM:\s+(\d+)", Path(f"/proc/{agent.pid}/status").read_text()
                ).group(1)  # type: ignore[union-attr]
            )
            / 1024
        )
        blob = bed.base / "bare.bin"
        t1 = time.perf_counter()
        with blob.open("wb") as out:
            subprocess.run(
                ["head", "-c", str(size), "/dev/urandom"],
                stdout=out, check=True,
            )  # fmt: skip
        made = time.perf_counter() - t1
        base = made + bare_transfer(bed, blob, 256 * 1024)
    return [
        Row(TRANSFER, seconds, base, "s", seconds / base,
            f"{size >> 20} MiB; agent peak RSS {peak:.0f} MB; baseline: head + "
            "bare confirmed chunks to disk"),
    ]  # fmt: skip


def needs_root(run: Callable[[], list[Any]]) -> Callable[[], list[Any]]:
    def checked() -> list[Any]:
        if os.geteuid() != 0:
            raise PermissionError("needs root (tasks run as femd-task)")
        return run()

    return checked


def sections(
    quick: bool, transfer_mb: int = TRANSFER_MB
) -> dict[str, tuple[str, Callable[[], list[Any]], tuple]]:
    n, burst, pn = (10, 30, 3) if quick else (30, 100, 10)

    def latency_rows() -> list[Any]:
        import latency

        return latency.measure(n, burst)

    def launch_rows() -> list[Any]:
        import launch

        return launch.measure(n, pn)

    return {
        "verify": ("trust kernel (bench/verify.py)", verify_rows, ((VERIFY, "us"),)),
        "latency": (
            "latency and throughput (bench/latency.py)",
            needs_root(latency_rows),
            ((LATENCY, "ms"), (BURST, "/s")),
        ),
        "launch": (
            "launchers (bench/launch.py)",
            needs_root(launch_rows),
            ((LAUNCH, "ms"),),
        ),
        "agent": ("the agent at rest, and a flood", needs_root(agent_rows), AGENT_ROWS),
        "transfer": (
            "large outputs",
            lambda: transfer_rows(transfer_mb << 20),
            ((TRANSFER, "s"),),
        ),
    }


# -- the summary ------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def summary(runs: list[dict[str, Any]]) -> None:
    """Issue 20's table: medians over the runs, the ratio, the goal."""
    print(f"\n## summary: medians of {len(runs)} run(s)")
    print(
        f"{'figure':<30}{'femd':>14}{'baseline':>10}{'ratio':>8}  "
        f"{'goal':<16}{'':<8}per-run ratios / note"
    )
    for goal in GOALS:
        got = [r[goal.row] for r in runs if goal.row in r]
        figs = [r.figure for r in got if r.figure is not None]
        bases = [r.baseline for r in got if r.baseline is not None]
        fig = statistics.median(figs) if figs else None
        base = statistics.median(bases) if bases else None
        ratio = goal.ratio(fig, base)
        each = [goal.ratio(r.figure, r.baseline) for r in got]
        spread = ", ".join(_fmt(x) for x in each if x is not None)
        note = f"[{spread}]" if spread else ""
        if fig is None:
            note = next((r.note for r in got if r.note), "not run (--only)")
        cells = (
            f"{goal.label:<30}{_fmt(fig):>8} {goal.unit:<5}{_fmt(base):>10}"
            f"{_fmt(ratio) + 'x' if ratio is not None else '-':>8}  "
            f"{goal.text():<16}{goal.met(fig, ratio):<8}"
        )
        print(f"{cells}{note}".rstrip())


def compile_femd() -> str:
    """Compile femd's modules to bytecode, as a package install does.

    The agents measured here run from this tree. A package (pip, the .deb's
    postinst) compiles every module when it installs; an editable install does
    not, and where PYTHONDONTWRITEBYTECODE is set nothing ever writes the
    cache: every agent start would compile femd from source (~60 ms, ~1.3 MB
    of start->READY and idle RSS that no installed node pays).
    """
    import compileall

    ok = compileall.compile_dir(REPO / "femd", quiet=1)
    how = "compiled" if ok else "NOT all compiled (see above)"
    return f"femd's bytecode: {how}, as a package install leaves it"


def host_facts(mountinfo: str | None = None) -> str:
    """The host facts that move the launch figures: cgroups and their attach lock.

    Every task enters its own cgroup. The kernel's cgroup attach lock makes the
    first migration after a quiet spell wait for an RCU grace period (~7 ms
    here) unless a cgroup hierarchy was mounted with ``favordynmods`` (a host
    setting femd never changes). On recent kernels (6.18 here) the option
    cannot be turned off again, yet stops showing in the mount table once a
    remount drops it: the wait is measured, not read from the mount table.
    """
    text = mountinfo
    if text is None:
        try:
            text = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return "host: cgroup mounts unknown"
    kinds, favour = set(), False
    for line in text.splitlines():
        fields = line.partition(" - ")[2].split()
        if fields and fields[0] in ("cgroup", "cgroup2"):
            kinds.add("v2" if fields[0] == "cgroup2" else "v1")
            favour = favour or "favordynmods" in line
    version = "+".join(sorted(kinds)) or "none"
    facts = f"host: cgroup {version}, favordynmods {'shown' if favour else 'not shown'}"
    if mountinfo is None:
        facts += f"; {attach_wait()}"
    return facts


def attach_wait(samples: int = 5, quiet_s: float = 0.3) -> str:
    """The median time a new process takes to enter a task-like cgroup."""
    from femd.launchers.cgroup import CgroupLimits, TaskCgroup, detect

    host = detect()
    if host.kind == "none" or os.geteuid() != 0:
        return "cgroup entry not measured (no cgroups, or not root)"
    cgroup = TaskCgroup(host, f"femd-bench-attach-{os.getpid()}")
    times = []
    try:
        cgroup.create(CgroupLimits(memory_bytes=64 << 20, pids=16, cpus=1))
        files = cgroup.procs_files()
        for _ in range(samples):
            time.sleep(quiet_s)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child enters every hierarchy, as a task's entry step
                t0 = time.perf_counter()
                for f in files:
                    with open(f, "w") as out:
                        out.write(str(os.getpid()))
                os.write(w, str(time.perf_counter() - t0).encode())
                os._exit(0)
            os.close(w)
            took = os.read(r, 64)
            os.close(r)
            os.waitpid(pid, 0)
            times.append(float(took) * 1000)
    except (OSError, ValueError) as e:
        return f"cgroup entry not measured: {_one_line(e)}"
    finally:
        cgroup.kill()
        cgroup.remove()
    return (
        f"entering a task cgroup after {quiet_s:g} s quiet: "
        f"{statistics.median(times):.2f} ms (median of {samples})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tasks (smoke test)")
    ap.add_argument("--runs", type=int, default=1, help="runs; summary = medians")
    ap.add_argument(
        "--only", default="", help="comma-separated sections (default: all)"
    )
    ap.add_argument(
        "--transfer-mb", type=int, default=TRANSFER_MB, help="the large output's size"
    )
    ap.add_argument("--json", type=Path, help="also write every run's rows here")
    ap.add_argument(
        "--summary-of",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="measure nothing: the summary of runs saved with --json",
    )
    args = ap.parse_args()
    if args.summary_of:
        return summarize_saved(args.summary_of)
    logging.getLogger("femd").setLevel(logging.ERROR)
    compiled = compile_femd()
    table = sections(args.quick, args.transfer_mb)
    chosen = [s for s in args.only.split(",") if s] or list(table)
    unknown = [s for s in chosen if s not in table]
    if unknown:
        print(f"bench/run_all.py: unknown section(s) {unknown}", file=sys.stderr)
        return 2
    try:
        from latency import print_rows
    except Exception as e:  # noqa: BLE001 (a host without the test deps)
        print(f"bench/run_all.py: cannot load the benchmarks: {_one_line(e)}")
        return 1
    print(compiled)
    print(host_facts())
    results: list[dict[str, Any]] = []
    for run in range(1, args.runs + 1):
        began = time.monotonic()
        done: list[tuple[str, list[Any]]] = []
        for key in chosen:
            title, fn, expected = table[key]
            print(f"run {run}: {title} ...", file=sys.stderr, flush=True)
            done.append((title, guarded(fn, expected)))
        print(
            f"\n# run {run} of {args.runs} ({time.monotonic() - began:.0f} s, "
            f"{os.cpu_count()} cpus)"
        )
        for title, rows in done:
            print(f"\n## {title}")
            print_rows(rows)
        results.append({r.name: r for _, rows in done for r in rows})
        sys.stdout.flush()
        if args.json:
            saved = [{k: r.as_dict() for k, r in run.items()} for run in results]
            args.json.write_text(json.dumps(saved, indent=1))
    summary(results)
    return 0


def summarize_saved(paths: list[Path]) -> int:
    """The summary of runs saved by earlier ``--json`` runs (e.g. interleaved)."""
    from latency import Row

    runs = [
        {k: Row(**v) for k, v in run.items()}
        for path in paths
        for run in json.loads(path.read_text())
    ]
    summary(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
