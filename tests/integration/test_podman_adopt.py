"""Adopting a podman container after a restart trusts femd's record, not labels.

The podman account can create a container labelled ``femd.task=<id>`` with
any ``femd.output_dir``/``femd.output_max_bytes``: femd must never write where
such labels say. Real rootless Podman (``testbed.podman``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from femd.errors import LaunchError  # noqa: E402
from femd.launchers.podman.record import LaunchRecord  # noqa: E402
from femd.statedir import StateDir  # noqa: E402
from tests.integration import podman_support  # noqa: E402
from tests.integration.podman_support import PodmanBox  # noqa: E402
from tests.integration.test_podman_launcher import crash  # noqa: E402

podman_service = podman_support.podman_service
busybox_image = podman_support.busybox_image
podman_box = podman_support.podman_box

pytestmark = pytest.mark.podman


def _forge(box: PodmanBox, task_id: str, output_dir: Path, max_bytes: int) -> str:
    """What the podman account can do: a container claiming *task_id*."""
    done = box.service.podman(
        [
            "create", "--network=none", "--name", f"forged-{task_id}",
            "--label", f"femd.task={task_id}",
            "--label", "femd.timeout_s=30",
            "--label", "femd.log_max_bytes=1048576",
            "--label", f"femd.output_dir={output_dir}",
            "--label", f"femd.output_max_bytes={max_bytes}",
            box.image, "true",
        ]
    )  # fmt: skip
    return done.stdout.decode().strip()


def _victim(box: PodmanBox) -> tuple[Path, Path]:
    """A directory elsewhere and a symlinked path to it, with a FIFO beside."""
    victim = box.root / "victim"
    victim.mkdir()
    (victim / "out").mkdir()
    os.mkfifo(victim / "out.stream", 0o666)
    link = box.root / "link"
    link.symlink_to(victim)
    return victim, link / "out"


def test_a_container_femd_never_launched_is_refused(podman_box: PodmanBox) -> None:
    task_id = podman_box.task_id()
    victim, evil = _victim(podman_box)
    cid = _forge(podman_box, task_id, evil, 1 << 30)
    try:
        with pytest.raises(LaunchError, match="no launch record"):
            podman_box.make_launcher().adopt(task_id)
        assert (victim / "out.stream").exists()  # femd opened nothing there
        assert list((victim / "out").iterdir()) == []
    finally:
        podman_box.service.podman(["rm", "-f", cid])


def test_labels_that_disagree_with_femd_s_record_are_refused(
    podman_box: PodmanBox,
) -> None:
    task_id = podman_box.task_id()
    real = podman_box.output_dir()
    _, evil = _victim(podman_box)
    record = LaunchRecord(
        output_dir=str(real), output_max_bytes=1024, timeout_s=30, log_max_bytes=1 << 20
    )
    markers = StateDir(podman_box.state_dir).launcher("podman")
    record.save(markers, task_id)
    cid = _forge(podman_box, task_id, evil, 1024)
    try:
        with pytest.raises(LaunchError, match=r"femd\.output_dir disagrees"):
            podman_box.make_launcher().adopt(task_id)
    finally:
        podman_box.service.podman(["rm", "-f", cid])
    # The genuine labels, a symlinked output dir: not opened either.
    record = LaunchRecord(
        output_dir=str(evil), output_max_bytes=1024, timeout_s=30, log_max_bytes=1 << 20
    )
    record.save(markers, task_id)
    cid = _forge(podman_box, task_id, evil, 1024)
    try:
        handle = podman_box.make_launcher().adopt(task_id)
        assert handle is not None
        assert handle._stream is None  # outputs not collected, never written
    finally:
        podman_box.service.podman(["rm", "-f", cid])


def test_a_launch_leaves_a_record_that_adoption_uses_and_removal_drops(
    podman_box: PodmanBox,
) -> None:
    handle, spec = podman_box.launch("echo x > /out/f", output_max_bytes=65536)
    markers = StateDir(podman_box.state_dir).launcher("podman")
    record = LaunchRecord.load(markers, spec.task_id)
    assert record is not None
    assert record.container_id == handle.container_id
    assert (record.output_dir, record.output_max_bytes) == (spec.output_dir, 65536)
    assert (
        oct(LaunchRecord.path(markers, spec.task_id).stat().st_mode & 0o777) == "0o600"
    )
    outcome = handle.wait(30)
    assert outcome is not None
    assert outcome.state == "succeeded", outcome.reason
    assert LaunchRecord.load(markers, spec.task_id) is None


def test_a_task_that_ended_while_no_agent_ran_is_not_timed_out_later(
    podman_box: PodmanBox,
) -> None:
    handle, spec = podman_box.launch(
        "sleep 1; echo partial > /out/p; exit 7", timeout_s=2
    )
    crash(handle)
    # It ends after 1 s; its step waits for a reader past the task's timeout.
    time.sleep(4)
    assert podman_box.status(spec.task_id) == "running"
    adopted = podman_box.make_launcher().adopt(spec.task_id)
    assert adopted is not None
    outcome = adopted.wait(60)
    assert outcome is not None
    assert (outcome.state, outcome.exit_code) == ("failed", 7), outcome.reason
    assert "timed out" not in (outcome.reason or "")
    assert (Path(spec.output_dir) / "p").read_text() == "partial\n"
