"""The conftest's backend gating: skip when absent, fail when required."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import conftest  # the root tests/conftest.py under test
import pytest

CONFTEST = Path(__file__).parent.parent / "conftest.py"

MARKED = """
import pytest

@pytest.mark.podman
def test_needs_podman():
    pass

@pytest.mark.rabbitmq
@pytest.mark.bwrap
def test_needs_two():
    pass

def test_plain():
    pass
"""


def _pytest(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run pytest on a marked test file with an empty PATH: no backend exists."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_marked.py").write_text(MARKED)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\n"
        "markers =\n  rabbitmq\n  podman\n  bwrap\n  systemd\n  slurm\n"
    )
    empty = tmp_path / "bin"
    empty.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "FEMD_TEST_REQUIRE")}
    return subprocess.run(  # noqa: S603 (our own interpreter)
        [sys.executable, "-m", "pytest", "-q", "-rsfE", str(tmp_path)],
        cwd=tmp_path,
        # The root conftest plugs in tests.integration.* fixture modules.
        env={**base, "PATH": str(empty), "PYTHONPATH": str(CONFTEST.parents[1]), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_absent_backend_skips(tmp_path):
    p = _pytest(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed, 2 skipped" in p.stdout
    assert "backend 'podman' not available" in p.stdout


def test_required_backend_fails(tmp_path):
    p = _pytest(tmp_path, FEMD_TEST_REQUIRE="bwrap,podman")
    assert p.returncode == 1, p.stdout + p.stderr
    # test_needs_two also needs rabbitmq, which is not required: podman and
    # bwrap fail in setup, nothing is skipped.
    assert "1 passed, 2 errors" in p.stdout
    assert "backend 'podman' is required (CI/FEMD_TEST_REQUIRE) but not" in p.stdout


@pytest.mark.parametrize(
    ("env", "required"),
    [
        ({}, set()),
        ({"FEMD_TEST_REQUIRE": ""}, set()),
        ({"FEMD_TEST_REQUIRE": "podman"}, {"podman"}),
        ({"FEMD_TEST_REQUIRE": " bwrap, rabbitmq ,"}, {"bwrap", "rabbitmq"}),
        (
            {"FEMD_TEST_REQUIRE": "all"},
            {"rabbitmq", "podman", "bwrap", "systemd", "slurm"},
        ),
        ({"CI": "true"}, {"rabbitmq", "podman", "bwrap", "systemd", "slurm"}),
        ({"CI": "false", "FEMD_TEST_REQUIRE": "systemd"}, {"systemd"}),
    ],
    ids=["none", "empty", "one", "list", "all", "ci", "ci-false"],
)
def test_required_backends_from_env(env, required):
    assert conftest.required_backends(env) == required


def test_unknown_required_backend_is_a_usage_error():
    with pytest.raises(pytest.UsageError, match=r"unknown backends \['rabitmq'\]"):
        conftest.required_backends({"FEMD_TEST_REQUIRE": "rabitmq,podman"})
