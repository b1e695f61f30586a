"""Where a task may mount things inside each sandbox (``launchers.targets``)."""

from __future__ import annotations

import pytest

from femd.launchers.targets import _podman
from femd.rules import Rule


@pytest.mark.parametrize(
    ("mounts", "output"),
    [
        (["/out/data"], "/out"),  # swept into the step's tar as an output
        (["/out"], "/out"),
        (["/results"], "/results/run"),  # would hide the output dir
        (["/data", "/data"], "/out"),
        (["/etc/x"], "/out"),
        (["/data"], "/run/out"),
    ],
    ids=["under-output", "output", "over-output", "twice", "etc", "output-in-run"],
)
def test_podman_refuses_clashes_and_overlaps_with_the_output(
    mounts: list[str], output: str
) -> None:
    reasons = _podman(mounts, output)
    assert [r.rule for r in reasons] == [Rule.MOUNT_RESERVED]


def test_podman_accepts_mounts_beside_the_output() -> None:
    assert _podman(["/data", "/outputs-old", "/src/lib"], "/out") == []
