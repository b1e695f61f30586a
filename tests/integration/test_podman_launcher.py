"""The ``podman`` launcher on real rootless Podman: what a task sees and how it ends.

DESIGN "Launchers": image pinned and verified by digest, cleared environment,
read-only inputs, one writable output dir, exit codes and logs reported, timeout
and cancel, adoption after an agent restart, fail closed on what the host cannot
enforce.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from podman import PodmanClient

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.config import PodmanConfig  # noqa: E402
from femd.errors import (  # noqa: E402
    ImageDigestMismatchError,
    LaunchError,
    StageInError,
    UnenforceableError,
)
from femd.launchers import (  # noqa: E402
    LAUNCHERS,
    LauncherEnv,
    Mount,
    environment,
    start,
)
from femd.launchers.podman import TASK_USER, verify_image_digest  # noqa: E402
from femd.stageout import pack_outputs  # noqa: E402
from tests.integration import podman_support  # noqa: E402
from tests.integration.podman_support import (  # noqa: E402
    PODMAN_USER,
    PodmanBox,
    PodmanHandle,
    profile,
)

# The fixtures (tests/conftest.py may plug podman_support in as a plugin instead).
podman_service = podman_support.podman_service
busybox_image = podman_support.busybox_image
podman_box = podman_support.podman_box

pytestmark = pytest.mark.podman

OTHER_DIGEST = "sha256:" + "ab" * 32


def _host_info(box: PodmanBox) -> dict[str, Any]:
    with PodmanClient(base_url=box.service.url) as client:
        return dict(client.info()["host"])  # type: ignore[no-untyped-call]


def test_probe_reports_what_this_host_enforces(podman_box: PodmanBox) -> None:
    caps = podman_box.strict.probe()
    host = _host_info(podman_box)
    assert caps.available, caps.problems
    assert caps.launcher == "podman"
    assert host["security"]["rootless"] is True
    delegated = set(host.get("cgroupControllers") or ())
    v2 = host["cgroupVersion"] == "v2"
    assert caps.memory_limit == (v2 and "memory" in delegated)
    assert caps.cpu_limit == (v2 and "cpu" in delegated)
    assert caps.pids_limit  # RLIMIT_NPROC in the container's user namespace
    # femd (root here) joins a container's namespace to forward its network.
    assert (caps.egress, caps.egress_filtered, caps.ingress) == (True, True, True)
    if not caps.memory_limit:
        assert any("cgroup" in p and "memory" in p for p in caps.problems)


def test_probe_without_socket_is_unavailable(
    podman_box: PodmanBox, tmp_path: Path
) -> None:
    from femd.launchers.podman import PodmanLauncher

    env = LauncherEnv(
        state_dir=tmp_path,
        scope="t",
        config=PodmanConfig(socket=str(tmp_path / "no.sock")),
    )
    missing = PodmanLauncher(podman_box.profile, env)
    caps = missing.probe()
    assert not caps.available
    assert "cannot connect" in caps.problems[0]
    none = PodmanLauncher(
        podman_box.profile, LauncherEnv(state_dir=tmp_path, scope="t")
    )
    assert none.probe().problems == ("no podman socket configured",)


def test_task_writes_its_output_dir(podman_box: PodmanBox) -> None:
    outcome, out, _ = podman_box.run(
        "echo hello > /out/result.txt; mkdir /out/sub; echo x > /out/sub/y; id -u"
    )
    assert outcome.state == "succeeded", outcome
    assert outcome.exit_code == 0
    assert (out / "result.txt").read_text() == "hello\n"
    assert (out / "sub" / "y").read_text() == "x\n"
    # femd wrote them from the step's stream: the agent's own, private files.
    written = (out / "result.txt").stat()
    assert (written.st_uid, written.st_mode & 0o777) == (os.getuid(), 0o600)
    assert outcome.usage is not None
    assert outcome.usage.output_bytes == len("hello\n") + len("x\n")
    assert not Path(f"{out}.stream").exists()  # the FIFO is gone
    # What stage-out then sends: the files as the task wrote them.
    packed = pack_outputs(out, podman_box.root / "outputs.tar.gz", max_bytes=1 << 20)
    assert packed.files == 2
    assert outcome.log_tail.strip() == TASK_USER.split(":")[0]
    assert outcome.finished_at >= outcome.started_at


@pytest.mark.parametrize(
    ("script", "files"),
    [("true", []), ("echo h > /out/.hidden", [".hidden"]), ("mkdir /out/d", ["d"])],
    ids=["empty", "dot-file", "empty-subdir"],
)
def test_the_podman_step_speaks_the_one_output_protocol(
    podman_box: PodmanBox,
    monkeypatch: pytest.MonkeyPatch,
    script: str,
    files: list[str],
) -> None:
    from femd.launchers import tarstream
    from femd.launchers.capture import send_script
    from femd.launchers.podman import outputs

    assert outputs._STEP.endswith(send_script(">/run/femd/output", tools="$b "))
    tars = []
    real_open = tarstream.open_stream

    def counted(*args: Any, **kw: Any) -> Any:
        tars.append(1)
        return real_open(*args, **kw)

    monkeypatch.setattr(tarstream, "open_stream", counted)
    outcome, out, _ = podman_box.run(script)
    assert outcome.state == "succeeded", outcome.reason
    assert sorted(p.name for p in out.iterdir()) == files
    # An empty dir sends the one line `empty` (busybox's builtins): no tar read.
    assert len(tars) == (1 if files else 0)


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


@pytest.mark.parametrize("code", [1, 3, 255])
def test_exit_code_is_reported(podman_box: PodmanBox, code: int) -> None:
    outcome, _, _ = podman_box.run(f"exit {code}")
    assert outcome.state == "failed"
    assert outcome.exit_code == code
    assert outcome.reason == f"exit code {code}"


def test_environment_is_only_the_spec_s(
    podman_box: PodmanBox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEMD_AGENT_SECRET", "must-not-leak")
    outcome, _, logs = podman_box.run("env", env=(("ROUNDS", "3"), ("MODE", "a b=c")))
    assert outcome.state == "succeeded"
    env = dict(line.split("=", 1) for line in logs.decode().splitlines() if "=" in line)
    assert env["ROUNDS"] == "3"
    assert env["MODE"] == "a b=c"
    assert "must-not-leak" not in logs.decode()
    # What podman itself adds (and the image's ENV, none here): nothing from the host.
    assert set(env) <= {
        "ROUNDS",
        "MODE",
        "PATH",
        "HOSTNAME",
        "HOME",
        "container",
        "TERM",
        "PWD",
        "SHLVL",
    }


def test_logs_are_captured_and_bounded(podman_box: PodmanBox) -> None:
    outcome, _, logs = podman_box.run(
        "echo out-line; echo err-line >&2; i=0; "
        "while [ $i -lt 3000 ]; do echo line-$i-padding-padding; i=$((i+1)); done; "
        "echo last-line",
        log_max_bytes=10000,
    )
    assert outcome.state == "succeeded"
    assert b"out-line" in logs
    assert b"err-line" in logs
    assert len(logs) <= 10000
    assert outcome.log_tail.endswith("last-line\n")
    assert len(outcome.log_tail.encode()) <= 4096


def test_timeout_ends_timed_out(podman_box: PodmanBox) -> None:
    started = time.monotonic()
    outcome, _, _ = podman_box.run("echo begin; sleep 60", timeout_s=2)
    took = time.monotonic() - started
    assert outcome.state == "timed_out", outcome
    assert "timed out after 2s" in outcome.reason
    assert 2 <= took < 15
    assert "begin" in outcome.log_tail


def test_cancel_ends_cancelled_even_if_sigterm_is_ignored(
    podman_box: PodmanBox,
) -> None:
    handle, spec = podman_box.launch(
        "trap '' TERM; echo ready; while :; do sleep 1; done"
    )
    assert handle.wait(1) is None  # still running
    started = time.monotonic()
    handle.cancel(grace_s=1)
    outcome = handle.wait(30)
    assert outcome is not None
    assert outcome.state == "cancelled"
    assert time.monotonic() - started < 10
    assert podman_box.containers(spec.task_id) == []


def test_wait_returns_none_while_running_then_the_outcome(
    podman_box: PodmanBox,
) -> None:
    handle, spec = podman_box.launch("sleep 2; echo done > /out/f")
    assert handle.wait(0.2) is None
    assert podman_box.containers(spec.task_id) == [f"femd-{spec.task_id}"]
    outcome = handle.wait(30)
    assert outcome is not None
    assert outcome.state == "succeeded"
    assert handle.wait(0) is outcome  # collected once
    assert podman_box.containers(spec.task_id) == []  # removed after collection
    assert b"".join(handle.logs()) == b""  # nothing was printed; cached copy


def crash(handle: PodmanHandle) -> None:
    """What an agent's death does to a handle: its ends of the output FIFO close."""
    stream = handle._stream
    assert stream is not None
    stream._close_keeper()
    assert stream.capture.join(10)  # no writer yet: its reader ends and closes


def test_adopt_after_agent_and_service_restart(podman_box: PodmanBox) -> None:
    handle, spec = podman_box.launch("sleep 3; echo survived > /out/f; echo bye")
    crash(handle)  # the agent "crashes"
    podman_box.service.restart()  # and so does the podman service
    fresh = podman_box.make_launcher(unenforced=True)
    assert fresh.adopt("pt-no-such-task") is None
    adopted = fresh.adopt(spec.task_id)
    assert adopted is not None
    assert adopted.task_id == spec.task_id
    outcome = adopted.wait(30)
    assert outcome is not None
    assert outcome.state == "succeeded", outcome
    assert (Path(spec.output_dir) / "f").read_text() == "survived\n"
    assert b"bye" in b"".join(adopted.logs())
    assert podman_box.containers(spec.task_id) == []


def test_outputs_of_a_task_that_ended_while_no_agent_ran(podman_box: PodmanBox) -> None:
    handle, spec = podman_box.launch("echo partial > /out/p; sleep 2; exit 7")
    crash(handle)  # (before the task ends)
    # The task ended; its output step waits for an agent to read the outputs.
    time.sleep(4)
    assert podman_box.status(spec.task_id) == "running"
    adopted = podman_box.make_launcher().adopt(spec.task_id)
    assert adopted is not None
    outcome = adopted.wait(10)
    assert outcome is not None
    assert (outcome.state, outcome.exit_code) == ("failed", 7)
    assert (Path(spec.output_dir) / "p").read_text() == "partial\n"


def test_timeout_survives_an_agent_restart(podman_box: PodmanBox) -> None:
    handle, spec = podman_box.launch("sleep 60", timeout_s=2)
    crash(handle)
    adopted = podman_box.make_launcher().adopt(spec.task_id)
    assert adopted is not None
    outcome = adopted.wait(30)
    assert outcome is not None
    assert outcome.state == "timed_out"


def test_cancel_survives_an_agent_restart(podman_box: PodmanBox) -> None:
    handle, spec = podman_box.launch("sleep 60")
    handle.cancel(grace_s=1)  # the agent cancels, then restarts before waiting
    adopted = podman_box.make_launcher().adopt(spec.task_id)
    assert adopted is not None
    outcome = adopted.wait(30)
    assert outcome is not None
    assert outcome.state == "cancelled"


def test_inputs_and_workdir(podman_box: PodmanBox) -> None:
    data = podman_box.input_dir({"cohort.csv": "id,age\n1,40\n"})
    outcome, out, _ = podman_box.run(
        "pwd > /out/pwd; cat cohort.csv > /out/copy",
        mounts=(Mount(source=str(data), target="/data/hf"),),
        workdir="/data/hf",
    )
    assert outcome.state == "succeeded", outcome
    assert (out / "pwd").read_text() == "/data/hf\n"
    assert (out / "copy").read_text() == "id,age\n1,40\n"


@pytest.mark.parametrize(
    ("target", "read_only"),
    [("/data", False), ("/etc/x", True), ("/out", True), ("/proc/x", True)],
    ids=["writable", "etc", "over-out", "proc"],
)
def test_bad_mounts_are_refused(
    podman_box: PodmanBox, target: str, read_only: bool
) -> None:
    data = podman_box.input_dir()
    spec = podman_box.spec(
        "true", mounts=(Mount(source=str(data), target=target, read_only=read_only),)
    )
    with pytest.raises(LaunchError, match="mount"):
        podman_box.launcher.launch(spec)
    assert podman_box.containers(spec.task_id) == []


def test_ensure_image_verifies_the_local_digest(podman_box: PodmanBox) -> None:
    image_id = podman_box.launcher.ensure_image(podman_box.image)
    with PodmanClient(base_url=podman_box.service.url) as client:
        attrs = client.images.get(image_id).attrs
    assert attrs["Digest"] == podman_box.image.split("@")[1]
    verify_image_digest(attrs, podman_box.image)
    repo = podman_box.image.split("@")[0]
    with pytest.raises(ImageDigestMismatchError, match="digest mismatch"):
        verify_image_digest(attrs, f"{repo}@{OTHER_DIGEST}")


def test_an_absent_digest_is_pulled_and_its_failure_refused(
    podman_box: PodmanBox,
) -> None:
    repo = podman_box.image.split("@")[0]
    ref = f"{repo}@{OTHER_DIGEST}"
    with pytest.raises(StageInError, match="cannot stage in"):
        podman_box.launcher.ensure_image(ref)
    spec = podman_box.spec("true", image=ref)
    with pytest.raises(LaunchError, match="cannot stage in"):
        podman_box.launcher.launch(spec)
    assert podman_box.containers(spec.task_id) == []


@pytest.mark.parametrize(
    "ref",
    [
        "localhost/femd-test/busybox:latest",
        "localhost/femd-test/busybox",
        "localhost/femd-test/busybox@sha256:abc",
    ],
    ids=["tag", "bare", "short-digest"],
)
def test_unpinned_images_are_refused(podman_box: PodmanBox, ref: str) -> None:
    with pytest.raises(ImageDigestMismatchError, match="not pinned"):
        podman_box.launcher.ensure_image(ref)
    spec = podman_box.spec("true", image=ref)
    with pytest.raises(LaunchError, match="not pinned"):
        podman_box.launcher.launch(spec)
    assert podman_box.containers(spec.task_id) == []


def test_signature_policy_must_be_the_one_podman_applies(
    podman_box: PodmanBox, tmp_path: Path
) -> None:
    repo = podman_box.image.split("@")[0]
    ref = f"{repo}@{OTHER_DIGEST}"
    other = tmp_path / "policy.json"
    other.write_text(json.dumps({"default": [{"type": "reject"}]}))
    strict = podman_box.make_launcher(settings=profile(signature_policy=str(other)))
    with pytest.raises(StageInError, match="signature policy"):
        strict.ensure_image(ref)
    # The same bytes as the policy the service uses: the pull is attempted.
    used = Path("/etc/containers/policy.json")
    own = Path(f"~{PODMAN_USER}").expanduser() / ".config/containers/policy.json"
    same = tmp_path / "same.json"
    shutil.copy(own if own.exists() else used, same)
    ok = podman_box.make_launcher(settings=profile(signature_policy=str(same)))
    with pytest.raises(StageInError, match="cannot stage in"):
        ok.ensure_image(ref)


def test_output_dir_reachable_by_anyone_is_refused(podman_box: PodmanBox) -> None:
    open_root = Path(tempfile.mkdtemp(prefix="femd-open-", dir="/tmp"))
    try:
        open_root.chmod(0o755)
        (open_root / "out").mkdir()
        spec = podman_box.spec("true", output=open_root / "out")
        with pytest.raises(LaunchError, match="searchable by any user"):
            podman_box.launcher.launch(spec)
        assert podman_box.containers(spec.task_id) == []
        assert (open_root / "out").stat().st_mode & 0o777 == 0o755
    finally:
        shutil.rmtree(open_root)


def test_a_task_id_runs_once(podman_box: PodmanBox) -> None:
    handle, spec = podman_box.launch("sleep 5")
    again = podman_box.spec("true", task_id=spec.task_id)
    with pytest.raises(LaunchError, match="create"):
        podman_box.launcher.launch(again)
    handle.cancel(grace_s=1)
    outcome = handle.wait(30)
    assert outcome is not None
    assert outcome.state == "cancelled"


def test_agent_path_refuses_what_this_host_cannot_enforce(
    podman_box: PodmanBox,
) -> None:
    """Through LAUNCHERS + start(), as the agent does: no unsafe switch exists there."""
    env = environment(
        "podman",
        podman_box.state_dir,
        {"podman": PodmanConfig(socket=podman_box.service.url)},
    )
    launcher = LAUNCHERS["podman"].factory(podman_box.profile, env)
    caps = launcher.probe()
    spec = podman_box.spec("cat /sys/fs/cgroup/memory.max > /out/max", memory_mb=64)
    if caps.memory_limit and caps.cpu_limit:  # a host with delegated cgroup v2
        handle = start(launcher, spec)
        outcome = handle.wait(60)
        assert outcome is not None
        assert outcome.state == "succeeded"
        assert (Path(spec.output_dir) / "max").read_text().strip() == str(64 << 20)
        return
    with pytest.raises(UnenforceableError, match="memory limit of 64 MB"):
        start(launcher, spec)
    with pytest.raises(UnenforceableError, match="memory limit of 64 MB"):
        launcher.launch(spec)  # the launcher's own, defensive check
    assert podman_box.containers(spec.task_id) == []


def test_start_to_exit_latency(podman_box: PodmanBox) -> None:
    """A trivial task through the launcher vs ``podman run --rm IMG true``."""
    runs = []
    for _ in range(3):
        t0 = time.monotonic()
        handle, _ = podman_box.launch("", argv=("true",))
        outcome = handle.wait(60)
        runs.append(time.monotonic() - t0)
        assert outcome is not None
        assert outcome.state == "succeeded"
    cli = []
    for _ in range(3):
        t0 = time.monotonic()
        podman_box.service.podman(
            ["run", "--rm", "--network=none", podman_box.image, "true"]
        )
        cli.append(time.monotonic() - t0)
    launcher_s, cli_s = min(runs), min(cli)
    sys.stdout.write(
        f"\nstart-to-exit of `true`: launcher {launcher_s:.3f}s (runs {runs!r}), "
        f"podman run --rm {cli_s:.3f}s (runs {cli!r})\n"
    )
    assert launcher_s < 5.0


def _parent_ids(uid_map: str) -> list[tuple[int, int, int]]:
    rows = [line.split() for line in uid_map.strip().splitlines()]
    return [(int(a), int(b), int(c)) for a, b, c in rows]


def test_userns_auto_never_maps_the_podman_user(podman_box: PodmanBox) -> None:
    outcome, _, logs = podman_box.run("cat /proc/self/uid_map")
    assert outcome.state == "succeeded"
    rows = _parent_ids(logs.decode())
    # Only subordinate ids: id 0 of the rootless namespace (the podman user) is absent.
    assert all(not (start <= 0 < start + size) for _, start, size in rows), rows
    assert sum(size for *_, size in rows) == 65536


def test_userns_keep_id_maps_the_podman_user_but_runs_as_65534(
    podman_box: PodmanBox,
) -> None:
    keep = profile(userns="keep-id")
    launcher = podman_box.make_launcher(unenforced=True, settings=keep)
    spec = podman_box.spec("cat /proc/self/uid_map; id -u", launcher_profile=keep)
    outcome = launcher.launch(spec).wait(30)
    assert outcome is not None
    assert outcome.state == "succeeded"
    lines = outcome.log_tail.strip().splitlines()
    assert lines[-1] == "65534"
    assert any(start == 0 for _, start, _ in _parent_ids("\n".join(lines[:-1])))


def test_conmon_enforces_the_timeout_without_an_agent(
    podman_box: PodmanBox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from femd.launchers.podman import container

    # Shorten the grace, slack and collection window so that the test is quick.
    monkeypatch.setattr(container, "STOP_GRACE_S", 1)
    monkeypatch.setattr(container, "CONMON_SLACK_S", 0)
    monkeypatch.setattr(container, "COLLECT_WINDOW_S", 0)
    handle, spec = podman_box.launch("sleep 60", timeout_s=2)
    crash(handle)  # no agent waits: nobody but conmon enforces the timeout
    podman_box.wait_status(spec.task_id, "exited", timeout_s=30)
    adopted = podman_box.make_launcher().adopt(spec.task_id)
    assert adopted is not None
    outcome = adopted.wait(10)
    assert outcome is not None
    assert outcome.state == "timed_out"
    assert (outcome.finished_at - outcome.started_at).total_seconds() < 10
