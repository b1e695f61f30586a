"""femd's launch record of a podman task: what adoption trusts instead of labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from femd.errors import LaunchError
from femd.launchers.podman.container import labels_of
from femd.launchers.podman.record import LaunchRecord

RECORD = LaunchRecord(
    output_dir="/state/work/t1/out",
    output_max_bytes=1 << 20,
    timeout_s=60,
    log_max_bytes=4096,
    container_id="c0ffee" * 10,
)


def test_a_record_round_trips_private(tmp_path: Path) -> None:
    markers = tmp_path / "launchers" / "podman"
    assert LaunchRecord.load(markers, "t1") is None
    RECORD.save(markers, "t1")
    assert LaunchRecord.load(markers, "t1") == RECORD
    assert LaunchRecord.path(markers, "t1").stat().st_mode & 0o777 == 0o600
    assert markers.stat().st_mode & 0o777 == 0o700
    LaunchRecord.drop(markers, "t1")
    assert LaunchRecord.load(markers, "t1") is None


def test_a_damaged_or_symlinked_record_is_refused(tmp_path: Path) -> None:
    tmp_path.joinpath("t1.launch").write_text('{"output_dir": 1}')
    with pytest.raises(LaunchError, match="launch record"):
        LaunchRecord.load(tmp_path, "t1")
    tmp_path.joinpath("t1.launch").unlink()
    RECORD.save(tmp_path, "real")
    tmp_path.joinpath("t1.launch").symlink_to(tmp_path / "real.launch")
    with pytest.raises(LaunchError, match="launch record"):
        LaunchRecord.load(tmp_path, "t1")


def test_check_accepts_only_the_recorded_container_and_labels() -> None:
    labels = {"femd.task": "t1", **labels_of(RECORD)}
    RECORD.check("t1", RECORD.container_id, labels)
    with pytest.raises(LaunchError, match="which femd launched as"):
        RECORD.check("t1", "beef" * 16, labels)
    for key in labels_of(RECORD):
        forged = {**labels, key: "/elsewhere"}
        with pytest.raises(LaunchError, match=f"label {key} disagrees"):
            RECORD.check("t1", RECORD.container_id, forged)
