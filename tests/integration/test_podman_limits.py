"""The podman launcher's output quota holds during the run (issue 14), real podman.

The container's ``/out`` is a tmpfs of the output cap; a trusted step streams
it out when the task ends. Every way of putting bytes there fails inside the
task once the cap is reached; what the task puts on the node's disk is
measured host-side, while it runs (its output dir, its stream FIFO and the
container's writable layer). Memory/cpu limits this host cannot enforce
(rootless cgroup v1) are waived with the tests' unenforced launcher.
"""

from __future__ import annotations

import io
import sys
import tarfile
import uuid
from pathlib import Path
from types import MappingProxyType

import msgspec
import pytest
import yaml
from podman import PodmanClient

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.launchers import (  # noqa: E402
    Capabilities,
    Launcher,
    LauncherEnv,
    LauncherProfile,
    Mount,
    registry,
)
from femd.launchers.podman import TrialPodmanLauncher  # noqa: E402
from testbed.podman import PodmanService  # noqa: E402
from tests.integration import podman_support  # noqa: E402
from tests.integration.agent_support import (  # noqa: E402
    PROJECT,
    NodeEnv,
    agent_in_process,
    node_env_fixture,  # noqa: F401 (the `node_env` fixture)
)
from tests.integration.podman_support import PodmanBox  # noqa: E402

podman_service = podman_support.podman_service
busybox_image = podman_support.busybox_image
podman_box = podman_support.podman_box

pytestmark = pytest.mark.podman

CAP = 256 * 1024
# The busybox image has no Python (nor fallocate's KEEP_SIZE): the host's.
PYTHON_MOUNTS = (
    Mount(source="/usr", target="/usr"),
    Mount(source="/usr/lib", target="/lib"),
    Mount(source="/usr/lib64", target="/lib64"),
)
KEEP_SIZE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)\n"
    "FALLOC_FL_KEEP_SIZE = 1\n"
    "r = libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, ctypes.c_long(0),"
    " ctypes.c_long(100 << 20))\n"
    "print('keep-size', os.strerror(ctypes.get_errno()) if r else 'allocated',"
    " os.fstat(fd).st_size)\n"
    "sys.exit(1 if r else 0)\n"
)
# Each way starts from a cap that is not reached yet, and must fail on its own.
SCRIPT = """
    try() { if "$@"; then echo "$1 ok"; else echo "$1 failed"; fi; }
    try fallocate -l 100M /out/big
    try python3 -c "$KEEP_SIZE" /out/sparse
    i=0
    while [ $i -lt 300 ]; do echo x > /out/f$i 2>/dev/null || break; i=$((i+1)); done
    echo files=$i; rm -f /out/f*
    try dd if=/dev/zero of=/out/written bs=64k count=16
    df /out | tail -n 1
    echo ready; sleep 4
"""


def _disk_bytes(paths: list[Path]) -> int:
    """Bytes the files under *paths* take on the host's disks (directories aside)."""
    total = 0
    for top in paths:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            if p.exists() and not p.is_dir():
                total += p.lstat().st_blocks * 512
    return total


def _upper_dir(box: PodmanBox, task_id: str) -> Path:
    """The container's writable layer on the host (overlay's upper dir)."""
    with PodmanClient(base_url=box.service.url) as client:
        (found,) = client.containers.list(
            all=True, filters=[f"label=femd.task={task_id}"]
        )
        data = client.containers.get(found.id).attrs["GraphDriver"]["Data"]
    return Path(str(data["UpperDir"]))


def test_output_cap_holds_against_writes_fallocate_and_many_files(
    podman_box: PodmanBox,
) -> None:
    handle, spec = podman_box.launch(
        SCRIPT,
        env=(("KEEP_SIZE", KEEP_SIZE),),
        mounts=PYTHON_MOUNTS,
        timeout_s=60,
        output_max_bytes=CAP,
    )
    out = Path(spec.output_dir)
    podman_box.wait_log(spec.task_id, "ready")
    # Host side, while the task holds its output dir full.
    during = _disk_bytes(
        [out, Path(f"{out}.stream"), _upper_dir(podman_box, spec.task_id)]
    )
    outcome = handle.wait(60)
    assert outcome is not None
    log = outcome.log_tail
    # Each way fails inside the task, with the cap's bytes at most in place.
    assert "fallocate failed" in log, log
    assert "keep-size No space left on device 0" in log, log
    assert "python3 failed" in log, log
    files = int(log.split("files=")[1].split()[0])
    assert 0 < files < CAP // 4096 + 1, log  # a page each: the cap, not 300
    assert "dd failed" in log, log
    assert outcome.state == "failed", (outcome, log)
    assert outcome.rule == "outputs.exceeded", outcome
    assert f"cap of {CAP} bytes" in outcome.reason
    assert during < CAP, during
    after = _disk_bytes([out])
    assert after <= CAP, after
    assert outcome.usage is not None
    assert outcome.usage.output_bytes is not None
    assert 0 < outcome.usage.output_bytes <= CAP
    sys.stdout.write(
        f"\noutput cap {CAP} B: node disk while full {during} B, "
        f"after collection {after} B, files before ENOSPC {files}\n"
    )


def test_an_image_with_no_shell_still_has_its_outputs_collected(
    podman_box: PodmanBox,
) -> None:
    # The doctor's one-file image (catatonit only): nothing but the task's own
    # binary; the step brings its own shell and tar.
    from femd.launchers.podman.trial import doctor_image

    image = doctor_image(podman_box.service.url)
    outcome, out, logs = podman_box.run(
        "", argv=("/catatonit", "-V"), image=image, timeout_s=30
    )
    assert outcome.state == "succeeded", outcome
    assert b"catatonit" in logs
    assert list(out.iterdir()) == []
    assert outcome.usage is not None
    assert outcome.usage.output_bytes == 0


# ---------------------------------------------------------------------------
# through the real agent (its podman launcher waives memory/cpu, as above)


class _ClaimsLimits(TrialPodmanLauncher):
    """Test-only: tells the agent that memory/cpu hold, so that it admits the
    tasks on this cgroup v1 host; podman then ignores those two limits."""

    def probe(self) -> Capabilities:
        caps = super().probe()
        if not caps.available:
            return caps
        return msgspec.structs.replace(caps, memory_limit=True, cpu_limit=True)


@pytest.mark.rabbitmq
def test_agent_reports_a_full_podman_output_dir(
    node_env: NodeEnv,
    podman_service: PodmanService,
    busybox_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = node_env
    url = podman_service.url
    profile = env.root / "launchers" / "default.yaml"
    data = yaml.safe_load(profile.read_text())
    data["podman"] = {}
    profile.write_text(yaml.safe_dump(data))
    policy = yaml.safe_load((env.root / "policy.yaml").read_text())
    project = policy["projects"][PROJECT]
    project["launchers"] = ["podman"]
    project["images"] = [busybox_image.partition("@")[0]]
    (env.root / "policy.yaml").write_text(yaml.safe_dump(policy))
    env.write_config(podman={"socket": url})

    def unenforced(prof: LauncherProfile, lenv: LauncherEnv) -> Launcher:
        return _ClaimsLimits(prof, lenv)

    line = msgspec.structs.replace(registry.LAUNCHERS["podman"], factory=unenforced)
    lines = {**registry.LAUNCHERS, "podman": line}
    monkeypatch.setattr(registry, "LAUNCHERS", MappingProxyType(lines))
    events = env.collect()
    run = uuid.uuid4().hex[:8]
    full, ok = f"pfull-{run}", f"pok-{run}"

    def task(task_id: str, script: str) -> bytes:
        return env.sign(
            env.manifest(
                task_id,
                ["/bin/sh", "-c", script],
                launcher="podman",
                image=busybox_image,
                network={"mode": "none"},
                outputs={"path": "/out", "max_bytes": 65536},
            )
        )

    with agent_in_process(env, monkeypatch):
        env.publish(
            task(full, "dd if=/dev/zero of=/out/x bs=64k count=16; exit 0"),
            task(ok, "echo result > /out/r"),
        )
        ends = events.await_terminal([full, ok], 120)
    assert ends[full]["state"] == "failed", ends[full]
    assert [r["rule"] for r in ends[full]["reasons"]] == ["outputs.exceeded"]
    assert ends[ok]["state"] == "succeeded", ends[ok]
    assert ends[ok]["usage"]["output_bytes"] == len("result\n")
    with tarfile.open(fileobj=io.BytesIO(events.outputs(ok))) as tar:
        member = tar.extractfile("r")
        assert member is not None
        assert member.read() == b"result\n"


def test_a_task_that_kills_the_output_step_fails(podman_box: PodmanBox) -> None:
    # The step is the parent of the task's init: the task may kill it (same
    # uid), which ends the container; nothing waits for a stream that never
    # comes, and the task fails.
    script = """
        echo data > /out/d
        step=$(awk '/^PPid/ {print $2}' /proc/$PPID/status)
        kill -KILL "$step"; sleep 30
    """
    outcome, out, _ = podman_box.run(script, timeout_s=60)
    assert outcome.state == "failed", outcome
    assert outcome.reason == "exit code 137 (killed by SIGKILL)", outcome
    assert (outcome.finished_at - outcome.started_at).total_seconds() < 20
    assert list(out.iterdir()) == []
