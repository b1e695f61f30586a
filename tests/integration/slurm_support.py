"""Fixtures for the real-Slurm tests of the ``slurm`` launcher.

- ``slurm_cluster`` (session): a started :class:`testbed.slurm.SlurmCluster`
  (munged, MariaDB, slurmdbd, slurmctld, one slurmd with cgroup limits), its
  account ``femd`` open to root and the agent tests' task user.
- ``slurm_env`` (function): the ``node_env`` whose ``default`` profile also has a
  ``slurm`` section on that cluster (stage directory under the env's root) and
  whose project ``demo`` may use both ``process`` and ``slurm``.

Without Slurm installed the fixtures skip; with ``CI=true`` or
``FEMD_TEST_REQUIRE`` naming ``slurm`` (or ``all``) they fail instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from testbed.slurm import SlurmCluster, SlurmError, slurm_available  # noqa: E402
from tests.backends import unavailable  # noqa: E402
from tests.integration.agent_support import TASK_USER, NodeEnv  # noqa: E402

__all__ = ["slurm_cluster_fixture", "slurm_env_fixture", "slurm_profile"]


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """A private single-node Slurm cluster with accounting, for the session."""
    why = slurm_available()
    if why is not None:
        unavailable("slurm", f"slurm: {why}")
    cluster = SlurmCluster(users=("root", TASK_USER))
    try:
        cluster.start()
    except SlurmError as e:
        cluster.remove()
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.remove()


def slurm_profile(cluster: SlurmCluster, stage: Path, **sandbox: Any) -> dict[str, Any]:
    """The ``slurm`` section of a profile on *cluster*, staging under *stage*."""
    return {
        "stage_dir": str(stage),
        "slurm_conf": str(cluster.conf),
        "partition": cluster.partition,
        "account": cluster.account,
        "poll_s": 0.5,
        "sandbox": {"run_as": TASK_USER, **sandbox},
    }


@pytest.fixture(name="slurm_env")
def slurm_env_fixture(node_env: NodeEnv, slurm_cluster: SlurmCluster) -> NodeEnv:
    """The ``node_env`` whose tasks may also run as jobs on ``slurm_cluster``."""
    env = node_env
    stage = env.root / "stage"
    stage.mkdir()
    stage.chmod(0o711)  # the task user traverses to its stage
    profile_file = env.root / "launchers" / "default.yaml"
    profile = yaml.safe_load(profile_file.read_text())
    profile["slurm"] = slurm_profile(slurm_cluster, stage)
    profile_file.write_text(yaml.safe_dump(profile))
    policy_file = env.root / "policy.yaml"
    policy = yaml.safe_load(policy_file.read_text())
    policy["projects"]["demo"]["launchers"] = ["process", "slurm"]
    policy_file.write_text(yaml.safe_dump(policy))
    return env
