"""remove_tree() removes any tree a task can make."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from femd.errors import StateError
from femd.tree import remove_tree


def _deep(root: Path, depth: int) -> Path:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        down = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = down
    with open(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "w") as f:
        f.write("x")
    os.close(fd)
    return root


def test_removes_a_tree_deeper_than_recursion_and_descriptors(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    _deep(work, 5000)
    remove_tree(work)
    assert not work.exists()
    assert tmp_path.exists()


def test_removes_locked_dirs_and_keeps_link_targets(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    work = tmp_path / "work"
    (work / "a" / "b").mkdir(parents=True)
    (work / "a" / "b" / "f").write_text("f")
    (work / "link").symlink_to(outside)
    (work / "a" / "up").symlink_to("../../outside/keep")
    os.mkfifo(work / "fifo")
    (work / "a" / "b").chmod(0)
    (work / "a").chmod(0o500)
    remove_tree(work)
    assert not work.exists()
    assert (outside / "keep").read_text() == "keep"


def test_missing_path_and_plain_file(tmp_path: Path) -> None:
    remove_tree(tmp_path / "absent")
    remove_tree(tmp_path / "no" / "parent")
    f = tmp_path / "file"
    f.write_text("x")
    remove_tree(f)
    assert not f.exists()


def test_unremovable_is_one_line_state_error() -> None:
    with pytest.raises(StateError, match=r"cannot remove .*: "):
        remove_tree(Path("/proc/self/fd"))
