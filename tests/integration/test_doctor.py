"""`femd doctor`: what this host can enforce, probed for real."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (our own interpreter)
        [
            sys.executable,
            "-m",
            "femd",
            "doctor",
            "--launchers",
            str(REPO / "launchers"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.bwrap
def test_doctor_reports_each_launcher_and_what_it_enforces(tmp_path):
    p = _doctor("--podman-socket", f"unix://{tmp_path}/absent.sock")
    assert p.returncode == 0, p.stderr
    assert "process (profile default): available" in p.stdout
    assert "enforces: memory yes, cpus yes (min 1), pids yes" in p.stdout
    assert "egress yes, ingress yes" in p.stdout  # forwarded by femd
    # A podman service that is not there is named, not a crash.
    assert "podman (profile default): UNAVAILABLE" in p.stdout
    assert "absent.sock" in p.stdout
    assert "tasks can run with: process (default)" in p.stdout
    assert "Traceback" not in p.stderr


@pytest.mark.bwrap
def test_doctor_json(tmp_path):
    p = _doctor("--json", "--podman-socket", f"unix://{tmp_path}/absent.sock")
    assert p.returncode == 0, p.stderr
    rows = {(r["profile"], r["launcher"]): r for r in json.loads(p.stdout)}
    assert rows[("default", "process")]["available"] is True
    assert rows[("default", "process")]["egress"] is True
    assert rows[("default", "process")]["ingress"] is True
    assert rows[("default", "podman")]["available"] is False
    assert rows[("default", "podman")]["problems"]


def test_doctor_with_a_broken_profile_dir_is_one_line(tmp_path):
    (tmp_path / "default.yaml").write_text("apiVersion: femd/v1\nkind: Nope\n")
    p = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "femd", "doctor", "--launchers", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1
    assert p.stderr.startswith("femd: error: ")
