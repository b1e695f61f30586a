"""The ``process`` launcher on real bubblewrap: what a task sees and how it ends.

DESIGN "Launchers": cleared environment, read-only inputs, one writable output
dir, exit codes and logs reported, timeout and cancel, fail closed on what the
host cannot enforce.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.errors import LaunchError, UnenforceableError  # noqa: E402
from femd.launchers import LAUNCHERS, Mount, environment, start  # noqa: E402
from femd.launchers.cgroup import scope_of  # noqa: E402
from tests.integration.sandbox_support import (  # noqa: E402
    Sandbox,
    profile,
    task_processes,
)

pytestmark = pytest.mark.bwrap


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    with Sandbox.open() as sandbox:
        yield sandbox


def test_probe_reports_how_limits_are_enforced(box: Sandbox):
    caps = box.caps()
    assert caps.launcher == "process"
    assert caps.available, caps.problems
    assert (caps.memory_limit, caps.cpu_limit, caps.pids_limit) == (True, True, True)
    assert (caps.egress, caps.egress_filtered, caps.ingress) == (True, True, True)
    assert caps.min_cpus == 0.01
    # This CI host: cgroup v1, femd as root. Never a per-process cap as memory.
    how = dict(caps.enforcement)
    assert how["memory"] == how["pids"] == how["cpus"] == "cgroup v1"
    assert not any("RLIMIT" in note or "address-space" in note for note in caps.notes)


def test_rlimits_hold_in_the_sandbox(box: Sandbox):
    # Set by the entry step before the user switch: the task cannot raise them.
    outcome, _ = box.run("cat /proc/self/limits", cpus=2, timeout_s=20)
    assert outcome.state == "succeeded", outcome
    rows = {
        line[:26].strip(): line[26:].split()[:2]
        for line in outcome.log_tail.splitlines()[1:]
    }
    assert rows["Max cpu time"] == ["45", "50"]  # timeout x cores + 5, hard +5
    assert rows["Max file size"] == [str(1024 << 20)] * 2  # fsize_mb, in bytes
    assert rows["Max open files"] == ["1024", "1024"]
    assert rows["Max core file size"] == ["0", "0"]


def test_environment_is_cleared_except_the_spec(box: Sandbox, monkeypatch):
    monkeypatch.setenv("FEMD_HOST_SECRET", "must-not-leak")
    outcome, _ = box.run("env | sort", env=(("ROUNDS", "3"), ("LANG", "C.UTF-8")))
    assert outcome.state == "succeeded", outcome
    lines = set(outcome.log_tail.splitlines())
    assert "ROUNDS=3" in lines
    assert "LANG=C.UTF-8" in lines
    assert "HOME=/tmp" in lines
    assert "PATH=/usr/local/bin:/usr/bin:/bin" in lines
    assert "must-not-leak" not in outcome.log_tail
    names = {line.split("=", 1)[0] for line in lines}
    assert names <= {"ROUNDS", "LANG", "HOME", "PATH", "PWD", "SHLVL", "_"}


def test_output_is_visible_on_the_host_written_by_femd(box: Sandbox):
    outcome, out = box.run(
        "echo result > /out/model.txt; mkdir /out/d; echo x > /out/d/y"
    )
    assert outcome.state == "succeeded", outcome
    assert (out / "model.txt").read_text() == "result\n"
    assert (out / "d" / "y").read_text() == "x\n"
    # Streamed out of the sandbox's output tmpfs and written by femd itself.
    assert (out / "model.txt").stat().st_uid == os.geteuid()
    assert outcome.usage is not None
    assert outcome.usage.output_bytes == 9
    assert out.stat().st_mode & 0o777 == 0o700


def test_an_empty_output_dir_runs_no_stat_nor_tar(box: Sandbox):
    # First on the task's (and the output step's) PATH: a stat and a tar
    # that fail. An empty output directory is told with shell builtins alone.
    shim = '#!/bin/sh\necho "$0 ran" >&2\nexit 1\n'
    tools = box.input_dir({"stat": shim, "tar": shim})
    for name in ("stat", "tar"):
        (tools / name).chmod(0o755)
    kw: dict[str, object] = {
        "env": (("PATH", "/femd-shims:/usr/bin:/bin"),),
        "mounts": (Mount(source=str(tools), target="/femd-shims"),),
    }
    outcome, out = box.run("true", **kw)
    assert outcome.state == "succeeded", outcome
    assert list(out.iterdir()) == []
    # One output file: the step needs its tools, and the shims fail it.
    outcome, _ = box.run(": > /out/f", **kw)
    assert outcome.state == "failed", outcome
    assert "output step failed" in (outcome.reason or ""), outcome


@pytest.mark.parametrize(
    ("code", "state"), [(0, "succeeded"), (1, "failed"), (3, "failed"), (255, "failed")]
)
def test_exit_codes_propagate(box: Sandbox, code: int, state: str):
    outcome, _ = box.run(f"exit {code}")
    assert (outcome.state, outcome.exit_code) == (state, code)
    assert outcome.reason == ("" if code == 0 else f"exit code {code}")
    assert outcome.started_at <= outcome.finished_at


def test_a_signal_death_is_named(box: Sandbox):
    outcome, _ = box.run("kill -KILL $$")
    assert (outcome.state, outcome.exit_code) == ("failed", 137)
    assert outcome.reason == "exit code 137 (killed by SIGKILL)"


def test_logs_are_captured_and_bounded(box: Sandbox):
    spec = box.spec(
        "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo err >&2",
        log_max_bytes=1000,
    )
    handle = start(box.launcher, spec)
    outcome = handle.wait(30)
    assert outcome is not None
    assert outcome.state == "succeeded"
    log = b"".join(handle.logs())
    assert log.startswith(b"line-0\nline-1\n")
    assert log.endswith(b"\n[femd: log cut at 1000 bytes]\n")
    assert len(log) <= 1000 + 64
    # the tail is the end of the stream, stdout and stderr together, a few KiB
    assert outcome.log_tail.endswith("line-1999\nerr\n")
    assert len(outcome.log_tail) <= 8192


def test_log_tail_decodes_invalid_utf8(box: Sandbox):
    outcome, _ = box.run(r"printf 'ok \377\376 end\n'")
    assert outcome.log_tail == "ok \ufffd\ufffd end\n"


def test_task_runs_unprivileged_with_no_capabilities(box: Sandbox):
    script = (
        "id -u; id -g; grep -E '^(CapEff|CapPrm|NoNewPrivs|Seccomp):' /proc/self/status"
    )
    outcome, _ = box.run(script)
    assert outcome.state == "succeeded", outcome
    lines = outcome.log_tail.split()
    assert lines[0] == str(box.uid) != "0"
    assert "CapEff:" in lines
    assert lines[lines.index("CapEff:") + 1] == "0" * 16
    assert lines[lines.index("CapPrm:") + 1] == "0" * 16
    assert lines[lines.index("NoNewPrivs:") + 1] == "1"
    assert lines[lines.index("Seccomp:") + 1] == "2"


def test_only_stdio_is_inherited(box: Sandbox):
    outcome, _ = box.run("ls /proc/$$/fd")
    assert outcome.log_tail.split() == ["0", "1", "2"]


def test_inputs_are_mounted_read_only_and_workdir_is_used(box: Sandbox):
    data = box.input_dir({"cohort.csv": "id,age\n1,54\n"})
    code = box.input_dir({"train.sh": "cat /data/hf/cohort.csv > /out/copy.csv\npwd\n"})
    outcome, out = box.run(
        "sh ./train.sh",
        mounts=(
            Mount(source=str(data), target="/data/hf"),
            Mount(source=str(code), target="/code"),
        ),
        workdir="/code",
    )
    assert outcome.state == "succeeded", outcome
    assert outcome.log_tail == "/code\n"
    assert (out / "copy.csv").read_text() == "id,age\n1,54\n"


BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 4: pass\n"


def test_half_a_cpu_holds_a_busy_loop_to_half_a_core(box: Sandbox):
    outcome, _ = box.run("", argv=("python3", "-c", BUSY), cpus=0.5)
    assert outcome.state == "succeeded", outcome
    usage = outcome.usage
    assert usage is not None
    assert usage.cpu_s is not None
    assert usage.wall_s
    # From the cgroup's own cpu usage (cpuacct): 4 s of wall time at most
    # half a core, whatever else this shared host runs (it can only be less).
    assert usage.wall_s >= 4
    assert usage.cpu_s / usage.wall_s <= 0.6, usage
    assert usage.cpu_s >= 0.2, usage  # it did run


def test_concurrent_tasks_are_isolated_each_in_its_own_cgroup(box: Sandbox):
    script = "grep pids: /proc/self/cgroup; ls /; sleep 0.5; echo done > /out/r"
    specs = [box.spec(script, cpus=1) for _ in range(2)]
    handles = [start(box.launcher, spec) for spec in specs]
    outcomes = [h.wait(30) for h in handles]
    assert [o.state for o in outcomes if o] == ["succeeded", "succeeded"]
    for spec in specs:
        assert (Path(spec.output_dir) / "r").read_text() == "done\n"
    groups = {o.log_tail.split()[0] for o in outcomes if o}
    assert groups == {
        f"8:pids:/femd-task-{scope_of(box.state_dir)}-{s.task_id}" for s in specs
    }


def test_timeout_kills_the_sandbox(box: Sandbox):
    began = time.monotonic()
    outcome, _ = box.run("echo started; sleep 60 & sleep 60", timeout_s=1)
    assert outcome.state == "timed_out"
    assert outcome.exit_code is None
    assert outcome.reason == "timeout of 1 s reached"
    assert outcome.log_tail == "started\n"
    assert time.monotonic() - began < 10


def _wait_started(handle, text: bytes) -> None:
    for _ in range(100):
        if text in b"".join(handle.logs()):
            return
        time.sleep(0.05)
    raise AssertionError(f"task never printed {text!r}")


def test_cancel_sends_sigterm_first(box: Sandbox):
    spec = box.spec(
        'trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 0.1; done'
    )
    handle = start(box.launcher, spec)
    _wait_started(handle, b"ready")
    handle.cancel(grace_s=10)
    outcome = handle.wait(10)
    assert outcome is not None
    assert (outcome.state, outcome.exit_code) == ("cancelled", 7)
    assert "got-term" in outcome.log_tail


def test_cancel_kills_after_the_grace(box: Sandbox):
    spec = box.spec("trap '' TERM; echo ready; while :; do sleep 0.1; done")
    handle = start(box.launcher, spec)
    _wait_started(handle, b"ready")
    began = time.monotonic()
    handle.cancel(grace_s=0.5)
    assert handle.wait(0.2) is None  # still in its grace period
    outcome = handle.wait(10)
    assert outcome is not None
    assert outcome.state == "cancelled"
    # Killed: no exit code of its own, or bwrap's 128+SIGKILL when bwrap itself
    # saw its child die first.
    assert outcome.exit_code in (None, 137)
    assert 0.4 < time.monotonic() - began < 8
    handle.cancel()  # after the end: nothing happens


def test_no_process_survives_the_task(box: Sandbox):
    outcome, _ = box.run("sleep 60 & sleep 60 & echo spawned")
    assert outcome.state == "succeeded"
    for _ in range(50):
        if not task_processes(box.uid):
            break
        time.sleep(0.1)
    assert task_processes(box.uid) == []


def test_sandbox_setup_failure_is_a_failure_with_a_reason(box: Sandbox):
    outcome, _ = box.run("true", workdir="/does/not/exist")
    assert outcome.state == "failed"
    assert outcome.exit_code is None
    assert outcome.reason.startswith("sandbox setup failed")
    assert "bwrap" in outcome.log_tail


def test_missing_command_is_a_task_failure(box: Sandbox):
    outcome, _ = box.run("", argv=("/no/such/program",))
    assert outcome.state == "failed"


REFUSED = {
    "writable-mount": (
        {"mounts": (Mount(source="/usr", target="/x", read_only=False),)},
        "must be read-only",
    ),
    "mount-over-output": (
        {"mounts": (Mount(source="/usr", target="/out/x"),)},
        "overlaps",
    ),
    "mount-over-system": (
        {"mounts": (Mount(source="/usr", target="/usr/lib"),)},
        "overlaps",
    ),
    "mount-over-proc": (
        {"mounts": (Mount(source="/usr", target="/proc"),)},
        "overlaps",
    ),
    "missing-source": ({"mounts": (Mount(source="/no/such", target="/x"),)}, "missing"),
    "bad-env": ({"env": (("A=B", "x"),)}, "invalid environment variable"),
    "nul-argv": ({"argv": ("/bin/sh", "-c", "true\0")}, "NUL"),
    "bad-task-id": ({"task_id": "../../etc"}, "invalid launch spec"),
}


@pytest.mark.parametrize(("kw", "match"), REFUSED.values(), ids=REFUSED.keys())
def test_malformed_specs_are_refused_before_starting(box: Sandbox, kw, match):
    with pytest.raises(LaunchError, match=match):
        start(box.launcher, box.spec("true", **kw))


def test_output_dir_symlink_is_refused(box: Sandbox):
    link = box.root / "out-link"
    link.symlink_to(box.output_dir())
    with pytest.raises(LaunchError, match="output dir"):
        start(box.launcher, box.spec("true", output=link))


def test_non_empty_or_relative_output_dir_is_refused(box: Sandbox):
    out = box.output_dir()
    (out / "stale").write_text("from before")
    with pytest.raises(LaunchError, match="is not empty"):
        start(box.launcher, box.spec("true", output=out))
    with pytest.raises(LaunchError, match="must be absolute"):
        start(box.launcher, box.spec("true", output=Path("relative/out")))


def test_spec_for_another_profile_is_refused(box: Sandbox):
    other = profile(tmp_size_mb=8)
    spec = box.spec("true")
    spec = type(spec)(**{**{f: getattr(spec, f) for f in spec.__struct_fields__},
                         "profile": other})  # fmt: skip
    with pytest.raises(LaunchError, match="this launcher serves"):
        start(box.launcher, spec)


def test_cpu_below_the_smallest_quota_is_unenforceable(box: Sandbox):
    with pytest.raises(
        UnenforceableError, match=r"cpu limit of 0\.005 cpus .* smallest is 0\.01"
    ):
        start(box.launcher, box.spec("true", cpus=0.005))


def test_profile_without_process_section_is_refused(box: Sandbox):
    bare = profile()
    bare = type(bare)(api_version="femd/v1", kind="LauncherProfile", name="bare")
    launcher = LAUNCHERS["process"].factory(bare, environment("process", box.state_dir))
    with pytest.raises(UnenforceableError, match="no process section"):
        start(launcher, box.spec("true"))


def test_adopt_finds_nothing(box: Sandbox):
    assert box.launcher.adopt("task-1") is None


def test_logs_live_in_the_launcher_state_dir(box: Sandbox):
    spec = box.spec("echo hello")
    handle = start(box.launcher, spec)
    assert handle.wait(20) is not None
    log = box.state_dir / "launchers" / "process" / f"{spec.task_id}.log"
    assert log.read_bytes() == b"hello\n"
    assert log.stat().st_mode & 0o777 == 0o600
    assert os.stat(log.parent).st_mode & 0o777 == 0o700


UNPRIVILEGED_AGENT = """\
import json, sys
from pathlib import Path
from femd.launchers import LaunchSpec, Limits, LauncherProfile, ProcessSettings, start
from femd.launchers import environment
from femd.errors import UnenforceableError
from femd.launchers.process import BubblewrapLauncher
root = Path(sys.argv[1])
prof = LauncherProfile(api_version="femd/v1", kind="LauncherProfile", name="default",
                       process=ProcessSettings(run_as="nobody-is-used"))
launcher = BubblewrapLauncher(prof, environment("process", root / "state"))
spec = LaunchSpec(task_id="unpriv", launcher="process", profile=prof,
                  argv=("/bin/sh", "-c", "id -u > /out/uid"),
                  output_dir=str(root / "out"),
                  limits=Limits(cpus=1, memory_mb=256, timeout_s=20, pids=256))
caps = launcher.probe()
try:
    state = start(launcher, spec).wait(30).state
except UnenforceableError as e:
    state = str(e)
print(json.dumps({"available": caps.available, "state": state,
                  "enforcement": dict(caps.enforcement)}))
"""


def test_unprivileged_agent_on_cgroup_v1_refuses_tasks(box: Sandbox):
    # DESIGN "Trust model" 4: femd itself runs unprivileged. On this cgroup v1
    # host it can make no cgroup of its own: bubblewrap works, but memory,
    # pids and cpus cannot be enforced, so the task is refused (fail closed).
    # The suite runs as root (scripts/test installs packages and users).
    assert os.geteuid() == 0, "needs root to become another user"
    root, result = box.run_unprivileged("unprivileged", UNPRIVILEGED_AGENT)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["available"] is True
    assert report["enforcement"]["memory"] == "none"
    assert "memory limit of 256 MB cannot be enforced" in report["state"]
    assert "not root" in report["state"]
    assert list((root / "out").iterdir()) == []
