"""Limits that hold (issue 14): per-task cgroups, the output cap, accounting.

Real kernel, real bubblewrap, the real agent where it matters. This CI host is
cgroup v1 with femd as root, so the v1 path is what runs here (the v2 path is
tested against a fake cgroupfs in tests/unit/launchers/test_cgroup.py). Memory
tests use 64 MiB limits: the host is shared.
"""

from __future__ import annotations

import pwd
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.launchers import start  # noqa: E402
from femd.launchers.cgroup import TaskCgroup, detect, scope_of  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    TASK_USER,
    NodeEnv,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
    wait_for,
)
from tests.integration.sandbox_support import (  # noqa: E402
    Sandbox,
    profile,
    task_processes,
)

pytestmark = pytest.mark.bwrap

MIB = 1 << 20
LIMIT_MB = 64
SLACK = 32 * MIB

# Each holds 256 MiB (4x the limit) of one kind of memory, then says so.
HOLD = {
    "anonymous": "b = bytearray(256 << 20)",
    "memfd": (
        "import os\nfd = os.memfd_create('x')\n"
        "for _ in range(256): os.write(fd, b'x' * (1 << 20))"
    ),
    "sysv-shm": (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.shmat.restype = ctypes.c_void_p\n"
        "sid = libc.shmget(0, 256 << 20, 0o1600)\nassert sid >= 0\n"
        "p = libc.shmat(sid, None, 0)\nctypes.memset(p, 1, 256 << 20)"
    ),
    "posix-shm": (
        "from multiprocessing import shared_memory\n"
        "m = shared_memory.SharedMemory(create=True, size=256 << 20)\n"
        "m.buf[:] = b'x' * (256 << 20)"
    ),
    "tmpfs": (
        "with open('/tmp/big', 'wb') as f:\n"
        "    for _ in range(256): f.write(b'x' * (1 << 20))"
    ),
}


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    # /tmp and /dev/shm larger than the memory limit: memory is what stops them.
    with Sandbox.open(profile(tmp_size_mb=512)) as sandbox:
        yield sandbox


def _shmem() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Shmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


@pytest.mark.parametrize("kind", sorted(HOLD))
def test_memory_past_the_limit_is_killed_in_its_cgroup(box: Sandbox, kind: str):
    spec = box.spec(
        "", argv=("python3", "-c", HOLD[kind] + "\nprint('HELD')"), memory_mb=LIMIT_MB
    )
    usage_file = TaskCgroup.of_task(
        detect(), spec.task_id, scope_of(box.state_dir)
    ).dirs["memory"]
    base_shmem = _shmem()
    peaks = {"task": 0, "shmem": 0}
    stop = threading.Event()

    def sample() -> None:  # host-side, while the task runs
        while not stop.is_set():
            try:
                held = int((usage_file / "memory.usage_in_bytes").read_text())
            except (OSError, ValueError):
                held = 0
            peaks["task"] = max(peaks["task"], held)
            peaks["shmem"] = max(peaks["shmem"], _shmem() - base_shmem)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcome = start(box.launcher, spec).wait(60)
    finally:
        stop.set()
        sampler.join()
    assert outcome is not None
    assert outcome.state == "failed", outcome
    assert "HELD" not in outcome.log_tail
    assert f"memory limit of {LIMIT_MB} MB" in outcome.reason, outcome
    assert "OOM" in outcome.reason
    assert outcome.usage is not None
    assert outcome.usage.memory_peak_bytes is not None
    assert outcome.usage.memory_peak_bytes <= LIMIT_MB * MIB
    assert peaks["task"] <= LIMIT_MB * MIB
    # Shared memory is what RLIMIT_AS never saw: the host's count stays low.
    assert peaks["shmem"] <= LIMIT_MB * MIB + SLACK, peaks
    assert not usage_file.exists()  # the cgroup is gone with the task


BOMB = """\
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
    except OSError:
        time.sleep(0.01)
"""


def test_fork_bomb_in_one_task_does_not_starve_another(box: Sandbox):
    # Same task user for both: RLIMIT_NPROC (the old pids limit) was shared.
    bomb = box.spec("", argv=("python3", "-c", BOMB), pids=16, timeout_s=8)
    bombing = start(box.launcher, bomb)
    pids = (
        TaskCgroup.of_task(detect(), bomb.task_id, scope_of(box.state_dir)).dirs["pids"]
        / "pids.current"
    )
    wait_for("the bomb to reach its limit", lambda: int(pids.read_text()) >= 16, 10)
    outcome, _ = box.run(
        "n=0; while [ $n -lt 40 ]; do /bin/true || exit 9; n=$((n+1)); done; "
        "/bin/true & /bin/true & wait; echo forked-$n",
        pids=16,
    )
    assert outcome.state == "succeeded", outcome
    assert "forked-40" in outcome.log_tail
    ended = bombing.wait(30)
    assert ended is not None
    assert ended.state == "timed_out"
    assert ended.usage is not None
    assert ended.usage.pids_peak is not None
    assert ended.usage.pids_peak == 16  # sampled from the cgroup (v1 keeps no peak)


def test_timeout_kills_every_process_even_double_forked_setsid(box: Sandbox):
    mark = f"femd-survivor-{uuid.uuid4().hex[:8]}"
    script = (
        f"setsid sh -c 'exec -a {mark} sleep 300' & "
        f"(setsid sh -c '(exec -a {mark} sleep 301 &)' &); "
        f"sh -c 'trap \"\" TERM HUP; exec -a {mark} sleep 302' & sleep 300"
    )
    spec = box.spec(script, timeout_s=2)
    cgroup = TaskCgroup.of_task(detect(), spec.task_id, scope_of(box.state_dir))
    handle = start(box.launcher, spec)
    outcome = handle.wait(40)
    assert outcome is not None
    assert outcome.state == "timed_out", outcome

    def survivors() -> list[int]:
        found = []
        for pid in task_processes(box.uid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if mark.encode() in cmd:
                found.append(pid)
        return found

    assert survivors() == []
    assert not cgroup.exists()


def test_output_cap_holds_against_writes_fallocate_and_many_files(box: Sandbox):
    cap = 256 * 1024
    script = """
        r() { "$@" 2>/dev/null && echo "$1 ok" || echo "$1 failed"; }
        r fallocate -l 100M /out/big
        r fallocate -n -l 100M /out/sparse
        r head -c 1M /dev/zero > /out/written
        i=0; while [ $i -lt 300 ]; do echo x > /out/f$i || break; i=$((i+1)); done
        echo files=$i
        exit 0
    """
    outcome, out = box.run(script, output_max_bytes=cap)
    log = outcome.log_tail
    assert "fallocate failed" in log  # each write fails inside the task
    assert "head ok" not in log
    assert "files=300" not in log
    assert outcome.state == "failed", outcome
    assert outcome.rule == "outputs.exceeded"
    # Host side: what reached the node's disk is within the cap.
    used = sum(p.stat().st_blocks * 512 for p in out.rglob("*") if p.is_file())
    assert used <= cap
    assert outcome.usage is not None
    assert outcome.usage.output_bytes is not None
    assert outcome.usage.output_bytes <= cap


# ---------------------------------------------------------------------------
# through the real agent


@pytest.mark.rabbitmq
def test_agent_reports_limits_and_usage(node_env: NodeEnv) -> None:
    env = node_env
    events = env.collect()
    env.start_agent()
    run = uuid.uuid4().hex[:8]
    oom, full, ok = f"oom-{run}", f"full-{run}", f"ok-{run}"
    small = {"cpus": 0.5, "memory_mb": LIMIT_MB, "pids": 32, "timeout_s": 60}
    env.publish(
        env.task(oom, "head -c 200M /dev/zero > /dev/shm/x", resources=small),
        env.task(
            full,
            "head -c 1M /dev/zero > /out/x",
            resources=small,
            outputs={"path": "/out", "max_bytes": 65536},
        ),
        env.task(ok, "echo result > /out/r", resources=small),
    )
    ends = events.await_terminal([oom, full, ok], 90)
    assert ends[oom]["state"] == "failed"
    assert "memory limit of 64 MB" in ends[oom]["reasons"][0]["message"]
    assert ends[full]["state"] == "failed"
    assert [r["rule"] for r in ends[full]["reasons"]] == ["outputs.exceeded"]
    assert ends[ok]["state"] == "succeeded"
    used = ends[ok]["usage"]
    assert set(used) >= {"cpu_s", "memory_peak_bytes", "pids_peak", "output_bytes"}
    assert used["output_bytes"] == len("result\n")
    assert 0 < used["wall_s"] < 60
    rows = env.tasks_json()
    assert rows[ok]["usage"] == used
    text = env.femd("tasks", "--config", str(env.config)).stdout
    assert any(
        ok in line and "mem " in line and "wall " in line for line in text.splitlines()
    )


@pytest.mark.rabbitmq
def test_sigkill_while_tasks_launch_and_run_leaves_nothing(node_env: NodeEnv) -> None:
    env = node_env
    env.write_config(max_concurrent_tasks=2)
    events = env.collect()
    agent = env.start_agent()
    run = uuid.uuid4().hex[:8]
    victims = [f"victim-{run}-{i}" for i in range(2)]
    launching = [f"launch-{run}-{i}" for i in range(4)]
    # Each forks a setsid'd grandchild: a process the sandbox's end must take.
    slow = {"resources": {"timeout_s": 20}}
    env.publish(
        *(env.task(t, "(setsid sleep 300 &); sleep 300", **slow) for t in victims),
        *(env.task(t, "(setsid sleep 300 &); sleep 1", **slow) for t in launching),
    )
    wait_for("two tasks running", lambda: len(env.counter.counts()) >= 2, 30)
    uid = pwd.getpwnam(TASK_USER).pw_uid
    host = detect()
    scope = scope_of(env.state_dir)
    victim = next(t for t in victims if env.counter.count(t))
    # What a sandbox stuck in bwrap's setup handshake is, once its agent is
    # gone: a process of the task user in the task's cgroup, parent not femd.
    procs = " ".join(TaskCgroup.of_task(host, victim, scope).procs_files())
    stuck = subprocess.Popen(  # noqa: S603 (fixed tools)
        ["/bin/sh", "-c", f'for f in {procs}; do echo $$ > "$f"; done; '
         f"exec setpriv --reuid={uid} --regid={uid} --clear-groups sleep 300"],
        start_new_session=True,
    )  # fmt: skip
    wait_for(
        "the stuck process in the task's cgroup",
        lambda: stuck.pid in TaskCgroup.of_task(host, victim, scope).pids(),
        10,
    )
    agent.kill()
    env.start_agent()
    everything = victims + launching
    ends = events.await_terminal(everything, 120)
    assert ends[victim]["state"] == "failed"
    assert stuck.wait(20) == -9  # killed with its task's cgroup
    wait_for("no process of the task user", lambda: not task_processes(uid), 20)
    for t in everything:
        assert not TaskCgroup.of_task(host, t, scope).exists(), t
