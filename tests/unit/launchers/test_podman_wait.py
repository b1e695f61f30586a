"""PodmanHandle.wait(): a passing podman error while inspecting is asked again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from femd.errors import LaunchError
from femd.launchers.podman import handle as handle_module
from femd.launchers.podman.handle import PodmanHandle

RACE = "podman: inspect t-1: 500 Server Error (read /proc/9/cgroup: no such process)"


def _handle(tmp_path: Path) -> PodmanHandle:
    return PodmanHandle(
        "unix:///nonexistent.sock",
        "cid",
        "t-1",
        timeout_s=60,
        log_max_bytes=1024,
        markers=tmp_path,
        stream=None,
    )


def test_a_failed_inspection_is_asked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[Any] = [LaunchError(RACE), {"State": {"Status": "running"}}]
    answers.append(LaunchError(RACE))
    answers.append(LaunchError(RACE))
    answers.append({"State": {"Status": "exited", "ExitCode": 3}})
    asked: list[int] = []

    def attrs(_self: PodmanHandle) -> dict[str, Any]:
        asked.append(1)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    finished: list[dict[str, Any] | None] = []
    monkeypatch.setattr(PodmanHandle, "_attrs", attrs)
    monkeypatch.setattr(PodmanHandle, "_finish", lambda _s, a: finished.append(a))
    monkeypatch.setattr(handle_module.time, "sleep", lambda _s: None)
    _handle(tmp_path).wait(30)
    assert len(asked) == 5
    assert finished == [{"State": {"Status": "exited", "ExitCode": 3}}]


def test_an_inspection_that_keeps_failing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []

    def attrs(_self: PodmanHandle) -> dict[str, Any]:
        asked.append(1)
        raise LaunchError(RACE)

    monkeypatch.setattr(PodmanHandle, "_attrs", attrs)
    monkeypatch.setattr(handle_module.time, "sleep", lambda _s: None)
    with pytest.raises(LaunchError, match="no such process"):
        _handle(tmp_path).wait(30)
    assert len(asked) == handle_module._INSPECT_TRIES
