"""Sandbox-escape attempts against the ``process`` launcher, on real bubblewrap.

Each task *tries* something it must not be able to do. A script prints
``ESCAPED`` and exits 0 only if the attempt worked; contained attempts exit 42.
Each test then checks both the terminal state the agent would report and the
host side (files unchanged, no connection, no stray process).

Escape targets are left world-readable on purpose (the agent's state dir,
another task's output): the sandbox, not file modes, must keep them out.
"""

from __future__ import annotations

import hashlib
import platform
import shlex
import shutil
import socket
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

from femd.launchers import Mount, start  # noqa: E402
from tests.integration.sandbox_support import (  # noqa: E402
    Sandbox,
    accepted,
    settle,
    task_processes,
    tcp_listener,
)

pytestmark = pytest.mark.bwrap

CONTAINED = 42
IO_URING = """\
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 8, params)  # io_uring_setup: 425 on x86_64 and aarch64
print("io_uring_setup", fd, ctypes.get_errno())
sys.exit(0 if fd >= 0 else 1)
"""


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with Sandbox.open() as sandbox:
        yield sandbox


def attempt(box: Sandbox, action: str, **kw: object):
    """Run ``action``; it exits 0 when the escape worked, else 42."""
    outcome, out = box.run(
        f"if {action}; then echo ESCAPED; exit 0; fi; exit {CONTAINED}", **kw
    )
    assert "ESCAPED" not in outcome.log_tail, outcome
    assert (outcome.state, outcome.exit_code) == ("failed", CONTAINED), outcome
    return outcome, out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_etc_shadow_is_not_visible(box: Sandbox):
    attempt(box, "cat /etc/shadow")
    attempt(box, "test -e /etc/shadow || test -e /etc/passwd")


def test_agent_state_dir_is_not_visible(box: Sandbox):
    attempt(box, f"cat {box.secret}")
    attempt(box, f"ls {box.root}")


def test_another_tasks_output_is_not_visible(box: Sandbox):
    other = box.output_dir()
    (other / "result.csv").write_text("patient,score\n")
    (other / "result.csv").chmod(0o644)
    attempt(box, f"cat {other}/result.csv")
    attempt(box, "ls / | grep -q '^out-'")


def test_inputs_cannot_be_written(box: Sandbox):
    data = box.input_dir({"cohort.csv": "id\n1\n"})
    (data / "cohort.csv").chmod(0o666)  # even a world-writable file: mount is ro
    before = sha256(data / "cohort.csv")
    mount = (Mount(source=str(data), target="/data"),)
    attempt(box, "echo tampered >> /data/cohort.csv", mounts=mount)
    attempt(box, "rm -f /data/cohort.csv && ! test -e /data/cohort.csv", mounts=mount)
    attempt(box, "touch /data/new", mounts=mount)
    assert sha256(data / "cohort.csv") == before
    assert sorted(p.name for p in data.iterdir()) == ["cohort.csv"]


def test_writes_outside_the_output_dir_fail_or_vanish(box: Sandbox):
    marker = f"femd-escape-{uuid.uuid4().hex}"
    attempt(box, f"echo x > /usr/{marker}")
    attempt(box, f"echo x > /{marker}")
    attempt(box, f"echo x > /dev/{marker}")
    attempt(box, f"echo x > /etc/{marker}")
    # /tmp is a private tmpfs: writable, gone with the sandbox
    outcome, out = box.run(f"echo x > /tmp/{marker} && echo x > /dev/shm/{marker}")
    assert outcome.state == "succeeded", outcome
    host_places = ("/", "/tmp", "/dev/shm", "/usr", "/etc", str(box.root))  # noqa: S108
    for place in host_places:
        assert not (Path(place) / marker).exists()
    assert list(out.iterdir()) == []


def test_tmpfs_is_bounded(box: Sandbox):
    # 64 MiB tmpfs: writing 100 MiB fails with ENOSPC, not host memory
    attempt(box, "dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>/dev/null")


def test_no_network_to_a_loopback_listener(box: Sandbox):
    with tcp_listener() as server:
        port = server.getsockname()[1]
        attempt(box, f"echo hi | busybox nc -w 2 127.0.0.1 {port}")
        connect = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2)"
        attempt(box, f'python3 -c "{connect}" 2>/dev/null')
        assert not accepted(server)


def test_no_abstract_unix_socket_to_the_host(box: Sandbox):
    name = f"femd-escape-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind("\0" + name)
        server.listen(1)
        server.setblocking(False)
        code = f"import socket; socket.socket(socket.AF_UNIX).connect('\\0{name}')"
        attempt(box, f'python3 -c "{code}" 2>/dev/null')
        assert not accepted(server)


FORK_BOMB = """\
import os, time
while True:  # parent and every child keep forking: exponential, and they persist
    try:
        os.fork()
    except OSError:
        time.sleep(0.01)
"""

FORK_PAST = """\
import os, time
started = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    started += 1
visible = sum(name.isdigit() for name in os.listdir("/proc"))
print(f"started={started} visible={visible}")
"""


def wait_no_task_processes(box: Sandbox) -> None:
    for _ in range(50):
        if not task_processes(box.uid):
            return
        time.sleep(0.1)
    assert task_processes(box.uid) == []


def test_fork_bomb_is_contained_by_the_pids_limit(box: Sandbox):
    pids = 24
    seen: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.append(len(task_processes(box.uid)))
            time.sleep(0.02)

    settle(box.uid)  # earlier sandboxes' PID-1 zombies count against NPROC
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        outcome, _ = box.run(
            "", argv=("python3", "-c", FORK_BOMB), pids=pids, timeout_s=3
        )
    finally:
        stop.set()
        sampler.join()
    assert outcome.state == "timed_out", outcome
    assert max(seen) <= pids  # every process of the task user, bwrap included
    assert max(seen) >= pids - 2  # the bomb did run into the limit
    wait_no_task_processes(box)


def test_forking_past_the_limit_fails_and_the_task_ends(box: Sandbox):
    settle(box.uid)
    outcome, _ = box.run("", argv=("python3", "-c", FORK_PAST), pids=16)
    assert outcome.state == "succeeded", outcome
    counts = dict(kv.split("=") for kv in outcome.log_tail.split())
    assert 0 < int(counts["started"]) < 16
    assert int(counts["visible"]) <= 16
    wait_no_task_processes(box)  # the sleepers died with the sandbox


def test_memory_past_the_limit_fails(box: Sandbox):
    attempt(box, "dd if=/dev/zero of=/dev/null bs=300M count=1", memory_mb=128)
    attempt(box, "python3 -c 'bytearray(300 << 20)' 2>/dev/null", memory_mb=128)


def test_running_past_the_timeout_is_timed_out(box: Sandbox):
    outcome, out = box.run("sleep 30; echo late > /out/late", timeout_s=1)
    assert outcome.state == "timed_out"
    assert not (out / "late").exists()


def test_io_uring_is_refused(box: Sandbox):
    # io_uring's requests would bypass the seccomp filter: no ring at all.
    attempt(box, f"python3 -c {shlex.quote(IO_URING)}")


def test_own_cgroup_cannot_be_left(box: Sandbox):
    # /sys is not in the sandbox: no cgroup file to write oneself out with.
    attempt(box, "echo $$ > /sys/fs/cgroup/pids/cgroup.procs 2>/dev/null")


def test_setuid_root_binary_gives_no_privilege(box: Sandbox):
    bindir = box.input_dir()
    suid = bindir / "python-suid"
    shutil.copy2(Path(sys.executable).resolve(), suid)
    suid.chmod(0o4755)
    # on the host the copy really is setuid root, for the task user too
    check = "import os; print(os.geteuid())"
    host = subprocess.run(  # noqa: S603 (our own copy of python)
        [str(suid), "-c", check], env={"PYTHONHOME": "/usr"}, capture_output=True,
        text=True, check=True, user=box.uid,
    )  # fmt: skip
    assert host.stdout.strip() == "0"
    mount = (Mount(source=str(bindir), target="/bin-suid"),)
    env = (("PYTHONHOME", "/usr"),)
    attempt(
        box,
        f"test \"$(/bin-suid/python-suid -c '{check}')\" = 0",
        mounts=mount,
        env=env,
    )
    attempt(box, "python3 -c 'import os; os.setuid(0)' 2>/dev/null")


PTRACE = """\
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
pid = os.fork()
if pid == 0:
    time.sleep(5)
    os._exit(0)
attached = libc.ptrace(16, pid, None, None) == 0  # PTRACE_ATTACH our own child
init = libc.ptrace(16, 1, None, None) == 0
os.kill(pid, 9)
sys.exit(0 if attached or init else 1)
"""

KEYCTL = """\
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
# keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, create=1), x86_64 nr 250
sys.exit(0 if libc.syscall(250, 0, -3, 1) >= 0 else 1)
"""


def on_host(box: Sandbox, script: str) -> int:
    """Run *script* as the task user on the host, outside any sandbox (control)."""
    return subprocess.run(  # noqa: S603 (our own python, our own script)
        [sys.executable, "-c", script], user=box.uid, check=False, cwd="/"
    ).returncode


def test_ptrace_is_refused(box: Sandbox):
    assert on_host(box, PTRACE) == 0  # the same user may trace its child outside
    attempt(box, f"python3 -c '{PTRACE}'")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="keyctl nr is x86_64's")
def test_kernel_keyring_is_refused(box: Sandbox):
    assert on_host(box, KEYCTL) == 0  # keyrings are not namespaced: refused inside
    attempt(box, f"python3 -c '{KEYCTL}'")


def test_namespaces_and_mounts_cannot_be_created(box: Sandbox):
    attempt(box, "busybox unshare -r true 2>/dev/null")
    attempt(box, "busybox unshare -m true 2>/dev/null")
    attempt(box, "busybox mount -t tmpfs none /tmp 2>/dev/null")
    attempt(box, "busybox chroot / true 2>/dev/null")


def test_processes_outside_the_sandbox_cannot_be_signalled(box: Sandbox):
    # A host process of the very same uid: invisible and unkillable from inside.
    sentinel = subprocess.Popen(["/usr/bin/sleep", "30"], user=box.uid)
    try:
        attempt(box, f"kill -9 {sentinel.pid} 2>/dev/null")
        outcome, _ = box.run("kill -9 -1 2>/dev/null; exit 0")
        assert outcome.state in {"succeeded", "failed"}
        assert sentinel.poll() is None
        attempt(box, f"test -d /proc/{sentinel.pid} && test {sentinel.pid} -gt 10")
    finally:
        sentinel.kill()
        sentinel.wait()


def test_output_symlink_to_etc_passwd_writes_nothing_outside(box: Sandbox):
    before = sha256(Path("/etc/passwd"))
    data = box.input_dir({"cohort.csv": "id\n1\n"})
    mount = (Mount(source=str(data), target="/data"),)
    outcome, out = box.run(
        "ln -s /etc/passwd /out/link; echo 'evil:x:0:0::/:/bin/sh' >> /out/link; "
        "ln /data/cohort.csv /out/hard 2>/dev/null; exit 0",
        mounts=mount,
    )
    # The output tmpfs is streamed out; a symlink in it is never recreated on
    # the host (femd writes there), and the task fails saying why.
    assert outcome.state == "failed", outcome
    assert "symlink" in outcome.reason
    assert sha256(Path("/etc/passwd")) == before
    assert list(out.iterdir()) == []


def test_log_flood_is_bounded_on_disk(box: Sandbox):
    spec = box.spec("yes 0123456789abcdef | head -c 50000000", log_max_bytes=4096)
    handle = start(box.launcher, spec)
    outcome = handle.wait(60)
    assert outcome is not None
    assert outcome.state == "succeeded"
    log = box.state_dir / "launchers" / "process" / f"{spec.task_id}.log"
    assert log.stat().st_size <= 4096 + 64
