"""Every femd benchmark in one run, as one table: figure, baseline, ratio.

    sudo .venv/bin/python bench/run_all.py [--quick]

- bench/verify.py (issue 3): verify+decide per envelope vs raw Ed25519 (its
  own output is parsed; its target is raw/admit >= 0.5, i.e. ratio <= 2x here);
- bench/latency.py (issue 4): submit->succeeded p50/p95 and burst throughput vs
  a bare pika round trip plus a bare bwrap start;
- bench/launch.py (issue 5): start-to-exit per launcher vs the bare tool;
- the agent at rest: an agent (`python -m femd run`, process launcher) against
  a private broker, time from process start to READY (sd_notify), then idle
  for 10 s: VmRSS and utime+stime from /proc. The baseline is a bare pika
  consumer holding the same kind of mTLS connection (python, pika, TLS).

Ratios are femd cost / baseline cost: time over time, memory over memory,
and for throughput baseline rate over femd rate (1.0 = no overhead).
Prints figures only; asserts nothing. Runs as root; takes about two minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import latency  # noqa: E402
import launch  # noqa: E402
from latency import ECHO_NODE, Row, print_rows, testbed  # noqa: E402

IDLE_S = 10.0
_TICK = os.sysconf("SC_CLK_TCK")
_BARE_CONSUMER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    t0 = time.monotonic()
    import pika
    from testbed import Vhost
    from testbed.pki import client_context
    import ssl
    ctx = client_context({ca!r}, None)
    ctx.load_cert_chain({cert!r}, {key!r})
    params = pika.ConnectionParameters(
        host="localhost", port={port}, virtual_host={vhost!r},
        credentials=pika.credentials.ExternalCredentials(),
        ssl_options=pika.SSLOptions(ctx, "localhost"), heartbeat=30)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.basic_consume({queue!r}, lambda *a: None)
    print("READY", flush=True)
    while True:
        conn.process_data_events(time_limit=1)
    """
)


def proc_usage(pid: int) -> tuple[float, float]:
    """(VmRSS MiB, utime+stime s) of *pid*."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICK
    return rss_kb / 1024, cpu


def idle(pid: int) -> tuple[float, float]:
    """Idle *pid* for IDLE_S; return (RSS MiB at the end, CPU seconds used)."""
    _, cpu0 = proc_usage(pid)
    time.sleep(IDLE_S)
    rss, cpu1 = proc_usage(pid)
    return rss, cpu1 - cpu0


def agent_rows() -> list[Row]:
    with testbed(with_agent=False) as bed:
        assert bed.vhost is not None
        agent = bed.start_agent()
        ready_s = agent.ready_s or 0.0
        rss, cpu = idle(agent.pid)
        # The baseline: python + pika + an mTLS connection consuming a queue.
        ident = bed.vhost.identity(ECHO_NODE)
        script = _BARE_CONSUMER.format(
            repo=str(REPO), ca=str(bed.vhost.ca), cert=str(ident.cert),
            key=str(ident.key), port=bed.vhost.port, vhost=bed.vhost.name,
            queue=f"femd.node.{ECHO_NODE}",
        )  # fmt: skip
        t0 = time.monotonic()
        bare = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
        )
        try:
            assert bare.stdout is not None
            line = bare.stdout.readline()
            bare_ready = time.monotonic() - t0
            if line.strip() != "READY":
                raise RuntimeError("the bare consumer did not connect")
            bare_rss, bare_cpu = idle(bare.pid)
        finally:
            bare.terminate()
            bare.wait(10)
    pct = 100 / IDLE_S
    return [
        Row("agent start -> READY (sd_notify)", ready_s * 1000, bare_ready * 1000,
            "ms", ready_s / bare_ready,
            "baseline: python+pika start to mTLS connected"),
        Row(f"agent idle RSS (after {IDLE_S:.0f} s)", rss, bare_rss, "MB",
            rss / bare_rss, "VmRSS; baseline: bare pika consumer"),
        Row(f"agent idle CPU over {IDLE_S:.0f} s", cpu * pct, bare_cpu * pct, "%",
            (cpu / bare_cpu) if bare_cpu else None,
            f"utime+stime: {cpu * 1000:.0f} ms vs {bare_cpu * 1000:.0f} ms"),
    ]  # fmt: skip


def verify_rows() -> list[Row]:
    done = subprocess.run(
        [sys.executable, str(BENCH / "verify.py"), "--n", "1000", "--repeat", "5"],
        capture_output=True, text=True, check=False, cwd=REPO,
    )  # fmt: skip
    us: dict[str, float] = {}
    for line in done.stdout.splitlines():
        m = re.match(
            r"(raw Ed25519 verify x2|admit\(\) verify\+decide)\s+([\d.]+)", line
        )
        if m:
            us[m.group(1)] = float(m.group(2))
    if len(us) != 2:
        tail = (done.stdout + done.stderr).strip()[-160:]
        return [Row("verify+decide per envelope", None, None, "us", note=tail)]
    admit, raw = us["admit() verify+decide"], us["raw Ed25519 verify x2"]
    return [
        Row("verify+decide per envelope", admit, raw, "us", admit / raw,
            f"baseline: 2 raw Ed25519 verifies; target <= 2x "
            f"({'met' if admit / raw <= 2 else 'NOT met'})"),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (smoke test)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/run_all.py: run as root", file=sys.stderr)
        return 2
    import logging

    logging.getLogger("femd").setLevel(logging.ERROR)
    n, burst, pn = (10, 30, 3) if args.quick else (30, 100, 10)
    sections: list[tuple[str, list[Row]]] = []
    began = time.monotonic()
    for title, run in (
        ("trust kernel (bench/verify.py)", verify_rows),
        (
            "latency and throughput (bench/latency.py)",
            lambda: latency.measure(n, burst),
        ),
        ("launchers (bench/launch.py)", lambda: launch.measure(n, pn)),
        ("the agent at rest", agent_rows),
    ):
        print(f"running: {title} ...", file=sys.stderr, flush=True)
        sections.append((title, run()))
    print(
        f"\nfemd benchmarks ({time.monotonic() - began:.0f} s, {os.cpu_count()} cpus)"
    )
    for title, rows in sections:
        print(f"\n## {title}")
        print_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
