"""The podman output step's shell must run in any image: a static executable."""

from __future__ import annotations

import sys
from pathlib import Path

from femd.launchers.podman.outputs import HELPER, fifo_path, helper_problem


def test_the_installed_busybox_is_static() -> None:
    assert helper_problem(HELPER) is None


def test_a_dynamic_executable_is_refused() -> None:
    problem = helper_problem(str(Path(sys.executable).resolve()))
    assert problem is not None
    assert "not statically linked" in problem
    assert "busybox-static" in problem


def test_a_missing_or_non_elf_helper_is_refused(tmp_path: Path) -> None:
    missing = helper_problem(str(tmp_path / "none"))
    assert missing is not None
    assert "No such file" in missing
    script = tmp_path / "busybox"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    problem = helper_problem(str(script))
    assert problem is not None
    assert "not a 64-bit executable" in problem


def test_the_fifo_lives_beside_the_output_dir() -> None:
    assert fifo_path(Path("/w/t1/out")) == Path("/w/t1/out.stream")
