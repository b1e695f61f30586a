"""Sandbox-escape attempts against the ``podman`` launcher, on real rootless Podman.

The same list as the process launcher's suite: every attempt is contained and
the task ends in the right terminal state. Where this host cannot enforce a
limit (memory on rootless cgroup v1), the test asserts that femd refuses the
task instead of running it weaker.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.config import PodmanConfig  # noqa: E402
from femd.errors import LaunchError, UnenforceableError  # noqa: E402
from femd.launchers import LAUNCHERS, Mount, environment, start  # noqa: E402
from tests.integration import podman_support  # noqa: E402
from tests.integration.podman_support import PODMAN_USER, PodmanBox  # noqa: E402

podman_service = podman_support.podman_service
busybox_image = podman_support.busybox_image
podman_box = podman_support.podman_box

pytestmark = pytest.mark.podman


def _subids(user: str = PODMAN_USER) -> list[range]:
    ranges = []
    for line in Path("/etc/subuid").read_text().splitlines():
        name, start, count = line.split(":")
        if name == user:
            ranges.append(range(int(start), int(start) + int(count)))
    return ranges


def _task_processes() -> int:
    """Host processes running as one of the podman user's subordinate uids."""
    ranges = _subids()
    found = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(entry.path)
        except OSError:
            continue
        if any(st.st_uid in r for r in ranges):
            found += 1
    return found


def _host_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # no packet is sent for UDP connect
        except OSError:
            return None
        ip = s.getsockname()[0]
        return None if ip.startswith("127.") else str(ip)


def test_host_shadow_is_not_visible(podman_box: PodmanBox) -> None:
    host_first = Path("/etc/shadow").read_text().splitlines()[0]
    outcome, out, logs = podman_box.run(
        "cat /etc/shadow; cat /proc/1/root/etc/shadow; cat /proc/self/root/etc/shadow;"
        " ls -ln /etc; true"
    )
    assert outcome.state == "succeeded", outcome
    text = logs.decode()
    assert host_first not in text
    assert "IMAGE-SHADOW" not in text  # even the image's is root-only, and we are not
    assert text.count("Permission denied") >= 2
    assert list(out.iterdir()) == []


def test_agent_state_dir_is_invisible(podman_box: PodmanBox) -> None:
    state = podman_box.state_dir
    outcome, _, logs = podman_box.run(
        f"ls {state}; cat {podman_box.secret}; find / -name state.sqlite 2>/dev/null;"
        " true"
    )
    assert outcome.state == "succeeded"
    text = logs.decode()
    assert "agent secret" not in text
    assert "state.sqlite\n" not in text.replace(str(podman_box.secret), "")
    assert "No such file or directory" in text


def test_another_task_s_output_and_processes_are_invisible(
    podman_box: PodmanBox,
) -> None:
    first, first_out, _ = podman_box.run("echo A-SECRET > /out/secret")
    assert first.state == "succeeded"
    assert (first_out / "secret").read_text() == "A-SECRET\n"
    running, spec = podman_box.launch("echo ready; exec sleep 30 # A-MARKER")
    podman_box.wait_log(spec.task_id, "ready")
    try:
        outcome, out, logs = podman_box.run(
            f"cat {first_out}/secret; ls {Path(spec.output_dir)};"
            ' P=A-SEC; grep -r "${P}RET" / --exclude-dir=proc --exclude-dir=sys;'
            ' M=A-MARK; ps -o pid,args | grep "${M}ER" | grep -v grep;'
            " echo mine > /out/mine; true"
        )
    finally:
        running.cancel(grace_s=1)
        assert running.wait(30) is not None
    assert outcome.state == "succeeded", outcome
    text = logs.decode()
    assert "A-SECRET" not in text
    assert "A-MARKER" not in text
    assert "No such file or directory" in text
    assert (out / "mine").read_text() == "mine\n"


def test_inputs_cannot_be_written(podman_box: PodmanBox) -> None:
    data = podman_box.input_dir({"f": "original\n"})
    outcome, _, logs = podman_box.run(
        "echo x > /in/f; echo x >> /in/f; rm /in/f; touch /in/new; chmod 777 /in/f;"
        " mv /in/f /in/g; ln -s /in/f /in/l; true",
        mounts=(Mount(source=str(data), target="/in"),),
    )
    assert outcome.state == "succeeded"
    assert "Read-only file system" in logs.decode()
    assert sorted(p.name for p in data.iterdir()) == ["f"]
    assert (data / "f").read_text() == "original\n"
    assert (data / "f").stat().st_mode & 0o777 == 0o644


def test_nothing_outside_out_is_writable_or_persists(podman_box: PodmanBox) -> None:
    marker = f"femd-escape-{os.getpid()}"
    outcome, out, logs = podman_box.run(
        "for d in / /etc /bin /usr /root /var /work /run /run/femd /sys /proc/sys; do"
        f"  touch $d/{marker} 2>/dev/null && echo WROTE $d;"
        " done;"
        f" echo t > /tmp/{marker} && echo tmp-ok;"
        " cp /bin/busybox /out/bb && /out/bb true && echo EXEC-OUT;"
        f" cp /bin/busybox /tmp/bb 2>/dev/null && /tmp/bb true && echo EXEC-TMP; true",
        output_max_bytes=8 << 20,  # room for a copy of busybox
    )
    assert outcome.state == "succeeded", outcome
    text = logs.decode()
    assert "WROTE" not in text
    assert "tmp-ok" in text  # a private tmpfs ...
    assert "EXEC-OUT" not in text  # ... and /out, both noexec
    assert "EXEC-TMP" not in text
    assert not Path(f"/tmp/{marker}").exists()  # noqa: S108 (the host's /tmp)
    second, _, logs2 = podman_box.run(f"ls /tmp/{marker} /{marker}; true")
    assert second.state == "succeeded"
    assert logs2.decode().count("No such file") == 2  # nothing persisted
    assert sorted(p.name for p in out.iterdir()) == ["bb"]


def test_no_network_not_even_to_the_host(podman_box: PodmanBox) -> None:
    targets = ["127.0.0.1"] + [ip for ip in [_host_ip()] if ip]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("0.0.0.0", 0))  # noqa: S104 (every host address, to be sure)
        server.listen(8)
        server.settimeout(0)
        port = server.getsockname()[1]
        tries = " ".join(
            f"nc -w 2 {ip} {port} </dev/null && echo CONNECTED {ip};" for ip in targets
        )
        outcome, _, logs = podman_box.run(
            f"{tries} wget -T 2 -q -O- http://{targets[-1]}:{port}/ && echo GOT;"
            " ip -o link; ip -o addr; true"
        )
        with pytest.raises(BlockingIOError):
            server.accept()
    assert outcome.state == "succeeded"
    text = logs.decode()
    assert "CONNECTED" not in text
    assert "GOT" not in text
    links = [line for line in text.splitlines() if ": <" in line]
    assert len(links) == 1
    assert links[0].split(":")[1].strip() == "lo"


def test_process_count_is_bounded(podman_box: PodmanBox) -> None:
    outcome, out, _ = podman_box.run(
        "for i in $(seq 200); do sleep 60 & echo $i > /out/count; done", pids=32
    )
    count = int((out / "count").read_text())
    assert count < 32  # init, sh and the sleeps share the 32
    assert outcome.state == "failed"  # the shell died on "can't fork"


def test_fork_bomb_is_contained(podman_box: PodmanBox) -> None:
    before = _task_processes()
    handle, _ = podman_box.launch("b() { b | b & }; b; sleep 30", pids=48, timeout_s=4)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _task_processes() - before)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outcome = handle.wait(60)
    finally:
        done.set()
        watcher.join()
    assert outcome is not None
    assert outcome.state in ("timed_out", "failed"), outcome
    sys.stdout.write(f"\nfork bomb: peak of {peak} task processes (pids 48)\n")
    assert 0 < peak <= 48, peak  # RLIMIT_NPROC also counts zombies
    subprocess.run(["/bin/true"], check=True)  # the host can still fork
    time.sleep(0.5)
    assert _task_processes() <= before


def test_memory_beyond_the_limit(podman_box: PodmanBox) -> None:
    env = environment(
        "podman",
        podman_box.state_dir,
        {"podman": PodmanConfig(socket=podman_box.service.url)},
    )
    launcher = LAUNCHERS["podman"].factory(podman_box.profile, env)
    caps = launcher.probe()
    # 256 MB of /dev/zero held in memory by one process.
    spec = podman_box.spec(
        "head -c 268435456 /dev/zero | tail > /dev/null", memory_mb=64
    )
    if caps.memory_limit and caps.cpu_limit:  # delegated cgroup v2: it must die
        handle = start(launcher, spec)
        outcome = handle.wait(120)
        assert outcome is not None
        assert outcome.state == "failed"
        return
    # This host (rootless cgroup v1): refused, never run without the limit.
    with pytest.raises(UnenforceableError, match="memory limit of 64 MB"):
        start(launcher, spec)
    with pytest.raises(UnenforceableError, match="memory limit of 64 MB"):
        launcher.launch(spec)
    assert podman_box.containers(spec.task_id) == []


def test_busy_loop_times_out_and_leaves_nothing(podman_box: PodmanBox) -> None:
    before = _task_processes()
    outcome, _, _ = podman_box.run("while :; do :; done", timeout_s=2)
    assert outcome.state == "timed_out"
    time.sleep(0.5)
    assert _task_processes() <= before


def test_no_privilege_to_gain(podman_box: PodmanBox) -> None:
    outcome, out, logs = podman_box.run(
        "echo | /bin/suid/su -c 'echo ROOT-SHELL' root;"
        " grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status;"
        " mknod /out/null c 1 3 && echo MKNOD;"
        " mount -t tmpfs none /tmp && echo MOUNT;"
        " nsenter -t 1 -m -u true && echo NSENTER;"
        " unshare -m true && echo UNSHARE-MNT;"
        " unshare -r sh -c 'cat /etc/shadow && echo SHADOW; touch /etc/x && echo ETC';"
        f" kill -0 {os.getpid()} && echo HOST-PID;"
        " echo procs=$(ls -d /proc/[0-9]* | wc -l); true"
    )
    assert outcome.state == "succeeded"
    text = logs.decode()
    assert "must be suid" in text  # the setuid bit is ignored (no-new-privileges)
    status = dict(
        line.split(":", 1)
        for line in text.splitlines()
        if line.startswith(("CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp"))
    )
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    for escaped in (
        "MKNOD",
        "MOUNT",
        "NSENTER",
        "UNSHARE-MNT",
        "SHADOW",
        "ETC",
        "HOST-PID",
    ):
        assert escaped not in text, escaped
    procs = int(text.split("procs=")[1].split()[0])
    # init, the output step and the task's own init, sh and its children: no
    # host process is visible
    assert procs <= 8
    assert list(out.iterdir()) == []


def test_symlinks_in_outputs_write_nothing_outside(podman_box: PodmanBox) -> None:
    victim = podman_box.root / "victim"
    victim.write_text("original\n")
    victim.chmod(0o666)  # even a world-writable host file
    outcome, out, _ = podman_box.run(
        f"ln -s {victim} /out/link; echo pwned > /out/link;"
        " ln -s / /out/root; echo pwned > /out/root{victim};"
        " ln -s /etc/passwd /out/passwd; true"
    )
    # The output tmpfs is streamed out; a symlink in it is never recreated on
    # the host (femd writes there), and the task fails saying why.
    assert outcome.state == "failed", outcome
    assert "symlink" in outcome.reason
    assert victim.read_text() == "original\n"
    assert not any(p.is_symlink() for p in out.rglob("*"))


def test_output_dir_that_is_a_symlink_is_refused(podman_box: PodmanBox) -> None:
    target = podman_box.root / "elsewhere"
    target.mkdir(mode=0o755)
    link = podman_box.root / "out-link"
    link.symlink_to(target)
    spec = podman_box.spec("echo x > /out/x", output=link)
    with pytest.raises(LaunchError, match="output dir"):
        podman_box.launcher.launch(spec)
    assert podman_box.containers(spec.task_id) == []
    assert target.stat().st_mode & 0o777 == 0o755
    assert list(target.iterdir()) == []
